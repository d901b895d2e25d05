"""(partition id, number of partitions, seed) -> a client's private task source: a dispatch to the
task family's module (`fedmeta.tasks.families`), which owns its partitioning.

- `partition = "non-iid"`: the family's `partition(cfg, partition_id, num_partitions)`: sinusoid a
  slice of amplitudes, quadratic a slice of the scale of W (the bins of `fedmeta.tasks.bins`: held-out
  partitions own interior slices), omniglot contiguous groups of alphabets (training partitions the
  30 background alphabets, held-out ones the 20 evaluation alphabets).
- `partition = "iid"`: every partition gets the whole family (held-out partitions the evaluation
  split: for omniglot, the meta-test characters).
The last `heldout-partitions` partitions never train: they measure personalization on tasks the
federation did not train on.
"""

from __future__ import annotations

from .config import Config
from .tasks import TaskSource, families
from .tasks.bins import bin_of, check

__all__ = ["bin_of", "check", "eval_source", "full_source", "is_heldout", "num_train_partitions", "task_source"]


def is_heldout(cfg: Config, partition_id: int, num_partitions: int) -> bool:
    check(partition_id, num_partitions)
    return partition_id >= num_partitions - cfg.heldout_partitions


def num_train_partitions(cfg: Config, num_partitions: int) -> int:
    return num_partitions - cfg.heldout_partitions


def full_source(cfg: Config) -> TaskSource:
    """The whole task family of the config (central training, server-side evaluation)."""
    return families.module(cfg.task).source(cfg, "train")


def eval_source(cfg: Config) -> TaskSource:
    """Fresh tasks for server-side evaluation: the whole family (omniglot: the meta-test split)."""
    return families.module(cfg.task).source(cfg, "test")


def task_source(cfg: Config, partition_id: int, num_partitions: int) -> TaskSource:
    """The private task source of one partition."""
    check(partition_id, num_partitions)
    if cfg.partition == "iid":
        return eval_source(cfg) if is_heldout(cfg, partition_id, num_partitions) else full_source(cfg)
    return families.module(cfg.task).partition(cfg, partition_id, num_partitions)
