"""Exact second-order MAML meta-gradient for ReLU MLPs with the MSE loss, written out by hand.

MAML (Finn et al. 2017) with SGD inner steps theta_{s+1} = theta_s - lr * g_s(theta_s) has the
meta-gradient of the query loss L_q(theta_S) given by the reverse recursion

    v_S = grad L_q(theta_S),   v_s = v_{s+1} - lr * H_s v_{s+1},   meta-gradient = v_0,

with H_s the (symmetric) Hessian of the support loss at theta_s. For a ReLU MLP both the gradients
and the Hessian-vector products have short closed forms: backprop, and Pearlmutter's R-operator
(Pearlmutter 1994, "Fast exact multiplication by the Hessian") on top of it (ReLU's second
derivative is zero almost everywhere, so only the linear layers and the loss contribute). Every
quantity is a batched matmul over the tasks, the forward activations of each inner step are kept
for its Hessian-vector product (no recomputation), and nothing runs through autograd, so the whole
meta-gradient is one plain graph that `torch.compile` turns into a few fused kernels.

This is the same function as `grad_and_value(MAML.meta_loss)` (tested equal in float64). It
registers itself (`registry`, path "mlp-closed-form") for second-order MAML with SGD inner steps on a
ReLU MLP with the MSE loss; `MAML.meta_gradient_fn` picks it there and uses the generic torch.func
path everywhere else. Device-agnostic: every tensor is made from the inputs' (no CPU constants).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import losses
from ..optim import Params
from ..tasks import Episode
from . import registry
from .base import Algorithm
from .maml import MAML

Layer = tuple[torch.Tensor, torch.Tensor]  # weight (out, in) or (tasks, out, in), bias (out,) or (tasks, out)
MetaGradient = Callable[[Params, Episode], tuple[Params, torch.Tensor]]


def mlp_layers(model: nn.Module) -> list[tuple[str, str]] | None:
    """(weight, bias) names of a Linear/ReLU/.../Linear `net` with biases, else None."""
    net = getattr(model, "net", None)
    if not isinstance(net, nn.Sequential) or len(net) % 2 == 0:
        return None
    names = []
    for i, m in enumerate(net):
        want = nn.Linear if i % 2 == 0 else nn.ReLU
        if type(m) is not want or (want is nn.Linear and m.bias is None):
            return None
        if want is nn.Linear:
            names.append((f"net.{i}.weight", f"net.{i}.bias"))
    if [n for n, _ in model.named_parameters()] != [n for pair in names for n in pair]:
        return None
    return names


def applies(algo) -> bool:
    """True where the registered path computes `algo`'s meta-gradient (`registry.why_not` says why not)."""
    return registry.why_not(PATH, algo) is None


def _forward(layers: list[Layer], x: torch.Tensor):
    """Outputs (tasks, n, out), inputs of every layer [(tasks, n, in)], ReLU masks [(tasks, n, hidden)].

    A weight is (out, in) while shared by all tasks (step 0: one matmul over tasks x shots) or
    (tasks, out, in) once adapted (a batched matmul).
    """
    acts, masks = [x], []
    for l, (w, b) in enumerate(layers):
        z = acts[-1] @ w.mT + b.unsqueeze(-2)  # (tasks, n, out_l)
        if l == len(layers) - 1:
            return z, acts, masks
        masks.append((z > 0).to(z.dtype))
        acts.append(z * masks[-1])


def _outer(d: torch.Tensor, a: torch.Tensor, summed: bool) -> torch.Tensor:
    """d^T a per task (tasks, out, in), or summed over tasks (out, in) as one matmul."""
    return d.flatten(0, 1).T @ a.flatten(0, 1) if summed else d.mT @ a


def _backward(layers: list[Layer], acts, masks, d: torch.Tensor):
    """Gradients [(dW, db)] given d = dL/d(output) (tasks, n, out); also dL/dz of every layer."""
    grads, dz = [], []
    for l in reversed(range(len(layers))):
        dz.append(d)
        grads.append((d.mT @ acts[l], d.sum(1)))  # (tasks, out, in), (tasks, out)
        if l > 0:
            d = (d @ layers[l][0]) * masks[l - 1]  # (tasks, n, in)
    return grads[::-1], dz[::-1]


