"""Simulation cost: seconds per round and framework overhead per client-round, fedmeta's app vs a
stock Flower app (FedAvg + a ClientApp that echoes its weights), side by side in one run, on the
same Simulation Engine (Ray backend) at 10 and 100 virtual clients.

Both apps do (almost) no learning, so the round time is framework cost: message passing, Ray
workers, (de)serialisation and, for fedmeta, config parsing, reply checks, fusion and the CSV rows.
fedmeta's clients do one meta-iteration on one task; the time they report for it is subtracted.

    python benchmarks/simulation_cost.py [--clients 10 100] [--rounds 10]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clients.client_app import app as fedmeta_client  # noqa: E402
from fedmeta import algorithms, seeding  # noqa: E402
from fedmeta.config import Config  # noqa: E402
from fedmeta.results import load_run  # noqa: E402
from strategies.server_app import server_app  # noqa: E402

BACKEND = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}

stock_client = ClientApp()


@stock_client.train()
def echo(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({"num-examples": 1, "train-loss": 0.0})
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)


def stock_server(params: dict, rounds: int, stamps: list[float]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        def stamp(server_round, arrays):
            stamps.append(time.perf_counter())
            return None

        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2).start(
            grid, ArrayRecord(params), num_rounds=rounds, evaluate_fn=stamp)

    return app


def per_round(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--poll-interval", type=float, default=Config().poll_interval,
                   help="fedmeta's reply poll (seconds; the run-config key poll-interval)")
    p.add_argument("--out", default=str(REPO / "results" / "simulation_cost"))
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.clients:
        cfg = Config(num_rounds=args.rounds, local_iterations=1, meta_batch_size=1, heldout_partitions=0,
                     eval_every=10**6, checkpoint_every=10**6, min_train_nodes=2,
                     poll_interval=args.poll_interval)
        params = algorithms.build(cfg).init(seeding.generator(0, "init"))
        # stock Flower: round 1 includes worker start-up, so it is reported apart
        stamps: list[float] = []
        t0 = time.perf_counter()
        run_simulation(stock_server(params, args.rounds, stamps), stock_client, n, backend_config=BACKEND)
        stock_total = time.perf_counter() - t0
        stock = per_round(stamps)
        # fedmeta (eval only after the last round, which is excluded from the steady-state rounds)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run_simulation(server_app(cfg.replace(results_dir=tmp, run_name="bench")), fedmeta_client, n,
                           backend_config=BACKEND)
            ours_total = time.perf_counter() - t0
            run = load_run(Path(tmp) / "bench")
        r, c = run.rounds, run.clients
        train = c[c["phase"] == "train"]
        steady = r[(r["round"] > 1) & (r["round"] < args.rounds)]
        compute = train[train["round"].isin(steady["round"])].groupby("round")["seconds"].sum()
        # 2 Ray workers run clients in parallel: client compute adds about compute / 2 to a round
        ours_round = statistics.median(steady["seconds"])
        ours_overhead = statistics.median((steady.set_index("round")["seconds"] - compute / 2) / n)
        stock_round = statistics.median(stock[1:])
        for impl, rnd, overhead, total in (("stock-flower-fedavg", stock_round, stock_round / n, stock_total),
                                           ("fedmeta", ours_round, ours_overhead, ours_total)):
            rows.append({"clients": n, "implementation": impl, "seconds_per_round": rnd,
                         "overhead_ms_per_client_round": 1000 * overhead, "total_seconds": total})
        rows[-1]["ratio_vs_stock"] = rows[-1]["overhead_ms_per_client_round"] / rows[-2]["overhead_ms_per_client_round"]
        print(rows[-2], rows[-1], flush=True)
    with (out / "simulation_cost.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["clients", "implementation", "seconds_per_round",
                                          "overhead_ms_per_client_round", "total_seconds", "ratio_vs_stock"])
        w.writeheader()
        w.writerows(rows)
    lines = ["| clients | implementation | s / round (median) | overhead ms / client-round | ratio vs stock |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['implementation']} | {r['seconds_per_round']:.3f} | "
              f"{r['overhead_ms_per_client_round']:.1f} | {r.get('ratio_vs_stock', 1.0):.2f} |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n\nCommand: `python benchmarks/simulation_cost.py "
                                    + " ".join(sys.argv[1:]) + "`\n")
    (out / "summary.json").write_text(json.dumps({"rows": rows, "rounds": args.rounds,
                                                  "torch": torch.__version__}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
