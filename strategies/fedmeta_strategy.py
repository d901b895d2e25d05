"""FedMeta: a Flower strategy (FedAvg extended) that fuses per-client meta-models.

Each round: discover the partitions behind new nodes (a QUERY message), sample training
partitions (seeded, held-out partitions never train), send the global meta-model, check every
reply before any arithmetic (`fusion.validate`), fuse the valid ones by weighted averaging and
let the server optimizer produce the next global model (`fusion.Replace` for "average",
`fusion.AdamStep` for "meta-gradient"); every `eval-every` rounds the held-out partitions adapt
the model to their tasks and report loss before/after. Rows go to the run directory as the round
ends, with a checkpoint every `checkpoint-every` rounds.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedmeta import seeding, wire
from fedmeta.config import Config
from fedmeta.optim import Params
from fedmeta.results import RunWriter

from .fusion import Rejected, ServerOptimizer, validate, weighted_average


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float, interval: float,
                     sent: dict[str, int] | None = None) -> list[Message]:
    """Push messages and pull replies every `interval` seconds until all arrived or `timeout`.

    `Grid.send_and_receive` polls every 0.1 s in simulation and every 3 s in deployment, which
    puts a floor under every round; this uses the same Grid API with our own interval.
    `sent`, when given, receives message id -> destination node (see `FedMeta.sender`).
    """
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    if sent is not None:
        sent.update({i: m.metadata.dst_node_id for i, m in zip(ids, messages) if i})
    pending = {i for i in ids if i}
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return replies


@dataclass(frozen=True)
class NodeInfo:
    partition_id: int
    num_partitions: int
    heldout: bool


class FedMeta(FedAvg):
    """Weighted fusion of client meta-models (or meta-gradients) with checked replies."""

    def __init__(self, cfg: Config, server_optimizer: ServerOptimizer, writer: RunWriter | None = None,
                 server_eval: Callable[[Params], dict[str, float]] | None = None,
                 first_round: int = 1) -> None:
        super().__init__(fraction_train=cfg.fraction_train, fraction_evaluate=1.0,
                         min_train_nodes=cfg.min_train_nodes, min_evaluate_nodes=0,
                         min_available_nodes=cfg.min_train_nodes, weighted_by_key=wire.WEIGHT,
                         arrayrecord_key=wire.ARRAYS, configrecord_key=wire.CONFIG)
        self.cfg = cfg
        self.server_optimizer = server_optimizer
        self.writer = writer
        self.server_eval = server_eval
        self.first_round = first_round
        self.nodes: dict[int, NodeInfo] = {}
        self.reply_key = wire.GRADIENT if cfg.fusion == "meta-gradient" else wire.ARRAYS
        self._global: Params = {}
        self._sampled: list[int] = []
        self._round: dict = {}
        self._rows: list[dict] = []
        self._sent: dict[str, int] = {}  # message id -> node it was sent to

    def sender(self, reply: Message) -> int:
        """The node a reply answers for. When a node dies mid-round the SuperLink itself replies with
        an error (src_node_id = the SuperLink's own id, 1), so the destination of the message it
        answers is the truth; hand-made replies that we never sent fall back to src_node_id."""
        return self._sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def summary(self) -> None:
        log(INFO, "\t├──> FedMeta: algorithm=%s fusion=%s task=%s", self.cfg.algorithm, self.cfg.fusion,
            self.cfg.task)
        super().summary()

    # --- who is who ---------------------------------------------------------------------------
    def discover(self, grid: Grid, timeout: float) -> None:
        """Ask new nodes for their partition (QUERY); nodes that do not answer are skipped."""
        deadline = time.monotonic() + timeout
        while len(ids := set(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(ids)} nodes connected; min-train-nodes = {self.min_available_nodes}")
            log(INFO, "Waiting for nodes: %d connected, %d needed", len(ids), self.min_available_nodes)
            time.sleep(1)
        unknown = sorted(ids - set(self.nodes))
        if not unknown:
            return
        content = RecordDict({wire.CONFIG: ConfigRecord(self.cfg.to_mapping())})
        msgs = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for reply in self.exchange(grid, msgs, timeout):
            node = self.sender(reply)
            if reply.has_error():
                log(WARNING, "node %d did not describe itself: %s", node, reply.error.reason)
                continue
            m = reply.content[wire.METRICS]
            self.nodes[node] = NodeInfo(int(m[wire.PARTITION_ID]), int(m[wire.NUM_PARTITIONS]), bool(m[wire.HELDOUT]))
        log(INFO, "Known nodes: %d (%d held-out)", len(self.nodes), sum(i.heldout for i in self.nodes.values()))

    def _connected(self, grid: Grid, heldout: bool) -> list[int]:
        ids = set(grid.get_node_ids())
        chosen = [n for n, i in self.nodes.items() if n in ids and i.heldout == heldout]
        return sorted(chosen, key=lambda n: self.nodes[n].partition_id)

    # --- training -----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        candidates = self._connected(grid, heldout=False)
        k = min(len(candidates), max(self.min_train_nodes, math.ceil(self.fraction_train * len(candidates))))
        rng = random.Random(seeding.derive(self.cfg.seed, "train", 10**6 + server_round))
        self._sampled = sorted(rng.sample(candidates, k), key=lambda n: self.nodes[n].partition_id)
        self._global = arrays.to_torch_state_dict()
        config[wire.SERVER_ROUND] = server_round
        log(INFO, "configure_train: %d of %d training nodes", len(self._sampled), len(candidates))
        record = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config})
        return self._construct_messages(record, self._sampled, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid: list[tuple[Params, float, float]] = []  # (arrays, weight, loss)
        stats = {"num_sampled": len(self._sampled), "num_replies": 0, "num_rejected": 0, "num_failures": 0}
        for row, reply in self._answers(server_round, "train", replies):
            stats["num_replies"] += 1
            node = row["node_id"]
            try:
                arrays, weight, metrics = self._parse(reply, self.reply_key)
                validate(arrays, weight, self._global, self.cfg.max_client_weight)
            except Rejected as err:
                stats["num_rejected"] += 1
                row.update(status="rejected", reason=str(err))
                log(WARNING, "round %d: rejected the reply of node %d (partition %s): %s", server_round, node,
                    row["partition_id"], err)
                continue
            valid.append((arrays, float(weight), float(metrics.get(wire.TRAIN_LOSS, math.nan))))
            row.update(weight=float(weight), num_tasks=metrics.get(wire.NUM_TASKS),
                       loss=metrics.get(wire.TRAIN_LOSS), seconds=metrics.get(wire.SECONDS))
        stats["num_failures"] = stats["num_sampled"] - stats["num_replies"]
        self._round.update(stats)
        if not valid:
            log(WARNING, "round %d: no valid reply; the global model is unchanged", server_round)
            return None, None
        fused = weighted_average([(a, w) for a, w, _ in valid])  # valid is in partition order
        new = self.server_optimizer.step(self._global, fused)
        self._global = new
        total = sum(w for _, w, _ in valid)
        train_loss = sum(w * l for _, w, l in valid) / total
        self._round["train_loss"] = train_loss
        return ArrayRecord(new), MetricRecord({wire.TRAIN_LOSS: train_loss, wire.WEIGHT: total})

    # --- evaluation on held-out partitions ---------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        nodes = self._connected(grid, heldout=True) or self._connected(grid, heldout=False)
        self._sampled = nodes
        config[wire.SERVER_ROUND] = server_round
        record = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config})
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        sums: dict[str, float] = {}
        total = 0.0
        for row, reply in self._answers(server_round, "evaluate", replies):
            m = reply.content[wire.METRICS]
            keys = [k for k in (wire.LOSS_PRE, wire.LOSS_POST, wire.ACCURACY_PRE, wire.ACCURACY_POST) if k in m]
            values = {k: float(m[k]) for k in keys}
            row.update(num_tasks=m.get(wire.NUM_TASKS), weight=m.get(wire.NUM_TASKS), seconds=m.get(wire.SECONDS),
                       loss_pre=values.get(wire.LOSS_PRE), loss_post=values.get(wire.LOSS_POST),
                       accuracy_pre=values.get(wire.ACCURACY_PRE), accuracy_post=values.get(wire.ACCURACY_POST))
            n = m.get(wire.NUM_TASKS)
            if not all(math.isfinite(v) for v in values.values()) or not isinstance(n, int) or n <= 0:
                row.update(status="rejected", reason=f"non-finite metrics or bad num-tasks: {values}, {n}")
                continue
            total += n
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + n * v
        if not total:
            return None
        means = {k: v / total for k, v in sums.items()}
        names = {wire.LOSS_PRE: "eval_loss_pre", wire.LOSS_POST: "eval_loss_post",
                 wire.ACCURACY_PRE: "eval_accuracy_pre", wire.ACCURACY_POST: "eval_accuracy_post"}
        self._round.update({names[k]: v for k, v in means.items()})
        return MetricRecord(means)

    # --- rows -----------------------------------------------------------------------------------
    def _answers(self, server_round: int, phase: str, replies: Iterable[Message]):
        """Yield (row, reply) for every reply with content, in partition order; record a failed row
        for every error reply and for every sampled node that did not answer (after the others)."""
        seen = set()
        for reply in self._in_partition_order(replies):
            node = self.sender(reply)
            seen.add(node)
            row = self._row(server_round, node, phase)
            if reply.has_error():
                self._fail(row, f"client error: {reply.error.reason}")
                continue
            yield row, reply
        for node in sorted(set(self._sampled) - seen):
            self._fail(self._row(server_round, node, phase), "no reply before round-timeout")

    def _row(self, server_round: int, node: int, phase: str) -> dict:
        info = self.nodes.get(node)
        row = {"round": server_round, "node_id": node, "partition_id": info.partition_id if info else None,
               "phase": phase, "status": "ok", "reason": ""}
        self._rows.append(row)
        return row

    def _fail(self, row: dict, reason: str) -> None:
        row.update(status="failed", reason=reason)
        log(WARNING, "round %d: node %d (partition %s) failed in %s: %s", row["round"], row["node_id"],
            row["partition_id"], row["phase"], reason)

    def _in_partition_order(self, replies: Iterable[Message]) -> list[Message]:
        """Replies sorted by partition, so that float sums do not depend on arrival order."""
        def key(reply: Message) -> tuple[int, int]:
            node = self.sender(reply)
            info = self.nodes.get(node)
            return (info.partition_id if info else 1 << 62, node)

        return sorted(replies, key=key)

    @staticmethod
    def _parse(reply: Message, key: str) -> tuple[Params, object, MetricRecord]:
        content = reply.content
        if key not in content.array_records or wire.METRICS not in content.metric_records:
            raise Rejected(f"reply lacks the {key!r} arrays or the {wire.METRICS!r} metrics")
        metrics = content.metric_records[wire.METRICS]
        if wire.WEIGHT not in metrics:
            raise Rejected(f"reply claims no weight ({wire.WEIGHT!r})")
        return content.array_records[key].to_torch_state_dict(), metrics[wire.WEIGHT], metrics

    # --- the loop -------------------------------------------------------------------------------
    def exchange(self, grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
        self._sent.clear()
        return send_and_receive(grid, messages, timeout, self.cfg.poll_interval, self._sent)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None) -> Result:
        """Run rounds `first_round..num_rounds`; each round's rows and checkpoint land on disk."""
        self.summary()
        result = Result()
        arrays = initial_arrays
        self._global = arrays.to_torch_state_dict()
        for rnd in range(self.first_round, num_rounds + 1):
            t0 = time.perf_counter()
            log(INFO, "[ROUND %d/%d]", rnd, num_rounds)
            self.discover(grid, timeout)
            self._round = {"round": rnd}
            replies = self.exchange(grid, self.configure_train(rnd, arrays, ConfigRecord(dict(train_config or {})),
                                                               grid), timeout)
            new_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            if rnd % self.cfg.eval_every == 0 or rnd == num_rounds:
                msgs = self.configure_evaluate(rnd, arrays, ConfigRecord(dict(evaluate_config or {})), grid)
                metrics = self.aggregate_evaluate(rnd, self.exchange(grid, msgs, timeout))
                if metrics is not None:
                    result.evaluate_metrics_clientapp[rnd] = metrics
                if self.server_eval is not None:
                    self._round.update(self.server_eval(self._global))
            self._round["seconds"] = time.perf_counter() - t0
            self._end_round(rnd, num_rounds)
        result.arrays = arrays
        return result

    def _end_round(self, rnd: int, num_rounds: int) -> None:
        log(INFO, "round %d: %s", rnd, {k: v for k, v in self._round.items() if k != "round"})
        if self.writer is None:
            self._rows.clear()
            return
        self.writer.append_clients(self._rows)
        self._rows = []
        self.writer.append_round(self._round)
        if rnd % self.cfg.checkpoint_every == 0 or rnd == num_rounds:
            self.writer.save_checkpoint(rnd, self._global, {"optimizer": self.server_optimizer.state_dict()})
