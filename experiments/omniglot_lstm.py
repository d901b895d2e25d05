"""The LSTM meta-optimizer (Andrychowicz et al. 2016, "Learning to learn by gradient descent by
gradient descent") on an Omniglot optimizee, trained federated by alphabet, against Adam, RMSprop
and SGD with tuned learning rates.

Optimizee (`fedmeta.models.Optimizee`, selected by task = 'omniglot' algorithm = 'lstm'): a
784-20-5 sigmoid MLP trained from its default random initialisation on one 5-way task's support
set (`--shots` images per class); the LSTM sees only the gradients of that training loss (the
paper's §3.2 MNIST setting on a family of small classification problems).

Training: a real Flower simulation (`fedmeta run`, fusion = "average"): the 30 background
alphabets are 30 training clients, `--fraction` of them sampled per round; each trains the LSTM
locally on batches of `--batch` problems for `--horizon` steps (truncated BPTT, unrolls of
`--unroll`), and the server averages the LSTMs. `--heldout` clients own the 20 evaluation
alphabets and report the query loss after `--steps` LSTM steps at the end.

Test (in this process, on the 20 evaluation alphabets, never trained on): `--problems` fresh
problems per seeded stream; the baselines' learning rates are picked on a log grid by the mean
training loss after `--steps` steps on a separate validation stream (experiments/lstm_quadratic.py's
`tuned_baselines`); every optimizer starts from the same initial optimizee per test problem; we
report the training (support) loss per step with 95 % intervals and the query accuracy after
`--steps` steps. The LSTM is trained on `--horizon` steps and tested on `--steps` (longer: a test
of generalisation in time, as the paper's Figure 5).

    python experiments/omniglot_lstm.py --quick      # smoke run (a minute or two)
    python experiments/omniglot_lstm.py              # the reference run (~15 min on 2 cores)
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.func import grad, vmap

from fedmeta import algorithms, losses, seeding
from fedmeta.algorithms.base import Algorithm
from fedmeta.optim import Params
from fedmeta.results import load_meta_model, load_run, versions
from fedmeta.tasks import Episode
from fedmeta.tasks import omniglot

from lstm_quadratic import Optimizer, baseline, evaluate_optimizer, interval, lstm_rule, tuned_baselines
from omniglot_central import DATA, write_csv
from protocol import machine, write_json
from sinusoid_federated import run as flower_run

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "omniglot_lstm"
TRAIN_CLIENTS = 30
OVERRIDES = ("task='omniglot' algorithm='lstm' fusion='average' data-dir='{data}' ways=5 shots={shots} "
             "query-shots={query} eval-shots={shots} eval-query-shots={query} meta-batch-size={batch} "
             "local-iterations={local} lstm-horizon={horizon} lstm-unroll={unroll} meta-lr={meta_lr} "
             "heldout-partitions={heldout} fraction-train={fraction} min-train-nodes=2 num-rounds={rounds} "
             "eval-every={rounds} checkpoint-every={rounds} eval-tasks={eval_tasks} eval-steps={steps} "
             "seed={seed} omniglot-rotations=true")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run; output in /tmp unless --out")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local", type=int, default=1, help="local batches of problems per round")
    p.add_argument("--batch", type=int, default=4, help="problems per batch")
    p.add_argument("--horizon", type=int, default=40, help="optimizee steps per training problem")
    p.add_argument("--unroll", type=int, default=20)
    p.add_argument("--meta-lr", type=float, default=3e-3, help="Adam on the LSTM")
    p.add_argument("--shots", type=int, default=10, help="support (training) images per class")
    p.add_argument("--query", type=int, default=10, help="query images per class (accuracy)")
    p.add_argument("--fraction", type=float, default=0.05, help="2 of the 30 training clients per round")
    p.add_argument("--heldout", type=int, default=2)
    p.add_argument("--eval-tasks", type=int, default=10, help="problems per held-out client in the federation")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps at validation/test")
    p.add_argument("--problems", type=int, default=64, help="validation and test problems")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the in-process evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.rounds, args.batch, args.horizon, args.unroll, args.steps = 2, 2, 4, 2, 6
        args.problems, args.eval_tasks, args.shots, args.query = 8, 2, 2, 2
    if args.out is None:
        args.out = Path("/tmp/omniglot_lstm_quick") if args.quick else OUT
    return args


def query_metrics(algo: Algorithm, optimizer: Optimizer, episode: Episode, start: Params, steps: int,
                  chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Query loss and accuracy per problem, (tasks,) each, after `steps` updates on the support set
    (the same updates as `evaluate_optimizer`, which reports the support loss only)."""
    rule, init_state = optimizer

    def one_task(params, xs, ys, xq, yq):
        state = init_state(params)
        for _ in range(steps):
            params, state = rule(params, grad(algo.task_loss)(params, xs, ys), state)
        out = algo.forward(params, xq)
        return algo.loss(out, yq), losses.accuracy(out, yq)

    loss_parts, acc_parts = [], []
    with torch.no_grad():
        for lo in range(0, episode.num_tasks, chunk):
            p = {k: v[lo:lo + chunk] for k, v in start.items()}
            loss, acc = vmap(one_task)(p, *(t[lo:lo + chunk] for t in episode))
            loss_parts.append(loss)
            acc_parts.append(acc)
    return torch.cat(loss_parts), torch.cat(acc_parts)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    seeding.seed_everything(args.seed)
    out, t0 = args.out, time.perf_counter()
    load_start = os.getloadavg()
    n = TRAIN_CLIENTS + args.heldout
    overrides = OVERRIDES.format(data=Path(args.data_dir).resolve(), shots=args.shots, query=args.query,
                                 batch=args.batch, local=args.local, horizon=args.horizon, unroll=args.unroll,
                                 meta_lr=args.meta_lr, heldout=args.heldout, fraction=args.fraction,
                                 rounds=args.rounds, eval_tasks=args.eval_tasks, steps=args.steps, seed=args.seed)
    shutil.rmtree(out / "runs" / "fed-lstm", ignore_errors=True)
    train_wall = flower_run("fed-lstm", overrides, out, n)
    model = load_meta_model(out / "runs" / "fed-lstm" / "model.pt")
    cfg = model.config
    algo = algorithms.build(cfg)

    # held-out problems: the 20 evaluation alphabets, no rotations; validation and test streams
    heldout = omniglot.source(cfg.replace(omniglot_split="alphabet"), "test")

    def problems(stream: str) -> tuple[Episode, Params]:
        ep = heldout.sample(args.problems, args.shots, args.query, seeding.generator(args.seed, stream, 900))
        return ep, algo.start_params(model.params, args.problems, seeding.generator(args.seed, stream, 950))

    (val, val_start), (test, test_start) = problems("eval"), problems("test")
    t = time.perf_counter()
    tuned = tuned_baselines(algo, val, val_start, args.steps)
    tune_s = time.perf_counter() - t
    optimizers = {"fed-lstm": lstm_rule(algo, model.params)}
    optimizers.update({name: baseline(name, v["lr"]) for name, v in tuned.items()})
    rows, final, curves = [], {}, {}
    t = time.perf_counter()
    for name, opt in optimizers.items():
        curve = evaluate_optimizer(algo, opt, test, test_start, args.steps)  # (steps + 1, problems)
        q_loss, q_acc = query_metrics(algo, opt, test, test_start, args.steps)
        curves[name] = curve
        for step in range(curve.shape[0]):
            m, h = interval(curve[step])
            rows.append({"optimizer": name, "step": step, "train_loss": m, "train_loss_ci95": h})
        mid = min(args.horizon, args.steps)
        final[name] = {
            "lr": tuned[name]["lr"] if name in tuned else None,
            "lr_on_grid_edge": tuned[name]["edge"] if name in tuned else None,
            f"train_loss_step{mid}": interval(curve[mid]), f"train_loss_step{args.steps}": interval(curve[-1]),
            "train_loss_diverged": int((~torch.isfinite(curve[-1])).sum()),
            "query_accuracy": interval(q_acc), "query_loss": interval(q_loss)}
        print(name, final[name], flush=True)
    test_s = time.perf_counter() - t
    paired = {}
    for name in tuned:
        diff = curves["fed-lstm"][-1] - curves[name][-1]
        paired[name] = {"mean": interval(diff)[0], "ci95": interval(diff)[1],
                        "lstm_lower_fraction": float((diff < 0).double().mean())}

    run = load_run(out / "runs" / "fed-lstm")
    run.rounds.to_csv(out / "rounds.csv", index=False)
    write_csv(out / "curves.csv", rows)
    plot(curves, out / "curves.png", args)
    summary = {
        "command": "python experiments/omniglot_lstm.py " + " ".join(args.argv), "overrides": overrides,
        "federation": f"num-supernodes={n} client-resources-num-cpus=1", "seed": args.seed,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "final": final, "lstm_minus_baseline_final_train_loss": paired,
        "tuning": {k: {"lr": v["lr"], "edge": v["edge"], "val_final_loss": v["grid"]} for k, v in tuned.items()},
        "heldout_clients_last_round": run.rounds.iloc[-1][["eval_loss_pre", "eval_loss_post",
                                                           "eval_accuracy_pre", "eval_accuracy_post"]].to_dict(),
        "seconds": {"federated_training_wall": train_wall, "tuning": tune_s, "test": test_s,
                    "total": time.perf_counter() - t0},
        "load_average": {"start": load_start, "end": os.getloadavg()}, "machine": machine(), "versions": versions(),
    }
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_md(summary, args))
    print((out / "summary.md").read_text())
    return summary


