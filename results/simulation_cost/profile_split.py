"""Where the time of a simulation goes: py-spy samples (raw format, --subprocesses --threads) attributed to the
process (driver = the process running the ServerApp and the Simulation Engine; Ray's own processes) and, in the
driver, to the engine's threads and the ServerApp's calls (ours vs Flower's). Recipe and results: profile.md.

    python results/simulation_cost/profile_split.py profile.txt [more.txt ...]
"""

from __future__ import annotations

import collections
import sys

PROCESSES = [  # (role, substring of the command line), first match wins
    ("ray worker", "ClientAppActor"), ("ray worker", "default_worker.py"), ("ray worker", "ray::"),
    ("ray log monitor", "log_monitor"), ("ray runtime-env agent", "runtime_env"), ("ray dashboard agent", "dashboard"),
    ("raylet", "raylet"), ("ray gcs", "gcs_server"),
    ("driver", "simulation_cost.py"), ("driver", "profile_run.py"), ("driver", "flwr-simulation"),
]
ENGINE = [  # driver threads other than the ServerApp's: (category, substring of the thread name)
    ("engine: LinkState sweep (add_messages_to_queue -> get_message_ins, every node)", "add_messages_to_queue"),
    ("engine: LinkState stores replies (put_message_into_state)", "put_message_into_state"),
    ("engine: Ray dispatch (worker threads: submit, pickle, get)", "ThreadPoolExecutor"),
    ("benchmark: memory sampler", "(_run)"),
    ("ray driver threads (logs, errors, GC)", "ray_"), ("ray driver threads (logs, errors, GC)", "PythonGCThread"),
]
SERVER = [  # frames inside the ServerApp thread: (category, substring of the stack), first match wins
    ("ServerApp: Flower grid.push_messages (LinkState store_message_ins)", "push_messages"),
    ("ServerApp: Flower grid.pull_messages (LinkState get_message_res)", "pull_messages"),
    ("ServerApp: Flower grid.get_node_ids (LinkState get_nodes, every node)", "get_node_ids"),
    ("ServerApp: stock FedAvg (flwr strategy)", "serverapp/strategy/"),
    ("ServerApp: ours: checkpoint (torch.save)", "save_checkpoint"),
    ("ServerApp: ours: CSV rows", "append_"),
    ("ServerApp: ours: reply checks + deserialisation (to_torch_state_dict)", "_parse_train"),
    ("ServerApp: ours: fusion", "fuse ("),
    ("ServerApp: ours: configure (sampling, messages, serialisation)", "configure_"),
    ("ServerApp: ours: waiting for nodes (roster)", "refresh"),
    ("ServerApp: ours: deliver loop (mostly time.sleep between polls)", "deliver"),
    ("ServerApp: ours: aggregate (rows, metrics)", "aggregate_"),
    ("ServerApp: start-up", "serve ("),
]
NOT_ROUNDS = ("benchmark:", "driver main thread", "ServerApp: ours: deliver loop", "ServerApp: start-up",
              "ServerApp: ours: waiting for nodes", "ServerApp: other")


def classify(stack: str) -> tuple[str, str]:
    frames = stack.split(";")
    procs = [f for f in frames if f.startswith("process ")]
    proc = next((role for role, key in PROCESSES if procs and key in procs[-1]), "other process")
    thread = next((f for f in frames if f.startswith("thread ")), "")
    body = ";".join(f for f in frames if not f.startswith(("process ", "thread ")))
    if proc != "driver":
        return proc, proc
    if "server_th_with_start_checks" in thread:
        return proc, next((name for name, key in SERVER if key in body), "ServerApp: other")
    return proc, next((name for name, key in ENGINE if key in thread),
                      "driver main thread (start-up: Ray init, node registration, shutdown)")


def split(path: str) -> list[str]:
    counts: collections.Counter = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, n = line.rstrip("\n").rsplit(" ", 1)
            counts[classify(stack)] += int(n)
    total = sum(counts.values())
    out = [f"{path}: {total} samples, all processes"]
    out += [f"  {100 * n / total:5.1f}%  {proc:22s} {cat if cat != proc else ''}"
            for (proc, cat), n in counts.most_common() if n / total >= 0.005]
    rounds = {cat: n for (proc, cat), n in counts.items() if proc == "driver" and not cat.startswith(NOT_ROUNDS)}
    busy = sum(rounds.values())
    out.append(f"  driver process while rounds run ({busy} samples; start-up, sleeps and the sampler left out):")
    out += [f"     {100 * n / busy:5.1f}%  {cat}" for cat, n in sorted(rounds.items(), key=lambda kv: -kv[1])
            if n / busy >= 0.005]
    return out


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print("\n".join(split(p)))
