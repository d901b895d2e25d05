"""What a message costs on the wire and in the engine's pump, fedmeta against Flower, side by side in one run.

1. The codec: a meta-model as an ArrayRecord and back. Flower: `ArrayRecord(state_dict)` and
   `ArrayRecord.to_torch_state_dict()` (an `np.save` / `np.load` per array). fedmeta: `clients/records.py`
   (the same bytes, checked here; the `.npy` header built once per dtype and shape, read with `np.frombuffer`).
   The sinusoid MLP (6 arrays) and the Omniglot Conv4 (18 arrays), median microseconds per record.
2. The Simulation Engine's pump: one sweep over every registered node, as `vce_api.add_messages_to_queue` does it
   (`get_message_ins(node, limit=1)` per node), on Flower's real in-memory LinkState with 100 messages stored
   and handed out, at 100, 1 000 and 10 000 nodes: Flower's method against `strategies/linkstate_index.py`'s
   (median milliseconds of the sweep that hands the messages out, the next and a later one; the minimal
   reproduction without fedmeta is
   `results/simulation_cost/flower_linkstate_scan.py`, whose `engine()` builds the LinkState here too).

    python benchmarks/wire_cost.py
    python benchmarks/wire_cost.py --quick        # smoke run
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from clients.records import from_record, to_record
from fedmeta import algorithms, seeding
from fedmeta.config import Config
from fedmeta.lab import tables
from fedmeta.lab.args import REPO, Args, arg, command, parse
from strategies import linkstate_index

SCAN = REPO / "results" / "simulation_cost" / "flower_linkstate_scan.py"


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "benchmarks/wire_cost.py"
    NAME: ClassVar[str] = "wire_cost"
    QUICK: ClassVar[dict] = {"reps": 3, "loops": 20, "nodes": (100, 1000), "messages": 10}

    reps: int = arg(9, "repetitions of each measurement, alternating fedmeta and Flower (median reported)")
    loops: int = arg(300, "records written / read per codec repetition")
    nodes: tuple[int, ...] = arg((100, 1000, 10000), "registered nodes of the pump's sweeps")
    messages: int = arg(100, "messages stored and handed out before the timed sweeps (a round's sampled clients)")


def timed(fn, loops: int) -> float:
    t = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t) / loops


def codec_rows(args: Settings) -> list[dict]:
    rows = []
    for task in ("sinusoid", "omniglot"):
        params = algorithms.build(Config(task=task)).init(seeding.generator(0, "init"))
        flower, ours = ArrayRecord(params), to_record(params)
        same = all(flower[k].data == ours[k].data for k in params)  # the bytes Flower would send
        back = from_record(flower)
        same = same and all(torch.equal(back[k], v) for k, v in params.items())
        ops = {"write": (lambda: ArrayRecord(params), lambda: to_record(params)),
               "read": (flower.to_torch_state_dict, lambda: from_record(flower))}
        for op, (theirs, mine) in ops.items():
            t_flower, t_ours = [], []
            for _ in range(args.reps):  # alternating: a slower minute of the machine hits both
                t_flower.append(timed(theirs, args.loops))
                t_ours.append(timed(mine, args.loops))
            f, o = statistics.median(t_flower), statistics.median(t_ours)
            rows.append({"task": task, "arrays": len(params), "op": op, "flower_us": 1e6 * f, "fedmeta_us": 1e6 * o,
                         "speedup": f / o, "same_bytes_and_values": same})
    return rows


def load_scan():
    spec = importlib.util.spec_from_file_location("flower_linkstate_scan", SCAN)
    scan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scan)
    return scan


SWEEPS = ("hands out", "next", "later")  # the sweep that hands the messages out, the one after, a later one
KEYS = [k.replace(" ", "_") for k in SWEEPS]


def sweep_rows(args: Settings) -> list[dict]:
    """Three sweeps in a row after the messages are stored: the first hands them out; they stay stored (until
    the ServerApp pulls the replies), so Flower's later sweeps cost what the first did. With the index, a node
    leaves it once what was stored for it is handed out, so the later sweeps skip every node; the first still
    runs Flower's method (a walk of the store) for each node served."""
    scan, rows = load_scan(), []
    for n in args.nodes:
        times: dict[tuple[bool, str], list[float]] = {(i, k): [] for i in (False, True) for k in SWEEPS}
        for _ in range(args.reps):
            for indexed in (False, True):
                with linkstate_index.installed(indexed):
                    state, grid, nodes = scan.engine(n)
                    stride = max(1, n // args.messages)
                    grid.push_messages([Message(RecordDict({"c": ConfigRecord({"a": 1})}), dst_node_id=nodes[i * stride],
                                                message_type="train") for i in range(args.messages)])
                    for kind in SWEEPS:
                        seconds, handed = scan.sweep(state, nodes)
                        if handed != (args.messages if kind == "hands out" else 0):
                            raise RuntimeError(f"{n} nodes, index {indexed}, sweep {kind!r}: {handed} handed out")
                        times[indexed, kind].append(seconds)
        med = {key: 1e3 * statistics.median(t) for key, t in times.items()}
        rows.append({"registered_nodes": n, "messages_stored": args.messages,
                     **{f"flower_{k.replace(' ', '_')}_ms": med[False, k] for k in SWEEPS},
                     **{f"fedmeta_{k.replace(' ', '_')}_ms": med[True, k] for k in SWEEPS},
                     "speedup_later": med[False, "later"] / med[True, "later"]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(1)
    codec, sweeps = codec_rows(args), sweep_rows(args)
    summary = {"command": command(args), "machine": tables.machine(["flwr"]), "codec": codec, "sweeps": sweeps}
    lines = ["# A record on the wire (us per record, median)", "",
             *tables.markdown_table(["model", "arrays", "op", "Flower", "fedmeta", "speed-up", "same bytes and values"],
                                    [[r["task"], r["arrays"], r["op"], f"{r['flower_us']:.0f}", f"{r['fedmeta_us']:.0f}",
                                      f"{r['speedup']:.1f}x", r["same_bytes_and_values"]] for r in codec], align="lrlrrrl"),
             "", f"# Sweeps of the engine's pump over every registered node after {args.messages} messages are stored "
                 "(ms, median): the one that hands them out, the next, a later one (replies awaited)", "",
             *tables.markdown_table(["registered nodes", *(f"Flower: {k}" for k in SWEEPS),
                                     *(f"fedmeta's index: {k}" for k in SWEEPS), "later: speed-up"],
                                    [[r["registered_nodes"], *(f"{r[f'flower_{k}_ms']:.2f}" for k in KEYS),
                                      *(f"{r[f'fedmeta_{k}_ms']:.2f}" for k in KEYS), f"{r['speedup_later']:.0f}x"]
                                     for r in sweeps], align="r" * 8)]
    tables.write_summary(args.out_dir, summary, lines)
    return summary


if __name__ == "__main__":
    main()
