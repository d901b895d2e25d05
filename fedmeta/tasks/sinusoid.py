"""Sinusoid regression, exactly as in MAML (Finn et al. 2017, §5.1).

A task is y = A sin(x - phase) with A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]. Sub-ranges of
amplitude let a partition own a non-IID slice of the family (`partition`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import Config
from . import Episode, bins


@dataclass(frozen=True)
class SinusoidTasks:
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        for name in ("amplitude", "phase", "x_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"sinusoid {name} range ({lo}, {hi}) is empty")

    def sample(self, num_tasks: int, shots: int, query_shots: int,
               generator: torch.Generator) -> Episode:
        if num_tasks < 1 or shots < 1 or query_shots < 1:
            raise ValueError(f"need num_tasks, shots, query_shots >= 1; got {num_tasks}, {shots}, {query_shots}")
        amp = _uniform((num_tasks, 1, 1), self.amplitude, generator)  # (tasks, 1, 1)
        phase = _uniform((num_tasks, 1, 1), self.phase, generator)
        x = _uniform((num_tasks, shots + query_shots, 1), self.x_range, generator)  # (tasks, K+Q, 1)
        y = amp * torch.sin(x - phase)
        return Episode(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(shape, generator=generator)


def source(cfg: Config, split: str = "train") -> SinusoidTasks:
    """The whole family of the config; evaluation ("test") draws fresh tasks from the same family."""
    return SinusoidTasks((cfg.amplitude_min, cfg.amplitude_max), (cfg.phase_min, cfg.phase_max), (cfg.x_min, cfg.x_max))


def partition(cfg: Config, partition_id: int, num_partitions: int) -> SinusoidTasks:
    """A non-IID partition: a slice of the amplitudes (`bins`); phases and x keep the full range."""
    return SinusoidTasks(bins.owned(cfg, (cfg.amplitude_min, cfg.amplitude_max), partition_id, num_partitions),
                         (cfg.phase_min, cfg.phase_max), (cfg.x_min, cfg.x_max))
