"""FedMeta: the server's round loop, fusing per-client meta-models (or meta-gradients) with checked replies.

One round, as data (Chen et al. 2018, "Federated Meta-Learning with Fast Convergence and Efficient
Communication"; distributed MAML for fusion = "meta-gradient"):

    Roster.refresh -> sample_clients (seeded, training partitions only) -> TRAIN messages (global
    meta-parameters, the run config, the partition's kept optimizer state and, with drift-correction, its
    c - c_i) -> replies, each counted once (`deliver`) -> size budget, then `fusion.validate` before any
    arithmetic (and the reply's c_i, `controls.py`) -> `Fusion.fuse`
    (weight policy -> aggregator -> norm guard -> server optimizer), unless fewer than
    min-train-replies are valid -> EVALUATE messages to the held-out partitions -> one end-of-round
    step: rows in rounds.csv / clients.csv, a checkpoint, a progress line.

The loop has Flower's strategy shape (configure / aggregate per phase, `start`) and uses only Flower's
public Grid and Message API; unlike `flwr.serverapp.strategy.Strategy.start` it can start at round k
(resume), polls replies at `poll-interval` and carries each round's state explicitly (`RoundState`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from clients.records import from_record, to_record
from fedmeta import wire
from fedmeta.config import Config
from fedmeta.optim import Params, packed_adam_like
from fedmeta.results import RunWriter

from .client_states import ClientStates
from .controls import NoControls
from .fusion import Fusion, FusionError, Rejected, check_preconditions, check_size, client_lr_factor, read_checked, validate
from .roster import NodeInfo, Roster, Target
from .sampling import sample_clients

EVAL_METRICS = {wire.LOSS_PRE: "eval_loss_pre", wire.LOSS_POST: "eval_loss_post",
                wire.ACCURACY_PRE: "eval_accuracy_pre", wire.ACCURACY_POST: "eval_accuracy_post"}


@dataclass(frozen=True)
class RoundState:
    """What one round has done so far: its row of rounds.csv and its rows of clients.csv."""

    server_round: int
    row: dict[str, Any] = field(default_factory=dict)
    clients: tuple[dict[str, Any], ...] = ()

    def with_row(self, **values: Any) -> RoundState:
        return replace(self, row={**self.row, **values})

    def with_clients(self, rows: Iterable[dict[str, Any]]) -> RoundState:
        return replace(self, clients=self.clients + tuple(rows))


@dataclass
class Delivery:
    """The replies to one phase's messages, each counted once."""

    replies: list[tuple[Target, Message]]  # in partition order
    missing: list[Target]  # sent, never answered before round-timeout
    ignored: list[tuple[Target, str]]  # second replies to a message, replies to messages never sent


def packed_adam_template(params: Params) -> Params:
    """What a reply's kept Adam state must look like: {OPTIMIZER: `fedmeta.optim.packed_adam_like`}. The
    server stores and forwards it without unpacking."""
    return {wire.OPTIMIZER: packed_adam_like(params)}