def _hvp(layers: list[Layer], acts, masks, dz, v: list[Layer], curvature: float,
         summed: bool = False) -> list[Layer]:
    """H v for the loss whose gradient `_backward` computed (R-operator forward, then backward).

    `curvature` is d^2 L / d out^2 (2 / numel for the mean squared error); `summed` sums H v over
    the tasks (the last step back, where only the sum is needed).
    """
    r_acts = [None]  # R{input of layer l}; the data has none
    for l, ((w, _), (vw, vb)) in enumerate(zip(layers, v)):
        rz = acts[l] @ vw.mT + vb.unsqueeze(-2)  # (tasks, n, out_l)
        if l > 0:
            rz = rz + r_acts[l] @ w.mT
        if l < len(layers) - 1:
            r_acts.append(rz * masks[l])
    rd = rz * curvature  # R{dL/d out}
    out = []
    for l in reversed(range(len(layers))):
        hw = _outer(rd, acts[l], summed)  # (tasks, out, in) or (out, in)
        if l > 0:
            hw = hw + _outer(dz[l], r_acts[l], summed)
        out.append((hw, rd.sum((0, 1)) if summed else rd.sum(1)))
        if l > 0:
            rd = (rd @ layers[l][0] + dz[l] @ v[l][0]) * masks[l - 1]
    return out[::-1]


def mlp_meta_gradient(names: list[tuple[str, str]], steps: int, lr: float, fallback: MetaGradient,
                      ) -> MetaGradient:
    """(meta_params, episode) -> (meta-gradient, mean query loss) of second-order MAML.

    Inputs it was not written for (other parameter names, targets not shaped like the outputs)
    go to `fallback`, the generic path.
    """
    wanted = {n for pair in names for n in pair}

    def meta_gradient(meta_params: Params, episode: Episode) -> tuple[Params, torch.Tensor]:
        xs, ys, xq, yq = episode  # (tasks, shots, in), (tasks, shots, out), ...
        out_dim = meta_params[names[-1][1]].shape[0] if meta_params.keys() == wanted else None
        if out_dim is None or any(t.dim() != 3 for t in episode) or {ys.shape[2], yq.shape[2]} != {out_dim}:
            return fallback(meta_params, episode)
        tasks, support = xs.shape[0], ys[0].numel()
        with torch.no_grad():
            layers = [(meta_params[w], meta_params[b]) for w, b in names]  # shared: (out, in), (out,)
            kept = []
            for _ in range(steps):
                out, acts, masks = _forward(layers, xs)
                grads, dz = _backward(layers, acts, masks, (out - ys) * (2.0 / support))
                kept.append((layers, acts, masks, dz))
                layers = [(w - lr * gw, b - lr * gb) for (w, b), (gw, gb) in zip(layers, grads)]
            out, acts, masks = _forward(layers, xq)
            err = out - yq  # (tasks, query, out)
            loss = err.square().mean((1, 2)).mean()
            # v: gradient of the mean query loss w.r.t. each task's adapted parameters
            v, _ = _backward(layers, acts, masks, err * (2.0 / (err[0].numel() * tasks)))
            for s in reversed(range(steps)):
                first = s == 0  # theta_0 is shared: only the sum over tasks of v_0 is needed
                hv = _hvp(*kept[s], v, 2.0 / support, summed=first)
                if first:
                    v = [(vw.sum(0), vb.sum(0)) for vw, vb in v]
                v = [(vw - lr * hw, vb - lr * hb) for (vw, vb), (hw, hb) in zip(v, hv)]
        grads = {}
        for (w, b), (vw, vb) in zip(names, v):
            grads[w], grads[b] = vw, vb
        return grads, loss

    return meta_gradient


PATH = registry.register(registry.FastPath(
    name="mlp-closed-form", reference=MAML,
    computes=("meta_loss", "inner_state", "forward", "task_loss", "model_params"),
    rules={False: (Algorithm.inner_rule,)},  # second order, plain SGD at inner-lr
    loss=losses.mse, structure=mlp_layers,
    build=lambda algo, names, fallback: mlp_meta_gradient(names, algo.cfg.inner_steps, algo.cfg.inner_lr, fallback)))
