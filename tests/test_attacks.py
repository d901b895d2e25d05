"""The attacking ClientApp (clients/attacks.py): the transformations by hand, and through a real simulation
(Ray backend) that the attacked partitions' replies are exactly those transformations of the honest replies,
which `fedmeta.local` recomputes here: the claimed weights in clients.csv and the fused model."""

import math

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.simulation import run_simulation
from flwr.supercore.task_identity import TaskIdentity

from clients.attacks import (
    Attack,
    attack_app,
    attacked_reply,
    flip_gradient,
    flip_parameters,
)
from fedmeta import algorithms, local, partition, seeding, wire
from fedmeta.config import Config
from fedmeta.optim import adam_init, adam_step
from fedmeta.results import load_meta_model, load_run
from strategies.server_app import server_app

NODES, HELDOUT = 4, 1  # training partitions 0, 1, 2; partition 3 evaluates
ATTACK = Attack(flip=(1,), scale=10.0, inflate=(2,), factor=100.0)


def test_flips_by_hand():
    g, theta = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}, {"w": torch.tensor([1.5, -3.0]),
                                                                            "b": torch.tensor([0.0])}
    sent = flip_parameters(g, theta, 10.0)  # global - 10 (theta - global)
    assert sent["w"].tolist() == [-4.0, 8.0] and sent["b"].tolist() == [5.5] and sent["w"].dtype == torch.float32
    # the server's pseudo-gradient global - theta_sent is 10 x the honest one, global - theta, with its sign flipped
    assert torch.equal(g["w"] - sent["w"], -10 * (g["w"] - theta["w"]))
    assert flip_gradient({"w": torch.tensor([0.25, -1.0])}, 10.0)["w"].tolist() == [-2.5, 10.0]


def test_attack_spec_is_checked():
    assert Attack().attackers == () and Attack(flip=(5, 2), inflate=(2, 7)).attackers == (2, 5, 7)
    for bad in ({"scale": 0.0}, {"factor": math.inf}, {"flip": (1, 1)}, {"inflate": (-1,)}, {"flip": (True,)}):
        with pytest.raises(ValueError, match="Attack"):
            Attack(**bad)


