"""Server optimizers against hand computation (two steps) and against torch.optim where the update
is the same; round schedules at chosen rounds."""

import math

import pytest
import torch

from fedmeta.config import Config
from fedmeta.optim import adam_init, adam_step
from strategies.server_optimizers import (
    SGD,
    Adagrad,
    Adam,
    Yogi,
    build_optimizer,
    client_lr_factor,
    lr_factor,
    server_lr,
)

X = {"x": torch.tensor([1.0, -2.0])}
G1, G2 = {"x": torch.tensor([0.5, -1.0])}, {"x": torch.tensor([-0.25, 2.0])}


def two_steps(opt, lr):
    p, s = opt.step(X, G1, opt.init(X), lr)
    p, s = opt.step(p, G2, s, lr)
    return p["x"], s


def close(got, want):
    assert torch.allclose(got, torch.tensor(want, dtype=got.dtype), rtol=0, atol=1e-6), (got, want)


def test_sgd_momentum_by_hand():
    # lr 0.5, momentum 0.5. step 1: v = G1 = (0.5, -1), x = (1, -2) - 0.5 v = (0.75, -1.5)
    # step 2: v = 0.5 (0.5, -1) + (-0.25, 2) = (0, 1.5), x = (0.75, -1.5) - 0.5 v = (0.75, -2.25)
    x, s = two_steps(SGD(momentum=0.5), 0.5)
    assert torch.equal(x, torch.tensor([0.75, -2.25])) and s["step"] == 2
    assert torch.equal(s["momentum_buffer"]["x"], torch.tensor([0.0, 1.5]))
    assert torch.equal(X["x"], torch.tensor([1.0, -2.0])) and torch.equal(G1["x"], torch.tensor([0.5, -1.0]))
    # no momentum, lr 1: x - G1 - G2 = (1 - 0.5 + 0.25, -2 + 1 - 2)
    x, s = two_steps(SGD(), 1.0)
    assert torch.equal(x, torch.tensor([0.75, -3.0])) and s == {"step": 2}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_equals_torch_sgd(momentum):
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_opt = torch.optim.SGD(ref.values(), lr=0.3, momentum=momentum)
    opt = SGD(momentum)
    state = opt.init(params)
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        for k, p in ref.items():
            p.grad = grads[k].clone()
        torch_opt.step()
        params, state = opt.step(params, grads, state, 0.3)
    assert all(torch.equal(params[k], ref[k].detach()) for k in params)


def test_adam_is_fedmeta_adam_step_and_handles_lr_zero():
    x, s = two_steps(Adam(), 0.1)
    p, ref = adam_step(X, G1, adam_init(X), 0.1)
    p, ref = adam_step(p, G2, ref, 0.1)
    assert torch.equal(x, p["x"]) and s["step"] == 2
    # by hand: step 2 has m = 0.9 * 0.1 G1 + 0.1 G2 = (0.02, 0.11), v = 0.999 * 0.001 G1^2 + 0.001 G2^2
    # = (0.00031225, 0.004999); x2 = x1 - 0.1 (m / 0.19) / (sqrt(v / 0.001999) + 1e-8), x1 = x0 - 0.1 sign(G1)
    close(x, [0.9 - 0.1 * (0.02 / 0.19) / (math.sqrt(0.00031225 / 0.001999) + 1e-8),
              -1.9 - 0.1 * (0.11 / 0.19) / (math.sqrt(0.004999 / 0.001999) + 1e-8)])
    same, s = Adam().step(X, G1, adam_init(X), 0.0)  # a schedule's last round: moments move, the model not
    assert torch.equal(same["x"], X["x"]) and s["step"] == 1 and torch.equal(s["exp_avg"]["x"], 0.1 * G1["x"])


def test_yogi_by_hand():
    # beta1 0.9, beta2 0.99, tau 0.5 (v starts at tau^2 = 0.25), lr 0.1
    # step 1: m = 0.1 G1 = (0.05, -0.1); G1^2 = (0.25, 1):
    #   v0 - G^2 = (0, -0.75): sign (0, -1) -> v = 0.25 - 0.01 * (0.25 * 0, 1 * -1) = (0.25, 0.26)
    #   x = (1 - 0.1 * 0.05 / (0.5 + 0.5), -2 + 0.1 * 0.1 / (sqrt(0.26) + 0.5)) = (0.995, ...)
    # step 2: m = 0.9 m + 0.1 G2 = (0.045 - 0.025, -0.09 + 0.2) = (0.02, 0.11); G2^2 = (0.0625, 4):
    #   v - G^2 = (0.1875, -3.74): sign (1, -1) -> v = (0.25 - 0.000625, 0.26 + 0.04) = (0.249375, 0.3)
    x, s = two_steps(Yogi(0.9, 0.99, 0.5), 0.1)
    close(s["v"]["x"], [0.249375, 0.3])
    close(s["m"]["x"], [0.02, 0.11])
    x1 = [0.995, -2 + 0.1 * 0.1 / (math.sqrt(0.26) + 0.5)]
    close(x, [x1[0] - 0.1 * 0.02 / (math.sqrt(0.249375) + 0.5), x1[1] - 0.1 * 0.11 / (math.sqrt(0.3) + 0.5)])


