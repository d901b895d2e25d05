"""Deterministic seeds: every random stream is derived from the run seed and named keys."""

from __future__ import annotations

import random

import numpy as np
import torch

STREAMS = {"init": 0, "train": 1, "eval": 2, "server-eval": 3, "partition": 4, "test": 5}


def derive(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the stream named by `keys` (ints, or names from STREAMS)."""
    ints = [int(seed)] + [STREAMS[k] if isinstance(k, str) else int(k) for k in keys]
    state = np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU torch.Generator seeded for the stream named by `keys`."""
    return torch.Generator().manual_seed(derive(seed, *keys))


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (for code paths that do not take a generator)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
