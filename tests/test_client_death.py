"""A hard client death costs one client, once (issue: the dead Ray worker was never replaced, and healthy
clients failed in every later round). A real `fedmeta run` of a copy of the app whose ClientApp is
tests/fault_app.py: partition 0's process calls os._exit(1) on its round-2 TRAIN message. ~40 s on 2 cores.
"""

import shutil
import subprocess

from cli_support import FEDMETA, REPO, isolated_env, run_pids

from fedmeta.results import load_run

TRAINING = [0, 1, 2]  # 4 partitions, the last held out
RUN = ("num-rounds=4 local-iterations=3 meta-batch-size=5 eval-tasks=5 eval-steps=2 heldout-partitions=1 "
       "fraction-train=1.0 threads=1")


def _app_with_fault(dest):
    """The Flower app (fedmeta/, clients/, strategies/, pyproject.toml) with `fault_app:app` as its ClientApp."""
    for package in ("fedmeta", "clients", "strategies"):
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "tests" / "fault_app.py", dest / "fault_app.py")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'clientapp = "clients.client_app:app"' in pyproject
    (dest / "pyproject.toml").write_text(pyproject.replace('clientapp = "clients.client_app:app"',
                                                           'clientapp = "fault_app:app"'))
    return dest


def test_a_dead_client_process_costs_one_client_once(tmp_path):
    env = isolated_env(tmp_path)
    app = _app_with_fault(tmp_path / "app")
    r = subprocess.run([FEDMETA, "run", "--app", str(app), "--results-dir", str(tmp_path / "results"),
                        "--name", "fault", "-c", RUN, "--federation-config",
                        "num-supernodes=4 client-resources-num-cpus=1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420, check=False)
    run = load_run(tmp_path / "results" / "fault")
    train = run.clients[run.clients["phase"] == "train"]
    by_round = {rnd: dict(zip(g["partition_id"], g["status"])) for rnd, g in train.groupby("round")}
    assert by_round[1] == {p: "ok" for p in TRAINING}, by_round
    assert by_round[2] == {0: "failed", 1: "ok", 2: "ok"}, by_round  # the death costs its own client ...
    assert by_round[3] == by_round[4] == {p: "ok" for p in TRAINING}, by_round  # ... once: all healthy later
    assert run.status["status"] == "completed-with-failures", run.status
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]  # fedmeta run's exit status says so
    assert not run_pids(env)
