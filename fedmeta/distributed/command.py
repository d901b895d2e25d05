"""The command line of distributed meta-training:

    torchrun --nproc-per-node P -m fedmeta.distributed [-c "key=value ..."] --iterations N [--out DIR]
        [--checkpoint-every K] [--dtype float32|float64] [--resume PATH] [--timeout S] [--log-every K]

`-c` takes Config overrides as `fedmeta run -c` does (kebab-case keys, TOML values). Without torchrun
it runs as one process. Exit status: 0 done; 2 refused to start (bad config, another run in the
directory, no checkpoint to resume), naming the key or file; 1 failed (the failing rank says what
and where; torchrun's summary names every failed rank).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

from ..config import Config, ConfigError, parse_run_config
from . import Comm, Refused, join, leave, run, shares
from .rundir import Options, dtype_name

DTYPES = {dtype_name(d): d for d in (torch.float32, torch.float64)}


def parse(argv: list[str]) -> tuple[Config, Options, float]:
    """(config, options, collective timeout in seconds); raises ConfigError naming the bad key."""
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node P -m fedmeta.distributed",
                                description="Central meta-training with each meta-batch's tasks split over "
                                "torch.distributed ranks (see fedmeta/distributed/__init__.py).")
    p.add_argument("--run-config", "-c", action="append", default=[],
                   help='"key=value ..." Config overrides, as `fedmeta run -c`')
    p.add_argument("--iterations", type=int, required=True, help="meta-iterations in all (a continued run's included)")
    p.add_argument("--out", type=Path, help="run directory (default: <results-dir or ./results>/<run-name or "
                   "distributed-<task>-<algorithm>-seed<seed>>); a run of the same config there is continued")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="meta-iterations between checkpoints (0: at the end only; default 100)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the model's and episodes' dtype")
    p.add_argument("--resume", default="", help="continue from this checkpoint or run directory (config resume= too)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective waits for a silent rank before failing (default 300)")
    p.add_argument("--log-every", type=int, default=100, help="meta-iterations between progress lines (0: none)")
    args = p.parse_args(argv)
    cfg = Config.from_mapping(parse_run_config(args.run_config))
    if args.iterations < 0 or args.checkpoint_every < 0 or args.log_every < 0:
        raise ConfigError("--iterations, --checkpoint-every and --log-every must be >= 0")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout = {args.timeout}: must be > 0")
    shares(cfg.meta_batch_size, int(os.environ.get("WORLD_SIZE", "1")))  # every rank gets a task
    out = args.out or Path(cfg.results_dir or "results") / (
        cfg.run_name or f"distributed-{cfg.task}-{cfg.algorithm}-seed{cfg.seed}")
    opts = Options(args.iterations, out.expanduser().resolve(), DTYPES[args.dtype], args.checkpoint_every,
                   args.resume, args.log_every, ("torchrun", "-m", "fedmeta.distributed", *argv))
    return cfg, opts, args.timeout


class Stopped(RuntimeError):
    """SIGTERM: torchrun stops every rank when one fails (or the user stopped the job)."""


def _stop(signum: int, frame: object) -> None:
    raise Stopped(f"stopped by {signal.Signals(signum).name} (torchrun stops every rank when one fails)")


def _main(argv: list[str]) -> int:
    env = {k: int(os.environ.get(k, d)) for k, d in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))}
    comm = Comm(env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"])
    # an exception instead of a silent death, so that rank 0 records the failure in status.json
    signal.signal(signal.SIGTERM, _stop)
    try:
        cfg, opts, timeout = parse(argv)
        torch.set_num_threads(cfg.threads)
        comm = join(cfg, timeout)
        run(cfg, opts, comm)  # writes status.json "failed" itself once the directory is this run's
    except (Refused, ConfigError) as err:
        print(f"fedmeta.distributed: {comm.where}: refusing to start: {err}", file=sys.stderr, flush=True)
        return 2
    except BaseException as err:
        print(f"fedmeta.distributed: {comm.where} FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    leave()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command. torchrun's `record` writes a failing rank's traceback to the file the launcher
    reports in its summary."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_main)(sys.argv[1:] if argv is None else argv)
