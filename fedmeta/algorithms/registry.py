"""Fast meta-gradient paths, registered for what they compute; the generic `MAML.meta_gradient_fn`
asks here which one (if any) computes its meta-gradient.

A path is written for one meta-objective, that of a reference class (`MAML`: the mean over tasks of
the query loss after `inner-steps` updates from the model part of the meta-parameters), and
declares what it supports: the model structure (`structure(model)`: a description or None), the
loss, first or second order, the inner rules it implements, and the methods of the reference class
whose values it computes itself (`computes`). An algorithm keeps a path as long as it is an instance
of the reference class, its model, loss, order and inner rule are supported, and it does not override
a method in `computes`; overriding anything else (`init`, `train`, `name`, ...) changes nothing the
path computes. A subclass whose override of a computed method does not change its values (logging,
caching) says so by listing it in `Algorithm.same_values`.

`choose(algo)` returns the path and, for every registered path, why it does not apply;
`MAML.meta_gradient_fn` stores both on the algorithm (`meta_gradient_path`, `fast_path_reasons`) and
logs a warning when only overridden methods keep a MAML-family algorithm off a path that fits its
model and loss (the silent, slow and, for Conv4, less exact fallback this replaces).

Paths register themselves on import (`fast.py`, `grouped.py`; `fedmeta.algorithms` imports them), so
`maml.py` imports neither and nothing imports in a circle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..optim import Params
from ..tasks import Episode

MetaGradient = Callable[[Params, Episode], tuple[Params, torch.Tensor]]
LOG = logging.getLogger("fedmeta")


@dataclass(frozen=True)
class FastPath:
    name: str
    reference: type  # the class whose meta-objective the path computes
    computes: tuple[str, ...]  # methods of `reference` whose values the path computes itself
    rules: dict[bool, tuple[Callable, ...]]  # first_order -> the inner-rule methods it implements
    loss: Callable  # the loss it differentiates (a function of fedmeta.losses)
    structure: Callable[[nn.Module], Any]  # the model's structure as the path needs it, or None
    build: Callable[[Any, Any, MetaGradient], MetaGradient]  # (algo, structure, fallback) -> meta-gradient


PATHS: list[FastPath] = []


def register(path: FastPath) -> FastPath:
    """Add a path (once per name: re-importing a module replaces its entry)."""
    PATHS[:] = [p for p in PATHS if p.name != path.name] + [path]
    return path


def why_not(path: FastPath, algo) -> str | None:
    """None when `path` computes `algo`'s meta-gradient, else the reason it does not."""
    cls = type(algo)
    if not isinstance(algo, path.reference):
        return f"{cls.__name__} is not a {path.reference.__name__}"
    if algo.loss is not path.loss:
        return f"the loss is not {path.loss.__name__}"
    if algo.cfg.inner_steps < 1:
        return "inner-steps = 0"
    first_order = bool(getattr(algo, "first_order", False))
    if cls.inner_rule not in path.rules.get(first_order, ()):
        order = "first" if first_order else "second"
        return f"{cls.__qualname__}.inner_rule is not an inner rule it implements at {order} order"
    if path.structure(algo.model) is None:
        return f"the model {type(algo.model).__name__} does not have the structure it is written for"
    same = set(getattr(cls, "same_values", ()))
    changed = [m for m in path.computes if getattr(cls, m) is not getattr(path.reference, m) and m not in same]
    if changed:
        return (f"{cls.__qualname__} overrides {', '.join(changed)}, whose values the path computes itself "
                f"(list a method in {cls.__name__}.same_values if its override does not change its values)")
    return None


def choose(algo) -> tuple[FastPath | None, dict[str, str]]:
    """The first registered path that computes `algo`'s meta-gradient, and why each other one does not."""
    reasons: dict[str, str] = {}
    for path in PATHS:
        reason = why_not(path, algo)
        if reason is None:
            return path, reasons
        reasons[path.name] = reason
    return None, reasons


def meta_gradient_fn(algo, generic: MetaGradient) -> MetaGradient:
    """The fast path's meta-gradient for `algo` (falling back to `generic` on inputs it was not written
    for), or `generic`; records the choice on `algo.meta_gradient_path` and `algo.fast_path_reasons`."""
    path, reasons = choose(algo)
    algo.meta_gradient_path, algo.fast_path_reasons = (path.name if path else "generic"), reasons
    if path is not None:
        return path.build(algo, path.structure(algo.model), generic)
    overridden = {n: r for n, r in reasons.items() if " overrides " in r}
    if overridden:
        LOG.warning("%s: generic meta-gradient (slower%s): %s", type(algo).__qualname__,
                    ", and less exact for Conv4" if "conv4-grouped" in overridden else "",
                    "; ".join(f"{n}: {r}" for n, r in overridden.items()))
    return generic
