"""deploy.processes with plain `sleep` processes (seconds): signal handlers that work in a background job,
stopping a tree whose members left its session, finding orphans by an environment marker."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from deploy.processes import (
    Service,
    comm,
    descendants,
    exists,
    marked,
    start,
    wait_gone,
)

# a process that starts a child in a session of its own (as Flower's SuperExec and Ray do), then waits
SPAWNER = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(300)
""")


@pytest.fixture
def services():
    started: list[Service] = []
    yield started
    for s in started:  # a failed test still stops what it started
        s.kill()


def test_handlers_are_installed_although_the_shell_ignored_sigint():
    """`cmd &` in a shell starts cmd with SIGINT ignored; `interrupts()` must install its handler anyway."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        from deploy.processes import interrupts
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # inherited, as in a background job
        try:
            with interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        except KeyboardInterrupt as err:
            assert str(err) == "SIGINT" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored
            sys.exit(42)
        sys.exit(1)
    """)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                       capture_output=True, text=True, timeout=30, cwd=os.path.dirname(os.path.dirname(__file__)),
                       check=False)
    assert r.returncode == 42, r.stderr
    assert time.monotonic() - t0 < 4  # interrupted at once, not after the 5 s sleep


def test_stop_reaches_descendants_in_other_sessions(services, tmp_path):
    svc = start("spawner", [sys.executable, "-c", SPAWNER], None, stdout=subprocess.PIPE, text=True)
    services.append(svc)
    child = int(svc.proc.stdout.readline())
    assert child in descendants(svc.proc.pid) and os.getsid(child) != os.getsid(svc.proc.pid)
    assert comm(child) == "sleep"
    t0 = time.monotonic()
    svc.stop(grace=2)
    assert not svc.alive() and not exists(child)
    assert time.monotonic() - t0 < 4


def test_marked_finds_orphans_by_whole_environment_entry(services):
    token = uuid.uuid4().hex
    env = {**os.environ, "FEDMETA_RUN": token}
    svc = start("marked", ["sleep", "300"], None, env=env)
    other = start("other", ["sleep", "300"], None, env={**os.environ, "FEDMETA_RUN": token + "x"})
    services += [svc, other]
    deadline = time.monotonic() + 10
    while {comm(svc.proc.pid), comm(other.proc.pid)} != {"sleep"}:  # /proc shows the new environment after exec
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert marked(f"FEDMETA_RUN={token}") == [svc.proc.pid]  # not the one whose value merely starts alike
    assert marked(f"FEDMETA_RUN={token}x") == [other.proc.pid]
    assert {svc.proc.pid, other.proc.pid} <= set(marked("FEDMETA_RUN="))  # a marker ending in "=" is a prefix
    svc.kill()
    other.kill()
    assert not wait_gone([svc.proc.pid, other.proc.pid], 5) and not marked(f"FEDMETA_RUN={token}")
