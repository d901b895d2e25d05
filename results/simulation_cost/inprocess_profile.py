"""fedmeta's own cost per client-round without Flower's engine: the ServerApp (`strategies.server_app.serve`) on a
grid that answers each message by calling the ClientApp's handler in this process (no LinkState, no Ray), under
cProfile. Splits the time into the ServerApp's and the ClientApp handlers', and prints the top functions.

    python results/simulation_cost/inprocess_profile.py [partitions=10000] [rounds=6] [top=30]
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import tempfile
import time
import uuid

from flwr.app import Context, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import client_app
from fedmeta.config import Config
from strategies import roster
from strategies.server_app import serve

HANDLERS = {MessageType.TRAIN: client_app.train, MessageType.EVALUATE: client_app.evaluate}


class LocalGrid:
    """`nodes` nodes; a pushed message is answered at once by the ClientApp handler (timed apart)."""

    def __init__(self, nodes: int) -> None:
        self.nodes, self.replies, self.client_s = list(range(1000, 1000 + nodes)), {}, 0.0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = str(uuid.uuid4())  # as the LinkState does
            t = time.perf_counter()
            TaskIdentity.node_id = node = msg.metadata.dst_node_id
            reply = HANDLERS[msg.metadata.message_type](msg, Context(run_id=7, node_id=node, node_config={},
                                                                     state=RecordDict(), run_config={}))
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            TaskIdentity.node_id = 1
            self.client_s += time.perf_counter() - t
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]


def main(partitions: int = 10000, rounds: int = 6, top: int = 30) -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1  # messages need one, as in a simulation
    roster.POLL_S = 0.0  # no registration to wait for
    grid = LocalGrid(partitions)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(num_rounds=rounds, local_iterations=1, meta_batch_size=1, eval_tasks=5, eval_steps=1,
                     fraction_train=100 / partitions, min_train_nodes=min(100, partitions - 2), results_dir=tmp,
                     run_name="profile")
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.runcall(serve, grid, cfg)
        total = time.perf_counter() - t
    client_rounds = rounds * (min(100, partitions - 2) + 2)
    print(f"{partitions} partitions, {rounds} rounds: {total:.2f} s; ServerApp "
          f"{1000 * (total - grid.client_s) / client_rounds:.2f} ms, ClientApp handlers "
          f"{1000 * grid.client_s / client_rounds:.2f} ms per client-round (cProfile on)")
    pstats.Stats(prof).sort_stats("cumulative").print_stats("strategies|clients|fedmeta", top)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
