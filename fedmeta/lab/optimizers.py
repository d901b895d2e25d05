"""Hand-designed optimizers with tuned learning rates, the baselines of the learned (LSTM) optimizer
(Andrychowicz et al. 2016, "Learning to learn by gradient descent by gradient descent", §3).

An `Optimizer` is a pair (rule, init_state) of pure per-task functions: `rule(params, grads, state) ->
(params, state)` updates ONE optimizee, `init_state(params)` starts its state; problems are vmapped. The
learned optimizer becomes one with `lstm_rule`, so every optimizer runs through the same `evaluate_optimizer`
from the same starting points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import grad, vmap

from fedmeta import losses
from fedmeta.algorithms.base import Algorithm
from fedmeta.optim import Params
from fedmeta.tasks import Episode

Rule = Callable[[Params, Params, Any], tuple[Params, Any]]
Optimizer = tuple[Rule, Callable[[Params], Any]]
LR_GRID = tuple(10 ** (e / 4) for e in range(-16, 5))  # 1e-4 ... 10, four points per decade
BASELINES = ("adam", "rmsprop", "sgd")


def baseline(name: str, lr: float) -> Optimizer:
    """SGD, RMSprop (alpha 0.99, eps 1e-8) or Adam (0.9, 0.999, eps 1e-8): torch.optim's defaults."""
    def zeros(params: Params) -> Params:
        return {k: torch.zeros_like(v) for k, v in params.items()}

    if name == "sgd":
        return (lambda p, g, s: ({k: p[k] - lr * g[k] for k in p}, s)), (lambda params: None)
    if name == "rmsprop":
        def rmsprop(p, g, v):
            v = {k: 0.99 * v[k] + 0.01 * g[k] ** 2 for k in p}
            return {k: p[k] - lr * g[k] / (v[k].sqrt() + 1e-8) for k in p}, v
        return rmsprop, zeros
    if name == "adam":
        def adam(p, g, s):
            m, v, t = s
            t = t + 1
            m = {k: 0.9 * m[k] + 0.1 * g[k] for k in p}
            v = {k: 0.999 * v[k] + 0.001 * g[k] ** 2 for k in p}
            step = {k: (m[k] / (1 - 0.9 ** t)) / ((v[k] / (1 - 0.999 ** t)).sqrt() + 1e-8) for k in p}
            return {k: p[k] - lr * step[k] for k in p}, (m, v, t)
        return adam, lambda params: (zeros(params), zeros(params), torch.zeros((), dtype=torch.float64))
    raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")


def lstm_rule(algo: Algorithm, meta_params: Params) -> Optimizer:
    """The trained LSTM optimizer (`algorithm = lstm`) as an Optimizer, its meta-parameters fixed."""
    rule = algo.inner_rule()
    meta_params = {k: v.detach() for k, v in meta_params.items()}
    return (lambda p, g, s: rule(meta_params, p, g, s)), algo.inner_state


def evaluate_optimizer(algo: Algorithm, optimizer: Optimizer, episode: Episode, start: Params,
                       steps: int, chunk: int = 500) -> torch.Tensor:
    """Training (support) loss of each problem after 0..steps updates, (steps + 1, tasks).

    start: name -> (tasks, ...), the optimizee's initial parameters (shared by every optimizer)."""
    rule, init_state = optimizer

    def one_task(params, x, y):
        state, out = init_state(params), []
        for step in range(steps + 1):
            out.append(algo.task_loss(params, x, y))
            if step < steps:
                params, state = rule(params, grad(algo.task_loss)(params, x, y), state)
        return torch.stack(out)

    parts = []
    with torch.no_grad():
        for lo in range(0, episode.num_tasks, chunk):
            p = {k: v[lo:lo + chunk] for k, v in start.items()}
            parts.append(vmap(one_task)(p, episode.support_x[lo:lo + chunk], episode.support_y[lo:lo + chunk]))
    return torch.cat(parts).T.contiguous()


def query_metrics(algo: Algorithm, optimizer: Optimizer, episode: Episode, start: Params, steps: int,
                  chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Query loss and accuracy per problem, (tasks,) each, after `steps` updates on the support set (the
    same updates as `evaluate_optimizer`, which reports the support loss only). Classification only."""
    rule, init_state = optimizer

    def one_task(params, xs, ys, xq, yq):
        state = init_state(params)
        for _ in range(steps):
            params, state = rule(params, grad(algo.task_loss)(params, xs, ys), state)
        out = algo.forward(params, xq)
        return algo.loss(out, yq), losses.accuracy(out, yq)

    loss_parts, acc_parts = [], []
    with torch.no_grad():
        for lo in range(0, episode.num_tasks, chunk):
            p = {k: v[lo:lo + chunk] for k, v in start.items()}
            loss, acc = vmap(one_task)(p, *(t[lo:lo + chunk] for t in episode))
            loss_parts.append(loss)
            acc_parts.append(acc)
    return torch.cat(loss_parts), torch.cat(acc_parts)


def final_score(losses: torch.Tensor) -> float:
    """Mean final loss of a (steps + 1, tasks) curve; a diverged run (any non-finite loss) scores +inf."""
    final = losses[-1].double()
    return float(final.mean()) if torch.isfinite(final).all() else math.inf


def tuned_baselines(algo: Algorithm, episode: Episode, start: Params, steps: int,
                    names: Sequence[str] = BASELINES, grid: Sequence[float] = LR_GRID) -> dict[str, dict]:
    """For each baseline, the lr of `grid` with the lowest mean loss after `steps` steps on the given
    (validation) problems: {name: {"lr": best, "grid": {lr: score}, "edge": best is on the grid's edge}}."""
    out = {}
    for name in names:
        scores = {lr: final_score(evaluate_optimizer(algo, baseline(name, lr), episode, start, steps))
                  for lr in grid}
        best = min(scores, key=scores.get)
        out[name] = {"lr": best, "grid": scores, "edge": best in (grid[0], grid[-1])}
    return out
