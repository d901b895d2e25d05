"""The task families: for each, one row naming the module that samples and partitions its tasks, its
loss and the model each kind of algorithm trains on it. Everything that needs "the model of this task"
or "the loss of this task" (the algorithms, `fedmeta.models.model_name`, saved meta-models) reads it here.

A family's module provides
- `source(cfg, split)`: "train" the whole family (central training), "test" fresh tasks for evaluation;
- `partition(cfg, partition_id, num_partitions)`: a partition's private source (`partition = "non-iid"`);
- classification families also `global_classes(cfg)`: the number of classes of the global label space
  (every class a training partition may own), for the classifier of `algorithm = "pretrain-global"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from types import ModuleType

from ..config import Config, ConfigError


@dataclass(frozen=True)
class Family:
    module: str  # fedmeta.tasks.<module>
    loss: str  # a name of fedmeta.losses
    models: dict[str, str]  # model role -> a name of fedmeta.models.build

    @property
    def classification(self) -> bool:
        return self.loss == "cross_entropy"


FAMILIES: dict[str, Family] = {
    "sinusoid": Family("sinusoid", "mse", {"learner": "mlp", "optimizee": "mlp"}),
    "quadratic": Family("quadratic", "sse", {"learner": "linear", "optimizee": "linear"}),
    "omniglot": Family("omniglot", "cross_entropy",
                       {"learner": "conv4", "optimizee": "optimizee", "global-classifier": "conv4-global"}),
}
# The role of an algorithm's model; every other algorithm learns the "learner" (an initialisation).
ROLES = {"lstm": "optimizee", "pretrain-global": "global-classifier"}


def family(task: str) -> Family:
    if task not in FAMILIES:
        raise ConfigError(f"task = {task!r}: no such task family; known: {', '.join(FAMILIES)}")
    return FAMILIES[task]


def module(task: str) -> ModuleType:
    """The family's module, imported on first use (omniglot pulls in numpy and PIL)."""
    return import_module(f"{__package__}.{family(task).module}")


def model_name(cfg: Config) -> str:
    """The model `cfg.algorithm` trains on `cfg.task` (the optimizee, for the LSTM meta-optimizer)."""
    role = ROLES.get(cfg.algorithm, "learner")
    models = family(cfg.task).models
    if role not in models:
        raise ConfigError(f"algorithm = {cfg.algorithm!r} needs a {role} model, which task = {cfg.task!r} "
                          f"does not have (it has: {', '.join(models)})")
    return models[role]


def loss_name(cfg: Config) -> str:
    return family(cfg.task).loss


def classification_tasks() -> list[str]:
    return [name for name, fam in FAMILIES.items() if fam.classification]


def global_classes(cfg: Config) -> int:
    """Classes of the family's global label space (classification families only)."""
    mod = module(cfg.task)
    if not hasattr(mod, "global_classes"):
        raise ConfigError(f"task = {cfg.task!r} has no classes: a global classifier needs a classification task")
    return mod.global_classes(cfg)
