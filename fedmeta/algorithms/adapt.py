"""Test-time adaptation, shared by every algorithm: start from the algorithm's initial parameters,
take k steps of its inner rule on each task's support set, and measure the query loss (and
accuracy, for classification) after 0, 1, ..., k steps. Tasks are vmapped in chunks, on the
algorithm's device; the results come back on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from .. import losses
from ..optim import Params
from ..tasks import Episode
from .base import Algorithm


@dataclass(frozen=True)
class Evaluation:
    loss: torch.Tensor  # (steps + 1, tasks): query loss after 0..k adaptation steps
    accuracy: torch.Tensor | None  # (steps + 1, tasks), classification only

    def mean(self, step: int) -> float:
        return float(self.loss[step].mean())

    def interval(self, step: int, metric: str = "loss") -> tuple[float, float]:
        """Mean and 95 % half-width (normal approximation) over tasks after `step` steps."""
        values = (self.loss if metric == "loss" else self.accuracy)[step].double()
        half = 1.96 * float(values.std(unbiased=True)) / math.sqrt(values.numel()) if values.numel() > 1 else 0.0
        return float(values.mean()), half


def evaluate(algo: Algorithm, meta_params: Params, episode: Episode, steps: int,
             generator: torch.Generator | None = None, chunk: int = 100) -> Evaluation:
    """Adapt to every task of `episode` with `steps` inner updates; no meta-gradient is kept."""
    algo.check(episode)
    episode = episode.to(algo.device)
    meta_params = {k: v.detach().to(algo.device) for k, v in meta_params.items()}
    rule = algo.inner_rule()

    def one_task(params, xs, ys, xq, yq):
        state = algo.inner_state(params)
        out_loss, out_acc = [], []
        for step in range(steps + 1):
            out = algo.forward(params, xq)
            out_loss.append(algo.loss(out, yq))
            out_acc.append(losses.accuracy(out, yq) if algo.classification else out_loss[-1])
            if step < steps:
                g = grad(algo.task_loss)(params, xs, ys)
                params, state = rule(meta_params, params, g, state)
        return torch.stack(out_loss), torch.stack(out_acc)

    start = algo.start_params(meta_params, episode.num_tasks, generator)  # name -> (tasks, ...)
    loss_parts, acc_parts = [], []
    with torch.no_grad():
        for lo in range(0, episode.num_tasks, chunk):
            part = Episode(*(t[lo:lo + chunk] for t in episode))
            p = {k: v[lo:lo + chunk] for k, v in start.items()}
            loss, acc = vmap(one_task)(p, *part)  # (chunk, steps + 1)
            loss_parts.append(loss)
            acc_parts.append(acc)
    loss = torch.cat(loss_parts).T.contiguous().cpu()  # (steps + 1, tasks)
    acc = torch.cat(acc_parts).T.contiguous().cpu() if algo.classification else None
    return Evaluation(loss, acc)
