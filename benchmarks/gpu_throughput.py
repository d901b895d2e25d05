"""GPU throughput: client-rounds per second of fedmeta's app on the Simulation Engine for sinusoid and Omniglot at
10-100 virtual clients per GPU (device = "cuda", each client a fractional share of the GPU,
`client-resources-num-gpus` = 1 / concurrent clients), against the same runs on the CPU.

Every round trains all `clients` (fraction-train = 1) and evaluates the held-out ones; the rate is client-rounds
(trained + evaluated) over the median round after the first (round 1 pays worker start-up, CUDA contexts and the
data's first load). Ray runs `min(clients, CPU cores)` clients at once on the CPU (1 core each) and, on the GPU,
as many as `--max-concurrent` allows, each with 1 core and an equal share of the GPU. Without a GPU (torch sees
no CUDA) only the CPU runs are made, and the output says so in its first lines, `gpu` and `note`; the same
command measures both on a machine with one.

    python benchmarks/gpu_throughput.py [--tasks sinusoid omniglot] [--clients 10 25 50 100] [--rounds 4]
    python benchmarks/gpu_throughput.py --quick      # smoke run: 4 clients, 3 rounds, 1 local iteration
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from flwr.simulation import run_simulation
from simulation_cost import round_ends

from clients.client_app import app as fedmeta_client
from fedmeta.config import Config
from fedmeta.lab import tables
from fedmeta.lab.args import Args, arg, command, parse
from fedmeta.results import load_run
from strategies.server_app import server_app

COLUMNS = ["task", "device", "gpu", "clients", "concurrent", "num_gpus_per_client", "client_rounds_per_round",
           "first_round_s", "later_round_s", "client_rounds_per_s", "client_compute_s_per_round", "total_s"]
HELDOUT = 2


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "benchmarks/gpu_throughput.py"
    NAME: ClassVar[str] = "gpu_throughput"
    QUICK: ClassVar[dict] = {"clients": (4,), "rounds": 3, "local_iterations": 1, "meta_batch_size": 2}

    tasks: tuple[str, ...] = arg(("sinusoid", "omniglot"), "task families measured")
    clients: tuple[int, ...] = arg((10, 25, 50, 100), "virtual clients (num-supernodes) per GPU, one run each")
    rounds: int = arg(4, "rounds per run (round 1 is reported apart)")
    local_iterations: int = arg(5, "local meta-iterations per client and round")
    meta_batch_size: int = arg(8, "tasks per meta-iteration")
    max_concurrent: int = arg(16, "most clients Ray runs at once on the GPU (each holds a CUDA context: about "
                                  "0.5 GB of GPU memory and a process of host memory)")


def cuda_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


OMNIGLOT_MAX = 30 + HELDOUT  # non-iid Omniglot: one training partition per background alphabet at most; with
# partition = "iid" every partition would cache its own copy of the whole family (about 150 MB each, see
# results/simulation_cost/worker_memory.csv), more than a worker serving tens of partitions can hold


def config(task: str, n: int, rounds: int, args: Settings, device: str) -> Config:
    omniglot = task == "omniglot"  # 5-way 1-shot, 5 query images per class
    return Config(task=task, device=device, num_rounds=rounds, local_iterations=args.local_iterations,
                  meta_batch_size=args.meta_batch_size, heldout_partitions=HELDOUT, eval_tasks=5, eval_steps=1,
                  fraction_train=1.0, checkpoint_every=rounds, shots=1 if omniglot else 10,
                  query_shots=5 if omniglot else 10)


def one_run(cfg: Config, n: int, concurrent: int, gpu: str | None) -> dict:
    """One simulation; the end of every round stamped (its rows written)."""
    num_gpus = 1.0 / concurrent if cfg.device != "cpu" else 0.0
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": num_gpus},
               "init_args": {"num_cpus": concurrent, "num_gpus": 1 if gpu else 0}}
    with round_ends() as ends, tempfile.TemporaryDirectory() as tmp:
        launch = time.perf_counter()
        run_simulation(server_app(cfg.replace(results_dir=tmp, run_name="gpu")), fedmeta_client, n,
                       backend_config=backend)
        total = time.perf_counter() - launch
        run = load_run(Path(tmp) / "gpu")
    if run.status["status"] != "completed":
        raise RuntimeError(f"{cfg.task} on {cfg.device} with {n} clients: {run.status}")
    per_round = len(run.clients) // cfg.num_rounds
    later = statistics.median(b - a for a, b in itertools.pairwise(ends.times))
    compute = run.clients[run.clients["round"] > 1].groupby("round")["seconds"].sum().median()
    return {"task": cfg.task, "device": cfg.device, "gpu": gpu or "", "clients": n, "concurrent": concurrent,
            "num_gpus_per_client": num_gpus, "client_rounds_per_round": per_round, "first_round_s": ends.times[0] - launch,
            "later_round_s": later, "client_rounds_per_s": per_round / later, "client_compute_s_per_round": compute,
            "total_s": total}


def main(argv: list[str] | None = None) -> None:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(1)
    gpu, cores = cuda_name(), os.cpu_count() or 1
    note = (f"GPU present: {gpu}" if gpu else "NO GPU PRESENT (torch sees no CUDA device): only the CPU runs were "
            "made; run the same command on a machine with a GPU for the GPU rows")
    print(note, flush=True)
    rows, skipped = [], []
    for task in args.tasks:
        for n in args.clients:
            if task == "omniglot" and n > OMNIGLOT_MAX:
                skipped.append(f"omniglot at {n} clients: more than the {OMNIGLOT_MAX} non-iid partitions")
                continue
            runs = [("cpu", min(n, cores))] + ([("cuda", min(n, args.max_concurrent))] if gpu else [])
            for device, concurrent in runs:
                rows.append(one_run(config(task, n, args.rounds, args, device), n, concurrent,
                                    gpu if device == "cuda" else None))
                print(rows[-1], flush=True)
    out = args.out_dir
    tables.write_csv(out / "gpu_throughput.csv", rows, COLUMNS)
    lines = [note, "", *tables.markdown_table(
        ["task", "device", "clients", "at once", "GPU share", "first round (s)", "later round (s)",
         "client-rounds / s"],
        [[r["task"], r["device"], r["clients"], r["concurrent"], f"{r['num_gpus_per_client']:.3g}",
          f"{r['first_round_s']:.1f}", f"{r['later_round_s']:.2f}", f"{r['client_rounds_per_s']:.1f}"]
         for r in rows], align="lllrrrrr"), *(["", "Not run: " + "; ".join(skipped)] if skipped else []), "",
        f"Command: `{command(args)}`"]
    tables.write_text(out / "summary.md", lines)
    tables.write_json(out / "summary.json", {"command": command(args), "gpu": gpu, "note": note, "rows": rows,
                                             "not_run": skipped,
                                             "machine": tables.machine()})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
