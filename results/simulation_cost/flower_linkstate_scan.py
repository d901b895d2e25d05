"""Minimal reproduction (Flower 1.42 only, no Ray, no fedmeta): the Simulation Engine's cost per registered node.

The engine's message pump, `flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`, runs in the process of
the ServerApp and, every 0.1 s, calls `InMemoryLinkState.get_message_ins(node_id, limit=1)` for EVERY registered
node; each call walks every stored message (`_check_stored_messages` on each: a lock, a clock read, a TTL and a
federation check), and a message stays stored until the ServerApp pulls its reply. One sweep therefore costs
about (registered nodes) x (messages in flight) x a few microseconds, holding the GIL, whatever the round samples.
`get_nodes` (behind `Grid.get_node_ids`) also visits every node. There is no setting for either (the pump's
period is hard-coded). This script times one sweep, done exactly as the pump does it, and `get_node_ids`.

    python results/simulation_cost/flower_linkstate_scan.py        # writes flower_linkstate_scan.json next to it
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import flwr
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid


def engine(num_nodes: int):
    """A LinkState with `num_nodes` simulated nodes and one run, and the in-memory Grid of run_simulation."""
    # the identity Message() stamps on what it creates, as run_simulation sets it (set per call: a simulation
    # run earlier in the same process leaves its own run's identity there)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 7, 1, SUPERLINK_NODE_ID
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = _register_nodes(num_nodes, factory)  # what the engine does at start-up
    state = factory.state()
    run = Run.create_empty(run_id=1)
    run.primary_task_id, run.federation_id = 7, NOOP_FEDERATION_ID
    state.run_ids[1] = RunRecord(run=run)
    state.task_store[7] = Task(task_id=7, run_id=1)
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return state, grid, sorted(mapping)


def sweep(state, nodes) -> tuple[float, int]:
    """One pass of add_messages_to_queue's loop body; (seconds, messages handed out)."""
    t, got = time.perf_counter(), 0
    for node in nodes:
        got += len(state.get_message_ins(node_id=node, limit=1))
    return time.perf_counter() - t, got


def main() -> None:
    rows = []
    for num_nodes in (100, 1000, 10000):
        state, grid, nodes = engine(num_nodes)
        t = time.perf_counter()
        grid.get_node_ids()
        node_ids_s = time.perf_counter() - t
        for in_flight in (0, 10, 100):
            stride = max(1, num_nodes // max(in_flight, 1))
            grid.push_messages([Message(RecordDict({"c": ConfigRecord({"a": 1})}), dst_node_id=nodes[i * stride],
                                        message_type="train") for i in range(in_flight)])
            deliver_s, got = sweep(state, nodes)  # the sweep that hands the messages out
            idle_s, _ = sweep(state, nodes)  # the next ones, while the replies are awaited
            rows.append({"registered_nodes": num_nodes, "messages_in_flight": in_flight, "sweep_s": deliver_s,
                         "next_sweep_s": idle_s, "delivered": got, "get_node_ids_s": node_ids_s,
                         "us_per_node_and_message": 1e6 * idle_s / (num_nodes * max(in_flight, 1))})
            print(rows[-1], flush=True)
            state.delete_messages(set(state.message_ins_store))  # as if the ServerApp had pulled the replies
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps({"flwr": flwr.__version__, "python": sys.version.split()[0], "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