def test_adagrad_by_hand():
    # beta1 0.9, tau 0.5 (v starts at 0.25), lr 0.1. step 1: m = (0.05, -0.1), v = 0.25 + (0.25, 1) = (0.5, 1.25)
    # step 2: m = (0.02, 0.11), v = (0.5 + 0.0625, 1.25 + 4) = (0.5625, 5.25): sqrt(0.5625) = 0.75
    x, s = two_steps(Adagrad(0.9, 0.5), 0.1)
    close(s["v"]["x"], [0.5625, 5.25])
    x1 = [1 - 0.1 * 0.05 / (math.sqrt(0.5) + 0.5), -2 + 0.1 * 0.1 / (math.sqrt(1.25) + 0.5)]
    close(x, [x1[0] - 0.1 * 0.02 / 1.25, x1[1] - 0.1 * 0.11 / (math.sqrt(5.25) + 0.5)])


def test_adagrad_without_momentum_equals_torch_adagrad():
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(5, generator=gen)}
    ref = params["w"].clone().requires_grad_()
    tau = 1e-3
    torch_opt = torch.optim.Adagrad([ref], lr=0.05, eps=tau, initial_accumulator_value=tau**2)
    opt, state = Adagrad(0.0, tau), Adagrad(0.0, tau).init(params)
    for _ in range(5):
        g = torch.randn(5, generator=gen)
        ref.grad = g.clone()
        torch_opt.step()
        params, state = opt.step(params, {"w": g}, state, 0.05)
    assert torch.equal(params["w"], ref.detach())


def test_build_optimizer_reads_the_config():
    assert build_optimizer(Config()) == SGD(0.0)
    assert build_optimizer(Config(fusion="meta-gradient")) == Adam((0.9, 0.999), 1e-8)
    assert build_optimizer(Config(server_optimizer="sgd", server_momentum=0.9)) == SGD(0.9)
    assert build_optimizer(Config(server_optimizer="yogi", server_beta2=0.99, server_eps=1e-3)) == Yogi(0.9, 0.99, 1e-3)
    assert build_optimizer(Config(server_optimizer="adagrad", server_beta1=0.0)) == Adagrad(0.0, 1e-8)


def test_schedules_at_chosen_rounds():
    cfg = Config(num_rounds=11, schedule_step_every=3, schedule_step_factor=0.5, schedule_min_factor=0.1,
                 server_lr_schedule="step", client_lr_schedule="cosine", server_optimizer="adam", server_lr=0.01)
    assert [lr_factor("constant", r, cfg) for r in (1, 6, 11)] == [1.0, 1.0, 1.0]
    # step: rounds 1-3 x1, 4-6 x0.5, 7-9 x0.25, 10-11 x0.125
    assert [lr_factor("step", r, cfg) for r in (1, 3, 4, 6, 7, 10, 11)] == [1, 1, 0.5, 0.5, 0.25, 0.125, 0.125]
    # cosine, t = (r - 1) / 10: 0.1 + 0.9 (1 + cos(pi t)) / 2: t = 0 -> 1, 0.2 -> 0.1 + 0.45 (1 + cos 36 deg),
    # 0.5 -> 0.55, 1 -> 0.1
    assert lr_factor("cosine", 1, cfg) == 1.0 and lr_factor("cosine", 11, cfg) == pytest.approx(0.1, abs=1e-15)
    assert lr_factor("cosine", 3, cfg) == pytest.approx(0.1 + 0.45 * (1 + 0.8090169943749475))
    assert lr_factor("cosine", 6, cfg) == pytest.approx(0.55)
    assert server_lr(cfg, 4) == 0.005 and client_lr_factor(cfg, 6) == pytest.approx(0.55)
    assert lr_factor("cosine", 1, cfg.replace(num_rounds=1)) == 1.0
    assert server_lr(Config(), 7) == 1.0 and server_lr(Config(fusion="meta-gradient"), 7) == 1e-3
