"""The composed fusion (`build_fusion`): equal to today's averaging and today's server Adam, robust
pieces wired from the Config, the norm guard against a 1e25 reply, state that resumes bit-exactly,
start-up preconditions and the reply size budget."""

import io
import math

import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedmeta.config import Config, ConfigError
from fedmeta.optim import adam_init, adam_step
from strategies.fusion import (
    FusionError,
    Rejected,
    build_fusion,
    check_preconditions,
    check_size,
    min_replies,
    norm_guard,
    weighted_average,
)

GLOBAL = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}
MG = Config(fusion="meta-gradient", server_lr=0.01)


class ServerAdam:
    """The reference: Adam on the weighted average of the meta-gradients, as central MAML's outer loop."""

    def __init__(self, lr: float) -> None:
        self.lr, self.state = lr, None

    def step(self, params, g):
        self.state = self.state or adam_init(params)
        params, self.state = adam_step(params, g, self.state, self.lr)
        return params


def rand_like(params, gen, scale=1.0):
    return {k: scale * torch.randn(v.shape, generator=gen) for k, v in params.items()}


def theta(w, b):
    return {"w": torch.tensor(w), "b": torch.tensor(b)}


def test_average_with_sgd_lr_1_is_the_weighted_average():
    replies = [(theta([[1.0, 1.0], [1.0, 1.0]], [0.0, 3.0]), 1.0), (theta([[4.0, 0.0], [2.0, 1.0]], [3.0, 0.0]), 1.0),
               (theta([[0.0, 2.0], [6.0, 1.0]], [6.0, 6.0]), 2.0)]
    out = build_fusion(Config()).fuse(GLOBAL, replies, 1)
    # global - (global - avg theta) = avg theta; weights 1/4, 1/4, 1/2 make every value a binary fraction: exact
    assert all(torch.equal(out.params[k], weighted_average(replies)[k]) for k in GLOBAL)
    assert out.params["w"].dtype == torch.float32 and list(out.params) == list(GLOBAL)
    gen = torch.Generator().manual_seed(0)
    replies = [(rand_like(GLOBAL, gen), w) for w in (1.0, 3.0, 7.0)]
    out, avg = build_fusion(Config()).fuse(GLOBAL, replies, 1), weighted_average(replies)
    for k in GLOBAL:  # otherwise equal to float32 rounding (a few ulp of |global| + |avg|)
        assert torch.allclose(out.params[k], avg[k], rtol=0, atol=4 * 2**-23 * 5)
    assert out.info["server_lr"] == 1.0 and out.info["clipped"] == 0 and out.info["num_fused"] == 3


def test_meta_gradient_default_is_todays_server_adam_exactly():
    gen = torch.Generator().manual_seed(1)
    fusion, legacy, params = build_fusion(MG), ServerAdam(lr=0.01), dict(GLOBAL)
    for rnd in range(1, 7):
        grads = [(rand_like(GLOBAL, gen), w) for w in (5.0, 5.0, 3.0)]
        out = fusion.fuse(params, grads, rnd)
        params = legacy.step(params, weighted_average(grads))
        assert all(torch.equal(out.params[k], params[k]) for k in GLOBAL) and out.info["clipped"] == 0


def test_robust_pieces_come_from_the_config():
    # meta-gradient + sgd lr 1: new = global - G, so G is visible. d = (w00, w01, w10, w11, b0, b1)
    d = [theta([[1.0, 0.0], [0.0, 0.0]], [0.0, 0.0]), theta([[2.0, 2.0], [0.0, 0.0]], [1.0, 0.0]),
         theta([[0.0, 4.0], [0.0, 0.0]], [3.0, 0.0]), theta([[-6.0, 8.0], [0.0, 0.0]], [0.0, 0.0])]
    cfg = MG.replace(server_optimizer="sgd", server_lr=1.0, update_norm_cap=0.0)
    krum = build_fusion(cfg.replace(aggregator="krum", krum_byzantine=0, krum_select=1))
    out = krum.fuse(GLOBAL, list(zip(d, [1.0, 1.0, 2.0, 4.0])), 1)  # Krum scores (32, 18, 38, 162): d2
    assert torch.equal(out.params["w"], GLOBAL["w"] - d[1]["w"]) and out.info["num_selected"] == 1
    capped = build_fusion(cfg.replace(weight_policy="capped", weight_cap=2.0))
    out = capped.fuse(GLOBAL, list(zip(d, [1.0, 1.0, 2.0, 4.0])), 1)  # weights (1, 1, 2, 3): 1 capped, total 7
    assert out.info["num_capped"] == 1 and out.info["total_weight"] == 7.0
    assert torch.allclose(out.params["b"], GLOBAL["b"] - torch.tensor([7 / 7, 0.0]))
    med = build_fusion(cfg.replace(aggregator="median")).fuse(GLOBAL, list(zip(d, [1.0] * 4)), 1)
    assert torch.equal(med.params["w"][0], GLOBAL["w"][0] - torch.tensor([0.5, 3.0]))  # hand medians 0.5, 3
    clip = build_fusion(cfg.replace(aggregator="clipped-mean", clip_multiple=1.5))
    assert clip.fuse(GLOBAL, list(zip(d, [1.0] * 4)), 1).info["num_clipped"] == 1  # ||d4|| 10 > 1.5 x 4
    assert all(isinstance(v, (int, float)) for v in out.info.values())


