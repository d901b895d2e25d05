"""Simulation cost: how long rounds take and what they cost per client-round, fedmeta's app vs a stock Flower
app (FedAvg + a ClientApp that echoes its weights), side by side in one run, on the same Simulation Engine (Ray
backend), at 100, 1 000 and 10 000 registered clients (`num-supernodes`) with 100 sampled per round.

Both apps do (almost) no learning, so the round time is framework cost: the engine's message routing (its
in-memory LinkState), Ray dispatch, (de)serialisation and, for fedmeta, config parsing, reply checks, fusion,
the CSV rows and the checkpoint. fedmeta's clients do one meta-iteration on one task (local-iterations = 1,
meta-batch-size = 1) and the 2 held-out partitions evaluate 5 tasks with 1 step; the client compute they report
is subtracted (2 Ray workers run clients in parallel). The stock app trains 100 nodes and evaluates 2.

Per size and app: the first round apart (from the simulation's launch, so with Ray's start and the nodes'
registration, and on its own), the median later round, milliseconds per client-round in wall-clock time and in
CPU time of all the run's processes (which other load on a shared machine does not inflate), and the peak resident
memory of every process of the run (this one, Ray's raylet / GCS / workers) sampled from /proc. fedmeta's app
runs in this process (`run_simulation`, as the stock app), as users start it, `fedmeta run` (its own
SuperLink and flwr-simulation processes; their memory, not this process's), and in this process with Flower's
own message pump (`linkstate-index = false`: the split between fedmeta's index over the engine's LinkState and
the rest), and above 100 clients as partitions on 100 nodes; the last two must give fedmeta's numbers. Then
the resident memory of one client process (a Ray worker's imports) as it serves k partitions, for sinusoid and
Omniglot (`fedmeta.local` caches each partition's client: model and task data).

    python benchmarks/simulation_cost.py [--clients 100 1000 10000] [--sampled 100] [--rounds 16]
    python benchmarks/simulation_cost.py --quick      # smoke run: 6 clients, 2 sampled, 3 rounds
    py-spy record --subprocesses --threads --format raw -o profile.txt -- python benchmarks/simulation_cost.py \
        --clients 10000 --runs fedmeta --worker-partitions 0 --out /tmp/profile   # one app at one size, profiled
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Self

import torch
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from references import stock_client, stock_server

from clients.client_app import app as fedmeta_client
from fedmeta import algorithms, seeding
from fedmeta.config import Config
from fedmeta.lab import tables
from fedmeta.lab.args import Args, arg, command, parse
from fedmeta.results import load_run
from strategies import fedmeta_strategy
from strategies.server_app import server_app

WORKERS = 2  # Ray workers: 2 CPUs, 1 per client
BACKEND = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": WORKERS}}
HELDOUT = 2  # fedmeta's held-out partitions (evaluated every round); the stock app evaluates as many nodes
COLUMNS = ["clients", "implementation", "sampled", "client_rounds_per_round", "first_round_from_launch_s",
           "first_round_s", "later_round_s", "ms_per_client_round", "overhead_ms_per_client_round",
           "ratio_vs_stock", "cpu_ms_per_client_round", "cpu_overhead_ms_per_client_round", "cpu_ratio_vs_stock",
           "cpu_server_ms_per_client_round", "cpu_workers_ms_per_client_round", "cpu_other_ms_per_client_round",
           "client_compute_ms_per_client_round", "total_s", "peak_rss_mb", "peak_pss_mb", "ray_worker_rss_mb", "same_numbers",
           "processes"]
RUNS = ("stock", "fedmeta", "fedmeta-run", "flower-pump", "partitions")
IID_PARTITIONS = 8  # iid Omniglot: every training partition caches the whole family (about 150 MB each)
MEMORY_COLUMNS = ["task", "partition", "partitions_served", "rss_mb", "growth_mb"]


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "benchmarks/simulation_cost.py"
    NAME: ClassVar[str] = "simulation_cost"
    QUICK: ClassVar[dict] = {"clients": (6,), "sampled": 2, "rounds": 3, "partition_nodes": 4, "worker_partitions": 3}

    clients: tuple[int, ...] = arg((100, 1000, 10000), "simulation sizes (registered clients, num-supernodes)")
    sampled: int = arg(100, "clients trained per round (fraction-train = sampled / clients)")
    rounds: int = arg(16, "rounds per simulation (round 1 is reported apart; the later ones give the median)")
    poll_interval: float = arg(Config().poll_interval, "fedmeta's reply poll (seconds; the run-config key "
                                                       "poll-interval)")
    runs: tuple[str, ...] = arg(RUNS, "what runs at each size: the stock app; fedmeta's app in this process; "
                                      "through `fedmeta run` (its SuperLink and flwr-simulation processes, for their "
                                      "memory and start-up); in this process with Flower's own message pump (linkstate-index "
                                      "off); as partitions on --partition-nodes nodes", choices=RUNS)
    partition_nodes: int = arg(100, "sizes above this also run fedmeta's clients as partitions on this many "
                                    "Flower nodes (num-partitions = clients), the other workaround for the engine's cost per "
                                    "registered node")
    worker_partitions: int = arg(32, "partitions one client process serves in the worker-memory probe "
                                     "(Omniglot non-iid: 30 training + 2 held-out alphabet groups at 32)")


# --- memory of every process of a run (/proc; Linux) ----------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key)), 0)
    except OSError:
        return 0


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")[:60]
    except OSError:
        return "?"


def process_tree(root: int | None = None) -> list[int]:
    """This process and all its descendants (Ray's GCS and raylet are its children, the workers theirs)."""
    kids, out, todo = _children(), [], [root or os.getpid()]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


CPU_ROLES = ("server", "workers", "other")  # the ServerApp's process (with the engine), Ray workers, the rest


def cpu_seconds(itself: bool = True) -> dict[str, float]:
    """User + system CPU time consumed so far by the run's processes (this one unless not `itself`), by role:
    "server" (this process, or flwr-simulation under `fedmeta run`), "workers" (Ray's), "other" (raylet, GCS,
    Ray's agents, the SuperLink). Other load on the machine does not inflate it, unlike wall-clock time."""
    ticks = dict.fromkeys(CPU_ROLES, 0)
    for pid in process_tree():
        if itself or pid != os.getpid():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            name = _name(pid)
            role = ("server" if pid == os.getpid() or "flwr-simulation" in name else
                    "workers" if name.startswith("ray::") else "other")
            ticks[role] += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return {role: t / os.sysconf("SC_CLK_TCK") for role, t in ticks.items()}


@dataclass
class Stamps:
    """The end of every round: wall-clock time and the CPU time of the run's processes then."""

    itself: bool = True
    times: list[float] = field(default_factory=list)
    cpus: list[dict[str, float]] = field(default_factory=list)

    def __call__(self, count: int = 1) -> None:
        now, cpu = time.perf_counter(), cpu_seconds(self.itself)
        self.times += [now] * count
        self.cpus += [cpu] * count

    def __len__(self) -> int:
        return len(self.times)

    def after(self, first: int) -> Stamps:
        return Stamps(self.itself, self.times[first:], self.cpus[first:])


class MemoryPeak:
    """Samples the resident memory (RSS; and PSS, which shares shared pages out) of every process of the run
    every `period` seconds; keeps the peak of the sum and the largest Ray worker. Light: it runs in the
    process it measures (a /proc scan a second; PSS, which walks page tables, only when the peak grew)."""

    def __init__(self, period: float = 1.0, itself: bool = True) -> None:
        self.period, self.stop, self.itself = period, threading.Event(), itself
        self.peak_rss = self.peak_pss = self.worker_rss = self._pss_at = 0
        self.at_peak: dict[str, int] = {}
        self.names: dict[int, str] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _name(self, pid: int) -> str:
        name = self.names.get(pid) or _name(pid)
        if name.startswith("ray::ClientAppActor"):  # final (a starting worker renames itself)
            self.names[pid] = name
        return name

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            rss = {pid: _kb(f"/proc/{pid}/status", "VmRSS:") for pid in process_tree()
                   if self.itself or pid != os.getpid()}
            total = sum(rss.values())
            workers = [kb for pid, kb in rss.items() if self._name(pid).startswith("ray::ClientAppActor")]
            self.worker_rss = max([self.worker_rss, *workers])
            if total > self.peak_rss:
                self.peak_rss = total
                self.at_peak = {f"{self._name(pid)} [{pid}]": kb // 1024 for pid, kb in rss.items() if kb > 10240}
                if total > self._pss_at + 32 * 1024:  # grew by 32 MB since PSS was last read
                    self._pss_at = total
                    self.peak_pss = max(self.peak_pss, sum(_kb(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in rss))


@contextmanager
def round_ends() -> Iterator[Stamps]:
    """When each of fedmeta's rounds ended (its rows and checkpoint written), stamped in the ServerApp."""
    ends = Stamps()
    end_round = fedmeta_strategy.FedMeta.end_round

    def stamped(self, *args, **kwargs):
        end_round(self, *args, **kwargs)
        ends()

    fedmeta_strategy.FedMeta.end_round = stamped
    try:
        yield ends
    finally:
        fedmeta_strategy.FedMeta.end_round = end_round


# --- one simulation of each app ----------------------------------------------------------------------------------
def fedmeta_config(n: int, sampled: int, rounds: int, poll_interval: float) -> Config:
    return Config(num_rounds=rounds, local_iterations=1, meta_batch_size=1, eval_tasks=5, eval_steps=1,
                  heldout_partitions=HELDOUT, fraction_train=sampled / n, min_train_nodes=min(sampled, n - HELDOUT),
                  poll_interval=poll_interval)


def simulate(server: ServerApp, client: ClientApp, n: int) -> tuple[float, float, MemoryPeak]:
    with MemoryPeak() as mem:
        launch = time.perf_counter()
        run_simulation(server, client, n, backend_config=BACKEND)
        total = time.perf_counter() - launch
    return launch, total, mem


def run_stock(n: int, sampled: int, rounds: int, params: dict) -> dict:
    ends = Stamps()
    launch, total, mem = simulate(stock_server(params, n, sampled, HELDOUT, rounds, ends), stock_client, n)
    return measured("stock-flower-fedavg", n, sampled + HELDOUT, launch, ends.after(1), ends.times[1] - ends.times[0],
                    [0.0] * rounds, total, mem)


def run_fedmeta(n: int, sampled: int, rounds: int, poll_interval: float, nodes: int | None = None,
                index: bool = True) -> dict:
    """fedmeta's app on `nodes` Flower nodes (default: one per client); with fewer, the n virtual clients are
    partitions bound to nodes (assign-partitions: partition p on node p mod nodes). `index` = False: with
    Flower's own message pump (linkstate-index off, strategies/linkstate_index.py)."""
    nodes = nodes or n
    cfg = fedmeta_config(n, sampled, rounds, poll_interval).replace(num_partitions=n if nodes != n else 0,
                                                                    linkstate_index=index)
    with round_ends() as ends, tempfile.TemporaryDirectory() as tmp:
        launch, total, mem = simulate(server_app(cfg.replace(results_dir=tmp, run_name="bench")), fedmeta_client,
                                      nodes)
        run = load_run(Path(tmp) / "bench")
    if run.status["status"] != "completed":
        raise RuntimeError(f"fedmeta's run at {n} clients on {nodes} nodes: {run.status}")
    compute = run.clients.groupby("round")["seconds"].sum().reindex(range(1, rounds + 1), fill_value=0.0)
    per_round = int(run.rounds["num_sampled"].iloc[-1]) + HELDOUT
    name = "fedmeta" if nodes == n else f"fedmeta, {n} partitions on {nodes} nodes"
    row = measured(name if index else f"{name}, Flower's pump (linkstate-index off)", n, per_round, launch,
                   ends, float(run.rounds["seconds"].iloc[0]), compute.tolist(), total, mem)
    row["numbers"] = run.rounds.drop(columns="seconds")  # same seed: the same numbers on any nodes
    return row


def measured(impl: str, n: int, per_round: int, launch: float, ends: Stamps, first_round: float,
             compute: list[float], total: float, mem: MemoryPeak) -> dict:
    """A row: `ends` stamp the rounds' ends; `compute` the clients' reported seconds per round (subtracted: from
    the wall-clock time as 2 workers run clients in parallel, from the CPU time in full)."""
    later = [b - a for a, b in itertools.pairwise(ends.times)]  # rounds 2..R
    overhead = [s - c / WORKERS for s, c in zip(later, compute[1:])]
    roles = {r: (ends.cpus[-1][r] - ends.cpus[0][r]) / (len(ends) - 1) for r in CPU_ROLES}  # per later round
    cpu = sum(roles.values())
    return {"clients": n, "implementation": impl, "sampled": per_round - HELDOUT, "client_rounds_per_round": per_round,
            "first_round_from_launch_s": ends.times[0] - launch, "first_round_s": first_round,
            "later_round_s": statistics.median(later), "ms_per_client_round": 1000 * statistics.median(later) / per_round,
            "overhead_ms_per_client_round": 1000 * statistics.median(overhead) / per_round,
            "cpu_ms_per_client_round": 1000 * cpu / per_round,
            "cpu_overhead_ms_per_client_round": 1000 * (cpu - statistics.fmean(compute[1:])) / per_round,
            **{f"cpu_{r}_ms_per_client_round": 1000 * roles[r] / per_round for r in CPU_ROLES},
            "client_compute_ms_per_client_round": 1000 * statistics.fmean(compute[1:]) / per_round, "total_s": total,
            "peak_rss_mb": mem.peak_rss / 1024, "peak_pss_mb": mem.peak_pss / 1024,
            "ray_worker_rss_mb": mem.worker_rss / 1024, "processes": mem.at_peak}


def run_cli(n: int, sampled: int, rounds: int, poll_interval: float) -> dict:
    """fedmeta's app as users start it: `fedmeta run` (a local SuperLink, `flwr run`, the flwr-simulation
    process with the ServerApp, Ray). Memory: that process tree (not this benchmark's process); round ends:
    when rounds.csv gains a row (polled every 20 ms)."""
    from fedmeta.lab import federation

    if superlink_running():
        raise RuntimeError("a SuperLink is already running: `fedmeta run` would use it and its memory would not "
                           "be counted; stop it first")
    cfg = fedmeta_config(n, sampled, rounds, poll_interval)
    with tempfile.TemporaryDirectory() as tmp, MemoryPeak(itself=False) as mem:
        ends = Stamps(itself=False)
        rows = Path(tmp) / "bench" / "rounds.csv"
        watch = threading.Thread(target=_watch_rows, args=(rows, rounds, ends), daemon=True)
        launch = time.perf_counter()
        watch.start()
        fed = federation.run(cfg, name="bench", results_dir=tmp, num_supernodes=n, timeout=3600)
        total = time.perf_counter() - launch
        watch.join(timeout=5)
        run = fed.load()
    compute = run.clients.groupby("round")["seconds"].sum().reindex(range(1, rounds + 1), fill_value=0.0)
    per_round = int(run.rounds["num_sampled"].iloc[-1]) + HELDOUT
    return measured("fedmeta (fedmeta run)", n, per_round, launch, ends, float(run.rounds["seconds"].iloc[0]),
                    compute.tolist(), total, mem)


def superlink_running() -> bool:
    from fedmeta.runner import superlink_running as running

    return running()


def _watch_rows(path: Path, rounds: int, ends: Stamps) -> None:
    deadline = time.monotonic() + 3600
    while len(ends) < rounds and time.monotonic() < deadline:
        try:
            seen = path.read_bytes().count(b"\n") - 1  # the header line
        except OSError:
            seen = 0
        if seen > len(ends):
            ends(seen - len(ends))
        time.sleep(0.02)


# --- one client process's memory as it serves partitions --------------------------------------------------------
def probe_partitions(task: str, partition: str, count: int, out) -> None:
    """In a fresh process (a Ray worker's imports: torch, flwr, the ClientApp): RSS after serving k
    partitions (each built, trained one round, and evaluated if held out), k = 0..count."""
    from fedmeta import local

    def rss() -> float:
        return _kb("/proc/self/status", "VmRSS:") / 1024

    cfg = Config(task=task, partition=partition, local_iterations=1, meta_batch_size=1, eval_tasks=5, eval_steps=1,
                 heldout_partitions=HELDOUT)
    params = algorithms.build(cfg).init(seeding.generator(0, "init"))
    rows = [{"task": task, "partition": partition, "partitions_served": 0, "rss_mb": rss()}]
    for p in range(count):
        c = local.client(cfg, p, count)
        local.evaluate(c, params) if c.heldout else local.train(c, params, 1)
        rows.append({"task": task, "partition": partition, "partitions_served": p + 1, "rss_mb": rss()})
    out.send(rows)


def worker_memory(count: int) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as a Ray worker is
    rows: list[dict] = []
    if count <= 0:
        return rows
    for task, partition, k in (("sinusoid", "non-iid", count), ("omniglot", "non-iid", count),
                               ("omniglot", "iid", min(count, IID_PARTITIONS))):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=probe_partitions, args=(task, partition, k, send))
        proc.start()
        got = recv.recv()
        proc.join()
        rows += [{**r, "growth_mb": r["rss_mb"] - got[0]["rss_mb"]} for r in got]
    return rows


# --- the run -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(1)
    out, info = args.out_dir, tables.machine()
    params = algorithms.build(Config()).init(seeding.generator(0, "init"))
    rows = []
    for n in args.clients:
        if args.sampled > n or n <= HELDOUT:
            raise ValueError(f"--clients {n}: need at least --sampled {args.sampled} clients and more than {HELDOUT}")
        got = {"stock": run_stock(n, args.sampled, args.rounds, params) if "stock" in args.runs else None,
               "fedmeta": run_fedmeta(n, args.sampled, args.rounds, args.poll_interval)
               if {"fedmeta", "flower-pump", "partitions"} & set(args.runs) else None,
               "fedmeta-run": run_cli(n, args.sampled, args.rounds, args.poll_interval)
               if "fedmeta-run" in args.runs else None,
               "flower-pump": run_fedmeta(n, args.sampled, args.rounds, args.poll_interval, index=False)
               if "flower-pump" in args.runs else None,
               "partitions": run_fedmeta(n, args.sampled, args.rounds, args.poll_interval, args.partition_nodes)
               if "partitions" in args.runs and n > args.partition_nodes else None}
        ours, stock = got["fedmeta"], got["stock"]
        for other in (got["flower-pump"], got["partitions"]):  # same seed: the numbers of one node per client
            if other is not None:
                other["same_numbers"] = bool(other.pop("numbers").equals(ours["numbers"]))
        if ours is not None:
            ours.pop("numbers")
        done = [got[k] for k in RUNS if got[k] is not None and (k in args.runs)]
        for r in done:
            if stock is not None:
                r["ratio_vs_stock"] = r["overhead_ms_per_client_round"] / stock["overhead_ms_per_client_round"]
                r["cpu_ratio_vs_stock"] = (r["cpu_overhead_ms_per_client_round"]
                                           / stock["cpu_overhead_ms_per_client_round"])
            print({k: v for k, v in r.items() if k != "processes"}, flush=True)
        rows += done
    memory = worker_memory(args.worker_partitions)
    tables.write_csv(out / "simulation_cost.csv", rows, COLUMNS)
    tables.write_csv(out / "worker_memory.csv", memory, MEMORY_COLUMNS)
    lines = summary_lines(rows, memory, args)
    tables.write_text(out / "summary.md", lines)
    tables.write_json(out / "summary.json", {"command": command(args), "rows": rows, "worker_memory": memory,
                                             "rounds": args.rounds, "workers": WORKERS, "machine": info})
    print("\n".join(lines))


def summary_lines(rows: list[dict], memory: list[dict], args: Settings) -> list[str]:
    lines = tables.markdown_table(
        ["clients", "implementation", "first round from launch (s)", "first round (s)", "later round (s, median)",
         "ms / client-round", "overhead ms / client-round", "ratio vs stock", "CPU overhead ms / client-round",
         "CPU ratio vs stock", "peak RSS all processes (MB)", "peak PSS (MB)", "Ray worker RSS (MB)"],
        [[r["clients"], r["implementation"], f"{r['first_round_from_launch_s']:.1f}", f"{r['first_round_s']:.2f}",
          f"{r['later_round_s']:.3f}", f"{r['ms_per_client_round']:.1f}", f"{r['overhead_ms_per_client_round']:.1f}",
          f"{r['ratio_vs_stock']:.2f}" if "ratio_vs_stock" in r else "", f"{r['cpu_overhead_ms_per_client_round']:.1f}",
          f"{r['cpu_ratio_vs_stock']:.2f}" if "cpu_ratio_vs_stock" in r else "", f"{r['peak_rss_mb']:.0f}",
          f"{r['peak_pss_mb']:.0f}", f"{r['ray_worker_rss_mb']:.0f}"] for r in rows], align="lrrrrrrrrrrrr")
    lines += ["", "CPU time per client-round by process (ms; later rounds; compute = what the clients report):", ""]
    lines += tables.markdown_table(
        ["clients", "implementation", "ServerApp process (+ engine)", "Ray workers", "other (Ray, SuperLink)",
         "of it client compute"],
        [[r["clients"], r["implementation"], *(f"{r[f'cpu_{k}_ms_per_client_round']:.1f}" for k in CPU_ROLES),
          f"{r['client_compute_ms_per_client_round']:.1f}"] for r in rows], align="llrrrr")
    few = [r for r in rows if "same_numbers" in r]
    if few:
        lines += ["", "rounds.csv numbers against fedmeta's default run of the same size: " + ", ".join(
            f"{r['implementation']} at {r['clients']}: {'identical' if r['same_numbers'] else 'DIFFERENT'}"
            for r in few)]
    if not memory:
        return [*lines, "", f"Command: `{command(args)}`"]
    served = sorted({m["partitions_served"] for m in memory})
    marks = [k for k in served if k in (0, 1, 2, 4, 8, 16) or k == served[-1]]
    lines += ["", "Resident memory of one client process (MB) after serving k partitions:", ""]
    rss = {(m["task"], m["partition"], m["partitions_served"]): m["rss_mb"] for m in memory}
    lines += tables.markdown_table(
        ["task (partition)", *[f"k = {k}" for k in marks]],
        [[f"{t} ({p})", *[f"{rss[t, p, k]:.0f}" if (t, p, k) in rss else "" for k in marks]]
         for t, p in dict.fromkeys((m["task"], m["partition"]) for m in memory)], align="l" + "r" * len(marks))
    return [*lines, "", f"Command: `{command(args)}`"]


if __name__ == "__main__":
    main()
