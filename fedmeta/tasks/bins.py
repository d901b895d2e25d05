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
    heldout = min(cfg.heldout_partitions, num_partitions)
    perm = torch.randperm(num_partitions, generator=seeding.generator(cfg.seed, "partition", num_partitions))
    if num_partitions - heldout >= 2:  # enough training partitions to own both edges
        edges = [b for b in perm.tolist() if b in (0, num_partitions - 1)]
        interior = [b for b in perm.tolist() if b not in edges]
        bins = interior[:heldout]  # the held-out partitions' bins
        rest = edges + interior[heldout:]
        rest = [rest[i] for i in torch.randperm(len(rest), generator=seeding.generator(
            cfg.seed, "partition", num_partitions, "training-bins")).tolist()]
        perm = torch.tensor(rest + bins)  # training partitions first, held-out last
    return int(perm[partition_id])


def owned(cfg: Config, bounds: tuple[float, float], partition_id: int, num_partitions: int) -> tuple[float, float]:
    """The slice of `bounds` = (lo, hi) that the partition owns: bin `bin_of` of `num_partitions`."""
    lo, hi = bounds
    index = bin_of(cfg, partition_id, num_partitions)
    width = (hi - lo) / num_partitions
    return lo + index * width, lo + (index + 1) * width
