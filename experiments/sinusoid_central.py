"""Central MAML on sinusoid regression, reproducing MAML (Finn et al. 2017) Table 2 / App. C.

Settings of the paper: K = 10 support points in training, one inner step, alpha = 0.01, Adam 1e-3,
meta-batch 25 tasks, 70 000 meta-iterations. Evaluation: 600 fresh tasks, K = 5 support points,
query loss (MSE on 100 points of the task) after 1, 5 and 10 steps of alpha = 0.01, with 95 %
intervals. Also the "pretrained" baseline of the paper (one regressor trained on all tasks, then
fine-tuned the same way).

    python experiments/sinusoid_central.py --iterations 70000 --compile   # the full run (results/sinusoid_central/)
    python experiments/sinusoid_central.py --quick                        # smoke run (seconds)

The trained meta-models are saved as `maml.pt` and `pretrain.pt`: `fedmeta.load_meta_model(path)` returns
the config, the parameters and the `nn.Module` with the learned initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedmeta import partition
from fedmeta.config import Config
from fedmeta.lab import central, tables
from fedmeta.lab.args import Args, arg, command, parse
from fedmeta.lab.protocol import SEED_OFFSETS, evaluate_protocol
from fedmeta.results import save_meta_model

PAPER = {"maml": {1: 0.67, 5: 0.38, 10: 0.35}}  # MAML paper, App. C, Table 2 (K = 5)
CURVE_COLUMNS = ["iteration", "train_loss", "val_loss_0", "val_loss_1", "val_loss_10"]
EVAL_COLUMNS = ["algorithm", "steps", "loss", "loss_ci95", "median", "diverged", "tasks", "shots", "paper"]


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "experiments/sinusoid_central.py"
    NAME: ClassVar[str] = "sinusoid_central"
    QUICK: ClassVar[dict] = {"iterations": 20, "log_every": 10}

    iterations: int = arg(70_000, "meta-iterations of each model (the paper: 70 000)")
    log_every: int = arg(2_000, "meta-iterations between validation points of the curve")
    seed: int = arg(0, "run seed (training, initialisation, the validation and test tasks)")
    compile: bool = arg(False, "torch.compile the meta-gradient")


def main(argv: list[str] | None = None) -> dict:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(1)
    out = args.out_dir
    base = Config(seed=args.seed, compile=args.compile, eval_shots=5, eval_query_shots=100)
    source = partition.full_source(base)
    summary = {"command": command(args), "machine": tables.machine()}
    rows = []
    for name in ("maml", "pretrain"):
        cfg = base.replace(algorithm=name)

        def val(params):  # a small fixed validation set, 0, 1 and 10 steps
            r = evaluate_protocol(cfg, params, source, tasks=100, shots=5, query_shots=100, steps=(0, 1, 10),
                                  seed=args.seed + SEED_OFFSETS["validation"])
            return {f"val_loss_{x['steps']}": x["loss"] for x in r}

        trained = central.train(cfg, source, iterations=args.iterations, eval_every=args.log_every, validate=val)
        final = evaluate_protocol(cfg, trained.params, source, tasks=600, shots=5, query_shots=100,
                                  steps=(0, 1, 5, 10), seed=args.seed + SEED_OFFSETS["test"])
        rows += [{"algorithm": name, **r, "paper": PAPER.get(name, {}).get(r["steps"])} for r in final]
        save_meta_model(out / f"{name}.pt", trained.params, cfg, None)
        tables.write_csv(out / f"curve_{name}.csv", trained.curve[1:], CURVE_COLUMNS)  # row 0: untrained
        seconds = trained.timing["train_seconds"]
        summary[name] = {"train_seconds": seconds, "ms_per_iteration": 1000 * seconds / args.iterations,
                         "iterations": args.iterations, "config": cfg.to_mapping()}
    tables.write_csv(out / "eval.csv", rows, EVAL_COLUMNS)
    summary["eval"] = rows
    tables.write_json(out / "summary.json", summary)
    lines = tables.markdown_table(
        ["algorithm", "steps", "MSE (600 tasks, K=5)", "95% CI", "paper"],
        [[r["algorithm"], r["steps"], f"{r['loss']:.3f}", f"± {r['loss_ci95']:.3f}",
          "" if r["paper"] is None else r["paper"]] for r in rows])
    tables.write_text(out / "table.md", lines)
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
