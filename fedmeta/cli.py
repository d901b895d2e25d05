"""`fedmeta` command: run the Flower app and detect failure, plot and show run directories.

    fedmeta run [--run-config "k=v ..."] [--federation-config "num-supernodes=N ..."] [--name NAME]
    fedmeta plot RUN_DIR
    fedmeta show RUN_DIR

`fedmeta run` checks the run config against `fedmeta.config.Config` before anything starts
(a bad key or value exits with status 2, naming the key), refuses a run directory that already
holds a run, passes the absolute results directory and run name to the app, starts a local
SuperLink if none is running (and stops it afterwards), runs `flwr run <app> --stream`, shows a
live progress line on a terminal, and exits with the status the run directory records
(`flwr run` itself exits 0 even when the run failed). Ctrl-C / SIGTERM stop everything it
started (`fedmeta.runner`). This module never imports Flower.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from deploy.processes import interrupts

from .appdir import lean_copy
from .config import Config, ConfigError, app_defaults, parse_run_config, run_config_string
from .progress import output_for
from .runner import LocalRun

DEFAULT_FEDERATION = "num-supernodes=10 client-resources-num-cpus=1"


def resolve(app: Path, overrides: dict, name: str | None, results: str | None) -> tuple[Config, dict]:
    """The validated config of the run and the overrides to pass to `flwr run`."""
    merged = {**app_defaults(app), **overrides}
    cfg = Config.from_mapping(merged)  # raises ConfigError naming the key
    base = Path(results or cfg.results_dir or Path.cwd() / "results").resolve()
    run_name = name or cfg.run_name or f"{cfg.task}-{cfg.algorithm}-{cfg.fusion}-{time.strftime('%Y%m%d-%H%M%S')}"
    extra = {"results-dir": str(base), "run-name": run_name}
    if cfg.task == "omniglot":  # the app does not run in this directory: pass absolute paths
        extra["data-dir"] = str(Path(cfg.data_dir).expanduser().resolve())
    if cfg.resume:
        extra["resume"] = str(Path(cfg.resume).expanduser().resolve())
    cfg = cfg.replace(**{k.replace("-", "_"): v for k, v in extra.items()})
    return cfg, {**overrides, **extra}


# --- run directories and exit status -------------------------------------------------------------
RUN_FILES = ("config.json", "rounds.csv", "clients.csv", "status.json", "model.pt", "checkpoints", "flwr.log")
EXIT_COMPLETED, EXIT_FAILED, EXIT_REFUSED, EXIT_WITH_FAILURES = 0, 1, 2, 3
EXIT_STATUS = """exit status: 0 completed; 3 completed with failures (rounds where sampled clients failed or
were rejected; counts in status.json); 1 failed (status.json says "failed", or the run left none); 2 refused
at start-up (bad config, or a run directory that already holds a run); 130 / 143 interrupted by SIGINT
(Ctrl-C) / SIGTERM, after stopping the SuperLink, the ServerApp and the Ray processes it started."""


def existing_run(out: Path) -> list[str]:
    """The files of an earlier run (finished or not) in `out`; such a directory is never reused."""
    return [name for name in RUN_FILES if (out / name).exists()]


def existing_run_message(out: Path) -> str | None:
    """Why `out` must not take a new run, naming --name and the resume key; None if it may."""
    found = existing_run(out)
    if not found:
        return None
    return (f"{out} already holds a run ({', '.join(found)}); a run directory is never appended to or "
            f"overwritten. Choose another --name, or continue that run into a new directory: "
            f"--name NEW -c \"resume='{out / 'checkpoints'}'\"")


def exit_code(status: dict) -> int:
    """0 completed, 3 completed-with-failures, 1 anything else (failed, missing, unknown)."""
    codes = {"completed": EXIT_COMPLETED, "completed-with-failures": EXIT_WITH_FAILURES}
    return codes.get(status.get("status"), EXIT_FAILED)


def finish(status: dict, out: Path, prog: str = "fedmeta") -> int:
    """Report the run's status (and its rounds unless it failed); return the exit status."""
    code = exit_code(status)
    if code == EXIT_FAILED:
        print(f"{prog}: run FAILED ({status.get('status')}): {status.get('error', 'see ' + str(out / 'flwr.log'))}",
              file=sys.stderr)
        return code
    show_rounds(out)
    if code == EXIT_WITH_FAILURES:
        details = {k: v for k, v in status.items() if k not in ("status", "traceback")}
        print(f"{prog}: run completed WITH FAILURES: {json.dumps(details)}", file=sys.stderr)
    return code


