"""What every algorithm shares: the task loss over a parameter dict, the inner update rule, and
the outer loop that turns meta-gradients into Adam steps on the meta-parameters."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .. import devices, losses, models
from ..config import Config
from ..optim import Params, adam_init, adam_step
from ..tasks import Episode, TaskSource, check_episode, families

# (meta_params, params, grads, state) -> (params, state); one update of a task's parameters.
InnerRule = Callable[[Params, Params, Params, Any], tuple[Params, Any]]
# (meta-gradient, loss, tasks) of this process's share of a meta-batch -> (meta-gradient, loss) of the
# whole meta-batch, combined with the other processes' (fedmeta.distributed; identity when None)
Reduce = Callable[[Params, float, int], tuple[Params, float]]


def take(episode: Episode, share: slice | None) -> Episode:
    """The tasks `share` of an episode (this process's share of a meta-batch); all of them for None."""
    return episode if share is None else Episode(*(t[share] for t in episode))


class NonFiniteLossError(FloatingPointError):
    """Meta-training produced a NaN/inf loss or gradient; no update was applied."""


class Algorithm:
    """A meta-learning algorithm: meta-parameters, their gradient on an episode, an inner rule."""

    name = "base"
    # Methods this class overrides without changing their values (logging, caching): the registered
    # fast meta-gradient paths that compute them still apply (`registry`).
    same_values: tuple[str, ...] = ()

    def __init__(self, cfg: Config, model: nn.Module | None = None) -> None:
        self.cfg = cfg
        self.device = devices.resolve(cfg.device)  # where training and evaluation run (fedmeta.local)
        model = model if model is not None else models.build(families.model_name(cfg), cfg)
        self.model = model.to(self.device)
        self.loss = losses.get(families.loss_name(cfg))
        self.classification = self.loss is losses.cross_entropy
        self._grad_fn: Callable[[Params, Episode], tuple[Params, torch.Tensor, torch.Tensor]] | None = None

    # --- pure pieces -------------------------------------------------------------------------
    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """One task's outputs: x (shots, *features) -> (shots, *outputs)."""
        return functional_call(self.model, params, (x,))

    def task_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.forward(params, x), y)

    def model_params(self, meta_params: Params) -> Params:
        """The model part of the meta-parameters (the initialisation the tasks adapt from)."""
        return {k: v for k, v in meta_params.items() if "/" not in k}

    def inner_rule(self) -> InnerRule:
        """Plain SGD with the configured inner learning rate."""
        lr = self.cfg.inner_lr

        def sgd(meta_params: Params, params: Params, grads: Params, state: Any) -> tuple[Params, Any]:
            return {k: p - lr * grads[k] for k, p in params.items()}, state

        return sgd

    def inner_state(self, params: Params) -> Any:
        return None

    def start_params(self, meta_params: Params, num_tasks: int,
                     generator: torch.Generator | None = None) -> Params:
        """Per-task starting parameters (tasks, ...): the learned initialisation, shared."""
        return {k: v.expand(num_tasks, *v.shape) for k, v in self.model_params(meta_params).items()}

    def init(self, generator: torch.Generator) -> Params:
        """Fresh meta-parameters on the CPU, seeded by `generator` (drawn on the CPU on every device)."""
        fresh = copy.deepcopy(self.model).cpu()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        return models.params_of(fresh)

    def draw(self, source: TaskSource, generator: torch.Generator) -> Episode:
        """One meta-batch of training tasks from `source` (on the CPU): meta-batch-size tasks of
        shots support and query-shots query examples."""
        return source.sample(self.cfg.meta_batch_size, self.cfg.shots, self.cfg.query_shots, generator)

    def meta_gradient_fn(self) -> Callable[[Params, Episode], tuple[Params, torch.Tensor]]:
        """A pure function (meta_params, episode) -> (meta-gradient, mean query loss)."""
        raise NotImplementedError(f"{self.name} has no one-step meta-gradient")

    # --- the outer loop --------------------------------------------------------------------------
    def check(self, episode: Episode) -> Episode:
        check_episode(episode)
        want = tuple(getattr(self.model, "input_shape", ()))
        if want and tuple(episode.support_x.shape[2:]) != want:
            raise ValueError(f"episode features {tuple(episode.support_x.shape[2:])} do not fit model "
                             f"{type(self.model).__name__}, which takes {want}")
        return episode

    def meta_gradient(self, meta_params: Params, episode: Episode) -> tuple[Params, float]:
        """Meta-gradient of the mean query loss on `episode`; raises on a non-finite result.

        Shapes are checked before the call. Finiteness (of the episode, the loss and the gradient)
        is one flag computed with the gradient, fused into the graph under `compile`: checking each
        tensor on its own costs more than the sinusoid meta-gradient itself. Only when the flag is
        down does the full `check` run, to name a non-finite episode tensor.
        """
        if self._grad_fn is None:
            fn = _with_finite_flag(self.meta_gradient_fn())
            self._grad_fn = torch.compile(fn, dynamic=False, options=COMPILE_OPTIONS) if self.cfg.compile else fn
        self.check(_shapes_only(episode))
        grads, loss, finite = self._grad_fn(meta_params, episode)
        value = float(loss)
        if not finite:
            self.check(episode)
            raise NonFiniteLossError(f"{self.name}: non-finite meta-loss {value} or meta-gradient; "
                                     "the update was not applied (lower inner-lr or meta-lr)")
        return grads, value

    def train(self, meta_params: Params, opt_state: dict | None,
              sample: Callable[[int], Episode], iterations: int, reduce: Reduce | None = None,
              share: slice | None = None, lr: float | None = None,
              correct: Callable[[Params], Params] | None = None) -> tuple[Params, dict, list[float]]:
        """`iterations` Adam steps (learning rate `lr`, default meta-lr) on meta-gradients of episodes
        `sample(i)`; returns the loss curve.

        Distributed (fedmeta.distributed): this process keeps the tasks `share` of each episode and
        `reduce` combines its meta-gradient and loss with the other processes' before the step.
        `correct`: maps each (reduced) meta-gradient to the one Adam steps (drift correction, fedmeta.drift)."""
        opt_state = adam_init(meta_params) if opt_state is None else opt_state
        lr = self.cfg.meta_lr if lr is None else lr
        curve = []
        for i in range(iterations):
            episode = take(sample(i), share)
            grads, loss = self.meta_gradient(meta_params, episode)
            if reduce is not None:
                grads, loss = reduce(grads, loss, episode.num_tasks)
            if correct is not None:
                grads = correct(grads)
            meta_params, opt_state = adam_step(meta_params, grads, opt_state, lr)
            curve.append(loss)
        return meta_params, opt_state, curve


# A C++ wrapper around the compiled kernels instead of Python: less overhead per call, which
# dominates small problems (benchmarks/maml_speed.py); costs a few seconds more compile time.
COMPILE_OPTIONS = {"cpp_wrapper": True}


def _with_finite_flag(fn: Callable[[Params, Episode], tuple[Params, torch.Tensor]]):
    """`fn` returning also one flag: every floating entry of the episode, loss and gradient is finite."""

    def fn_and_flag(meta_params: Params, episode: Episode) -> tuple[Params, torch.Tensor, torch.Tensor]:
        grads, loss = fn(meta_params, episode)
        parts = [t.reshape(-1) for t in (*episode, loss, *grads.values()) if t.is_floating_point()]
        return grads, loss, torch.isfinite(torch.cat(parts)).all()

    return fn_and_flag


def _shapes_only(episode: Episode) -> Episode:
    """Value-less stand-ins (bool, meta device) of the episode's tensors: `check` on them checks
    shapes only (it checks finiteness of floating tensors alone, which `_with_finite_flag` covers)."""
    if len(episode) != 4 or not all(isinstance(t, torch.Tensor) for t in episode):
        return episode
    return Episode(*(torch.empty(t.shape, dtype=torch.bool, device="meta") for t in episode))

