"""The ServerApp: run config -> validated `Config` -> FedMeta strategy -> run directory.

A bad key or value refuses the run at start-up (the error names the key). The run directory is
`<results-dir>/<run-name>`; `results-dir` must be absolute when the app runs under a SuperLink
(the `fedmeta run` command passes the caller's `./results`).
"""

from __future__ import annotations

import time
import traceback
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedmeta import algorithms, partition, seeding
from fedmeta.config import Config
from fedmeta.results import RunWriter, latest_checkpoint, load_checkpoint
from fedmeta.tasks import Episode

from .fedmeta_strategy import FedMeta
from .fusion import server_optimizer

app = ServerApp()


def run_dir(cfg: Config) -> Path:
    base = Path(cfg.results_dir) if cfg.results_dir else Path.cwd() / "results"
    name = cfg.run_name or f"{cfg.task}-{cfg.algorithm}-{cfg.fusion}-{time.strftime('%Y%m%d-%H%M%S')}"
    return base / name


def server_evaluator(cfg: Config):
    """Evaluation of the global meta-model on fresh tasks of the whole family (if enabled)."""
    if cfg.server_eval_tasks <= 0:
        return None
    algo = algorithms.build(cfg)
    ep: Episode = partition.eval_source(cfg).sample(cfg.server_eval_tasks, cfg.eval_shots, cfg.eval_query,
                                                    seeding.generator(cfg.seed, "server-eval"))

    def evaluate(params):
        ev = algorithms.evaluate(algo, params, ep, cfg.eval_steps, seeding.generator(cfg.seed, "server-eval", 1))
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


def serve(grid: Grid, cfg: Config) -> None:
    """Run the federation described by `cfg` on `grid`, writing the run directory."""
    torch.set_num_threads(cfg.threads)
    seeding.seed_everything(cfg.seed)
    out = run_dir(cfg)
    writer = RunWriter(out, cfg)
    log(INFO, "fedmeta run directory: %s", out)
    log(INFO, "config: %s", cfg.to_mapping())
    try:
        optimizer = server_optimizer(cfg.fusion, cfg.server_lr)
        first_round = 1
        if cfg.resume:
            ckpt_path = Path(cfg.resume)
            ckpt = load_checkpoint(latest_checkpoint(ckpt_path) if ckpt_path.is_dir() else ckpt_path)
            params, first_round = ckpt["params"], ckpt["round"] + 1
            optimizer.load_state_dict(ckpt["server_state"]["optimizer"])
            log(INFO, "resuming from %s at round %d", cfg.resume, first_round)
        else:
            params = algorithms.build(cfg).init(seeding.generator(cfg.seed, "init"))
        strategy = FedMeta(cfg, optimizer, writer, server_evaluator(cfg), first_round)
        result = strategy.start(grid, ArrayRecord(params), num_rounds=cfg.num_rounds, timeout=cfg.round_timeout,
                                train_config=ConfigRecord(cfg.to_mapping()),
                                evaluate_config=ConfigRecord(cfg.to_mapping()))
        final = result.arrays.to_torch_state_dict() if result.arrays is not None else params
        writer.save_model(dict(final), cfg.num_rounds)
        writer.finish("completed", rounds=cfg.num_rounds)
    except BaseException as err:
        log(ERROR, "fedmeta run failed: %s", err)
        writer.finish("failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        raise
