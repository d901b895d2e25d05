"""Use a shipped meta-model: adapt it to a new task's support set, then predict on the task's queries.

    model = fedmeta.load_meta_model("results/omniglot_central/maml-5way1shot.pt")
    learner = model.adapt(x, y, steps=3)        # x (shots, 1, 28, 28) float, y (shots,) labels 0..ways-1
    learner.predict(xq)                          # (queries,) predicted labels

Adaptation is the meta-model's own inner rule, the one its training and `fedmeta.algorithms.evaluate` use
(MAML, Finn et al. 2017, §2: "fast adaptation"): `steps` updates from the algorithm's starting
parameters on the support loss. MAML / first-order MAML / Reptile: plain SGD at the trained inner-lr from
the learned initialisation; Meta-SGD (Li et al. 2017): the learned per-coordinate rates; pretrain-global
(Chen et al. 2019's "Baseline"): the trained body with a zero `ways`-way head, the whole network
fine-tuned at inner-lr; the LSTM optimizer (Andrychowicz et al. 2016): its learned updates from a fresh
optimizee (seeded). The loop itself is `fedmeta.algorithms.maml.adapt` (the one MAML differentiates and
Reptile averages), with the start of `Algorithm.start_params`: nothing here is a second copy of it.

Shapes: x (shots, *features) with the model's features (Conv4: (1, 28, 28); the sinusoid MLP: (1,));
y (shots,) integer labels for a classifier, (shots, outputs) values for a regressor. Conv4's batch norm
normalises with the statistics of the batch it sees (MAML's transductive protocol), so predict a task's
whole query set in one call, as the evaluation does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import algorithms
from .algorithms import Algorithm
from .algorithms.maml import adapt as inner_loop
from .optim import Params

if TYPE_CHECKING:
    from .results import MetaModel


@dataclass(frozen=True)
class Learner:
    """A meta-model adapted to one task: the task's parameters after `steps` steps of the inner rule."""

    algorithm: Algorithm
    params: Params  # name -> tensor, one task's adapted parameters (no task dimension)
    steps: int

    @property
    def classification(self) -> bool:
        return self.algorithm.classification

    def outputs(self, x: Any) -> torch.Tensor:
        """The adapted model's raw outputs on x (queries, *features): (queries, ways) logits for a classifier,
        (queries, outputs) values for a regressor; on the CPU."""
        x = _inputs(self.algorithm, x, "x")
        with torch.no_grad():
            return self.algorithm.forward(self.params, x).cpu()

    def predict(self, x: Any) -> torch.Tensor:
        """Predictions on x (queries, *features): (queries,) int64 labels for a classifier (the arg-max
        class), (queries, outputs) values for a regressor."""
        out = self.outputs(x)
        return out.argmax(-1) if self.classification else out


def adapt(model: MetaModel, x: Any, y: Any, steps: int | None = None, *, device: str = "cpu",
          generator: torch.Generator | None = None) -> Learner:
    """Adapt `model` (`fedmeta.load_meta_model`) to the support set (x, y) with `steps` steps of its inner
    rule (default: the evaluation steps it was configured with, `eval-steps`). x (shots, *features),
    y (shots,) labels or (shots, outputs) values; arrays or tensors. `device`: where to adapt (a model
    trained on CUDA adapts on the CPU by default). `generator`: the LSTM optimizer's fresh optimizee start
    (default: its "eval" stream, as `fedmeta.algorithms.evaluate`). Bad shapes raise ValueError, naming
    the argument and the shape the model expects."""
    steps = model.config.eval_steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps = {steps!r}: must be an integer >= 0")
    # the model's own algorithm (its inner rule and start), on `device` whatever device it was trained on
    algo = algorithms.build(model.config.replace(device=device), model.module)
    x, y = _inputs(algo, x, "x"), _targets(algo, y, "y")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x holds {x.shape[0]} examples but y holds {y.shape[0]}: one target per example")
    meta = {k: v.detach().to(algo.device) for k, v in model.params.items()}
    with torch.no_grad():  # torch.func.grad inside still differentiates the support loss
        start = {k: v[0] for k, v in algo.start_params(meta, 1, generator).items()}  # one task: drop its dim
        params = inner_loop(algo, meta, start, x, y, steps)
    return Learner(algo, {k: v.detach() for k, v in params.items()}, steps)


# --- checking what a user passes ------------------------------------------------------------------------------
def _tensor(value: Any, name: str) -> torch.Tensor:
    try:
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name}: not an array ({type(value).__name__}: {err})") from None


def _inputs(algo: Algorithm, x: Any, name: str) -> torch.Tensor:
    """x (examples, *features) in the model's dtype, on its device; the features must be the model's."""
    x = _tensor(x, name)
    features = tuple(getattr(algo.model, "input_shape", ()))
    dtype = next(algo.model.parameters()).dtype
    if x.dim() != 1 + len(features) or (features and tuple(x.shape[1:]) != features) or x.shape[0] == 0:
        want = f"(examples, {', '.join(map(str, features))})" if features else "(examples, *features)"
        raise ValueError(f"{name} has shape {tuple(x.shape)}; this {type(algo.model).__name__} takes {want}, "
                         "at least one example")
    if not x.is_floating_point():  # e.g. uint8 images would silently be on another scale (ink 255, not 1)
        raise ValueError(f"{name} has dtype {x.dtype}; the model takes floating-point inputs (Omniglot images: "
                         "ink 1.0 on 0.0, as fedmeta.tasks.omniglot draws them)")
    x = x.to(algo.device, dtype)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values")
    return x


def _targets(algo: Algorithm, y: Any, name: str) -> torch.Tensor:
    """y (shots,) int64 labels in [0, ways) for a classifier; (shots, outputs) values for a regressor."""
    y = _tensor(y, name)
    if algo.classification:
        ways = algo.cfg.ways
        if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"{name} has shape {tuple(y.shape)} and dtype {y.dtype}; this classifier takes "
                             f"(shots,) integer labels in 0..{ways - 1}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= ways):
            raise ValueError(f"{name} holds labels {sorted(set(y.tolist()))}; this {ways}-way classifier takes "
                             f"labels in 0..{ways - 1}")
        return y.to(algo.device, torch.int64)
    outputs = _outputs(algo)
    if y.dim() != 2 or y.shape[1] != outputs:
        raise ValueError(f"{name} has shape {tuple(y.shape)}; this regressor takes (shots, {outputs}) values "
                         f"(a single target per example is y[:, None])")
    y = y.to(algo.device, next(algo.model.parameters()).dtype)
    if not torch.isfinite(y).all():
        raise ValueError(f"{name} holds non-finite values")
    return y


def _outputs(algo: Algorithm) -> int:
    """A regressor's outputs per example: its forward on one zero example."""
    features = tuple(getattr(algo.model, "input_shape", ()))
    params = algo.model_params({k: v.detach() for k, v in algo.model.named_parameters()})
    with torch.no_grad():
        probe = next(algo.model.parameters()).new_zeros(1, *features)
        return int(algo.forward(params, probe).shape[-1])


__all__ = ["Learner", "adapt"]
