"""The evaluation protocol shared by the central and federated experiments: adapt a meta-model to
fresh tasks with k steps on a K-shot support set and report the query loss (and accuracy) after
given numbers of steps, with 95 % intervals over tasks."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch

from fedmeta import algorithms, seeding
from fedmeta.config import Config
from fedmeta.optim import Params
from fedmeta.tasks import TaskSource


def evaluate_protocol(cfg: Config, params: Params, source: TaskSource, *, tasks: int, shots: int,
                      query_shots: int, steps: tuple[int, ...], seed: int, chunk: int = 100) -> list[dict]:
    """Rows {steps, loss, loss_ci95, median, diverged, accuracy, accuracy_ci95, tasks} for each number of
    steps. `diverged`: tasks whose query loss is non-finite or above 100 (adaptation blew up); they stay
    in the mean, which is then not finite or huge, and the median says what the other tasks reach."""
    algo = algorithms.build(cfg)
    episode = source.sample(tasks, shots, query_shots, seeding.generator(seed, "test", 600))
    ev = algorithms.evaluate(algo, params, episode, max(steps), seeding.generator(seed, "test", 601), chunk=chunk)
    rows = []
    for k in steps:
        loss, half = ev.interval(k)
        per_task = ev.loss[k]  # (tasks,)
        row = {"steps": k, "loss": loss, "loss_ci95": half, "median": float(per_task.nan_to_num(nan=math.inf).median()),  # NaN counts as worst
               "diverged": int((~torch.isfinite(per_task) | (per_task > 100)).sum()), "tasks": tasks, "shots": shots}
        if ev.accuracy is not None:
            acc, acc_half = ev.interval(k, "accuracy")
            row.update(accuracy=acc, accuracy_ci95=acc_half)
        rows.append(row)
    return rows


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