@pytest.fixture
def task_identity():
    """Messages are created inside a task; give this process an identity as the simulation does."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def message_pair(partition_id: int, fusion: str = "average") -> tuple[Message, Message]:
    """A TRAIN message with a global model and a client's reply to it (new model, weight 10, partition id)."""
    g = {"w": torch.tensor([1.0, 2.0])}
    TaskIdentity.node_id = 1  # the server
    msg = Message(RecordDict({wire.ARRAYS: ArrayRecord(g), wire.ROUND: ConfigRecord({wire.SERVER_ROUND: 1})}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m7"  # as if the SuperLink had delivered it
    TaskIdentity.node_id = 7  # the replying client
    key = wire.GRADIENT if fusion == "meta-gradient" else wire.ARRAYS
    metrics = MetricRecord({wire.WEIGHT: 10, wire.NUM_TASKS: 10, wire.TRAIN_LOSS: 0.5, wire.PARTITION_ID: partition_id})
    reply = Message(RecordDict({key: ArrayRecord({"w": torch.tensor([1.5, 1.0])}), wire.METRICS: metrics,
                                wire.OPTIMIZER: ArrayRecord({wire.OPTIMIZER: torch.tensor([3.0])})}), reply_to=msg)
    return msg, reply


@pytest.mark.parametrize("fusion,expected", [("average", [-4.0, 12.0]), ("meta-gradient", [-15.0, -10.0])])
def test_attacked_reply_changes_only_the_update_and_the_claim(fusion, expected, task_identity):
    key = wire.GRADIENT if fusion == "meta-gradient" else wire.ARRAYS
    msg, reply = message_pair(0, fusion)
    assert attacked_reply(msg, reply, ATTACK) is reply  # partition 0 is honest
    for p, flipped, weight in ((1, True, 10), (2, False, 1000.0)):
        msg, reply = message_pair(p, fusion)
        out = attacked_reply(msg, reply, ATTACK)
        sent = out.content[key].to_torch_state_dict()["w"].tolist()
        assert sent == (expected if flipped else [1.5, 1.0])
        assert out.content[wire.METRICS][wire.WEIGHT] == weight and out.content[wire.METRICS][wire.NUM_TASKS] == 10
        assert out.content[wire.OPTIMIZER].to_torch_state_dict()[wire.OPTIMIZER].tolist() == [3.0]  # passes through
        assert out.metadata.reply_to_message_id == msg.metadata.message_id


# --- a real simulation -----------------------------------------------------------------------------------------
def simulate(cfg: Config, attack: Attack) -> None:
    run_simulation(server_app=server_app(cfg), client_app=attack_app(attack), num_supernodes=NODES,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})


def by_hand(cfg: Config, rounds: int, attack: Attack = ATTACK) -> tuple[dict, list[dict]]:
    """The global model after `rounds` rounds and each round's claimed weights, recomputed with the core:
    honest local training (`fedmeta.local`), `attack`'s transformations, then the server's fusion written out:
    weighted mean of the pseudo-gradients d_i (claimed weights), server SGD lr 1 ("average") or Adam
    ("meta-gradient")."""
    params = algorithms.build(cfg).init(seeding.generator(cfg.seed, "init"))
    train = [p for p in range(NODES) if not partition.is_heldout(cfg, p, NODES)]
    states, adam, claims = dict.fromkeys(train), adam_init(params), []
    for rnd in range(1, rounds + 1):
        d, w = [], []
        for p in train:
            out = local.train(local.client(cfg, p, NODES), params, rnd, states[p])
            states[p] = out.optimizer_state
            if cfg.fusion == "meta-gradient":
                sent = flip_gradient(out.arrays, attack.scale) if p in attack.flip else out.arrays
                d.append(sent)
            else:
                sent = flip_parameters(params, out.arrays, attack.scale) if p in attack.flip else out.arrays
                d.append({k: params[k].double() - sent[k].double() for k in params})
            w.append(out.num_tasks * (attack.factor if p in attack.inflate else 1))
        claims.append(dict(zip(train, w)))
        G = {k: sum(wi * di[k].double() for wi, di in zip(w, d)) / sum(w) for k in params}
        if cfg.fusion == "meta-gradient":
            params, adam = adam_step(params, {k: v.float() for k, v in G.items()}, adam, cfg.server_lr)
        else:
            params = {k: (params[k].double() - G[k]).float() for k in params}
    return params, claims


@pytest.mark.parametrize("fusion,rounds", [("average", 2), ("meta-gradient", 2)])
def test_the_attacked_replies_reach_the_server_exactly(fusion, rounds, tmp_path):
    # update-norm-cap 0: the guard would legitimately scale the flipped round down; the fusion is the plain mean
    cfg = Config(fusion=fusion, num_rounds=rounds, local_iterations=2, meta_batch_size=5, heldout_partitions=HELDOUT,
                 eval_tasks=5, eval_steps=1, update_norm_cap=0.0, server_lr=0.01 if fusion == "meta-gradient" else 0.0,
                 results_dir=str(tmp_path), run_name="attacked")
    simulate(cfg, ATTACK)
    run = load_run(tmp_path / "attacked")
    assert run.status["status"] == "completed"
    expected, claims = by_hand(cfg, rounds)
    train = run.clients[run.clients["phase"] == "train"]
    for rnd, claim in enumerate(claims, start=1):
        got = train[train["round"] == rnd].set_index("partition_id")
        assert {p: got.loc[p, "weight"] for p in claim} == claim  # the 100 x claim arrived as sent
        assert (got["num_tasks"] == 10).all()
    fed = load_meta_model(tmp_path / "attacked" / "model.pt").params
    gap = max(float((fed[k] - expected[k]).abs().max()) for k in expected)
    assert gap <= 1e-5, gap
    honest, _ = by_hand(cfg, rounds, Attack())
    assert max(float((fed[k] - honest[k]).abs().max()) for k in honest) > 1e-3  # the attack changed the model

