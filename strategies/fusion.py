"""Pure server-side math, no arithmetic in the strategy: check a client's reply (`validate`, and
`check_size` before it is unpacked), then compose the round's fusion from small pieces:

    updates (reply tensors, claimed weight), in partition order
      -> pseudo-gradient d_i     "average": global - theta_i; "meta-gradient": g_i
      -> weight policy           claimed | equal | capped                 (aggregators.py)
      -> aggregator G            mean | median | trimmed-mean | clipped-mean | krum
      -> norm guard              ||G|| <= update-norm-cap x recent rounds' median
      -> server optimizer        sgd | adam | yogi | adagrad, rate x schedule  (server_optimizers.py)
      -> next global model

`build_fusion(cfg)` picks each piece from the Config by table lookup; `Fusion.fuse` runs them and
commits the optimizer state only when the result is finite. FedMeta's "train independently, then
merge" (Chen et al. 2018) is "average" + mean + SGD(lr 1): the plain weighted average of the
meta-models; distributed MAML is "meta-gradient" + mean + Adam, as central MAML's Adam.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from clients.records import from_record
from fedmeta.config import Config, ConfigError
from fedmeta.optim import Params

from . import aggregators as agg
from .aggregators import FusionError, Updates, update_norm, weighted_average
from .server_optimizers import Optimizer, build_optimizer, client_lr_factor, server_lr

__all__ = ["Fused", "Fusion", "FusionError", "Rejected", "build_fusion",
           "check_preconditions", "check_size", "client_lr_factor", "read_checked", "min_replies", "norm_guard", "validate",
           "weighted_average"]

HEADER_SLACK = 4096  # bytes per array beyond its elements: the .npy header (128 bytes for usual shapes)
GUARD_WINDOW = 10  # the norm guard's reference: the median of this many recent rounds' ||G||


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


def check_size(record: Mapping[str, Any], template: Params, slack: int = HEADER_SLACK) -> None:
    """Raise `Rejected` when a reply's arrays are not the global model's keys or any array's bytes
    exceed what its template tensor implies (numel x element size) plus `slack` for the header.

    Call it on the Flower ArrayRecord (each value an `flwr.app.Array` with its serialized `.data`)
    BEFORE it is unpacked (`clients.records.from_record`), so an oversized reply is never unpacked into tensors; the total
    is then bounded by the template's bytes + slack per key. Shapes, dtypes and finiteness are
    `validate`'s job, after conversion.
    """
    missing, extra = sorted(set(template) - set(record)), sorted(set(record) - set(template))
    if missing or extra:
        raise Rejected(f"keys differ from the global model: missing {missing}, unexpected {extra}")
    for k, ref in template.items():
        size, limit = len(record[k].data), ref.numel() * ref.element_size() + slack
        if size > limit:
            raise Rejected(f"{k}: {size} bytes exceed the {limit} bytes that the global {tuple(ref.shape)} "
                           f"{ref.dtype} allows (with {slack} bytes of header); not unpacked")


def read_checked(record: Mapping[str, Any], template: Params) -> Params:
    """A reply's extra arrays (kept optimizer state, control variate) as tensors, or `Rejected`: sized before
    they are unpacked (`check_size`), then the template's keys, shapes and dtypes, finite (`validate`)."""
    check_size(record, template)
    arrays = from_record(record)
    validate(arrays, 1, template, 1)
    return arrays


# --- the composed fusion ------------------------------------------------------------------------
def parameter_difference(global_params: Params, theta: Params) -> Params:
    """d_i = global - theta_i ("average" fusion: the client's move, as a gradient), in float64."""
    return {k: g.to(torch.float64) - theta[k].to(torch.float64) for k, g in global_params.items()}


def as_gradient(global_params: Params, grad: Params) -> Params:
    """d_i = g_i ("meta-gradient" fusion), in float64 (exact; cast back after fusion)."""
    return {k: grad[k].to(torch.float64) for k in global_params}


PSEUDO_GRADIENTS: dict[str, Callable[[Params, Params], Params]] = {
    "average": parameter_difference, "meta-gradient": as_gradient}

WEIGHT_POLICIES: dict[str, Callable[[Config], Callable[[list[float]], list[float]]]] = {
    "claimed": lambda c: agg.claimed, "equal": lambda c: agg.equal,
    "capped": lambda c: partial(agg.capped, cap=c.weight_cap)}

