"""Ctrl-C, SIGTERM and a killed server, for real: `fedmeta run` (a local SuperLink, flwr-simulation, Ray) is
interrupted mid-run and must exit within seconds leaving no process of the run behind.

The SIGINT case starts `fedmeta run` the way a shell starts a background job (`fedmeta run &`): SIGINT ignored
before exec, which Python would keep; `fedmeta run` installs its handlers explicitly. Whatever happens, the
`launcher` fixture's finalizer kills every process these tests started. ~25 s per test on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from cli_support import Launcher, isolated_env, live_processes, run_pids, wait_for

from deploy.processes import comm, descendants

# long enough never to finish by itself; every round writes rows, so "mid-run" is observable
LONG = "num-rounds=1000 local-iterations=50 meta-batch-size=5 eval-tasks=5 eval-steps=2 heldout-partitions=1"
FEDERATION = "num-supernodes=3 client-resources-num-cpus=1"
EXIT_WITHIN_S = 20.0


@pytest.fixture
def launcher(tmp_path):
    launcher = Launcher(isolated_env(tmp_path), tmp_path / "fedmeta.log")
    yield launcher
    launcher.stop_all()  # also when an assertion failed half-way


def _start_mid_run(launcher: Launcher, tmp_path, ignore_sigint: bool = False):
    """Start a long run and return once a round has been written and Ray's ClientApp actors are running."""
    proc = launcher.start("--results-dir", str(tmp_path / "results"), "--name", "long", "-c", LONG,
                          "--federation-config", FEDERATION, ignore_sigint=ignore_sigint)
    rounds = tmp_path / "results" / "long" / "rounds.csv"
    wait_for(lambda: rounds.exists() and len(rounds.read_text().splitlines()) >= 2, 240, "round 1 in rounds.csv",
             proc, launcher.log)
    actors = wait_for(lambda: [p for p in descendants(proc.pid) if comm(p).startswith("ray::")], 60,
                      "Ray ClientApp actor", proc, launcher.log)
    assert actors and run_pids(launcher.env)
    return proc, tmp_path / "results" / "long"


def _signals(pid: int, field: str) -> int:
    """A signal mask of /proc/<pid>/status (SigIgn: ignored, SigCgt: caught by a handler)."""
    return int(open(f"/proc/{pid}/status").read().split(f"{field}:")[1].split()[0], 16)


def _assert_nothing_left(launcher: Launcher, tree: set[int]) -> None:
    time.sleep(0.5)
    left = live_processes(tree | set(run_pids(launcher.env)))
    assert not left, "processes of the run are still running:\n" + "\n".join(left)


@pytest.mark.parametrize("sig, ignore_sigint", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-background-job", "sigterm"])
def test_interrupt_stops_superlink_serverapp_and_ray(launcher, tmp_path, sig, ignore_sigint):
    proc, out = _start_mid_run(launcher, tmp_path, ignore_sigint)
    if ignore_sigint:  # started like a background job (SIGINT ignored), yet fedmeta run catches SIGINT
        probe = subprocess.Popen(["sleep", "30"], preexec_fn=launcher.preexec(ignore_sigint=True))  # noqa: PLW1509
        assert _signals(probe.pid, "SigIgn") & 1 << (signal.SIGINT - 1)  # what the launch does to a child
        probe.kill()
        assert _signals(proc.pid, "SigCgt") & 1 << (signal.SIGINT - 1)  # a handler, installed explicitly
    tree = launcher.tree(proc)
    names = {comm(p) for p in tree}  # the kernel keeps 15 characters of a name
    assert {"flower-superlin", "flwr-simulation", "raylet", "ray::ClientAppA"} <= names, names  # to be stopped
    t0 = time.monotonic()
    proc.send_signal(sig)
    proc.wait(60)
    took = time.monotonic() - t0
    log = launcher.log.read_text(errors="replace")
    assert took < EXIT_WITHIN_S, f"exited only after {took:.1f} s"
    assert proc.returncode == 128 + sig, log[-3000:]
    assert f"interrupted ({sig.name}); stopped the SuperLink it started, the ServerApp and the Ray processes" in log
    _assert_nothing_left(launcher, tree)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and sig.name in status["error"], status


def test_killed_server_fails_fast_and_records_it(launcher, tmp_path):
    proc, out = _start_mid_run(launcher, tmp_path)
    tree = launcher.tree(proc)
    [server] = [p for p in tree if comm(p) == "flwr-simulation"]
    t0 = time.monotonic()
    os.kill(server, signal.SIGKILL)  # the ServerApp's process can write nothing any more
    proc.wait(120)
    took = time.monotonic() - t0
    log = launcher.log.read_text(errors="replace")
    assert took < EXIT_WITHIN_S, f"fedmeta run noticed the dead server only after {took:.1f} s"
    assert proc.returncode == 1, log[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and status["written-by"] == "fedmeta run", status
    assert str(server) in status["error"] and "run FAILED" in log
    _assert_nothing_left(launcher, tree)
