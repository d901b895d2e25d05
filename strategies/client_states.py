"""Each partition's kept local optimizer state (keep-optimizer-state), held by the server: sent with the
partition's TRAIN message, replaced by its reply, stored in checkpoints (exact resume). The server does not
look inside: a state is the step and the reply's tensors (one packed array, `fedmeta.optim.pack_adam`).

Stored as one (rows, numel) buffer per tensor name, a row per partition in the order partitions were first
kept, so that a checkpoint is a few large tensors whatever the population. Kept as one small tensor per
partition and name, `torch.save` paid about 50 us per tensor: 0.6 ms per partition ever trained for the
sinusoid MLP (12 tensors), 0.36 s per round after 600 partitions and 6 s at 10 000, every round
(benchmarks/simulation_cost.py). Updating a round's rows costs what the round sampled, not the population.
"""

from __future__ import annotations

from typing import Any

import torch

from fedmeta import wire
from fedmeta.optim import Params


class ClientStates:
    """partition -> {"step": int, "tensors": {name: tensor}}, the same names, shapes and dtypes for all."""

    def __init__(self) -> None:
        self.rows: dict[int, int] = {}  # partition -> row of the buffers
        self.steps: list[int] = []  # row -> the kept Adam's step count
        self.buffers: dict[str, torch.Tensor] = {}  # name -> (capacity, numel), rows beyond len(steps) unused
        self.shapes: dict[str, torch.Size] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, partition: int) -> dict[str, Any] | None:
        """The partition's kept state (tensors are views of the buffers: copy before changing them)."""
        row = self.rows.get(partition)
        if row is None:
            return None
        return {"step": self.steps[row], "tensors": {k: b[row].view(self.shapes[k]) for k, b in self.buffers.items()}}

    def total(self) -> dict[str, torch.Tensor]:
        """name -> the sum over partitions of the kept tensors, flattened ((numel,), float64); {} when none."""
        n = len(self.steps)
        return {k: b[:n].to(torch.float64).sum(0) for k, b in self.buffers.items()} if n else {}

    def update(self, states: dict[int, dict[str, Any]]) -> None:
        """Keep these partitions' states (replacing earlier ones); every state has the same names, shapes and
        dtypes (the strategy checked them against the global model), else ValueError."""
        for partition, state in states.items():
            tensors = state["tensors"]
            if not self.buffers:
                self.shapes = {k: v.shape for k, v in tensors.items()}
                self.buffers = {k: torch.empty(0, v.numel(), dtype=v.dtype) for k, v in tensors.items()}
            if set(tensors) != set(self.buffers) or any(
                    v.shape != self.shapes[k] or v.dtype != self.buffers[k].dtype for k, v in tensors.items()):
                raise ValueError(f"partition {partition}: kept optimizer state "
                                 f"{ {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} } does not fit the "
                                 f"others' { {k: (tuple(s), self.buffers[k].dtype) for k, s in self.shapes.items()} }")
            row = self.rows.get(partition)
            if row is None:
                row = self.rows[int(partition)] = len(self.steps)
                self.steps.append(0)
                self._reserve(row + 1)
            self.steps[row] = int(state["step"])
            for k, b in self.buffers.items():
                b[row] = tensors[k].reshape(-1)

    def _reserve(self, rows: int) -> None:
        capacity = next(iter(self.buffers.values())).shape[0]
        if rows > capacity:  # grow geometrically: amortised O(1) copies per kept partition
            grown = max(rows, 2 * capacity, 16)
            for k, b in self.buffers.items():
                new = torch.empty(grown, b.shape[1], dtype=b.dtype)
                new[:capacity] = b
                self.buffers[k] = new

    def state_dict(self) -> dict[str, Any]:
        """{"partitions": (P,) int64 in row order, "steps": (P,) int64, "tensors": {name: (P, *shape)}}."""
        n = len(self.steps)
        return {"partitions": torch.tensor(list(self.rows), dtype=torch.int64),
                "steps": torch.tensor(self.steps, dtype=torch.int64),
                "tensors": {k: b[:n].clone().view(n, *self.shapes[k]) for k, b in self.buffers.items()}}

    def load_state_dict(self, states: dict[Any, Any]) -> None:
        """Restore `state_dict()`'s output, or the per-partition mapping of checkpoints written before the
        buffers, {partition: {"step", "tensors": {"exp_avg/<name>", "exp_avg_sq/<name>"}}}: those tensors
        concatenated in their stored order are the packed state the clients now send (`pack_adam`)."""
        self.__init__()
        if "partitions" not in states:
            self.update({int(p): {"step": s["step"], "tensors": {wire.OPTIMIZER: torch.cat(
                [v.reshape(-1) for v in s["tensors"].values()])}} for p, s in states.items()})
            return
        tensors: Params = states["tensors"]
        for row, (partition, step) in enumerate(zip(states["partitions"].tolist(), states["steps"].tolist(),
                                                    strict=True)):
            self.update({partition: {"step": step, "tensors": {k: v[row] for k, v in tensors.items()}}})
