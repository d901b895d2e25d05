"""Task families: each samples batched episodes with a leading task dimension.

An `Episode` holds support and query tensors stacked over tasks, `(tasks, shots, ...)`. A task
source samples episodes from a seeded `torch.Generator`, so the same seed always gives the same
tasks. Which model and loss a family's tasks take, and how the family is partitioned, is the
family's row in `families.FAMILIES`.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class Episode(NamedTuple):
    support_x: torch.Tensor  # (tasks, shots, *features)
    support_y: torch.Tensor  # (tasks, shots, *targets)
    query_x: torch.Tensor  # (tasks, query_shots, *features)
    query_y: torch.Tensor  # (tasks, query_shots, *targets)

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> Episode:
        return Episode(*(t.to(device) for t in self))

    @staticmethod
    def cat(episodes: list[Episode]) -> Episode:
        return Episode(*(torch.cat(ts) for ts in zip(*episodes)))


class TaskSource(Protocol):
    """What every task source provides."""

    def sample(self, num_tasks: int, shots: int, query_shots: int,
               generator: torch.Generator) -> Episode: ...


def check_episode(episode: Episode) -> Episode:
    """Reject episodes whose tensors do not share the task dimension or are not finite."""
    if len(episode) != 4 or not all(isinstance(t, torch.Tensor) for t in episode):
        raise ValueError("an episode is four tensors: support_x, support_y, query_x, query_y")
    sx, sy, qx, qy = episode
    if min(t.dim() for t in episode) < 2:
        raise ValueError("episode tensors need shape (tasks, shots, ...); got shapes "
                         f"{[tuple(t.shape) for t in episode]}")
    if len({t.shape[0] for t in episode}) != 1:
        raise ValueError(f"episode tensors disagree on the task dimension: {[tuple(t.shape) for t in episode]}")
    if sx.shape[1] != sy.shape[1] or qx.shape[1] != qy.shape[1]:
        raise ValueError(f"episode support/query inputs and targets disagree on shots: x {tuple(sx.shape)} vs y "
                         f"{tuple(sy.shape)}, x {tuple(qx.shape)} vs y {tuple(qy.shape)}")
    if sx.shape[2:] != qx.shape[2:]:
        raise ValueError(f"episode support and query features differ: {tuple(sx.shape[2:])} vs {tuple(qx.shape[2:])}")
    for name, t in zip(Episode._fields, episode):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"episode {name} holds non-finite values")
    return episode
