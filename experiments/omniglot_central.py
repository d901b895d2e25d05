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
depends on the machine: its summary records the command with `--iterations N` for the same numbers.

    python experiments/omniglot_central.py --quick                                  # smoke run (seconds)
    python experiments/omniglot_central.py --threads 2 --iterations 3000 --eval-every 500          # 5-way, shipped
    python experiments/omniglot_central.py --ways 20 --threads 2 --budget-minutes 10 --eval-every 200  # 20-way, shipped
    python experiments/omniglot_central.py --threads 2 --budget-minutes 60          # 5-way, a wall-clock budget
    python experiments/omniglot_central.py --algorithm fomaml --threads 2 --budget-minutes 15
    python experiments/omniglot_central.py --iterations 60000 --device cuda            # the paper's 5-way run
    python experiments/omniglot_central.py --ways 20 --iterations 60000 --device cuda  # the paper's 20-way run

Each invocation adds its run (tag `<algorithm>-<ways>way<shots>shot`) to results/omniglot_central/:
curve_<tag>.csv, eval_<tag>.csv, <tag>.pt (the final meta-model, `fedmeta.load_meta_model`; the 5- and
20-way MAML ones are committed), and rewrites summary.json (all runs), summary.md and curves.png.
Training and evaluation run on `--device` (meta-parameters and episodes).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from fedmeta import algorithms, seeding
from fedmeta.config import Config
from fedmeta.lab import central, protocol, tables
from fedmeta.lab.args import REPO, Args, arg, command, parse, settings
from fedmeta.results import save_meta_model, versions
from fedmeta.tasks import omniglot

DATA = REPO.parent / "shared" / "data" / "omniglot"
# MAML Table 1, Omniglot 1-shot: mean and 95 % interval (percent)
PAPER = {("maml", 5): (98.7, 0.4), ("fomaml", 5): (98.3, 0.5), ("maml", 20): (95.8, 0.3), ("fomaml", 20): (89.4, 0.5)}
# the paper's settings per number of ways: (inner steps, inner lr, meta-batch, test steps)
PAPER_SETTINGS = {5: (1, 0.4, 32, 3), 20: (5, 0.1, 16, 5)}
REPORT_STEPS = (0, 1, 3, 5, 10)
EVAL_COLUMNS = ["steps", "accuracy", "accuracy_ci95", "loss", "loss_ci95", "tasks"]


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "experiments/omniglot_central.py"
    NAME: ClassVar[str] = "omniglot_central"
    QUICK: ClassVar[dict] = {"iterations": 4, "meta_batch": 4, "eval_every": 2, "val_tasks": 10, "test_tasks": 20,
                             "budget_minutes": 0.0, "compile": False, "device": "auto"}

    algorithm: str = arg("maml", "meta-learning algorithm", choices=("maml", "fomaml"))
    ways: int = arg(5, "classes per episode")
    shots: int = arg(1, "support images per class")
    query_shots: int = arg(1, "query images per class")
    inner_steps: int | None = arg(None, "inner steps (default: the paper's, 5-way 1, 20-way 5)")
    inner_lr: float | None = arg(None, "inner step size (default: the paper's, 5-way 0.4, 20-way 0.1)")
    meta_batch: int | None = arg(None, "tasks per meta-iteration (default: the paper's, 5-way 32, 20-way 16)")
    eval_steps: int | None = arg(None, "headline test steps (default: 5-way 3, 20-way 5)")
    meta_lr: float = arg(1e-3, "Adam step on the meta-parameters")
    iterations: int = arg(60_000, "meta-iterations (at most, with --budget-minutes)")
    budget_minutes: float = arg(0.0, "wall-clock cap on training, curve included (0: none)")
    eval_every: int = arg(100, "meta-iterations between curve points")
    val_tasks: int = arg(200, "fixed meta-test episodes of the curve")
    test_tasks: int = arg(600, "fresh meta-test episodes of the final evaluation")
    threads: int = arg(1, "torch intra-op threads")
    device: str = arg("cpu", "where to train and evaluate", choices=("cpu", "cuda", "auto"))
    compile: bool = arg(False, "torch.compile the meta-gradient")
    seed: int = arg(0, "run seed (initialisation, meta-batches, episodes)")
    data_dir: Path = arg(DATA, "Omniglot arrays (fedmeta.tasks.omniglot_io)")


