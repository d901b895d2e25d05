"""`fedmeta run`'s supervision of one Flower run: the local SuperLink, `flwr run --stream`, a watchdog, cleanup.

    with LocalRun(app, out, flwr_cmd, env, output) as r:   # leaving the block stops what r started
        status = r.run()                                    # the run's status.json (or why there is none)

* The SuperLink (if none is running on the configured ports; ours gets free ports of its own, so that no other
  `fedmeta run` joins it and dies when this one stops it) and `flwr run` are started in their own sessions, both marked with
  `FEDMETA_RUN=<token>` in their environment, which everything they start inherits (SuperExec,
  flwr-simulation, Ray's raylet and workers).
* The stream is read by a thread; the main thread watches, twice a second, for what ends a run early:
  status.json written (the stream is given a few seconds to end, then cut); our SuperLink gone; the run's
  ServerApp process (flwr-simulation / flwr-serverapp below our SuperLink) gone without status.json; or, with a
  SuperLink that is not ours, `flwr ls --run-id` saying the run finished. Flower itself notices a killed
  ServerApp only after its heartbeat timeout (about 2 minutes), and `flwr run --stream` waits that long.
* Interrupted (SIGINT/SIGTERM -> KeyboardInterrupt, see `deploy.processes.interrupts`) or not, `close()`
  stops `flwr run` and our SuperLink with everything below it (SIGTERM, SIGKILL after `grace` seconds), asks a
  SuperLink that is not ours to `flwr stop` the run, and SIGKILLs any process still marked with the token.
* A run that ends without status.json gets one written here: {"status": "failed", "written-by": "fedmeta run"}.

This module never imports Flower; it runs Flower's commands.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Self

from deploy.processes import (
    Service,
    comm,
    deferred,
    descendants,
    exists,
    identity,
    kill_tree,
    marked,
    signal_pids,
    start,
    still_running,
)

SERVER_COMMANDS = ("flwr-simulation", "flwr-serverapp")  # the processes that run our ServerApp
STARTED = re.compile(r"Successfully started run (\d+)")
STREAM_END_WAIT = 15.0  # seconds the stream gets to end after status.json appeared
# ... with our own SuperLink: the seconds its last log lines get (the ServerApp process then spends ~4 s shutting
# Ray down and flushing logs before the stream ends; status.json is written last, so `close` may stop all that)
OWN_STATUS_WAIT = 1.0
ENDED_GRACE = 0.3  # seconds between SIGTERM and SIGKILL when `close` stops an ended run
SERVER_GONE_WAIT = 3.0  # seconds between the ServerApp process vanishing and declaring the run failed
LS_INTERVAL = 10.0  # seconds between `flwr ls --run-id` polls (a SuperLink that is not ours)


PORT_VARS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39091", "FLWR_LOCAL_CONTROL_API_PORT": "39093"}  # Flower's


def local_port(name: str, env: dict[str, str] | None = None) -> str:
    """The local SuperLink's port `name` (a key of PORT_VARS) as `flwr` resolves it from `env` (os.environ)."""
    return (os.environ if env is None else env).get(name, PORT_VARS[name])


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def superlink_running(env: dict[str, str] | None = None) -> bool:
    port = local_port("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", env)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def write_status(out: Path, status: dict) -> None:
    """status.json, atomically (temporary file + rename), unless the ServerApp wrote one meanwhile."""
    path = out / "status.json"
    if path.exists():
        return
    tmp = out / f".status.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(status, indent=2))
    os.replace(tmp, path)


