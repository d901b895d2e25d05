"""(partition id, number of partitions, seed) -> a client's private, non-IID task source.

With `partition = "non-iid"` the family's main range is cut into `num_partitions` equal bins and
each partition owns one bin, assigned by a seeded permutation; held-out partitions draw from the
interior bins only (never the first or last bin, when there are enough), so the training partitions
cover the family's whole range and personalization is measured on unseen slices inside it rather
than on extrapolation (an edge slice, e.g. amplitudes 4.5-5 never seen in training, makes
10 adaptation steps at the trained inner rate diverge):
- sinusoid: a slice of amplitudes (phases and x keep the full range);
- quadratic: a slice of the scale of W;
- omniglot: contiguous groups of alphabets instead: training partitions share the 30 background
  alphabets, held-out partitions the 20 evaluation alphabets (see `fedmeta.tasks.omniglot`).
`partition = "iid"` gives every partition the full family (for omniglot: held-out partitions get
the meta-test characters). The last `heldout-partitions`
partitions never train: they measure personalization on tasks the federation did not train on.
"""

from __future__ import annotations

import torch

from . import seeding
from .config import Config
from .tasks import TaskSource
from .tasks.quadratic import QuadraticTasks
from .tasks.sinusoid import SinusoidTasks


def check(partition_id: int, num_partitions: int) -> None:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id = {partition_id} is outside 0..{num_partitions - 1} "
                         f"(num-partitions = {num_partitions})")


def is_heldout(cfg: Config, partition_id: int, num_partitions: int) -> bool:
    check(partition_id, num_partitions)
    return partition_id >= num_partitions - cfg.heldout_partitions


def num_train_partitions(cfg: Config, num_partitions: int) -> int:
    return num_partitions - cfg.heldout_partitions


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
            cfg.seed, "partition", num_partitions, 1)).tolist()]
        perm = torch.tensor(rest + bins)  # training partitions first, held-out last
    return int(perm[partition_id])


def _slice(lo: float, hi: float, index: int, count: int) -> tuple[float, float]:
    width = (hi - lo) / count
    return lo + index * width, lo + (index + 1) * width


def full_source(cfg: Config) -> TaskSource:
    """The whole task family of the config (central training, server-side evaluation)."""
    if cfg.task == "sinusoid":
        return SinusoidTasks((cfg.amplitude_min, cfg.amplitude_max), (cfg.phase_min, cfg.phase_max),
                             (cfg.x_min, cfg.x_max))
    if cfg.task == "quadratic":
        return QuadraticTasks(cfg.quadratic_dim, (cfg.quadratic_scale_min, cfg.quadratic_scale_max))
    from .tasks import omniglot

    return omniglot.source(cfg, split="train")


def eval_source(cfg: Config) -> TaskSource:
    """Fresh tasks for server-side evaluation: the whole family (omniglot: the meta-test split)."""
    if cfg.task == "omniglot":
        from .tasks import omniglot

        return omniglot.source(cfg, split="test")
    return full_source(cfg)


def task_source(cfg: Config, partition_id: int, num_partitions: int) -> TaskSource:
    """The private task source of one partition."""
    check(partition_id, num_partitions)
    if cfg.partition == "iid":
        return eval_source(cfg) if is_heldout(cfg, partition_id, num_partitions) else full_source(cfg)
    b = bin_of(cfg, partition_id, num_partitions)
    if cfg.task == "sinusoid":
        return SinusoidTasks(_slice(cfg.amplitude_min, cfg.amplitude_max, b, num_partitions),
                             (cfg.phase_min, cfg.phase_max), (cfg.x_min, cfg.x_max))
    if cfg.task == "quadratic":
        return QuadraticTasks(cfg.quadratic_dim,
                              _slice(cfg.quadratic_scale_min, cfg.quadratic_scale_max, b, num_partitions))
    from .tasks import omniglot

    return omniglot.partition_source(cfg, partition_id, num_partitions)
