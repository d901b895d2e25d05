"""The strategy with real Flower messages but hand-made replies: every reply checked and counted once,
fused by hand-computed weights, and a run's status that tells what happened."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta import wire
from fedmeta.config import Config
from strategies.fedmeta_strategy import Delivery, FedMeta, RoundState
from strategies.fusion import build_fusion
from strategies.roster import NodeInfo, Roster, Target
from strategies.sampling import sample_clients

GLOBAL = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are created inside a task; give this process an identity as the simulation does."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def request(node: int, mid: str | None = None) -> Message:
    TaskIdentity.node_id = 1  # the server
    msg = Message(content=RecordDict({wire.CONFIG: ConfigRecord({})}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = mid or f"m{node}"  # as if the SuperLink had delivered it
    return msg


def reply(node: int, arrays: dict, weight, loss: float = 1.0, mid: str | None = None) -> Message:
    req = request(node, mid)
    TaskIdentity.node_id = node  # the replying client
    metrics = MetricRecord({wire.WEIGHT: weight, wire.NUM_TASKS: 5, wire.TRAIN_LOSS: loss, wire.SECONDS: 0.1})
    return Message(RecordDict({wire.ARRAYS: ArrayRecord(arrays), wire.METRICS: metrics}), reply_to=req)


def error_reply(node: int, reason: str) -> Message:
    req = request(node)
    TaskIdentity.node_id = node
    return Message(Error(code=0, reason=reason), reply_to=req)


def strategy(cfg: Config | None = None) -> FedMeta:
    cfg = cfg or Config(fusion="average")
    return FedMeta(cfg, build_fusion(cfg))


def delivery(replies, missing=(), ignored=()) -> Delivery:
    """Node 100 + i serves partition i."""
    return Delivery([(Target(m.metadata.src_node_id, m.metadata.src_node_id - 100), m) for m in replies],
                    [Target(n, n - 100) for n in missing], list(ignored))


def sampled(n: int) -> RoundState:
    return RoundState(1, {"round": 1, "num_sampled": n})


A = {"w": torch.tensor([[1.0, 1.0], [1.0, 1.0]]), "b": torch.tensor([0.0, 3.0])}
B = {"w": torch.tensor([[4.0, 0.0], [2.0, 1.0]]), "b": torch.tensor([3.0, 0.0])}
C = {"w": torch.tensor([[0.0, 2.0], [6.0, 1.0]]), "b": torch.tensor([6.0, 6.0])}
OK = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}


def test_strategy_fuses_valid_replies_and_rejects_bad_ones_by_node():
    s = strategy()
    replies = [
        reply(100, A, 1, loss=1.0), reply(101, B, 2, loss=2.0), reply(102, C, 3, loss=4.0),
        reply(103, {"w": torch.full((2, 2), math.nan), "b": torch.zeros(2)}, 1),
        reply(104, {"w": torch.zeros(3, 2), "b": torch.zeros(2)}, 1),
        reply(105, OK, 0), reply(106, OK, -1), reply(107, OK, math.nan),
        reply(108, {"w": torch.zeros(2, 2)}, 1),
        error_reply(109, "worker raised RuntimeError"),
    ]
    fused, state = s.aggregate_train(sampled(10), GLOBAL, delivery(replies))
    # (1*A + 2*B + 3*C) / 6
    assert torch.allclose(fused["w"], torch.tensor([[9 / 6, 7 / 6], [23 / 6, 6 / 6]]))
    assert torch.allclose(fused["b"], torch.tensor([24 / 6, 21 / 6]))
    rows = {r["node_id"]: r for r in state.clients}
    assert [rows[n]["status"] for n in range(100, 110)] == ["ok"] * 3 + ["rejected"] * 6 + ["failed"]
    assert "non-finite" in rows[103]["reason"] and "shape" in rows[104]["reason"]
    assert "missing" in rows[108]["reason"] and "worker raised" in rows[109]["reason"]
    assert rows[105]["partition_id"] == 5
    assert {k: state.row[k] for k in ("num_sampled", "num_replies", "num_rejected", "num_failures", "fused")} == \
        {"num_sampled": 10, "num_replies": 9, "num_rejected": 6, "num_failures": 1, "fused": 1}
    assert state.row["train_loss"] == pytest.approx((1 * 1 + 2 * 2 + 3 * 4) / 6)


def test_round_without_valid_reply_leaves_the_model_unchanged():
    s = strategy()
    replies = [reply(100, {"w": torch.full((2, 2), math.inf), "b": torch.zeros(2)}, 1)]
    fused, state = s.aggregate_train(sampled(3), GLOBAL, delivery(replies, missing=[101, 102]))
    assert fused is GLOBAL and state.row["fused"] == 0
    assert [r["status"] for r in state.clients] == ["rejected", "failed", "failed"]  # 101, 102 never replied


def test_fewer_valid_replies_than_min_train_replies_keep_the_model():
    s = strategy(Config(min_train_replies=2))
    bad = {"w": torch.full((2, 2), math.nan), "b": torch.zeros(2)}
    fused, state = s.aggregate_train(sampled(2), GLOBAL, delivery([reply(100, A, 1), reply(101, bad, 1)]))
    assert fused is GLOBAL and state.row["fused"] == 0 and state.row["num_rejected"] == 1


class ScriptedGrid:
    """A Grid whose nodes answer with scripted replies (several per message if asked)."""

    def __init__(self, answers: dict[int, list]):
        self.answers = answers  # node -> [(arrays, weight), ...]: each becomes a reply to its message

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{m.metadata.dst_node_id}"
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            node = int(mid[1:])
            out += [reply(node, arrays, w) for arrays, w in self.answers.pop(node, [])]
        return out


def test_a_second_reply_to_one_message_is_ignored_and_recorded():
    """Two replies to one message id used to be both fused (shift 6.667 instead of 5.0) and counted
    (num_replies 3 with 2 sampled, num_failures -1)."""
    s = strategy(Config(fusion="average", poll_interval=0.001))
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    plus = {k: v + 10 for k, v in base.items()}
    grid = ScriptedGrid({100: [(base, 1)], 101: [(plus, 1), (plus, 1)]})
    outgoing = [(Target(n, n - 100), request(n)) for n in (100, 101)]
    d = s.deliver(grid, outgoing, timeout=1.0)
    assert len(d.replies) == 2 and [why for _, why in d.ignored] == ["a second reply to the same message"]
    fused, state = s.aggregate_train(sampled(2), base, d)
    assert torch.equal(fused["w"], torch.full((2, 2), 5.0))  # (0 + 10) / 2, not (0 + 10 + 10) / 3
    assert state.row["num_replies"] == 2 and state.row["num_failures"] == 0 and state.row["num_ignored"] == 1
    assert [r["status"] for r in state.clients].count("ignored") == 1


def test_an_oversized_reply_is_rejected_before_it_is_unpacked(monkeypatch):
    s = strategy()
    huge = {**OK, "extra": torch.zeros(10_000_000)}  # 40 MB the global model does not have
    converted = []
    original = ArrayRecord.to_torch_state_dict

    def spy(self, *a, **k):
        converted.append(len(self))
        return original(self, *a, **k)

    monkeypatch.setattr(ArrayRecord, "to_torch_state_dict", spy)
    _, state = s.aggregate_train(sampled(2), GLOBAL, delivery([reply(100, A, 1), reply(101, huge, 1)]))
    rows = {r["node_id"]: r for r in state.clients}
    assert rows[101]["status"] == "rejected" and 3 not in converted  # the 3-array record was never converted


def test_status_tells_what_happened():
    s = strategy()
    s.totals.update(rounds_run=2, fused=0)
    assert s.outcome()[0] == "failed" and "min-train-replies" in s.outcome()[1]["error"]
    s.totals.update(fused=2, rejected_clients=1)
    status, counts = s.outcome()
    assert status == "completed-with-failures" and counts["rejected_clients"] == 1
    s.totals.update(rejected_clients=0)
    assert s.outcome()[0] == "completed"


def test_sampling_is_a_pure_function_of_seed_round_and_partitions():
    a = sample_clients(3, 7, [5, 1, 9, 2, 8], 0.4, 1)
    assert a == sample_clients(3, 7, [1, 2, 5, 8, 9], 0.4, 1) and len(a) == 2 and a == sorted(a)
    assert sample_clients(3, 7, range(10), 1.0, 2) == list(range(10))
    assert sample_clients(3, 7, range(10), 0.05, 3) == sorted(sample_clients(3, 7, range(10), 0.05, 3))
    assert len(sample_clients(3, 7, range(10), 0.05, 3)) == 3
    assert {tuple(sample_clients(3, r, range(100), 0.1, 1)) for r in range(1, 6)}.__len__() == 5


def test_roster_assigns_partitions_without_asking_and_never_trains_heldout():
    cfg = Config(heldout_partitions=2, min_train_nodes=1, node_wait_timeout=1.0)

    class Nodes:
        def get_node_ids(self):
            return [31, 7, 19, 3]

    r = Roster(cfg)
    asked = []
    r.refresh(Nodes(), lambda nodes: asked.append(nodes) or [])
    assert not asked and r.num_partitions == 4
    assert r.training() == [0, 1] and r.heldout() == [2, 3]
    assert [r.target(p).node for p in range(4)] == [3, 7, 19, 31]


def test_roster_learns_node_partitions_once_when_not_assigned():
    cfg = Config(heldout_partitions=1, assign_partitions=False, node_wait_timeout=1.0)

    class Nodes:
        def get_node_ids(self):
            return [31, 7, 19]

    r = Roster(cfg)
    asked = []

    def ask(nodes):
        asked.append(list(nodes))
        return [(n, NodeInfo(i, 3, i == 2)) for i, n in enumerate(nodes)]

    r.refresh(Nodes(), ask)
    r.refresh(Nodes(), ask)
    assert asked == [[7, 19, 31]]  # once per node
    assert r.training() == [0, 1] and r.heldout() == [2] and r.target(2).node == 31
