"""SCAFFOLD drift correction (drift-correction = "scaffold"): the client's corrected local loop against a
hand-written one, the server's control variates against hand-computed means, and the strategy sending
c - c_i and keeping the replies' c_i only when a round fuses."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from test_strategy import GLOBAL, delivery, reply, sampled, task_identity  # noqa: F401  (real Flower messages)

from fedmeta import drift, local, wire
from fedmeta.config import Config, ConfigError
from fedmeta.optim import adam_init, adam_step
from strategies.controls import ControlVariates, NoControls, build_controls
from strategies.fedmeta_strategy import FedMeta
from strategies.fusion import Rejected, build_fusion
from strategies.roster import Roster

SMALL = Config(local_iterations=3, meta_batch_size=2, shots=3, query_shots=3, drift_correction="scaffold")


def test_corrected_adds_the_correction_and_averages_the_raw_gradients():
    hook = drift.Corrected({"w": torch.tensor([1.0, -1.0])})
    out = [hook({"w": torch.tensor(g)}) for g in ([2.0, 4.0], [0.0, 2.0], [4.0, 0.0])]
    assert [o["w"].tolist() for o in out] == [[3.0, 3.0], [1.0, 1.0], [5.0, -1.0]]
    assert hook.control()["w"].tolist() == [2.0, 2.0]  # (2 + 0 + 4) / 3, (4 + 2 + 0) / 3
    with pytest.raises(ValueError, match="keys"):
        hook({"v": torch.zeros(2)})
    with pytest.raises(ValueError, match="no meta-gradient"):
        drift.Corrected({"w": torch.zeros(2)}).control()


def test_local_train_steps_the_corrected_meta_gradient_and_returns_the_mean_raw_one():
    c = local.client(SMALL, 0, 4)
    params = c.algo.init(torch.Generator().manual_seed(0))
    correction = {k: torch.full_like(v, 0.05) for k, v in params.items()}
    out = local.train(c, params, server_round=2, correction=correction)
    # by hand: the same episodes, Adam on g + correction, the control the mean of the raw g
    p, state, raw = dict(params), adam_init(params), []
    for ep in local.train_episodes(SMALL, c.source, 0, 2, SMALL.local_iterations, c.algo):
        g, _ = c.algo.meta_gradient(p, ep)
        raw.append(g)
        p, state = adam_step(p, {k: g[k] + correction[k] for k in g}, state, SMALL.meta_lr)
    assert all(torch.allclose(out.arrays[k], p[k], atol=1e-6) for k in p)
    assert all(torch.allclose(out.control[k], sum(g[k] for g in raw) / len(raw), atol=1e-6) for k in p)
    plain = local.train(c, params, server_round=2, correction={k: torch.zeros_like(v) for k, v in params.items()})
    uncorrected = local.train(local.client(SMALL.replace(drift_correction="none"), 0, 4), params, server_round=2)
    assert uncorrected.control is None
    assert all(torch.equal(plain.arrays[k], uncorrected.arrays[k]) for k in p)  # zero correction: plain FedMeta


def test_config_refuses_drift_correction_without_local_meta_gradients():
    for bad in ({"fusion": "meta-gradient"}, {"algorithm": "lstm", "task": "quadratic"}):
        with pytest.raises(ConfigError, match="drift-correction"):
            Config(drift_correction="scaffold", **bad)
    with pytest.raises(ConfigError, match="drift-correction"):
        Config(drift_correction="scafold")


def test_control_variates_mean_over_all_training_partitions_by_hand():
    cv = ControlVariates()
    cv.keep({0: {"w": torch.tensor([4.0, 0.0])}, 2: {"w": torch.tensor([0.0, 8.0])}}, server_round=1)
    cv.begin_round({"w": torch.zeros(2)}, num_training=4)  # c = (c_0 + c_2 + 0 + 0) / 4
    assert cv.mean["w"].tolist() == [1.0, 2.0]
    assert cv.correction(0)["w"].tolist() == [-3.0, 2.0]  # c - c_0
    assert cv.correction(1)["w"].tolist() == [1.0, 2.0]  # never trained: c_1 = 0
    assert cv.correction(0)["w"].dtype == torch.float32
    again = ControlVariates()
    again.load_state_dict(cv.state_dict())
    again.begin_round({"w": torch.zeros(2)}, num_training=4)
    assert again.correction(2)["w"].tolist() == [1.0, -6.0]
    empty = ControlVariates()
    empty.begin_round({"w": torch.zeros(2)}, num_training=4)
    assert empty.correction(3)["w"].tolist() == [0.0, 0.0]  # round 1: plain FedMeta
    assert isinstance(build_controls(Config()), NoControls) and NoControls().outgoing(0) == {}


def test_control_variate_replies_are_checked():
    cv = ControlVariates()
    params = {"w": torch.zeros(2, 2)}
    assert cv.parse(RecordDict({wire.CONTROL: ArrayRecord({"w": torch.ones(2, 2)})}), params)["w"].sum() == 4
    for content, why in ((RecordDict({wire.METRICS: MetricRecord({})}), "lacks"),
                         (RecordDict({wire.CONTROL: ArrayRecord({"w": torch.full((2, 2), math.nan)})}), "non-finite"),
                         (RecordDict({wire.CONTROL: ArrayRecord({"w": torch.ones(3, 2)})}), "bytes|shape")):
        with pytest.raises(Rejected, match=why):
            cv.parse(content, params)


def with_control(node: int, arrays: dict, control: dict | None):
    msg = reply(node, arrays, 1)
    if control is not None:
        msg.content[wire.CONTROL] = ArrayRecord(control)
    return msg


def test_strategy_sends_corrections_and_keeps_controls_of_fused_rounds_only():
    cfg = Config(fusion="average", heldout_partitions=1, drift_correction="scaffold")

    class Nodes:
        def get_node_ids(self):
            return [100, 101, 102, 103]

    s = FedMeta(cfg, build_fusion(cfg), controls=build_controls(cfg), roster=Roster(cfg))
    s.roster.refresh(Nodes(), lambda nodes: [])
    ones = {k: torch.ones_like(v) for k, v in GLOBAL.items()}
    zeros = {k: torch.zeros_like(v) for k, v in GLOBAL.items()}
    replies = [with_control(100, GLOBAL, {k: 3 * v for k, v in ones.items()}),
               with_control(101, GLOBAL, zeros),
               with_control(102, GLOBAL, None)]  # a drift-corrected reply must carry its control variate
    _, state = s.aggregate_train(sampled(3), GLOBAL, delivery(replies))
    rows = {r["node_id"]: r for r in state.clients}
    assert [rows[n]["status"] for n in (100, 101, 102)] == ["ok", "ok", "rejected"]
    assert "control-variate" in rows[102]["reason"]
    outgoing, _ = s.configure_train(sampled(3), GLOBAL)
    sent = {t.partition: m.content[wire.CORRECTION].to_torch_state_dict() for t, m in outgoing}
    # c = (3 + 0 + 0) / 3 training partitions = 1: partition 0 gets 1 - 3, 1 gets 1 - 0, 2 (no c_2 kept) 1 - 0
    assert {p: sent[p]["w"].unique().tolist() for p in sent} == {0: [-2.0], 1: [1.0], 2: [1.0]}
    s.cfg = s.cfg.replace(min_train_replies=5)  # a round that does not fuse keeps no control variate
    s.aggregate_train(sampled(1), GLOBAL, delivery([with_control(102, GLOBAL, ones)]))
    assert s.controls.store.get(2) is None
