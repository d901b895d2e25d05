"""The LSTM meta-optimizer trained federated: clients own different quadratic families (slices of the
scale s of W ~ N(0, s^2), s in [0.5, 2]; 2 held out), each trains the LSTM locally, the server averages the
LSTMs every round (a real Flower simulation via `fedmeta run`). The fused optimizer is evaluated on fresh
problems against Adam with its learning rate tuned on a separate validation set of the same family
(experiments/lstm_quadratic.py's protocol): on the whole family and on the families of the held-out clients.

The fused LSTM is the run's model.pt, committed: results/lstm_federated/runs/fed-lstm/model.pt
(`fedmeta.load_meta_model`; `.adapt(W, y, steps)` runs it on one problem).

    python experiments/lstm_federated.py            # full (~15 min on 2 cores)
    python experiments/lstm_federated.py --quick    # smoke run: 2 rounds, 2 training clients
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedmeta import algorithms, partition, seeding
from fedmeta.lab import federation, tables
from fedmeta.lab.args import Args, arg, command, parse
from fedmeta.lab.optimizers import baseline, evaluate_optimizer, lstm_rule, tuned_baselines

SCALE = (0.5, 2.0)


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "experiments/lstm_federated.py"
    NAME: ClassVar[str] = "lstm_federated"
    QUICK: ClassVar[dict] = {"clients": 4, "rounds": 2, "local": 2, "batch": 4, "problems": 50, "eval_tasks": 20,
                             "steps": 20}

    clients: int = arg(10, "simulated clients (the last 2 are held out: they evaluate, never train)")
    rounds: int = arg(20, "communication rounds")
    local: int = arg(25, "local training batches per round")
    batch: int = arg(32, "problems per training batch")
    problems: int = arg(1000, "validation and test problems per family")
    steps: int = arg(100, "optimizer steps at validation and test (and of the held-out clients' evaluation)")
    eval_tasks: int = arg(200, "problems per held-out client's evaluation in the federation")


def main(argv: list[str] | None = None) -> dict:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(1)
    out = args.out_dir
    every = max(1, args.rounds // 10)
    cfg = federation.app_config(task="quadratic", algorithm="lstm", fusion="average", quadratic_scale_min=SCALE[0],
                                quadratic_scale_max=SCALE[1], num_rounds=args.rounds, local_iterations=args.local,
                                meta_batch_size=args.batch, eval_steps=args.steps, eval_tasks=args.eval_tasks,
                                eval_every=every, checkpoint_every=every)
    fed = federation.run(cfg, name="fed-lstm", results_dir=out / "runs", num_supernodes=args.clients, replace=True)
    model = fed.model()
    algo = algorithms.build(model.config)
    # the whole family, and each held-out client's slice of it; family i draws repeat i of the LSTM streams
    families = {"all": partition.full_source(cfg)}
    for pid in range(args.clients):
        if partition.is_heldout(cfg, pid, args.clients):
            families[f"heldout-{pid}"] = partition.task_source(cfg, pid, args.clients)
    rows, body = [], []
    for i, (name, source) in enumerate(families.items()):
        def problems(stream: str, starts: str) -> tuple:
            episode = source.sample(args.problems, generator=seeding.generator(cfg.seed, stream, i))
            return episode, algo.start_params(model.params, args.problems, seeding.generator(cfg.seed, starts, i))

        val, val_start = problems("lstm-validation", "lstm-validation-starts")
        test, test_start = problems("lstm-test", "lstm-test-starts")
        adam = tuned_baselines(algo, val, val_start, args.steps, names=("adam",))["adam"]
        for opt_name, opt, lr in (("fed-lstm", lstm_rule(algo, model.params), None),
                                  ("adam", baseline("adam", adam["lr"]), adam["lr"])):
            losses = evaluate_optimizer(algo, opt, test, test_start, args.steps)  # (steps + 1, problems)
            mean, half = tables.interval(losses[-1])
            rows.append({"family": name, "scale": list(source.scale), "optimizer": opt_name, "lr": lr,
                         "final_loss": mean, "ci95": half, "curve": [float(v) for v in losses.double().mean(1)]})
            body.append([f"{name} {tuple(round(s, 3) for s in source.scale)}", opt_name,
                         "" if lr is None else f"{lr:.3g}", f"{mean:.4g} ± {half:.2g}"])
    fed.load().rounds.to_csv(out / "rounds.csv", index=False)
    summary = {"command": command(args), **fed.record(), "machine": tables.machine(), "rows": rows}
    tables.write_json(out / "summary.json", summary)
    lines = tables.markdown_table(["problems (scale of W)", "optimizer", "lr",
                                   f"final loss after {args.steps} steps (mean ± 95% CI)"], body)
    tables.write_text(out / "summary.md", lines)
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