Aggregate = Callable[[Updates], tuple[Params, dict[str, int]]]  # -> (G, counts for the round's row)


def _counts(selected: int, clipped: int = 0, trimmed: int = 0) -> dict[str, int]:
    return {"num_selected": selected, "num_clipped": clipped, "num_trimmed": trimmed}


def _mean(cfg: Config, u: Updates) -> tuple[Params, dict[str, int]]:
    return weighted_average(u), _counts(len(u))


def _median(cfg: Config, u: Updates) -> tuple[Params, dict[str, int]]:
    return agg.median(u), _counts(len(u))


def _trimmed(cfg: Config, u: Updates) -> tuple[Params, dict[str, int]]:
    k = agg.trim_count(len(u), cfg.trim_fraction)
    return agg.trimmed_mean(u, cfg.trim_fraction), _counts(len(u) - 2 * k, trimmed=k)


def _clipped(cfg: Config, u: Updates) -> tuple[Params, dict[str, int]]:
    fused = agg.clipped_mean(u, cfg.clip_multiple)  # checks the minimum first
    return fused, _counts(len(u), clipped=agg.clip_to_median_norm(u, cfg.clip_multiple)[1])


def _krum(cfg: Config, u: Updates) -> tuple[Params, dict[str, int]]:
    chosen = agg.krum_selection(u, cfg.krum_byzantine, cfg.krum_select)
    return weighted_average([u[i] for i in chosen]), _counts(len(chosen))


AGGREGATORS: dict[str, Callable[[Config, Updates], tuple[Params, dict[str, int]]]] = {
    "mean": _mean, "median": _median, "trimmed-mean": _trimmed, "clipped-mean": _clipped, "krum": _krum}


def min_replies(cfg: Config) -> int:
    """The fewest replies the configured aggregator fuses (below it a round is not fused)."""
    f = cfg.krum_byzantine
    need = {"mean": 1, "median": 3, "clipped-mean": 3, "krum": 2 * f + 3,
            "trimmed-mean": agg.min_trimmed(cfg.trim_fraction) if cfg.trim_fraction > 0 else 1}
    return need[cfg.aggregator]


def check_preconditions(cfg: Config, expected_replies: int) -> None:
    """Refuse at start-up (ConfigError naming the keys and numbers) an aggregator that cannot be
    robust with the replies a round is planned to fuse (`expected_replies`: the training partitions
    sampled per round)."""
    need, a = min_replies(cfg), cfg.aggregator
    why = {"median": "the median of 2 replies is their mean",
           "clipped-mean": "with 2 replies one of them moves the median norm",
           "krum": f"Krum needs n > 2 x krum-byzantine + 2 = {2 * cfg.krum_byzantine + 2}",
           "trimmed-mean": f"trim-fraction = {cfg.trim_fraction} drops floor({cfg.trim_fraction} x n) replies "
                           f"at each end, none below {need}"}
    if expected_replies < need:
        because = f" ({why[a]})" if a in why else ""
        raise ConfigError(f"aggregator = {a!r} needs at least {need} replies per round{because}, "
                          f"but {expected_replies} are expected (training partitions x fraction-train)")
    if a == "krum" and cfg.krum_select > expected_replies - cfg.krum_byzantine:
        raise ConfigError(f"krum-select = {cfg.krum_select} exceeds the {expected_replies} expected replies minus "
                          f"krum-byzantine = {cfg.krum_byzantine}: Krum would average possibly Byzantine replies")


def norm_guard(grad: Params, reply_norms: list[float], history: list[float], cap: float
               ) -> tuple[Params, dict[str, float]]:
    """Bound what one round can do (issue 10: one finite 1e25 meta-gradient made the server Adam's
    moments inf and froze the model for good): if ||G|| > cap x reference, scale G down to it.
    reference = median of the recent accepted rounds' ||G|| (`history`), or, with no history yet,
    the median of this round's reply norms ||d_i||. cap 0 turns the guard off."""
    norm = update_norm(grad)
    reference = statistics.median(history or reply_norms)
    clipped = cap > 0 and norm > cap * reference
    applied = cap * reference if clipped else norm
    if clipped:
        grad = {k: v * (applied / norm) for k, v in grad.items()}
    return grad, {"update_norm": norm, "update_norm_ref": reference, "update_norm_applied": applied,
                  "clipped": int(clipped)}


