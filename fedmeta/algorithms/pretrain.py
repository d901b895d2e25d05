"""The non-meta-learning baseline: one model trained jointly on all tasks' data (support and
query), no inner loop. Federated with weighted averaging this is FedAvg (McMahan et al. 2017);
at evaluation it is fine-tuned on each task's support set like every other algorithm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad_and_value, vmap

from ..optim import Params
from ..tasks import Episode
from .base import Algorithm


class Pretrain(Algorithm):
    name = "pretrain"

    def joint_loss(self, meta_params: Params, episode: Episode) -> torch.Tensor:
        params = self.model_params(meta_params)
        x = torch.cat([episode.support_x, episode.query_x], 1)  # (tasks, shots + query, ...)
        y = torch.cat([episode.support_y, episode.query_y], 1)
        return vmap(self.task_loss, in_dims=(None, 0, 0))(params, x, y).mean()

    def meta_gradient_fn(self) -> Callable[[Params, Episode], tuple[Params, torch.Tensor]]:
        return grad_and_value(self.joint_loss)
