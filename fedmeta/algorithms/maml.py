"""MAML (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks") and its first-order approximation (FOMAML, same paper §5.2).

Second order is exact: the inner updates are differentiated through (`torch.func.grad` nested in
`torch.func.grad`), so the meta-gradient holds the Hessian-vector terms. The tasks of a meta-batch
are processed together with `torch.func.vmap`, never a Python loop. `meta_gradient_fn` asks the
registry of fast paths (`registry.py`) for one that computes the same meta-gradient: for a ReLU MLP
with the MSE loss (the sinusoid setting) the closed form of `fast.py` (several times faster), for
the Conv4 classifier (MAML, FOMAML, Meta-SGD) all tasks at once with batched matmuls (`grouped.py`);
everything else takes the generic path. The chosen path is `meta_gradient_path` after the call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, grad_and_value, vmap

from ..optim import Params
from ..tasks import Episode
from . import registry
from .base import Algorithm


def adapt(algo: Algorithm, meta_params: Params, params: Params, x: torch.Tensor, y: torch.Tensor,
          steps: int) -> Params:
    """`steps` inner updates of one task's params on (x, y) with the algorithm's inner rule.

    Pure and differentiable: gradients flow through every step to `meta_params` and `params`.
    x (shots, *features), y (shots, *targets).
    """
    rule, state = algo.inner_rule(), algo.inner_state(params)
    for _ in range(steps):
        g = grad(algo.task_loss)(params, x, y)
        params, state = rule(meta_params, params, g, state)
    return params


class MAML(Algorithm):
    name = "maml"
    first_order = False

    def meta_loss(self, meta_params: Params, episode: Episode) -> torch.Tensor:
        """Mean over tasks of the query loss after adaptation on the support set."""
        init = self.model_params(meta_params)
        steps = self.cfg.inner_steps

        def one_task(xs, ys, xq, yq):  # xs (shots, *features) ...
            return self.task_loss(adapt(self, meta_params, init, xs, ys, steps), xq, yq)

        return vmap(one_task)(*episode).mean()  # (tasks,) -> scalar

    def meta_gradient_fn(self) -> Callable[[Params, Episode], tuple[Params, torch.Tensor]]:
        """A registered fast path that computes this meta-gradient (see `registry`), else the generic one."""
        generic = self._first_order_gradient if self.first_order else grad_and_value(self.meta_loss)
        return registry.meta_gradient_fn(self, generic)

    def _first_order_gradient(self, meta_params: Params, episode: Episode) -> tuple[Params, torch.Tensor]:
        """FOMAML: the query-loss gradient at the adapted parameters, averaged over tasks.

        The inner updates are treated as constants (no Hessian terms), which is exactly the
        derivative of the query loss w.r.t. the adapted parameters, evaluated per task.
        """
        init = self.model_params(meta_params)
        steps = self.cfg.inner_steps

        def one_task(xs, ys, xq, yq):
            adapted = {k: v.detach() for k, v in adapt(self, meta_params, init, xs, ys, steps).items()}
            return grad_and_value(self.task_loss)(adapted, xq, yq)

        grads, losses = vmap(one_task)(*episode)  # grads: name -> (tasks, *shape)
        return {k: g.mean(0) for k, g in grads.items()}, losses.mean()


class FOMAML(MAML):
    name = "fomaml"
    first_order = True