def summary_md(s: dict, args) -> str:
    mid = min(args.horizon, args.steps)
    lines = ["# LSTM meta-optimizer on Omniglot (784-20-5 sigmoid MLP), trained federated by alphabet", "",
             f"`{s['command']}` (seed {s['seed']}; {s['seconds']['total'] / 60:.1f} min wall, of which federated "
             f"training {s['seconds']['federated_training_wall'] / 60:.1f} min). {args.rounds} rounds, "
             f"{math.ceil(args.fraction * TRAIN_CLIENTS)} of 30 background-alphabet clients per round, {args.local} "
             f"batch(es) of {args.batch} problems each, horizon {args.horizon} (unrolls of {args.unroll}), "
             f"LSTM Adam {args.meta_lr}. Test: {args.problems} fresh 5-way problems of the 20 evaluation "
             f"alphabets ({args.shots} training and {args.query} query images per class), baselines' learning "
             f"rates tuned on {args.problems} separate validation problems; mean ± 95 % CI.", "",
             f"| optimizer | lr | training loss after {mid} steps | after {args.steps} steps | "
             f"query accuracy after {args.steps} steps |", "|---|---|---|---|---|"]
    for name, f in sorted(s["final"].items(), key=lambda kv: kv[1][f"train_loss_step{args.steps}"][0]):
        lr = f"{f['lr']:.3g}" + (" (grid edge)" if f["lr_on_grid_edge"] else "") if f["lr"] is not None else "-"
        a, b, q = f[f"train_loss_step{mid}"], f[f"train_loss_step{args.steps}"], f["query_accuracy"]
        lines.append(f"| {name} | {lr} | {a[0]:.4g} ± {a[1]:.2g} | {b[0]:.4g} ± {b[1]:.2g} | "
                     f"{100 * q[0]:.1f} ± {100 * q[1]:.1f} % |")
    lines += ["", "Paired over the test problems, fed-lstm minus baseline training loss after "
              f"{args.steps} steps (share of problems where the LSTM ends lower): "
              + "; ".join(f"{k}: {v['mean']:.3g} ± {v['ci95']:.2g} ({100 * v['lstm_lower_fraction']:.0f} %)"
                          for k, v in s["lstm_minus_baseline_final_train_loss"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, torch.Tensor], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        mean = c.double().mean(1)
        half = 1.96 * c.double().std(1) / math.sqrt(c.shape[1])
        ax.plot(range(c.shape[0]), mean, label=name)
        ax.fill_between(range(c.shape[0]), mean - half, mean + half, alpha=0.2)
    ax.axvline(args.horizon, color="gray", ls=":", lw=1, label="training horizon")
    ax.set(yscale="log", xlabel="optimizer step", ylabel="training (support) cross-entropy",
           title=f"Omniglot 5-way MLP, {c.shape[1]} held-out problems")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
