"""The batched Conv4 meta-gradient (fedmeta/algorithms/grouped.py) is the MAML meta-gradient.

- equal, in float64 on tiny episodes, to a per-task Python loop with plain autograd (the definition
  of MAML / FOMAML / Meta-SGD) and to finite differences of `MAML.meta_loss`, for several inner
  steps and chunk sizes; in float32, to the float64 truth on a real-sized conv4 episode at 1 and 2 threads;
- its pieces: im2col and col2im are adjoint, batch norm + ReLU passes gradcheck and gradgradcheck and its
  float32 error does not grow with the rows;
- it is selected exactly where it applies; unusual labels go to the fallback;
- (xfail, strict) the torch.func bug that makes the generic `grad(vmap(...))` path wrong on Conv4.
Speed is measured in benchmarks/omniglot_speed.py, never here.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fedmeta import algorithms, seeding
from fedmeta.algorithms import grouped
from fedmeta.algorithms.maml import FOMAML, MAML
from fedmeta.algorithms.metasgd import MetaSGD
from fedmeta.algorithms.reptile import Reptile
from fedmeta.config import Config
from fedmeta.models import Conv4
from fedmeta.tasks import Episode


def tiny(name="maml", steps=1, dtype=torch.float64, ways=3, channels=4, image=12, lr=0.4):
    cfg = Config(task="omniglot", algorithm=name, ways=ways, inner_steps=steps, inner_lr=lr)
    torch.manual_seed(0)
    algo = algorithms.build(cfg, Conv4(ways, channels=channels, image=image).to(dtype))
    params = algo.init(seeding.generator(0, "init"))
    if name == "metasgd":  # learned rates that differ per coordinate
        g = seeding.generator(1, "init")
        params = {k: v * (0.5 + torch.rand(v.shape, generator=g, dtype=dtype)) if k.startswith("alpha/") else v
                  for k, v in params.items()}
    return algo, params


def episode(tasks=5, shots=2, query=3, ways=3, image=12, dtype=torch.float64, seed=0):
    g = seeding.generator(seed, "test")
    n, q = ways * shots, ways * query
    return Episode(torch.rand(tasks, n, 1, image, image, generator=g, dtype=dtype),
                   torch.randint(ways, (tasks, n), generator=g),
                   torch.rand(tasks, q, 1, image, image, generator=g, dtype=dtype),
                   torch.randint(ways, (tasks, q), generator=g))


def loop_meta_gradient(algo, meta_params, ep):
    """Per-task reference: autograd through the inner steps (detached for first order)."""
    theta = {k: v.detach().requires_grad_() for k, v in meta_params.items()}
    init, rule, first = algo.model_params(theta), algo.inner_rule(), algo.first_order
    wrt_keys = list(init if first else theta)  # FOMAML's gradient: model parameters only
    total = {k: torch.zeros_like(meta_params[k]) for k in wrt_keys}
    for xs, ys, xq, yq in zip(*ep):
        params = init
        for _ in range(algo.cfg.inner_steps):
            loss = algo.loss(functional_call(algo.model, params, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first)
            params, _ = rule(theta, params, {k: g.detach() if first else g for k, g in zip(params, grads)}, None)
        if first:  # the adapted parameters as constants
            params = {k: v.detach().requires_grad_() for k, v in params.items()}
        query = algo.loss(functional_call(algo.model, params, (xq,)), yq) / ep.num_tasks
        wrt = params if first else theta
        grads = torch.autograd.grad(query, [wrt[k] for k in wrt_keys], allow_unused=True)
        for k, g in zip(wrt_keys, grads):
            if g is not None:  # None: conv biases (batch norm cancels them)
                total[k] += g
    return total


def assert_close(got, ref, rtol, atol):
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype, k
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=atol, msg=k)


def test_selected_exactly_where_it_applies():
    omniglot = Config(task="omniglot")
    assert grouped.applies(MAML(omniglot))
    assert grouped.applies(FOMAML(omniglot.replace(algorithm="fomaml")))
    assert grouped.applies(MetaSGD(omniglot.replace(algorithm="metasgd")))
    assert not grouped.applies(MAML(Config()))  # sinusoid MLP
    assert not grouped.applies(Reptile(omniglot.replace(algorithm="reptile")))
    for change in (lambda m: setattr(m.features[0], "stride", (1, 1)),
                   lambda m: setattr(m.features[1], "track_running_stats", True),
                   lambda m: m.features.__setitem__(2, nn.Tanh())):
        model = Conv4(5)
        change(model)
        assert not grouped.applies(MAML(omniglot, model))

    class OtherLoss(MAML):
        def task_loss(self, params, x, y):
            return super().task_loss(params, x, y) * 2

    assert not grouped.applies(OtherLoss(omniglot))


@pytest.mark.parametrize("name, steps", [("maml", 1), ("maml", 3), ("fomaml", 2), ("metasgd", 2)])
def test_equals_per_task_loop_float64(name, steps):
    algo, params = tiny(name, steps)
    ep = episode()
    ref = loop_meta_gradient(algo, params, ep)
    for chunk in (1, 2, None):  # None: one chunk of all 5 tasks at this size
        grads, loss = grouped.conv4_meta_gradient(algo, fallback=None, chunk=chunk)(params, ep)
        assert_close(grads, ref, rtol=1e-9, atol=1e-11)
        assert float(loss) == pytest.approx(float(algo.meta_loss(params, ep)), rel=1e-12)


def test_second_order_matches_finite_differences():
    algo, params = tiny("maml", steps=2, image=10)
    ep = episode(tasks=3, image=10)
    grads, _ = grouped.conv4_meta_gradient(algo, fallback=None)(params, ep)
    eps = 1e-6
    for name in ("features.0.weight", "features.3.weight", "features.4.bias", "features.10.weight", "head.weight"):
        idx = tuple(s // 2 for s in params[name].shape)
        plus, minus = dict(params), dict(params)
        plus[name], minus[name] = params[name].clone(), params[name].clone()
        plus[name][idx] += eps
        minus[name][idx] -= eps
        fd = (algo.meta_loss(plus, ep) - algo.meta_loss(minus, ep)) / (2 * eps)
        assert float(grads[name][idx]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9), name
    # conv biases cancel in batch norm: meta-gradient 0 up to rounding; exactly 0 when skipped
    biases = [f"features.{i}.bias" for i in (0, 3, 6, 9)]
    assert all(float(grads[k].abs().max()) < 1e-12 for k in biases)
    skipped, _ = grouped.conv4_meta_gradient(algo, fallback=None, conv_bias=False)(params, ep)
    assert all(float(skipped[k].abs().max()) == 0 for k in biases)
    assert_close({k: v for k, v in skipped.items() if k not in biases},
                 {k: v for k, v in grads.items() if k not in biases}, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
def test_equals_per_task_loop_float32_real_size(threads):
    """float32 against the float64 truth (the per-task loop in float64 on the same inputs), at one and two
    threads: a real-sized episode has ~10^5 ReLU units per pass, so an activation error of a few 1e-6
    already flips some near 0 and moves the meta-gradient by % (as torch's channels-last batch norm did
    on one thread, see `grouped._per_task_batch_norm`)."""
    cfg = Config(task="omniglot", ways=5, inner_lr=0.4)
    algo, algo64 = MAML(cfg), MAML(cfg, Conv4(5).double())
    params = algo.init(seeding.generator(0, "init"))
    ep = episode(tasks=4, shots=1, query=3, ways=5, image=28, dtype=torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grads, loss = grouped.conv4_meta_gradient(algo, fallback=None)(params, ep)
    finally:
        torch.set_num_threads(before)
    ref = loop_meta_gradient(algo64, {k: v.double() for k, v in params.items()},
                             Episode(*(t.double() if t.is_floating_point() else t for t in ep)))
    scale = max(float(g.abs().max()) for g in ref.values())
    assert_close(grads, {k: v.float() for k, v in ref.items()}, rtol=1e-4, atol=1e-5 * scale)
    assert all(g.grad_fn is None and not g.requires_grad for g in grads.values())  # no graph kept


def test_batch_norm_relu_float32_error_does_not_grow_with_rows():
    """Statistics summed row after row in float32 lose ~rows * 6e-8 (torch's channels-last kernel on one
    thread: up to 1e-5 here, 5e-6 on two); ours stay at a few float32 roundings (< 5e-7), forward and both backwards."""
    g = seeding.generator(0, "test")
    z64 = 3 + torch.randn(2, 16384, 8, generator=g, dtype=torch.float64)  # |mean| / std = 3
    gamma64 = 0.5 + torch.rand(2, 8, generator=g, dtype=torch.float64)
    beta64 = 0.3 * torch.randn(2, 8, generator=g, dtype=torch.float64)
    u64, w64 = torch.randn(2, 16384, 8, generator=g, dtype=torch.float64), torch.randn_like(z64)
    u64 = u64 * (u64 > 0.5)  # most rows of the upstream gradient 0, as after a ReLU: no averaging out

    def run(dtype):
        z, gamma, beta = (t.to(dtype).requires_grad_() for t in (z64, gamma64, beta64))
        y = grouped.BatchNormReLU.apply(z, gamma, beta, 1e-5)
        grad_z, grad_gamma = torch.autograd.grad((y * u64.to(dtype)).sum(), (z, gamma), create_graph=True)
        hvp = torch.autograd.grad((grad_z * w64.to(dtype)).sum(), (z, gamma))
        return y, grad_z, grad_gamma, *hvp

    for got, ref in zip(run(torch.float32), run(torch.float64)):
        ref = ref.detach()
        assert float((got.detach().double() - ref).abs().max()) < 2e-6 * float(ref.abs().max())


def test_im2col_and_col2im_are_adjoint():
    g = seeding.generator(0, "test")
    for h, w in ((12, 12), (7, 7), (5, 8), (2, 1), (1, 1), (3, 2), (4, 3)):
        x = torch.randn(2, 3, h, w, 4, generator=g, dtype=torch.float64)
        cols = grouped._im2col(x)
        assert cols.shape == (2, 3, (h + 1) // 2, (w + 1) // 2, 9, 4)
        c = torch.randn(cols.shape, generator=g, dtype=torch.float64)
        assert float((cols * c).sum()) == pytest.approx(float((x * grouped._col2im(c, h, w)).sum()), rel=1e-12)
    # im2col is the convolution's input side: patches x weights = torch's conv2d
    x = torch.randn(2, 3, 7, 7, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    ours = grouped._im2col(x).flatten(-2) @ weight.permute(2, 3, 1, 0).reshape(36, 5)  # (2, 3, 4, 4, 5)
    ref = torch.nn.functional.conv2d(x.flatten(0, 1).permute(0, 3, 1, 2), weight, stride=2, padding=1)
    torch.testing.assert_close(ours.flatten(0, 1).permute(0, 3, 1, 2), ref)


def test_batch_norm_relu_is_twice_differentiable():
    g = seeding.generator(0, "test")
    z = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = (0.5 + torch.rand(2, 3, generator=g, dtype=torch.float64)).requires_grad_()
    beta = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda z, gamma, beta: grouped.BatchNormReLU.apply(z, gamma, beta, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z, gamma, beta))
    assert torch.autograd.gradgradcheck(fn, (z, gamma, beta))
    ref = torch.relu(torch.nn.functional.batch_norm(z[0], None, None, gamma[0], beta[0], training=True))
    torch.testing.assert_close(fn(z, gamma, beta)[0], ref)


def test_im2col_function_is_twice_differentiable():
    x = torch.randn(1, 2, 5, 5, 2, dtype=torch.float64, requires_grad=True)
    fn = lambda x: grouped.Im2Col.apply(x) ** 2  # noqa: E731  (squared: a non-zero second derivative)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_class_probability_labels_go_to_the_fallback():
    algo, params = tiny()
    ep = episode(tasks=2)
    soft = Episode(ep.support_x, torch.nn.functional.one_hot(ep.support_y, 3).double(),
                   ep.query_x, torch.nn.functional.one_hot(ep.query_y, 3).double())
    calls = []
    fn = grouped.conv4_meta_gradient(algo, fallback=lambda p, e: calls.append(e) or ({}, torch.zeros(())))
    fn(params, soft)
    assert len(calls) == 1 and calls[0] is soft
    fn(params, ep)
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd"])
def test_meta_gradient_fn_selects_it_and_training_uses_it(name):
    algo, params = tiny(name, steps=2)
    assert algo.meta_gradient_fn().__qualname__.startswith("conv4_meta_gradient")
    ep = episode()
    grads, loss = algo.meta_gradient(params, ep)  # the training entry point: checks, finiteness flag
    assert_close(grads, loop_meta_gradient(algo, params, ep), rtol=1e-9, atol=1e-11)
    assert loss == pytest.approx(float(algo.meta_loss(params, ep)), rel=1e-12)


def test_under_compile_the_same_numbers():
    algo, params = tiny("maml")
    compiled = MAML(algo.cfg.replace(compile=True), algo.model)
    ep = episode()
    assert_close(compiled.meta_gradient(params, ep)[0], algo.meta_gradient(params, ep)[0], rtol=1e-12, atol=1e-14)
    bad = Episode(ep.support_x.clone(), *ep[1:])
    bad.support_x[1, 0, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="support_x holds non-finite"):
        compiled.meta_gradient(params, bad)


@pytest.mark.xfail(strict=True, reason="torch.func: d/ds of the gradient w.r.t. a batch norm's weight, "
                                      "taken outside vmap, is wrong")
def test_generic_path_second_order_through_batch_norm():
    """Why the grouped path (not `grad(vmap(...))`) is the reference: in torch 2.13, the derivative taken
    outside `vmap` of a gradient w.r.t. a training-mode batch norm's weight is wrong, even in float64 and
    without ReLU, so `grad_and_value(MAML.meta_loss)` on Conv4 is off by ~1e-2 (relative). Strict: this
    starts failing when torch is fixed."""
    g = seeding.generator(0, "test")
    d = dict(generator=g, dtype=torch.float64)
    x, u = torch.randn(3, 6, 4, 5, 5, **d), torch.randn(3, 6, 4, 5, 5, **d)  # (tasks, shots, C, H, W)
    gamma, v, s0 = 0.5 + torch.rand(4, **d), torch.randn(3, 4, **d), 1 + 0.1 * torch.randn(4, **d)

    def h(s, x, u, v):  # < d/d gamma sum(u * bn(x * s)), v >
        f = lambda gamma: (torch.nn.functional.batch_norm(x * s[:, None, None], None, None, gamma,  # noqa: E731
                                                          None, training=True) * u).sum()
        return (torch.func.grad(f)(gamma) * v).sum()

    batched = torch.func.grad(lambda s: torch.func.vmap(h, in_dims=(None, 0, 0, 0))(s, x, u, v).sum())(s0)
    loop = torch.func.grad(lambda s: sum(h(s, *t) for t in zip(x, u, v)))(s0)
    torch.testing.assert_close(batched, loop, rtol=1e-9, atol=1e-12)
