"""Sinusoid regression, exactly as in MAML (Finn et al. 2017, §5.1).

A task is y = A sin(x - phase) with A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]. Sub-ranges of
amplitude and phase let a client own a non-IID slice of the family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import Episode


@dataclass(frozen=True)
class SinusoidTasks:
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    model: str = "mlp"
    loss: str = "mse"

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
