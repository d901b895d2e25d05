"""`fedmeta` command: run the Flower app and detect failure, plot and show run directories.

    fedmeta run [--run-config "k=v ..."] [--federation-config "num-supernodes=N ..."] [--name NAME]
    fedmeta plot RUN_DIR
    fedmeta show RUN_DIR

`fedmeta run` checks the run config against `fedmeta.config.Config` before anything starts
(a bad key or value exits with status 2, naming the key), passes the absolute results directory
and run name to the app, starts a local SuperLink if none is running (and stops it afterwards),
runs `flwr run <app> --stream`, and exits non-zero unless the run directory says "completed"
(`flwr run` itself exits 0 even when the run failed). This module never imports Flower.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

from .config import Config, ConfigError

DEFAULT_FEDERATION = "num-supernodes=10 client-resources-num-cpus=1"
STATUS_WAIT_S = 60.0


def parse_overrides(items: list[str]) -> dict:
    """`k1=v1 k2="s"` strings (the `flwr run --run-config` syntax) -> dict, values parsed as TOML."""
    pairs = re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", " ".join(items))
    try:
        return tomllib.loads("\n".join(f'"{k}" = {v}' for k, v in pairs))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"cannot parse run config {items!r}: {err}") from err


def app_defaults(app: Path) -> dict:
    with (app / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def to_toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


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


# --- the local SuperLink ------------------------------------------------------------------------
def _port(env: str, default: str) -> str:
    return os.environ.get(env, default)


def superlink_running() -> bool:
    port = _port("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def start_superlink(bin_dir: Path) -> subprocess.Popen:
    """Start a simulation SuperLink like `flwr run` would, but owned (and stopped) by us."""
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    (home / "local-superlink").mkdir(parents=True, exist_ok=True)
    cmd = [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
           "--control-api-address", f"127.0.0.1:{_port('FLWR_LOCAL_CONTROL_API_PORT', '39093')}",
           "--host", "127.0.0.1", "--port", _port("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"),
           "--log-file", str(home / "local-superlink" / "superlink.log"),
           "--database", str(home / "local-superlink" / "state.db")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not superlink_running():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"flower-superlink did not start; see {home / 'local-superlink' / 'superlink.log'}")
        time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Stop a process group we started: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# --- commands -----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    app = Path(args.app).resolve()
    try:
        cfg, overrides = resolve(app, parse_overrides(args.run_config), args.name, args.results_dir)
    except ConfigError as err:
        print(f"fedmeta: refusing to start: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.results_dir) / cfg.run_name
    if (out / "status.json").exists():
        print(f"fedmeta: {out} already holds a finished run; choose another --name", file=sys.stderr)
        return 2
    bin_dir = Path(sys.executable).parent
    flwr = shutil.which("flwr", path=str(bin_dir)) or shutil.which("flwr")
    if flwr is None:
        print("fedmeta: the `flwr` command is not installed (pip install -e .)", file=sys.stderr)
        return 2
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    os.environ.update(env)
    link = None if superlink_running() else start_superlink(bin_dir)
    cmd = [flwr, "run", str(app), "--stream",
           "--run-config", " ".join(f"{k}={to_toml(v)}" for k, v in overrides.items()),
           "--federation-config", args.federation_config]
    print(f"fedmeta: run directory {out}\n+ {' '.join(cmd)}", flush=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "flwr.log").open("w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:  # stream to the terminal and keep a copy with the run
                sys.stdout.write(line)
                log.write(line)
            proc.wait()
        status = wait_status(out, STATUS_WAIT_S if proc.returncode == 0 else 0)
    finally:
        if link is not None and not args.keep_superlink:
            stop(link)
    if status.get("status") != "completed":
        print(f"fedmeta: run FAILED ({status.get('status')}): {status.get('error', 'see ' + str(out / 'flwr.log'))}",
              file=sys.stderr)
        return 1
    show_rounds(out)
    return 0


def wait_status(out: Path, wait: float) -> dict:
    deadline = time.monotonic() + wait
    while True:
        path = out / "status.json"
        if path.exists():
            return json.loads(path.read_text())
        if time.monotonic() > deadline:
            return {"status": "missing", "error": f"no status.json in {out}; see {out / 'flwr.log'}"}
        time.sleep(0.5)


def show_rounds(path: Path) -> None:
    from .results import load_run

    r = load_run(path)
    cols = [c for c in r.rounds.columns if r.rounds[c].notna().any()]
    print(f"\n{path}  ({r.status.get('status')})")
    print(r.rounds[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedmeta", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the Flower app (simulation) and check that it completed")
    r.add_argument("--app", default=".", help="directory of the Flower app (default: .)")
    r.add_argument("--run-config", "-c", action="append", default=[], help='"key=value ..." overrides')
    r.add_argument("--federation-config", default=DEFAULT_FEDERATION, help=f'default: "{DEFAULT_FEDERATION}"')
    r.add_argument("--name", help="run name (default: <task>-<algorithm>-<fusion>-<time>)")
    r.add_argument("--results-dir", help="parent of the run directory (default: ./results)")
    r.add_argument("--keep-superlink", action="store_true", help="leave a SuperLink we started running")
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
