"""Andrychowicz et al. 2016, §3.1 (Figure 4, left): the LSTM optimizer on random 10-dim quadratics
f(theta) = ||W theta - y||^2, against Adam, RMSprop and SGD with tuned learning rates.

Protocol (three disjoint seeded streams of problems):
- train: batches of `--batch` fresh problems per iteration, horizon 100, unrolls of 20, Adam on the
  LSTM (fedmeta.algorithms.lstm_optimizer); every `--val-every` iterations the LSTM is scored on
  the validation problems and the best snapshot is kept;
- validation ("eval" stream): each baseline's learning rate is picked on a log grid by the mean
  loss after `--steps` steps; the same set selects the LSTM snapshot;
- test ("test" stream, fresh seed): every optimizer starts from the same theta_0 ~ N(0, 0.01^2)
  per problem and runs `--steps` steps; we report the mean loss per step with a 95 % interval.

Outputs in results/lstm_quadratic/: curves.csv, curves.png, summary.json, summary.md, lstm.pt.
The baselines and the evaluation are functions (`baseline`, `evaluate_optimizer`,
`tuned_baselines`, `lstm_rule`) for reuse, e.g. a federated comparison on other problem scales.

    python experiments/lstm_quadratic.py            # full run (~13 min on one core)
    python experiments/lstm_quadratic.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.func import grad, vmap

from fedmeta import algorithms, seeding
from fedmeta.algorithms.base import Algorithm
from fedmeta.config import Config
from fedmeta.optim import Params
from fedmeta.tasks import Episode
from fedmeta.tasks.quadratic import QuadraticTasks

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "lstm_quadratic"
# Rule: (params, grads, state) -> (params, state) for ONE task; Optimizer: (rule, init_state).
Rule = Callable[[Params, Params, Any], tuple[Params, Any]]
Optimizer = tuple[Rule, Callable[[Params], Any]]
LR_GRID = [10 ** (e / 4) for e in range(-16, 5)]  # 1e-4 ... 10, four points per decade


# --- baseline optimizers as pure per-task rules ------------------------------------------------
def baseline(name: str, lr: float) -> Optimizer:
    """SGD, RMSprop (alpha 0.99, eps 1e-8) or Adam (0.9, 0.999, eps 1e-8): torch.optim's defaults."""
    zeros = lambda params: {k: torch.zeros_like(v) for k, v in params.items()}  # noqa: E731
    if name == "sgd":
        return (lambda p, g, s: ({k: p[k] - lr * g[k] for k in p}, s)), (lambda params: None)
    if name == "rmsprop":
        def rmsprop(p, g, v):
            v = {k: 0.99 * v[k] + 0.01 * g[k] ** 2 for k in p}
            return {k: p[k] - lr * g[k] / (v[k].sqrt() + 1e-8) for k in p}, v
        return rmsprop, zeros
    if name == "adam":
        def adam(p, g, s):
            m, v, t = s
            t = t + 1
            m = {k: 0.9 * m[k] + 0.1 * g[k] for k in p}
            v = {k: 0.999 * v[k] + 0.001 * g[k] ** 2 for k in p}
            step = {k: (m[k] / (1 - 0.9 ** t)) / ((v[k] / (1 - 0.999 ** t)).sqrt() + 1e-8) for k in p}
            return {k: p[k] - lr * step[k] for k in p}, (m, v, t)
        return adam, lambda params: (zeros(params), zeros(params), torch.zeros((), dtype=torch.float64))
    raise ValueError(f"unknown baseline {name!r}; known: sgd, rmsprop, adam")


def lstm_rule(algo: Algorithm, meta_params: Params) -> Optimizer:
    """The trained LSTM as an Optimizer (its meta-parameters fixed)."""
    rule = algo.inner_rule()
    meta_params = {k: v.detach() for k, v in meta_params.items()}
    return (lambda p, g, s: rule(meta_params, p, g, s)), algo.inner_state


def evaluate_optimizer(algo: Algorithm, optimizer: Optimizer, episode: Episode, start: Params,
                       steps: int, chunk: int = 500) -> torch.Tensor:
    """Loss on each problem after 0..steps updates, (steps + 1, tasks); tasks vmapped in chunks.

    start: name -> (tasks, ...), the optimizee's initial parameters (shared by every optimizer).
    """
    rule, init_state = optimizer

    def one_task(params, x, y):
        state, out = init_state(params), []
        for step in range(steps + 1):
            loss, g = algo.task_loss(params, x, y), None
            out.append(loss)
            if step < steps:
                g = grad(algo.task_loss)(params, x, y)
                params, state = rule(params, g, state)
        return torch.stack(out)

    parts = []
    with torch.no_grad():
        for lo in range(0, episode.num_tasks, chunk):
            p = {k: v[lo:lo + chunk] for k, v in start.items()}
            parts.append(vmap(one_task)(p, episode.support_x[lo:lo + chunk], episode.support_y[lo:lo + chunk]))
    return torch.cat(parts).T.contiguous()


