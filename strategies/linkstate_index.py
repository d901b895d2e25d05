"""Simulation only: Flower's message pump without its per-node scan (`linkstate-index = true`, the default).

Flower 1.42's Simulation Engine moves messages to its workers with a pump that, every 0.1 s, asks the
in-memory LinkState for each registered node's next message (`vce_api.add_messages_to_queue` calls
`InMemoryLinkState.get_message_ins(node_id, limit=1)` for every node), and each call walks every message
in the store (`for msg_id in list(self.message_ins_store.keys())`). A sweep costs about 2.7 us x registered
nodes x messages in the store: 0.27 s at 1 000 nodes and 2.7 s at 10 000 with 100 messages out, about
25 ms per client-round at 10 000 for stock Flower (measured; minimal reproduction:
`results/simulation_cost/flower_linkstate_scan.py`). Flower has no setting for it.

`installed()` keeps, per LinkState, the set of nodes that may have an undelivered message: a node joins
when a message to it is stored, and leaves when Flower's own `get_message_ins` finds nothing left for it.
`get_message_ins` for a node outside the set returns [] at once; for a node in it, Flower's method runs
unchanged (the same message, marked delivered the same way, the same TTL checks of the whole store).
Both steps hold the LinkState's re-entrant lock, so the set is a superset of the nodes with undelivered
messages except while a store is between Flower's method and the set's update; a sweep that asks in that
moment (the "nothing here" answer reads the set without the lock) finds the message 0.1 s later, as Flower's
own sweep does for a message stored just after it passed the node. No message is held back longer, and a
sweep over 10 000 registered nodes costs 1.7 ms instead of Flower's 2.7 s with 100 messages out.
What the skipped calls did besides finding nothing: expiring stale messages of other nodes. The ServerApp's
own pull (`get_message_res`) expires the messages it waits for, and the sampled nodes' calls still sweep
the whole store every 0.1 s, so every message in flight is still checked.

Installed by the ServerApp around its run, in the process that runs the Simulation Engine (the in-memory
LinkState lives there); restored when the run ends. Outside a simulation it does nothing and imports
nothing. Patches two methods of a Flower class: re-check on a Flower upgrade (`tests/test_linkstate_index.py`
runs the real LinkState and compares deliveries with the unpatched one).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MODULE = "flwr.server.superlink.linkstate.in_memory_linkstate"
_ATTR = "_fedmeta_pending_nodes"
_installs = 0
_generation = 0  # bumped by every install: a node set kept from an earlier install is rebuilt, not trusted
_guard = threading.Lock()
_originals: dict[str, Any] = {}  # Flower's methods (kept after an uninstall: a call in flight may still use them)


def _pending(state) -> set[int]:
    """The state's node set; built from its store on first use (messages stored before the install)."""
    generation, nodes = state.__dict__.get(_ATTR, (None, None))
    if generation != _generation:
        nodes = {m.metadata.dst_node_id for m in state.message_ins_store.values() if m.metadata.delivered_at == ""}
        state.__dict__[_ATTR] = (_generation, nodes)
    return nodes


def _store_message_ins(self, message):
    with self.lock:
        message_id = _originals["store_message_ins"](self, message)
        if message_id is not None:
            _pending(self).add(message.metadata.dst_node_id)
    return message_id


def _get_message_ins(self, node_id, limit, *, run_id=None):
    # Fast path, without the lock (the pump asks for every registered node every 0.1 s): a node not in
    # the current set has nothing waiting. A message stored concurrently is found by the next sweep, as
    # when Flower's sweep has passed its node before it is stored. (A set's `in` is atomic under the GIL.)
    generation, nodes = self.__dict__.get(_ATTR, (None, None))
    if generation == _generation and node_id not in nodes:
        return []
    with self.lock:
        nodes = _pending(self)
        if node_id not in nodes:
            return []
        found = _originals["get_message_ins"](self, node_id, limit, run_id=run_id)
        if not found:
            nodes.discard(node_id)
        return found


def active() -> bool:
    return _installs > 0


@contextmanager
def installed(enabled: bool = True) -> Iterator[bool]:
    """Patch `InMemoryLinkState` while the block runs (nested and concurrent runs share one patch);
    yields whether it is patched (False outside a simulation or when disabled)."""
    global _installs, _generation
    if not enabled or MODULE not in sys.modules:  # no in-memory LinkState in this process
        yield False
        return
    cls = sys.modules[MODULE].InMemoryLinkState
    with _guard:
        if _installs == 0:
            _generation += 1
            _originals.update(store_message_ins=cls.store_message_ins, get_message_ins=cls.get_message_ins)
            cls.store_message_ins, cls.get_message_ins = _store_message_ins, _get_message_ins
        _installs += 1
    try:
        yield True
    finally:
        with _guard:
            _installs -= 1
            if _installs == 0:
                cls.store_message_ins = _originals["store_message_ins"]
                cls.get_message_ins = _originals["get_message_ins"]
