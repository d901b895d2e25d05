"""Andrychowicz et al. 2016, §3.1 (Figure 4, left): the LSTM optimizer on random 10-dim quadratics
f(theta) = ||W theta - y||^2, against Adam, RMSprop and SGD with tuned learning rates.

Protocol (three disjoint seeded streams of problems):
- train: batches of `--batch` fresh problems per iteration, horizon 100, unrolls of 20, Adam on the
  LSTM (fedmeta.algorithms.lstm_optimizer); every `--val-every` iterations the LSTM is scored on
  the validation problems and the best snapshot is kept;
- validation: each baseline's learning rate is picked on a log grid by the mean loss after `--steps`
  steps; the same set selects the LSTM snapshot;
- test: every optimizer starts from the same theta_0 ~ N(0, 0.01^2) per problem and runs `--steps`
  steps; we report the mean loss per step with a 95 % interval.

Outputs in results/lstm_quadratic/: curves.csv, curves.png, summary.json, summary.md, and lstm.pt, the chosen
LSTM snapshot as a meta-model (`fedmeta.load_meta_model`: config + "lstm/..." parameters). The baselines and
the evaluation live in `fedmeta.lab.optimizers`.

The committed lstm.pt was first written as a bare parameter dict; it was converted in place, parameters
unchanged, with the config this script builds for its recorded command (no arguments):

    python -c "import torch; from experiments import lstm_quadratic as e; from fedmeta.lab.args import parse; \
      from fedmeta.results import save_meta_model; p = 'results/lstm_quadratic/lstm.pt'; \
      save_meta_model(p, torch.load(p, weights_only=True), e.config(parse(e.Settings, [])))"

    python experiments/lstm_quadratic.py            # full run (~13 min on one core)
    python experiments/lstm_quadratic.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedmeta import algorithms, seeding
from fedmeta.config import Config
from fedmeta.lab import tables
from fedmeta.lab.args import Args, arg, command, parse, settings
from fedmeta.lab.optimizers import LR_GRID, baseline, evaluate_optimizer, final_score, lstm_rule, tuned_baselines
from fedmeta.optim import Params
from fedmeta.results import save_meta_model
from fedmeta.tasks import Episode
from fedmeta.tasks.quadratic import QuadraticTasks

__all__ = ["baseline", "evaluate_optimizer", "lstm_rule", "main"]  # the optimizers, re-exported for old imports


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "experiments/lstm_quadratic.py"
    NAME: ClassVar[str] = "lstm_quadratic"
    QUICK: ClassVar[dict] = {"iterations": 6, "batch": 16, "val_problems": 100, "test_problems": 100,
                             "val_every": 3}

    seed: int = arg(0, "run seed (initialisation, training, validation and test problems)")
    iterations: int = arg(1000, "training batches of problems")
    batch: int = arg(128, "problems per training batch (paper: 128)")
    meta_lr: float = arg(1e-3, "Adam step on the LSTM")
    steps: int = arg(100, "optimizer steps at validation and test")
    val_problems: int = arg(1000, "validation problems (learning rates, LSTM snapshot)")
    test_problems: int = arg(1000, "held-out test problems")
    val_every: int = arg(50, "training iterations between validations of the LSTM")
    scale_min: float = arg(1.0, "W ~ N(0, s^2), s ~ U[scale-min, scale-max]")
    scale_max: float = arg(1.0, "upper end of the scale s of W")
    threads: int = arg(1, "torch intra-op threads")


def config(args: Settings) -> Config:
    """The run's config: the LSTM optimizer on the quadratic family of --scale-min/--scale-max."""
    return Config(task="quadratic", algorithm="lstm", seed=args.seed, meta_lr=args.meta_lr,
                  meta_batch_size=args.batch, quadratic_scale_min=args.scale_min, quadratic_scale_max=args.scale_max)


def main(argv: list[str] | None = None) -> dict:
    args = parse(Settings, argv, __doc__.split("\n")[0])
    torch.set_num_threads(args.threads)
    seeding.seed_everything(args.seed)
    t0 = time.time()
    cfg = config(args)
    algo = algorithms.build(cfg)
    source = QuadraticTasks(cfg.quadratic_dim, (args.scale_min, args.scale_max))

    def problems(n: int, stream: str) -> tuple[Episode, Params]:
        gen = seeding.generator(args.seed, stream)  # the problems, then their starting points
        episode = source.sample(n, generator=gen)
        return episode, algo.start_params({}, n, gen)

    val, val_start = problems(args.val_problems, "quadratic-validation")
    test, test_start = problems(args.test_problems, "quadratic-test")

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
        meta, opt_state, part = algo.train(meta, opt_state, lambda i: source.sample(
            args.batch, generator=seeding.generator(args.seed, "train", offset + i)), n)
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
    return write(args, cfg, meta, curves, tuned, val_curve, curve, best_iter, val_score, train_seconds,
                 time.time() - t0)


