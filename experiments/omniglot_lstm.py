"""The LSTM meta-optimizer (Andrychowicz et al. 2016, "Learning to learn by gradient descent by
gradient descent") on an Omniglot optimizee, trained federated by alphabet, against Adam, RMSprop
and SGD with tuned learning rates.

Optimizee (`fedmeta.models.Optimizee`, selected by task = 'omniglot' algorithm = 'lstm'): a
784-20-5 sigmoid MLP trained from its default random initialisation on one 5-way task's support
set (`--shots` images per class); the LSTM sees only the gradients of that training loss (the
paper's §3.2 MNIST setting on a family of small classification problems).

Training: a real Flower simulation (`fedmeta run`, fusion = "average"): the 30 background
alphabets are 30 training clients (`--train-clients` fewer: contiguous groups of alphabets),
`--fraction` of them sampled per round; each trains the LSTM
locally on batches of `--batch` problems for `--horizon` steps (truncated BPTT, unrolls of
`--unroll`), and the server averages the LSTMs. `--heldout` clients own the 20 evaluation
alphabets and report the query loss after `--steps` LSTM steps at the end.

Test (in this process, on the 20 evaluation alphabets, never trained on): `--problems` fresh
problems per seeded stream; the baselines' learning rates are picked on a log grid by the mean
training loss after `--steps` steps on a separate validation stream (`fedmeta.lab.optimizers`);
every optimizer starts from the same initial optimizee per test problem; we report the training
(support) loss per step with 95 % intervals and the query accuracy after `--steps` steps. The LSTM
is trained on `--horizon` steps and tested on `--steps` (longer: a test of generalisation in time,
as the paper's Figure 5).

    python experiments/omniglot_lstm.py --quick      # smoke run (under a minute)
    python experiments/omniglot_lstm.py              # the reference run (~15 min on 2 cores)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from fedmeta import algorithms, seeding
from fedmeta.lab import federation, tables
from fedmeta.lab.args import REPO, Args, arg, command, parse, settings
from fedmeta.lab.optimizers import baseline, evaluate_optimizer, lstm_rule, query_metrics, tuned_baselines
from fedmeta.results import versions
from fedmeta.tasks import omniglot

DATA = REPO.parent / "shared" / "data" / "omniglot"


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "experiments/omniglot_lstm.py"
    NAME: ClassVar[str] = "omniglot_lstm"
    QUICK: ClassVar[dict] = {"train_clients": 2, "heldout": 1, "fraction": 1.0, "rounds": 2, "batch": 2,
                             "horizon": 4, "unroll": 2, "steps": 6, "problems": 8, "eval_tasks": 2, "shots": 2,
                             "query": 2}

    rounds: int = arg(30, "communication rounds")
    local: int = arg(1, "local batches of problems per round")
    batch: int = arg(4, "problems per batch")
    horizon: int = arg(40, "optimizee steps per training problem")
    unroll: int = arg(20, "truncated-BPTT unroll length")
    meta_lr: float = arg(3e-3, "Adam step on the LSTM")
    shots: int = arg(10, "support (training) images per class")
    query: int = arg(10, "query images per class (accuracy)")
    train_clients: int = arg(30, "training clients (30: one background alphabet each)")
    fraction: float = arg(0.05, "fraction of the training clients sampled per round (0.05 of 30: 2)")
    heldout: int = arg(2, "held-out clients (the 20 evaluation alphabets)")
    eval_tasks: int = arg(10, "problems per held-out client in the federation")
    steps: int = arg(100, "optimizer steps at validation and test")
    problems: int = arg(64, "validation and test problems")
    threads: int = arg(2, "torch threads of the in-process evaluation")
    seed: int = arg(0, "run seed")
    data_dir: Path = arg(DATA, "Omniglot arrays (fedmeta.tasks.omniglot_io)")


def main(argv: list[str] | None = None) -> dict:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(args.threads)
    seeding.seed_everything(args.seed)
    out, t0, load_start = args.out_dir, time.perf_counter(), os.getloadavg()
    cfg = federation.app_config(
        task="omniglot", algorithm="lstm", fusion="average", data_dir=str(Path(args.data_dir).resolve()), ways=5,
        shots=args.shots, query_shots=args.query, eval_shots=args.shots, eval_query_shots=args.query,
        meta_batch_size=args.batch, local_iterations=args.local, lstm_horizon=args.horizon, lstm_unroll=args.unroll,
        meta_lr=args.meta_lr, heldout_partitions=args.heldout, fraction_train=args.fraction, min_train_nodes=2,
        num_rounds=args.rounds, eval_every=args.rounds, checkpoint_every=args.rounds, eval_tasks=args.eval_tasks,
        eval_steps=args.steps, seed=args.seed, omniglot_rotations=True)
    fed = federation.run(cfg, name="fed-lstm", results_dir=out / "runs",
                         num_supernodes=args.train_clients + args.heldout, replace=True)
    model = fed.model()
    algo = algorithms.build(model.config)

    # held-out problems: the 20 evaluation alphabets, no rotations; validation and test streams
    heldout = omniglot.source(model.config.replace(omniglot_split="alphabet"), "test")

    def problems(stream: str, starts: str) -> tuple:
        ep = heldout.sample(args.problems, args.shots, args.query, seeding.generator(args.seed, stream))
        return ep, algo.start_params(model.params, args.problems, seeding.generator(args.seed, starts))

    val, val_start = problems("lstm-validation", "lstm-validation-starts")
    test, test_start = problems("lstm-test", "lstm-test-starts")
    t = time.perf_counter()
    tuned = tuned_baselines(algo, val, val_start, args.steps)
    tune_s = time.perf_counter() - t
    optimizers = {"fed-lstm": lstm_rule(algo, model.params)}
    optimizers.update({name: baseline(name, v["lr"]) for name, v in tuned.items()})
    rows, final, curves = [], {}, {}
    mid = min(args.horizon, args.steps)
    t = time.perf_counter()
    for name, opt in optimizers.items():
        curve = evaluate_optimizer(algo, opt, test, test_start, args.steps)  # (steps + 1, problems)
        q_loss, q_acc = query_metrics(algo, opt, test, test_start, args.steps)
        curves[name] = curve
        mean, half = tables.curve_interval(curve)
        rows += [{"optimizer": name, "step": s, "train_loss": float(m), "train_loss_ci95": float(h)}
                 for s, (m, h) in enumerate(zip(mean, half))]
        final[name] = {
            "lr": tuned[name]["lr"] if name in tuned else None,
            "lr_on_grid_edge": tuned[name]["edge"] if name in tuned else None,
            f"train_loss_step{mid}": tables.interval(curve[mid]),
            f"train_loss_step{args.steps}": tables.interval(curve[-1]),
            "train_loss_diverged": int((~torch.isfinite(curve[-1])).sum()),
            "query_accuracy": tables.interval(q_acc), "query_loss": tables.interval(q_loss)}
        print(name, final[name], flush=True)
    test_s = time.perf_counter() - t
    paired = {}
    for name in tuned:
        diff = curves["fed-lstm"][-1] - curves[name][-1]
        m, h = tables.interval(diff)
        paired[name] = {"mean": m, "ci95": h, "lstm_lower_fraction": float((diff < 0).double().mean())}

    run = fed.load()
    run.rounds.to_csv(out / "rounds.csv", index=False)
    tables.write_csv(out / "curves.csv", rows)
    tables.plot(out / "curves.png", [tables.Line(name, range(c.shape[0]), *tables.curve_interval(c))
                                     for name, c in curves.items()],
                xlabel="optimizer step", ylabel="training (support) cross-entropy", yscale="log", size=(6, 4),
                vlines=[(args.horizon, "training horizon")],
                title=f"Omniglot 5-way MLP, {args.problems} held-out problems")
    summary = {
        "command": command(args), **fed.record(), "seed": args.seed, "settings": settings(args),
        "final": final, "lstm_minus_baseline_final_train_loss": paired,
        "tuning": {k: {"lr": v["lr"], "edge": v["edge"], "val_final_loss": v["grid"]} for k, v in tuned.items()},
        "heldout_clients_last_round": run.rounds.iloc[-1][["eval_loss_pre", "eval_loss_post",
                                                           "eval_accuracy_pre", "eval_accuracy_post"]].to_dict(),
        "seconds": {"federated_training_wall": fed.wall_seconds, "tuning": tune_s, "test": test_s,
                    "total": time.perf_counter() - t0},
        "load_average": {"start": load_start, "end": os.getloadavg()}, "machine": tables.machine(),
        "versions": versions(),
    }
    tables.write_json(out / "summary.json", summary)
    tables.write_text(out / "summary.md", summary_md(summary, args))
    print("\n".join(summary_md(summary, args)))
    return summary


def summary_md(s: dict, args: Settings) -> list[str]:
    mid = min(args.horizon, args.steps)
    lines = ["# LSTM meta-optimizer on Omniglot (784-20-5 sigmoid MLP), trained federated by alphabet", "",
             f"`{s['command']}` (seed {s['seed']}; {s['seconds']['total'] / 60:.1f} min wall, of which federated "
             f"training {s['seconds']['federated_training_wall'] / 60:.1f} min). {args.rounds} rounds, "
             f"{math.ceil(args.fraction * args.train_clients)} of {args.train_clients} background-alphabet clients per "
             f"round, {args.local} "
             f"batch(es) of {args.batch} problems each, horizon {args.horizon} (unrolls of {args.unroll}), "
             f"LSTM Adam {args.meta_lr}. Test: {args.problems} fresh 5-way problems of the 20 evaluation "
             f"alphabets ({args.shots} training and {args.query} query images per class), baselines' learning "
             f"rates tuned on {args.problems} separate validation problems; mean ± 95 % CI.", ""]
    body = []
    for name, f in sorted(s["final"].items(), key=lambda kv: kv[1][f"train_loss_step{args.steps}"][0]):
        lr = f"{f['lr']:.3g}" + (" (grid edge)" if f["lr_on_grid_edge"] else "") if f["lr"] is not None else "-"
        a, b, q = f[f"train_loss_step{mid}"], f[f"train_loss_step{args.steps}"], f["query_accuracy"]
        body.append([name, lr, f"{a[0]:.4g} ± {a[1]:.2g}", f"{b[0]:.4g} ± {b[1]:.2g}",
                     f"{100 * q[0]:.1f} ± {100 * q[1]:.1f} %"])
    lines += tables.markdown_table(["optimizer", "lr", f"training loss after {mid} steps",
                                    f"after {args.steps} steps", f"query accuracy after {args.steps} steps"], body)
    lines += ["", "Paired over the test problems, fed-lstm minus baseline training loss after "
              f"{args.steps} steps (share of problems where the LSTM ends lower): "
              + "; ".join(f"{k}: {v['mean']:.3g} ± {v['ci95']:.2g} ({100 * v['lstm_lower_fraction']:.0f} %)"
                          for k, v in s["lstm_minus_baseline_final_train_loss"].items()) + "."]
    return lines


if __name__ == "__main__":
    main()
