"""SCAFFOLD's drift correction for local meta-training (Karimireddy et al. 2020, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning"), config `drift-correction = "scaffold"`.

On non-IID partitions (a slice of the sinusoids' amplitudes each) local meta-training drifts towards the
partition's own best initialisation, and the average of the drifted models is worse than what central
meta-learning reaches with the same meta-iterations. SCAFFOLD replaces each local meta-gradient g of
partition i by

    g - c_i + c

where c_i, partition i's control variate, estimates its own meta-gradient and c, the mean of the control
variates of all training partitions, the federation's: the corrected step follows the federation's
objective, not the partition's. The server keeps every c_i (strategies/controls.py) and sends each sampled
partition its correction c - c_i (zeros before a partition's first fused round, so round 1 is plain
FedMeta); the partition returns its new c_i: the mean of the uncorrected meta-gradients it computed this
round. That is SCAFFOLD's option I (the gradient at the received model) taken along the local steps
instead, which costs no extra meta-gradient; the local optimizer (Adam) steps the corrected gradient.
"""

from __future__ import annotations

import torch

from .optim import Params


class Corrected:
    """The gradient hook of `Algorithm.train`: returns g + correction, and sums the uncorrected g."""

    def __init__(self, correction: Params) -> None:
        self.correction = correction  # c - c_i, shaped like the meta-parameters
        self.total: Params | None = None
        self.count = 0

    def __call__(self, grads: Params) -> Params:
        if set(grads) != set(self.correction):
            raise ValueError(f"drift correction keys {sorted(self.correction)} differ from the meta-gradient's "
                             f"{sorted(grads)}")
        with torch.no_grad():
            if self.total is None:
                self.total = {k: g.detach().clone() for k, g in grads.items()}
            else:
                for k, g in grads.items():
                    self.total[k].add_(g)
            self.count += 1
            return {k: g + self.correction[k].to(g.device, g.dtype) for k, g in grads.items()}

    def control(self) -> Params:
        """The partition's new control variate: the mean uncorrected meta-gradient of the round."""
        if self.total is None:
            raise ValueError("no meta-gradient was corrected: the round had no local meta-iteration")
        return {k: v / self.count for k, v in self.total.items()}
