"""Central MAML on sinusoid regression, reproducing MAML (Finn et al. 2017) Table 2 / App. C.

Settings of the paper: K = 10 support points in training, one inner step, alpha = 0.01, Adam 1e-3,
meta-batch 25 tasks, 70 000 meta-iterations. Evaluation: 600 fresh tasks, K = 5 support points,
query loss (MSE on 100 points of the task) after 1, 5 and 10 steps of alpha = 0.01, with 95 %
intervals. Also the "pretrained" baseline of the paper (one regressor trained on all tasks, then
fine-tuned the same way).

    python experiments/sinusoid_central.py                 # the full run (results/sinusoid_central/)
    python experiments/sinusoid_central.py --iterations 2000 --out /tmp/quick

The trained meta-model is saved as `model.pt`: `fedmeta.load_meta_model(path)` returns its config,
parameters and the `nn.Module` with the learned initialisation.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from fedmeta import algorithms, partition, seeding
from fedmeta.config import Config
from fedmeta.results import save_meta_model

from protocol import evaluate_protocol, machine, write_json

PAPER = {"maml": {1: 0.67, 5: 0.38, 10: 0.35}}  # MAML paper, App. C, Table 2 (K = 5)


def train(cfg: Config, iterations: int, log_every: int, val) -> tuple[dict, list[dict], float]:
    """Central meta-training; returns params, the validation curve and seconds of training."""
    algo = algorithms.build(cfg)
    params = algo.init(seeding.generator(cfg.seed, "init"))
    source = partition.full_source(cfg)
    g = seeding.generator(cfg.seed, "train")
    state, curve, seconds = None, [], 0.0
    for start in range(0, iterations, log_every):
        n = min(log_every, iterations - start)
        t0 = time.perf_counter()
        params, state, losses = algo.train(params, state, lambda i: source.sample(
            cfg.meta_batch_size, cfg.shots, cfg.query_shots, g), n)
        seconds += time.perf_counter() - t0
        row = {"iteration": start + n, "train_loss": sum(losses) / len(losses), **val(params)}
        curve.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return params, curve, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=70_000)
    p.add_argument("--log-every", type=int, default=2_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the meta-gradient")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "sinusoid_central"))
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    base = Config(seed=args.seed, compile=args.compile, eval_shots=5, eval_query_shots=100)
    source = partition.full_source(base)
    summary = {"command": "python experiments/sinusoid_central.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"), "machine": machine()}
    rows = []
    for name in ("maml", "pretrain"):
        cfg = base.replace(algorithm=name)

        def val(params):  # a small fixed validation set, 1 and 10 steps
            r = evaluate_protocol(cfg, params, source, tasks=100, shots=5, query_shots=100, steps=(0, 1, 10),
                                  seed=args.seed + 1)
            return {f"val_loss_{x['steps']}": x["loss"] for x in r}

        params, curve, seconds = train(cfg, args.iterations, args.log_every, val)
        final = evaluate_protocol(cfg, params, source, tasks=600, shots=5, query_shots=100, steps=(0, 1, 5, 10),
                                  seed=args.seed + 2)
        for r in final:
            rows.append({"algorithm": name, **r, "paper": PAPER.get(name, {}).get(r["steps"])})
        save_meta_model(out / f"{name}.pt", params, cfg, None)
        with (out / f"curve_{name}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(curve[0]))
            w.writeheader()
            w.writerows(curve)
        summary[name] = {"train_seconds": seconds, "ms_per_iteration": 1000 * seconds / args.iterations,
                         "iterations": args.iterations, "config": cfg.to_mapping()}
    with (out / "eval.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary["eval"] = rows
    write_json(out / "summary.json", summary)
    lines = ["| algorithm | steps | MSE (600 tasks, K=5) | 95% CI | paper |", "|---|---|---|---|---|"]
    lines += [f"| {r['algorithm']} | {r['steps']} | {r['loss']:.3f} | ± {r['loss_ci95']:.3f} | "
              f"{r['paper'] if r['paper'] is not None else ''} |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
