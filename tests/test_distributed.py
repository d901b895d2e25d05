"""fedmeta.distributed: central meta-training with each meta-batch's tasks split over torchrun ranks.

- the arithmetic: contiguous shares (uneven included) and the task-weighted combination, by hand;
- one process (no torchrun) is the core's `Algorithm.train`, bit for bit, built as the central
  experiments build it (float32);
- exactness: P = 2 and P = 3 ranks (uneven shares) equal one process to 1e-6 in float64 for every
  algorithm family (MAML second order, FOMAML, Meta-SGD, Reptile on sinusoid, the LSTM optimizer on
  quadratics, MAML on Omniglot 5-way 1-shot), checkpoints and the table included; one reduced
  meta-gradient is within the stated float32 (and float64) summation-order bound of the whole batch's;
- faults: a rank that raises or is SIGKILLed ends the job non-zero within a bound, the rank named,
  the last checkpoint loadable; a rerun, or torchrun's --max-restarts, ends bit-identical to the
  uninterrupted run;
- two torchrun launchers on loopback acting as two nodes (c10d rendezvous).

Under torchrun this file is also the worker (`python -m torch.distributed.run ... test_distributed.py
OUT`): it runs every case in one process group.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedmeta import algorithms, distributed, load_meta_model, partition, seeding
from fedmeta.algorithms.base import take
from fedmeta.config import Config, run_config_string
from fedmeta.distributed import Comm, Options, command, pack, rundir, shares, unpack

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
ITERATIONS, EVERY = 6, 2
# Meta-batches of 7 tasks: 4 + 3 on 2 ranks, 3 + 2 + 2 on 3; Omniglot 5: 3 + 2 and 2 + 2 + 1.
SINUSOID = {"meta-batch-size": 7, "shots": 5, "query-shots": 5, "meta-lr": 0.01, "seed": 3}
CASES = {
    "maml": {**SINUSOID, "algorithm": "maml", "inner-steps": 2},
    "fomaml": {**SINUSOID, "algorithm": "fomaml", "inner-steps": 2},
    "metasgd": {**SINUSOID, "algorithm": "metasgd"},
    "reptile": {**SINUSOID, "algorithm": "reptile", "inner-steps": 3, "inner-lr": 0.02},
    "lstm": {"task": "quadratic", "algorithm": "lstm", "quadratic-dim": 5, "lstm-hidden": 8, "lstm-horizon": 6,
             "lstm-unroll": 3, "meta-batch-size": 7, "meta-lr": 0.01, "seed": 3},
    "omniglot": {"task": "omniglot", "data-dir": str(OMNIGLOT), "ways": 5, "shots": 1, "query-shots": 1,
                 "inner-lr": 0.4, "meta-batch-size": 5, "meta-lr": 0.01, "seed": 3},
}
F64 = torch.float64


def options(out: Path, dtype: torch.dtype = F64, iterations: int = ITERATIONS) -> Options:
    return Options(iterations, out, dtype, EVERY, log_every=0)


def worker(out: Path) -> None:
    """Under torchrun: every case, one after the other, in one process group."""
    torch.set_num_threads(1)
    comm = distributed.join(Config(), timeout_s=120)
    for name, overrides in CASES.items():
        distributed.run(Config.from_mapping(overrides), options(out / name), comm)
    distributed.leave()


# --- launching ----------------------------------------------------------------------------------------
def launch(*args: str, fault: str = "", timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m torch.distributed.run ARGS` in the repository; (process, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(distributed.FAULT_ENV, None)
    if fault:
        env[distributed.FAULT_ENV] = fault
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], check=False, cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t


def cli_args(name: str, out: Path) -> list[str]:
    run_config = run_config_string(CASES[name])
    return ["-m", "fedmeta.distributed", "-c", run_config, "--iterations", str(ITERATIONS), "--checkpoint-every",
            str(EVERY), "--dtype", "float64", "--log-every", "0", "--timeout", "120", "--out", str(out)]


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """P -> the directory of a torchrun job with P ranks that ran every case (launched once each)."""
    done: dict[int, Path] = {}

    def get(ranks: int) -> Path:
        if ranks not in done:
            out = tmp_path_factory.mktemp(f"ranks{ranks}")
            proc, _ = launch("--standalone", "--nproc-per-node", str(ranks), __file__, str(out))
            assert proc.returncode == 0, output(proc)[-4000:]
            done[ranks] = out
        return done[ranks]

    return get


@pytest.fixture(scope="module")
def references() -> dict:
    """name -> (meta-parameters after each iteration 0..N, loss per iteration): one process, the core's
    `Algorithm.train` on whole meta-batches, float64."""
    out = {}
    for name, overrides in CASES.items():
        cfg = Config.from_mapping(overrides)
        algo, source = distributed.setup(cfg, F64)
        state = distributed.fresh_state(cfg, algo)
        stream = torch.Generator().set_state(state.stream)
        sample = distributed.sampler(cfg, source, stream, F64, torch.device("cpu"))
        params, adam, trail, losses = state.params, None, [state.params], []
        for _ in range(ITERATIONS):
            params, adam, curve = algo.train(params, adam, sample, 1)
            trail.append(params)
            losses += curve
        out[name] = (trail, losses)
    return out


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- the arithmetic --------------------------------------------------------------------------------------
def test_shares_are_contiguous_and_uneven_first():
    assert shares(25, 2) == [slice(0, 13), slice(13, 25)]
    assert shares(7, 3) == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert shares(5, 3) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert shares(4, 4) == [slice(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="meta-batch-size = 2 is smaller than the 3 ranks"):
        shares(2, 3)


def test_pack_unpack_is_the_task_weighted_mean():
    """Shares of 3 and 1 tasks: gradient (3 [1, 2] + [4, -1]) / 4, loss (3 * 3 + 1) / 4, by hand."""
    like = {"w": torch.zeros(2, dtype=torch.float32)}
    total = pack({"w": torch.tensor([1.0, 2.0])}, 3.0, 3) + pack({"w": torch.tensor([4.0, -1.0])}, 1.0, 1)
    grads, loss, tasks = unpack(total, like)
    assert torch.equal(grads["w"], torch.tensor([1.75, 1.25])) and grads["w"].dtype == torch.float32
    assert loss == 2.5 and tasks == 4


@pytest.mark.parametrize("case", ["maml", "fomaml", "metasgd", "reptile", "omniglot"])
def test_reduced_meta_gradient_within_the_stated_bound(case):
    """The combined shares' meta-gradient differs from the whole batch's by summation order only:
    |g_P - g_1| <= B u S per coordinate (u = 2^-24 in float32, 2^-53 in float64; S = max_i |g_i|, the
    largest coordinate of a task's meta-gradient, or |theta| for Reptile, whose pseudo-gradient
    theta - mean_i phi_i subtracts numbers of theta's size): the bound in fedmeta/distributed."""
    batch = 8 if case == "omniglot" else 25
    cfg = Config.from_mapping({**CASES[case], "meta-batch-size": batch})
    for dtype, ulp in ((torch.float32, 2.0**-24), (F64, 2.0**-53)):
        algo, source = distributed.setup(cfg, dtype)
        params = algo.init(seeding.generator(cfg.seed, "init"))
        ep = distributed.sampler(cfg, source, seeding.generator(cfg.seed, "train"), dtype, torch.device("cpu"))(0)
        whole, _ = algo.meta_gradient(params, ep)
        tasks = [algo.meta_gradient(params, take(ep, slice(i, i + 1)))[0] for i in range(batch)]
        scale = max(float(v.abs().max()) for g in ([params] if case == "reptile" else tasks) for v in g.values())
        for ranks in (2, 3):
            total = sum(pack(*algo.meta_gradient(params, take(ep, s)), s.stop - s.start) for s in shares(batch, ranks))
            grads, _, tasks_seen = unpack(total, whole)
            assert tasks_seen == batch
            assert max_diff(grads, whole) <= batch * ulp * scale, (dtype, ranks)


# --- one process -----------------------------------------------------------------------------------------
def test_one_process_is_the_core_bit_for_bit(tmp_path):
    """Without torchrun: the core's training as experiments/sinusoid_central.py builds it (float32), and
    the run directory: table, checkpoints, model, status."""
    cfg = Config(meta_batch_size=5, seed=2)
    got = distributed.run(cfg, options(tmp_path, torch.float32, iterations=5), Comm())
    algo = algorithms.build(cfg)
    params = algo.init(seeding.generator(cfg.seed, "init"))
    source, g = partition.full_source(cfg), seeding.generator(cfg.seed, "train")
    ref, _, curve = algo.train(params, None, lambda i: source.sample(5, cfg.shots, cfg.query_shots, g), 5)
    assert same(got, ref) and not same(got, params)
    table = pd.read_csv(tmp_path / rundir.TABLE)
    assert table["iteration"].tolist() == [1, 2, 3, 4, 5] and table["loss"].tolist() == curve
    assert (table["world_size"] == 1).all() and (table["seconds"] > 0).all()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "iteration-00000002.pt", "iteration-00000004.pt", "iteration-00000005.pt"]
    assert same(load_meta_model(tmp_path / "model.pt").params, ref)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_a_directory_holds_one_run(tmp_path, capsys):
    """Another config in a run's directory is refused (exit 2) naming the key; a bad key too; the same
    config continues (here: nothing left to do)."""
    args = ["-c", "meta-batch-size=4 seed=1", "--iterations", "2", "--out", str(tmp_path), "--log-every", "0"]
    assert command.main(args) == 0
    model = load_meta_model(tmp_path / "model.pt").params
    assert command.main([*args[:1], "meta-batch-size=4 seed=2", *args[2:]]) == 2
    assert "seed" in capsys.readouterr().err
    assert command.main(["-c", "inner-lrr=0.1", "--iterations", "1", "--out", str(tmp_path / "x")]) == 2
    assert "inner-lrr" in capsys.readouterr().err
    assert command.main(args) == 0 and same(load_meta_model(tmp_path / "model.pt").params, model)
    assert "continuing from" in capsys.readouterr().out


