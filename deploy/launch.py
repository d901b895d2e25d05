"""Local trial of the Flower Deployment Engine: a SuperLink and N SuperNodes with TLS and node authentication.

    python -m deploy.launch --nodes 3 --run-config "num-rounds=2 local-iterations=5 meta-batch-size=5"
    python -m deploy.launch --nodes 3 --netns        # each component in its own network namespace (root)

What it does, in order (each step is a command of docs/deployment.md):
  1. `python -m deploy.certs ca/server/node`: a CA, the SuperLink certificate, one key pair per SuperNode;
  2. `flower-superlink --ssl-* --enable-supernode-auth --host H --port P` (Fleet, Control and Runtime APIs
     share that HTTPS port);
  3. writes the `[superlink.<name>]` connection into `$FLWR_HOME/config.toml` of the operator (the `flwr` CLI);
  4. `flwr supernode register <key>.pub <connection>` for every node key;
  5. `flower-supernode --superlink H:P --root-certificates ca.crt --auth-supernode-private-key <key>
     --node-config "partition-id=i num-partitions=N" --port <its own runtime port>` for every node;
  6. `flwr run <app> <connection> --run-config "... results-dir=<abs> run-name=<name>"`, waits with
     `flwr ls --run-id`, saves `flwr log <id> --show`, and checks `<results-dir>/<run-name>/status.json`;
  7. stops every process it started (SIGTERM to the process group and every descendant, SIGKILL after a
     grace period), also when the run fails or on Ctrl-C/SIGTERM.

Exit status: 0 if the run directory says "completed", 1 if the run failed, 2 on bad arguments, 130 on Ctrl-C.
Everything lives in --workdir (a temporary directory by default, removed afterwards unless --keep-workdir).
The `Deployment` class is what tests/test_deployment.py and benchmarks/deployment_latency.py drive.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python deploy/launch.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy import certs
from deploy.netns import Network
from fedmeta.cli import parse_overrides, resolve, to_toml
from fedmeta.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live next to this python
CONNECTION = "fedmeta-deploy"


class DeployError(RuntimeError):
    """A step of the deployment failed; the message names the step and its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)" which may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def marked(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (e.g. `FLWR_HOME=<workdir>/`), other than us.

    Every Flower process a Deployment starts, and everything those start (SuperExec, flwr-serverapp,
    flwr-clientapp), inherits an FLWR_HOME under the deployment's workdir; orphans reparented to init are
    found this way even though they are no longer our descendants."""
    needle = marker.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes() and _exists(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Service:
    """One process we started (in its own session/process group) and its log file."""

    name: str
    proc: subprocess.Popen
    log: Path
    cmd: list[str]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tree(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)] if self.alive() else descendants(self.proc.pid)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group and every descendant; SIGKILL whatever is left after `grace` seconds."""
        pids = self.tree()  # snapshot first: children detached into their own session are still found
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group outlives its leader while members remain
        except (ProcessLookupError, PermissionError):
            pass
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.alive() or any(_exists(p) for p in pids)):
            time.sleep(0.1)
        left = [p for p in pids if _exists(p)]
        if self.alive() or left:
            self.kill(left)

    def kill(self, pids: list[int] | None = None) -> None:
        """SIGKILL the whole tree at once (what a crashing machine looks like to the SuperLink)."""
        pids = self.tree() if pids is None else list(set(pids) | set(self.tree()))
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _signal(pids, signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _exists(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone for our purposes


@dataclass
class Node:
    name: str
    partition_id: int
    num_partitions: int
    private_key: Path
    public_key: Path
    runtime_port: int
    extra: dict = field(default_factory=dict)  # more node-config keys, e.g. {"data-dir": "/data/omniglot"}
    node_id: int | None = None  # given by `flwr supernode register`
    service: Service | None = None
    superexec: Service | None = None  # only with isolation "process"
    starts: int = 0


@dataclass
class Deployment:
    """A SuperLink + SuperNodes with TLS and SuperNode authentication, all processes owned by this object.

    Use as a context manager: leaving the block (normally, on an error or on Ctrl-C) stops every process.
    With `network`, the SuperLink, each SuperNode and the operator CLI run in their own network namespace.
    """

    workdir: Path
    network: Network | None = None
    isolation: str = "subprocess"  # SuperNode isolation: "subprocess" (it starts its SuperExec) or "process"
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every Flower process
    supernode_exe: list[str] | None = None  # command that starts a SuperNode (default: flower-supernode)
    timestamps: bool = False  # prefix every log line with seconds since start (a thread pumps each pipe)
    cli_timeout: float = 120.0
    services: list[Service] = field(default_factory=list)
    nodes: dict[str, Node] = field(default_factory=dict)
    link: Service | None = None
    address: str = ""  # SuperLink Fleet/Control address as SuperNodes and the CLI see it

    def __post_init__(self) -> None:
        if self.isolation not in ("subprocess", "process"):
            raise ValueError(f"isolation must be 'subprocess' or 'process', not {self.isolation!r}")
        self.workdir = Path(self.workdir).resolve()
        self._t0 = time.monotonic()
        self.certs = self.workdir / "certs"
        self.keys = self.workdir / "keys"
        self.cli_home = self.workdir / "cli" / "home"
        self.cli_home.mkdir(parents=True, exist_ok=True)
        if self.network is not None:
            self.link_host = self.network.add_host("link")
            self.network.add_host("cli")
        else:
            self.link_host = "127.0.0.1"

    # --- processes --------------------------------------------------------------------------
    def _env(self, home: Path) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1", **self.env}

    def _wrap(self, host: str, cmd: list[str]) -> list[str]:
        return self.network.wrap(host, cmd) if self.network is not None else cmd

    def _start(self, name: str, host: str, cmd: list[str], home: Path) -> Service:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        full = self._wrap(host, cmd)
        with log.open("ab") as f:
            f.write(f"\n+ {' '.join(full)}\n".encode())
            f.flush()
            proc = subprocess.Popen(full, stdout=subprocess.PIPE if self.timestamps else f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env(home),
                                    cwd=self.workdir, start_new_session=True)
        if self.timestamps:
            threading.Thread(target=_pump, args=(proc.stdout, log, self._t0), daemon=True).start()
        service = Service(name, proc, log, full)
        self.services.append(service)
        return service

    def wait_log(self, service: Service, pattern: str, count: int = 1, timeout: float = 60.0) -> re.Match:
        """Wait until `pattern` occurs `count` times in the service's log; fail if it exits first."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            matches = list(regex.finditer(service.text()))
            if len(matches) >= count:
                return matches[count - 1]
            if not service.alive():
                raise DeployError(f"{service.name} exited (status {service.proc.returncode}) before "
                                  f"/{pattern}/ appeared; see {service.log}:\n{_tail(service.text())}")
            if time.monotonic() > deadline:
                raise DeployError(f"{service.name}: no /{pattern}/ within {timeout:.0f} s; see {service.log}:\n"
                                  f"{_tail(service.text())}")
            time.sleep(0.2)

    def close(self) -> None:
        """Stop every process we started (newest first, so SuperNodes before the SuperLink), then SIGKILL any
        orphan that still carries this deployment's FLWR_HOME in its environment."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # a 2nd Ctrl-C must not
        try:                                                                         # abort the cleanup
            for service in reversed(self.services):
                service.stop()
            deadline = time.monotonic() + 10
            while (left := self.leftovers()) and time.monotonic() < deadline:
                _signal(left, signal.SIGKILL)
                time.sleep(0.2)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    def leftovers(self) -> list[int]:
        """Processes of this deployment still alive (see `marked`)."""
        return marked(f"FLWR_HOME={self.workdir}/")

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- certificates and the SuperLink ---------------------------------------------------------
    def make_certificates(self) -> None:
        certs.make_ca(self.certs)
        certs.make_server_cert(self.certs, [self.link_host])

    def start_superlink(self, timeout: float = 90.0, attempts: int = 3) -> Service:
        bind = "0.0.0.0" if self.network is not None else self.link_host
        home = self.workdir / "link" / "home"
        for attempt in range(attempts):  # a free port can be taken between free_port() and the bind
            port = free_port()
            cmd = [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs / "ca.crt"),
                   "--ssl-certfile", str(self.certs / "server.pem"), "--ssl-keyfile", str(self.certs / "server.key"),
                   "--enable-supernode-auth", "--host", bind, "--port", str(port),
                   "--database", str(self.workdir / "link" / "state.db"), "--disable-runtime-dependency-installation"]
            self.link = self._start("superlink", "link", cmd, home)
            try:
                self.wait_log(self.link, r"Uvicorn running on https://", timeout=timeout)
                break
            except DeployError:
                if attempt + 1 == attempts or "already in use" not in self.link.text():
                    raise
        self.address = f"{self.link_host}:{port}"
        self.write_connection()
        return self.link

    def write_connection(self) -> Path:
        """The operator's `$FLWR_HOME/config.toml`: one TLS connection to our SuperLink, made the default."""
        path = self.cli_home / "config.toml"
        path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                        f'address = "{self.address}"\nroot-certificates = "{self.certs / "ca.crt"}"\n')
        return path

    # --- the flwr CLI (the operator) ----------------------------------------------------------------
    def flwr(self, *args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = self._wrap("cli", [str(BIN / "flwr"), *args])
        out = subprocess.run(cmd, capture_output=True, text=True, env=self._env(self.cli_home), cwd=self.workdir,
                             timeout=timeout or self.cli_timeout, stdin=subprocess.DEVNULL)
        if check and out.returncode != 0:
            raise DeployError(f"`flwr {' '.join(args)}` failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def flwr_json(self, *args: str, timeout: float | None = None) -> dict:
        out = self.flwr(*args, "--format", "json", timeout=timeout)
        start = out.stdout.find("{")
        try:
            data = json.loads(out.stdout[start:])
        except ValueError as err:
            raise DeployError(f"`flwr {' '.join(args)}` printed no JSON:\n{out.stdout}\n{out.stderr}") from err
        if not data.get("success", False):
            raise DeployError(f"`flwr {' '.join(args)}` did not succeed: {data}")
        return data

    # --- SuperNodes -----------------------------------------------------------------------------
    def add_node(self, name: str, partition_id: int, num_partitions: int, register: bool = True,
                 extra: dict | None = None) -> Node:
        """Create the node's key pair and (if `register`) register its public key with the SuperLink."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        private, public = certs.make_node_keys(self.keys, name)
        node = Node(name, partition_id, num_partitions, private, public, free_port(), dict(extra or {}))
        if register:
            node.node_id = int(self.flwr_json("supernode", "register", str(public), CONNECTION)["node-id"])
        if self.network is not None:
            self.network.add_host(name)
        self.nodes[name] = node
        return node

    def start_node(self, name: str, wait: bool = True, timeout: float = 90.0) -> Service:
        """Start (or restart) the SuperNode `name`; with `wait`, return once the SuperLink activated it."""
        node = self.nodes[name]
        node.starts += 1
        home = self.workdir / "nodes" / name / "home"
        node_config = " ".join(f"{k}={to_toml(v)}" for k, v in
                               {"partition-id": node.partition_id, "num-partitions": node.num_partitions,
                                **node.extra}.items())
        log = self.workdir / "logs" / f"supernode-{name}.log"  # appended to by every start of this node
        seen = len(re.findall(r"SuperNode ID: \d+", log.read_text(errors="replace"))) if log.exists() else 0
        exe = self.supernode_exe or [str(BIN / "flower-supernode")]
        cmd = [*exe, "--superlink", self.address,
               "--root-certificates", str(self.certs / "ca.crt"), "--auth-supernode-private-key", str(node.private_key),
               "--node-config", node_config, "--port", str(node.runtime_port), "--isolation", self.isolation]
        node.service = self._start(f"supernode-{name}", name, cmd, home)
        if self.isolation == "process":  # we run the SuperExec that launches flwr-clientapp processes
            exe = [str(BIN / "flower-superexec"), "--insecure", "--runtime-api-address",
                   f"127.0.0.1:{node.runtime_port}", "--parent-pid", str(node.service.proc.pid)]
            node.superexec = self._start(f"superexec-{name}", name, exe, home)
        if wait:
            try:
                m = self.wait_log(node.service, r"SuperNode ID: (\d+)", count=seen + 1, timeout=timeout)
            except DeployError:
                if "already in use" not in node.service.text() or node.starts > 3:
                    raise
                self.kill_node(name)  # its runtime port was taken meanwhile: another port, another try
                node.runtime_port = free_port()
                return self.start_node(name, wait, timeout)
            if node.node_id is not None and int(m.group(1)) != node.node_id:
                raise DeployError(f"{name} came up as node {m.group(1)}, registered as {node.node_id}")
            node.node_id = int(m.group(1))
        return node.service

    def kill_node(self, name: str) -> None:
        """SIGKILL the SuperNode and everything it started, as if its machine died."""
        node = self.nodes[name]
        for service in (node.superexec, node.service):
            if service is not None:
                service.kill()

    def registered_nodes(self) -> list[dict]:
        return self.flwr_json("supernode", "ls", CONNECTION)["nodes"]

    # --- runs -----------------------------------------------------------------------------------
    def start_run(self, run_config: dict, app: Path = REPO) -> int:
        overrides = " ".join(f"{k}={to_toml(v)}" for k, v in run_config.items())
        data = self.flwr_json("run", str(app), CONNECTION, "--run-config", overrides)
        return int(data["run-id"])

    def run_status(self, run_id: int) -> str:
        runs = self.flwr_json("ls", CONNECTION, "--run-id", str(run_id))["runs"]
        return runs[0]["status"] if runs else "unknown"

    def wait_run(self, run_id: int, run_dir: Path, timeout: float = 900.0, poll_ls: float = 20.0) -> dict:
        """Wait for `<run_dir>/status.json` (written last by the ServerApp) or a finished run status.

        Returns the status.json content, or {"status": <flwr ls status>, "error": ...} if the ServerApp died
        before writing it. Raises DeployError on timeout (after `flwr stop`)."""
        deadline = time.monotonic() + timeout
        next_ls = time.monotonic() + poll_ls
        status_file = Path(run_dir) / "status.json"
        while True:
            if status_file.exists():
                try:
                    return json.loads(status_file.read_text())
                except ValueError:
                    pass  # written atomically, so only a foreign file could be partial; read again
            if time.monotonic() > next_ls:
                next_ls = time.monotonic() + poll_ls
                status = self.run_status(run_id)
                if status.startswith("finished"):
                    time.sleep(2)  # status.json is written before the ServerApp exits; give it a moment
                    if status_file.exists():
                        continue
                    return {"status": status, "error": f"no status.json in {run_dir}; see `flwr log {run_id}`"}
            if self.link is not None and not self.link.alive():
                raise DeployError(f"the SuperLink exited during run {run_id}; see {self.link.log}")
            if time.monotonic() > deadline:
                self.flwr("stop", str(run_id), CONNECTION, check=False)
                raise DeployError(f"run {run_id} did not finish within {timeout:.0f} s (stopped it)")
            time.sleep(0.5)

    def save_log(self, run_id: int) -> Path:
        out = self.flwr("log", str(run_id), CONNECTION, "--show", check=False)
        path = self.workdir / "logs" / f"run-{run_id}.log"
        path.write_text(out.stdout + out.stderr)
        return path


def _pump(stream, log: Path, t0: float) -> None:
    """Copy a child's output to its log, each line prefixed with `[<seconds since t0>]`."""
    with log.open("ab", buffering=0) as f:
        for line in stream:
            f.write(f"[{time.monotonic() - t0:9.3f}] ".encode() + line)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- command line ----------------------------------------------------------------------------------
def launch(args: argparse.Namespace) -> int:
    app = Path(args.app).resolve()
    try:
        overrides = parse_overrides(args.run_config)
        cfg, overrides = resolve(app, overrides, args.name, args.results_dir)
    except ConfigError as err:
        print(f"deploy.launch: refusing to start: {err}", file=sys.stderr)
        return 2
    if args.nodes < 1 or args.nodes - cfg.heldout_partitions < cfg.min_train_nodes:
        print(f"deploy.launch: {args.nodes} nodes with heldout-partitions={cfg.heldout_partitions} leave fewer "
              f"training nodes than min-train-nodes={cfg.min_train_nodes}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.results_dir) / cfg.run_name
    if (run_dir / "status.json").exists():
        print(f"deploy.launch: {run_dir} already holds a finished run; choose another --name", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fedmeta-deploy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    network = None
    env = {} if args.task_poll_interval is None else {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(args.task_poll_interval)}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.netns:
            from deploy import netns

            ok, why = netns.available()
            if not ok:
                print(f"deploy.launch: --netns unavailable: {why}", file=sys.stderr)
                return 2
            network = netns.Network()
        with Deployment(workdir, network=network, isolation=args.isolation, env=env) as d:
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
                status = d.wait_run(run_id, run_dir, timeout=args.timeout)
            finally:
                print(f"deploy.launch: ServerApp log: {d.save_log(run_id)}", flush=True)
                if network is not None:  # evidence that the traffic crossed the namespaces' interfaces
                    traffic = {h: {"address": a, **network.traffic(h)} for h, a in network.hosts.items()}
                    (workdir / "traffic.json").write_text(json.dumps(traffic, indent=2))
                    print(f"deploy.launch: interface traffic per host: {workdir / 'traffic.json'}", flush=True)
    except KeyboardInterrupt:
        print("deploy.launch: interrupted; stopped every process", file=sys.stderr)
        return 130
    except (DeployError, subprocess.TimeoutExpired, RuntimeError, OSError) as err:
        print(f"deploy.launch: FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if network is not None:
            network.close()
        if not args.keep_workdir and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if status.get("status") != "completed":
        print(f"deploy.launch: run FAILED ({status.get('status')}): {status.get('error', '')}", file=sys.stderr)
        return 1
    from fedmeta.cli import show_rounds

    show_rounds(run_dir)
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.launch", description=__doc__.split("\n\n")[0])
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
