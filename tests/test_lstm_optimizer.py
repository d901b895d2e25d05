"""The LSTM meta-optimizer (Andrychowicz et al. 2016): preprocessing by hand, coordinatewise
structure, per-coordinate state, truncated BPTT against a plain-autograd reference, determinism,
learning on quadratics, evaluation through the shared `adapt.evaluate`, and bad input."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.func import jacrev

from fedmeta import algorithms, seeding
from fedmeta.algorithms import NonFiniteLossError, evaluate
from fedmeta.algorithms.lstm_optimizer import LSTMOptimizer, lstm_update, preprocess
from fedmeta.config import Config
from fedmeta.models import Linear
from fedmeta.optim import adam_init, adam_step
from fedmeta.tasks import Episode
from fedmeta.tasks.quadratic import QuadraticTasks
from fedmeta.tasks.sinusoid import SinusoidTasks

REPO = Path(__file__).resolve().parents[1]


def quad_algo(dim=4, dtype=torch.float64, **changes):
    cfg = Config(task="quadratic", algorithm="lstm", quadratic_dim=dim, **changes)
    algo = algorithms.build(cfg, Linear(dim).to(dtype))
    return algo, algo.init(seeding.generator(0, "init"))


def quad_episode(tasks, dim=4, dtype=torch.float64, seed=0, scale=(1.0, 1.0)):
    ep = QuadraticTasks(dim, scale).sample(tasks, generator=seeding.generator(seed, "test"))
    return Episode(*(t.to(dtype) for t in ep))


def test_registry_and_meta_keys():
    algo, meta = quad_algo()
    assert isinstance(algo, LSTMOptimizer) and algo.name == "lstm"
    assert all(k.startswith("lstm/") for k in meta) and algo.model_params(meta) == {}
    assert meta["lstm/0/w_ih"].shape == (80, 2) and meta["lstm/1/w_hh"].shape == (80, 20)
    assert meta["lstm/out/w"].shape == (1, 20)


def test_preprocess_by_hand():
    e = math.exp
    g = torch.tensor([1.0, -e(-5), e(-11), 0.0, -e(-12), e(-10), 100.0], dtype=torch.float64)
    want = torch.tensor([[0.0, 1.0], [-0.5, -1.0], [-1.0, e(-1)], [-1.0, 0.0], [-1.0, -e(-2)],
                         [-1.0, 1.0], [math.log(100.0) / 10, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(preprocess(g, 10.0), want, rtol=0, atol=1e-12)
    # p = 5: the threshold moves to e^-5
    torch.testing.assert_close(preprocess(torch.tensor([e(-6), -e(-4)], dtype=torch.float64), 5.0),
                               torch.tensor([[-1.0, e(-1)], [-0.8, -1.0]], dtype=torch.float64))


def test_update_is_coordinatewise():
    algo, meta = quad_algo(dim=6)
    rule = algo.inner_rule()
    gen = seeding.generator(1, "test")
    theta = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    state = algo.inner_state({"theta.weight": theta})
    new, _ = rule(meta, {"theta.weight": theta}, {"theta.weight": g}, state)
    new_p, _ = rule(meta, {"theta.weight": theta[:, perm]}, {"theta.weight": g[:, perm]}, state)
    torch.testing.assert_close(new_p["theta.weight"], new["theta.weight"][:, perm], rtol=0, atol=1e-15)
    # one LSTM for every parameter tensor: the same gradient gives the same step under any name
    two, _ = rule(meta, {"a": theta, "b": theta}, {"a": g, "b": g}, algo.inner_state({"a": theta, "b": theta}))
    torch.testing.assert_close(two["a"], new["theta.weight"])
    torch.testing.assert_close(two["b"], new["theta.weight"])
    # the Jacobian of the update w.r.t. the gradient is diagonal (and not zero)
    jac = jacrev(lambda gg: lstm_update(meta, gg, state, 10.0, 0.1)[0])(g.reshape(-1))  # (6, 6)
    assert torch.count_nonzero(jac - torch.diag(torch.diagonal(jac))) == 0
    assert (torch.diagonal(jac).abs() > 0).all()


def test_state_is_per_coordinate():
    algo, meta = quad_algo(dim=4)
    rule = algo.inner_rule()
    theta = {"w": torch.zeros(1, 4, dtype=torch.float64)}
    h, c = algo.inner_state(theta)
    assert h.shape == c.shape == (2, 4, 20) and not h.any() and not c.any()
    g1 = torch.tensor([[0.5, -2.0, 1.0, 1.0]], dtype=torch.float64)
    theta1, (h1, c1) = rule(meta, theta, {"w": g1}, (h, c))
    # changing coordinate 0's gradient changes only coordinate 0's state
    _, (h1b, c1b) = rule(meta, theta, {"w": g1 * torch.tensor([[3.0, 1, 1, 1]], dtype=torch.float64)}, (h, c))
    assert not torch.equal(h1b[:, 0], h1[:, 0]) and not torch.equal(c1b[:, 0], c1[:, 0])
    assert torch.equal(h1b[:, 1:], h1[:, 1:]) and torch.equal(c1b[:, 1:], c1[:, 1:])
    # the same gradient at step 2 gives different steps where the histories differed (0 vs 1),
    # equal steps where they agreed (2 vs 3): the memory is each coordinate's own
    theta2, _ = rule(meta, theta1, {"w": torch.full((1, 4), 0.3, dtype=torch.float64)}, (h1, c1))
    step = (theta2["w"] - theta1["w"])[0]
    assert step[2] == step[3] and abs(float(step[0] - step[1])) > 1e-6


def reference_unroll_grads(algo, meta, ep, start, detach_at_boundary):
    """Per-task Python loop, plain autograd: gradients of each unroll's meta-loss w.r.t. the LSTM
    as one graph over the whole horizon; optimizee gradients are constants."""
    rule, unroll = algo.inner_rule(), algo.cfg.lstm_unroll
    lstm = {k: v.clone().requires_grad_() for k, v in meta.items()}
    losses = []  # (tasks, horizon)
    for t in range(ep.num_tasks):
        params = {k: v[t] for k, v in start.items()}
        state, row = algo.inner_state(params), []
        for step in range(algo.cfg.lstm_horizon):
            if detach_at_boundary and step % unroll == 0:
                params = {k: v.detach() for k, v in params.items()}
                state = tuple(s.detach() for s in state)
            leaf = {k: v.detach().requires_grad_() for k, v in params.items()}
            g = torch.autograd.grad(algo.task_loss(leaf, ep.support_x[t], ep.support_y[t]), list(leaf.values()))
            params, state = rule(lstm, params, dict(zip(leaf, g)), state)
            row.append(algo.task_loss(params, ep.support_x[t], ep.support_y[t]))
        losses.append(torch.stack(row))
    losses = torch.stack(losses)
    out = []
    for lo in range(0, algo.cfg.lstm_horizon, unroll):
        meta_loss = losses[:, lo:lo + unroll].sum(1).mean()
        out.append(dict(zip(lstm, torch.autograd.grad(meta_loss, list(lstm.values()), retain_graph=True))))
    return out


def test_truncated_bptt_matches_reference():
    algo, meta = quad_algo(dim=4, lstm_unroll=3, lstm_horizon=6)
    ep = quad_episode(3)
    start = algo.start_params(meta, 3, seeding.generator(2, "test"))
    unroll = algo.unroll_fn()
    state = tuple(s.expand(3, *s.shape).clone() for s in algo.inner_state({k: v[0] for k, v in start.items()}))
    g1, (_, p1, s1) = unroll(meta, start, state, ep)
    assert all(v.grad_fn is None and not v.requires_grad for v in [*p1.values(), *s1])
    g2, _ = unroll(meta, p1, s1, ep)
    trunc = reference_unroll_grads(algo, meta, ep, start, detach_at_boundary=True)
    full = reference_unroll_grads(algo, meta, ep, start, detach_at_boundary=False)
    for k in meta:
        torch.testing.assert_close(g1[k], trunc[0][k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g2[k], trunc[1][k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(full[0][k], trunc[0][k])  # the first unroll has no past
    # without truncation the second unroll's gradient would differ: the test can tell
    gap = max(float((full[1][k] - trunc[1][k]).abs().max()) for k in meta)
    assert gap > 1e-4


def test_train_is_unrolls_of_adam_steps_and_deterministic():
    algo, meta = quad_algo(dim=4, lstm_unroll=3, lstm_horizon=6, meta_batch_size=3, meta_lr=0.01)
    ep = quad_episode(3)
    out, opt, curve = algo.train(meta, None, lambda i: ep, 1)
    # by hand: the same start stream, two unrolls, one Adam step each
    start = algo.start_params(meta, 3, seeding.generator(algo.cfg.seed, "train", 1_000_003, 0))
    state = tuple(s.expand(3, *s.shape).clone() for s in algo.inner_state({k: v[0] for k, v in start.items()}))
    m, st, params, total = meta, adam_init(meta), start, 0.0
    for _ in range(2):
        g, (losses, params, state) = algo.unroll_fn()(m, params, state, ep)
        m, st = adam_step(m, g, st, 0.01)
        total += float(losses.mean())
    assert opt["step"] == 2 and curve == [pytest.approx(total / 2, rel=1e-12)]
    for k in meta:
        torch.testing.assert_close(out[k], m[k], rtol=0, atol=0)
    again, _, curve2 = algo.train(meta, None, lambda i: ep, 1)
    assert curve2 == curve and all(torch.equal(again[k], out[k]) for k in meta)
    other = algo.init(seeding.generator(1, "init"))
    assert all(torch.equal(v, algo.init(seeding.generator(0, "init"))[k]) for k, v in meta.items())
    assert not torch.equal(other["lstm/0/w_ih"], meta["lstm/0/w_ih"])


def test_training_lowers_heldout_final_loss():
    algo, meta = quad_algo(dim=10, dtype=torch.float32, lstm_unroll=10, lstm_horizon=20,
                           meta_batch_size=32, meta_lr=0.01)
    tasks = QuadraticTasks(10)
    sample = lambda i: tasks.sample(32, generator=seeding.generator(0, "train", i))  # noqa: E731
    trained, _, curve = algo.train(meta, None, sample, 20)
    held_out = tasks.sample(200, generator=seeding.generator(0, "test"))
    before = evaluate(algo, meta, held_out, 20, seeding.generator(0, "eval"))
    after = evaluate(algo, trained, held_out, 20, seeding.generator(0, "eval"))
    assert after.mean(20) < 0.5 * before.mean(20)
    assert after.mean(20) < 0.5 * after.mean(0)  # it optimises: well below the starting loss
    assert curve[-1] < curve[0]


def test_evaluate_quadratic_matches_manual_steps():
    algo, meta = quad_algo(dim=4)
    ep = quad_episode(5)
    ev = evaluate(algo, meta, ep, 4, seeding.generator(3, "eval"))
    assert ev.loss.shape == (5, 5) and torch.isfinite(ev.loss).all() and ev.accuracy is None
    start = algo.start_params(meta, 5, seeding.generator(3, "eval"))
    assert start["theta.weight"].shape == (5, 1, 4) and 0.002 < float(start["theta.weight"].std()) < 0.03
    rule = algo.inner_rule()
    params = {k: v[2] for k, v in start.items()}
    state = algo.inner_state(params)
    for step in range(5):
        loss = algo.task_loss(params, ep.support_x[2], ep.support_y[2])
        torch.testing.assert_close(ev.loss[step, 2], loss)
        g = torch.func.grad(algo.task_loss)(params, ep.support_x[2], ep.support_y[2])
        params, state = rule(meta, params, g, state)


def test_evaluate_sinusoid():
    cfg = Config(task="sinusoid", algorithm="lstm")
    algo = algorithms.build(cfg)
    meta = algo.init(seeding.generator(0, "init"))
    ep = SinusoidTasks().sample(6, 10, 20, seeding.generator(0, "test"))
    ev = evaluate(algo, meta, ep, 3, seeding.generator(0, "eval"))
    assert ev.loss.shape == (4, 6) and torch.isfinite(ev.loss).all()
    start = algo.start_params(meta, 6, seeding.generator(0, "eval"))
    assert start["net.0.weight"].shape == (6, 40, 1)
    assert not torch.equal(start["net.0.weight"][0], start["net.0.weight"][1])  # fresh init per task
    again = algo.start_params(meta, 6, seeding.generator(0, "eval"))
    assert all(torch.equal(again[k], v) for k, v in start.items())
    torch.testing.assert_close(evaluate(algo, meta, ep, 3, seeding.generator(0, "eval")).loss, ev.loss,
                               rtol=0, atol=0)


def test_bad_input_raises_clearly():
    algo, meta = quad_algo(dim=4)
    ep = quad_episode(2)
    bad = Episode(ep.support_x.clone(), ep.support_y, ep.query_x, ep.query_y)
    bad.support_x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        algo.train(meta, None, lambda i: bad, 1)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(algo, meta, bad, 2)
    with pytest.raises(ValueError, match="missing.*lstm/out/w"):
        algo.train({k: v for k, v in meta.items() if k != "lstm/out/w"}, None, lambda i: ep, 1)
    # a problem scale that overflows: the loss is inf, nothing is applied
    algo32, meta32 = quad_algo(dim=4, dtype=torch.float32, lstm_unroll=2, lstm_horizon=2)
    huge = QuadraticTasks(4, (1e30, 1e30)).sample(2, generator=seeding.generator(0, "test"))
    snapshot = {k: v.clone() for k, v in meta32.items()}
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        algo32.train(meta32, None, lambda i: huge, 1)
    assert all(torch.equal(meta32[k], snapshot[k]) for k in meta32)


def load_experiment():
    spec = importlib.util.spec_from_file_location("lstm_quadratic", REPO / "experiments" / "lstm_quadratic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses of the script look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adam"])
def test_experiment_baselines_match_torch_optim(name):
    exp = load_experiment()
    algo, _ = quad_algo(dim=4)
    ep = quad_episode(1)
    theta = torch.full((1, 4), 0.1, dtype=torch.float64)
    losses = exp.evaluate_optimizer(algo, exp.baseline(name, 0.05), ep, {"theta.weight": theta[None]}, 5)
    leaf = theta.clone().requires_grad_()
    opt = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[name]([leaf], lr=0.05)
    for step in range(6):
        loss = algo.task_loss({"theta.weight": leaf}, ep.support_x[0], ep.support_y[0])
        torch.testing.assert_close(losses[step, 0], loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_experiment_evaluation_agrees_with_adapt_evaluate():
    exp = load_experiment()
    algo, meta = quad_algo(dim=4)
    ep = quad_episode(7)
    start = algo.start_params(meta, 7, seeding.generator(4, "eval"))
    mine = exp.evaluate_optimizer(algo, exp.lstm_rule(algo, meta), ep, start, 6, chunk=3)
    shared = evaluate(algo, meta, ep, 6, seeding.generator(4, "eval"))
    torch.testing.assert_close(mine, shared.loss)
