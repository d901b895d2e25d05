"""An attacking ClientApp for the Byzantine benchmark: the honest handlers of `clients/client_app.py`, with the
TRAIN replies of chosen partitions transformed before they leave the node.

Two attacks (issue 11, the Byzantine table; Blanchard et al. 2017 and Baruch et al. 2019 use the same kinds):

- sign flip x s (`Attack.flip`): the client's move is reversed and scaled. "average" fusion sends
  theta_sent = global - s (theta - global), i.e. the pseudo-gradient the server sees, global - theta_sent,
  is s x the honest move with its sign flipped; "meta-gradient" fusion sends g_sent = -s g.
- inflated weight x f (`Attack.inflate`): an honest update that claims f x the weight (number of tasks) it
  used, so that a claimed-weight average follows that one non-IID client.

The attack specification reaches the Ray workers inside the app: `attack_app(attack)` builds a ClientApp
whose handlers close over `attack`; Flower's simulation engine sends the app (cloudpickled: the nested
handlers by value, with their closure, the honest module by reference) with every message to the actor
that runs it. tests/test_attacks.py checks, through a real simulation, that the attacked partitions'
replies are exactly these transformations of the honest ones.

    run_simulation(server_app=server_app(cfg), client_app=attack_app(Attack(flip=(2, 5), inflate=(7,))),
                   num_supernodes=10, backend_config=...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import client_app as honest
from clients.records import from_record, to_record
from fedmeta import wire
from fedmeta.optim import Params


@dataclass(frozen=True)
class Attack:
    """Which partitions attack, and how strongly. The default attacks nobody (the honest run)."""

    flip: tuple[int, ...] = ()  # partitions whose update is sign-flipped and scaled by `scale`
    scale: float = 10.0
    inflate: tuple[int, ...] = ()  # partitions that claim `factor` x their weight
    factor: float = 100.0

    def __post_init__(self) -> None:
        for name in ("scale", "factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                       and value > 0):
                raise ValueError(f"Attack.{name} = {value!r}: must be a finite number > 0")
        for name in ("flip", "inflate"):
            parts = getattr(self, name)
            if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in parts):
                raise ValueError(f"Attack.{name} = {parts!r}: partition ids must be integers >= 0")
            if len(set(parts)) != len(parts):
                raise ValueError(f"Attack.{name} = {parts!r}: a partition is named twice")

    @property
    def attackers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.flip) | set(self.inflate)))


def flip_parameters(global_params: Params, theta: Params, scale: float) -> Params:
    """theta_sent = global - scale (theta - global), per tensor, computed in float64, sent in theta's dtype."""
    out = {}
    for k, g in global_params.items():
        g64 = g.to(torch.float64)
        out[k] = (g64 - scale * (theta[k].to(torch.float64) - g64)).to(theta[k].dtype)
    return out


def flip_gradient(grad: Params, scale: float) -> Params:
    """g_sent = -scale g, per tensor (in float64, sent in g's dtype)."""
    return {k: (g.to(torch.float64) * -scale).to(g.dtype) for k, g in grad.items()}


def attacked_reply(msg: Message, reply: Message, attack: Attack) -> Message:
    """The reply an attacking partition sends instead of the honest `reply` to TRAIN message `msg`; the honest
    reply itself when its partition (named in its metrics) does not attack. Everything but the update and the
    claimed weight (the kept optimizer state, the loss, the timing) passes through unchanged."""
    metrics = dict(reply.content[wire.METRICS])
    partition = int(metrics[wire.PARTITION_ID])
    if partition not in attack.attackers:
        return reply
    content = dict(reply.content.items())
    if partition in attack.flip:
        if wire.GRADIENT in reply.content.array_records:  # "meta-gradient" fusion
            grad = from_record(reply.content[wire.GRADIENT])
            content[wire.GRADIENT] = to_record(flip_gradient(grad, attack.scale))
        else:  # "average" fusion: the received global model is the reference
            theta = from_record(reply.content[wire.ARRAYS])
            global_params = from_record(msg.content[wire.ARRAYS])
            content[wire.ARRAYS] = to_record(flip_parameters(global_params, theta, attack.scale))
    if partition in attack.inflate:
        metrics[wire.WEIGHT] = metrics[wire.WEIGHT] * attack.factor
        content[wire.METRICS] = MetricRecord(metrics)
    return Message(RecordDict(content), reply_to=msg)


def attack_app(attack: Attack) -> ClientApp:
    """fedmeta's ClientApp with `attack` applied to the TRAIN replies; QUERY and EVALUATE stay honest."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return attacked_reply(msg, honest.train(msg, context), attack)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest.evaluate(msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return honest.describe(msg, context)

    return app
