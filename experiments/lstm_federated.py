"""The LSTM meta-optimizer trained federated: 10 clients own different quadratic families
(slices of the scale s of W ~ N(0, s^2), s in [0.5, 2]; 8 train, 2 held out), each trains the LSTM
locally, the server averages the LSTMs every round (a real Flower simulation via `fedmeta run`).
The fused optimizer is evaluated on fresh problems against Adam with its learning rate tuned on a
separate validation set of the same family (experiments/lstm_quadratic.py's protocol): on the
whole family and on the families of the two held-out clients.

    python experiments/lstm_federated.py            # full (~15 min on 2 cores)
    python experiments/lstm_federated.py --quick
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedmeta import algorithms, partition, seeding
from fedmeta.results import load_meta_model, load_run

from lstm_quadratic import evaluate_optimizer, interval, lstm_rule, tuned_baselines
from protocol import machine, write_json

REPO = Path(__file__).resolve().parents[1]
SCALE = (0.5, 2.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local", type=int, default=25)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--problems", type=int, default=1000)
    p.add_argument("--out", default=str(REPO / "results" / "lstm_federated"))
    args = p.parse_args()
    if args.quick:
        args.rounds, args.local, args.problems = 3, 3, 200
    torch.set_num_threads(1)
    out = Path(args.out)
    overrides = (f"task='quadratic' algorithm='lstm' fusion='average' quadratic-scale-min={SCALE[0]} "
                 f"quadratic-scale-max={SCALE[1]} num-rounds={args.rounds} local-iterations={args.local} "
                 f"meta-batch-size={args.batch} eval-steps=100 eval-tasks=200 eval-every={max(1, args.rounds // 10)} "
                 f"checkpoint-every={max(1, args.rounds // 10)}")
    cmd = [str(Path(sys.executable).parent / "fedmeta"), "run", "--app", str(REPO), "--name", "fed-lstm",
           "--results-dir", str(out / "runs"), "-c", overrides,
           "--federation-config", f"num-supernodes={args.clients} client-resources-num-cpus=1"]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    model = load_meta_model(out / "runs" / "fed-lstm" / "model.pt")
    cfg = model.config
    algo = algorithms.build(cfg)
    families = {"all": partition.full_source(cfg)}
    for pid in range(args.clients):
        if partition.is_heldout(cfg, pid, args.clients):
            families[f"heldout-{pid}"] = partition.task_source(cfg, pid, args.clients)
    rows, lines = [], ["| problems (scale of W) | optimizer | lr | final loss after 100 steps (mean ± 95% CI) |",
                       "|---|---|---|---|"]
    for i, (name, source) in enumerate(families.items()):
        val = source.sample(args.problems, generator=seeding.generator(cfg.seed, "eval", 900 + i))
        test = source.sample(args.problems, generator=seeding.generator(cfg.seed, "test", 900 + i))
        val_start = algo.start_params(model.params, args.problems, seeding.generator(cfg.seed, "eval", 950 + i))
        test_start = algo.start_params(model.params, args.problems, seeding.generator(cfg.seed, "test", 950 + i))
        adam = tuned_baselines(algo, val, val_start, 100, names=("adam",))["adam"]
        from lstm_quadratic import baseline

        for opt_name, opt, lr in (("fed-lstm", lstm_rule(algo, model.params), None),
                                  ("adam", baseline("adam", adam["lr"]), adam["lr"])):
            losses = evaluate_optimizer(algo, opt, test, test_start, 100)
            mean, half = interval(losses[-1])
            rows.append({"family": name, "scale": list(source.scale), "optimizer": opt_name, "lr": lr,
                         "final_loss": mean, "ci95": half, "curve": [float(v) for v in losses.double().mean(1)]})
            lines.append(f"| {name} {tuple(round(s, 3) for s in source.scale)} | {opt_name} | "
                         f"{'' if lr is None else f'{lr:.3g}'} | {mean:.4g} ± {half:.2g} |")
    run = load_run(out / "runs" / "fed-lstm")
    run.rounds.to_csv(out / "rounds.csv", index=False)
    write_json(out / "summary.json", {"command": "python experiments/lstm_federated.py " + " ".join(sys.argv[1:]),
                                      "overrides": overrides, "wall_seconds": wall, "machine": machine(), "rows": rows})
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
