"""MAML / FOMAML / Meta-SGD meta-gradients for the Conv4 classifier, all tasks of a meta-batch at once.

MAML's Omniglot network (Finn, Abbeel & Levine 2017, §5.2; `models.Conv4`) is four blocks of a 3x3
stride-2 convolution, batch norm with the statistics of the batch (per task) and ReLU, then the
spatial mean and a linear head. After an inner step every task has its own weights, so the
convolutions of a meta-batch are per-task products: here each is an im2col followed by one batched
matmul over the tasks, activations laid out task-major and channels-last, `(tasks, images, H, W, C)`:

    cols (tasks, images * Ho * Wo, 9 * C)  @  weights (tasks, 9 * C, out)  ->  (tasks, images * Ho * Wo, out)

The per-task inner gradients come from one `torch.autograd.grad` of the summed support losses with
respect to the meta-parameters expanded to `(tasks, ...)` (each task's loss depends only on its own
slice), `create_graph=True` for second order. The query loss is then differentiated at the adapted
parameters alone (first order, detached), giving v = dL_query / d theta'_t, and the meta-gradient is
v pulled back through the inner steps: one double-backward through the support graph, with
`grad_outputs=v` (the same reverse recursion as `fast.py`). Tasks are processed in chunks so that
activations stay in cache; the chunks' meta-gradients are summed.

Batch norm and ReLU are one autograd function whose backward is written out (and is itself
differentiable, for the double-backward of second order); its sums over rows are cascade sums, not
torch's channels-last batch-norm kernel, whose float32 error grows with the rows (`_per_task_batch_norm`).
A convolution's bias is followed by batch
norm over batch statistics, which subtracts it again: its meta-gradient is 0 up to rounding.
`conv_bias=False` skips it (exactly 0 then, a few % faster); by default it is computed like every
other parameter, so the numbers are those of the per-task autograd loop, rounding included.

Equal to the per-task autograd loop and to finite differences (tests/test_grouped.py, float64).
It registers itself (`registry`, path "conv4-grouped") for MAML, FOMAML and Meta-SGD on a Conv4 with
the cross-entropy loss; `MAML.meta_gradient_fn` picks it there; speed: benchmarks/omniglot_speed.py.
Device-agnostic: every tensor is made from the inputs' (no CPU constants).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..models import Conv4
from ..optim import Params
from ..tasks import Episode
from . import registry
from .base import Algorithm
from .maml import MAML
from .metasgd import MetaSGD

MetaGradient = Callable[[Params, Episode], tuple[Params, torch.Tensor]]
Block = tuple[str, str, float]  # conv name, batch-norm name, batch-norm eps

# Largest activation (elements) of one chunk of tasks: keeps a chunk's big tensors in the caches.
CHUNK_ELEMENTS = 1 << 21


# --- which models and algorithms --------------------------------------------------------------------------
def conv4_blocks(model: nn.Module) -> list[Block] | None:
    """(conv, bn, eps) names of a `Conv4`-shaped model: 3x3/2/1 convs with bias, affine batch norm over
    batch statistics, ReLU, then `head` Linear on the spatial mean; else None."""
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    if type(model).forward is not Conv4.forward or not isinstance(features, nn.Sequential):
        return None
    if type(head) is not nn.Linear or head.bias is None or len(features) % 3 or not len(features):
        return None
    blocks = []
    for i in range(0, len(features), 3):
        conv, bn, relu = features[i], features[i + 1], features[i + 2]
        if (type(conv) is not nn.Conv2d or conv.kernel_size != (3, 3) or conv.stride != (2, 2)
                or conv.padding != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1
                or conv.padding_mode != "zeros" or conv.bias is None):
            return None
        if type(bn) is not nn.BatchNorm2d or bn.track_running_stats or not bn.affine or type(relu) is not nn.ReLU:
            return None
        blocks.append((f"features.{i}", f"features.{i + 1}", bn.eps))
    names = [n for c, b, _ in blocks for n in (f"{c}.weight", f"{c}.bias", f"{b}.weight", f"{b}.bias")]
    if [n for n, _ in model.named_parameters()] != names + ["head.weight", "head.bias"]:
        return None
    return blocks


def applies(algo) -> bool:
    """True where the registered path computes `algo`'s meta-gradient (`registry.why_not` says why not)."""
    return registry.why_not(PATH, algo) is None


