"""A simulation that outgrows one machine: the Simulation Engine attached to a multi-node Ray cluster.

A local two-node Ray cluster is started the way docs/deployment.md starts one on several machines (`ray start
--head` on the first, `ray start --address=<head>` on each other; here both raylets run on this host with 1 and
2 CPUs). `fedmeta run`, with RAY_ADDRESS pointing at the head, runs 3 SuperNodes of 1 CPU each: they need the
CPUs of both Ray nodes. Checks: the run completed; the cluster's job table holds the `flwr-simulation` driver;
its ClientApp actors ran on both Ray nodes. The cluster is stopped by process group and then by its temp dir
(every Ray process of this cluster has it on its command line); `ray stop` would stop every Ray process of the
machine, other people's simulations included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from deploy.processes import free_port, marked
from fedmeta.results import load_run

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = "num-rounds=2 local-iterations=2 meta-batch-size=5 eval-tasks=5 eval-steps=2 heldout-partitions=1 threads=1"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class RayCluster:
    """`ray start --block` processes (each its own session) sharing one --temp-dir."""

    def __init__(self, root: Path) -> None:
        # Ray puts unix sockets under --temp-dir; their paths must stay under 107 bytes, hence a short /tmp dir
        self.temp = Path(tempfile.mkdtemp(prefix="fmray", dir="/tmp"))
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.address = ""

    def _start(self, name: str, args: list[str]) -> None:
        log = (self.root / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen([str(BIN / "ray"), "start", "--block", *args, "--disable-usage-stats"],
                                           stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start_head(self, num_cpus: int) -> str:
        port = free_port()
        self._start("head", ["--head", f"--port={port}", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp}",
                             "--include-dashboard=false", f"--dashboard-port={free_port()}",
                             f"--ray-client-server-port={free_port()}",
                             f"--dashboard-agent-listen-port={free_port()}"])
        self.address = f"127.0.0.1:{port}"
        self.wait_nodes(1)
        return self.address

    def add_worker(self, num_cpus: int) -> None:
        self._start(f"worker-{len(self.procs)}", [f"--address={self.address}", f"--num-cpus={num_cpus}",
                                                  f"--dashboard-agent-listen-port={free_port()}"])

    def query(self, expr: str, timeout: float = 90) -> object:
        """Evaluate `expr` (ray and ray._private.state.state in scope) in a fresh driver; JSON result."""
        code = (f"import json, ray\nray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False)\n"
                f"from ray._private.state import state\nprint('RESULT', json.dumps({expr}))\n")
        out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                             timeout=timeout, env=self.env, cwd=self.root)
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"ray query failed:\n{out.stdout}\n{out.stderr[-3000:]}")
        return json.loads(lines[-1][7:])

    def wait_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` exited ({p.returncode}); see {self.root}")
            try:
                nodes = self.query("[n for n in ray.nodes() if n['Alive']]", timeout=60)
                if len(nodes) >= n:
                    return nodes
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray cluster did not reach {n} nodes in {timeout:.0f} s")
            time.sleep(2)

    def pids(self) -> list[int]:
        marker = str(self.temp)
        return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(int(p.name))]

    def stop(self) -> None:
        for p in self.procs:  # `ray start --block` stops its own processes on SIGTERM
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (any(p.poll() is None for p in self.procs) or self.pids()):
            time.sleep(0.5)
        for pid in self.pids():  # whatever is left of this cluster (its temp dir is on every command line)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        shutil.rmtree(self.temp, ignore_errors=True)


# ~40 s on 2 cores: two raylets and a simulation
def test_fedmeta_run_attaches_to_a_multi_node_ray_cluster(tmp_path):
    if not (BIN / "ray").exists():
        pytest.skip("the `ray` command is not installed (pip install 'flwr[simulation]')")
    cluster = RayCluster(tmp_path)
    home = tmp_path / "flwr-home"
    try:
        address = cluster.start_head(num_cpus=1)
        cluster.add_worker(num_cpus=2)
        nodes = cluster.wait_nodes(2)
        assert sum(n["Resources"]["CPU"] for n in nodes) == 3
        env = {**cluster.env, "RAY_ADDRESS": address, "FLWR_HOME": str(home),
               # our own local SuperLink (fedmeta run starts one), never one somebody else left running
               "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
        out = subprocess.run([str(BIN / "fedmeta"), "run", "--federation-config",
                              "num-supernodes=3 client-resources-num-cpus=1", "-c", RUN, "--name", "ray",
                              "--results-dir", str(tmp_path / "results")],
                             cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        run = load_run(tmp_path / "results" / "ray")
        assert run.status["status"] == "completed" and list(run.rounds["round"]) == [1, 2]
        assert (run.clients["status"] == "ok").all() and len(run.clients) == 2 * 3

        jobs = cluster.query("[j for j in state.job_table() if '/flwr-simulation ' in j.get('Entrypoint', '') "
                             "and 'ray.init' not in j['Entrypoint']]")  # not these queries' own drivers
        assert len(jobs) == 1 and jobs[0]["IsDead"]  # the simulation was a driver of THIS cluster, now finished
        job = jobs[0]["JobID"]
        actor_nodes = cluster.query("sorted({a['Address']['NodeID'] for a in state.actor_table(None).values() "
                                    f"if a['JobID'] == {job!r}}})")
        assert set(actor_nodes) == {n["NodeID"] for n in nodes}  # ClientApp actors ran on both Ray nodes
    finally:
        cluster.stop()
        leftovers = marked(f"FLWR_HOME={home}")  # fedmeta run stops its SuperLink; a timeout would orphan it
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert not cluster.pids() and not leftovers