def config(args: Settings, device: torch.device) -> Config:
    steps, lr, batch, test_steps = PAPER_SETTINGS.get(args.ways, (1, 0.4, 32, 3))
    pick = lambda given, paper: paper if given is None else given  # noqa: E731
    return Config(task="omniglot", algorithm=args.algorithm, ways=args.ways, shots=args.shots,
                  query_shots=args.query_shots, inner_steps=pick(args.inner_steps, steps),
                  inner_lr=pick(args.inner_lr, lr), meta_lr=args.meta_lr,
                  meta_batch_size=pick(args.meta_batch, batch), eval_shots=args.shots,
                  eval_query_shots=args.query_shots, eval_steps=pick(args.eval_steps, test_steps), seed=args.seed,
                  threads=args.threads, compile=args.compile, device=device.type,
                  data_dir=str(Path(args.data_dir).resolve()), omniglot_split="character", omniglot_rotations=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(args.threads)
    seeding.seed_everything(args.seed)
    device = central.resolve_device(args.device)
    cfg = config(args, device)
    tag = f"{cfg.algorithm}-{cfg.ways}way{cfg.shots}shot"
    t0, load_start, info = time.perf_counter(), os.getloadavg(), tables.machine()
    train_src, test_src = omniglot.source(cfg, "train"), omniglot.source(cfg, "test")
    algo = algorithms.build(cfg)
    steps = tuple(sorted({*REPORT_STEPS, cfg.eval_steps}))
    # the curve's fixed episodes and the final test episodes: two separate seeded streams
    def episodes(tasks: int, stream: str):
        return test_src.sample(tasks, cfg.shots, cfg.query_shots, seeding.generator(args.seed, stream))

    val, test = episodes(args.val_tasks, "central-validation"), episodes(args.test_tasks, "central-test")

    def validate(params) -> dict:
        ev = protocol.evaluate(algo, params, val, cfg.eval_steps, device=device)
        acc, half = ev.interval(cfg.eval_steps, "accuracy")
        return {"val_accuracy_pre": ev.interval(0, "accuracy")[0], "val_accuracy": acc, "val_accuracy_ci95": half}

    trained = central.train(cfg, train_src, iterations=args.iterations, budget_s=60 * args.budget_minutes,
                            eval_every=args.eval_every, validate=validate, device=device)
    timing = dict(trained.timing)
    t = time.perf_counter()
    rows = protocol.rows(protocol.evaluate(algo, trained.params, test, max(steps), device=device), steps)
    timing["test_eval_seconds"] = time.perf_counter() - t
    timing["total_seconds"] = time.perf_counter() - t0

    out = args.out_dir
    tables.write_csv(out / f"curve_{tag}.csv", trained.curve)
    tables.write_csv(out / f"eval_{tag}.csv", rows, EVAL_COLUMNS)
    save_meta_model(out / f"{tag}.pt", trained.params, cfg, None)
    head = next(r for r in rows if r["steps"] == cfg.eval_steps)
    run = {
        "tag": tag, "command": command(args),
        "reproduce": command(args, iterations=timing["iterations"], budget_minutes=0.0),  # same numbers
        "seed": args.seed, "settings": settings(args), "config": cfg.to_mapping(), "timing": timing, "eval": rows,
        "headline": {"steps": cfg.eval_steps, "accuracy": head["accuracy"], "ci95": head["accuracy_ci95"],
                     "paper": PAPER.get((cfg.algorithm, cfg.ways))},
        "machine": info, "versions": versions(),
        "load_average": {"start": load_start, "end": os.getloadavg()},  # contention by other jobs shows here
    }
    summary = tables.read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    summary["runs"] = dict(sorted({**summary.get("runs", {}), tag: run}.items()))
    tables.write_json(out / "summary.json", summary)
    tables.write_text(out / "summary.md", summary_md(summary))
    plot(out, summary)
    print("\n".join(summary_md({"runs": {tag: run}})))
    return run


def summary_md(summary: dict) -> list[str]:
    def fmt(r: dict) -> str:
        return f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_ci95']:.1f}"

    body = []
    for tag, run in summary["runs"].items():
        by, h, t = {r["steps"]: r for r in run["eval"]}, run["headline"], run["timing"]
        paper = h["paper"]
        body.append([tag, t["iterations"], t["stopped_by"], f"{t['train_seconds'] / 60:.1f} min "
                     f"({1000 * t['seconds_per_iteration']:.0f} ms/it)", run["settings"]["threads"],
                     fmt(by[1]) if 1 in by else "", f"{fmt(by[h['steps']])} ({h['steps']})",
                     fmt(by[10]) if 10 in by else "", f"{paper[0]} ± {paper[1]}" if paper else ""])
    lines = ["# Central MAML on Omniglot (MAML character split, 1-shot)", "",
             "Accuracy on fresh meta-test episodes (1 support + 1 query image per class), mean ± 95 % CI, "
             "after k adaptation steps; the last iterate of training (no model selection).", ""]
    lines += tables.markdown_table(["run", "iterations", "stopped by", "train time", "threads", "acc. after 1 step",
                                    "headline (steps)", "after 10 steps", "paper"], body)
    lines += ["", "Tasks per evaluation: " + ", ".join(f"{t}: {r['eval'][0]['tasks']}" for t, r in
                                                      summary["runs"].items()) + ". Commands:", ""]
    lines += [f"- {tag}: `{run['command']}` (same numbers: `{run['reproduce']}`)"
              for tag, run in summary["runs"].items()]
    return lines


def plot(out: Path, summary: dict) -> None:
    lines = []
    for tag, run in summary["runs"].items():
        path = out / f"curve_{tag}.csv"
        if path.exists():
            rows = tables.read_csv(path)
            lines.append(tables.Line(f"{tag} ({run['headline']['steps']} steps)", [r["iteration"] for r in rows],
                                     [100 * r["val_accuracy"] for r in rows],
                                     [100 * r["val_accuracy_ci95"] for r in rows], marker=".",
                                     reference=run["headline"]["paper"][0] if run["headline"]["paper"] else None))
    tables.plot(out / "curves.png", lines, xlabel="meta-iteration", ylabel="meta-test accuracy (%)", grid=True,
                title="Omniglot 1-shot, central MAML (dotted: paper, 60k its)")


if __name__ == "__main__":
    main()
