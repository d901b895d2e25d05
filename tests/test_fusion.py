"""Server-side fusion with hand-made client replies and averages computed by hand."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta import wire
from fedmeta.config import Config
from fedmeta.optim import adam_init, adam_step
from strategies.fedmeta_strategy import FedMeta, NodeInfo
from strategies.fusion import AdamStep, Rejected, Replace, validate, weighted_average

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


def test_adam_step_keeps_its_moments_across_rounds():
    opt = AdamStep(lr=0.1)
    g1, g2 = {k: torch.ones_like(v) for k, v in GLOBAL.items()}, {k: -torch.ones_like(v) for k, v in GLOBAL.items()}
    p = opt.step(opt.step(GLOBAL, g1), g2)
    ref, state = adam_step(GLOBAL, g1, adam_init(GLOBAL), 0.1)
    ref, state = adam_step(ref, g2, state, 0.1)
    assert all(torch.equal(p[k], ref[k]) for k in p)
    restored = AdamStep(lr=0.1)
    restored.load_state_dict(opt.state_dict())
    assert restored.state["step"] == 2
    assert Replace().step(GLOBAL, g1) is g1


# --- the strategy, with real Flower messages ------------------------------------------------------
@pytest.fixture(autouse=True)
def task_identity():
    """Messages are created inside a task; give this process an identity as the simulation does."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def request(node: int) -> Message:
    TaskIdentity.node_id = 1  # the server
    msg = Message(content=RecordDict({wire.CONFIG: ConfigRecord({})}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"m{node}"  # as if the SuperLink had delivered it
    return msg


def reply(node: int, arrays: dict, weight, loss: float = 1.0) -> Message:
    req = request(node)
    TaskIdentity.node_id = node  # the replying client
    metrics = MetricRecord({wire.WEIGHT: weight, wire.NUM_TASKS: 5, wire.TRAIN_LOSS: loss, wire.SECONDS: 0.1})
    return Message(RecordDict({wire.ARRAYS: ArrayRecord(arrays), wire.METRICS: metrics}), reply_to=req)


def error_reply(node: int, reason: str) -> Message:
    req = request(node)
    TaskIdentity.node_id = node
    return Message(Error(code=0, reason=reason), reply_to=req)


def strategy(n_nodes: int) -> FedMeta:
    s = FedMeta(Config(fusion="average"), Replace())
    s.nodes = {100 + i: NodeInfo(i, n_nodes, False) for i in range(n_nodes)}
    s._sampled = sorted(s.nodes)
    s._global = {k: v.clone() for k, v in GLOBAL.items()}
    return s


def test_strategy_fuses_valid_replies_and_rejects_bad_ones_by_node():
    s = strategy(10)
    a = {"w": torch.tensor([[1.0, 1.0], [1.0, 1.0]]), "b": torch.tensor([0.0, 3.0])}
    b = {"w": torch.tensor([[4.0, 0.0], [2.0, 1.0]]), "b": torch.tensor([3.0, 0.0])}
    c = {"w": torch.tensor([[0.0, 2.0], [6.0, 1.0]]), "b": torch.tensor([6.0, 6.0])}
    ok = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    replies = [
        reply(100, a, 1, loss=1.0), reply(101, b, 2, loss=2.0), reply(102, c, 3, loss=4.0),
        reply(103, {"w": torch.full((2, 2), math.nan), "b": torch.zeros(2)}, 1),
        reply(104, {"w": torch.zeros(3, 2), "b": torch.zeros(2)}, 1),
        reply(105, ok, 0), reply(106, ok, -1), reply(107, ok, math.nan),
        reply(108, {"w": torch.zeros(2, 2)}, 1),
        error_reply(109, "worker raised RuntimeError"),
    ]
    arrays, metrics = s.aggregate_train(1, reversed(replies))  # arrival order must not matter
    fused = arrays.to_torch_state_dict()
    assert torch.allclose(fused["w"], torch.tensor([[9 / 6, 7 / 6], [23 / 6, 6 / 6]]))
    assert torch.allclose(fused["b"], torch.tensor([24 / 6, 21 / 6]))
    assert metrics[wire.TRAIN_LOSS] == pytest.approx((1 * 1 + 2 * 2 + 3 * 4) / 6)
    rows = {r["node_id"]: r for r in s._rows}
    assert [rows[n]["status"] for n in range(100, 110)] == ["ok"] * 3 + ["rejected"] * 6 + ["failed"]
    assert "non-finite" in rows[103]["reason"] and "shape" in rows[104]["reason"]
    assert "missing" in rows[108]["reason"] and "worker raised" in rows[109]["reason"]
    assert rows[105]["partition_id"] == 5
    assert s._round == {"num_sampled": 10, "num_replies": 9, "num_rejected": 6, "num_failures": 1,
                        "train_loss": pytest.approx(17 / 6)}


def test_round_without_valid_reply_leaves_the_model_unchanged():
    s = strategy(3)
    replies = [reply(100, {"w": torch.full((2, 2), math.inf), "b": torch.zeros(2)}, 1)]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is None and metrics is None
    assert all(torch.equal(s._global[k], GLOBAL[k]) for k in GLOBAL)
    assert [r["status"] for r in s._rows] == ["rejected", "failed", "failed"]  # 101, 102 never replied
