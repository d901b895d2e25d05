"""Where the tensors of training and evaluation live: the run config's `device`.

`resolve` turns the key into a `torch.device` ("auto": CUDA when torch sees it, else the CPU) and
refuses CUDA that torch cannot see, naming the key; the ServerApp calls it at start-up so that a bad
`device` stops the run before any client works. Random draws stay on CPU generators whatever the
device (the same seed gives the same tasks and starts everywhere): tensors are drawn on the CPU and
then moved with `to`, and everything that leaves the core (replies, checkpoints, metrics) comes
back with `cpu`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .config import ConfigError


def resolve(name: str) -> torch.device:
    """"cpu", "cuda", "cuda:N" or "auto" -> the device; raises ConfigError for CUDA torch cannot see."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise ConfigError(f"device = {name!r}: must be 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r}, but torch sees no CUDA device (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda}); use device = 'cpu' or 'auto'")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device = {name!r}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def to(tree: Any, device: torch.device | str) -> Any:
    """Tensors of a nested dict / list / tuple (parameters, Adam states, episodes) on `device`;
    other leaves (step counts) as they are. Tensors already there are returned, not copied."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to(v, device) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a NamedTuple (Episode)
        return type(tree)(*(to(v, device) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(to(v, device) for v in tree)
    return tree


def cpu(tree: Any) -> Any:
    """`to(tree, "cpu")`: what leaves the core."""
    return to(tree, "cpu")
