"""Server optimizers over the fused pseudo-gradient G, and round schedules for the rates.

The server treats G (the aggregated d_i: global - theta_i in "average" fusion, the meta-gradient
in "meta-gradient" fusion) as a gradient and steps the global model with it (Reddi et al. 2021,
"Adaptive Federated Optimization", Algorithm 2, where their Delta_t = -G):

- `SGD(momentum)`: x <- x - lr v, v <- momentum v + G (torch.optim.SGD's update). lr 1, momentum
  0 is plain averaging (x - (x - mean theta) = mean theta); lr < 1 interpolates towards the mean
  (Reptile's outer step, Nichol et al. 2018); momentum > 0 is FedAvgM (Hsu et al. 2019).
- `Adam`: `fedmeta.optim.adam_step` (Kingma & Ba 2015, WITH bias correction, as torch.optim.Adam
  and Flower's FedAdam), so that distributed MAML stays exactly central MAML.
- `Yogi`, `Adagrad`: Reddi et al. Algorithm 2 as written: m <- b1 m + (1 - b1) G;
  Yogi v <- v - (1 - b2) G^2 sign(v - G^2) (Zaheer et al. 2018), Adagrad v <- v + G^2;
  x <- x - lr m / (sqrt(v) + tau), v starting at tau^2, no bias correction.

Each optimizer is a frozen value with pure `init(params) -> state` and
`step(params, G, state, lr) -> (params, state)`; the state is plain ints and tensors (it travels in
checkpoints and loads with `torch.load(weights_only=True)`), inputs are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from fedmeta.config import Config
from fedmeta.optim import Params, adam_init, adam_step


class Optimizer(Protocol):
    name: str

    def init(self, params: Params) -> dict: ...
    def step(self, params: Params, grad: Params, state: dict, lr: float) -> tuple[Params, dict]: ...


def _zeros(params: Params, fill: float = 0.0) -> Params:
    return {k: torch.full_like(v, fill) for k, v in params.items()}


def _same_keys(params: Params, grad: Params) -> None:
    if set(grad) != set(params):
        raise ValueError(f"pseudo-gradient keys {sorted(grad)} differ from parameter keys {sorted(params)}")


@dataclass(frozen=True)
class SGD:
    """SGD with heavy-ball momentum over rounds (FedAvgM, Hsu et al. 2019); same update as
    torch.optim.SGD(lr, momentum) with dampening 0."""

    momentum: float = 0.0
    name: str = "sgd"

    def init(self, params: Params) -> dict:
        return {"step": 0, "momentum_buffer": _zeros(params)} if self.momentum else {"step": 0}

    @torch.no_grad()
    def step(self, params: Params, grad: Params, state: dict, lr: float) -> tuple[Params, dict]:
        _same_keys(params, grad)
        new_state = {"step": state["step"] + 1}
        if self.momentum:  # v <- momentum v + G (on the first step 0 * 0 + G = G, as torch)
            grad = {k: state["momentum_buffer"][k].mul(self.momentum).add_(grad[k]) for k in params}
            new_state["momentum_buffer"] = grad
        return {k: p.add(grad[k], alpha=-lr) for k, p in params.items()}, new_state


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba 2015) through `fedmeta.optim.adam_step`: today's "meta-gradient" server.
    lr 0 (a schedule's end) updates the moments and leaves the parameters, as torch does."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    name: str = "adam"

    def init(self, params: Params) -> dict:
        return adam_init(params)

    def step(self, params: Params, grad: Params, state: dict, lr: float) -> tuple[Params, dict]:
        new, state = adam_step(params, grad, state, lr if lr > 0 else 1.0, self.betas, self.eps)
        return (new if lr > 0 else dict(params)), state


class _Adaptive:
    """FedAdagrad / FedYogi (Reddi et al. 2021, Algorithm 2); subclasses say how v moves."""

    beta1: float
    tau: float

    def init(self, params: Params) -> dict:
        return {"step": 0, "m": _zeros(params), "v": _zeros(params, self.tau**2)}

    def second(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, params: Params, grad: Params, state: dict, lr: float) -> tuple[Params, dict]:
        _same_keys(params, grad)
        new, m_new, v_new = {}, {}, {}
        for k, p in params.items():
            g = grad[k]
            m = state["m"][k].mul(self.beta1).add_(g, alpha=1 - self.beta1)
            v = self.second(state["v"][k], g * g)
            new[k] = p.addcdiv(m, v.sqrt().add_(self.tau), value=-lr)
            m_new[k], v_new[k] = m, v
        return new, {"step": state["step"] + 1, "m": m_new, "v": v_new}


@dataclass(frozen=True)
class Adagrad(_Adaptive):
    """FedAdagrad: v <- v + G^2. With beta1 = 0 it is torch.optim.Adagrad(eps=tau,
    initial_accumulator_value=tau^2)."""

    beta1: float = 0.0
    tau: float = 1e-8
    name: str = "adagrad"

    def second(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        return v.add(g2)


@dataclass(frozen=True)
class Yogi(_Adaptive):
    """FedYogi (Zaheer et al. 2018): v <- v - (1 - b2) G^2 sign(v - G^2), so v moves additively and
    one large G cannot blow it up the way Adam's multiplicative forgetting lets it."""

    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    name: str = "yogi"

    def second(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        return v.sub(g2.mul((v - g2).sign()), alpha=1 - self.beta2)


OPTIMIZERS: dict[str, Callable[[Config], Optimizer]] = {
    "sgd": lambda c: SGD(c.server_momentum),
    "adam": lambda c: Adam((c.server_beta1, c.server_beta2), c.server_eps),
    "yogi": lambda c: Yogi(c.server_beta1, c.server_beta2, c.server_eps),
    "adagrad": lambda c: Adagrad(c.server_beta1, c.server_eps),
}


def build_optimizer(cfg: Config) -> Optimizer:
    """`server-optimizer` ("auto" resolved by the Config) with its betas / eps / momentum."""
    return OPTIMIZERS[cfg.resolved_server_optimizer](cfg)


# --- round schedules ---------------------------------------------------------------------------
def _constant(server_round: int, cfg: Config) -> float:
    return 1.0


def _step(server_round: int, cfg: Config) -> float:
    """x schedule-step-factor after every schedule-step-every rounds: rounds 1..E give 1."""
    return cfg.schedule_step_factor ** ((server_round - 1) // cfg.schedule_step_every)


def _cosine(server_round: int, cfg: Config) -> float:
    """Cosine annealing (Loshchilov & Hutter 2017) from 1 at round 1 to schedule-min-factor at
    round num-rounds: lo + (1 - lo) (1 + cos(pi t)) / 2, t = (round - 1) / (num-rounds - 1)."""
    if cfg.num_rounds <= 1:
        return 1.0
    t = min(max(server_round - 1, 0), cfg.num_rounds - 1) / (cfg.num_rounds - 1)
    lo = cfg.schedule_min_factor
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))


SCHEDULES: dict[str, Callable[[int, Config], float]] = {"constant": _constant, "step": _step, "cosine": _cosine}


def lr_factor(schedule: str, server_round: int, cfg: Config) -> float:
    """The factor on a base rate at `server_round` (1-based, absolute: a resumed run continues it)."""
    return SCHEDULES[schedule](server_round, cfg)


def client_lr_factor(cfg: Config, server_round: int) -> float:
    """The factor the strategy sends to the clients for their meta-learning rate this round."""
    return lr_factor(cfg.client_lr_schedule, server_round, cfg)


def server_lr(cfg: Config, server_round: int) -> float:
    """The server optimizer's rate this round: resolved server-lr x its schedule's factor."""
    return cfg.resolved_server_lr * lr_factor(cfg.server_lr_schedule, server_round, cfg)