def read_status(out: Path) -> dict | None:
    try:
        return json.loads((out / "status.json").read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        return {"status": "failed", "error": f"{out / 'status.json'} is not valid JSON: {err}"}


class LocalRun:
    """One `flwr run <app> --stream` against a local simulation SuperLink (ours if none is running)."""

    def __init__(self, app: Path, out: Path, flwr_cmd: list[str], env: dict[str, str], output,
                 bin_dir: Path, keep_superlink: bool = False, grace: float = 3.0) -> None:
        self.app, self.out, self.flwr_cmd, self.output = app, out, flwr_cmd, output
        self.bin_dir, self.keep_superlink, self.grace = bin_dir, keep_superlink, grace
        self.token = uuid.uuid4().hex
        self.env = {**env, "FEDMETA_RUN": self.token}
        self.link: Service | None = None
        self.superlink_log: Path | None = None
        self.client: Service | None = None
        self.run_id: int | None = None
        self.servers: set[int] = set()  # pids of the ServerApp processes seen below our SuperLink
        self.seen: set[tuple[int, int]] = set()  # every process seen below our SuperLink (see `identity`)
        self.interrupted: str | None = None
        self.stream_ended = False  # `flwr run --stream` ended by itself (the run is over for Flower too)
        self.ended = False  # run() returned the run's final status: what is left running holds nothing of value

    # --- start ------------------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0) -> Service:
        """Start a simulation SuperLink like `flwr run` would, but owned (and stopped) by us.

        On ports of its own (free ones, handed to `flwr run` through Flower's FLWR_LOCAL_* variables) with an
        in-memory state, so that no other `fedmeta run` finds it and joins: stopping it at the end of this run
        would kill theirs. With --keep-superlink, on the configured ports, where later runs are meant to find it."""
        home = Path(self.env.get("FLWR_HOME", Path.home() / ".flwr"))
        log = home / "local-superlink" / "superlink.log"
        database = str(home / "local-superlink" / "state.db")
        if not self.keep_superlink:
            self.env.update({name: free_port() for name in PORT_VARS})
            log, database = log.with_name(f"superlink-{self.token}.log"), ":flwr-in-memory:"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.superlink_log = log
        cmd = [str(self.bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--control-api-address", f"127.0.0.1:{local_port('FLWR_LOCAL_CONTROL_API_PORT', self.env)}",
               "--host", "127.0.0.1", "--port", local_port("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", self.env),
               "--log-file", str(log), "--database", database]
        self.link = start("superlink", cmd, None, env=self.env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not superlink_running(self.env):
            if not self.link.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink did not start; see {log}")
            time.sleep(0.2)
        return self.link

    def run(self) -> dict:
        """Start (SuperLink if needed and) `flwr run --stream`, stream its lines, return the run's status."""
        if not superlink_running(self.env):
            self.start_superlink()
        self.out.mkdir(parents=True, exist_ok=True)
        self.client = start("flwr run", self.flwr_cmd, None, env=self.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_read, args=(self.client.proc.stdout, lines), daemon=True).start()
        with (self.out / "flwr.log").open("w") as log:
            status = self._stream(lines, log)
        if status is None:
            status = self._status_after_stream()
        self.ended = True
        return status

    # --- watch ------------------------------------------------------------------------------------
    def _stream(self, lines: queue.Queue, log) -> dict | None:
        """Copy lines to flwr.log and the output until the stream ends (None) or the watchdog ends the run."""
        self._status_seen = self._gone_since = None
        next_check = time.monotonic()
        self._next_ls = next_check + LS_INTERVAL
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                self.stream_ended = True
                return None
            if line:
                log.write(line)
                log.flush()
                self.output.line(line)
                if self.run_id is None and (m := STARTED.search(line)):
                    self.run_id = int(m.group(1))
            if time.monotonic() >= next_check:  # at most twice a second, however fast lines come
                next_check = time.monotonic() + 0.5
                if (status := self._watch()) is not None:
                    return status

    def _watch(self) -> dict | None:
        """The run's status if the run is over although the stream has not ended; None to keep streaming."""
        now = time.monotonic()
        if (status := read_status(self.out)) is not None:
            self._status_seen = self._status_seen or now
            if self.link is not None and now - self._status_seen > OWN_STATUS_WAIT:
                return status  # written last: our SuperLink's run has nothing more to say than its last log lines
            return status if now - self._status_seen > STREAM_END_WAIT else None  # Flower's stream lingers
        if self.link is not None:
            if not self.link.alive():
                return self._failed(f"the local SuperLink exited (status {self.link.proc.returncode}) during the run")
            alive = self._server_processes()
            self._gone_since = None if alive or not self.servers else (self._gone_since or now)
            if self._gone_since is not None and now - self._gone_since > SERVER_GONE_WAIT:
                pids = ", ".join(map(str, sorted(self.servers)))
                return read_status(self.out) or self._failed(
                    f"the ServerApp process (pid {pids}) exited without writing status.json (killed?)")
        elif self.run_id is not None and now >= self._next_ls:
            self._next_ls = now + LS_INTERVAL
            flwr_status = self._flwr_ls_status()
            if flwr_status.startswith("finished"):
                time.sleep(2)  # status.json is written before the ServerApp exits
                return read_status(self.out) or self._failed(
                    f"Flower reports the run {flwr_status} and it wrote no status.json")
        return None

    def _server_processes(self) -> list[int]:
        """Live ServerApp processes below our SuperLink; every one ever seen (zombies too) is remembered.

        Matched by the kernel's command name (the console script's name), which a zombie keeps: Flower's
        SuperExec can leave an exited flwr-simulation unreaped for minutes."""
        below = descendants(self.link.proc.pid)
        self.seen.update(i for p in below if (i := identity(p)) is not None)
        found = [p for p in below if comm(p) in SERVER_COMMANDS]
        self.servers.update(found)
        return [p for p in found if exists(p)]

    def _status_after_stream(self, wait: float = 5.0) -> dict:
        deadline = time.monotonic() + wait
        while (status := read_status(self.out)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if status is not None:
            return status
        return self._failed("the run ended without status.json")

    def _failed(self, reason: str) -> dict:
        status = {"status": "failed", "error": f"{reason}; see {self.out / 'flwr.log'}", "written-by": "fedmeta run",
                  "note": "the ServerApp did not write status.json, so `fedmeta run` wrote this one"}
        if self.run_id is not None:
            status["run-id"] = self.run_id
        write_status(self.out, status)
        return read_status(self.out) or status

    def _flwr(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess | None:
        """`flwr ...` against the local SuperLink; only while one runs (`flwr` would start one otherwise)."""
        if not superlink_running(self.env):
            return None
        try:
            return subprocess.run([str(self.bin_dir / "flwr"), *args], env=self.env, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None

    def _flwr_ls_status(self) -> str:
        out = self._flwr("ls", "--run-id", str(self.run_id), "--format", "json")
        try:
            runs = json.loads(out.stdout[out.stdout.find("{"):])["runs"] if out else []
        except (ValueError, KeyError):
            runs = []
        return runs[0]["status"] if runs else "unknown"

    # --- stop -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop what we started (also after an interrupt); a second Ctrl-C does not abort this."""
        with deferred():
            own_link = self.link is not None and not self.keep_superlink
            if self.run_id is not None and not own_link and not self.stream_ended:
                self._flwr("stop", str(self.run_id))  # the run lives in a SuperLink we must leave running
            services = [s for s in (self.client, self.link if own_link else None) if s is not None]
            pids = {p for s in services for p in s.tree()}
            if own_link:  # what left the tree meanwhile: Ray's agents outlive a killed raylet for seconds
                pids.update(still_running(self.seen))
            # an ended run's processes are only shutting down (Ray, log upload: seconds that SIGTERM does not
            # shorten); an interrupted one may still be writing its files, so it gets the grace period
            kill_tree(sorted(pids), [s.proc.pid for s in services], ENDED_GRACE if self.ended else self.grace)
            for s in services:
                s.reap()
            if own_link:  # whatever escaped the trees unseen (reparented to init) still carries our token
                deadline = time.monotonic() + 5
                while (left := marked(f"FEDMETA_RUN={self.token}")) and time.monotonic() < deadline:
                    signal_pids(left, signal.SIGKILL)
                    time.sleep(0.2)
                if self.ended:  # the log of a SuperLink that served a run to its end tells nothing more
                    self.superlink_log.unlink(missing_ok=True)

    def stopped(self) -> str:
        """What `close()` stopped, in words."""
        if self.link is not None and not self.keep_superlink:
            return "stopped the SuperLink it started, the ServerApp and the Ray processes"
        return "stopped the run (`flwr stop`); the SuperLink runs on (not started here, or --keep-superlink)"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is KeyboardInterrupt:
            self.interrupted = str(exc) or "SIGINT"
        self.close()
        if self.interrupted and self.out.is_dir():
            self._failed(f"interrupted by {self.interrupted}; `fedmeta run` stopped the run")


def _read(stream, lines: queue.Queue) -> None:
    try:
        for line in stream:
            lines.put(line)
    except (OSError, ValueError):
        pass
    lines.put(None)
