"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

Each task runs `inner-steps` SGD steps from the meta-parameters on its support set; the update
direction is theta - mean_t(phi_t), returned as a pseudo-gradient so the shared outer loop (Adam)
applies it. The reported loss is the query loss after adaptation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import vmap

from ..optim import Params
from ..tasks import Episode
from .base import Algorithm
from .maml import adapt


class Reptile(Algorithm):
    name = "reptile"

    def meta_gradient_fn(self) -> Callable[[Params, Episode], tuple[Params, torch.Tensor]]:
        return self._pseudo_gradient

    def _pseudo_gradient(self, meta_params: Params, episode: Episode) -> tuple[Params, torch.Tensor]:
        init = self.model_params(meta_params)

        def one_task(xs, ys, xq, yq):
            phi = adapt(self, meta_params, init, xs, ys, self.cfg.inner_steps)
            return phi, self.task_loss(phi, xq, yq)

        with torch.no_grad():
            phi, losses = vmap(one_task)(*episode)  # phi: name -> (tasks, *shape)
        return {k: init[k] - phi[k].mean(0) for k in init}, losses.mean()
