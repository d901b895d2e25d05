"""Round latency of the Flower Deployment Engine on loopback (TLS + SuperNode auth), stock vs tuned, in one run.

    flock /tmp/fedmeta-cpu.lock .venv/bin/python benchmarks/deployment_latency.py [--rounds 4]
    python benchmarks/deployment_latency.py --quick      # smoke run: one variant, 2 rounds
    -> results/deployment_latency/latency.csv   one row per (variant, round)
       results/deployment_latency/imports.csv   import cost paid by every flwr-clientapp process
       results/deployment_latency/summary.json, summary.md

Each variant is a fresh deployment (deploy.launch.Deployment): a SuperLink, 3 SuperNodes (2 train, 1 held out),
the same tiny seeded federated-MAML run, so local compute is ~0.1 s and a round's seconds are nearly all
overhead. Rounds after the first are "steady state" (round 1 also discovers the nodes with a QUERY message).
Where the time goes in stock Flower 1.42, per phase of a round (TRAIN, then EVALUATE):
  * the SuperNode pulls the SuperLink for messages every 3 s (constant in flwr/supernode/start_client_internal.py);
  * its SuperExec polls for tasks every FLWR_SUPEREXEC_TASK_POLL_INTERVAL s (env, default 1.0, min 0.01);
  * a new `flwr-clientapp` process per message: interpreter, Flower and app imports (see imports.csv);
  * Flower's `Grid.send_and_receive` pulls replies every 3 s (constant in flwr/superlink/grid/http_grid.py);
    the fedmeta strategy pulls with its own interval instead (run-config `poll-interval`, default 0.02 s).
Variants (cumulative unless said):
  stock           Flower defaults, and the app's `poll-interval=3.0`: the ServerApp polls replies like Flower's
                  own `Grid.send_and_receive` in deployment (every 3 s).
  task-poll       FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.05 on every Flower process (a supported setting).
  task-poll+process  as task-poll, SuperNodes with `--isolation process` and a SuperExec we start (not cumulative).
  +app-poll       task-poll + the app's default `poll-interval=0.02` (what `flwr run .` does out of the box).
  +node-poll      +app-poll + SuperNodes pull every 0.1 s: Flower's constant monkeypatched in this benchmark
                  only (NOT a Flower setting; it measures what an upstream option would give).
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from deploy.launch import Deployment
from fedmeta.lab import tables
from fedmeta.lab.args import REPO, Args, arg, command, parse
from fedmeta.results import load_run

RUN = {"task": "sinusoid", "algorithm": "maml", "local-iterations": 2, "meta-batch-size": 5, "eval-tasks": 5,
       "eval-steps": 2, "heldout-partitions": 1, "min-train-nodes": 2, "round-timeout": 600.0, "threads": 1,
       "checkpoint-every": 100, "seed": 0}
TASK_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05"}
FLOWER_POLL = {"poll-interval": 3.0}  # the reply poll of Flower's own Grid.send_and_receive in deployment
APP_POLL = {"poll-interval": 0.02}  # the app's default (pyproject.toml)
NODE_POLL_S = 0.1

# Started as `python <this file> <poll> <flower-supernode args>`: flower-supernode whose message-pull sleep is
# capped at <poll> seconds (the module's `time` is replaced by a proxy; everything else is stock Flower).
PATCHED_SUPERNODE = '''\
import sys, time as _time
import flwr.supernode.start_client_internal as _sci
POLL = float(sys.argv.pop(1))

class _Clock:
    def __getattr__(self, name):
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds):
        _time.sleep(min(seconds, POLL))

_sci.time = _Clock()
from flwr.supernode.cli import flower_supernode
sys.argv[0] = "flower-supernode"
flower_supernode()
'''


@dataclass
class Variant:
    name: str
    what: str
    env: dict = field(default_factory=dict)
    isolation: str = "subprocess"
    run_config: dict = field(default_factory=lambda: dict(FLOWER_POLL))
    patched_node: bool = False
    baseline: str | None = None  # the variant this one changes one thing of (for the "effect" column)


VARIANTS = [
    Variant("stock", "Flower 1.42 defaults; app poll-interval=3.0 (as Flower's Grid)"),
    Variant("task-poll", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.05", TASK_POLL, baseline="stock"),
    Variant("task-poll+process", "task-poll, SuperNode --isolation process + own flower-superexec", TASK_POLL,
            isolation="process", baseline="task-poll"),
    Variant("+app-poll", "task-poll + app poll-interval=0.02 (the app's default)", TASK_POLL,
            run_config=APP_POLL, baseline="task-poll"),
    Variant("+node-poll", "+app-poll + SuperNode pulls every 0.1 s (monkeypatched Flower constant)", TASK_POLL,
            run_config=APP_POLL, patched_node=True, baseline="+app-poll"),
]


def run_variant(v: Variant, rounds: int, work: Path) -> dict:
    exe = None
    if v.patched_node:
        script = work / "patched_supernode.py"
        script.write_text(PATCHED_SUPERNODE)
        exe = [sys.executable, str(script), str(NODE_POLL_S)]
    base = work / "results"
    with Deployment(work / "deploy", env=v.env, isolation=v.isolation, supernode_exe=exe, timestamps=True) as d:
        d.make_certificates()
        d.start_superlink()
        for i in range(3):
            d.add_node(f"node-{i}", i, 3)
        for name in list(d.nodes):
            d.start_node(name)
        t0 = time.perf_counter()
        run_id = d.start_run({**RUN, **v.run_config, "num-rounds": rounds, "results-dir": str(base),
                              "run-name": v.name})
        status = d.wait_run(run_id, base / v.name, timeout=1800)
        wall = time.perf_counter() - t0
        logs = {name: node.service.text() for name, node in d.nodes.items()}
    if status.get("status") != "completed":
        raise RuntimeError(f"variant {v.name}: run failed: {status}")
    run = load_run(base / v.name)
    c = run.clients
    rows = []
    for _, r in run.rounds.iterrows():
        rc = c[c["round"] == r["round"]]
        compute = (rc.loc[rc["phase"] == "train", "seconds"].max() + rc.loc[rc["phase"] == "evaluate", "seconds"].max())
        rows.append({"variant": v.name, "round": int(r["round"]), "seconds": float(r["seconds"]),
                     "client_compute_s": float(compute), "overhead_s": float(r["seconds"] - compute)})
    phases = [{"variant": v.name, "node": name, **seg} for name, text in logs.items() for seg in segments(text)]
    return {"rows": rows, "wall_s": wall, "phases": phases}


EVENTS = {"receive": r"Receiving: (\w+) message", "received": r"Received successfully",
          "start": r"Start `flwr-clientapp` process", "send": r"Sending: (\w+) message", "sent": r"Sent successfully"}


def segments(text: str) -> list[dict]:
    """Per message a SuperNode handled (from its timestamped log): where the seconds went.

    pull_s       "Receiving" -> "Received successfully": fetching the message's objects from the SuperLink
    dispatch_s   -> "Start `flwr-clientapp` process" (logged by the new process once Flower is imported): the
                 SuperExec's task poll, process start, Flower's imports (absent with isolation "process",
                 whose SuperExec logs elsewhere)
    clientapp_s  -> "Sending": app imports (torch, fedmeta), building the client, local compute, the reply
    push_s       -> "Sent successfully": pushing the reply's objects to the SuperLink
    Messages are numbered per type in arrival order; the first TRAIN/EVALUATE is round 1."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", text)
    out, cur, count = [], None, {}
    for line in clean.splitlines():
        m = re.match(r"\[\s*([0-9.]+)\] (.*)", line)
        if not m:
            continue
        t, body = float(m.group(1)), m.group(2)
        if r := re.search(EVENTS["receive"], body):
            kind = r.group(1)
            count[kind] = count.get(kind, 0) + 1
            cur = {"message": kind, "index": count[kind], "receive": t}
            out.append(cur)
        elif cur is not None:
            for event in ("received", "start", "send", "sent"):
                if event not in cur and re.search(EVENTS[event], body):
                    cur[event] = t
                    break
    rows = []
    for c in out:
        def gap(a, b):
            return round(c[b] - c[a], 3) if a in c and b in c else None

        rows.append({"message": c["message"], "index": c["index"], "pull_s": gap("receive", "received"),
                     "dispatch_s": gap("received", "start"), "clientapp_s": gap("start", "send"),
                     "push_s": gap("send", "sent")})
    return rows