# --- the batched network ------------------------------------------------------------------------------------
def _im2col(x: torch.Tensor) -> torch.Tensor:
    """x (tasks, n, H, W, C) -> (tasks, n, Ho, Wo, 9, C): the 3x3 patches of a stride-2, padding-1 conv."""
    t, n, h, w, c = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    xp = F.pad(x, (0, 0, 1, 2 * wo - w, 1, 2 * ho - h)).contiguous()  # (tasks, n, 2 Ho + 1, 2 Wo + 1, C)
    st, sn, sh, sw, _ = xp.stride()
    # patch (a, b) tap (i, j) = xp[.., 2a + i, 2b + j, :]: one strided view, one copy
    patches = xp.as_strided((t, n, ho, wo, 3, 3, c), (st, sn, 2 * sh, 2 * sw, sh, sw, 1), xp.storage_offset())
    return patches.reshape(t, n, ho, wo, 9, c)


def _col2im(cols: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The adjoint of `_im2col`: patches (tasks, n, Ho, Wo, 9, C) summed back into (tasks, n, H, W, C).

    Input row r receives tap 1 of patch row r / 2 when r is even; when r is odd, tap 2 of patch row
    (r - 1) / 2 and tap 0 of patch row (r + 1) / 2 (if there is one); the same for columns. So each
    of the four (row, column) parity classes is one copy plus 0, 1 or 3 additions (no zero fill).
    """
    t, n, ho, wo, _, c = cols.shape
    taps = cols.view(t, n, ho, wo, 3, 3, c)
    out = cols.new_empty(t, n, h, w, c)
    # per dimension and parity: [(tap, first patch, count)], the first entry covering every position
    rows = {0: [(1, 0, (h + 1) // 2)], 1: [(2, 0, h // 2), (0, 1, min(h // 2, ho - 1))]}
    columns = {0: [(1, 0, (w + 1) // 2)], 1: [(2, 0, w // 2), (0, 1, min(w // 2, wo - 1))]}
    for pr in (0, 1):
        for pc in (0, 1):
            dest = out[:, :, pr::2, pc::2]  # (tasks, n, rows of parity pr, columns of parity pc, C)
            if dest.numel() == 0:
                continue
            first = True
            for i, a0, na in rows[pr]:
                for j, b0, nb in columns[pc]:
                    src = taps[:, :, a0:a0 + na, b0:b0 + nb, i, j]
                    if first:
                        dest.copy_(src)
                        first = False
                    elif na and nb:
                        dest[:, :, :na, :nb] += src
    return out


class Im2Col(torch.autograd.Function):
    """`_im2col` with `_col2im` as its backward (and the other way round: differentiable twice)."""

    @staticmethod
    def forward(ctx, x):
        ctx.hw = x.shape[2:4]
        return _im2col(x)

    @staticmethod
    def backward(ctx, grad):
        return Col2Im.apply(grad, *ctx.hw)


class Col2Im(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cols, h, w):
        return _col2im(cols, h, w)

    @staticmethod
    def backward(ctx, grad):
        return Im2Col.apply(grad), None, None


def _per_task_batch_norm(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """xhat = (z - mean) / sqrt(var + eps) over each task's rows, and 1/std: z (tasks, rows, C) ->
    xhat (tasks, rows, C), r (tasks, 1, C).

    Not torch's batch-norm kernel: for a (rows, C) slice (channels-last) that one sums the rows one
    after the other in float32 (per thread), an error that grows with the rows (mean off by ~1e-5
    relative at 15 000 rows on one thread; its backward's sum(grad * xhat) by ~1e-4) and that a
    second thread halves. The ReLU after it turns such errors into flipped units wherever the
    pre-activation is near 0, and a few flips move the meta-gradient by %. `sum` over a dimension
    (and `vecdot`) is cascade-summed (~1e-7 at any size and thread count); the variance is two-pass."""
    xhat = z - z.mean(1, keepdim=True)
    r = torch.linalg.vecdot(xhat, xhat, dim=1)[:, None].div_(xhat.shape[1]).add_(eps).rsqrt_()  # (tasks, 1, C)
    return xhat.mul_(r), r


class BatchNormReLU(torch.autograd.Function):
    """y = relu(gamma * xhat + beta), xhat = (z - mean) / sqrt(var + eps), over each task's rows:
    z (tasks, rows, C), gamma and beta (tasks, C) (batch norm with batch statistics, then ReLU).

    Its backward is `BatchNormReLUGrad`, a function with a hand-written backward of its own: the
    double backward of second order costs a few passes over z instead of autograd's dozens."""

    @staticmethod
    def forward(ctx, z, gamma, beta, eps):
        xhat, r = _per_task_batch_norm(z, eps)
        y = torch.addcmul(beta[:, None], xhat, gamma[:, None]).relu_()
        ctx.save_for_backward(z, xhat, gamma, y, r)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, xhat, gamma, y, r = ctx.saved_tensors
        return (*BatchNormReLUGrad.apply(grad_y, z, gamma, xhat, y, r), None, None)


class BatchNormReLUGrad(torch.autograd.Function):
    """(grad_y, z, gamma) -> (grad_z, grad_gamma, grad_beta) of `BatchNormReLU`. xhat, y and r = 1/std
    are its forward's values, passed along so as not to recompute them (z itself is not read: it is
    an input so that the double backward reaches it, the d/d z below); y only gives the ReLU mask.

    With ga = grad_y * (y > 0), P(w) = w - mean(w) - xhat mean(w xhat) (the projection batch norm's
    backward applies), per task and channel:
        grad_z = gamma r P(ga),  grad_gamma = sum(ga xhat),  grad_beta = sum(ga).
    Its backward, for cotangents (u, v_gamma, v_beta), using dxhat/dz^T w = r P(w), dr/dz = -r^2 xhat / rows
    and s = sum(u P(ga)):
        d/d ga    = gamma r P(u) + v_gamma xhat + v_beta   (times the mask, to grad_y)
        d/d gamma = r s
        d/d z     = -(gamma r^2 / rows) (s xhat + sum(ga xhat) P(u) + sum(u xhat) P(ga)) + v_gamma r P(ga)
    (not differentiable again: MAML needs second derivatives only). Sums over rows with `sum` and
    `vecdot` (cascade-summed), for the reason given at `_per_task_batch_norm`.
    """

    @staticmethod
    def forward(ctx, grad_y, z, gamma, xhat, y, r):
        rows = xhat.shape[1]
        grad_a = torch.ops.aten.threshold_backward(grad_y, y, 0)  # dL/d(pre-ReLU); y > 0 <=> it is > 0
        s_ga, s_ga_xhat = grad_a.sum(1, keepdim=True), torch.linalg.vecdot(grad_a, xhat, dim=1)[:, None]
        p_ga = torch.addcmul(grad_a.sub_(s_ga / rows), xhat, s_ga_xhat / -rows)  # P(ga); grad_a is a new tensor
        grad_z = p_ga * (gamma[:, None] * r)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(p_ga, xhat, gamma, y, r, s_ga_xhat)
        return grad_z, s_ga_xhat[:, 0], s_ga[:, 0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, u, v_gamma, v_beta):
        p_ga, xhat, gamma, y, r, s_ga_xhat = ctx.saved_tensors
        rows = xhat.shape[1]
        gamma = gamma[:, None]  # (tasks, 1, C)
        s_u, s_u_xhat = u.sum(1, keepdim=True), torch.linalg.vecdot(u, xhat, dim=1)[:, None]  # (tasks, 1, C)
        p_u = torch.addcmul(u - s_u / rows, xhat, s_u_xhat / -rows)  # P(u)
        s = torch.linalg.vecdot(u, p_ga, dim=1)[:, None]
        k = gamma * r * r / -rows
        grad_z = torch.addcmul(k * s * xhat, p_u, k * s_ga_xhat)
        grad_z.addcmul_(p_ga, k * s_u_xhat + v_gamma[:, None] * r)
        d_ga = torch.addcmul(torch.addcmul(v_beta[:, None], xhat, v_gamma[:, None]), p_u, gamma * r)
        grad_y = torch.ops.aten.threshold_backward(d_ga, y, 0)
        return grad_y, grad_z, (r * s)[:, 0], None, None, None


def logits(params: Params, x: torch.Tensor, blocks: list[Block], conv_bias: bool = True) -> torch.Tensor:
    """Conv4 outputs with per-task parameters (tasks, ...): x (tasks, n, H, W, C) -> (tasks, n, ways).

    `conv_bias=False`: without the convolutions' biases (batch norm cancels them)."""
    h = x
    for conv, bn, eps in blocks:
        w = params[f"{conv}.weight"]  # (tasks, out, C, 3, 3)
        tasks, out, c = w.shape[:3]
        cols = Im2Col.apply(h) if h.requires_grad else _im2col(h)  # (tasks, n, Ho, Wo, 9, C)
        n, ho, wo = cols.shape[1:4]
        w_cols = w.permute(0, 3, 4, 2, 1).reshape(tasks, 9 * c, out)  # rows ordered as the patches: (i, j, C)
        cols = cols.view(tasks, n * ho * wo, 9 * c)
        if conv_bias:
            z = torch.baddbmm(params[f"{conv}.bias"][:, None], cols, w_cols)  # (tasks, n Ho Wo, out)
        else:
            z = torch.bmm(cols, w_cols)
        h = BatchNormReLU.apply(z, params[f"{bn}.weight"], params[f"{bn}.bias"], eps).view(tasks, n, ho, wo, out)
    features = h.mean((2, 3))  # (tasks, n, C)
    return torch.baddbmm(params["head.bias"][:, None], features, params["head.weight"].mT)


def task_losses(params: Params, x: torch.Tensor, y: torch.Tensor, blocks: list[Block],
                conv_bias: bool = True) -> torch.Tensor:
    """Mean cross-entropy of each task: x (tasks, n, H, W, C), y (tasks, n) -> (tasks,)."""
    out = logits(params, x, blocks, conv_bias)
    tasks, n = out.shape[:2]
    return F.cross_entropy(out.reshape(tasks * n, -1), y.reshape(-1), reduction="none").view(tasks, n).mean(1)


def chunk_size(episode: Episode, channels: int) -> int:
    """Tasks per chunk: the first block's output of a chunk's query set within `CHUNK_ELEMENTS`."""
    _, n, _, h, w = episode.query_x.shape
    per_task = max(n, episode.support_x.shape[1]) * ((h + 1) // 2) * ((w + 1) // 2) * channels
    return max(1, min(episode.num_tasks, CHUNK_ELEMENTS // per_task))


# --- the meta-gradient ----------------------------------------------------------------------------------
def conv4_meta_gradient(algo, fallback: MetaGradient, chunk: int | None = None,
                        conv_bias: bool = True) -> MetaGradient:
    """(meta_params, episode) -> (meta-gradient, mean query loss) of `algo` (see `PATH`).

    `chunk` tasks at a time (None: `chunk_size`); `conv_bias=False` skips the convolutions' biases
    (see top). Episodes it was not written for (labels that are not integer class indices
    (tasks, shots)) go to `fallback`.
    """
    blocks = conv4_blocks(algo.model)
    steps, first_order, rule = algo.cfg.inner_steps, algo.first_order, algo.inner_rule()
    model_names = list(dict(algo.model.named_parameters()))
    skipped = set() if conv_bias else {f"{conv}.bias" for conv, _, _ in blocks}
    used = [k for k in model_names if k not in skipped]
    channels = algo.model.features[0].out_channels

    def chunk_meta_gradient(theta: Params, xs, ys, xq, yq, scale: float):
        """Sum over the chunk's tasks of scale * (meta-gradient, query loss); theta requires grad."""
        tasks = xs.shape[0]
        # (tasks, n, C, H, W) -> (tasks, n, H, W, C)
        xs, xq = xs.permute(0, 1, 3, 4, 2).contiguous(), xq.permute(0, 1, 3, 4, 2).contiguous()
        params = {k: theta[k].expand(tasks, *theta[k].shape) for k in used}
        for _ in range(steps):
            support = task_losses(params, xs, ys, blocks, conv_bias).sum()  # tasks' losses are independent: sum
            grads = torch.autograd.grad(support, list(params.values()), create_graph=not first_order)
            if first_order:
                grads = [g.detach() for g in grads]
            params, _ = rule(theta, params, dict(zip(used, grads)), None)
        adapted = {k: v.detach().requires_grad_() for k, v in params.items()}
        query = task_losses(adapted, xq, yq, blocks, conv_bias).sum() * scale
        v = torch.autograd.grad(query, list(adapted.values()))  # (tasks, ...) each
        if first_order:  # the inner steps are constants: d theta' / d theta = identity
            return {k: g.sum(0) for k, g in zip(used, v)}, query.detach()
        inputs = [k for k in theta if theta[k].requires_grad]
        meta = torch.autograd.grad(list(params.values()), [theta[k] for k in inputs], grad_outputs=v,
                                   allow_unused=True)
        return {k: g for k, g in zip(inputs, meta) if g is not None}, query.detach()

    @torch.compiler.disable  # autograd.grad inside: under cfg.compile this part stays eager
    def meta_gradient(meta_params: Params, episode: Episode) -> tuple[Params, torch.Tensor]:
        ys, yq = episode.support_y, episode.query_y  # (tasks, shots) class indices
        if (ys.dim() != 2 or yq.dim() != 2 or ys.is_floating_point() or yq.is_floating_point()
                or not all(k in meta_params for k in model_names)):
            return fallback(meta_params, episode)
        tasks = episode.num_tasks
        size = chunk or chunk_size(episode, channels)
        with torch.enable_grad():
            theta = {k: v.detach().requires_grad_() for k, v in meta_params.items()}
            total: Params = {}
            loss = theta[model_names[0]].new_zeros(())  # on the parameters' device and dtype
            for lo in range(0, tasks, size):
                part = (t[lo:lo + size] for t in episode)
                grads, value = chunk_meta_gradient(theta, *part, 1.0 / tasks)
                loss = loss + value
                for k, g in grads.items():
                    total[k] = total[k] + g if k in total else g
        keys = model_names if first_order else list(meta_params)
        return {k: total[k] if k in total else torch.zeros_like(meta_params[k]) for k in keys}, loss

    return meta_gradient


PATH = registry.register(registry.FastPath(
    name="conv4-grouped", reference=MAML,
    computes=("meta_loss", "inner_state", "forward", "task_loss", "model_params", "_first_order_gradient"),
    # SGD at inner-lr, or Meta-SGD's learned rates (second order only: their gradient needs the Hessian terms)
    rules={False: (Algorithm.inner_rule, MetaSGD.inner_rule), True: (Algorithm.inner_rule,)},
    loss=losses.cross_entropy, structure=conv4_blocks,
    build=lambda algo, blocks, fallback: conv4_meta_gradient(algo, fallback)))
