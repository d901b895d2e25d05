"""Processes we start and must stop: process trees read from /proc, services with a log, signal handling.

    svc = start("superlink", ["flower-superlink", ...], log=Path("logs/superlink.log"), env=env)
    svc.alive(); svc.text()             # is it running; its log so far
    svc.stop(grace=5)                   # SIGTERM the group and every descendant, SIGKILL what is left
    with interrupts():                  # SIGINT and SIGTERM raise KeyboardInterrupt, even when inherited ignored
        ...

Every service runs in its own session (so a terminal's Ctrl-C reaches only us, and we decide the order of the
shutdown) and is stopped by process group *and* by the process tree snapshotted before the first signal:
Flower's SuperExec and Ray's processes start their own sessions, so a group alone misses them. What escaped
both (an orphan reparented to init) is found by an environment marker every descendant inherits (`marked`).

Used by deploy.deployment (SuperLink, SuperNodes) and by `fedmeta run` (its local SuperLink, `flwr run`).
Linux only (/proc). Never imports Flower: it runs Flower's commands.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, pgrp, session, ...), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces and parentheses


def exists(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) is gone for our purposes."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time in clock ticks since boot): names one process even after its pid is reused."""
    fields = _stat(pid)
    return None if fields is None else (pid, int(fields[19]))  # field 22 of stat, "starttime"


def still_running(identities: set[tuple[int, int]]) -> list[int]:
    """The pids of those processes (see `identity`) that still run, not a later process with the same pid."""
    return [pid for pid, start in identities if identity(pid) == (pid, start) and exists(pid)]


def comm(pid: int) -> str:
    """The kernel's name of the process (its executable's or script's file name, at most 15 characters);
    kept by a zombie, unlike its command line."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc), parents before their children."""
    children: dict[int, list[int]] = {}
    for child in _pids():
        fields = _stat(child)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def marked(marker: str) -> list[int]:
    """Live processes other than us whose environment holds the entry `marker` (e.g. `FLWR_HOME=/x/`).

    A marker ending in "/" or "=" matches as a prefix of an entry (`FLWR_HOME=/x/` finds `FLWR_HOME=/x/link`);
    any other marker must be a whole entry, so `RUN=ab` does not find `RUN=abc`."""
    needle = marker.encode()
    whole = not marker.endswith(("/", "="))
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        hit = (b"\0" + needle + b"\0") in (b"\0" + env) if whole else (b"\0" + needle) in (b"\0" + env)
        if hit and exists(pid):
            found.append(pid)
    return found


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_gone(pids: list[int], timeout: float, interval: float = 0.1) -> list[int]:
    """Wait until none of `pids` runs or `timeout` passed; return those still running."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if exists(p)]) and time.monotonic() < deadline:
        time.sleep(interval)
    return left


def kill_tree(pids: list[int], groups: list[int] | tuple[int, ...] = (), grace: float = 5.0) -> None:
    """SIGTERM `pids` and the process groups `groups`, SIGKILL whatever still runs after `grace` seconds."""
    for group in groups:
        signal_group(group, signal.SIGTERM)
    signal_pids(pids, signal.SIGTERM)
    left = wait_gone(pids, grace)
    for group in groups:
        signal_group(group, signal.SIGKILL)
    signal_pids(left, signal.SIGKILL)
    wait_gone(left, 5.0)


@dataclass
class Service:
    """One process we started (in its own session, so its own process group) and its log file."""

    name: str
    proc: subprocess.Popen
    log: Path | None
    cmd: list[str]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tree(self) -> list[int]:
        """The process and all its live descendants (without the process once it exited)."""
        return [self.proc.pid, *descendants(self.proc.pid)] if self.alive() else descendants(self.proc.pid)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group and every descendant; SIGKILL whatever is left after `grace` seconds."""
        kill_tree(self.tree(), [self.proc.pid], grace)  # the tree is snapshotted before the first signal
        self.reap()

    def kill(self, pids: list[int] | None = None) -> None:
        """SIGKILL the whole tree at once (what a crashing machine looks like to the SuperLink)."""
        pids = self.tree() if pids is None else list(set(pids) | set(self.tree()))
        signal_group(self.proc.pid, signal.SIGKILL)
        signal_pids(pids, signal.SIGKILL)
        self.reap()

    def reap(self) -> None:
        """Collect the exit status of our child (waits up to 10 s), so that it leaves no zombie."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None and self.log.exists() else ""


def start(name: str, cmd: list[str], log: Path | None = None, **popen) -> Service:
    """Start `cmd` in a new session, output appended to `log` (after a `+ cmd` line) unless `popen` redirects it."""
    popen = {"stdin": subprocess.DEVNULL, "start_new_session": True, **popen}
    if log is None:
        return Service(name, subprocess.Popen(cmd, **popen), None, cmd)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        f.write(f"\n+ {' '.join(cmd)}\n".encode())
        f.flush()
        popen = {"stdout": f, "stderr": subprocess.STDOUT, **popen}
        proc = subprocess.Popen(cmd, **popen)
    return Service(name, proc, log, cmd)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def interrupts(handler: Callable | None = None, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
               ) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM call `handler` (default: raise KeyboardInterrupt naming the signal).

    Installed explicitly, whatever the inherited disposition: a shell starts a background job (`cmd &`) with
    SIGINT ignored, and Python then leaves it ignored, so without this a `kill -INT` would do nothing.
    Only the main thread may install handlers; elsewhere the block runs unchanged. Restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler or _raise_interrupt) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[list[int]]:
    """Within the block, SIGINT/SIGTERM are recorded (in the yielded list) instead of interrupting: a second
    Ctrl-C must not abort a cleanup half-way. Main thread only (elsewhere nothing changes)."""
    got: list[int] = []
    with interrupts(lambda signum, frame: got.append(signum), signals):
        yield got
