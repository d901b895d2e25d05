"""Exactness of the meta-gradients: finite differences, per-task reference loops, hand checks."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fedmeta import algorithms, seeding
from fedmeta.algorithms import NonFiniteLossError
from fedmeta.config import Config
from fedmeta.models import MLP
from fedmeta.optim import adam_flatten, adam_init, adam_step, adam_unflatten
from fedmeta.tasks import Episode
from fedmeta.tasks.sinusoid import SinusoidTasks


def tiny(cfg, dtype=torch.float64, sizes=(1, 6, 6, 1)):
    torch.manual_seed(0)
    model = MLP(sizes).to(dtype)
    algo = algorithms.build(cfg, model)
    return algo, algo.init(seeding.generator(0, "init"))


def episode(tasks=4, shots=5, query=6, dtype=torch.float64, seed=0):
    ep = SinusoidTasks().sample(tasks, shots, query, seeding.generator(seed, "test"))
    return Episode(*(t.to(dtype) for t in ep))


def reference_meta_loss(algo, meta_params, ep, first_order=False):
    """Per-task Python loop with plain autograd: the definition of (FO)MAML."""
    rule = algo.inner_rule()
    losses = []
    for t in range(ep.num_tasks):
        params = algo.model_params(meta_params)
        for _ in range(algo.cfg.inner_steps):
            loss = algo.loss(functional_call(algo.model, params, (ep.support_x[t],)), ep.support_y[t])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params, _ = rule(meta_params, params, dict(zip(params, grads)), None)
        losses.append(algo.loss(functional_call(algo.model, params, (ep.query_x[t],)), ep.query_y[t]))
    return torch.stack(losses).mean()


def leaf(params):
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_matches_finite_differences(steps):
    cfg = Config(inner_steps=steps, inner_lr=0.05)
    algo, params = tiny(cfg)
    ep = episode()
    grads, _ = algo.meta_gradient(params, ep)
    eps = 1e-6
    for name in params:
        for idx in [(0,) * params[name].dim(), tuple(s - 1 for s in params[name].shape)]:
            plus = {k: v.clone() for k, v in params.items()}
            minus = {k: v.clone() for k, v in params.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            fd = (algo.meta_loss(plus, ep) - algo.meta_loss(minus, ep)) / (2 * eps)
            assert float(grads[name][idx]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8), name


@pytest.mark.parametrize("name, steps", [("maml", 1), ("maml", 5), ("fomaml", 2), ("metasgd", 2)])
def test_vectorised_equals_per_task_loop(name, steps):
    cfg = Config(algorithm=name, inner_steps=steps)
    algo = algorithms.build(cfg)
    params = algo.init(seeding.generator(0, "init"))
    ep = episode(tasks=6, shots=10, query=10, dtype=torch.float32)
    grads, loss = algo.meta_gradient(params, ep)
    p = leaf(params)
    ref_loss = reference_meta_loss(algo, p, ep, first_order=algo.first_order)
    ref_grads = torch.autograd.grad(ref_loss, list(p.values()), allow_unused=True)
    assert loss == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-6)
    for k, g in zip(p, ref_grads):
        g = torch.zeros_like(p[k]) if g is None else g
        assert torch.allclose(grads[k], g, atol=1e-6, rtol=1e-5), k


def test_first_order_differs_from_second_order_by_the_hessian_term():
    cfg = Config(inner_steps=1, inner_lr=0.1)
    so, params = tiny(cfg)
    fo, _ = tiny(cfg.replace(algorithm="fomaml"))
    ep = episode(tasks=1)
    g_so, _ = so.meta_gradient(params, ep)
    g_fo, _ = fo.meta_gradient(params, ep)
    # one step: g_so = (I - alpha H_support) g_fo, with H the Hessian of the support loss at theta
    names = list(params)
    flat = torch.cat([params[k].flatten() for k in names])

    def unflat(v):
        out, i = {}, 0
        for k in names:
            out[k] = v[i:i + params[k].numel()].view_as(params[k])
            i += params[k].numel()
        return out

    support = lambda v: so.task_loss(unflat(v), ep.support_x[0], ep.support_y[0])
    hessian = torch.autograd.functional.hessian(support, flat)
    g_fo_flat = torch.cat([g_fo[k].flatten() for k in names])
    g_so_flat = torch.cat([g_so[k].flatten() for k in names])
    assert not torch.allclose(g_so_flat, g_fo_flat, atol=1e-6)
    assert torch.allclose(g_so_flat, g_fo_flat - 0.1 * hessian @ g_fo_flat, atol=1e-10)


def test_first_order_equals_second_order_when_the_hessian_vanishes():
    # a support loss linear in the parameters has a zero Hessian: FOMAML is then exact
    cfg = Config(inner_steps=2, inner_lr=0.1)
    so, params = tiny(cfg)
    fo, _ = tiny(cfg.replace(algorithm="fomaml"))
    linear_loss = lambda out, y: (out * y).mean()
    for algo in (so, fo):
        algo.loss = linear_loss
    model = nn.Linear(1, 1).double()
    so.model = fo.model = model
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ep = episode()
    g_so, l_so = so.meta_gradient(params, ep)
    g_fo, l_fo = fo.meta_gradient(params, ep)
    assert l_so == pytest.approx(l_fo)
    for k in params:
        assert torch.allclose(g_so[k], g_fo[k], atol=1e-12)
        assert g_so[k].abs().max() > 0


def test_metasgd_learning_rates_get_their_true_gradient():
    cfg = Config(algorithm="metasgd", inner_steps=2, inner_lr=0.05)
    algo = algorithms.build(cfg, MLP((1, 5, 1)).double())
    key = "alpha/net.0.weight"
    params = algo.init(seeding.generator(0, "init"))
    assert params[key].dtype == torch.float64 and torch.all(params[key] == 0.05)
    ep = episode(tasks=3)
    grads, _ = algo.meta_gradient(params, ep)
    eps = 1e-6
    plus, minus = dict(params), dict(params)
    plus[key] = params[key].clone()
    plus[key][2, 0] += eps
    minus[key] = params[key].clone()
    minus[key][2, 0] -= eps
    fd = (algo.meta_loss(plus, ep) - algo.meta_loss(minus, ep)) / (2 * eps)
    assert float(grads[key][2, 0]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def test_reptile_pseudo_gradient_is_theta_minus_mean_adapted():
    cfg = Config(algorithm="reptile", inner_steps=3, inner_lr=0.02)
    algo, params = tiny(cfg)
    ep = episode(tasks=3)
    grads, _ = algo.meta_gradient(params, ep)
    phis = []
    for t in range(3):
        p = leaf(params)
        for _ in range(3):
            loss = algo.task_loss(p, ep.support_x[t], ep.support_y[t])
            g = torch.autograd.grad(loss, list(p.values()))
            p = {k: (v - 0.02 * gg).detach().requires_grad_() for (k, v), gg in zip(p.items(), g)}
        phis.append(p)
    for k in params:
        expected = params[k] - torch.stack([phi[k] for phi in phis]).mean(0)
        assert torch.allclose(grads[k], expected.detach(), atol=1e-12)


def test_evaluate_matches_explicit_fine_tuning():
    cfg = Config(inner_lr=0.02)
    algo, params = tiny(cfg)
    ep = episode(tasks=3, shots=5, query=20)
    ev = algorithms.evaluate(algo, params, ep, steps=4, chunk=2)
    assert ev.loss.shape == (5, 3) and ev.accuracy is None
    for t in range(3):
        p = leaf(params)
        for step in range(5):
            q = algo.task_loss(p, ep.query_x[t], ep.query_y[t])
            assert float(ev.loss[step, t]) == pytest.approx(q.item(), rel=1e-10)
            g = torch.autograd.grad(algo.task_loss(p, ep.support_x[t], ep.support_y[t]), list(p.values()))
            p = {k: (v - 0.02 * gg).detach().requires_grad_() for (k, v), gg in zip(p.items(), g)}
    mean, half = ev.interval(4)
    assert half > 0 and mean == pytest.approx(float(ev.loss[4].mean()))


def test_functional_adam_equals_torch_adam():
    torch.manual_seed(0)
    params = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(ref.values(), lr=0.01)
    state = adam_init(params)
    for step in range(5):
        grads = {k: torch.randn_like(v) * (step + 1) for k, v in params.items()}
        params, state = adam_step(params, grads, state, lr=0.01)
        for k, v in ref.items():
            v.grad = grads[k].clone()
        opt.step()
    for k in params:
        assert torch.allclose(params[k], ref[k].detach(), atol=1e-7)


def test_training_is_deterministic_and_learns():
    cfg = Config(meta_batch_size=10)
    algo = algorithms.build(cfg)
    src = SinusoidTasks()

    def run():
        g = seeding.generator(0, "train")
        params = algo.init(seeding.generator(0, "init"))
        return algo.train(params, None, lambda i: src.sample(10, 10, 10, g), 60)

    p1, s1, c1 = run()
    p2, s2, c2 = run()
    assert c1 == c2 and all(torch.equal(p1[k], p2[k]) for k in p1)
    assert sum(c1[-10:]) < sum(c1[:10])


def test_divergent_inner_loop_raises_and_leaves_no_update():
    cfg = Config(inner_lr=1e6, inner_steps=5)
    algo = algorithms.build(cfg)
    params = algo.init(seeding.generator(0, "init"))
    ep = SinusoidTasks().sample(4, 10, 10, seeding.generator(0, "test"))
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        algo.train(params, None, lambda i: ep, 3)


def test_wrong_feature_shape_is_a_clear_error():
    algo = algorithms.build(Config())
    params = algo.init(seeding.generator(0, "init"))
    ep = Episode(torch.zeros(2, 5, 3), torch.zeros(2, 5, 1), torch.zeros(2, 5, 3), torch.zeros(2, 5, 1))
    with pytest.raises(ValueError, match="do not fit model"):
        algo.meta_gradient(params, ep)


def test_adam_state_flattens_for_storage_and_refuses_another_model():
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    _, state = adam_step(params, {k: torch.randn_like(v) for k, v in params.items()}, adam_init(params), lr=0.1)
    flat, step = adam_flatten(state)
    assert step == 1 and set(flat) == {"exp_avg/w", "exp_avg/b", "exp_avg_sq/w", "exp_avg_sq/b"}
    back = adam_unflatten(flat, step, params)
    assert back["step"] == 1 and all(torch.equal(back[p][k], state[p][k])
                                     for p in ("exp_avg", "exp_avg_sq") for k in params)
    assert adam_unflatten(flat, step, {"w": params["w"]}) is None  # other keys
    assert adam_unflatten(flat, step, {**params, "w": torch.zeros(2, 3)}) is None  # other shape
