"""Per-task losses as pure functions of (outputs, targets); names are what task sources declare."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of one task: out, y (shots, 1)."""
    return F.mse_loss(out, y)


def sse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of squares, ||W theta - y||^2 for the quadratic problems: out, y (rows, 1)."""
    return ((out - y) ** 2).sum()


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Classification: out (shots, ways) logits, y (shots,) int64 labels."""
    return F.cross_entropy(out, y)


LOSSES: dict[str, Loss] = {"mse": mse, "sse": sse, "cross_entropy": cross_entropy}


def get(name: str) -> Loss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name]


def accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of correct argmax predictions: out (..., shots, ways), y (..., shots)."""
    return (out.argmax(-1) == y).float().mean(-1)