# --- commands -----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    app = Path(args.app).resolve()
    try:
        cfg, overrides = resolve(app, parse_run_config(args.run_config), args.name, args.results_dir)
    except ConfigError as err:
        print(f"fedmeta: refusing to start: {err}", file=sys.stderr)
        return EXIT_REFUSED
    out = Path(cfg.results_dir) / cfg.run_name
    if message := existing_run_message(out):
        print(f"fedmeta: refusing to start: {message}", file=sys.stderr)
        return EXIT_REFUSED
    bin_dir = Path(sys.executable).parent
    flwr = shutil.which("flwr", path=str(bin_dir)) or shutil.which("flwr")
    if flwr is None:
        print("fedmeta: the `flwr` command is not installed (pip install -e .)", file=sys.stderr)
        return EXIT_REFUSED
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [flwr, "run", str(app), "--stream",
           "--run-config", run_config_string(overrides),
           "--federation-config", args.federation_config]
    print(f"fedmeta: run directory {out}\n+ {' '.join(cmd)}", flush=True)
    output = output_for(sys.stdout, args.progress)
    with lean_copy(app, skip=[Path(cfg.results_dir)]) as copy:  # Flower builds the FAB from it (see appdir)
        cmd[2] = str(copy)
        local = LocalRun(app, out, cmd, env, output, bin_dir, args.keep_superlink)
        try:
            try:
                with interrupts(), local:
                    status = local.run()
            finally:
                output.close()  # the live line ends before anything else is printed
        except KeyboardInterrupt as err:  # LocalRun stopped everything and recorded the interrupt in status.json
            name = str(err) or "SIGINT"
            print(f"fedmeta: interrupted ({name}); {local.stopped()}", file=sys.stderr)
            return 128 + getattr(signal.Signals, name, signal.SIGINT)
        except RuntimeError as err:  # the SuperLink did not start
            print(f"fedmeta: run FAILED: {err}", file=sys.stderr)
            return EXIT_FAILED
    return finish(status, out)


def show_rounds(path: Path) -> None:
    from .results import load_run

    r = load_run(path)
    cols = [c for c in r.rounds.columns if r.rounds[c].notna().any()]
    print(f"\n{path}  ({r.status.get('status')})")
    print(r.rounds[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedmeta", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the Flower app (simulation) and check that it completed",
                       description="Run the Flower app on the Simulation Engine and report how the run ended.",
                       epilog=EXIT_STATUS)
    r.add_argument("--app", default=".", help="directory of the Flower app (default: .)")
    r.add_argument("--run-config", "-c", action="append", default=[], help='"key=value ..." overrides')
    r.add_argument("--federation-config", default=DEFAULT_FEDERATION, help=f'default: "{DEFAULT_FEDERATION}"')
    r.add_argument("--name", help="run name (default: <task>-<algorithm>-<fusion>-<time>)")
    r.add_argument("--results-dir", help="parent of the run directory (default: ./results)")
    r.add_argument("--keep-superlink", action="store_true", help="leave a SuperLink we started running")
    r.add_argument("--progress", choices=["auto", "live", "plain"], default="auto",
                   help="auto (default): a live progress line when stdout is a terminal, plain log lines otherwise")
    pl = sub.add_parser("plot", help="write loss/accuracy PNGs into a run directory")
    pl.add_argument("run_dir")
    sh = sub.add_parser("show", help="print a run's rounds table")
    sh.add_argument("run_dir")
    args = p.parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "plot":
        from .results import plot_run

        for path in plot_run(args.run_dir):
            print(path)
        return 0
    show_rounds(Path(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
