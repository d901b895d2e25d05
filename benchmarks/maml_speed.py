"""One second-order MAML meta-iteration on the sinusoid setting, side by side in one run.

Setting (Finn et al. 2017, §5.1): MLP 1-40-40-1 ReLU, 25 tasks, K = 10 support + 10 query shots,
inner lr 0.01, exact second order, 1 and 5 inner steps, one intra-op thread.

Paths, all computing the same meta-gradient of the mean query loss from the same inputs:
  loop             per-task Python loop: functional_call + torch.autograd.grad(create_graph=True)
  higher           the `higher` library (Grefenstette et al. 2019), per task (skipped if missing)
  fedmeta-eager    MAML(cfg).meta_gradient (selects the closed-form ReLU-MLP path, fedmeta/algorithms/fast.py)
  fedmeta-compile  the same with compile = true (torch.compile of the whole meta-gradient)
  generic-eager    the generic torch.func path (nested grad + vmap), grad_and_value(MAML.meta_loss)
  generic-compile  the same under torch.compile (fedmeta's compile options)
  fast-raw-compile-py   ablation: the closed-form function alone (no input/finiteness checks),
                        torch.compile with default options (Python wrapper around the kernels)
  fast-raw-compile-cpp  the same with fedmeta's options (cpp_wrapper: a C++ wrapper)
Every repetition runs every path once (in rotating order), so load from other processes hits all
paths alike; we report the median (and 10th/90th percentiles) after warm-up. Compilation starts
from an empty inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR) unless --warm-cache, so the
first-call column is an honest compile warm-up.

    flock /tmp/fedmeta-cpu.lock python benchmarks/maml_speed.py            # full run (~3-4 min)
    python benchmarks/maml_speed.py --steps 1 --reps 20 --out /tmp/x        # quick look
    python benchmarks/maml_speed.py --quick                                 # smoke run: eager paths only
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from references import higher_path, loop_path, quantile, time_paths
from torch.func import grad_and_value

from fedmeta import seeding
from fedmeta.algorithms import fast
from fedmeta.algorithms.base import COMPILE_OPTIONS
from fedmeta.algorithms.maml import MAML
from fedmeta.config import Config
from fedmeta.lab import tables
from fedmeta.lab.args import Args, arg, command, parse
from fedmeta.tasks.sinusoid import SinusoidTasks

TARGETS = {"loop": 25, "higher": 40}  # speed-ups the issue asks of fedmeta-compile


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "benchmarks/maml_speed.py"
    NAME: ClassVar[str] = "maml_speed"
    QUICK: ClassVar[dict] = {"steps": (1,), "reps": 3, "warmup": 1, "compiled": False}

    steps: tuple[int, ...] = arg((1, 5), "inner steps of each setting")
    reps: int = arg(100, "timed repetitions of every path")
    warmup: int = arg(5, "untimed calls of every path before timing")
    tasks: int = arg(25, "tasks per meta-batch")
    shots: int = arg(10, "support and query examples per task")
    threads: int = arg(1, "torch intra-op threads")
    seed: int = arg(0, "seed of the meta-parameters and the episode")
    compiled: bool = arg(True, "time the torch.compile'd paths (each compiles first: seconds to a minute)")
    generic_compile: bool = arg(True, "compile the generic path too (~30 s)")
    warm_cache: bool = arg(False, "reuse the inductor cache (first calls then do not show the compile warm-up)")


def fedmeta_path(cfg: Config):
    return MAML(cfg).meta_gradient  # compile or not per cfg; selects the fast path when it applies


def raw_path(fn, compile_options: dict | None):
    """A (meta_params, episode) -> (grads, loss tensor) function called bare, eager or compiled."""
    fn = fn if compile_options is None else torch.compile(fn, dynamic=False, options=compile_options)

    def run(meta_params, episode):
        grads, loss = fn(meta_params, episode)
        return grads, float(loss)

    return run



def bench(steps: int, args) -> list[dict]:
    cfg = Config(inner_steps=steps, meta_batch_size=args.tasks, shots=args.shots, query_shots=args.shots)
    algo = MAML(cfg)
    if not fast.applies(algo):
        raise SystemExit("the closed-form path does not apply to this setting; nothing to compare")
    meta_params = algo.init(seeding.generator(args.seed, "init"))
    episode = SinusoidTasks().sample(args.tasks, args.shots, args.shots, seeding.generator(args.seed, "train"))
    paths = {"loop": loop_path(algo, F.mse_loss)}
    try:
        paths["higher"] = higher_path(algo, F.mse_loss)
    except ImportError:
        print("NOTE: `higher` is not installed (pip install -e '.[bench]'); skipping the higher path")
    paths["fedmeta-eager"] = fedmeta_path(cfg)
    if args.compiled:
        paths["fedmeta-compile"] = fedmeta_path(cfg.replace(compile=True))
    generic = grad_and_value(algo.meta_loss)  # the generic torch.func path, bypassing the fast one
    paths["generic-eager"] = raw_path(generic, None)
    if args.compiled and args.generic_compile:
        paths["generic-compile"] = raw_path(generic, COMPILE_OPTIONS)
    if args.compiled:
        paths["fast-raw-compile-py"] = raw_path(MAML(cfg).meta_gradient_fn(), {})
        paths["fast-raw-compile-cpp"] = raw_path(MAML(cfg).meta_gradient_fn(), COMPILE_OPTIONS)

    first, results = {}, {}
    for name, run in paths.items():  # first call: compile warm-up for the compiled paths
        start = time.perf_counter()
        results[name] = run(meta_params, episode)
        first[name] = time.perf_counter() - start
        print(f"steps={steps} {name}: first call {first[name]:.2f} s", flush=True)
    ref_grads, ref_loss = results["loop"]
    times = time_paths(paths, meta_params, episode, args.reps, args.warmup)
    ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    rows = []
    for name in paths:
        grads, loss = results[name]
        rows.append({
            "inner_steps": steps, "path": name, "ms_median": ms[name],
            "ms_p10": 1e3 * quantile(times[name], 0.10), "ms_p90": 1e3 * quantile(times[name], 0.90),
            "speedup_vs_loop": ms["loop"] / ms[name],
            "speedup_vs_higher": ms["higher"] / ms[name] if "higher" in ms else float("nan"),
            "max_abs_diff_grad_vs_loop": max(float((grads[k] - ref_grads[k]).abs().max()) for k in ref_grads),
            "abs_diff_loss_vs_loop": abs(loss - ref_loss),
            "first_call_s": first[name], "reps": args.reps,
        })
    return rows



def write(rows: list[dict], info: dict, out: Path) -> None:
    tables.write_csv(out / "maml_speed.csv", rows)
    tables.write_json(out / "summary.json", {**info, "results": rows})
    lines = ["# Second-order MAML meta-iteration, sinusoid (1-40-40-1 MLP, 25 tasks, K=10+10, inner lr 0.01)", "",
             f"Command: `{info['command']}`  ",
             f"Machine: {info['cpu']}, {info['cpus']} cores, torch {info['torch']}, higher {info['higher']}, "
             f"{info['threads']} thread(s); load average at start {info['load_average'][0]:.2f}, "
             f"end {info['load_average_end'][0]:.2f}  ",
             f"Median of {rows[0]['reps']} interleaved repetitions after warm-up; diff = max |grad - loop grad|; "
             f"first call = compile warm-up for compiled paths (inductor cache {info['inductor_cache']}).", "",
             "| inner steps | path | ms/iter (median) | p10-p90 ms | x loop | x higher | max abs diff vs loop | first call s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['inner_steps']} | {r['path']} | {r['ms_median']:.3f} | {r['ms_p10']:.2f}-{r['ms_p90']:.2f} "
                     f"| {r['speedup_vs_loop']:.1f} | {r['speedup_vs_higher']:.1f} "
                     f"| {r['max_abs_diff_grad_vs_loop']:.1e} | {r['first_call_s']:.1f} |")
    lines += ["", f"Targets (issue): fedmeta >= {TARGETS['loop']}x the loop and >= {TARGETS['higher']}x higher, "
              "same numerics."]
    for r in rows:
        if r["path"] == "fedmeta-compile":
            met = {k: r[f"speedup_vs_{k}"] >= v for k, v in TARGETS.items()}
            lines.append(f"- {r['inner_steps']} inner step(s): {r['speedup_vs_loop']:.1f}x loop "
                         f"({'reached' if met['loop'] else 'MISSED'}), {r['speedup_vs_higher']:.1f}x higher "
                         f"({'reached' if met['higher'] else 'MISSED'}), max abs diff "
                         f"{r['max_abs_diff_grad_vs_loop']:.1e}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse(Settings, argv, __doc__.split("\n")[0])
    torch.set_num_threads(args.threads)
    info = {**tables.machine(("higher",)), "command": command(args)}
    cache = None if args.warm_cache else tempfile.mkdtemp(prefix="maml_speed_inductor_")
    if cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read by inductor at compile time
    info["inductor_cache"] = "warm (reused)" if args.warm_cache else "cold (fresh directory)"
    info["compile_options"] = COMPILE_OPTIONS
    try:
        rows = [row for steps in args.steps for row in bench(steps, args)]
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    info["load_average_end"] = list(os.getloadavg())
    write(rows, info, args.out_dir)
    print((args.out_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
