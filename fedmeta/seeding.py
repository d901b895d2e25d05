"""Deterministic seeds: every random stream is derived from the run seed and named keys.

A stream is `derive(seed, name, *keys)`: a name from `STREAMS`, then the variables that tell its
draws apart (a partition id, a round, an Adam step). Integer literals never appear as keys
(tests/test_seeding.py scans the repository): a new stream gets a name here. A name stands for the
ints that older code wrote out by hand, so that every stream keeps its numbers:

- an int or a tuple of ints is spliced in: ("lstm-starts", step) -> (seed, 1, 1_000_003, step);
- a `Shift(key, shift)` adds `shift` to the key that follows it (0 when none follows), the form
  `10**6 + round` once took: ("client-sampling", round) -> (seed, 1, 10**6 + round).

The ints are a `numpy.random.SeedSequence`'s entropy, so distinct key lists give independent streams.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch


class Shift(NamedTuple):
    """A stream spelled (key, shift + k) for the key k that follows its name."""

    key: int
    shift: int


STREAMS: dict[str, int | tuple[int, ...] | Shift] = {
    # --- the core and the Flower app ---------------------------------------------------------------
    "init": 0,  # initial meta-parameters (ServerApp, central runs)
    "train": 1,  # training tasks: (partition, round) of a client; a central run's task stream
    "eval": 2,  # a partition's fixed evaluation tasks: (partition)
    "server-eval": 3,  # the server's evaluation tasks on the whole family
    "partition": 4,  # which bin of the family's range each partition owns: (num_partitions)
    "test": 5,  # tests' draws
    "lstm-starts": (1, 1_000_003),  # LSTM meta-training: fresh optimizee starts of an Adam step: (step)
    "client-sampling": Shift(1, 10**6),  # the training partitions a round samples: (round)
    # sub-streams, named after the keys of a stream above
    "starts": 1,  # an evaluation's fresh optimizee starts: ("eval", partition, "starts"), ("server-eval", "starts")
    "training-bins": 1,  # the shuffle of the training partitions' bins: ("partition", num_partitions, "training-bins")
    # --- experiments and benchmarks (the ints they used before the names) -----------------------------
    "protocol-tasks": (5, 600),  # the evaluation protocol's tasks (fedmeta.lab)
    "protocol-adaptation": (5, 601),  # its adaptation draws (the LSTM's fresh optimizee starts)
    "central-validation": (2, 700),  # central Omniglot: validation tasks
    "central-test": (5, 700),  # central Omniglot: test tasks
    "fedavg-validation": (2, 800),  # federated Omniglot: tasks that tune the FedAvg models' fine-tuning
    "alone-clients": (4, 7),  # federated Omniglot: the training clients that also train alone
    "fedavg-global-init": (0, 3856),  # federated Omniglot: the global classifier's initialisation
    "lstm-validation": Shift(2, 900),  # LSTM experiments: validation problems: (repeat)
    "lstm-test": Shift(5, 900),  # LSTM experiments: test problems: (repeat)
    "lstm-validation-starts": Shift(2, 950),  # their optimizee starts: (repeat)
    "lstm-test-starts": Shift(5, 950),
    "quadratic-validation": (2, 1),  # LSTM on quadratics: validation problems and their starts
    "quadratic-test": (5, 1),  # LSTM on quadratics: test problems and their starts
}


def keys_of(*keys: int | str) -> list[int]:
    """The ints a key list stands for (names expanded by `STREAMS`)."""
    ints: list[int] = []
    shift = 0
    for k in keys:
        if isinstance(k, str):
            if k not in STREAMS:
                raise ValueError(f"unknown random stream {k!r}; name it in fedmeta.seeding.STREAMS "
                                 f"(known: {', '.join(STREAMS)})")
            if shift:
                ints.append(shift)  # a Shift followed by a name: as if followed by 0
            spec = STREAMS[k]
            shift = spec.shift if isinstance(spec, Shift) else 0
            ints.extend([spec.key] if isinstance(spec, Shift) else spec if isinstance(spec, tuple) else [spec])
        else:
            ints.append(shift + int(k))
            shift = 0
    if shift:
        ints.append(shift)
    return ints


def derive(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the stream named by `keys` (names from STREAMS, then variables)."""
    ints = [int(seed)] + keys_of(*keys)
    state = np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU torch.Generator seeded for the stream named by `keys` (CPU on every device: same numbers)."""
    return torch.Generator().manual_seed(derive(seed, *keys))


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (for code paths that do not take a generator)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
