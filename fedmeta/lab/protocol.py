"""The evaluation protocol shared by the central and federated experiments, and fine-tuning-rate tuning.

A meta-model is scored by adapting it to fresh tasks: k steps of its inner rule on each task's K-shot support
set, then the query loss (and accuracy) after 0..k steps, reported as mean +- 95 % interval, median and the
number of diverged tasks (MAML, Finn et al. 2017, §5.1: 600 tasks, 5 shots, 1/5/10 steps).

Which tasks: the protocol's tasks come from the named stream "protocol-tasks" of a seed; experiments keep
their validation, test and tuning sets disjoint by drawing them with the run seed plus `SEED_OFFSETS`, so
that every script scores a model on the very same 600 test tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedmeta import algorithms, seeding
from fedmeta.algorithms import Evaluation
from fedmeta.config import Config
from fedmeta.optim import Params
from fedmeta.tasks import Episode, TaskSource

# run seed + offset -> the seed of a disjoint task set (the offsets the committed results were drawn with)
SEED_OFFSETS = {"validation": 1, "test": 2, "tuning": 3}
DIVERGED = 100.0  # a task whose query loss after adaptation is above this (or not finite) diverged


def rows(ev: Evaluation, steps: Sequence[int]) -> list[dict]:
    """Per number of steps: {steps, loss, loss_ci95, median, diverged, tasks[, accuracy, accuracy_ci95]}.

    `diverged` counts tasks whose query loss is non-finite or above DIVERGED (adaptation blew up); they stay
    in the mean, which is then not finite or huge, and the median says what the other tasks reach (a NaN
    counts as the worst value)."""
    out = []
    for k in steps:
        per_task = ev.loss[k]  # (tasks,)
        loss, half = ev.interval(k)
        row = {"steps": k, "loss": loss, "loss_ci95": half,
               "median": float(per_task.nan_to_num(nan=math.inf).median()),
               "diverged": int((~torch.isfinite(per_task) | (per_task > DIVERGED)).sum()),
               "tasks": int(per_task.numel())}
        if ev.accuracy is not None:
            acc, acc_half = ev.interval(k, "accuracy")
            row.update(accuracy=acc, accuracy_ci95=acc_half)
        out.append(row)
    return out


def evaluate(algo: algorithms.Algorithm, params: Params, episode: Episode, steps: int, *,
             generator: torch.Generator | None = None, device: torch.device | str = "cpu",
             chunk: int = 100) -> Evaluation:
    """`algorithms.evaluate` with the parameters and the episode moved to `device`; the result on the CPU."""
    params = {k: v.to(device) for k, v in params.items()}
    ev = algorithms.evaluate(algo, params, episode.to(device), steps, generator, chunk=chunk)
    return Evaluation(ev.loss.cpu(), None if ev.accuracy is None else ev.accuracy.cpu())


def evaluate_protocol(cfg: Config, params: Params, source: TaskSource, *, tasks: int, shots: int,
                      query_shots: int, steps: Sequence[int], seed: int, chunk: int = 100,
                      device: torch.device | str = "cpu") -> list[dict]:
    """Adapt `params` (meta-parameters of cfg.algorithm) to `tasks` fresh tasks of `source` drawn from the
    "protocol-tasks" stream of `seed`, `shots` support and `query_shots` query examples each; `rows` for
    each number of steps, with `shots` added."""
    algo = algorithms.build(cfg)
    episode = source.sample(tasks, shots, query_shots, seeding.generator(seed, "protocol-tasks"))
    ev = evaluate(algo, params, episode, max(steps), generator=seeding.generator(seed, "protocol-adaptation"),
                  device=device, chunk=chunk)
    return [{**r, "shots": shots} for r in rows(ev, steps)]


# --- fine-tuning a non-meta-learned model (the FedAvg baselines) ---------------------------------------------
def tune_inner_lr(cfg: Config, params: Params, source: TaskSource, lrs: Sequence[float], *, tasks: int,
                  shots: int, query_shots: int, steps: int, seed: int) -> dict:
    """The step size of `lrs` whose mean query loss after `steps` steps is lowest on `tasks` validation tasks
    (the protocol with `seed`); a rate whose mean is not finite never wins. {"inner_lr", "grid"}."""
    def score(lr: float) -> float:
        r = evaluate_protocol(cfg.replace(inner_lr=lr), params, source, tasks=tasks, shots=shots,
                              query_shots=query_shots, steps=(steps,), seed=seed)[0]
        return r["loss"] if math.isfinite(r["loss"]) else math.inf

    grid = {lr: score(lr) for lr in lrs}
    return {"inner_lr": min(grid, key=grid.get), "grid": grid}


def tune_finetuning(cfg: Config, params: Params, episode: Episode, lrs: Sequence[float],
                    steps: Sequence[int]) -> dict:
    """The (step size, steps) of the grid with the best mean query accuracy on validation `episode`
    (classification). {"inner_lr", "steps", "val_accuracy", "grid"}; ties go to the earlier grid point."""
    scores = {}
    for lr in lrs:
        ev = algorithms.evaluate(algorithms.build(cfg.replace(inner_lr=lr)), params, episode, max(steps))
        for k in steps:
            scores[(lr, k)] = float(ev.accuracy[k].mean())
    (lr, k), best = max(scores.items(), key=lambda kv: kv[1])
    return {"inner_lr": lr, "steps": k, "val_accuracy": best,
            "grid": {f"lr={a} steps={b}": v for (a, b), v in scores.items()}}


__all__ = ["DIVERGED", "SEED_OFFSETS", "evaluate", "evaluate_protocol", "rows", "tune_finetuning", "tune_inner_lr"]
