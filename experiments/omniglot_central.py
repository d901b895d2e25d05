"""Central MAML on few-shot Omniglot, MAML (Finn, Abbeel & Levine 2017) §5.2, Table 1.

The paper's protocol (and its code, github.com/cbfinn/maml): conv4 (64 filters, stride-2 convs,
batch norm on the batch it sees), the MAML character split (1200 meta-train characters with their
90/180/270 degree rotations as extra classes, 423 meta-test characters), one support and one query
image per class in training (shots = query-shots = 1), Adam 1e-3, 60 000 meta-iterations.
- 5-way 1-shot: 1 inner step alpha = 0.4, meta-batch 32; paper 98.7 ± 0.4 % (first order 98.3 ± 0.5).
- 20-way 1-shot: 5 inner steps alpha = 0.1, meta-batch 16; paper 95.8 ± 0.3 % (first order 89.4 ± 0.5).
Evaluation: >= 600 fresh meta-test episodes (1 support and 1 query image per class), accuracy
after 0, 1, 3, 5 and 10 steps of the training step size with a 95 % interval (the paper's text
uses 3 steps for 5-way, its code reports up to 10); `--eval-steps` names the headline step.

During training a fixed set of `--val-tasks` meta-test episodes (a separate seeded stream, never
used for any choice: the reported model is the last iterate) gives the curve of meta-test
accuracy vs meta-iterations. `--budget-minutes` stops training when the wall clock (training plus
curve evaluations) passes the budget; the final evaluation follows. A budget run's iteration count
depends on the machine: rerun with `--iterations N --budget-minutes 0` for the same numbers.

    python experiments/omniglot_central.py --quick                                  # smoke run (seconds)
    python experiments/omniglot_central.py --threads 2 --budget-minutes 60          # 5-way, CPU budget
    python experiments/omniglot_central.py --algorithm fomaml --threads 2 --budget-minutes 15
    python experiments/omniglot_central.py --ways 20 --threads 2 --budget-minutes 20
    python experiments/omniglot_central.py --iterations 60000 --device cuda --compile   # the paper's run

Each invocation adds its run (tag `<algorithm>-<ways>way<shots>shot`) to results/omniglot_central/:
curve_<tag>.csv, eval_<tag>.csv, <tag>.pt (git-ignored), and rewrites summary.json (all runs),
summary.md and curves.png. The core ignores `cfg.device`; this script moves the meta-parameters
and every episode to `--device` itself (cuda untested here: the project's machines have no GPU).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedmeta import algorithms, seeding
from fedmeta.config import Config
from fedmeta.optim import Params
from fedmeta.results import save_meta_model, versions
from fedmeta.tasks import Episode, TaskSource
from fedmeta.tasks import omniglot

from protocol import machine, write_json

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "omniglot_central"
DATA = REPO.parent / "shared" / "data" / "omniglot"
# MAML Table 1, Omniglot 1-shot: mean and 95 % interval (percent)
PAPER = {("maml", 5): (98.7, 0.4), ("fomaml", 5): (98.3, 0.5), ("maml", 20): (95.8, 0.3), ("fomaml", 20): (89.4, 0.5)}
# the paper's settings per number of ways: (inner steps, inner lr, meta-batch, test steps)
PAPER_SETTINGS = {5: (1, 0.4, 32, 3), 20: (5, 0.1, 16, 5)}
REPORT_STEPS = (0, 1, 3, 5, 10)


# --- reusable pieces (also used by experiments/omniglot_federated.py) -----------------------------
def resolve_device(name: str) -> torch.device:
    """"cpu", "cuda" or "auto"; asking for cuda without one is an error, not a silent CPU run."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


def to_device(params: Params, device: torch.device) -> Params:
    return {k: v.to(device) for k, v in params.items()}


