"""Who is who: which node serves which partition, learned without messaging the whole population.

Two ways, by `assign-partitions`:
- True (the default; simulation): partitions are virtual clients. The server binds partition p to
  the (p mod n)-th of the n connected nodes (sorted by id) and names the partition in every message
  it sends, so no node is ever asked who it is: start-up costs nothing per registered node, and since
  a partition's tasks come from (seed, partition, round) and its kept optimizer state travels with
  its messages, which node serves it does not change a number. `num-partitions` = 0 takes the number
  of nodes connected when the run starts (in a simulation, `num-supernodes`).
- False (deployment with data of each node's own): a node serves the partition of its node config
  (`--node-config "partition-id=<i> num-partitions=<n>"`). Each node is asked once, when it is
  first seen (a QUERY message); every reply it sends later names its partition too.
The last `heldout-partitions` partitions never train; they evaluate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.common import log
from flwr.serverapp import Grid

from fedmeta.config import Config

STABLE_POLLS = 2  # node count unchanged over this many polls: registration has finished
POLL_S = 0.25


@dataclass(frozen=True)
class Target:
    """Where a message goes: the node, and the partition it serves there (None: not known yet)."""

    node: int
    partition: int | None


@dataclass(frozen=True)
class NodeInfo:
    partition_id: int
    num_partitions: int
    heldout: bool


class Roster:
    """The partitions of a run and the nodes serving them, refreshed before every phase."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.num_partitions = cfg.num_partitions  # 0 until known
        self.known: dict[int, NodeInfo] = {}  # node -> what it reported (assign-partitions = False)
        self._nodes: list[int] = []  # connected nodes, sorted

    # --- the partitions -----------------------------------------------------------------------
    def is_heldout(self, partition: int) -> bool:
        return partition >= self.num_partitions - self.cfg.heldout_partitions

    def training(self) -> list[int]:
        """Training partitions that a connected node serves now."""
        if self.cfg.assign_partitions:  # all of them: a range (10 000 is_heldout calls took 4 ms, several per round)
            return list(range(self._first_heldout())) if self._nodes else []
        return sorted(p for p in self._served() if not self.is_heldout(p))

    def heldout(self) -> list[int]:
        if self.cfg.assign_partitions:
            return list(range(self._first_heldout(), self.num_partitions)) if self._nodes else []
        return sorted(p for p in self._served() if self.is_heldout(p))

    def _first_heldout(self) -> int:
        return max(0, self.num_partitions - self.cfg.heldout_partitions)

    def target(self, partition: int) -> Target:
        if self.cfg.assign_partitions:
            return Target(self._nodes[partition % len(self._nodes)], partition)
        node = next(n for n in self._nodes if n in self.known and self.known[n].partition_id == partition)
        return Target(node, partition)

    def partition_of(self, node: int) -> int | None:
        info = self.known.get(node)
        return info.partition_id if info else None

    def _served(self) -> Iterable[int]:
        if self.cfg.assign_partitions:
            return range(self.num_partitions) if self._nodes else ()
        return {self.known[n].partition_id for n in self._nodes if n in self.known}

    # --- refreshing ---------------------------------------------------------------------------
    def refresh(self, grid: Grid, ask: Callable[[list[int]], Iterable[tuple[int, NodeInfo | str]]]) -> None:
        """Wait (node-wait-timeout) until enough training partitions are served; `ask(nodes)` queries
        nodes never seen (assign-partitions = False only) and yields (node, info or failure reason)."""
        deadline = time.monotonic() + self.cfg.node_wait_timeout
        first = not self._nodes
        while True:
            self._nodes = self._stable_nodes(grid) if first else sorted(grid.get_node_ids())
            if self.cfg.assign_partitions:
                if not self.num_partitions and len(self._nodes) > self.cfg.heldout_partitions:
                    self.num_partitions = len(self._nodes)
                    log(INFO, "%d partitions (%d held out) on %d nodes", self.num_partitions,
                        self.cfg.heldout_partitions, len(self._nodes))
            else:
                self._learn(ask)
            if len(self.training()) >= self.cfg.min_train_nodes:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"after node-wait-timeout = {self.cfg.node_wait_timeout:g} s: {len(self._nodes)} nodes connected, "
                    f"serving {len(self.training())} training partitions; min-train-nodes = {self.cfg.min_train_nodes} "
                    f"(held-out partitions, heldout-partitions = {self.cfg.heldout_partitions}, do not count)")
            log(INFO, "Waiting for nodes: %d connected, %d training partitions served, %d needed",
                len(self._nodes), len(self.training()), self.cfg.min_train_nodes)
            time.sleep(1.0)
            first = False

    def _stable_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes once their number stops growing (a simulation registers its nodes
        while the ServerApp starts)."""
        counts, nodes = [], sorted(grid.get_node_ids())
        while len(counts) < STABLE_POLLS or len(set(counts[-STABLE_POLLS:])) > 1:
            time.sleep(POLL_S)
            nodes = sorted(grid.get_node_ids())
            counts.append(len(nodes))
        return nodes

    def _learn(self, ask: Callable[[list[int]], Iterable[tuple[int, NodeInfo | str]]]) -> None:
        unknown = [n for n in self._nodes if n not in self.known]
        if not unknown:
            return
        for node, info in ask(unknown):
            if isinstance(info, str):
                log(WARNING, "node %d did not describe itself: %s", node, info)
                continue
            self.known[node] = info
            self.num_partitions = max(self.num_partitions, info.num_partitions)
        log(INFO, "Known nodes: %d (%d held-out)", len(self.known), sum(i.heldout for i in self.known.values()))