@dataclass(frozen=True)
class Fused:
    params: Params  # the next global model (the global's keys and dtypes)
    info: dict[str, float]  # plain numbers for the round's row


class Fusion:
    """One run's fusion: the pieces (pure) and the state that persists across rounds (the server
    optimizer's state and the norm guard's history), saved and restored bit-exactly."""

    def __init__(self, pseudo_gradient: Callable[[Params, Params], Params],
                 policy: Callable[[list[float]], list[float]], aggregate: Aggregate, optimizer: Optimizer,
                 lr: Callable[[int], float], norm_cap: float, window: int = GUARD_WINDOW) -> None:
        self.pseudo_gradient, self.policy, self.aggregate = pseudo_gradient, policy, aggregate
        self.optimizer, self.lr, self.norm_cap, self.window = optimizer, lr, norm_cap, window
        self.opt_state: dict | None = None  # created at the first round, when the shapes are known
        self.history: list[float] = []  # ||G|| applied in the last `window` accepted rounds

    def fuse(self, global_params: Params, updates: list[tuple[Params, float]], server_round: int) -> Fused:
        """The next global model from the round's validated replies (partition order). Raises
        FusionError (nothing changed) when the aggregator gets too few replies or the step is not
        finite."""
        if not updates:
            raise FusionError("no valid reply to fuse")
        d = [self.pseudo_gradient(global_params, t) for t, _ in updates]  # float64
        claims = [float(w) for _, w in updates]
        weights = self.policy(claims)
        grad, counts = self.aggregate(list(zip(d, weights)))
        grad, guard = norm_guard(grad, [update_norm(x) for x in d], self.history, self.norm_cap)
        grad = {k: grad[k].to(p.dtype) for k, p in global_params.items()}
        lr = self.lr(server_round)
        state = self.opt_state if self.opt_state is not None else self.optimizer.init(global_params)
        new, state = self.optimizer.step(global_params, grad, state, lr)
        if not (_finite(new) and _finite(state)):
            raise FusionError(f"the {self.optimizer.name} step is not finite; model and optimizer state unchanged")
        self.opt_state = state
        if guard["update_norm_applied"] > 0:  # a zero in the history could clip later rounds to nothing
            self.history = (self.history + [guard["update_norm_applied"]])[-self.window:]
        info = {"num_fused": len(updates), **counts, "num_capped": sum(w < c for w, c in zip(weights, claims)),
                "total_weight": math.fsum(weights), **guard, "server_lr": lr}
        return Fused({k: new[k] for k in global_params}, info)

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, floats, strings, lists and tensors (loads with torch.load(weights_only=True))."""
        return {"optimizer": self.optimizer.name, "optimizer_state": self.opt_state,
                "norm_history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any], params: Params | None = None) -> None:
        """Restore `state_dict()`'s output. With `params` (the checkpoint's model) the optimizer state
        is checked to fit it now, not later."""
        if state["optimizer"] != self.optimizer.name:
            raise ValueError(f"the checkpoint's server optimizer is {state['optimizer']!r}, this run's "
                             f"server-optimizer is {self.optimizer.name!r}")
        if params is not None and state["optimizer_state"] is not None:
            _check_fits(state["optimizer_state"], params)
        self.opt_state = state["optimizer_state"]
        self.history = [float(x) for x in state["norm_history"]]


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    return []


def _finite(tree: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(tree))


def _check_fits(opt_state: dict, params: Params) -> None:
    """Every per-parameter dict of the optimizer state has the model's keys, shapes and dtypes."""
    for part, value in opt_state.items():
        if not isinstance(value, dict):
            continue
        if set(value) != set(params) or any(v.shape != params[k].shape or v.dtype != params[k].dtype
                                            for k, v in value.items()):
            raise ValueError(f"the server optimizer state {part!r} does not fit the model (keys, shapes or "
                             f"dtypes differ): a checkpoint of another model?")


def build_fusion(cfg: Config) -> Fusion:
    """The run's fusion from its Config: policy -> aggregator -> guard -> server optimizer."""
    return Fusion(PSEUDO_GRADIENTS[cfg.fusion], WEIGHT_POLICIES[cfg.weight_policy](cfg),
                  partial(AGGREGATORS[cfg.aggregator], cfg), build_optimizer(cfg), partial(server_lr, cfg),
                  cfg.update_norm_cap)