def test_too_few_replies_at_run_time_leave_the_state_alone():
    fusion = build_fusion(MG.replace(aggregator="krum", krum_byzantine=1))
    gen = torch.Generator().manual_seed(2)
    fusion.fuse(GLOBAL, [(rand_like(GLOBAL, gen), 1.0) for _ in range(5)], 1)
    before = fusion.state_dict()
    with pytest.raises(FusionError, match="at least 5 replies, got 4"):
        fusion.fuse(GLOBAL, [(rand_like(GLOBAL, gen), 1.0) for _ in range(4)], 2)
    with pytest.raises(FusionError, match="no valid reply"):
        fusion.fuse(GLOBAL, [], 2)
    assert fusion.state_dict()["optimizer_state"] is before["optimizer_state"]


def test_norm_guard_by_hand():
    g = {"x": torch.tensor([30.0, 40.0], dtype=torch.float64)}  # ||G|| = 50
    out, info = norm_guard(g, [1.0, 2.0, 100.0], [], 10.0)  # no history: reference = median reply norm 2
    assert info == {"update_norm": 50.0, "update_norm_ref": 2.0, "update_norm_applied": 20.0, "clipped": 1}
    assert torch.allclose(out["x"], torch.tensor([12.0, 16.0], dtype=torch.float64))  # scaled by 20 / 50
    out, info = norm_guard(g, [1.0], [4.0, 6.0, 100.0], 10.0)  # history median 6: bound 60 > 50
    assert out is g and info["clipped"] == 0 and info["update_norm_ref"] == 6.0
    assert norm_guard(g, [1.0], [], 0.0)[1]["clipped"] == 0  # 0: off


def honest(gen):
    return [(rand_like(GLOBAL, gen), 1.0) for _ in range(3)]


def test_a_1e25_reply_no_longer_freezes_the_server_adam():
    """Issue 10: one finite 1e25 meta-gradient made Adam's second moment inf in float32, after which
    every honest round moved the model by 0."""
    gen = torch.Generator().manual_seed(3)
    fusion, params = build_fusion(MG), dict(GLOBAL)
    params = fusion.fuse(params, honest(gen), 1).params
    attack = honest(gen) + [({k: torch.full_like(v, 1e25) for k, v in GLOBAL.items()}, 1.0)]
    out = fusion.fuse(params, attack, 2)
    assert out.info["clipped"] == 1 and out.info["update_norm"] > 1e24
    params = out.params
    for rnd in range(3, 6):
        new = fusion.fuse(params, honest(gen), rnd).params
        assert all((new[k] - params[k]).abs().min() > 0 for k in GLOBAL)  # every coordinate still moves
        params = new
    state = fusion.state_dict()["optimizer_state"]
    assert all(torch.isfinite(t).all() for part in ("exp_avg", "exp_avg_sq") for t in state[part].values())
    # without the guard the round is refused (its Adam step is not finite) instead of poisoning the state
    unguarded = build_fusion(MG.replace(update_norm_cap=0.0))
    unguarded.fuse(GLOBAL, honest(gen), 1)
    with pytest.raises(FusionError, match="not finite"):
        unguarded.fuse(GLOBAL, attack, 2)
    assert unguarded.state_dict()["optimizer_state"]["step"] == 1


