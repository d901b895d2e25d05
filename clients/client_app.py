"""The ClientApp: each node meta-trains on its private task set and evaluates on held-out tasks.

Handlers are thin: read the weights and config, get the (cached) client from `fedmeta.local`,
call the core, build the reply. A failure raises (Flower turns it into an error reply that the
strategy records); client code never kills its own process.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmeta import local, wire
from fedmeta.config import Config
from fedmeta.optim import adam_flatten, adam_unflatten

app = ClientApp()
NODE_KEYS = ("data-dir",)  # run-config keys a node may set for itself in its node config


def _client(msg: Message, context: Context) -> local.Client:
    run_config = {k: v for k, v in msg.content[wire.CONFIG].items() if k != wire.SERVER_ROUND}
    node = context.node_config  # simulation: set by the engine; deployment: `--node-config`
    for key in NODE_KEYS:  # a real node's own data location wins over the run's
        if key in node:
            run_config[key] = node[key]
    cfg = Config.from_mapping(run_config)
    for key in ("partition-id", "num-partitions"):
        if key not in node:
            raise KeyError(f"node config lacks {key!r}; start the SuperNode with "
                           '--node-config "partition-id=<i> num-partitions=<n>"')
    return local.client(cfg, int(node["partition-id"]), int(node["num-partitions"]))


def _load_optimizer(context: Context, params: dict) -> dict | None:
    """The local Adam this node kept from its previous round (context.state), if it fits the model."""
    if wire.OPTIMIZER_MOMENTS not in context.state.array_records:
        return None
    flat = context.state.array_records[wire.OPTIMIZER_MOMENTS].to_torch_state_dict()
    return adam_unflatten(flat, int(context.state.metric_records[wire.OPTIMIZER_STEP]["step"]), params)


def _save_optimizer(context: Context, state: dict) -> None:
    flat, step = adam_flatten(state)
    context.state[wire.OPTIMIZER_MOMENTS] = ArrayRecord(flat)
    context.state[wire.OPTIMIZER_STEP] = MetricRecord({"step": step})


@app.query()
def describe(msg: Message, context: Context) -> Message:
    c = _client(msg, context)
    metrics = MetricRecord({wire.PARTITION_ID: c.partition_id, wire.NUM_PARTITIONS: c.num_partitions,
                            wire.HELDOUT: int(c.heldout)})
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    c = _client(msg, context)
    if c.heldout:
        raise RuntimeError(f"partition {c.partition_id} is held out and never trains")
    meta_params = dict(msg.content[wire.ARRAYS].to_torch_state_dict())
    state = _load_optimizer(context, meta_params) if c.cfg.keep_optimizer_state else None
    out = local.train(c, meta_params, int(msg.content[wire.CONFIG][wire.SERVER_ROUND]), state)
    if c.cfg.keep_optimizer_state and out.optimizer_state is not None:
        _save_optimizer(context, out.optimizer_state)
    key = wire.GRADIENT if c.cfg.fusion == "meta-gradient" else wire.ARRAYS
    metrics = MetricRecord({wire.WEIGHT: out.num_tasks, wire.NUM_TASKS: out.num_tasks,
                            wire.TRAIN_LOSS: out.loss, wire.SECONDS: out.seconds})
    return Message(RecordDict({key: ArrayRecord(out.arrays), wire.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    c = _client(msg, context)
    out = local.evaluate(c, dict(msg.content[wire.ARRAYS].to_torch_state_dict()))
    values = {wire.NUM_TASKS: out.num_tasks, wire.LOSS_PRE: out.loss_pre, wire.LOSS_POST: out.loss_post,
              wire.SECONDS: out.seconds}
    if out.accuracy_pre is not None:
        values.update({wire.ACCURACY_PRE: out.accuracy_pre, wire.ACCURACY_POST: out.accuracy_post})
    return Message(RecordDict({wire.METRICS: MetricRecord(values)}), reply_to=msg)
