"""The ClientApp: each node meta-trains a partition's private task set and evaluates on held-out tasks.

Handlers are thin: read the weights and config, get the (cached) client from `fedmeta.local`, call the
core, build the reply. A failure raises (Flower turns it into an error reply that the strategy
records); client code never kills its own process. Which partition a node serves: the one the message
names (assign-partitions, the default: the server binds virtual clients to nodes), else the node
config's `partition-id` (deployment with data of the node's own). The partition's kept local
optimizer state arrives with its TRAIN message and leaves with the reply: the node keeps nothing. It
travels packed into one array (`pack_adam`): Flower (de)serialises each array of a record apart (an
`np.save` / `np.load` header each, about 30 us), and the sinusoid MLP's Adam state is 12 small tensors.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmeta import local, wire
from fedmeta.config import Config
from fedmeta.optim import pack_adam, unpack_adam

from . import actor_restart
from .records import from_record, to_record

app = ClientApp()
actor_restart.install()  # simulation only: Ray restarts a client process that died (see actor_restart)
NODE_KEYS = ("data-dir",)  # run-config keys a node may set for itself in its node config


@lru_cache(maxsize=8)
def _config(items: tuple) -> Config:
    """The run's Config, parsed once per process (the same record arrives with every message)."""
    return Config.from_mapping(dict(items))


def _client(msg: Message, context: Context) -> local.Client:
    node = context.node_config  # simulation: set by the engine; deployment: `--node-config`
    run_config = dict(msg.content[wire.CONFIG])
    for key in NODE_KEYS:  # a real node's own data location wins over the run's
        if key in node:
            run_config[key] = node[key]
    cfg = _config(tuple(sorted(run_config.items())))
    about = msg.content[wire.ROUND]
    if wire.PARTITION_ID in about:  # assign-partitions: the server names the partition
        return local.client(cfg, int(about[wire.PARTITION_ID]), int(about[wire.NUM_PARTITIONS]))
    for key in ("partition-id", "num-partitions"):
        if key not in node:
            raise KeyError(f"node config lacks {key!r}; start the SuperNode with "
                           '--node-config "partition-id=<i> num-partitions=<n>"')
    return local.client(cfg, int(node["partition-id"]), int(node["num-partitions"]))


def _identity(c: local.Client) -> dict:
    return {wire.PARTITION_ID: c.partition_id, wire.NUM_PARTITIONS: c.num_partitions}


@app.query()
def describe(msg: Message, context: Context) -> Message:
    c = _client(msg, context)
    metrics = MetricRecord({**_identity(c), wire.HELDOUT: int(c.heldout)})
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    c = _client(msg, context)
    if c.heldout:
        raise RuntimeError(f"partition {c.partition_id} is held out and never trains")
    about: ConfigRecord = msg.content[wire.ROUND]
    meta_params = from_record(msg.content[wire.ARRAYS])
    kept = None
    if wire.OPTIMIZER in msg.content.array_records:  # this partition's local Adam from its last round
        packed = from_record(msg.content[wire.OPTIMIZER]).get(wire.OPTIMIZER)
        kept = None if packed is None else unpack_adam(packed, int(about[wire.OPTIMIZER_STEP]), meta_params)
    correction = None
    if wire.CORRECTION in msg.content.array_records:  # drift-correction: c - c_i (fedmeta.drift)
        correction = from_record(msg.content[wire.CORRECTION])
    out = local.train(c, meta_params, int(about[wire.SERVER_ROUND]), kept,
                      lr_factor=float(about.get(wire.LR_FACTOR, 1.0)), correction=correction)
    key = wire.GRADIENT if c.cfg.fusion == "meta-gradient" else wire.ARRAYS
    metrics = {wire.WEIGHT: out.num_tasks, wire.NUM_TASKS: out.num_tasks, wire.TRAIN_LOSS: out.loss,
               wire.SECONDS: out.seconds, **_identity(c)}
    records = {key: to_record(out.arrays)}
    if c.cfg.keep_optimizer_state and out.optimizer_state is not None:
        packed, metrics[wire.OPTIMIZER_STEP] = pack_adam(out.optimizer_state)
        records[wire.OPTIMIZER] = to_record({wire.OPTIMIZER: packed})
    if out.control is not None:
        records[wire.CONTROL] = to_record(out.control)
    return Message(RecordDict({**records, wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    c = _client(msg, context)
    out = local.evaluate(c, from_record(msg.content[wire.ARRAYS]))
    values = {wire.NUM_TASKS: out.num_tasks, wire.LOSS_PRE: out.loss_pre, wire.LOSS_POST: out.loss_post,
              wire.SECONDS: out.seconds, **_identity(c)}
    if out.accuracy_pre is not None:
        values.update({wire.ACCURACY_PRE: out.accuracy_pre, wire.ACCURACY_POST: out.accuracy_post})
    return Message(RecordDict({wire.METRICS: MetricRecord(values)}), reply_to=msg)
