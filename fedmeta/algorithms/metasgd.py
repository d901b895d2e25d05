"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning"): MAML whose inner update uses a learned learning rate per parameter coordinate,
theta' = theta - alpha * grad L. The rates alpha are meta-parameters ("alpha/<name>") trained with
their true gradient through the inner updates.
"""

from __future__ import annotations

from typing import Any

import torch

from ..optim import Params
from .base import InnerRule
from .maml import MAML

PREFIX = "alpha/"


class MetaSGD(MAML):
    name = "metasgd"

    def init(self, generator: torch.Generator) -> Params:
        params = super().init(generator)
        # alpha starts at the configured inner learning rate, one per coordinate.
        alphas = {PREFIX + k: torch.full_like(v, self.cfg.inner_lr) for k, v in params.items()}
        return {**params, **alphas}

    def inner_rule(self) -> InnerRule:
        def learned_sgd(meta_params: Params, params: Params, grads: Params, state: Any):
            return {k: p - meta_params[PREFIX + k] * grads[k] for k, p in params.items()}, state

        return learned_sgd
