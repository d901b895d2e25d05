"""A local Flower deployment: a SuperLink with TLS and SuperNode authentication, N SuperNodes with registered
keys, and the operator's `flwr` CLI; every process owned (and stopped) by one `Deployment` object.

    with Deployment(workdir, env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}) as d:
        d.make_certificates(); d.start_superlink()
        d.add_node("node-0", 0, 3); d.start_node("node-0")            # ... for every node
        run_id = d.start_run({"num-rounds": 2, "results-dir": "/abs", "run-name": "x"})
        status = d.wait_run(run_id, Path("/abs/x"))                    # status.json, or why there is none
    # leaving the block (normally, on an error or on Ctrl-C) stops every process

Each step is a command of docs/deployment.md. With `network` (deploy.netns), the SuperLink, each SuperNode and
the operator CLI run in their own network namespace. tests/test_deployment.py and
benchmarks/deployment_latency.py drive this class; `python -m deploy.launch` is its command line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from deploy import certs
from deploy.netns import Network
from deploy.processes import Service, deferred, free_port, marked, signal_pids, start
from fedmeta.appdir import lean_copy
from fedmeta.config import run_config_string

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live next to this python
CONNECTION = "fedmeta-deploy"


class DeployError(RuntimeError):
    """A step of the deployment failed; the message names the step and its log."""


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
        popen = {"env": self._env(home), "cwd": self.workdir}
        if self.timestamps:  # a thread copies the pipe into the log, each line prefixed with its time
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("ab") as f:
                f.write(f"\n+ {' '.join(self._wrap(host, cmd))}\n".encode())
            service = start(name, self._wrap(host, cmd), None, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            **popen)
            service.log = log
            threading.Thread(target=_pump, args=(service.proc.stdout, log, self._t0), daemon=True).start()
        else:
            service = start(name, self._wrap(host, cmd), log, **popen)
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
        orphan that still carries this deployment's FLWR_HOME in its environment. A Ctrl-C meanwhile is
        recorded, not obeyed: the cleanup always finishes."""
        with deferred():
            for service in reversed(self.services):
                service.stop()
            deadline = time.monotonic() + 10
            while (left := self.leftovers()) and time.monotonic() < deadline:
                signal_pids(left, signal.SIGKILL)
                time.sleep(0.2)

    def leftovers(self) -> list[int]:
        """Processes of this deployment still alive (see `deploy.processes.marked`)."""
        return marked(f"FLWR_HOME={self.workdir}/")

    def __enter__(self) -> Self:
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
                             timeout=timeout or self.cli_timeout, stdin=subprocess.DEVNULL, check=False)
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
        node_config = run_config_string({"partition-id": node.partition_id, "num-partitions": node.num_partitions,
                                         **node.extra})
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
        overrides = run_config_string(run_config)
        skip = [Path(run_config["results-dir"])] if "results-dir" in run_config else []
        with lean_copy(app, skip) as copy:  # the FAB is built and sent before `flwr run` returns (fedmeta.appdir)
            data = self.flwr_json("run", str(copy), CONNECTION, "--run-config", overrides)
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