def import_costs(reps: int) -> list[dict]:
    """Seconds a fresh interpreter spends importing what every flwr-clientapp process imports."""
    code = ("import time; t0 = time.perf_counter(); import flwr.supernode.cli.flwr_clientapp; "
            "t1 = time.perf_counter(); import torch; t2 = time.perf_counter(); import clients.client_app; "
            "t3 = time.perf_counter(); print(t1 - t0, t2 - t1, t3 - t2)")
    rows = []
    for rep in range(reps):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                             timeout=120)
        total = time.perf_counter() - t0
        flwr_s, torch_s, app_s = map(float, out.stdout.split())
        rows.append({"rep": rep, "process_total_s": total, "flwr_clientapp_import_s": flwr_s,
                     "torch_import_s": torch_s, "clients_client_app_rest_import_s": app_s})
    return rows


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "benchmarks/deployment_latency.py"
    NAME: ClassVar[str] = "deployment_latency"
    QUICK: ClassVar[dict] = {"rounds": 2, "variants": ("+app-poll",), "import_reps": 1}

    rounds: int = arg(4, "rounds per variant (>= 2; round 1 is excluded)")
    variants: tuple[str, ...] = arg(tuple(v.name for v in VARIANTS), "the variants to measure",
                                    choices=tuple(v.name for v in VARIANTS))
    import_reps: int = arg(5, "fresh interpreters timing the flwr-clientapp imports")


