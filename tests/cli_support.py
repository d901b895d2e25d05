"""Helpers for tests that start `fedmeta run` for real: an isolated Flower home and ports, the processes of a
run (found by their FLWR_HOME and by the process tree), and a launcher whose finalizer stops them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from deploy.processes import (
    descendants,
    identity,
    marked,
    signal_group,
    signal_pids,
    still_running,
    wait_gone,
)

REPO = Path(__file__).resolve().parents[1]
FEDMETA = str(Path(sys.executable).parent / "fedmeta")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """An own Flower home and SuperLink ports, so that no other SuperLink on the machine is touched."""
    return {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}


def run_pids(env: dict[str, str]) -> list[int]:
    """Live processes that carry this run's Flower home (every Flower and Ray process `fedmeta run` starts)."""
    return marked(f"FLWR_HOME={env['FLWR_HOME']}")


def live_processes(pids: set[int]) -> list[str]:
    """`ps` lines of those of `pids` that still run (zombies, which have exited, are not running)."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    lines = []
    for line in out.splitlines():
        pid, stat, _ = (line.split(None, 2) + ["", ""])[:3]
        if int(pid) in pids and not stat.startswith("Z"):
            lines.append(line.strip()[:160])
    return lines


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `predicate` until it returns something truthy; fail naming `what` (and the log) otherwise."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"fedmeta run exited ({proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s:\n{tail}")
        time.sleep(0.5)
    return value


class Launcher:
    """Starts `fedmeta run` in the background; `stop_all()` (a fixture finalizer) kills whatever is left."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.procs: list[subprocess.Popen] = []
        self.seen: set[tuple[int, int]] = set()  # every process `tree` saw: killed too if still running

    @staticmethod
    def preexec(ignore_sigint: bool):
        """Run in the child before exec: its own process group; with `ignore_sigint`, what a shell does to a
        background job (`fedmeta run &`): SIGINT and SIGQUIT ignored."""

        def preexec() -> None:
            os.setpgrp()
            if ignore_sigint:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGQUIT, signal.SIG_IGN)

        return preexec

    def start(self, *args: str, ignore_sigint: bool = False) -> subprocess.Popen:
        """`fedmeta run ARGS` in its own process group (see `preexec`)."""
        with self.log.open("ab") as out:
            proc = subprocess.Popen([FEDMETA, "run", *args], cwd=REPO, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=self.preexec(ignore_sigint))  # noqa: PLW1509 (no threads here)
        self.procs.append(proc)
        return proc

    def tree(self, proc: subprocess.Popen) -> set[int]:
        pids = {proc.pid, *descendants(proc.pid)}
        self.seen.update(i for p in pids if (i := identity(p)) is not None)
        return pids

    def stop_all(self) -> None:
        pids = set(run_pids(self.env)) | set(still_running(self.seen))
        for proc in self.procs:
            pids |= self.tree(proc)
            signal_group(proc.pid, signal.SIGKILL)
        signal_pids(sorted(pids), signal.SIGKILL)
        wait_gone(sorted(pids), 10)
        for proc in self.procs:
            if proc.poll() is None:
                proc.wait(10)
