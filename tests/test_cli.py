"""The README's main entry point for real: `fedmeta run` -> `flwr run` -> a local SuperLink in
simulation mode -> Ray workers; the ways a run can go wrong, and the exit status that says so."""

import json
import signal
import subprocess
import time
import tomllib

import pytest
from cli_support import FEDMETA, REPO, isolated_env, run_pids

from fedmeta.cli import (
    EXIT_COMPLETED,
    EXIT_FAILED,
    EXIT_REFUSED,
    EXIT_WITH_FAILURES,
    exit_code,
    finish,
)
from fedmeta.config import Config
from fedmeta.results import load_meta_model, load_run

SMALL = "num-rounds=2 local-iterations=3 meta-batch-size=5 eval-tasks=10 eval-steps=2"


@pytest.fixture
def env(tmp_path):
    """An isolated Flower home and SuperLink ports, so no other SuperLink is touched."""
    return isolated_env(tmp_path)


def fedmeta(env, *args, timeout=300):
    return subprocess.run([FEDMETA, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_pyproject_config_lists_every_key_with_its_default():
    with (REPO / "pyproject.toml").open("rb") as f:
        app_config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(Config().to_mapping())
    assert Config.from_mapping(app_config) == Config()


def test_bad_config_refuses_to_start_naming_the_key(env, tmp_path):
    r = fedmeta(env, "run", "--results-dir", str(tmp_path), "-c", "inner-learning-rate=0.1", timeout=60)
    assert r.returncode == 2 and "'inner-learning-rate'" in r.stderr
    r = fedmeta(env, "run", "--results-dir", str(tmp_path), "-c", "meta-batch-size=0", timeout=60)
    assert r.returncode == 2 and "meta-batch-size" in r.stderr
    assert not list(tmp_path.glob("*/config.json"))


@pytest.mark.parametrize("earlier", ["config.json", "rounds.csv", "status.json"])
def test_a_directory_holding_a_run_is_refused_and_left_untouched(env, tmp_path, earlier):
    """A crashed run (config.json, rounds.csv) or a finished one (status.json) is never appended to."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / earlier).write_text("round,num_sampled\n1,2\n")  # whatever it holds, it is not ours to change
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = fedmeta(env, "run", "--results-dir", str(tmp_path), "--name", "taken", "-c", SMALL, timeout=60)
    assert r.returncode == EXIT_REFUSED, r.stdout + r.stderr
    assert "already holds a run" in r.stderr and earlier in r.stderr
    assert "--name" in r.stderr and f"resume='{out / 'checkpoints'}'" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not run_pids(env)  # refused before anything started


def test_exit_status_follows_the_status_file(tmp_path, capsys):
    assert exit_code({"status": "completed"}) == EXIT_COMPLETED == 0
    assert exit_code({"status": "completed-with-failures", "failed_clients": 1}) == EXIT_WITH_FAILURES == 3
    assert exit_code({"status": "failed", "error": "x"}) == EXIT_FAILED == 1
    assert exit_code({"status": "missing"}) == exit_code({}) == EXIT_FAILED
    assert finish({"status": "failed", "error": "no round fused a model"}, tmp_path) == 1
    assert "run FAILED (failed): no round fused a model" in capsys.readouterr().err
    help_text = fedmeta(None, "run", "--help", timeout=60).stdout
    help_text = " ".join(help_text.split())  # argparse reflows the epilog
    assert "3 completed with failures" in help_text and "130 / 143 interrupted" in help_text


def test_fedmeta_run_completes_and_cleans_up(env, tmp_path):
    # a second, longer run starts while this one runs: each gets a SuperLink of its own, so stopping this
    # run's at its end does not kill the other (it used to join this one's SuperLink and die with it)
    log_other = tmp_path / "other.out"  # a file, not a pipe: nobody reads a pipe while "ok" runs, and a full one blocks
    with log_other.open("w") as sink:
        other = subprocess.Popen([FEDMETA, "run", "--results-dir", str(tmp_path), "--name", "other", "-c",
                                  "num-rounds=1000 local-iterations=5 eval-tasks=10 eval-steps=2", "--federation-config",
                                  "num-supernodes=3 client-resources-num-cpus=2"],  # one Ray worker: a core for "ok"
                                 cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    r = fedmeta(env, "run", "--results-dir", str(tmp_path), "--name", "ok", "-c", SMALL,
                "--federation-config", "num-supernodes=3 client-resources-num-cpus=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert other.poll() is None, log_other.read_text()[-3000:]  # still running when this one stopped its SuperLink ...
    rows = tmp_path / "other" / "rounds.csv"
    done = len(rows.read_text().splitlines()) if rows.exists() else 0
    deadline = time.monotonic() + 120
    while (len(rows.read_text().splitlines()) if rows.exists() else 0) <= done + 1 and time.monotonic() < deadline:
        assert other.poll() is None, log_other.read_text()[-3000:]
        time.sleep(0.2)
    assert len(rows.read_text().splitlines()) > done + 1  # ... and goes on finishing rounds after it
    other.send_signal(signal.SIGTERM)  # (1000 rounds: it would outlast any run beside it; stop it)
    other.wait(timeout=120)
    assert other.returncode == 128 + signal.SIGTERM, log_other.read_text()[-3000:]
    links = {name: (tmp_path / name / "flwr.log").read_text().split("Using SuperLink: ")[1].split(")")[0]
             for name in ("ok", "other")}
    assert links["ok"] != links["other"], links
    run = load_run(tmp_path / "ok")
    assert run.status["status"] == "completed"
    assert list(run.rounds["round"]) == [1, 2] and (run.rounds["num_replies"] == 1).all()
    assert run.config["config"]["results-dir"] == str(tmp_path)
    assert load_meta_model(tmp_path / "ok" / "model.pt").round == 2
    log = (tmp_path / "ok" / "flwr.log").read_text()
    assert log and log in r.stdout  # not a terminal: every streamed line passes through unchanged
    assert "\x1b[?25l" not in r.stdout  # ... and no live display (rich hides the cursor for one)
    assert not run_pids(env)  # the SuperLink we started is gone, with everything it started
    again = fedmeta(env, "run", "--results-dir", str(tmp_path), "--name", "ok", "-c", SMALL, timeout=60)
    assert again.returncode == EXIT_REFUSED and "status.json" in again.stderr


def test_a_failed_run_exits_nonzero(env, tmp_path):
    # valid config, but the ServerApp fails at start: there is no checkpoint to resume from
    r = fedmeta(env, "run", "--results-dir", str(tmp_path), "--name", "bad", "-c",
                SMALL + f" resume='{tmp_path / 'missing.pt'}'",
                "--federation-config", "num-supernodes=3 client-resources-num-cpus=1")
    assert r.returncode == 1
    assert "FAILED" in r.stderr and "missing.pt" in r.stderr
    assert json.loads((tmp_path / "bad" / "status.json").read_text())["status"] == "failed"
    assert not run_pids(env)
