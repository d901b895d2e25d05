"""Random quadratic problems from "Learning to learn by gradient descent by gradient descent"
(Andrychowicz et al. 2016, §3.1): f(theta) = ||W theta - y||^2 with W, y IID Gaussian, 10 dims.

A problem is written as a regression episode so that every algorithm sees one interface: the
rows of W are the inputs, y the targets, the optimizee is a bias-free linear map theta, and the
loss is the sum of squares ("sse"), so the loss of the episode is exactly ||W theta - y||^2.
Support and query hold the same problem. `scale` draws W ~ N(0, s^2) with s ~ U[scale] per
problem, so that clients can own different families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from . import Episode, bins


@dataclass(frozen=True)
class QuadraticTasks:
    dim: int = 10
    scale: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"quadratic dim = {self.dim}: must be >= 1")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"quadratic scale range {self.scale} must satisfy 0 < lo <= hi")

    def sample(self, num_tasks: int, shots: int = 0, query_shots: int = 0,
               generator: torch.Generator | None = None) -> Episode:
        """`shots` and `query_shots` are ignored: a problem always has `dim` rows."""
        if num_tasks < 1:
            raise ValueError(f"num_tasks = {num_tasks}: must be >= 1")
        lo, hi = self.scale
        s = lo + (hi - lo) * torch.rand((num_tasks, 1, 1), generator=generator)
        w = s * torch.randn((num_tasks, self.dim, self.dim), generator=generator)  # (tasks, dim, dim)
        y = torch.randn((num_tasks, self.dim, 1), generator=generator)  # (tasks, dim, 1)
        return Episode(w, y, w, y)


def source(cfg: Config, split: str = "train") -> QuadraticTasks:
    """The whole family of the config; evaluation ("test") draws fresh problems from the same family."""
    return QuadraticTasks(cfg.quadratic_dim, (cfg.quadratic_scale_min, cfg.quadratic_scale_max))


def partition(cfg: Config, partition_id: int, num_partitions: int) -> QuadraticTasks:
    """A non-IID partition: a slice of the scale of W (`bins`)."""
    return QuadraticTasks(cfg.quadratic_dim, bins.owned(cfg, (cfg.quadratic_scale_min, cfg.quadratic_scale_max),
                                                        partition_id, num_partitions))