def final_score(losses: torch.Tensor) -> float:
    """Mean final loss; a diverged run (any non-finite loss) scores +inf."""
    final = losses[-1].double()
    return float(final.mean()) if torch.isfinite(final).all() else math.inf


def tuned_baselines(algo: Algorithm, episode: Episode, start: Params, steps: int,
                    names: tuple[str, ...] = ("adam", "rmsprop", "sgd"),
                    grid: list[float] = LR_GRID) -> dict[str, dict]:
    """For each baseline, the lr of `grid` with the lowest mean loss after `steps` steps on the
    given (validation) problems: {name: {"lr": best, "grid": {lr: score}}}. An optimum on the
    grid's edge is flagged by "edge": True."""
    out = {}
    for name in names:
        scores = {lr: final_score(evaluate_optimizer(algo, baseline(name, lr), episode, start, steps))
                  for lr in grid}
        best = min(scores, key=scores.get)
        out[name] = {"lr": best, "grid": scores, "edge": best in (grid[0], grid[-1])}
    return out


def interval(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95 % half-width (normal approximation) over the last dim."""
    v = values.double()
    return float(v.mean()), 1.96 * float(v.std(unbiased=True)) / math.sqrt(v.numel())


# --- the experiment ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=1000, help="training batches of problems")
    ap.add_argument("--batch", type=int, default=128, help="problems per training batch (paper: 128)")
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps at validation/test")
    ap.add_argument("--val-problems", type=int, default=1000)
    ap.add_argument("--test-problems", type=int, default=1000)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--scale-min", type=float, default=1.0, help="W ~ N(0, s^2), s ~ U[min, max]")
    ap.add_argument("--scale-max", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.iterations, args.batch, args.val_problems, args.test_problems, args.val_every = 6, 16, 100, 100, 3
    torch.set_num_threads(args.threads)
    seeding.seed_everything(args.seed)
    t0 = time.time()

    cfg = Config(task="quadratic", algorithm="lstm", seed=args.seed, meta_lr=args.meta_lr,
                 meta_batch_size=args.batch, quadratic_scale_min=args.scale_min,
                 quadratic_scale_max=args.scale_max)
    algo = algorithms.build(cfg)
    source = QuadraticTasks(cfg.quadratic_dim, (args.scale_min, args.scale_max))

    def problems(n: int, stream: str) -> tuple[Episode, Params]:
        gen = seeding.generator(args.seed, stream, 1)
        episode = source.sample(n, generator=gen)
        return episode, algo.start_params({}, n, gen)

    val, val_start = problems(args.val_problems, "eval")
    test, test_start = problems(args.test_problems, "test")

    # --- train, keeping the snapshot with the best validation score
    meta = algo.init(seeding.generator(args.seed, "init"))
    untrained = dict(meta)
    opt_state, curve, val_curve = None, [], []
    best = (final_score(evaluate_optimizer(algo, lstm_rule(algo, meta), val, val_start, args.steps)), 0, meta)
    val_curve.append({"iteration": 0, "val_final_loss": best[0]})
    done = 0
    while done < args.iterations:
        n = min(args.val_every, args.iterations - done)
        offset = done  # batch i of the whole run is drawn from stream ("train", i)
        sample = lambda i: source.sample(  # noqa: E731
            args.batch, generator=seeding.generator(args.seed, "train", offset + i))
        meta, opt_state, part = algo.train(meta, opt_state, sample, n)
        curve += part
        done += n
        score = final_score(evaluate_optimizer(algo, lstm_rule(algo, meta), val, val_start, args.steps))
        val_curve.append({"iteration": done, "val_final_loss": score})
        print(f"iter {done:5d}  train loss {sum(part) / n:9.4f}  val final loss {score:.4f}  "
              f"({time.time() - t0:.0f} s)", flush=True)
        if score < best[0]:
            best = (score, done, meta)
    train_seconds = time.time() - t0
    val_score, best_iter, meta = best

    # --- baselines tuned on validation, everyone on the held-out test problems
    tuned = tuned_baselines(algo, val, val_start, args.steps)
    optimizers = {"lstm": lstm_rule(algo, meta), "lstm-untrained": lstm_rule(algo, untrained)}
    optimizers.update({name: baseline(name, t["lr"]) for name, t in tuned.items()})
    curves = {name: evaluate_optimizer(algo, opt, test, test_start, args.steps) for name, opt in optimizers.items()}
    write(args, cfg, curves, tuned, val_curve, curve, best_iter, val_score, meta, train_seconds, time.time() - t0)


def write(args, cfg, curves, tuned, val_curve, curve, best_iter, val_score, meta, train_seconds, wall) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    rows = ["optimizer,step,mean_loss,ci95"]
    final = {}
    for name, losses in curves.items():
        for step in range(losses.shape[0]):
            m, h = interval(losses[step])
            rows.append(f"{name},{step},{m:.6g},{h:.6g}")
        m, h = interval(losses[-1])
        final[name] = {"mean": m, "ci95": h, "median": float(losses[-1].double().median()),
                       "lr": tuned[name]["lr"] if name in tuned else None}
    (args.out / "curves.csv").write_text("\n".join(rows) + "\n")
    # paired over the same test problems: final loss of the LSTM minus that of each baseline
    paired = {}
    for name in tuned:
        m, h = interval(curves["lstm"][-1] - curves[name][-1])
        better = float((curves["lstm"][-1] < curves[name][-1]).double().mean())
        paired[name] = {"mean": m, "ci95": h, "lstm_better_fraction": better}

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        mean = losses.double().mean(1)
        half = 1.96 * losses.double().std(1) / math.sqrt(losses.shape[1])
        steps = range(losses.shape[0])
        ax.plot(steps, mean, label=name, ls="--" if name == "lstm-untrained" else "-")
        ax.fill_between(steps, (mean - half).clamp_min(1e-12), mean + half, alpha=0.2)
    ax.set(yscale="log", xlabel="step", ylabel="mean loss ||W theta - y||^2",
           title=f"{cfg.quadratic_dim}-dim quadratics, {losses.shape[1]} held-out problems")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=120)
    plt.close(fig)

    torch.save({k: v.clone() for k, v in meta.items()}, args.out / "lstm.pt")
    summary = {
        "final_loss": final, "steps": args.steps,
        "tuning": {k: {"lr": v["lr"], "edge": v["edge"], "val_final_loss": v["grid"]} for k, v in tuned.items()},
        "lr_grid": LR_GRID, "lstm_best_iteration": best_iter, "lstm_val_final_loss": val_score,
        "val_curve": val_curve, "train_curve": curve,
        "settings": {**vars(args), "out": str(args.out), "config": cfg.to_mapping()},
        "command": " ".join(["python", "experiments/lstm_quadratic.py", *args.argv]),
        "lstm_minus_baseline": paired,
        "seed": args.seed, "torch": torch.__version__, "train_seconds": train_seconds, "wall_seconds": wall,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")

    md = [f"# LSTM optimizer vs tuned baselines on {cfg.quadratic_dim}-dim quadratics",
          "", f"`{summary['command']}` (seed {args.seed}, torch {torch.__version__}, wall {wall:.0f} s).",
          f"{args.test_problems} held-out problems, W ~ N(0, s^2), s ~ U[{args.scale_min}, {args.scale_max}]; "
          f"loss after {args.steps} steps, mean +- 95 % CI. Learning rates tuned on {args.val_problems} "
          "separate validation problems.", "",
          "| optimizer | lr | final loss (mean +- 95% CI) | median |", "|---|---|---|---|"]
    for name, f in sorted(final.items(), key=lambda kv: kv[1]["mean"]):
        lr = f"{f['lr']:.3g}" if f["lr"] is not None else "-"
        md.append(f"| {name} | {lr} | {f['mean']:.4g} +- {f['ci95']:.2g} | {f['median']:.3g} |")
    md += ["", f"LSTM: {args.iterations} training batches of {args.batch} problems (horizon "
           f"{cfg.lstm_horizon}, unroll {cfg.lstm_unroll}, meta-lr {args.meta_lr}), snapshot of iteration "
           f"{best_iter} chosen on validation; training took {train_seconds:.0f} s.", "",
           "Paired over the test problems, LSTM minus baseline final loss (mean +- 95% CI; share of "
           "problems where the LSTM ends lower): "
           + "; ".join(f"{k}: {v['mean']:.3g} +- {v['ci95']:.2g} ({100 * v['lstm_better_fraction']:.0f} %)"
                       for k, v in paired.items()) + "."]
    (args.out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
