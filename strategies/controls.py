"""SCAFFOLD's control variates on the server (`drift-correction = "scaffold"`; the math: fedmeta/drift.py).

The server keeps each training partition's control variate c_i (the mean uncorrected meta-gradient of its
last fused round) in a `ClientStates` store, and at the start of a round the federation's c = (1/N) sum_i c_i
over the N training partitions, those never trained counting as zero (SCAFFOLD's c, which the paper updates
incrementally by |S|/N x the mean change). A sampled partition's TRAIN message carries c - c_i; its reply
carries its new c_i, checked like the model (keys, shapes, dtypes, finite, size before unpacking) and kept
only when the round fuses, like the kept optimizer state. Stored in checkpoints: a resumed run continues
with the same corrections.

`NoControls` is the same seam when drift-correction = "none": it sends and keeps nothing, so the strategy
needs no branch.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict

from clients.records import to_record
from fedmeta import wire
from fedmeta.config import Config
from fedmeta.optim import Params

from .client_states import ClientStates
from .fusion import Rejected, read_checked


class NoControls:
    """drift-correction = "none"."""

    def begin_round(self, params: Params, num_training: int) -> None:
        pass

    def outgoing(self, partition: int) -> dict[str, ArrayRecord]:
        return {}

    def parse(self, content: RecordDict, params: Params) -> Params | None:
        return None

    def keep(self, controls: dict[int, Params], server_round: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


class ControlVariates(NoControls):
    """drift-correction = "scaffold": partition -> c_i, and this round's c."""

    def __init__(self) -> None:
        self.store = ClientStates()  # "step": the round that computed c_i; "tensors": c_i, shaped like params
        self.mean: Params = {}  # this round's c (float64)
        self.dtypes: dict[str, torch.dtype] = {}

    def begin_round(self, params: Params, num_training: int) -> None:
        """c for the round's messages: the stored c_i summed (in float64) over N = `num_training`."""
        total = self.store.total()
        self.dtypes = {k: v.dtype for k, v in params.items()}
        self.mean = {k: total[k].to(torch.float64).view(v.shape) / max(1, num_training) if total
                     else torch.zeros(v.shape, dtype=torch.float64) for k, v in params.items()}

    def correction(self, partition: int) -> Params:
        """c - c_i for the partition (c_i = 0 before its first fused round), in the model's dtypes."""
        kept = self.store.get(partition)
        own = {} if kept is None else kept["tensors"]
        return {k: (c - own[k].to(torch.float64) if k in own else c).to(self.dtypes[k]) for k, c in self.mean.items()}

    def outgoing(self, partition: int) -> dict[str, ArrayRecord]:
        return {wire.CORRECTION: to_record(self.correction(partition))}

    def parse(self, content: RecordDict, params: Params) -> Params:
        """The reply's new c_i, or `Rejected` (a drift-corrected reply must carry one)."""
        if wire.CONTROL not in content.array_records:
            raise Rejected(f"reply lacks the {wire.CONTROL!r} arrays that drift-correction = 'scaffold' needs")
        return read_checked(content.array_records[wire.CONTROL], params)  # the model's keys, shapes, dtypes; finite

    def keep(self, controls: dict[int, Params], server_round: int) -> None:
        self.store.update({p: {"step": server_round, "tensors": c} for p, c in controls.items()})

    def state_dict(self) -> dict[str, Any]:
        return self.store.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.store = ClientStates()
        if state is not None:
            self.store.load_state_dict(state)


def build_controls(cfg: Config) -> NoControls:
    return ControlVariates() if cfg.drift_correction == "scaffold" else NoControls()
