"""Adam as a pure function over parameter dicts, so that its state is plain tensors that travel in
checkpoints and can live on the server across rounds (Kingma & Ba 2015; same update as
`torch.optim.Adam` with default arguments, checked in the tests)."""

from __future__ import annotations

import functools
import math

import torch

Params = dict[str, torch.Tensor]


def adam_init(params: Params) -> dict:
    return {"step": 0,
            "exp_avg": {k: torch.zeros_like(v) for k, v in params.items()},
            "exp_avg_sq": {k: torch.zeros_like(v) for k, v in params.items()}}


def adam_flatten(state: dict) -> tuple[Params, int]:
    """Adam state -> (flat tensors "exp_avg/<name>", "exp_avg_sq/<name>"; step) for storage."""
    flat = {f"{part}/{k}": v for part in ("exp_avg", "exp_avg_sq") for k, v in state[part].items()}
    return flat, int(state["step"])


def adam_unflatten(flat: Params, step: int, params: Params) -> dict | None:
    """The inverse of `adam_flatten`, or None when the stored state does not fit `params` (other
    keys or shapes: a different model), so that the caller starts a fresh Adam."""
    state = {"step": int(step), "exp_avg": {}, "exp_avg_sq": {}}
    if len(flat) != 2 * len(params):
        return None
    for part in ("exp_avg", "exp_avg_sq"):
        for k, p in params.items():
            v = flat.get(f"{part}/{k}")
            if v is None or v.shape != p.shape or v.dtype != p.dtype:
                return None
            state[part][k] = v
    return state


@torch.no_grad()
def adam_step(params: Params, grads: Params, state: dict, lr: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> tuple[Params, dict]:
    """One Adam update; returns new params and new state (inputs are not modified)."""
    if lr <= 0:
        raise ValueError(f"Adam learning rate {lr} must be > 0")
    if set(grads) != set(params):
        raise ValueError(f"gradient keys {sorted(grads)} differ from parameter keys {sorted(params)}")
    b1, b2 = betas
    step = state["step"] + 1
    bias1, bias2 = 1 - b1**step, 1 - b2**step
    new_params, m_new, v_new = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        m = state["exp_avg"][k].mul(b1).add_(g, alpha=1 - b1)
        v = state["exp_avg_sq"][k].mul(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
        new_params[k] = p.addcdiv(m, denom, value=-lr / bias1)
        m_new[k], v_new[k] = m, v
    return new_params, {"step": step, "exp_avg": m_new, "exp_avg_sq": v_new}


# --- the kept Adam state on the wire: one 1-D array (Flower (de)serialises each array of a record apart) ---------
def pack_adam(state: dict) -> tuple[torch.Tensor, int]:
    """Adam state -> (one 1-D tensor: `adam_flatten`'s tensors flattened and concatenated in its order, i.e.
    exp_avg then exp_avg_sq, each in the model's key order; the step). Mixed dtypes promote (exactly)."""
    flat, step = adam_flatten(state)
    return torch.cat([v.reshape(-1) for v in flat.values()]), step


def unpack_adam(packed: torch.Tensor, step: int, params: Params) -> dict | None:
    """The inverse of `pack_adam` for a model with `params`, or None when it does not fit (other sizes)."""
    sizes = [p.numel() for p in params.values()] * 2
    if packed.dim() != 1 or packed.numel() != sum(sizes):
        return None
    names = [f"{part}/{k}" for part in ("exp_avg", "exp_avg_sq") for k in params]
    parts = packed.split(sizes)
    flat = {n: t.view(p.shape).to(p.dtype) for n, t, p in zip(names, parts, [*params.values()] * 2, strict=True)}
    return adam_unflatten(flat, step, params)


def packed_adam_like(params: Params) -> torch.Tensor:
    """What `pack_adam` gives for a model with `params`: 1-D, twice the model's size, in the parameters'
    promoted dtype (an expanded view of zeros: nothing is allocated). The server checks replies against it."""
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in params.values()))
    return torch.zeros(1, dtype=dtype).expand(2 * sum(v.numel() for v in params.values()))