def main(argv: list[str] | None = None) -> int:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    chosen = [v for v in VARIANTS if v.name in args.variants]
    if not chosen or args.rounds < 2:
        raise SystemExit("deployment_latency: choose at least one variant and --rounds >= 2")
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    info = tables.machine()
    rows, walls, phases = [], {}, []
    for v in chosen:
        work = Path(tempfile.mkdtemp(prefix=f"fedmeta-latency-{v.name.strip('+')}-"))
        try:
            print(f"== {v.name}: {v.what}", flush=True)
            res = run_variant(v, args.rounds, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows += res["rows"]
        phases += res["phases"]
        walls[v.name] = res["wall_s"]
        steady = [r["seconds"] for r in res["rows"] if r["round"] > 1]
        print(f"   steady-state round: median {statistics.median(steady):.2f} s  ({[round(s, 2) for s in steady]})",
              flush=True)
    imports = import_costs(args.import_reps)

    tables.write_csv(out / "latency.csv", rows)
    tables.write_csv(out / "imports.csv", imports)
    tables.write_csv(out / "phases.csv", phases)
    summary = summarize(chosen, rows, walls, imports, phases, args.rounds, info, command(args))
    tables.write_json(out / "summary.json", summary)
    tables.write_text(out / "summary.md", markdown(summary))
    print(markdown(summary))
    return 0


def summarize(chosen, rows, walls, imports, phases, rounds, machine, cmd) -> dict:
    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    stock = None
    variants = []
    for v in chosen:
        steady = [r for r in rows if r["variant"] == v.name and r["round"] > 1]
        m = med([r["seconds"] for r in steady])
        stock = m if v.name == "stock" else stock
        variants.append({"variant": v.name, "what": v.what, "steady_rounds_s": [r["seconds"] for r in steady],
                         "steady_round_median_s": m,
                         "steady_round_mean_s": statistics.fmean(r["seconds"] for r in steady),
                         "round1_s": next(r["seconds"] for r in rows if r["variant"] == v.name and r["round"] == 1),
                         "client_compute_median_s": med([r["client_compute_s"] for r in steady]),
                         "overhead_median_s": med([r["overhead_s"] for r in steady]),
                         "run_wall_s": walls[v.name]})
        steady_msgs = [p for p in phases if p["variant"] == v.name and p["message"] in ("train", "evaluate")
                       and p["index"] > 1]
        variants[-1]["per_message_median_s"] = {k: med([p[k] for p in steady_msgs])
                                                for k in ("pull_s", "dispatch_s", "clientapp_s", "push_s")}
    by_name = {s["variant"]: s for s in variants}
    for v, s in zip(chosen, variants):
        s["speedup_vs_stock"] = (stock / s["steady_round_median_s"]) if stock else None
        base = by_name.get(v.baseline)
        s["baseline"] = v.baseline if base else None
        s["effect_vs_baseline_s"] = s["steady_round_median_s"] - base["steady_round_median_s"] if base else None
    return {"command": cmd, "rounds_per_variant": rounds, "nodes": 3, "run_config": RUN, "machine": machine,
            "flwr": machine["flwr"], "torch": machine["torch"], "variants": variants,
            "imports_median_s": {k: med([r[k] for r in imports]) for k in
                                 ("process_total_s", "flwr_clientapp_import_s", "torch_import_s",
                                  "clients_client_app_rest_import_s")}}


def markdown(s: dict) -> str:
    lines = ["# Deployment round latency (loopback, TLS + SuperNode auth, 3 SuperNodes)", "",
             f"Command: `{s['command']}`  ", f"Flower {s['flwr']}, torch {s['torch']}, {s['machine']['cpus']} CPUs, "
             f"load average at start {s['machine']['load_average'][0]:.2f}. Rounds 2..{s['rounds_per_variant']} "
             "of one tiny seeded run per variant (round 1 also discovers the nodes).", "",
             "| variant | what | steady round median (s) | each steady round (s) | speedup vs stock "
             "| effect vs baseline (s) | client compute (s) | overhead (s) | round 1 (s) |",
             "|---|---|---:|---|---:|---|---:|---:|---:|"]
    for v in s["variants"]:
        lines.append(f"| {v['variant']} | {v['what']} | {v['steady_round_median_s']:.2f} | "
                     f"{', '.join(f'{x:.1f}' for x in v['steady_rounds_s'])} | "
                     f"{'n/a' if v['speedup_vs_stock'] is None else format(v['speedup_vs_stock'], '.2f') + 'x'} | "
                     f"{'' if v['baseline'] is None else format(v['effect_vs_baseline_s'], '+.2f') + ' vs ' + v['baseline']} | "
                     f"{v['client_compute_median_s']:.2f} | "
                     f"{v['overhead_median_s']:.2f} | {v['round1_s']:.2f} |")
    lines += ["", "Per TRAIN/EVALUATE message on a SuperNode, rounds >= 2 (medians, s; from the SuperNodes' "
              "timestamped logs; phases.csv):", "",
              "| variant | pull message objects | task poll + process start + Flower imports "
              "| app imports + compute + reply | push reply |",
              "|---|---:|---:|---:|---:|"]
    for v in s["variants"]:
        m = v["per_message_median_s"]
        lines.append(f"| {v['variant']} | " + " | ".join("n/a" if m[k] is None else f"{m[k]:.2f}" for k in
                                                          ("pull_s", "dispatch_s", "clientapp_s", "push_s")) + " |")
    i = s["imports_median_s"]
    lines += ["", "Every message starts a new `flwr-clientapp` process; its imports (median of fresh interpreters):",
              f"`flwr.supernode.cli.flwr_clientapp` {i['flwr_clientapp_import_s']:.2f} s, then `torch` "
              f"{i['torch_import_s']:.2f} s, then the rest of `clients.client_app` (fedmeta) "
              f"{i['clients_client_app_rest_import_s']:.2f} s; whole process {i['process_total_s']:.2f} s.", ""]
    spread = max(max(v["steady_rounds_s"]) - min(v["steady_rounds_s"]) for v in s["variants"])
    lines += ["Reading (numbers above, computed by the script):",
              f"* Steady rounds of one variant spread by up to {spread:.1f} s (the SuperNode's 3 s pull is not "
              "aligned with the round), so an effect smaller than that is not resolved by this run."]
    for v in s["variants"]:
        m = v["per_message_median_s"]
        if all(m[k] is not None for k in m):
            per = sum(m.values())
            lines.append(f"* `{v['variant']}`: one TRAIN or EVALUATE message costs {per:.2f} s on a SuperNode "
                         f"(pull {m['pull_s']:.2f} + dispatch {m['dispatch_s']:.2f} + clientapp "
                         f"{m['clientapp_s']:.2f} + push {m['push_s']:.2f}); the two phases in sequence make "
                         f"{2 * per:.1f} s of its {v['steady_round_median_s']:.1f} s round.")
    lines += [f"* Of a new `flwr-clientapp` process, {i['flwr_clientapp_import_s'] + i['torch_import_s']:.2f} s are "
              "Flower and torch imports; the app's own modules add "
              f"{i['clients_client_app_rest_import_s']:.2f} s, so lighter imports in the client module cannot "
              "cut more than that (torch is needed for the compute).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
