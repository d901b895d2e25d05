"""Run a real Flower federation from a `Config`, the one description of the run.

`run` serialises the keys of the config that differ from the app's defaults (`[tool.flwr.app.config]` of
the app's pyproject.toml) into the `-c` string of `fedmeta run`, starts it as a subprocess (so this module
never imports Flower; the federation runs on the Simulation Engine exactly as from the command line), and
returns the finished run directory, or raises with the end of its log. The config a script evaluates with
and the config the federation ran with are therefore the same object.

Exit statuses of `fedmeta run`: 0 completed, 3 completed with failures (some client replies failed or were
rejected; accepted and reported in `Federation.status`), 1 failed, 2 refused to start (a bad config).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmeta import config
from fedmeta.config import Config

from .args import REPO

APP = REPO  # the Flower app: the directory whose pyproject.toml declares [tool.flwr.app]
NOT_RUN_CONFIG = ("results_dir", "run_name")  # given to `fedmeta run` as --results-dir / --name
COMPLETED, COMPLETED_WITH_FAILURES, FAILED, REFUSED = 0, 3, 1, 2


class FederationError(RuntimeError):
    """A federation did not complete (or was refused); the message ends with its log's last lines."""


def app_defaults(app: Path = APP) -> Config:
    """The config a run gets with no overrides: the app's `[tool.flwr.app.config]`."""
    return Config.from_mapping(config.app_defaults(app))


def app_config(app: Path = APP, **changes: Any) -> Config:
    """The app's defaults with `changes` (snake_case Config fields): what a run with those overrides uses."""
    return app_defaults(app).replace(**changes)


def overrides(cfg: Config, app: Path = APP) -> dict[str, Any]:
    """The kebab-case keys of `cfg` whose values differ from the app's defaults (the run's overrides)."""
    defaults = app_defaults(app).to_mapping()
    skip = {f.replace("_", "-") for f in NOT_RUN_CONFIG}
    return {k: v for k, v in cfg.to_mapping().items() if k not in skip and v != defaults[k]}


def run_config(cfg: Config, app: Path = APP) -> str:
    """The `-c` string of `fedmeta run` that gives `cfg`: `key=value` pairs, values in TOML."""
    return config.run_config_string(overrides(cfg, app))


def federation_config(num_supernodes: int, cpus_per_client: int = 1) -> str:
    """The simulation's size for `--federation-config`."""
    return f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"


@dataclass(frozen=True)
class Federation:
    """A finished federation: where it is, how it ended, how it was started."""

    name: str
    run_dir: Path
    status: dict  # status.json: {"status": "completed", ...}
    exit_code: int  # 0 completed, 3 completed with failures
    wall_seconds: float
    run_config: str  # the -c string
    federation_config: str
    command: list[str]

    def load(self):
        """The run's tables (`fedmeta.load_run`): .config, .rounds, .clients."""
        from fedmeta.results import load_run

        return load_run(self.run_dir)

    def model(self):
        """The final global meta-model (`fedmeta.load_meta_model`)."""
        from fedmeta.results import load_meta_model

        return load_meta_model(self.run_dir / "model.pt")

    def record(self) -> dict:
        """JSON-ready facts for a summary."""
        return {"overrides": self.run_config, "federation": self.federation_config,
                "wall_seconds": self.wall_seconds, "status": self.status.get("status"), "exit_code": self.exit_code}


def run(cfg: Config, *, name: str, results_dir: str | Path, num_supernodes: int, app: Path = APP,
        replace: bool = False, stream: bool = False, timeout: float | None = None) -> Federation:
    """Run `cfg` as a Flower simulation of `num_supernodes` virtual clients (`fedmeta run`), into
    `results_dir/name`. `replace`: delete an earlier run of that name first (otherwise `fedmeta run` refuses
    to overwrite it). `stream`: show the run's output (it is always kept in the run's flwr.log)."""
    results_dir = Path(results_dir).resolve()
    run_dir = results_dir / name
    if replace:
        shutil.rmtree(run_dir, ignore_errors=True)
    cfg_string, fed = run_config(cfg, app), federation_config(num_supernodes)
    cmd = [*_fedmeta(), "run", "--app", str(Path(app).resolve()), "--name", name, "--results-dir", str(results_dir),
           "-c", cfg_string, "--federation-config", fed]
    print("+ fedmeta run --name", name, "-c", repr(cfg_string), "--federation-config", repr(fed), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=app, stdout=None if stream else subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if stream:
        sys.stderr.write(proc.stderr)
    status = _status(run_dir)
    if proc.returncode == REFUSED:  # nothing ran; a log in run_dir would be an earlier run's
        raise FederationError(f"federation {name!r} refused to start (fedmeta run exit status {REFUSED}):\n"
                              f"{proc.stderr.strip()}\ncommand: {shlex.join(cmd)}")
    if proc.returncode not in (COMPLETED, COMPLETED_WITH_FAILURES):
        raise FederationError(f"federation {name!r} did not complete (fedmeta run exit status {proc.returncode}, "
                              f"status {status.get('status')!r}: {status.get('error', '')})\n{proc.stderr.strip()}\n"
                              f"command: {shlex.join(cmd)}\n"
                              f"--- last lines of {run_dir / 'flwr.log'} ---\n{_tail(run_dir / 'flwr.log')}")
    return Federation(name, run_dir, status, proc.returncode, wall, cfg_string, fed, cmd)


def _fedmeta() -> list[str]:
    """The `fedmeta` command of this interpreter's environment."""
    exe = Path(sys.executable).parent / "fedmeta"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fedmeta.cli"]


def _status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {"status": "missing"}


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


__all__ = ["APP", "Federation", "FederationError", "app_config", "app_defaults", "federation_config",
           "overrides", "run", "run_config"]
