"""Seconds per meta-iteration of distributed meta-training (`fedmeta.distributed`) with 1 and 2 processes,
side by side in one run, and the parallel efficiency.

Settings (MAML second order, one inner step, meta-batch 32):
- sinusoid: the 1-40-40-1 MLP, K = 10 support and 10 query points (Finn et al. 2017, §5.1);
- Omniglot 5-way 1-shot: conv4, alpha = 0.4, one support and one query image per class (§5.2).
CPU (the default where torch sees no GPU): every process one intra-op thread (threads = 1), gloo,
P in (1, 2). GPU (`--device cuda`, or `auto` where torch sees one): one rank per GPU, nccl, P in (1,
number of GPUs). Each (setting, round, P) is one `torchrun --standalone --nproc-per-node P -m
fedmeta.distributed` job of `--*-iterations` meta-iterations; rounds alternate P = 1 and P = 2 so that
both see the same background load. Seconds per iteration: the median over the iterations after the
first `--warmup` of every round, from the run's iterations.csv (rank 0's wall clock per iteration,
which includes waiting for the slowest rank); `reduce` is the part spent in all_reduce (waiting
included). Speed-up t_1 / t_P, parallel efficiency t_1 / (P t_P). `max_abs_diff` is the largest
difference of the final float32 meta-parameters from the P = 1 run's (summation order only).

    flock /tmp/fedmeta-heavy.lock python benchmarks/distributed_scaling.py      # ~3 min on 2 cores
    python benchmarks/distributed_scaling.py --quick                            # smoke run (~1 min)

Writes <out>/scaling.csv (one row per setting and P), runs.csv (one row per job), summary.json and
summary.md (default out: results/distributed_scaling/).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch

from fedmeta import load_meta_model
from fedmeta.lab import tables
from fedmeta.lab.args import REPO, Args, arg, command, parse, settings

SETTINGS = {
    "sinusoid": {"task": "sinusoid", "algorithm": "maml", "meta-batch-size": 32, "shots": 10, "query-shots": 10,
                 "inner-steps": 1, "inner-lr": 0.01},
    "omniglot-5way-1shot": {"task": "omniglot", "algorithm": "maml", "meta-batch-size": 32, "ways": 5, "shots": 1,
                            "query-shots": 1, "inner-steps": 1, "inner-lr": 0.4},
}

DIFFERENCE_NOTE = (
    "Max. abs. difference: of the final float32 meta-parameters from the P = 1 job's; only the order of floating-point "
    "sums differs (tests/test_distributed.py: equal to 1e-6 in float64). Adam moves a coordinate whose gradient is ~0 "
    "by about lr g / eps, so summation noise grows most there (e.g. a convolution's bias before batch norm, which does "
    "not change the network's output).")


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "benchmarks/distributed_scaling.py"
    NAME: ClassVar[str] = "distributed_scaling"
    QUICK: ClassVar[dict] = {"sinusoid_iterations": 40, "omniglot_iterations": 6, "rounds": 1, "warmup": 2}

    sinusoid_iterations: int = arg(400, "meta-iterations of each sinusoid job")
    omniglot_iterations: int = arg(40, "meta-iterations of each Omniglot job")
    rounds: int = arg(2, "jobs per setting and number of processes (alternating P)")
    warmup: int = arg(5, "first meta-iterations of each job left out of the timing")
    device: str = arg("auto", "cpu: 1 thread per process; cuda: one rank per GPU; auto: cuda if torch sees one",
                      choices=("auto", "cpu", "cuda"))
    data_dir: str = arg(str(REPO.parent / "shared" / "data" / "omniglot"), "the Omniglot data")
    seed: int = arg(0, "run seed (tasks and initialisation)")


def job(name: str, ranks: int, iterations: int, device: str, args: Settings, out: Path) -> dict:
    """One torchrun job; its per-iteration table and final meta-parameters."""
    overrides = {**SETTINGS[name], "threads": 1, "device": device, "seed": args.seed,
                 **({"data-dir": args.data_dir} if name.startswith("omniglot") else {})}
    run_config = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "fedmeta.distributed", "-c", run_config, "--iterations", str(iterations), "--checkpoint-every", "0",
           "--log-every", "0", "--out", str(out)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=1800, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{name} with {ranks} processes failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    table = pd.read_csv(out / "iterations.csv")
    return {"table": table, "wall": wall, "params": load_meta_model(out / "model.pt").params, "command": cmd}


def main(argv: list[str] | None = None) -> None:
    args = parse(Settings, argv, description=__doc__.split("\n\n")[0])
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    counts = (1, 2) if device == "cpu" else tuple(sorted({1, gpus}))
    iterations = {"sinusoid": args.sinusoid_iterations, "omniglot-5way-1shot": args.omniglot_iterations}
    machine_start = tables.machine()
    runs, per_iteration = [], {}
    with tempfile.TemporaryDirectory(prefix="fedmeta-scaling-") as tmp:
        for name in SETTINGS:
            for r in range(args.rounds):
                for ranks in counts if r % 2 == 0 else counts[::-1]:
                    res = job(name, ranks, iterations[name], device, args, Path(tmp) / f"{name}-p{ranks}-r{r}")
                    timed = res["table"][res["table"]["iteration"] > args.warmup]
                    per_iteration.setdefault((name, ranks), []).append(timed)
                    runs.append({"setting": name, "processes": ranks, "round": r, "iterations": iterations[name],
                                 "seconds_per_iteration": float(timed["seconds"].median()),
                                 "reduce_seconds": float(timed["reduce_seconds"].median()),
                                 "job_wall_seconds": res["wall"], "final_loss": float(res["table"]["loss"].iloc[-1]),
                                 "params": res["params"]})
                    print({k: round(v, 5) if isinstance(v, float) else v for k, v in runs[-1].items()
                           if k != "params"}, flush=True)
    rows = summarise(runs, per_iteration, counts)
    out = args.out_dir
    tables.write_csv(out / "scaling.csv", rows)
    tables.write_csv(out / "runs.csv", [{k: v for k, v in r.items() if k != "params"} for r in runs])
    note = gpu_note(device, gpus)
    summary = {"command": command(args), "settings": settings(args), "device": device, "processes": list(counts),
               "configs": SETTINGS, "gpu": note, "machine_start": machine_start, "machine_end": tables.machine(),
               "results": rows}
    tables.write_json(out / "summary.json", summary)
    tables.write_text(out / "summary.md", markdown(summary))
    print("\n".join(markdown(summary).splitlines()[2:]))


def summarise(runs: list[dict], per_iteration: dict, counts: tuple[int, ...]) -> list[dict]:
    """One row per (setting, P): medians over every timed iteration of its jobs, speed-up and efficiency."""
    rows = []
    for name in SETTINGS:
        base = None
        ref = next(r["params"] for r in runs if r["setting"] == name and r["processes"] == 1)
        for ranks in counts:
            timed = pd.concat(per_iteration[(name, ranks)])
            t = float(timed["seconds"].median())
            base = t if ranks == 1 else base
            params = [r["params"] for r in runs if r["setting"] == name and r["processes"] == ranks]
            diff, key = max((float((p[k].double() - ref[k].double()).abs().max()), k) for p in params for k in p)
            rows.append({"setting": name, "processes": ranks, "seconds_per_iteration": t,
                         "p10": float(timed["seconds"].quantile(0.1)), "p90": float(timed["seconds"].quantile(0.9)),
                         "reduce_seconds": float(timed["reduce_seconds"].median()),
                         "speedup": base / t, "efficiency": base / (ranks * t),
                         "timed_iterations": len(timed), "max_abs_diff": diff, "max_abs_diff_at": key,
                         "job_wall_seconds": statistics.median(r["job_wall_seconds"] for r in runs
                                                               if r["setting"] == name and r["processes"] == ranks)})
    return rows


def gpu_note(device: str, gpus: int) -> str:
    if device == "cuda":
        return (f"{gpus} GPU(s), one rank per GPU (nccl)" + ("" if gpus > 1 else
                "; with one GPU only P = 1 runs: scaling needs two or more"))
    return ("no GPU: torch sees none here (no GPU machine was lent to this session); on a GPU machine the same "
            "script runs one rank per GPU (--device cuda)") if gpus == 0 else f"CPU run requested; {gpus} GPU(s) unused"


def markdown(summary: dict) -> str:
    m = summary["machine_start"]
    lines = ["# Distributed meta-training: seconds per meta-iteration", "",
             f"Device: {summary['device']} ({m['cpu']}, {m['cpus']} cores; 1 thread per process). GPU: {summary['gpu']}.",
             (f"Load average at start {m['load_average']}, at end {summary['machine_end']['load_average']} "
              "(other jobs on the machine slow both columns)."), ""]
    lines += tables.markdown_table(
        ["setting", "P", "s / iteration (median)", "p10-p90", "all_reduce (median)", "speed-up", "efficiency",
         "max. abs. difference from P = 1 (at)"],
        [[r["setting"], r["processes"], f"{r['seconds_per_iteration'] * 1e3:.2f} ms",
          f"{r['p10'] * 1e3:.2f}-{r['p90'] * 1e3:.2f} ms", f"{r['reduce_seconds'] * 1e3:.2f} ms", f"{r['speedup']:.2f}",
          f"{100 * r['efficiency']:.0f} %", f"{r['max_abs_diff']:.1e} ({r['max_abs_diff_at']})"]
         for r in summary["results"]],
        align="llrrrrrr")
    lines += ["", DIFFERENCE_NOTE, "", f"Command: `{summary['command']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
