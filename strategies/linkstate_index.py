"""Simulation only: Flower's message pump without its per-node scan and its fixed wait (`linkstate-index = true`,
the default).

Flower 1.42's Simulation Engine moves messages to its workers with a pump that, every 0.1 s, asks the
in-memory LinkState for each registered node's next message (`vce_api.add_messages_to_queue` calls
`InMemoryLinkState.get_message_ins(node_id, limit=1)` for every node), and each call walks every message
in the store (`for msg_id in list(self.message_ins_store.keys())`). A sweep costs about 2.7 us x registered
nodes x messages in the store: 0.27 s at 1 000 nodes and 2.7 s at 10 000 with 100 messages out, about
25 ms per client-round at 10 000 for stock Flower (measured; minimal reproduction:
`results/simulation_cost/flower_linkstate_scan.py`). And a message stored just after a sweep waits for the
next one: a round (a train and an evaluate phase) idles 0.1 s on average at any size. Flower has no setting
for either.

`installed()` keeps, per LinkState, an index of the nodes that may have an undelivered message, with how many
were stored for each and not yet handed out: a node joins when a message to it is stored, and leaves when
Flower's own `get_message_ins` has handed out as many as were stored, or finds nothing left (a message expired
or deleted). `get_message_ins` for a node outside the index returns [] at once; for one in it, Flower's method runs
unchanged (the same message, marked delivered the same way, the same TTL checks of the whole store).
Both steps hold the LinkState's re-entrant lock, so the index holds every node with undelivered
messages except while a store is between Flower's method and the index's update; a sweep that asks in that
moment (the "nothing here" answer reads the index without the lock) finds the message at its next sweep, as
Flower's own sweep does for a message stored just after it passed the node.

It also replaces the pump (`_pump`, for engines that start while it is installed): a sweep asks only the
nodes in the index, in Flower's order, one message each, and the pump sleeps until the next store (at most
0.1 s, when it checks the engine's stop event as Flower's does) instead of 0.1 s. A pump started before the
install is Flower's and still gains from the index (2 ms per idle sweep over 10 000 nodes:
`benchmarks/wire_cost.py`); one that outlives the install sweeps every node every 0.1 s, as Flower's.
What the skipped calls did besides finding nothing: expiring stale messages of other nodes. The ServerApp's
own pull (`get_message_res`) expires the messages it waits for.

Installed by the ServerApp around its run, in the process that runs the Simulation Engine (the in-memory
LinkState lives there); restored when the run ends. Outside a simulation it does nothing and imports
nothing. Patches two methods of a Flower class and one function of its engine: re-check on a Flower upgrade
(`tests/test_linkstate_index.py` runs the real LinkState and pump and compares deliveries with Flower's own).
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MODULE = "flwr.server.superlink.linkstate.in_memory_linkstate"
VCE = "flwr.server.superlink.fleet.vce.vce_api"  # the engine: its pump, `add_messages_to_queue`
_ATTR = "_fedmeta_pending_nodes"
_installs = 0
_generation = 0  # bumped by every install: an index kept from an earlier install is rebuilt, not trusted
_guard = threading.Lock()
_originals: dict[str, Any] = {}  # Flower's methods (kept after an uninstall: a call in flight may still use them)
_wake = threading.Condition()  # notified by every store: the pump sweeps then, not 0.1 s later
_stored = 0  # stores so far (the pump's wait compares it, so a store between its sweep and its wait is not missed)


def _pending(state) -> dict[int, int]:
    """The state's index, node -> messages stored for it and not yet handed out; built from its store on first
    use (messages stored before the install)."""
    generation, nodes = state.__dict__.get(_ATTR, (None, None))
    if generation != _generation:
        waiting = [m.metadata.dst_node_id for m in state.message_ins_store.values() if m.metadata.delivered_at == ""]
        nodes = dict(Counter(waiting))
        state.__dict__[_ATTR] = (_generation, nodes)
    return nodes


def _store_message_ins(self, message):
    global _stored
    with self.lock:
        message_id = _originals["store_message_ins"](self, message)
        if message_id is not None:
            nodes, node = _pending(self), message.metadata.dst_node_id
            nodes[node] = nodes.get(node, 0) + 1
            with _wake:  # (lock order: the LinkState's, then _wake's; the pump never holds _wake for more)
                _stored += 1
                _wake.notify_all()
    return message_id


def _get_message_ins(self, node_id, limit, *, run_id=None):
    # Fast path, without the lock (the pump asks for every registered node every 0.1 s): a node not in
    # the current index has nothing waiting. A message stored concurrently is found by the next sweep, as
    # when Flower's sweep has passed its node before it is stored. (A dict's `in` is atomic under the GIL.)
    generation, nodes = self.__dict__.get(_ATTR, (None, None))
    if generation == _generation and node_id not in nodes:
        return []
    with self.lock:
        nodes = _pending(self)
        if node_id not in nodes:
            return []
        found = _originals["get_message_ins"](self, node_id, limit, run_id=run_id)
        left = nodes[node_id] - len(found)
        if not found or left <= 0:  # all it was sent is handed out (or gone: expired, deleted): leaves the index
            del nodes[node_id]
        else:
            nodes[node_id] = left
        return found


def _pump(state, queue, nodes_mapping, f_stop) -> None:
    """`vce_api.add_messages_to_queue` woken by a stored message instead of a fixed 0.1 s wait: each sweep
    asks the nodes with messages waiting, in Flower's order (the node mapping's), for one message each, as
    Flower's sweep does, and sweeps again at once after handing messages out (a node's next message, or
    none, which drops it from the index). While the index is not installed it is Flower's loop."""
    order = {node: i for i, node in enumerate(nodes_mapping)}
    while not f_stop.is_set():
        with _wake:
            seen = _stored
        handed = 0
        if active():
            with state.lock:
                nodes = sorted((n for n in _pending(state) if n in order), key=order.__getitem__)
        else:
            nodes = list(nodes_mapping)
        for node_id in nodes:
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
                handed += 1
        if not active():
            f_stop.wait(0.1)
        elif not handed:
            with _wake:  # a store after `seen` wakes it; at most 0.1 s, as Flower's (f_stop is checked then)
                _wake.wait_for(lambda: _stored != seen, timeout=0.1)


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
    cls, vce = sys.modules[MODULE].InMemoryLinkState, sys.modules.get(VCE)
    with _guard:
        if _installs == 0:
            _generation += 1
            _originals.update(store_message_ins=cls.store_message_ins, get_message_ins=cls.get_message_ins)
            cls.store_message_ins, cls.get_message_ins = _store_message_ins, _get_message_ins
            if vce is not None:  # an engine that starts its pump from now on starts this one
                _originals["add_messages_to_queue"] = vce.add_messages_to_queue
                vce.add_messages_to_queue = _pump
        _installs += 1
    try:
        yield True
    finally:
        with _guard:
            _installs -= 1
            if _installs == 0:
                cls.store_message_ins = _originals["store_message_ins"]
                cls.get_message_ins = _originals["get_message_ins"]
                if vce is not None and "add_messages_to_queue" in _originals:
                    vce.add_messages_to_queue = _originals.pop("add_messages_to_queue")
