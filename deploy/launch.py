"""Local trial of the Flower Deployment Engine: a SuperLink and N SuperNodes with TLS and node authentication.

    python -m deploy.launch --nodes 3 --run-config "num-rounds=2 local-iterations=5 meta-batch-size=5"
    python -m deploy.launch --nodes 3 --netns        # each component in its own network namespace (root)

What it does, in order (each step is a command of docs/deployment.md; `deploy.deployment.Deployment` runs them):
  1. `python -m deploy.certs ca/server/node`: a CA, the SuperLink certificate, one key pair per SuperNode;
  2. `flower-superlink --ssl-* --enable-supernode-auth --host H --port P` (Fleet, Control and Runtime APIs
     share that HTTPS port);
  3. writes the `[superlink.<name>]` connection into `$FLWR_HOME/config.toml` of the operator (the `flwr` CLI);
  4. `flwr supernode register <key>.pub <connection>` for every node key;
  5. `flower-supernode --superlink H:P --root-certificates ca.crt --auth-supernode-private-key <key>
     --node-config "partition-id=i num-partitions=N" --port <its own runtime port>` for every node (the run
     config gets `assign-partitions=false` unless -c says otherwise: each node trains its own partition);
  6. `flwr run <app> <connection> --run-config "... results-dir=<abs> run-name=<name>"`, waits with
     `flwr ls --run-id`, saves `flwr log <id> --show`, and checks `<results-dir>/<run-name>/status.json`;
  7. stops every process it started (SIGTERM to the process group and every descendant, SIGKILL after a
     grace period), also when the run fails or on Ctrl-C/SIGTERM (handlers installed explicitly, so a
     background job, started with SIGINT ignored, stops on `kill -INT` too).

Exit status as `fedmeta run`: 0 completed, 3 completed with failures, 1 failed, 2 refused at start-up (bad
arguments or config, or a run directory that already holds a run), 128 + signal number when interrupted
(130 on Ctrl-C, 143 on SIGTERM). Everything lives in --workdir (a temporary directory by default, removed
afterwards unless --keep-workdir).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python deploy/launch.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.deployment import REPO, DeployError, Deployment
from deploy.processes import interrupts
from fedmeta.cli import existing_run_message, finish, resolve
from fedmeta.config import ConfigError, parse_run_config

__all__ = ["Deployment", "launch", "main"]  # Deployment: re-exported for older imports (deploy.deployment)


def launch(args: argparse.Namespace) -> int:
    app = Path(args.app).resolve()
    try:
        overrides = {"assign-partitions": False, **parse_run_config(args.run_config)}  # nodes' own partitions
        cfg, overrides = resolve(app, overrides, args.name, args.results_dir)
    except ConfigError as err:
        print(f"deploy.launch: refusing to start: {err}", file=sys.stderr)
        return 2
    if args.nodes < 1 or args.nodes - cfg.heldout_partitions < cfg.min_train_nodes:
        print(f"deploy.launch: {args.nodes} nodes with heldout-partitions={cfg.heldout_partitions} leave fewer "
              f"training nodes than min-train-nodes={cfg.min_train_nodes}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.results_dir) / cfg.run_name
    if message := existing_run_message(run_dir):
        print(f"deploy.launch: refusing to start: {message}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fedmeta-deploy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    network = None
    env = {} if args.task_poll_interval is None else {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(args.task_poll_interval)}
    try:
        with interrupts():  # SIGINT and SIGTERM -> KeyboardInterrupt; Deployment.close then stops everything
            if args.netns:
                from deploy import netns

                ok, why = netns.available()
                if not ok:
                    print(f"deploy.launch: --netns unavailable: {why}", file=sys.stderr)
                    return 2
                network = netns.Network()
            with Deployment(workdir, network=network, isolation=args.isolation, env=env) as d:
                status = _run(d, args, overrides, app, run_dir, workdir, network)
    except KeyboardInterrupt as err:
        name = str(err) or "SIGINT"
        print(f"deploy.launch: interrupted ({name}); stopped every process", file=sys.stderr)
        return 128 + getattr(signal.Signals, name, signal.SIGINT)
    except (DeployError, subprocess.TimeoutExpired, RuntimeError, OSError) as err:
        print(f"deploy.launch: FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        if network is not None:
            network.close()
        if not args.keep_workdir and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return finish(status, run_dir, prog="deploy.launch")


def _run(d: Deployment, args: argparse.Namespace, overrides: dict, app: Path, run_dir: Path, workdir: Path,
         network) -> dict:
    """Steps 1-6 of the module docstring; returns the run's status (status.json or why there is none)."""
    d.make_certificates()
    d.start_superlink()
    print(f"deploy.launch: SuperLink at {d.address} (logs in {workdir / 'logs'})", flush=True)
    for i in range(args.nodes):
        d.add_node(f"node-{i}", i, args.nodes)
    for name in d.nodes:
        d.start_node(name)
    print(f"deploy.launch: {args.nodes} SuperNodes online: "
          f"{', '.join(f'{n.name}={n.node_id}' for n in d.nodes.values())}", flush=True)
    run_id = d.start_run(overrides, app)
    print(f"deploy.launch: run {run_id} -> {run_dir}", flush=True)
    try:
        return d.wait_run(run_id, run_dir, timeout=args.timeout)
    finally:
        print(f"deploy.launch: ServerApp log: {d.save_log(run_id)}", flush=True)
        if network is not None:  # evidence that the traffic crossed the namespaces' interfaces
            traffic = {h: {"address": a, **network.traffic(h)} for h, a in network.hosts.items()}
            (workdir / "traffic.json").write_text(json.dumps(traffic, indent=2))
            print(f"deploy.launch: interface traffic per host: {workdir / 'traffic.json'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.launch", description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 completed, 3 completed with failures, 1 failed, "
                                       "2 refused at start-up, 130/143 interrupted (SIGINT/SIGTERM).")
    p.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (partitions); default 3")
    p.add_argument("--app", default=str(REPO), help="Flower app directory (default: this repository)")
    p.add_argument("--run-config", "-c", action="append", default=[], help='"key=value ..." overrides')
    p.add_argument("--name", help="run name (default: <task>-<algorithm>-<fusion>-<time>)")
    p.add_argument("--results-dir", help="parent of the run directory (default: ./results)")
    p.add_argument("--workdir", help="certificates, keys, FLWR_HOMEs and logs (default: a temporary directory)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temporary --workdir afterwards")
    p.add_argument("--isolation", choices=["subprocess", "process"], default="subprocess",
                   help="SuperNode isolation: it starts its SuperExec (subprocess) or we start it (process)")
    p.add_argument("--task-poll-interval", type=float,
                   help="FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (Flower default 1.0; 0.01-60)")
    p.add_argument("--netns", action="store_true", help="separate network namespaces (needs root)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the run (default 1800)")
    return launch(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
