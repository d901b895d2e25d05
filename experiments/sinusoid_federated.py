"""Federated MAML on sinusoid with 10 non-IID clients (amplitude slices; 8 train, 2 held out)
against central MAML (experiments/sinusoid_central.py) under the same evaluation protocol: 600
fresh tasks of the full family, K = 5, MSE after 1/5/10 steps. Three federations, each a real
Flower simulation started with `fedmeta run`:

- fedmeta-average:  MAML, every client meta-trains locally, meta-models averaged (FedMeta);
- fedmeta-gradient: MAML, distributed meta-gradients averaged, server Adam (distributed MAML);
- fedavg:           a plain regressor trained jointly (no meta-learning), FedAvg, then fine-tuned.

    python experiments/sinusoid_federated.py            # full (tens of minutes on 2 cores)
    python experiments/sinusoid_federated.py --quick    # a few minutes, smaller budgets
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedmeta import partition
from fedmeta.config import Config
from fedmeta.results import load_checkpoint, load_meta_model, load_runs

from protocol import evaluate_protocol, machine, write_json

REPO = Path(__file__).resolve().parents[1]

# name -> run-config overrides (on top of the pyproject defaults)
RUNS = {
    "fedmeta-average": "algorithm='maml' fusion='average' num-rounds={rounds} local-iterations={local}",
    "fedmeta-gradient": "algorithm='maml' fusion='meta-gradient' num-rounds={grad_rounds} local-iterations=1 "
                        "server-lr={server_lr}",
    "fedavg": "algorithm='pretrain' fusion='average' num-rounds={rounds} local-iterations={local}",
}
COMMON = "eval-every={eval_every} checkpoint-every={eval_every} eval-tasks=100 server-eval-tasks=0 compile={compile}"


def run(name: str, overrides: str, out: Path, clients: int) -> float:
    cmd = [str(Path(sys.executable).parent / "fedmeta"), "run", "--app", str(REPO), "--name", name,
           "--results-dir", str(out / "runs"), "-c", overrides,
           "--federation-config", f"num-supernodes={clients} client-resources-num-cpus=1"]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--local", type=int, default=100)
    p.add_argument("--grad-rounds", type=int, default=3000)
    p.add_argument("--server-lr", type=float, default=0.003)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--only", nargs="*", choices=list(RUNS),
                   help="run only these; the others' finished runs in --out are reused for the table")
    p.add_argument("--out", default=str(REPO / "results" / "sinusoid_federated"))
    args = p.parse_args()
    if args.quick:
        args.rounds, args.local, args.grad_rounds = 10, 50, 200
    torch.set_num_threads(1)
    out = Path(args.out)
    fill = dict(rounds=args.rounds, local=args.local, grad_rounds=args.grad_rounds, server_lr=args.server_lr,
                eval_every=max(1, args.rounds // 10), compile=str(args.compile).lower())
    summary = {"command": "python experiments/sinusoid_federated.py " + " ".join(sys.argv[1:]),
               "machine": machine(), "clients": args.clients, "runs": {}}
    rows = []
    for name, template in RUNS.items():
        overrides = (template + " " + COMMON).format(**fill)
        if name == "fedmeta-gradient":
            overrides = overrides.replace(f"eval-every={fill['eval_every']}", f"eval-every={max(1, args.grad_rounds // 10)}")
            overrides = overrides.replace(f"checkpoint-every={fill['eval_every']}",
                                          f"checkpoint-every={max(1, args.grad_rounds // 10)}")
        if args.only is None or name in args.only:
            summary["runs"][name] = {"command": summary["command"], "overrides": overrides,
                                     "wall_seconds": run(name, overrides, out, args.clients)}
        elif (out / "summary.json").exists():  # keep what the earlier command recorded for this run
            summary["runs"][name] = json.loads((out / "summary.json").read_text())["runs"][name]
        if not (out / "runs" / name / "model.pt").exists():
            print(f"({name}: no finished run in {out / 'runs'}; left out of the table)")
            continue
        rows += evaluate_run(name, load_meta_model(out / "runs" / name / "model.pt"), tune=name == "fedavg")
    curve = [r for name in RUNS if name != "fedavg" and (out / "runs" / name / "model.pt").exists()
             for r in checkpoint_curve(name, out / "runs" / name)]
    with (out / "checkpoints.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "round", "steps", "loss", "loss_ci95", "median", "diverged", "tasks"])
        w.writeheader()
        w.writerows(curve)
    central = REPO / "results" / "sinusoid_central" / "maml.pt"  # experiments/sinusoid_central.py
    if central.exists():
        rows += evaluate_run("central-maml", load_meta_model(central), tune=False)
    with (out / "eval.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "steps", "loss", "loss_ci95", "median", "diverged", "inner_lr",
                                          "tasks", "shots"])
        w.writeheader()
        w.writerows(rows)
    both = load_runs([out / "runs" / n for n in RUNS if (out / "runs" / n / "model.pt").exists()])
    both.rounds.to_csv(out / "rounds.csv", index=False)
    plot(both.rounds, out / "heldout_loss.png")
    ref = {r["steps"]: r["loss"] for r in rows if r["run"] == "central-maml"}
    lines = ["| run | MSE 1 step | MSE 5 steps | MSE 10 steps | median, 10 steps | tasks diverged (10 steps) "
             "| step size | vs central (mean, 10 steps) |", "|---|---|---|---|---|---|---|---|"]
    for name in [*RUNS, "central-maml"]:
        got = {r["steps"]: r for r in rows if r["run"] == name}
        if not got:
            continue
        rel = f"{got[10]['loss'] / ref[10] - 1:+.1%}" if ref else ""
        lines.append(f"| {name} | " + " | ".join(f"{got[k]['loss']:.3f} ± {got[k]['loss_ci95']:.3f}" for k in (1, 5, 10))
                     + f" | {got[10]['median']:.3f} | {got[10]['diverged']} / {got[10]['tasks']} | {got[10]['inner_lr']:g}"
                     + f" | {rel} |")
    lines += ["", "Mean (median) MSE after 10 steps on the same 600 tasks at every checkpoint (checkpoints.csv; "
              "a diverged task makes the mean nan or huge):", ""]
    for name in RUNS:
        pts = [r for r in curve if r["run"] == name]
        if pts:
            lines.append(f"- {name}: " + ", ".join(f"round {r['round']}: {r['loss']:.3f} ({r['median']:.3f})"
                                                  + (f" [{r['diverged']} diverged]" if r["diverged"] else "")
                                                  for r in pts))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    summary["eval"] = rows
    write_json(out / "summary.json", summary)
    print("\n".join(lines))


FINETUNE_LR = (0.001, 0.003, 0.01, 0.03)  # step sizes tried for fine-tuning the FedAvg regressor


def evaluate_run(name: str, model, tune: bool) -> list[dict]:
    """The protocol on 600 fresh tasks of the whole family (5-shot, 100 query points, 1/5/10 steps).
    MAML models adapt with their own inner rate (part of what was meta-learned); the FedAvg regressor is
    fine-tuned with the rate from FINETUNE_LR that is best after 10 steps on 200 separate validation tasks."""
    cfg, source = model.config, partition.full_source(Config())
    if tune:
        def val(lr: float) -> float:
            r = evaluate_protocol(cfg.replace(inner_lr=lr), model.params, source, tasks=200, shots=5,
                                  query_shots=100, steps=(10,), seed=cfg.seed + 3)[0]
            return r["loss"] if math.isfinite(r["loss"]) else math.inf
        cfg = cfg.replace(inner_lr=min(FINETUNE_LR, key=val))
    rows = evaluate_protocol(cfg, model.params, source, tasks=600, shots=5, query_shots=100, steps=(0, 1, 5, 10),
                             seed=cfg.seed + 2)
    return [{"run": name, **r, "inner_lr": cfg.inner_lr} for r in rows]


def checkpoint_curve(name: str, run_dir: Path) -> list[dict]:
    """The protocol (10 steps) on every checkpoint of a run: how the mean, the median and the number of
    diverged tasks evolve (the mean of a late MAML model can hinge on one task whose adaptation blows up)."""
    cfg, source, rows = load_meta_model(run_dir / "model.pt").config, partition.full_source(Config()), []
    for path in sorted((run_dir / "checkpoints").glob("round-*.pt")):
        ckpt = load_checkpoint(path)
        r = evaluate_protocol(cfg, ckpt["params"], source, tasks=600, shots=5, query_shots=100, steps=(10,),
                              seed=cfg.seed + 2)[0]
        rows.append({"run": name, "round": ckpt["round"], **{k: r[k] for k in ("steps", "loss", "loss_ci95",
                                                                                  "median", "diverged", "tasks")}})
    return rows


def plot(rounds, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, g in rounds.dropna(subset=["eval_loss_post"]).groupby("run", observed=True):
        ax.plot(g["round"], g["eval_loss_post"], marker="o", label=f"{name} (after 10 steps)")
        ax.plot(g["round"], g["eval_loss_pre"], ls="--", alpha=0.6, label=f"{name} (before)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out clients' query MSE")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
