"""Server-side fusion with hand-made client replies and averages computed by hand (the strategy's own
tests, with real Flower messages, are in test_strategy.py)."""

import math

import pytest
import torch

from fedmeta.config import Config
from fedmeta.optim import adam_init, adam_step
from strategies.fusion import Rejected, build_fusion, validate, weighted_average

GLOBAL = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}


def test_weighted_average_by_hand():
    a = {"w": torch.tensor([[1.0, 1.0], [1.0, 1.0]]), "b": torch.tensor([0.0, 3.0])}
    b = {"w": torch.tensor([[4.0, 0.0], [2.0, 1.0]]), "b": torch.tensor([3.0, 0.0])}
    c = {"w": torch.tensor([[0.0, 2.0], [6.0, 1.0]]), "b": torch.tensor([6.0, 6.0])}
    out = weighted_average([(a, 1.0), (b, 2.0), (c, 3.0)])
    # (1*a + 2*b + 3*c) / 6
    assert torch.equal(out["w"], torch.tensor([[9 / 6, 7 / 6], [23 / 6, 6 / 6]]))
    assert torch.equal(out["b"], torch.tensor([24 / 6, 21 / 6]))
    assert out["w"].dtype == torch.float32


@pytest.mark.parametrize("arrays, weight, reason", [
    ({"w": torch.full((2, 2), math.nan), "b": torch.zeros(2)}, 1, "non-finite"),
    ({"w": torch.zeros(2, 2), "b": torch.tensor([math.inf, 0.0])}, 1, "non-finite"),
    ({"w": torch.zeros(3, 2), "b": torch.zeros(2)}, 1, "shape"),
    ({"w": torch.zeros(2, 2, dtype=torch.float64), "b": torch.zeros(2)}, 1, "dtype"),
    ({"w": torch.zeros(2, 2)}, 1, "missing \\['b'\\]"),
    ({"w": torch.zeros(2, 2), "b": torch.zeros(2), "c": torch.zeros(1)}, 1, "unexpected \\['c'\\]"),
    ({"w": torch.zeros(2, 2), "b": torch.zeros(2)}, 0, "positive"),
    ({"w": torch.zeros(2, 2), "b": torch.zeros(2)}, -1, "positive"),
    ({"w": torch.zeros(2, 2), "b": torch.zeros(2)}, math.nan, "positive"),
    ({"w": torch.zeros(2, 2), "b": torch.zeros(2)}, 1e12, "max-client-weight"),
    ({"w": torch.zeros(2, 2), "b": torch.zeros(2)}, "3", "not a number"),
])
def test_validate_rejects_bad_replies(arrays, weight, reason):
    with pytest.raises(Rejected, match=reason):
        validate(arrays, weight, GLOBAL, max_weight=1e6)


def test_server_adam_keeps_its_moments_across_rounds():
    fusion = build_fusion(Config(fusion="meta-gradient", server_lr=0.1, update_norm_cap=0.0))
    g1, g2 = {k: torch.ones_like(v) for k, v in GLOBAL.items()}, {k: -torch.ones_like(v) for k, v in GLOBAL.items()}
    p = fusion.fuse(fusion.fuse(GLOBAL, [(g1, 1.0)], 1).params, [(g2, 1.0)], 2).params
    ref, state = adam_step(GLOBAL, g1, adam_init(GLOBAL), 0.1)
    ref, state = adam_step(ref, g2, state, 0.1)
    assert all(torch.equal(p[k], ref[k]) for k in p)
    restored = build_fusion(Config(fusion="meta-gradient", server_lr=0.1))
    restored.load_state_dict(fusion.state_dict())
    assert restored.state_dict()["optimizer_state"]["step"] == 2