# --- P ranks equal one process ------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_equal_one_process(ranked, references, ranks):
    out = ranked(ranks)
    for name, (trail, losses) in references.items():
        run = out / name
        model = load_meta_model(run / "model.pt").params
        assert max_diff(model, trail[-1]) <= 1e-6, name
        assert max_diff(trail[-1], trail[0]) > 1e-3, name  # training moved the parameters
        for it in range(EVERY, ITERATIONS + 1, EVERY):
            ckpt = torch.load(rundir.checkpoint_path(run, it), weights_only=True)
            assert ckpt["iteration"] == it and max_diff(ckpt["params"], trail[it]) <= 1e-6, (name, it)
        table = pd.read_csv(run / rundir.TABLE)
        assert table["iteration"].tolist() == list(range(1, ITERATIONS + 1))
        assert (table["loss"] - pd.Series(losses)).abs().max() <= 1e-9 * max(1.0, max(map(abs, losses))), name
        assert (table["world_size"] == ranks).all()
        info = json.loads((run / "config.json").read_text())
        assert (info["world_size"], info["backend"], info["dtype"]) == (ranks, "gloo", "float64")
        assert info["config"] == Config.from_mapping(CASES[name]).to_mapping()


# --- faults ---------------------------------------------------------------------------------------------
FAULT_AT = 5  # the last checkpoint before it: iteration 4
BOUND_S = 60.0  # startup included; the collectives' timeout (120 s) is not what ends the job


