"""The algorithms, one per file, all pure functions over a parameter dict:

- `maml`: MAML, exact second order, any number of inner steps; `fomaml`: its first-order form
- `metasgd`: Meta-SGD, learned per-coordinate inner learning rates
- `reptile`: Reptile
- `lstm`: the coordinatewise LSTM meta-optimizer (Andrychowicz et al. 2016)
- `pretrain`: joint training without meta-learning on the episodes (the FedAvg baseline)
- `pretrain-global`: a classifier over the global classes, fine-tuned with a new head at test (Chen et
  al. 2019's "Baseline"; federated: FedAvg)
"""

from __future__ import annotations

from torch import nn

from ..config import Config
from . import fast, grouped  # noqa: F401  (the fast meta-gradient paths register themselves)
from .adapt import Evaluation, evaluate
from .base import Algorithm, NonFiniteLossError
from .maml import FOMAML, MAML
from .metasgd import MetaSGD
from .pretrain import Pretrain, PretrainGlobal
from .reptile import Reptile

REGISTRY: dict[str, type[Algorithm]] = {
    "maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD, "reptile": Reptile, "pretrain": Pretrain,
    "pretrain-global": PretrainGlobal,
}


def build(cfg: Config, model: nn.Module | None = None) -> Algorithm:
    """The algorithm named by `cfg.algorithm`, with the model of `cfg.task`."""
    if cfg.algorithm == "lstm" and "lstm" not in REGISTRY:
        from .lstm_optimizer import LSTMOptimizer  # registered lazily: keeps imports light

        REGISTRY["lstm"] = LSTMOptimizer
    return REGISTRY[cfg.algorithm](cfg, model)


__all__ = ["Algorithm", "Evaluation", "NonFiniteLossError", "build", "evaluate"]
