"""The README's main entry point for real: `fedmeta run` -> `flwr run` -> a local SuperLink in
simulation mode -> Ray workers; and the two ways a run can go wrong."""

import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedmeta.config import Config
from fedmeta.results import load_meta_model, load_run

REPO = Path(__file__).resolve().parents[1]
FEDMETA = str(Path(sys.executable).parent / "fedmeta")
SMALL = "num-rounds=2 local-iterations=3 meta-batch-size=5 eval-tasks=10 eval-steps=2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path):
    """An isolated Flower home and SuperLink ports, so no other SuperLink is touched."""
    return {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}


def fedmeta(env, *args, timeout=300):
    return subprocess.run([FEDMETA, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def superlinks(home: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "flower-superlink" in line and home in line]


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


def test_fedmeta_run_completes_and_cleans_up(env, tmp_path):
    r = fedmeta(env, "run", "--results-dir", str(tmp_path), "--name", "ok", "-c", SMALL,
                "--federation-config", "num-supernodes=3 client-resources-num-cpus=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = load_run(tmp_path / "ok")
    assert run.status["status"] == "completed"
    assert list(run.rounds["round"]) == [1, 2] and (run.rounds["num_replies"] == 1).all()
    assert run.config["config"]["results-dir"] == str(tmp_path)
    assert load_meta_model(tmp_path / "ok" / "model.pt").round == 2
    assert (tmp_path / "ok" / "flwr.log").stat().st_size > 0
    assert not superlinks(env["FLWR_HOME"])  # the SuperLink we started is gone


def test_a_failed_run_exits_nonzero(env, tmp_path):
    # valid config, but the ServerApp fails at start: there is no checkpoint to resume from
    r = fedmeta(env, "run", "--results-dir", str(tmp_path), "--name", "bad", "-c",
                SMALL + f" resume='{tmp_path / 'missing.pt'}'",
                "--federation-config", "num-supernodes=3 client-resources-num-cpus=1")
    assert r.returncode == 1
    assert "FAILED" in r.stderr and "missing.pt" in r.stderr
    assert load_run(tmp_path / "bad").status["status"] == "failed"
    assert not superlinks(env["FLWR_HOME"])
