"""The coordinatewise LSTM meta-optimizer of Andrychowicz et al. 2016, "Learning to learn by
gradient descent by gradient descent" (NeurIPS 2016).

One small two-layer LSTM (20 units per layer) is shared by every coordinate of the optimizee: each
coordinate feeds its own preprocessed gradient in and carries its own hidden and cell state, and a
linear head reads out that coordinate's update (§2.1, Figure 3). Sign convention (the paper's, Eq. 1):

    theta_t = theta_{t-1} + g_t,   g_t = output_scale * (w_out . h_t + b_out)

so the LSTM has to learn the descent direction itself. Gradients are preprocessed as in the paper's
appendix A with p = lstm-preprocess-p:

    |g| >= e^-p:  (log|g| / p, sign g)          else:  (-1, e^p g)

The meta-parameters are a flat dict of "lstm/..." tensors (the "/" keeps them out of
`Algorithm.model_params`); the LSTM learns no initialisation, so `start_params` draws fresh optimizee
parameters per task. Meta-training (§2, §3) runs a batch of problems for lstm-horizon steps with
truncated back-propagation through time: the meta-loss of an unroll is the sum of the optimizee's
losses after each of its lstm-unroll updates (w_t = 1), the optimizee gradients fed to the LSTM are
constants (no second derivatives, "dropping the dashed edges" of Figure 2), one Adam step on the
LSTM per unroll, and the optimizee parameters and LSTM state are carried, detached, to the next
unroll. The meta-loss uses the support set (the optimizee's own training loss, as in the paper);
for quadratic problems support == query == the problem.

Everything below the class is pure tensor code over parameter dicts, valid for any leading batch
dimensions, so `torch.func.vmap` over tasks and `torch.func.grad` over the LSTM apply directly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch.func import grad, vmap

from .. import models, seeding
from ..optim import Params, adam_init, adam_step
from ..tasks import Episode
from .base import Algorithm, InnerRule, NonFiniteLossError, Reduce, take

PREFIX = "lstm/"
QUADRATIC_INIT_STD = 0.01  # theta_0 ~ N(0, 0.01^2), as the quadratic problem of the paper's code
State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (layers, coordinates, hidden)


# --- pure functions ------------------------------------------------------------------------------
def preprocess(g: torch.Tensor, p: float) -> torch.Tensor:
    """The log/sign gradient preprocessing (appendix A): g (...) -> (..., 2)."""
    big = g.abs() >= math.exp(-p)
    # clamp keeps log finite where the small branch is taken (its value is discarded there)
    log_part = torch.where(big, g.abs().clamp_min(math.exp(-p)).log() / p, torch.full_like(g, -1.0))
    sign_part = torch.where(big, torch.sign(g), math.exp(p) * g)
    return torch.stack([log_part, sign_part], -1)


def lstm_cell(w_ih: torch.Tensor, w_hh: torch.Tensor, b: torch.Tensor, x: torch.Tensor,
              h: torch.Tensor, c: torch.Tensor) -> State:
    """One LSTM layer for a batch of independent coordinates.

    w_ih (4H, in), w_hh (4H, H), b (4H,); x (..., in), h, c (..., H). Gate order i, f, g, o.
    """
    gates = x @ w_ih.T + h @ w_hh.T + b  # (..., 4H)
    i, f, cand, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cand)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def lstm_update(lstm: Params, g: torch.Tensor, state: State, p: float, scale: float) -> tuple[torch.Tensor, State]:
    """The update of each coordinate from its gradient: g (coordinates,) -> (coordinates,), new state.

    state: (h, c), each (layers, coordinates, hidden); coordinate j only ever sees g[j], h[:, j], c[:, j].
    """
    h_all, c_all = state
    x = preprocess(g, p)  # (coordinates, 2)
    hs, cs = [], []
    for layer in range(h_all.shape[0]):
        h, c = lstm_cell(lstm[f"{PREFIX}{layer}/w_ih"], lstm[f"{PREFIX}{layer}/w_hh"], lstm[f"{PREFIX}{layer}/b"],
                         x, h_all[layer], c_all[layer])
        hs.append(h)
        cs.append(c)
        x = h  # (coordinates, hidden): the next layer's input
    out = x @ lstm[PREFIX + "out/w"].T + lstm[PREFIX + "out/b"]  # (coordinates, 1)
    return scale * out.squeeze(-1), (torch.stack(hs), torch.stack(cs))


def flatten(tensors: Params, keys: list[str]) -> torch.Tensor:
    """All coordinates of a parameter dict as one vector, in the order of `keys`."""
    return torch.cat([tensors[k].reshape(-1) for k in keys])


def unflatten(flat: torch.Tensor, like: Params) -> Params:
    out, start = {}, 0
    for k, v in like.items():
        out[k] = flat[start:start + v.numel()].reshape(v.shape)
        start += v.numel()
    return out


# --- the algorithm --------------------------------------------------------------------------------
class LSTMOptimizer(Algorithm):
    """Andrychowicz et al. 2016: a learned, coordinatewise LSTM optimizer (see the module docstring)."""

    name = "lstm"

    def meta_keys(self) -> list[str]:
        keys = []
        for layer in range(self.cfg.lstm_layers):
            keys += [f"{PREFIX}{layer}/w_ih", f"{PREFIX}{layer}/w_hh", f"{PREFIX}{layer}/b"]
        return keys + [PREFIX + "out/w", PREFIX + "out/b"]

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def init(self, generator: torch.Generator) -> Params:
        """LSTM weights ~ U(-1/sqrt(H), 1/sqrt(H)) (torch.nn.LSTM's rule), forget-gate bias 1 (as
        Sonnet's LSTM, used by the paper's code), output weights likewise uniform and bias 0."""
        hidden, dtype = self.cfg.lstm_hidden, self._dtype()
        bound = 1.0 / math.sqrt(hidden)

        def uniform(*shape: int) -> torch.Tensor:
            return ((2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1) * bound).to(dtype)

        meta: Params = {}
        for layer in range(self.cfg.lstm_layers):
            fan_in = 2 if layer == 0 else hidden  # layer 0 reads the 2 preprocessed features
            meta[f"{PREFIX}{layer}/w_ih"] = uniform(4 * hidden, fan_in)
            meta[f"{PREFIX}{layer}/w_hh"] = uniform(4 * hidden, hidden)
            b = uniform(4 * hidden)
            b[hidden:2 * hidden] += 1.0  # forget gate
            meta[f"{PREFIX}{layer}/b"] = b
        meta[PREFIX + "out/w"] = uniform(1, hidden)
        meta[PREFIX + "out/b"] = torch.zeros(1, dtype=dtype)
        return meta

    def check_meta(self, meta_params: Params) -> Params:
        want = set(self.meta_keys())
        if set(meta_params) != want:
            raise ValueError(f"lstm meta-parameters: missing {sorted(want - set(meta_params))}, "
                             f"unexpected {sorted(set(meta_params) - want)} (lstm-layers = {self.cfg.lstm_layers})")
        return meta_params

    # --- the inner rule: theta_t = theta_{t-1} + LSTM(preprocessed grad) ---------------------------
    def inner_state(self, params: Params) -> State:
        """Zero (h, c), each (layers, coordinates, hidden), for one task's unbatched params."""
        coords = sum(v.numel() for v in params.values())
        v = next(iter(params.values()))
        shape = (self.cfg.lstm_layers, coords, self.cfg.lstm_hidden)
        return torch.zeros(shape, dtype=v.dtype, device=v.device), torch.zeros(shape, dtype=v.dtype, device=v.device)

    def inner_rule(self) -> InnerRule:
        p, scale = self.cfg.lstm_preprocess_p, self.cfg.lstm_output_scale

        def rule(meta_params: Params, params: Params, grads: Params, state: State) -> tuple[Params, State]:
            keys = list(params)
            step, state = lstm_update(meta_params, flatten(grads, keys), state, p, scale)
            return {k: params[k] + d for k, d in unflatten(step, params).items()}, state

        return rule

    def start_params(self, meta_params: Params, num_tasks: int,
                     generator: torch.Generator | None = None) -> Params:
        """Fresh optimizee parameters per task, (tasks, ...); the LSTM learns no initialisation.

        Quadratics: theta_0 ~ N(0, 0.01^2) per coordinate (the paper's code). Other tasks: the model's
        own default initialisation, drawn independently per task. Without a generator the "eval"
        stream of cfg.seed is used, so evaluation is reproducible. Drawn on the CPU (the same numbers on
        every device), returned on the algorithm's device.
        """
        generator = generator if generator is not None else seeding.generator(self.cfg.seed, "eval")
        shapes = {k: v.shape for k, v in self.model.named_parameters()}
        dtype = self._dtype()
        if self.cfg.task == "quadratic":
            return {k: (QUADRATIC_INIT_STD * torch.randn((num_tasks, *s), generator=generator, dtype=dtype)
                        ).to(self.device) for k, s in shapes.items()}
        seeds = torch.randint(2**62, (num_tasks,), generator=generator).tolist()
        fresh, per_task = copy.deepcopy(self.model).cpu(), []
        for s in seeds:  # re-initialisation only; no optimisation happens here
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                for module in fresh.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
            per_task.append(models.params_of(fresh))
        return {k: torch.stack([t[k] for t in per_task]).to(self.device, dtype) for k in shapes}

    # --- meta-training: truncated BPTT ----------------------------------------------------------------
    def unroll_fn(self) -> Callable[[Params, Params, State, Episode], tuple[Params, tuple]]:
        """A pure function (lstm, params, state, episode) -> (meta-gradient, (losses, params, state)).

        params: name -> (tasks, ...), state: (h, c) each (tasks, layers, coordinates, hidden).
        losses (tasks, unroll): optimizee loss after each update. The meta-loss is the mean over tasks
        of the sum of these; the returned params and state carry no graph (truncation).
        """
        rule, steps = self.inner_rule(), self.cfg.lstm_unroll

        def one_task(lstm, params, state, x, y):
            losses = []
            for _ in range(steps):
                # the optimizee gradient is an input, not a function of the LSTM: no 2nd derivatives
                g = grad(self.task_loss)({k: v.detach() for k, v in params.items()}, x, y)
                params, state = rule(lstm, params, g, state)
                losses.append(self.task_loss(params, x, y))
            return torch.stack(losses), params, state  # (unroll,)

        def meta_loss(lstm, params, state, episode):
            losses, params, state = vmap(one_task, in_dims=(None, 0, 0, 0, 0))(
                lstm, params, state, episode.support_x, episode.support_y)  # losses (tasks, unroll)
            return losses.sum(1).mean(), (losses, params, state)

        def unroll(lstm, params, state, episode):
            grads, (losses, params, state) = grad(meta_loss, has_aux=True)(lstm, params, state, episode)
            detached = {k: v.detach() for k, v in params.items()}
            return grads, (losses.detach(), detached, (state[0].detach(), state[1].detach()))

        return unroll

    def train(self, meta_params: Params, opt_state: dict | None,
              sample: Callable[[int], Episode], iterations: int, reduce: Reduce | None = None,
              share: slice | None = None, lr: float | None = None,
              correct: Callable[[Params], Params] | None = None) -> tuple[Params, dict, list[float]]:
        """`iterations` batches of problems, each optimised for lstm-horizon steps with one Adam step
        (`lr`, default meta-lr) per unroll of lstm-unroll steps. The curve holds, per iteration, the mean over
        tasks and horizon steps of the optimizee loss. Fresh optimizee starts are seeded by
        (cfg.seed, Adam step count), so repeated calls continue the stream deterministically.
        `reduce`, `share`: as `Algorithm.train` (the starts are drawn for the whole batch, then shared)."""
        if correct is not None:  # Config refuses drift-correction with algorithm = 'lstm'
            raise ValueError("the LSTM optimizer's unrolled steps take no drift correction")
        self.check_meta(meta_params)
        opt_state = adam_init(meta_params) if opt_state is None else opt_state
        lr = self.cfg.meta_lr if lr is None else lr
        unroll = self.unroll_fn()
        curve = []
        for i in range(iterations):
            episode = self.check(sample(i))
            gen = seeding.generator(self.cfg.seed, "lstm-starts", int(opt_state["step"]))
            params = self.start_params(meta_params, episode.num_tasks, gen)  # name -> (tasks, ...)
            if share is not None:  # this process's tasks, with the starts drawn for the whole batch
                episode, params = take(episode, share), {k: v[share] for k, v in params.items()}
            state = vmap(self.inner_state)(params)
            total = 0.0
            for _ in range(self.cfg.lstm_horizon // self.cfg.lstm_unroll):
                grads, (losses, params, state) = unroll(meta_params, params, state, episode)
                value = float(losses.mean())
                if reduce is not None:  # before the check: a non-finite share makes every process raise
                    grads, value = reduce(grads, value, episode.num_tasks)
                if not math.isfinite(value) or not all(torch.isfinite(g).all() for g in grads.values()):
                    raise NonFiniteLossError(f"lstm: non-finite optimizee loss {value} or meta-gradient at "
                                             f"iteration {i}; the update was not applied (lower meta-lr, "
                                             "lstm-output-scale or the problem scale)")
                meta_params, opt_state = adam_step(meta_params, grads, opt_state, lr)
                total += value
            curve.append(total / (self.cfg.lstm_horizon // self.cfg.lstm_unroll))
        return meta_params, opt_state, curve

