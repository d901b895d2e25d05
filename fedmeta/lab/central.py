"""Central meta-training: one learner, the whole task family (or one client's share), no federation.

Every central experiment (sinusoid, Omniglot, the "alone" clients of the federated Omniglot comparison)
trains through `train`: meta-batches of cfg.meta_batch_size tasks from the "train" stream of cfg.seed,
Adam on the meta-parameters (`Algorithm.train`), for a number of meta-iterations or until a wall-clock
budget is spent, with a validation curve every `eval_every` iterations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedmeta import algorithms, seeding
from fedmeta.config import Config
from fedmeta.optim import Params
from fedmeta.tasks import Episode, TaskSource


def resolve_device(name: str) -> torch.device:
    """"cpu", "cuda" or "auto" (cuda when torch sees one); asking for cuda without one is an error, not a
    silent CPU run."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


@dataclass(frozen=True)
class Trained:
    """What `train` returns: the meta-parameters (on the CPU), the validation curve and the timing."""

    params: Params
    curve: list[dict]  # {iteration, train_seconds, train_loss, **validate(params), wall_seconds}
    timing: dict  # iterations, stopped_by, train_seconds, curve_eval_seconds, wall_seconds, seconds_per_iteration


def train(cfg: Config, source: TaskSource, *, iterations: int, eval_every: int,
          validate: Callable[[Params], dict] | None = None, budget_s: float = 0.0,
          device: torch.device | str = "cpu", log: bool = True) -> Trained:
    """Meta-train cfg.algorithm from its seeded initialisation on `source` for `iterations` meta-iterations,
    or until `budget_s` seconds of wall clock (training plus curve evaluations; 0: no budget) have passed,
    whichever comes first.

    The curve has a row at iteration 0, every `eval_every` iterations and at the end: the mean training
    loss since the previous row and `validate(params)` (params on `device`). Meta-batches are drawn on the
    CPU from one generator (the same tasks whatever the device, the budget or eval_every) and moved to
    `device`."""
    device = torch.device(device)
    algo = algorithms.build(cfg)
    params = {k: v.to(device) for k, v in algo.init(seeding.generator(cfg.seed, "init")).items()}
    g = seeding.generator(cfg.seed, "train")

    def sample(_: int) -> Episode:
        return source.sample(cfg.meta_batch_size, cfg.shots, cfg.query_shots, g).to(device)

    t_start = time.perf_counter()
    state, curve, losses, train_s, eval_s, done = None, [], [], 0.0, 0.0, 0

    def record() -> None:
        nonlocal eval_s
        t = time.perf_counter()
        row = {"iteration": done, "train_seconds": round(train_s, 2),
               "train_loss": sum(losses) / len(losses) if losses else math.nan,
               **(validate(params) if validate else {})}
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
        # without a budget, run to the next curve point in one call (less overhead per iteration)
        n = 1 if budget_s else min(eval_every - done % eval_every, iterations - done)
        t = time.perf_counter()
        params, state, part = algo.train(params, state, sample, n)
        train_s += time.perf_counter() - t
        losses += part
        done += n
        if done % eval_every == 0 or done == iterations:
            record()
    if curve[-1]["iteration"] != done:
        record()
    timing = {"iterations": done, "stopped_by": stopped_by, "train_seconds": train_s, "curve_eval_seconds": eval_s,
              "wall_seconds": time.perf_counter() - t_start,
              "seconds_per_iteration": train_s / done if done else math.nan}
    return Trained({k: v.cpu() for k, v in params.items()}, curve, timing)
