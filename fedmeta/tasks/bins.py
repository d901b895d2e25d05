"""Partitions of a task family's range, shared by the families that cut a range into slices.

With `partition = "non-iid"` a family's main range is cut into `num_partitions` equal bins and each
partition owns one bin, assigned by a seeded permutation; held-out partitions (the last
`heldout-partitions`) draw from the interior bins only (never the first or last bin, when there are
enough training partitions), so the training partitions cover the family's whole range and
personalization is measured on unseen slices inside it rather than on extrapolation (an edge slice,
e.g. amplitudes 4.5-5 never seen in training, makes 10 adaptation steps at the trained inner rate
diverge).
"""

from __future__ import annotations

import functools

import torch

from .. import seeding
from ..config import Config


def check(partition_id: int, num_partitions: int) -> None:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id = {partition_id} is outside 0..{num_partitions - 1} "
                         f"(num-partitions = {num_partitions})")


def bin_of(cfg: Config, partition_id: int, num_partitions: int) -> int:
    """The bin of the family's range that this partition owns (a seeded permutation; held-out
    partitions get interior bins)."""
    check(partition_id, num_partitions)
    return assignment(cfg.seed, min(cfg.heldout_partitions, num_partitions), num_partitions)[partition_id]


@functools.lru_cache(maxsize=8)
def assignment(seed: int, heldout: int, num_partitions: int) -> tuple[int, ...]:
    """Every partition's bin, training partitions first. Memoised: a Ray worker that builds clients for
    many partitions of 10 000 draws the permutation once, not once per partition (3.4 ms each)."""
    perm = torch.randperm(num_partitions, generator=seeding.generator(seed, "partition", num_partitions))
    if num_partitions - heldout >= 2:  # enough training partitions to own both edges
        edges = [b for b in perm.tolist() if b in (0, num_partitions - 1)]
        interior = [b for b in perm.tolist() if b not in edges]
        bins = interior[:heldout]  # the held-out partitions' bins
        rest = edges + interior[heldout:]
        rest = [rest[i] for i in torch.randperm(len(rest), generator=seeding.generator(
            seed, "partition", num_partitions, "training-bins")).tolist()]
        perm = torch.tensor(rest + bins)  # training partitions first, held-out last
    return tuple(perm.tolist())


def owned(cfg: Config, bounds: tuple[float, float], partition_id: int, num_partitions: int) -> tuple[float, float]:
    """The slice of `bounds` = (lo, hi) that the partition owns: bin `bin_of` of `num_partitions`."""
    lo, hi = bounds
    index = bin_of(cfg, partition_id, num_partitions)
    width = (hi - lo) / num_partitions
    return lo + index * width, lo + (index + 1) * width
