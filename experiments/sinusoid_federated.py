"""Federated MAML on sinusoid with non-IID clients (amplitude slices; 2 held out) against central MAML
(experiments/sinusoid_central.py) under the same evaluation protocol: 600 fresh tasks of the full family,
K = 5, MSE after 1/5/10 steps. Three federations, each a real Flower simulation started with `fedmeta run`:

- fedmeta-average:  MAML, every client meta-trains locally, meta-models averaged (FedMeta);
- fedmeta-gradient: MAML, distributed meta-gradients averaged, server Adam (distributed MAML);
- fedavg:           a plain regressor trained jointly (no meta-learning), FedAvg, then fine-tuned.

    python experiments/sinusoid_federated.py            # full (tens of minutes on 2 cores)
    python experiments/sinusoid_federated.py --quick    # smoke run: 2 rounds, 2 training clients
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from fedmeta import partition
from fedmeta.config import Config
from fedmeta.lab import federation, tables
from fedmeta.lab.args import REPO, Args, arg, command, parse
from fedmeta.lab.protocol import SEED_OFFSETS, evaluate_protocol, tune_inner_lr
from fedmeta.results import load_checkpoint, load_meta_model, load_runs

RUNS = ("fedmeta-average", "fedmeta-gradient", "fedavg")
FINETUNE_LR = (0.001, 0.003, 0.01, 0.03)  # step sizes tried for fine-tuning the FedAvg regressor
CENTRAL = REPO / "results" / "sinusoid_central" / "maml.pt"  # experiments/sinusoid_central.py
EVAL_COLUMNS = ["run", "steps", "loss", "loss_ci95", "median", "diverged", "inner_lr", "tasks", "shots"]
CURVE_COLUMNS = ["run", "round", "steps", "loss", "loss_ci95", "median", "diverged", "tasks"]


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "experiments/sinusoid_federated.py"
    NAME: ClassVar[str] = "sinusoid_federated"
    QUICK: ClassVar[dict] = {"clients": 4, "rounds": 2, "local": 5, "grad_rounds": 2, "compile": False}

    clients: int = arg(10, "simulated clients (the last 2 are held out: they evaluate, never train)")
    rounds: int = arg(100, "rounds of fedmeta-average and fedavg")
    local: int = arg(100, "local iterations per round (fedmeta-average, fedavg)")
    grad_rounds: int = arg(3000, "rounds of fedmeta-gradient (one averaged meta-gradient step each)")
    server_lr: float = arg(0.003, "server Adam step of fedmeta-gradient")
    compile: bool = arg(False, "torch.compile the clients' meta-gradients")
    only: tuple[str, ...] | None = arg(None, "run only these; the others' finished runs in --out are reused for "
                                             "the table", choices=RUNS)


def configs(args: Settings) -> dict[str, Config]:
    """Each federation's config: the app's defaults with these changes."""
    def common(rounds: int) -> dict:
        every = max(1, rounds // 10)
        return dict(num_rounds=rounds, eval_every=every, checkpoint_every=every, eval_tasks=100,
                    server_eval_tasks=0, compile=args.compile)

    return {"fedmeta-average": federation.app_config(algorithm="maml", fusion="average", local_iterations=args.local,
                                                     **common(args.rounds)),
            "fedmeta-gradient": federation.app_config(algorithm="maml", fusion="meta-gradient", local_iterations=1,
                                                      server_lr=args.server_lr, **common(args.grad_rounds)),
            "fedavg": federation.app_config(algorithm="pretrain", fusion="average", local_iterations=args.local,
                                            **common(args.rounds))}


def main(argv: list[str] | None = None) -> dict:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(1)
    out, runs = args.out_dir, args.out_dir / "runs"
    previous = tables.read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    summary = {"command": command(args), "machine": tables.machine(), "clients": args.clients, "runs": {}}
    rows, curve = [], []
    for name, cfg in configs(args).items():
        if args.only is None or name in args.only:
            fed = federation.run(cfg, name=name, results_dir=runs, num_supernodes=args.clients, replace=True)
            summary["runs"][name] = {"command": summary["command"], **fed.record()}
        elif name in previous.get("runs", {}):  # keep what the earlier command recorded for this run
            summary["runs"][name] = previous["runs"][name]
        if not (runs / name / "model.pt").exists():
            print(f"({name}: no finished run in {runs}; left out of the table)")
            continue
        rows += evaluate_run(name, load_meta_model(runs / name / "model.pt"), tune=name == "fedavg")
        if name != "fedavg":
            curve += checkpoint_curve(name, runs / name)
    tables.write_csv(out / "checkpoints.csv", curve, CURVE_COLUMNS)
    if CENTRAL.exists():
        rows += evaluate_run("central-maml", load_meta_model(CENTRAL), tune=False)
    tables.write_csv(out / "eval.csv", rows, EVAL_COLUMNS)
    both = load_runs([runs / n for n in RUNS if (runs / n / "model.pt").exists()])
    both.rounds.to_csv(out / "rounds.csv", index=False)
    plot(both.rounds, out / "heldout_loss.png")
    lines = table(rows, curve)
    tables.write_text(out / "table.md", lines)
    summary["eval"] = rows
    tables.write_json(out / "summary.json", summary)
    print("\n".join(lines))
    return summary


def evaluate_run(name: str, model, tune: bool) -> list[dict]:
    """The protocol on 600 fresh tasks of the whole family (5-shot, 100 query points, 1/5/10 steps).
    MAML models adapt with their own inner rate (part of what was meta-learned); the FedAvg regressor is
    fine-tuned with the rate from FINETUNE_LR that is best after 10 steps on 200 separate validation tasks."""
    cfg, source = model.config, partition.full_source(Config())
    if tune:
        best = tune_inner_lr(cfg, model.params, source, FINETUNE_LR, tasks=200, shots=5, query_shots=100, steps=10,
                             seed=cfg.seed + SEED_OFFSETS["tuning"])
        cfg = cfg.replace(inner_lr=best["inner_lr"])
    rows = evaluate_protocol(cfg, model.params, source, tasks=600, shots=5, query_shots=100, steps=(0, 1, 5, 10),
                             seed=cfg.seed + SEED_OFFSETS["test"])
    return [{"run": name, **r, "inner_lr": cfg.inner_lr} for r in rows]


def checkpoint_curve(name: str, run_dir: Path) -> list[dict]:
    """The protocol (10 steps) on every checkpoint of a run: how the mean, the median and the number of
    diverged tasks evolve (the mean of a late MAML model can hinge on one task whose adaptation blows up)."""
    cfg, source, rows = load_meta_model(run_dir / "model.pt").config, partition.full_source(Config()), []
    for path in sorted((run_dir / "checkpoints").glob("round-*.pt")):
        ckpt = load_checkpoint(path)
        r = evaluate_protocol(cfg, ckpt["params"], source, tasks=600, shots=5, query_shots=100, steps=(10,),
                              seed=cfg.seed + SEED_OFFSETS["test"])[0]
        rows.append({"run": name, "round": ckpt["round"], **r})
    return rows


def table(rows: list[dict], curve: list[dict]) -> list[str]:
    ref = {r["steps"]: r["loss"] for r in rows if r["run"] == "central-maml"}
    body = []
    for name in [*RUNS, "central-maml"]:
        got = {r["steps"]: r for r in rows if r["run"] == name}
        if got:
            body.append([name, *(f"{got[k]['loss']:.3f} ± {got[k]['loss_ci95']:.3f}" for k in (1, 5, 10)),
                         f"{got[10]['median']:.3f}", f"{got[10]['diverged']} / {got[10]['tasks']}",
                         f"{got[10]['inner_lr']:g}", f"{got[10]['loss'] / ref[10] - 1:+.1%}" if ref else ""])
    lines = tables.markdown_table(["run", "MSE 1 step", "MSE 5 steps", "MSE 10 steps", "median, 10 steps",
                                   "tasks diverged (10 steps)", "step size", "vs central (mean, 10 steps)"], body)
    lines += ["", "Mean (median) MSE after 10 steps on the same 600 tasks at every checkpoint (checkpoints.csv; "
              "a diverged task makes the mean nan or huge):", ""]
    for name in RUNS:
        pts = [r for r in curve if r["run"] == name]
        if pts:
            lines.append(f"- {name}: " + ", ".join(f"round {r['round']}: {r['loss']:.3f} ({r['median']:.3f})"
                                                  + (f" [{r['diverged']} diverged]" if r["diverged"] else "")
                                                  for r in pts))
    return lines


def plot(rounds, path: Path) -> None:
    lines = []
    for name, g in rounds.dropna(subset=["eval_loss_post"]).groupby("run", observed=True):
        lines.append(tables.Line(f"{name} (after 10 steps)", g["round"], g["eval_loss_post"], marker="o"))
        lines.append(tables.Line(f"{name} (before)", g["round"], g["eval_loss_pre"], style="--"))
    tables.plot(path, lines, xlabel="round", ylabel="held-out clients' query MSE", xscale="log", yscale="log",
                legend_size=7)


if __name__ == "__main__":
    main()