def write(args: Settings, cfg: Config, meta: Params, curves: dict, tuned: dict, val_curve: list, curve: list,
          best_iter: int, val_score: float, train_seconds: float, wall: float) -> dict:
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    save_meta_model(out / "lstm.pt", meta, cfg)  # the chosen snapshot, loadable by fedmeta.load_meta_model
    rows, final, paired = [], {}, {}
    for name, losses in curves.items():  # losses: (steps + 1, problems)
        mean, half = tables.curve_interval(losses)
        rows += [{"optimizer": name, "step": s, "mean_loss": float(m), "ci95": float(h)}
                 for s, (m, h) in enumerate(zip(mean, half))]
        m, h = tables.interval(losses[-1])
        final[name] = {"mean": m, "ci95": h, "median": float(losses[-1].double().median()),
                       "lr": tuned[name]["lr"] if name in tuned else None}
    tables.write_csv(out / "curves.csv", rows)
    for name in tuned:  # paired over the same test problems: final loss of the LSTM minus that of each baseline
        m, h = tables.interval(curves["lstm"][-1] - curves[name][-1])
        paired[name] = {"mean": m, "ci95": h,
                        "lstm_better_fraction": float((curves["lstm"][-1] < curves[name][-1]).double().mean())}
    problems = next(iter(curves.values())).shape[1]
    tables.plot(out / "curves.png", [
        tables.Line(name, range(losses.shape[0]), *tables.curve_interval(losses),
                    style="--" if name == "lstm-untrained" else "-") for name, losses in curves.items()],
        xlabel="step", ylabel="mean loss ||W theta - y||^2", yscale="log", legend_size=10, size=(6, 4),
        title=f"{cfg.quadratic_dim}-dim quadratics, {problems} held-out problems")
    summary = {
        "final_loss": final, "steps": args.steps,
        "tuning": {k: {"lr": v["lr"], "edge": v["edge"], "val_final_loss": v["grid"]} for k, v in tuned.items()},
        "lr_grid": LR_GRID, "lstm_best_iteration": best_iter, "lstm_val_final_loss": val_score,
        "val_curve": val_curve, "train_curve": curve,
        "settings": {**settings(args), "out": str(out), "config": cfg.to_mapping()},
        "command": command(args), "lstm_minus_baseline": paired, "machine": tables.machine(),
        "seed": args.seed, "torch": torch.__version__, "train_seconds": train_seconds, "wall_seconds": wall,
    }
    tables.write_json(out / "summary.json", summary)
    md = [f"# LSTM optimizer vs tuned baselines on {cfg.quadratic_dim}-dim quadratics",
          "", f"`{summary['command']}` (seed {args.seed}, torch {torch.__version__}, wall {wall:.0f} s).",
          f"{args.test_problems} held-out problems, W ~ N(0, s^2), s ~ U[{args.scale_min}, {args.scale_max}]; "
          f"loss after {args.steps} steps, mean +- 95 % CI. Learning rates tuned on {args.val_problems} "
          "separate validation problems.", ""]
    md += tables.markdown_table(
        ["optimizer", "lr", "final loss (mean +- 95% CI)", "median"],
        [[name, "-" if f["lr"] is None else f"{f['lr']:.3g}", f"{f['mean']:.4g} +- {f['ci95']:.2g}",
          f"{f['median']:.3g}"] for name, f in sorted(final.items(), key=lambda kv: kv[1]["mean"])])
    md += ["", f"LSTM: {args.iterations} training batches of {args.batch} problems (horizon "
           f"{cfg.lstm_horizon}, unroll {cfg.lstm_unroll}, meta-lr {args.meta_lr}), snapshot of iteration "
           f"{best_iter} chosen on validation; training took {train_seconds:.0f} s.", "",
           "Paired over the test problems, LSTM minus baseline final loss (mean +- 95% CI; share of "
           "problems where the LSTM ends lower): "
           + "; ".join(f"{k}: {v['mean']:.3g} +- {v['ci95']:.2g} ({100 * v['lstm_better_fraction']:.0f} %)"
                       for k, v in paired.items()) + "."]
    tables.write_text(out / "summary.md", md)
    print("\n".join(md))
    return summary


if __name__ == "__main__":
    main()
