"""The ServerApp: run config -> validated `Config` -> FedMeta strategy -> run directory.

A bad key or value refuses the run at start-up (the error names the key), as do `device = "cuda"`
on a machine without CUDA and a run directory that already holds a run. The run directory is
`<results-dir>/<run-name>`; `results-dir` must be absolute when the app runs under a SuperLink (the
`fedmeta run` command passes the caller's `./results`). `status.json` ends every run: "completed",
"completed-with-failures" (with counts) or "failed" (with the error; also on SIGTERM).
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from contextlib import contextmanager
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedmeta import algorithms, devices, partition, seeding
from fedmeta.config import Config
from fedmeta.optim import Params
from fedmeta.results import CheckpointError, RunWriter, latest_checkpoint, load_checkpoint

from .controls import NoControls, build_controls
from .fedmeta_strategy import ClientStates, FedMeta
from .fusion import Fusion, build_fusion
from .linkstate_index import installed as linkstate_index

app = ServerApp()


def run_dir(cfg: Config) -> Path:
    base = Path(cfg.results_dir) if cfg.results_dir else Path.cwd() / "results"
    name = cfg.run_name or f"{cfg.task}-{cfg.algorithm}-{cfg.fusion}-{time.strftime('%Y%m%d-%H%M%S')}"
    return base / name


def server_evaluator(cfg: Config):
    """Evaluation of the global meta-model on fresh tasks of the whole family (if enabled), on the CPU."""
    if cfg.server_eval_tasks <= 0:
        return None
    cpu = cfg.replace(device="cpu")
    algo = algorithms.build(cpu)
    ep = partition.eval_source(cpu).sample(cfg.server_eval_tasks, cfg.eval_shots, cfg.eval_query,
                                           seeding.generator(cfg.seed, "server-eval"))

    def evaluate(params):
        ev = algorithms.evaluate(algo, params, ep, cfg.eval_steps, seeding.generator(cfg.seed, "server-eval", "starts"))
        return {"server_loss_pre": ev.mean(0), "server_loss_post": ev.mean(cfg.eval_steps)}

    return evaluate


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, Config.from_mapping(context.run_config))  # refuses unknown keys and bad values


def server_app(cfg: Config) -> ServerApp:
    """A ServerApp bound to `cfg` (for `flwr.simulation.run_simulation` and tests)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, cfg)

    return bound


def resume_state(cfg: Config, init: Params, fusion: Fusion, clients: ClientStates,
                 controls: NoControls | None = None) -> tuple[Params, int]:
    """The global model and first round of a resumed run; restores the fusion's and the clients' state (and
    the control variates of drift-correction; a checkpoint without them resumes with none kept).
    A directory resumes from its newest checkpoint that loads; skipped ones are logged with the reason."""
    path, skipped = latest_checkpoint(cfg.resume)
    for reason in skipped:
        log(WARNING, "resume: skipped %s", reason)
    ckpt = load_checkpoint(path)
    params = ckpt["params"]
    wrong = [k for k in init if k not in params or params[k].shape != init[k].shape or params[k].dtype != init[k].dtype]
    if wrong or set(params) != set(init):
        raise CheckpointError(f"{path}: does not fit this run's model ({cfg.task}/{cfg.algorithm}): parameters "
                              f"{sorted(set(params) ^ set(init)) or wrong} differ")
    try:
        fusion.load_state_dict(ckpt["fusion"])
        clients.load_state_dict(ckpt["clients"])
        if controls is not None:
            controls.load_state_dict(ckpt.get("controls"))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: its fusion state does not fit this run's fusion settings: {err}") from err
    log(INFO, "resuming from %s (round %d)%s", path, ckpt["round"], f", newer ones skipped: {len(skipped)}"
        if skipped else "")
    return params, int(ckpt["round"]) + 1


@contextmanager
def failing_on_sigterm():
    """SIGTERM (`flwr stop`, a kill) raises inside the run, so that status.json says "failed"."""
    if threading.current_thread() is not threading.main_thread():  # run_simulation runs us in a thread
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(grid: Grid, cfg: Config) -> None:
    """Run the federation described by `cfg` on `grid`, writing the run directory."""
    torch.set_num_threads(cfg.threads)
    devices.resolve(cfg.device)  # device = "cuda" without CUDA: refused before anything starts
    out = run_dir(cfg)
    writer = RunWriter(out, cfg)  # refuses a directory that already holds a run
    log(INFO, "fedmeta run directory: %s", out)
    log(INFO, "config: %s", cfg.to_mapping())
    with failing_on_sigterm(), linkstate_index(cfg.linkstate_index):
        try:
            fusion, clients, controls = build_fusion(cfg), ClientStates(), build_controls(cfg)
            params = algorithms.build(cfg.replace(device="cpu")).init(seeding.generator(cfg.seed, "init"))
            first_round = 1
            if cfg.resume:
                params, first_round = resume_state(cfg, params, fusion, clients, controls)
            strategy = FedMeta(cfg, fusion, writer, server_evaluator(cfg), clients, controls=controls)
            final = strategy.start(grid, params, first_round)
            writer.save_model(final, cfg.num_rounds)
            status, info = strategy.outcome() if first_round <= cfg.num_rounds else ("completed", {})
            writer.finish(status, rounds=cfg.num_rounds, first_round=first_round, **info)
            log(INFO if status == "completed" else WARNING, "fedmeta run %s: %s", status, info)
        except BaseException as err:
            log(ERROR, "fedmeta run failed: %s", err)
            writer.finish("failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
            raise
