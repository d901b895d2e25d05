"""A run directory never mixes runs, survives a crash mid-write, and resumes from its newest valid
checkpoint; errors name the file and what is wrong."""

import pytest
import torch

from fedmeta.config import Config
from fedmeta.results import (
    CheckpointError,
    RunExistsError,
    RunWriter,
    latest_checkpoint,
    load_checkpoint,
    load_run,
)
from strategies.roster import Roster

PARAMS = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}


def writer(path, **cfg) -> RunWriter:
    return RunWriter(path, Config(**cfg))


def test_a_directory_that_holds_a_run_is_never_reused(tmp_path):
    w = writer(tmp_path / "run")
    w.append_round({"round": 1, "num_sampled": 2, "num_replies": 2, "num_rejected": 0, "num_failures": 0})
    for marker in ("config.json", "rounds.csv"):
        with pytest.raises(RunExistsError, match=f"already holds a run .*{marker}.*--name.*resume="):
            writer(tmp_path / "run", seed=7)
    assert load_run(tmp_path / "run").config["seed"] == 0  # untouched
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "flwr.log").write_text("the launcher's log only")
    writer(tmp_path / "fresh")  # a log alone is no run


def test_a_line_cut_mid_write_is_dropped_and_named(tmp_path):
    w = writer(tmp_path / "run")
    for rnd in (1, 2):
        w.append_round({"round": rnd, "num_sampled": 2, "num_replies": 2, "num_rejected": 0, "num_failures": 0,
                        "train_loss": 1.25 * rnd})
    path = tmp_path / "run" / "rounds.csv"
    whole = path.read_bytes()
    for cut in (len(whole) - 3, whole.rindex(b"\n2,") + 2):  # inside a float; inside an integer column
        path.write_bytes(whole[:cut])
        with pytest.warns(UserWarning, match=r"rounds.csv: line 3 was cut mid-write"):
            run = load_run(tmp_path / "run")
        assert list(run.rounds["round"]) == [1] and run.rounds["train_loss"].tolist() == [1.25]
        assert not run.complete and run.status["status"] == "incomplete" and "line 3" in run.warnings[0]
    path.write_bytes(whole.replace(b"2.5", b"2.x"))
    with pytest.raises(ValueError, match=r"rounds.csv: line 3, column 'train_loss': '2.x' is not a number"):
        load_run(tmp_path / "run")


def test_resume_falls_back_over_a_truncated_checkpoint_and_names_it(tmp_path):
    w = writer(tmp_path / "run")
    for rnd in (1, 2, 3):
        w.save_checkpoint(rnd, {k: v + rnd for k, v in PARAMS.items()}, {"optimizer": "sgd"},
                          {0: {"step": rnd, "tensors": {"exp_avg/w": torch.ones(2, 3)}}})
    ckpts = tmp_path / "run" / "checkpoints"
    newest = ckpts / "round-0003.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a crash mid-copy
    with pytest.raises(CheckpointError, match="round-0003.pt: cannot be read"):
        load_checkpoint(newest)
    for form in (tmp_path / "run", ckpts):  # the run directory, or the README's `.../checkpoints`
        path, skipped = latest_checkpoint(form)
        assert path.name == "round-0002.pt" and len(skipped) == 1 and "round-0003.pt" in skipped[0]
    ckpt = load_checkpoint(path)  # weights_only: plain tensors and numbers
    assert ckpt["round"] == 2 and torch.equal(ckpt["params"]["w"], PARAMS["w"] + 2)
    assert ckpt["clients"][0]["step"] == 2
    for p in ckpts.glob("*.pt"):
        p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        latest_checkpoint(ckpts)


def test_status_is_one_of_three(tmp_path):
    w = writer(tmp_path / "run")
    with pytest.raises(ValueError, match="status"):
        w.finish("done")
    w.finish("completed-with-failures", failed_clients=2)
    run = load_run(tmp_path / "run")
    assert run.complete and run.status == {"status": "completed-with-failures", "failed_clients": 2}


def test_too_few_training_nodes_fail_after_node_wait_timeout_not_round_timeout():
    class ThreeNodes:
        def get_node_ids(self):
            return [5, 6, 7]

    cfg = Config(heldout_partitions=2, min_train_nodes=2, node_wait_timeout=0.5)  # 1 training partition
    with pytest.raises(TimeoutError, match=r"node-wait-timeout = 0.5 s: 3 nodes connected, serving 1 training "
                                           r"partitions; min-train-nodes = 2 \(held-out partitions"):
        Roster(cfg).refresh(ThreeNodes(), lambda nodes: [])
