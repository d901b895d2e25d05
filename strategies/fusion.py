"""Pure server-side math, no Flower: check a client's reply, fuse replies by weighted averaging,
and turn the fused result into the next global meta-model with a pluggable server optimizer.

Fusion modes compose from these pieces rather than branching inside the strategy:
- "average" (train independently, then merge; FedMeta, Chen et al. 2018): clients return
  meta-parameters, `weighted_average` fuses them, `Replace` makes the average the new model;
- "meta-gradient" (distributed MAML): clients return meta-gradients, `weighted_average` fuses
  them, `AdamStep` applies the server's Adam, whose moments persist across rounds.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from fedmeta.optim import Params, adam_init, adam_step


class Rejected(ValueError):
    """A client reply failed validation; the message names what is wrong."""


def validate(arrays: Params, weight: Any, template: Params, max_weight: float) -> None:
    """Raise `Rejected` unless the reply matches the global model exactly and claims a sane weight.

    Checks, before any arithmetic: the weight is a finite number in (0, max_weight]; the key set
    equals the template's; every tensor has the template's shape and dtype and is finite.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise Rejected(f"weight {weight!r} is not a number")
    if not math.isfinite(weight) or weight <= 0:
        raise Rejected(f"weight {weight} is not a finite positive number")
    if weight > max_weight:
        raise Rejected(f"weight {weight} exceeds max-client-weight {max_weight:g}")
    missing, extra = sorted(set(template) - set(arrays)), sorted(set(arrays) - set(template))
    if missing or extra:
        raise Rejected(f"keys differ from the global model: missing {missing}, unexpected {extra}")
    for k, ref in template.items():
        a = arrays[k]
        if tuple(a.shape) != tuple(ref.shape):
            raise Rejected(f"{k}: shape {tuple(a.shape)} differs from the global {tuple(ref.shape)}")
        if a.dtype != ref.dtype:
            raise Rejected(f"{k}: dtype {a.dtype} differs from the global {ref.dtype}")
        if not torch.isfinite(a).all():
            raise Rejected(f"{k}: holds non-finite values")


def weighted_average(updates: list[tuple[Params, float]]) -> Params:
    """sum_i w_i u_i / sum_i w_i, accumulated in float64 and cast back to each tensor's dtype."""
    if not updates:
        raise ValueError("nothing to average")
    total = math.fsum(w for _, w in updates)
    first = updates[0][0]
    out = {}
    for k, ref in first.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for params, w in updates:
            acc += params[k].to(torch.float64) * (w / total)
        out[k] = acc.to(ref.dtype)
    return out


class ServerOptimizer(Protocol):
    def step(self, params: Params, fused: Params) -> Params: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Replace:
    """The fused average of the clients' meta-parameters becomes the global meta-model."""

    def step(self, params: Params, fused: Params) -> Params:
        return fused

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class AdamStep:
    """The server's Adam on the fused meta-gradient; its moments persist across rounds."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.state: dict[str, Any] | None = None

    def step(self, params: Params, fused: Params) -> Params:
        if self.state is None:
            self.state = adam_init(params)
        new, self.state = adam_step(params, fused, self.state, self.lr)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "adam": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state.get("adam")


def server_optimizer(fusion: str, server_lr: float) -> ServerOptimizer:
    return AdamStep(server_lr) if fusion == "meta-gradient" else Replace()