def _check_failed(proc, seconds: float, run: Path, uninterrupted: Path) -> None:
    text = output(proc)
    assert proc.returncode != 0 and seconds < BOUND_S, (proc.returncode, seconds, text[-3000:])
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", text), text[-6000:]  # torchrun's summary
    assert re.search(r"rank 0 of 2 .* FAILED: (PeerLost|Stopped)", text), text[-6000:]  # the survivor says why
    newest = rundir.newest_checkpoint(run)
    assert newest is not None and newest[0] == rundir.checkpoint_path(run, FAULT_AT - 1)
    assert same(load_meta_model(newest[0]).params,
                load_meta_model(rundir.checkpoint_path(uninterrupted, FAULT_AT - 1)).params)
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


def _check_completed(proc, run: Path, uninterrupted: Path) -> None:
    assert proc.returncode == 0, output(proc)[-3000:]
    assert f"continuing from {rundir.checkpoint_path(run, FAULT_AT - 1)}" in output(proc)
    assert same(load_meta_model(run / "model.pt").params, load_meta_model(uninterrupted / "model.pt").params)
    assert pd.read_csv(run / rundir.TABLE)["iteration"].tolist() == list(range(1, ITERATIONS + 1))


def test_raising_rank_fails_the_job_and_a_rerun_continues_exactly(ranked, tmp_path):
    uninterrupted = ranked(2) / "maml"
    args = ["--standalone", "--nproc-per-node", "2", *cli_args("maml", tmp_path)]
    proc, seconds = launch(*args, fault=f"raise:1:{FAULT_AT}")
    _check_failed(proc, seconds, tmp_path, uninterrupted)
    text = output(proc)
    assert "rank 1 of 2 (local rank 1" in text and f"injected fault {distributed.FAULT_ENV}" in text
    proc, _ = launch(*args)
    _check_completed(proc, tmp_path, uninterrupted)


def test_killed_rank_fails_the_job_and_torchrun_restarts_continue_exactly(ranked, tmp_path):
    uninterrupted = ranked(2) / "maml"
    args = ["--standalone", "--nproc-per-node", "2", *cli_args("maml", tmp_path)]
    proc, seconds = launch(*args, fault=f"kill:1:{FAULT_AT}")
    _check_failed(proc, seconds, tmp_path, uninterrupted)
    assert "SIGKILL" in output(proc)
    # killed again at the same iteration in the first attempt; torchrun restarts both ranks, which continue
    proc, _ = launch("--max-restarts", "1", *args, fault=f"kill:1:{FAULT_AT}")
    resumed = f"continuing from {rundir.checkpoint_path(tmp_path, FAULT_AT - 1)}"
    assert output(proc).count(resumed) == 2 and "failed (exitcode" in output(proc), output(proc)[-6000:]
    _check_completed(proc, tmp_path, uninterrupted)


# --- two nodes ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_launchers_on_loopback_act_as_two_nodes(ranked, tmp_path):
    """torchrun's c10d rendezvous joins two launchers of one rank each: the same model as 2 ranks of one."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(distributed.FAULT_ENV, None)
    logs = [tmp_path.parent / f"{tmp_path.name}-node{node}.log" for node in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                               "--rdzv-conf", f"is_host={int(node == 0)}", *cli_args("maml", tmp_path)],
                              cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
             for node, log in enumerate(logs)]
    try:
        for p in procs:
            p.wait(timeout=180)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    assert json.loads((tmp_path / "config.json").read_text())["world_size"] == 2
    assert same(load_meta_model(tmp_path / "model.pt").params, load_meta_model(ranked(2) / "maml" / "model.pt").params)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
