"""Exact resume after a real kill: a simulation whose process group is SIGKILLed after round 2, resumed
from its run directory (the newest valid checkpoint), ends bit-identical to the uninterrupted run, in
"average" fusion (clients' kept Adam state and SCAFFOLD control variates travel in the checkpoint) and in
"meta-gradient" fusion (server Adam)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fedmeta.config import Config
from fedmeta.results import load_meta_model, load_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMULATE = """
import json, sys
from flwr.simulation import run_simulation
from clients.client_app import app
from fedmeta.config import Config
from strategies.server_app import server_app
cfg = Config.from_mapping(json.loads(sys.argv[1]))
run_simulation(server_app=server_app(cfg), client_app=app, num_supernodes=4,
               backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
"""


def simulate(cfg: Config, kill_after: str | None = None, timeout: float = 300) -> None:
    """Run a simulation in a process group of its own; SIGKILL the whole group once `kill_after` exists."""
    proc = subprocess.Popen([sys.executable, "-c", SIMULATE, json.dumps(cfg.to_mapping())], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_after and os.path.exists(kill_after):
                os.killpg(proc.pid, signal.SIGKILL)  # the server and everything it started, mid-run
                proc.wait()
                return
            time.sleep(0.05)
        assert proc.returncode == 0, f"simulation exited with {proc.returncode}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("fusion", ["average", "meta-gradient"])
def test_killed_run_resumes_bit_identical(fusion, tmp_path):
    cfg = Config(fusion=fusion, num_rounds=5, local_iterations=3 if fusion == "average" else 1, meta_batch_size=4,
                 heldout_partitions=1, eval_tasks=4, eval_steps=1, server_lr=0.01 if fusion != "average" else 0.0,
                 drift_correction="scaffold" if fusion == "average" else "none", results_dir=str(tmp_path))
    simulate(cfg.replace(run_name="whole"))
    simulate(cfg.replace(run_name="killed"), kill_after=str(tmp_path / "killed" / "checkpoints" / "round-0003.pt"))
    killed = load_run(tmp_path / "killed")
    assert not killed.complete and not (tmp_path / "killed" / "model.pt").exists()  # it really died mid-run
    simulate(cfg.replace(run_name="resumed", resume=str(tmp_path / "killed")))
    whole, resumed = load_meta_model(tmp_path / "whole" / "model.pt"), load_meta_model(tmp_path / "resumed" / "model.pt")
    assert all(torch.equal(whole.params[k], resumed.params[k]) for k in whole.params)
    first = int(load_run(tmp_path / "resumed").rounds["round"].iloc[0])
    assert 3 < first <= 5  # it continued after a checkpoint of the killed run, not from scratch
    rounds = load_run(tmp_path / "whole").rounds.set_index("round")
    again = load_run(tmp_path / "resumed").rounds.set_index("round")
    assert rounds.loc[again.index, "train_loss"].tolist() == again["train_loss"].tolist()