def accuracy_rows(ev: algorithms.Evaluation, steps: tuple[int, ...]) -> list[dict]:
    """Rows {steps, accuracy, accuracy_ci95, loss, loss_ci95, tasks} (accuracy in [0, 1])."""
    rows = []
    for k in steps:
        acc, acc_half = ev.interval(k, "accuracy")
        loss, half = ev.interval(k)
        rows.append({"steps": k, "accuracy": acc, "accuracy_ci95": acc_half, "loss": loss, "loss_ci95": half,
                     "tasks": int(ev.loss.shape[1])})
    return rows


def evaluate_episode(algo, params: Params, episode: Episode, steps: int, device: torch.device,
                     chunk: int = 100) -> algorithms.Evaluation:
    """`algorithms.evaluate` on `device` (episode moved there), results on the CPU."""
    ev = algorithms.evaluate(algo, params, episode.to(device), steps, chunk=chunk)
    return algorithms.Evaluation(ev.loss.cpu(), None if ev.accuracy is None else ev.accuracy.cpu())


def train_central(cfg: Config, source: TaskSource, *, iterations: int, budget_s: float, eval_every: int,
                  validate: Callable[[Params], dict], device: torch.device, log: bool = True,
                  ) -> tuple[Params, list[dict], dict]:
    """Central meta-training on `source` (meta-batches of cfg.meta_batch_size tasks from the "train"
    stream of cfg.seed) for `iterations` meta-iterations or until `budget_s` seconds (0: none) of
    wall clock have passed, whichever comes first; `validate(params)` every `eval_every` iterations
    (and at 0 and at the end) gives the curve. Returns (params, curve, timing)."""
    algo = algorithms.build(cfg)
    params = to_device(algo.init(seeding.generator(cfg.seed, "init")), device)
    g = seeding.generator(cfg.seed, "train")

    def sample(_: int) -> Episode:
        return source.sample(cfg.meta_batch_size, cfg.shots, cfg.query_shots, g).to(device)

    t_start = time.perf_counter()
    state, curve, losses, train_s, eval_s, done = None, [], [], 0.0, 0.0, 0

    def record() -> None:
        nonlocal eval_s
        t = time.perf_counter()
        row = {"iteration": done, "train_seconds": round(train_s, 2),
               "train_loss": sum(losses) / len(losses) if losses else math.nan, **validate(params)}
        eval_s += time.perf_counter() - t
        row["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        curve.append(row)
        losses.clear()
        if log:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    record()
    stopped_by = "iterations"
    while done < iterations:
        if budget_s and time.perf_counter() - t_start >= budget_s:
            stopped_by = "budget"
            break
        t = time.perf_counter()
        params, state, part = algo.train(params, state, sample, 1)
        train_s += time.perf_counter() - t
        losses += part
        done += 1
        if done % eval_every == 0 or done == iterations:
            record()
    if curve[-1]["iteration"] != done:
        record()
    timing = {"iterations": done, "stopped_by": stopped_by, "train_seconds": train_s, "curve_eval_seconds": eval_s,
              "wall_seconds": time.perf_counter() - t_start,
              "seconds_per_iteration": train_s / done if done else math.nan}
    return params, curve, timing


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


# --- the experiment --------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, output in /tmp unless --out")
    p.add_argument("--algorithm", default="maml", choices=("maml", "fomaml"))
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--query-shots", type=int, default=1)
    p.add_argument("--inner-steps", type=int, help="default: the paper's (5-way 1, 20-way 5)")
    p.add_argument("--inner-lr", type=float, help="default: the paper's (5-way 0.4, 20-way 0.1)")
    p.add_argument("--meta-batch", type=int, help="default: the paper's (5-way 32, 20-way 16)")
    p.add_argument("--eval-steps", type=int, help="headline test steps (default: 5-way 3, 20-way 5)")
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--iterations", type=int, default=60_000)
    p.add_argument("--budget-minutes", type=float, default=0.0, help="wall-clock cap on training (0: none)")
    p.add_argument("--eval-every", type=int, default=100, help="meta-iterations between curve points")
    p.add_argument("--val-tasks", type=int, default=200, help="fixed meta-test episodes of the curve")
    p.add_argument("--test-tasks", type=int, default=600, help="fresh meta-test episodes of the final evaluation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--compile", action="store_true", help="torch.compile the meta-gradient (cfg.compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    steps, lr, batch, test_steps = PAPER_SETTINGS.get(args.ways, (1, 0.4, 32, 3))
    args.inner_steps = steps if args.inner_steps is None else args.inner_steps
    args.inner_lr = lr if args.inner_lr is None else args.inner_lr
    args.meta_batch = batch if args.meta_batch is None else args.meta_batch
    args.eval_steps = test_steps if args.eval_steps is None else args.eval_steps
    if args.quick:
        args.iterations, args.meta_batch, args.eval_every = 4, 4, 2
        args.val_tasks, args.test_tasks, args.budget_minutes = 10, 20, 0.0
    if args.out is None:
        args.out = Path("/tmp/omniglot_central_quick") if args.quick else OUT
    return args


def config(args: argparse.Namespace, device: torch.device) -> Config:
    return Config(task="omniglot", algorithm=args.algorithm, ways=args.ways, shots=args.shots,
                  query_shots=args.query_shots, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                  meta_lr=args.meta_lr, meta_batch_size=args.meta_batch, eval_shots=args.shots,
                  eval_query_shots=args.query_shots, eval_steps=args.eval_steps, seed=args.seed,
                  threads=args.threads, compile=args.compile, device=device.type, data_dir=args.data_dir,
                  omniglot_split="character", omniglot_rotations=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    seeding.seed_everything(args.seed)
    device = resolve_device(args.device)
    cfg = config(args, device)
    tag = f"{cfg.algorithm}-{cfg.ways}way{cfg.shots}shot"
    t0, load_start = time.perf_counter(), os.getloadavg()
    train_src, test_src = omniglot.source(cfg, "train"), omniglot.source(cfg, "test")
    algo = algorithms.build(cfg)
    steps = tuple(sorted({*REPORT_STEPS, cfg.eval_steps}))
    # the curve's fixed episodes and the final test episodes: two separate seeded streams
    val = test_src.sample(args.val_tasks, cfg.shots, cfg.query_shots, seeding.generator(args.seed, "eval", 700))
    test = test_src.sample(args.test_tasks, cfg.shots, cfg.query_shots, seeding.generator(args.seed, "test", 700))

    def validate(params: Params) -> dict:
        ev = evaluate_episode(algo, params, val, cfg.eval_steps, device)
        acc, half = ev.interval(cfg.eval_steps, "accuracy")
        return {"val_accuracy_pre": ev.interval(0, "accuracy")[0], "val_accuracy": acc, "val_accuracy_ci95": half}

    params, curve, timing = train_central(cfg, train_src, iterations=args.iterations,
                                          budget_s=60 * args.budget_minutes, eval_every=args.eval_every,
                                          validate=validate, device=device)
    t = time.perf_counter()
    rows = accuracy_rows(evaluate_episode(algo, params, test, max(steps), device), steps)
    timing["test_eval_seconds"] = time.perf_counter() - t
    timing["total_seconds"] = time.perf_counter() - t0

    out = args.out
    write_csv(out / f"curve_{tag}.csv", curve)
    write_csv(out / f"eval_{tag}.csv", rows)
    save_meta_model(out / f"{tag}.pt", {k: v.cpu() for k, v in params.items()}, cfg, None)
    head = next(r for r in rows if r["steps"] == cfg.eval_steps)
    run = {
        "tag": tag, "command": "python experiments/omniglot_central.py " + " ".join(args.argv),
        "reproduce": reproduce(args.argv, timing["iterations"]),
        "seed": args.seed, "settings": {k: v for k, v in vars(args).items() if k not in ("argv",)},
        "config": cfg.to_mapping(), "timing": timing, "eval": rows,
        "headline": {"steps": cfg.eval_steps, "accuracy": head["accuracy"], "ci95": head["accuracy_ci95"],
                     "paper": PAPER.get((cfg.algorithm, cfg.ways))},
        "machine": machine(), "versions": versions(),
        "load_average": {"start": load_start, "end": os.getloadavg()},  # contention by other jobs shows here
    }
    summary = _merge(out / "summary.json", tag, run)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_md(summary))
    plot(out, summary)
    print(summary_md({"runs": {tag: run}}))
    return run


def reproduce(argv: list[str], iterations: int) -> str:
    """The command that repeats a run exactly: the budget replaced by its iteration count."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--budget-minutes" or a == "--iterations":
            skip = True
        elif not a.startswith(("--budget-minutes=", "--iterations=")):
            keep.append(a)
    if "--quick" not in keep:
        keep += ["--iterations", str(iterations)]
    return "python experiments/omniglot_central.py " + " ".join(keep)


def _merge(path: Path, tag: str, run: dict) -> dict:
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.setdefault("runs", {})[tag] = run
    summary["runs"] = dict(sorted(summary["runs"].items()))
    return summary


def summary_md(summary: dict) -> str:
    lines = ["# Central MAML on Omniglot (MAML character split, 1-shot)", "",
             "Accuracy on fresh meta-test episodes (1 support + 1 query image per class), mean ± 95 % CI, "
             "after k adaptation steps; the last iterate of training (no model selection).", "",
             "| run | iterations | stopped by | train time | threads | acc. after 1 step | headline (steps) | "
             "after 10 steps | paper |", "|---|---|---|---|---|---|---|---|---|"]
    for tag, run in summary["runs"].items():
        by = {r["steps"]: r for r in run["eval"]}
        fmt = lambda r: f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_ci95']:.1f}"  # noqa: E731
        h, paper = run["headline"], run["headline"]["paper"]
        t = run["timing"]
        lines.append(f"| {tag} | {t['iterations']} | {t['stopped_by']} | {t['train_seconds'] / 60:.1f} min "
                     f"({1000 * t['seconds_per_iteration']:.0f} ms/it) | {run['settings']['threads']} | "
                     f"{fmt(by[1]) if 1 in by else ''} | {fmt(by[h['steps']])} ({h['steps']}) | "
                     f"{fmt(by[10]) if 10 in by else ''} | {f'{paper[0]} ± {paper[1]}' if paper else ''} |")
    lines += ["", "Tasks per evaluation: " + ", ".join(f"{t}: {r['eval'][0]['tasks']}" for t, r in summary["runs"].items())
              + ". Commands:", ""]
    lines += [f"- {tag}: `{run['command']}` (same numbers: `{run['reproduce']}`)" for tag, run in summary["runs"].items()]
    return "\n".join(lines) + "\n"


def plot(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, run in summary["runs"].items():
        path = out / f"curve_{tag}.csv"
        if not path.exists():
            continue
        with path.open() as f:
            rows = list(csv.DictReader(f))
        it = [int(r["iteration"]) for r in rows]
        acc = [100 * float(r["val_accuracy"]) for r in rows]
        half = [100 * float(r["val_accuracy_ci95"]) for r in rows]
        line, = ax.plot(it, acc, marker=".", label=f"{tag} ({run['headline']['steps']} steps)")
        ax.fill_between(it, [a - h for a, h in zip(acc, half)], [a + h for a, h in zip(acc, half)],
                        color=line.get_color(), alpha=0.15)
        if run["headline"]["paper"]:
            ax.axhline(run["headline"]["paper"][0], color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="meta-iteration", ylabel="meta-test accuracy (%)", title="Omniglot 1-shot, central MAML "
           "(dotted: paper, 60k its)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
