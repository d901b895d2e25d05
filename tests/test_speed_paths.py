"""The fast paths compute the same numbers as the generic ones.

- the closed-form ReLU-MLP meta-gradient (fedmeta/algorithms/fast.py) equals the generic
  torch.func path (float64, several depths/widths/steps) and a per-task autograd loop (float32);
- it is selected exactly where it applies, and unusual inputs fall back to the generic path;
- `compile = true` gives the eager numbers (one compile, ~15-30 s; the compiled generic path is slow).
Speed itself is measured in benchmarks/maml_speed.py, never here.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

from fedmeta import seeding
from fedmeta.algorithms import fast
from fedmeta.algorithms.maml import FOMAML, MAML
from fedmeta.algorithms.metasgd import MetaSGD
from fedmeta.config import Config
from fedmeta.models import MLP
from fedmeta.tasks import Episode
from fedmeta.tasks.sinusoid import SinusoidTasks


def setting(steps, dtype=torch.float32, tasks=25, shots=10, seed=0):
    algo = MAML(Config(inner_steps=steps, meta_batch_size=tasks, shots=shots, query_shots=shots))
    params = {k: v.to(dtype) for k, v in algo.init(seeding.generator(seed, "init")).items()}
    ep = SinusoidTasks().sample(tasks, shots, shots, seeding.generator(seed, "test"))
    return algo, params, Episode(*(t.to(dtype) for t in ep))


def random_episode(tasks, shots, features, outputs, dtype, seed):
    g = seeding.generator(seed, "test")
    return Episode(*(torch.randn(tasks, shots + i, d, generator=g, dtype=dtype)
                     for i, d in ((0, features), (0, outputs), (3, features), (3, outputs))))


def loop_meta_gradient(algo, meta_params, episode):
    """Per-task reference: autograd through the inner SGD steps (create_graph keeps Hessian terms)."""
    init = {k: v.detach().requires_grad_() for k, v in meta_params.items()}
    total = 0.0
    for xs, ys, xq, yq in zip(*episode):
        params = init
        for _ in range(algo.cfg.inner_steps):
            loss = F.mse_loss(functional_call(algo.model, params, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {k: p - algo.cfg.inner_lr * g for (k, p), g in zip(params.items(), grads)}
        total = total + F.mse_loss(functional_call(algo.model, params, (xq,)), yq)
    loss = total / episode.num_tasks
    return dict(zip(init, torch.autograd.grad(loss, list(init.values())))), loss.detach()


def assert_same(a, b, rtol, atol):
    (ga, la), (gb, lb) = a, b
    assert ga.keys() == gb.keys()
    for k in ga:
        assert ga[k].shape == gb[k].shape and ga[k].dtype == gb[k].dtype, k
        torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=atol, msg=k)
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)


def test_selected_exactly_where_it_applies():
    assert fast.applies(MAML(Config()))
    assert fast.applies(MAML(Config(), MLP((3, 7, 5, 6, 2))))
    assert not fast.applies(FOMAML(Config(algorithm="fomaml")))  # first order: its own path
    assert not fast.applies(MetaSGD(Config(algorithm="metasgd")))  # learned inner rates
    assert not fast.applies(MAML(Config(task="omniglot")))  # conv4, cross-entropy
    tanh = MLP()
    tanh.net[1] = nn.Tanh()
    assert not fast.applies(MAML(Config(), tanh))
    no_bias = nn.Module()
    no_bias.net = nn.Sequential(nn.Linear(1, 4, bias=False), nn.ReLU(), nn.Linear(4, 1))
    assert not fast.applies(MAML(Config(), no_bias))


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_fast_equals_generic_float64_sinusoid(steps):
    algo, params, ep = setting(steps, torch.float64)
    fn = algo.meta_gradient_fn()
    assert fn.__qualname__.startswith("mlp_meta_gradient")  # the fast path was picked
    assert_same(fn(params, ep), grad_and_value(algo.meta_loss)(params, ep), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sizes, steps", [((3, 7, 5, 6, 2), 3), ((2, 9, 4), 1), ((4, 3), 2)])
def test_fast_equals_generic_float64_other_mlps(sizes, steps):
    torch.manual_seed(0)
    model = MLP(sizes).double()
    algo = MAML(Config(inner_steps=steps, inner_lr=0.1), model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ep = random_episode(6, 5, sizes[0], sizes[-1], torch.float64, seed=steps)
    assert_same(algo.meta_gradient_fn()(params, ep), grad_and_value(algo.meta_loss)(params, ep),
                rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 5])
def test_fast_equals_per_task_loop_float32(steps):
    algo, params, ep = setting(steps)
    got = algo.meta_gradient_fn()(params, ep)
    assert_same(got, loop_meta_gradient(algo, params, ep), rtol=1e-5, atol=1e-6)
    grads, _ = got
    assert all(g.grad_fn is None and not g.requires_grad for g in grads.values())  # no graph kept


def test_unusual_inputs_fall_back_to_generic():
    algo, params, ep = setting(2, torch.float64, tasks=4)
    fn, generic = algo.meta_gradient_fn(), grad_and_value(algo.meta_loss)
    flat = Episode(ep.support_x, ep.support_y[..., 0], ep.query_x, ep.query_y[..., 0])  # (tasks, shots)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mse_loss warns about the broadcast; the point is the routing
        assert_same(fn(params, flat), generic(params, flat), rtol=0, atol=0)


def test_compiled_equals_eager():
    """compile = true (torch.compile of the fast path) gives the eager meta-gradient and training."""
    algo, params, ep = setting(2)
    compiled = MAML(algo.cfg.replace(compile=True))
    assert_same(compiled.meta_gradient(params, ep), algo.meta_gradient(params, ep), rtol=1e-5, atol=1e-6)
    # a few training iterations on fresh episodes (same shapes: no recompile) follow the same curve
    source = SinusoidTasks()

    def sample(i):
        return source.sample(25, 10, 10, seeding.generator(1, "test", i))

    p_eager, _, curve_eager = algo.train(params, None, sample, 5)
    p_comp, _, curve_comp = compiled.train(params, None, sample, 5)
    assert curve_comp == pytest.approx(curve_eager, rel=1e-5)
    for k in p_eager:
        torch.testing.assert_close(p_comp[k], p_eager[k], rtol=1e-5, atol=1e-6)
    check_non_finite_inputs_are_named(compiled, params, ep)


def check_non_finite_inputs_are_named(algo, params, ep):
    """The finiteness flag computed with the gradient still names a bad episode tensor."""
    for i, name in enumerate(Episode._fields):
        bad = [t.clone() for t in ep]
        bad[i][3, 1, 0] = float("nan") if i % 2 else float("inf")
        with pytest.raises(ValueError, match=f"episode {name} holds non-finite"):
            algo.meta_gradient(params, Episode(*bad))


def test_non_finite_inputs_are_named_eager():
    algo, params, ep = setting(2)
    check_non_finite_inputs_are_named(algo, params, ep)
    with pytest.raises(ValueError, match="disagree on shots"):  # shapes are checked before the call
        algo.meta_gradient(params, Episode(ep.support_x, ep.support_y[:, :1], ep.query_x, ep.query_y))


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 5])
def test_compiled_generic_equals_compiled_fast(steps):
    """Both paths under torch.compile (the generic one takes ~30 s to compile)."""
    algo, params, ep = setting(steps)
    generic = torch.compile(grad_and_value(algo.meta_loss), dynamic=False)
    grads, loss = MAML(algo.cfg.replace(compile=True)).meta_gradient(params, ep)
    assert_same((grads, torch.tensor(loss)), generic(params, ep), rtol=1e-5, atol=1e-6)
