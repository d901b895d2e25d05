"""The non-meta-learning baselines, no inner loop in training; federated with weighted averaging
they are FedAvg (McMahan et al. 2017); at evaluation they are fine-tuned on each task's support set
with the inner rule, like every other algorithm.

- `Pretrain`: one model trained jointly on all tasks' data (support and query) with the episodes'
  labels. For classification these are a class's random position in its episode, a target with no
  consistent meaning across episodes: use `PretrainGlobal` there.
- `PretrainGlobal`: the "Baseline" of Chen, Liu, Kira, Wang & Huang 2019 ("A Closer Look at Few-shot
  Classification", §3.1): a classifier with one output per training class (`conv4-global`: the
  family's global label space, the same label ids on every client), trained by plain steps on batches
  of labelled images; at test its head is replaced by a zero `ways`-way head and the whole network
  is fine-tuned on the support set with the inner rule (inner-lr, eval-steps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad_and_value, vmap

from ..config import Config, ConfigError
from ..optim import Params
from ..tasks import Episode, TaskSource, families
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


class PretrainGlobal(Algorithm):
    name = "pretrain-global"

    def __init__(self, cfg: Config, model: nn.Module | None = None) -> None:
        if not families.family(cfg.task).classification:
            raise ConfigError(f"algorithm = 'pretrain-global' needs a classification task; task = {cfg.task!r} "
                              f"is not one (classification: {', '.join(families.classification_tasks())})")
        super().__init__(cfg, model)

    def images_per_step(self) -> int:
        """Images per training step: as many as a meta-batch of episodes holds."""
        cfg = self.cfg
        return cfg.meta_batch_size * cfg.ways * (cfg.shots + cfg.query_shots)

    def draw(self, source: TaskSource, generator: torch.Generator) -> Episode:
        """A batch of labelled images of the source's classes with their global labels, as one task
        whose query set is empty: support (1, images, 1, 28, 28), labels (1, images)."""
        if not hasattr(source, "sample_labelled"):
            raise ValueError(f"algorithm = 'pretrain-global': the task source {type(source).__name__} has no "
                             "labelled images (sample_labelled)")
        x, y = source.sample_labelled(self.images_per_step(), generator)
        return Episode(x[None], y[None], x[None, :0], y[None, :0])

    def batch_loss(self, meta_params: Params, episode: Episode) -> torch.Tensor:
        """Mean cross-entropy of the global classifier over the support images of every task."""
        x, y = episode.support_x.flatten(0, 1), episode.support_y.flatten(0, 1)  # (images, ...), (images,)
        return self.task_loss(self.model_params(meta_params), x, y)

    def meta_gradient_fn(self) -> Callable[[Params, Episode], tuple[Params, torch.Tensor]]:
        return grad_and_value(self.batch_loss)

    def start_params(self, meta_params: Params, num_tasks: int,
                     generator: torch.Generator | None = None) -> Params:
        """The trained body with a zero `ways`-way head, per task (tasks, ...): fine-tuned at test."""
        params = super().start_params(meta_params, num_tasks, generator)
        w = params["head.weight"]  # (tasks, global classes, features)
        params["head.weight"] = w.new_zeros(num_tasks, self.cfg.ways, w.shape[-1])
        params["head.bias"] = w.new_zeros(num_tasks, self.cfg.ways)
        return params