class FedMeta:
    """The round loop (see the module docstring)."""

    def __init__(self, cfg: Config, fusion: Fusion, writer: RunWriter | None = None,
                 server_eval: Callable[[Params], dict[str, float]] | None = None,
                 clients: ClientStates | None = None, roster: Roster | None = None,
                 controls: NoControls | None = None) -> None:
        self.cfg = cfg
        self.fusion = fusion
        self.writer = writer
        self.server_eval = server_eval
        self.clients = clients or ClientStates()
        self.roster = roster or Roster(cfg)
        self.controls = controls or NoControls()  # drift-correction (strategies/controls.py)
        self.reply_key = wire.GRADIENT if cfg.fusion == "meta-gradient" else wire.ARRAYS
        self.run_config = ConfigRecord(cfg.to_mapping())  # one record, shared by every message
        self.totals = {"rounds_run": 0, "fused": 0, "failed_clients": 0, "rejected_clients": 0, "ignored_replies": 0}

    # --- training -----------------------------------------------------------------------------
    def configure_train(self, state: RoundState, params: Params) -> tuple[list[tuple[Target, Message]], RoundState]:
        sampled = sample_clients(self.cfg.seed, state.server_round, self.roster.training(), self.cfg.fraction_train,
                                 self.cfg.min_train_nodes)
        log(INFO, "configure_train: %d of %d training partitions", len(sampled), len(self.roster.training()))
        arrays = to_record(params)  # one record: Flower stores and sends identical content once
        factor = client_lr_factor(self.cfg, state.server_round)
        self.controls.begin_round(params, len(self.roster.training()))
        out = []
        for p in sampled:
            target = self.roster.target(p)
            extra = {wire.LR_FACTOR: factor}
            content = {wire.ARRAYS: arrays, **self.controls.outgoing(p)}
            kept = self.clients.get(p) if self.cfg.keep_optimizer_state else None
            if kept is not None:
                content[wire.OPTIMIZER] = to_record(kept["tensors"])
                extra[wire.OPTIMIZER_STEP] = kept["step"]
            out.append((target, self._message(content, target, state.server_round, MessageType.TRAIN, extra)))
        return out, state.with_row(num_sampled=len(sampled))

    def aggregate_train(self, state: RoundState, params: Params, delivery: Delivery) -> tuple[Params, RoundState]:
        """Check every reply, fuse the valid ones (at least min-train-replies), keep their optimizer state."""
        rows, valid, new_states = self._rows(state, "train", delivery)
        new_controls = {}
        for target, reply in delivery.replies:
            row = rows[target]
            try:
                tensors, weight, metrics, kept = self._parse_train(reply, params)
                control = self.controls.parse(reply.content, params)
            except Rejected as err:
                row.update(status="rejected", reason=str(err))
                log(WARNING, "round %d: rejected the reply of node %d (partition %s): %s", state.server_round,
                    target.node, target.partition, err)
                continue
            valid.append((tensors, float(weight), float(metrics.get(wire.TRAIN_LOSS, math.nan))))
            if kept is not None:
                new_states[target.partition] = kept
            if control is not None:
                new_controls[target.partition] = control
            row.update(weight=float(weight), num_tasks=metrics.get(wire.NUM_TASKS),
                       loss=metrics.get(wire.TRAIN_LOSS), seconds=metrics.get(wire.SECONDS))
        num_replies = len(delivery.replies)
        stats = {"num_replies": num_replies, "num_failures": state.row["num_sampled"] - num_replies,
                 "num_rejected": sum(r["status"] == "rejected" for r in rows.values()),
                 "num_ignored": len(delivery.ignored), "fused": 0}
        state = state.with_row(**stats).with_clients(rows.values()).with_clients(self._ignored(state, delivery, "train"))
        if len(valid) < self.cfg.min_train_replies:
            log(WARNING, "round %d: %d valid replies, fewer than min-train-replies = %d; the global model is "
                "unchanged", state.server_round, len(valid), self.cfg.min_train_replies)
            return params, state
        try:
            out = self.fusion.fuse(params, [(t, w) for t, w, _ in valid], state.server_round)
        except FusionError as err:  # too few replies for the aggregator, or a non-finite step: nothing applied
            log(WARNING, "round %d: not fused (%s); the global model is unchanged", state.server_round, err)
            return params, state
        self.clients.update(new_states)  # only a fused round's optimizer states (and control variates) are kept
        self.controls.keep(new_controls, state.server_round)
        total = math.fsum(w for _, w, _ in valid)
        return out.params, state.with_row(fused=1, train_loss=math.fsum(w * loss for _, w, loss in valid) / total,
                                          **out.info)

    def _parse_train(self, reply: Message, params: Params):
        """(tensors, weight, metrics, kept optimizer state or None) of a reply, or `Rejected`."""
        content = reply.content
        if self.reply_key not in content.array_records or wire.METRICS not in content.metric_records:
            raise Rejected(f"reply lacks the {self.reply_key!r} arrays or the {wire.METRICS!r} metrics")
        record = content.array_records[self.reply_key]
        check_size(record, params)  # before any tensor is built from the reply's bytes
        metrics = content.metric_records[wire.METRICS]
        if wire.WEIGHT not in metrics:
            raise Rejected(f"reply claims no weight ({wire.WEIGHT!r})")
        tensors = from_record(record)
        validate(tensors, metrics[wire.WEIGHT], params, self.cfg.max_client_weight)
        kept = None
        if self.cfg.keep_optimizer_state and self.cfg.fusion == "average" and wire.OPTIMIZER in content.array_records:
            # one array, of the model's size x 2 and dtype, finite
            packed = read_checked(content.array_records[wire.OPTIMIZER], packed_adam_template(params))
            kept = {"step": int(metrics.get(wire.OPTIMIZER_STEP, 0)), "tensors": packed}
        return tensors, metrics[wire.WEIGHT], metrics, kept

    # --- evaluation on held-out partitions -----------------------------------------------------
    def configure_evaluate(self, state: RoundState, params: Params) -> list[tuple[Target, Message]]:
        partitions = self.roster.heldout() or self.roster.training()
        arrays = to_record(params)
        return [(t, self._message({wire.ARRAYS: arrays}, t, state.server_round, MessageType.EVALUATE))
                for t in map(self.roster.target, partitions)]

    def aggregate_evaluate(self, state: RoundState, delivery: Delivery) -> RoundState:
        """Task-weighted means of the held-out partitions' metrics before/after adaptation."""
        rows, _, _ = self._rows(state, "evaluate", delivery)
        sums: dict[str, float] = {}
        total = 0
        for target, reply in delivery.replies:
            m = reply.content.metric_records.get(wire.METRICS, {})
            values = {k: float(m[k]) for k in EVAL_METRICS if k in m}
            n = m.get(wire.NUM_TASKS)
            row = rows[target]
            row.update(num_tasks=n, weight=n, seconds=m.get(wire.SECONDS), loss_pre=values.get(wire.LOSS_PRE),
                       loss_post=values.get(wire.LOSS_POST), accuracy_pre=values.get(wire.ACCURACY_PRE),
                       accuracy_post=values.get(wire.ACCURACY_POST))
            if not values or not all(math.isfinite(v) for v in values.values()) or not isinstance(n, int) or n <= 0:
                row.update(status="rejected", reason=f"non-finite metrics or bad num-tasks: {values}, {n}")
                continue
            total += n
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + n * v
        state = state.with_clients(rows.values()).with_clients(self._ignored(state, delivery, "evaluate"))
        return state.with_row(**{EVAL_METRICS[k]: v / total for k, v in sums.items()}) if total else state

    # --- messages and replies -------------------------------------------------------------------
    def _message(self, content: dict, target: Target, server_round: int, kind: str, extra: dict | None = None):
        about = {wire.SERVER_ROUND: server_round, **(extra or {})}
        if self.cfg.assign_partitions:
            about.update({wire.PARTITION_ID: target.partition, wire.NUM_PARTITIONS: self.roster.num_partitions})
        record = RecordDict({**content, wire.CONFIG: self.run_config, wire.ROUND: ConfigRecord(about)})
        return Message(content=record, dst_node_id=target.node, message_type=kind)

    def deliver(self, grid: Grid, outgoing: list[tuple[Target, Message]], timeout: float) -> Delivery:
        """Push the messages, pull replies every poll-interval until all arrived or `timeout`; each
        message's first reply counts, later ones and strays are ignored (and recorded)."""
        ids = list(grid.push_messages([m for _, m in outgoing]))
        sent = {i: t for i, (t, _) in zip(ids, outgoing) if i}
        pending, replies, ignored = set(sent), {}, []
        deadline = time.monotonic() + timeout
        while pending:
            for reply in grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in replies or mid not in sent:
                    why = "a second reply to the same message" if mid in replies else "a reply to no message sent"
                    ignored.append((sent.get(mid, Target(reply.metadata.src_node_id, None)), why))
                    continue
                replies[mid] = reply
                pending.discard(mid)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.cfg.poll_interval)
        order = sorted(replies, key=lambda mid: (sent[mid].partition, sent[mid].node))  # sums in partition order
        missing = sorted((t for mid, t in sent.items() if mid not in replies), key=lambda t: (t.partition, t.node))
        return Delivery([(sent[mid], replies[mid]) for mid in order], missing, ignored)

    def _rows(self, state: RoundState, phase: str, delivery: Delivery):
        """One clients.csv row per target: ok unless the reply is an error or missing."""
        rows: dict[Target, dict] = {}
        for target, reply in delivery.replies:
            rows[target] = self._row(state, target, phase)
            if reply.has_error():
                self._fail(rows[target], f"client error: {reply.error.reason}")
        delivery.replies = [(t, r) for t, r in delivery.replies if not r.has_error()]
        for target in delivery.missing:
            rows[target] = self._fail(self._row(state, target, phase), "no reply before round-timeout")
        return rows, [], {}

    def _ignored(self, state: RoundState, delivery: Delivery, phase: str) -> list[dict]:
        out = []
        for target, why in delivery.ignored:
            log(WARNING, "round %d: ignored %s from node %d", state.server_round, why, target.node)
            out.append({**self._row(state, target, phase), "status": "ignored", "reason": why})
        return out

    @staticmethod
    def _row(state: RoundState, target: Target, phase: str) -> dict:
        return {"round": state.server_round, "node_id": target.node, "partition_id": target.partition,
                "phase": phase, "status": "ok", "reason": ""}

    @staticmethod
    def _fail(row: dict, reason: str) -> dict:
        row.update(status="failed", reason=reason)
        log(WARNING, "round %d: node %d (partition %s) failed in %s: %s", row["round"], row["node_id"],
            row["partition_id"], row["phase"], reason)
        return row

    def _ask(self, grid: Grid, nodes: list[int]) -> Iterable[tuple[int, NodeInfo | str]]:
        """QUERY nodes never seen (assign-partitions = False): who are you?"""
        targets = [Target(n, None) for n in nodes]
        outgoing = [(t, self._message({}, t, 0, MessageType.QUERY)) for t in targets]
        delivery = self.deliver(grid, outgoing, self.cfg.round_timeout)
        for target, reply in delivery.replies:
            if reply.has_error():
                yield target.node, reply.error.reason
                continue
            m = reply.content[wire.METRICS]
            yield target.node, NodeInfo(int(m[wire.PARTITION_ID]), int(m[wire.NUM_PARTITIONS]), bool(m[wire.HELDOUT]))
        for target in delivery.missing:
            yield target.node, "no reply before round-timeout"

    # --- the loop -------------------------------------------------------------------------------
    def start(self, grid: Grid, params: Params, first_round: int = 1) -> Params:
        """Run rounds first_round..num-rounds; every round's rows and checkpoint land on disk as it ends."""
        log(INFO, "FedMeta: algorithm=%s fusion=%s task=%s, rounds %d-%d", self.cfg.algorithm, self.cfg.fusion,
            self.cfg.task, first_round, self.cfg.num_rounds)
        t_start = time.perf_counter()
        for rnd in range(first_round, self.cfg.num_rounds + 1):
            t0 = time.perf_counter()
            self.roster.refresh(grid, lambda nodes: self._ask(grid, nodes))
            if rnd == first_round:
                check_preconditions(self.cfg, len(sample_clients(self.cfg.seed, rnd, self.roster.training(),
                                                                 self.cfg.fraction_train, self.cfg.min_train_nodes)))
            state = RoundState(rnd, {"round": rnd})
            outgoing, state = self.configure_train(state, params)
            params, state = self.aggregate_train(state, params, self.deliver(grid, outgoing, self.cfg.round_timeout))
            if rnd % self.cfg.eval_every == 0 or rnd == self.cfg.num_rounds:
                self.roster.refresh(grid, lambda nodes: self._ask(grid, nodes))
                delivery = self.deliver(grid, self.configure_evaluate(state, params), self.cfg.round_timeout)
                state = self.aggregate_evaluate(state, delivery)
                if self.server_eval is not None:
                    state = state.with_row(**self.server_eval(params))
            state = state.with_row(seconds=time.perf_counter() - t0)
            self.end_round(state, params, time.perf_counter() - t_start, first_round)
        return params

    def end_round(self, state: RoundState, params: Params, elapsed: float, first_round: int) -> None:
        """The one end-of-round step: totals, rows, checkpoint, progress line."""
        rnd, row = state.server_round, state.row
        t = self.totals
        t["rounds_run"] += 1
        t["fused"] += row.get("fused", 0)
        t["failed_clients"] += sum(r["status"] == "failed" for r in state.clients)
        t["rejected_clients"] += sum(r["status"] == "rejected" for r in state.clients)
        t["ignored_replies"] += sum(r["status"] == "ignored" for r in state.clients)
        if self.writer is not None:
            self.writer.append_clients(list(state.clients))
            self.writer.append_round(row)
            if rnd % self.cfg.checkpoint_every == 0 or rnd == self.cfg.num_rounds:
                self.writer.save_checkpoint(rnd, params, self.fusion.state_dict(), self.clients.state_dict(),
                                            self.controls.state_dict())
        done = rnd - first_round + 1
        eta = elapsed / done * (self.cfg.num_rounds - rnd)
        keys = ("train_loss", "eval_loss_post", "eval_accuracy_post")
        metrics = " ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), float))
        log(INFO, "[fedmeta] round %d/%d | elapsed %.1f s | ETA %.1f s | %s", rnd, self.cfg.num_rounds, elapsed, eta,
            metrics or "no metrics")

    def outcome(self) -> tuple[str, dict[str, Any]]:
        """The run's status and its counts: failed if no round fused a model, completed-with-failures if
        a client failed, was rejected or a reply was ignored, else completed."""
        t = dict(self.totals)
        if not t["fused"]:
            return "failed", {**t, "error": f"no round fused a model: fewer than min-train-replies = "
                                            f"{self.cfg.min_train_replies} valid replies in every round"}
        if t["failed_clients"] or t["rejected_clients"] or t["ignored_replies"]:
            return "completed-with-failures", t
        return "completed", t
