"""strategies.linkstate_index on Flower's real in-memory LinkState: the pump gets the same messages in the
same order as without it, messages stored before the install are not lost, and Flower's methods come back."""

import importlib.util
import queue
import random
import threading
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

from strategies import linkstate_index

SCAN = Path(__file__).parents[1] / "results" / "simulation_cost" / "flower_linkstate_scan.py"
spec = importlib.util.spec_from_file_location("flower_linkstate_scan", SCAN)
scan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scan)  # engine(): a LinkState with simulated nodes and a run, as run_simulation builds


def message(node: int, tag: int) -> Message:
    return Message(RecordDict({"c": ConfigRecord({"tag": tag})}), dst_node_id=node, message_type="train")


def script(seed: int, nodes: list[int]) -> list[tuple[str, list]]:
    """Pushes (several messages to a node, some nodes never), pump sweeps, and deletions of delivered ones."""
    rng, steps, tag = random.Random(seed), [], 0
    for _ in range(12):
        batch = []
        for node in rng.sample(nodes, 8) + rng.sample(nodes, 3):  # some nodes get two messages
            batch.append((node, tag))
            tag += 1
        steps += [("push", batch), ("sweep", []), ("sweep", []), ("drop", [rng.random() < 0.7 for _ in batch])]
    return steps


def play(steps, nodes) -> list[tuple[int, int]]:
    """Run the script on a fresh engine; (node, tag) of every message the sweeps hand out, in order."""
    state, grid, registered = scan.engine(nodes)
    handed, delivered_ids = [], []
    for kind, arg in steps:
        if kind == "push":
            grid.push_messages([message(registered[n % nodes], t) for n, t in arg])
        elif kind == "sweep":  # add_messages_to_queue's loop body
            for node in registered:
                for m in state.get_message_ins(node_id=node, limit=1):
                    handed.append((registered.index(node), m.content["c"]["tag"]))
                    delivered_ids.append(m.metadata.message_id)
        else:  # the ServerApp pulled some replies: their messages leave the store
            gone = {i for i, keep in zip(delivered_ids, arg) if keep}
            state.delete_messages(gone)
            delivered_ids = [i for i in delivered_ids if i not in gone]
    return handed


def test_the_pump_hands_out_the_same_messages_in_the_same_order():
    nodes = 40
    steps = script(0, list(range(nodes)))
    plain = play(steps, nodes)
    with linkstate_index.installed() as on:
        assert on and linkstate_index.active()
        indexed = play(steps, nodes)
    assert not linkstate_index.active()
    assert len(plain) == sum(len(arg) for kind, arg in steps if kind == "push")  # every message, once
    assert indexed == plain


def test_messages_stored_before_the_install_are_delivered_and_flower_comes_back():
    original = InMemoryLinkState.get_message_ins
    state, grid, registered = scan.engine(5)
    with linkstate_index.installed():
        state.get_message_ins(node_id=registered[0], limit=1)  # the index exists: empty
    grid.push_messages([message(registered[3], 1)])  # stored while not installed
    assert InMemoryLinkState.get_message_ins is original
    with linkstate_index.installed(), linkstate_index.installed():  # nested: one patch
        got = [m for n in registered for m in state.get_message_ins(node_id=n, limit=1)]
        assert [m.content["c"]["tag"] for m in got] == [1]
        assert InMemoryLinkState.get_message_ins is not original
    assert InMemoryLinkState.get_message_ins is original


def test_disabled_is_flowers_own():
    with linkstate_index.installed(enabled=False) as on:
        assert not on and not linkstate_index.active()


def pumped(installed: bool, batches: list[list[tuple[int, int]]], nodes: int = 30) -> list[tuple[int, int]]:
    """The engine's pump (`vce_api.add_messages_to_queue` as the engine finds it) in its own thread on a fresh
    engine, fed batches of (node, tag) while it runs; (node, tag) of every message it hands out, in order."""
    state, grid, registered = scan.engine(nodes)
    out, stop = queue.Queue(), threading.Event()
    mapping = dict.fromkeys(registered)
    with linkstate_index.installed(installed):
        pump = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, out, mapping, stop))
        pump.start()
        handed = []
        for batch in batches:
            grid.push_messages([message(registered[n], t) for n, t in batch])
            for _ in batch:  # every message comes out (a lost one times out here)
                m = out.get(timeout=5)
                handed.append((registered.index(m.metadata.dst_node_id), m.content["c"]["tag"]))
        stop.set()
        pump.join(timeout=5)
        assert not pump.is_alive()  # it stops on the engine's stop event, as Flower's
    assert out.empty()  # and nothing twice
    return handed


def test_the_installed_pump_hands_out_every_message_once_and_stops():
    batches = [[(n, 10 * b + i) for i, n in enumerate(random.Random(b).sample(range(30), 6))] for b in range(5)]
    batches.append([(3, 100), (3, 101), (3, 102), (7, 103)])  # several waiting for one node: one per sweep
    indexed, plain = pumped(True, batches), pumped(False, batches)
    assert sorted(indexed) == sorted(plain) == sorted(m for b in batches for m in b)
    # a node's messages in the order stored, as from Flower's pump
    assert [t for n, t in indexed if n == 3] == [t for n, t in plain if n == 3]
    assert vce_api.add_messages_to_queue.__module__ == vce_api.__name__  # Flower's again after the run


def test_the_pump_is_flowers_loop_while_the_index_is_not_installed():
    original = vce_api.add_messages_to_queue
    with linkstate_index.installed():
        assert vce_api.add_messages_to_queue is linkstate_index._pump
    assert vce_api.add_messages_to_queue is original
    # a pump started under the index that outlives it (another run's engine) falls back to Flower's sweep
    state, grid, registered = scan.engine(4)
    out, stop = queue.Queue(), threading.Event()
    pump = threading.Thread(target=linkstate_index._pump, args=(state, out, dict.fromkeys(registered), stop))
    pump.start()
    grid.push_messages([message(registered[2], 5)])
    assert out.get(timeout=5).content["c"]["tag"] == 5
    stop.set()
    pump.join(timeout=5)
    assert not pump.is_alive()