@pytest.mark.parametrize("changes", [
    {"fusion": "meta-gradient"}, {"server_optimizer": "sgd", "server_momentum": 0.9, "server_lr": 0.7},
    {"server_optimizer": "yogi", "server_lr": 0.05, "server_eps": 1e-3}, {"server_optimizer": "adagrad"},
    {"server_optimizer": "adam", "aggregator": "trimmed-mean", "trim_fraction": 0.25, "server_lr_schedule": "cosine"},
])
def test_state_round_trip_resumes_bit_exactly(changes):
    cfg = Config(num_rounds=6, **changes)
    gen = torch.Generator().manual_seed(4)
    rounds = [[(rand_like(GLOBAL, gen, scale=10.0 ** (r % 3)), float(i + 1)) for i in range(4)] for r in range(6)]
    whole, p = build_fusion(cfg), dict(GLOBAL)
    for r in range(6):
        p = whole.fuse(p, rounds[r], r + 1).params
    first, q = build_fusion(cfg), dict(GLOBAL)
    for r in range(3):
        q = first.fuse(q, rounds[r], r + 1).params
    buf = io.BytesIO()
    torch.save({"params": q, "fusion": first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed, q = build_fusion(cfg), ckpt["params"]
    resumed.load_state_dict(ckpt["fusion"], params=q)
    for r in range(3, 6):
        q = resumed.fuse(q, rounds[r], r + 1).params
    assert all(torch.equal(p[k], q[k]) for k in GLOBAL)
    assert resumed.state_dict()["norm_history"] == whole.state_dict()["norm_history"]
    assert len(whole.state_dict()["norm_history"]) == 6


def test_load_state_dict_refuses_what_does_not_fit():
    gen = torch.Generator().manual_seed(5)
    adam = build_fusion(MG)
    adam.fuse(GLOBAL, honest(gen), 1)
    with pytest.raises(ValueError, match="'adam', this run's server-optimizer is 'sgd'"):
        build_fusion(Config()).load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="does not fit the model"):
        build_fusion(MG).load_state_dict(adam.state_dict(), params={"w": torch.zeros(3)})


@pytest.mark.parametrize("changes, expected, message", [
    ({"aggregator": "median"}, 2, r"'median' needs at least 3 replies per round .* but 2 are expected"),
    ({"aggregator": "clipped-mean"}, 2, "needs at least 3"),
    ({"aggregator": "trimmed-mean", "trim_fraction": 0.1}, 5, r"at least 10 .*trim-fraction = 0.1.* but 5"),
    ({"aggregator": "krum", "krum_byzantine": 2}, 6, r"at least 7 .*krum-byzantine \+ 2 = 6.* but 6"),
    ({"aggregator": "krum", "krum_byzantine": 1, "krum_select": 5}, 5, "krum-select = 5 exceeds the 5 expected"),
])
def test_preconditions_name_keys_and_numbers(changes, expected, message):
    with pytest.raises(ConfigError, match=message):
        check_preconditions(Config(**changes), expected)


def test_preconditions_that_hold():
    for changes, n in [({}, 1), ({"aggregator": "median"}, 3), ({"aggregator": "trimmed-mean"}, 10),
                       ({"aggregator": "trimmed-mean", "trim_fraction": 0.0}, 1), ({"aggregator": "krum"}, 5),
                       ({"aggregator": "krum", "krum_select": 4}, 5)]:
        check_preconditions(Config(**changes), n)
        assert min_replies(Config(**changes)) == n


def test_size_budget_before_unpacking_a_real_array_record():
    check_size(ArrayRecord(GLOBAL), GLOBAL)  # the model's own size passes (with its .npy headers)
    extra = ArrayRecord({**GLOBAL, "big": torch.zeros(10**6)})
    with pytest.raises(Rejected, match=r"missing \[\], unexpected \['big'\]"):
        check_size(extra, GLOBAL)
    with pytest.raises(Rejected, match=r"w: 16128 bytes exceed the 4112 bytes"):  # 4000 floats + 128 header
        check_size(ArrayRecord({"w": torch.zeros(2000, 2), "b": GLOBAL["b"]}), GLOBAL)
    # an array that claims the right shape but carries 1 MB: judged by its bytes, never unpacked
    liar = ArrayRecord({"w": Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=b"\0" * 10**6),
                        "b": Array(GLOBAL["b"].numpy())})
    with pytest.raises(Rejected, match="w: 1000000 bytes exceed"):
        check_size(liar, GLOBAL)
    assert math.isclose(len(ArrayRecord(GLOBAL)["w"].data), 16 + 128)
