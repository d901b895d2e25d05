"""A run directory, written as the rounds go and read back into pandas.

    <run>/config.json            resolved config, versions, seed
    <run>/rounds.csv             one row per server round (ROUND_COLUMNS)
    <run>/clients.csv            one row per (round, client, phase) (CLIENT_COLUMNS)
    <run>/model.pt               the final global meta-model (`load_meta_model`)
    <run>/checkpoints/round-NNNN.pt   everything the next round depends on (`load_checkpoint`)
    <run>/status.json            {"status": "completed" | "completed-with-failures" | "failed", ...}, last

A run directory holds one run: `RunWriter` refuses a directory that holds any earlier run, finished
or not (`RunExistsError`). Rows are appended as whole lines with one `write` per round and
checkpoints are written atomically (temporary file + rename), so a crash leaves every finished
round readable (a line cut by a crash mid-write is dropped by `load_run`, which says so) and the
last good checkpoint loadable; `latest_checkpoint` skips unreadable ones, naming them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .config import Config
from .optim import Params

ROUND_COLUMNS = ["round", "num_sampled", "num_replies", "num_rejected", "num_failures", "num_ignored", "fused",
                 "update_norm", "clipped", "train_loss", "eval_loss_pre", "eval_loss_post", "eval_accuracy_pre",
                 "eval_accuracy_post", "server_loss_pre", "server_loss_post", "seconds"]
CLIENT_COLUMNS = ["round", "node_id", "partition_id", "phase", "status", "reason", "weight", "num_tasks",
                  "loss", "loss_pre", "loss_post", "accuracy_pre", "accuracy_post", "seconds"]
_INTS = ("round", "num_sampled", "num_replies", "num_rejected", "num_failures")
ROUND_DTYPES = {**{c: "float64" for c in ROUND_COLUMNS}, **dict.fromkeys(_INTS, "int64"),
                "num_ignored": "Int64", "fused": "Int64", "clipped": "Int64"}
CLIENT_DTYPES = {"round": "int64", "node_id": "UInt64", "partition_id": "Int64", "phase": "category",
                 "status": "category", "reason": "string", "weight": "float64", "num_tasks": "Int64",
                 **{c: "float64" for c in CLIENT_COLUMNS[8:]}}
MODEL_FORMAT = "fedmeta-meta-model/1"
CHECKPOINT_FORMAT = "fedmeta-checkpoint/2"
OLD_CHECKPOINT_FORMATS = ("fedmeta-checkpoint/1",)  # params readable by load_meta_model; not resumable
RUN_MARKERS = ("config.json", "rounds.csv", "clients.csv", "status.json", "model.pt", "checkpoints")
STATUSES = ("completed", "completed-with-failures", "failed")


class RunExistsError(FileExistsError):
    """The run directory already holds a run; runs are never appended to or overwritten."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the run; the message names the file."""


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "pandas": pd.__version__}
    for pkg in ("flwr", "fedmeta"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same directory, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def held_run(run_dir: str | Path) -> list[str]:
    """What in `run_dir` shows that it already holds a run (empty: free to use)."""
    return [m for m in RUN_MARKERS if (Path(run_dir) / m).exists()]


class RunWriter:
    """Creates a run directory (refusing one that holds a run) and appends rows, checkpoints, the model."""

    def __init__(self, run_dir: str | Path, cfg: Config, extra: dict[str, Any] | None = None) -> None:
        self.dir = Path(run_dir)
        held = held_run(self.dir)
        if held:
            raise RunExistsError(
                f"{self.dir} already holds a run ({', '.join(held)}); a run directory is never appended to or "
                f"overwritten: choose another run name (`fedmeta run --name`, or run-name), or continue that run "
                f"in a new directory with resume='{self.dir}'")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        info = {"config": cfg.to_mapping(), "seed": cfg.seed, "versions": versions(), **(extra or {})}
        atomic_write(self.dir / "config.json", lambda f: f.write(json.dumps(info, indent=2).encode()))

    def _append(self, name: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
        """All rows as whole lines in one write (O_APPEND): a crash cuts at most the last line."""
        path = self.dir / name
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise", lineterminator="\n")
        if not path.exists():
            w.writeheader()
        for row in rows:
            w.writerow({c: _cell(row.get(c)) for c in columns})
        data = buf.getvalue().encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def append_round(self, row: dict[str, Any]) -> None:
        self._append("rounds.csv", ROUND_COLUMNS, [row])

    def append_clients(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._append("clients.csv", CLIENT_COLUMNS, rows)

    def save_checkpoint(self, server_round: int, params: Params, fusion: dict[str, Any],
                        clients: dict[int, dict[str, Any]], controls: dict[str, Any] | None = None) -> Path:
        """Everything round `server_round + 1` depends on: the global meta-parameters, the fusion's state
        (server optimizer, norm-guard history), each partition's kept local optimizer state and, with
        drift-correction, each partition's control variate."""
        path = self.dir / "checkpoints" / f"round-{server_round:04d}.pt"
        payload = {"format": CHECKPOINT_FORMAT, "round": server_round, "params": _cpu(params), "fusion": fusion,
                   "clients": clients, "config": self.cfg.to_mapping()}
        if controls is not None:
            payload["controls"] = controls
        atomic_write(path, lambda f: torch.save(payload, f))
        return path

    def save_model(self, params: Params, server_round: int) -> Path:
        return save_meta_model(self.dir / "model.pt", params, self.cfg, server_round)

    def finish(self, status: str, **info: Any) -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        body = json.dumps({"status": status, **info}, indent=2, default=str).encode()
        atomic_write(self.dir / "status.json", lambda f: f.write(body))


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return " | ".join(value.splitlines())  # one row, one line
    return value


def _cpu(params: Params) -> Params:
    return {k: v.detach().cpu().clone() for k, v in params.items()}


# --- meta-models and checkpoints --------------------------------------------------------------
def save_meta_model(path: str | Path, params: Params, cfg: Config, server_round: int | None = None) -> Path:
    path = Path(path)
    payload = {"format": MODEL_FORMAT, "config": cfg.to_mapping(), "round": server_round, "params": _cpu(params)}
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


@dataclass(frozen=True)
class MetaModel:
    config: Config
    params: Params  # all meta-parameters (model init, learned rates "alpha/...", LSTM "lstm/...")
    module: nn.Module  # the model, its parameters set to the learned initialisation (if any)
    round: int | None

    def algorithm(self):
        """The algorithm object (adapt with `fedmeta.algorithms.evaluate(algo, params, episode, k)`)."""
        from . import algorithms

        return algorithms.build(self.config, self.module)

    def adapt(self, x, y, steps: int | None = None, **kwargs):
        """Adapt to one task's support set (x, y) with the model's own inner rule; a `fedmeta.use.Learner`
        whose `predict(xq)` gives labels or values (`fedmeta.use.adapt`)."""
        from .use import adapt

        return adapt(self, x, y, steps, **kwargs)


def load_meta_model(path: str | Path) -> MetaModel:
    """Load a `model.pt` (or a checkpoint): the config, the meta-parameters and the nn.Module."""
    from . import models

    payload = _load(path, (MODEL_FORMAT, CHECKPOINT_FORMAT, *OLD_CHECKPOINT_FORMATS))
    cfg = Config.from_mapping(payload["config"])
    module = models.build(models.model_name(cfg), cfg)
    own = {k: v for k, v in payload["params"].items() if "/" not in k}
    if own:
        module.load_state_dict(own, strict=True)
    return MetaModel(cfg, payload["params"], module, payload.get("round"))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A resumable checkpoint; a missing, truncated or foreign file raises, naming it."""
    payload = _load(path, (CHECKPOINT_FORMAT,))
    missing = [k for k in ("round", "params", "fusion", "clients", "config") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: not a complete fedmeta checkpoint (lacks {missing})")
    return payload


def checkpoint_files(path: str | Path) -> list[Path]:
    """The checkpoints of a run directory or of its checkpoints/ directory, oldest first."""
    path = Path(path)
    folder = path if path.name == "checkpoints" or not (path / "checkpoints").is_dir() else path / "checkpoints"
    return sorted(folder.glob("round-*.pt"))


def latest_checkpoint(path: str | Path) -> tuple[Path, list[str]]:
    """The newest checkpoint that loads, for a checkpoint file, a run directory or its checkpoints/
    directory; also the reasons newer ones were skipped (e.g. truncated by a crash)."""
    path = Path(path)
    if path.is_file():
        load_checkpoint(path)
        return path, []
    if not path.is_dir():
        raise FileNotFoundError(f"resume: {path} is neither a checkpoint file nor a run directory")
    skipped = []
    for candidate in reversed(checkpoint_files(path)):
        try:
            load_checkpoint(candidate)
            return candidate, skipped
        except (CheckpointError, FileNotFoundError) as err:
            skipped.append(str(err))
    raise CheckpointError(f"resume: no loadable checkpoint in {path}" + (f" (skipped: {'; '.join(skipped)})"
                                                                        if skipped else " (none found)"))


def _load(path: str | Path, formats: tuple[str, ...]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fedmeta model or checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files fail in many ways (EOF, zip, pickle errors)
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err}); the file may be truncated "
                              "or not a fedmeta file") from err
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a fedmeta file of format {formats} (found {found!r})")
    return payload


# --- reading runs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    path: Path | None
    config: dict[str, Any]
    rounds: pd.DataFrame
    clients: pd.DataFrame
    status: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when the run ended (status.json written: completed, with failures, or failed)."""
        return self.status.get("status") in STATUSES


def _read_csv(path: Path, columns: list[str], dtypes: dict[str, str], notes: list[str]) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in columns})
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # the writer died inside a line: drop it, say so
        keep = data.rfind(b"\n") + 1
        line = data[:keep].count(b"\n") + 1
        notes.append(f"{path}: line {line} was cut mid-write (the run was killed "
                     "while writing it) and is ignored")
        warnings.warn(notes[-1], stacklevel=3)
        data = data[:keep]
    frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False) if data else pd.DataFrame()
    out = {}
    for c in columns:
        col = frame[c] if c in frame else pd.Series([""] * len(frame), dtype=str)
        out[c] = _column(path, c, col, dtypes[c])
    return pd.DataFrame(out)


def _column(path: Path, name: str, col: pd.Series, kind: str):
    def number(i: int, v: str, cast):
        try:
            return cast(v)
        except ValueError:
            raise ValueError(f"{path}: line {i + 2}, column {name!r}: {v!r} is not a number") from None

    if kind == "float64":
        return np.array([number(i, v, float) if v != "" else np.nan for i, v in enumerate(col)], dtype=np.float64)
    if kind in ("int64", "Int64", "UInt64"):
        values = [None if v == "" else number(i, v, int) for i, v in enumerate(col)]
        if kind == "int64" and None in values:
            raise ValueError(f"{path}: line {values.index(None) + 2}, column {name!r} is empty")
        return pd.array(values, dtype="Int64" if kind == "int64" else kind).astype(
            "int64" if kind == "int64" else kind)
    if kind == "category":
        return col.astype("category")
    return col.astype("string")


def load_run(path: str | Path) -> Run:
    """Read a run directory: `.config` (dict), `.rounds`, `.clients` (typed DataFrames), `.status`
    (`{"status": "incomplete"}` while running or after a kill), `.complete`, `.warnings`."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a fedmeta run directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    status_file = path / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {"status": "incomplete"}
    notes: list[str] = []
    rounds = _read_csv(path / "rounds.csv", ROUND_COLUMNS, ROUND_DTYPES, notes)
    clients = _read_csv(path / "clients.csv", CLIENT_COLUMNS, CLIENT_DTYPES, notes)
    return Run(path, config, rounds, clients, status, notes)


def load_runs(paths: list[str | Path], names: list[str] | None = None) -> Run:
    """Concatenate runs; each frame gains a leading `run` column (the directory name by default)."""
    runs = [load_run(p) for p in paths]
    names = names or [r.path.name for r in runs]
    if len(names) != len(runs):
        raise ValueError("give one name per run")

    def cat(frames: list[pd.DataFrame]) -> pd.DataFrame:
        tagged = [f.assign(run=n)[["run", *f.columns]] for f, n in zip(frames, names)]
        out = pd.concat(tagged, ignore_index=True)
        out["run"] = out["run"].astype("category")
        for c in ("phase", "status"):
            if c in out:
                out[c] = out[c].astype("category")
        return out

    return Run(None, {n: r.config for n, r in zip(names, runs)}, cat([r.rounds for r in runs]),
               cat([r.clients for r in runs]), {n: r.status for n, r in zip(names, runs)},
               [w for r in runs for w in r.warnings])


def plot_run(path: str | Path) -> list[Path]:
    """Write PNG plots of held-out loss/accuracy (pre and post adaptation) vs round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = load_run(path)
    r = run.rounds
    written = []
    panels = [("loss", ["eval_loss_pre", "eval_loss_post", "server_loss_pre", "server_loss_post", "train_loss"]),
              ("accuracy", ["eval_accuracy_pre", "eval_accuracy_post"])]
    for name, cols in panels:
        cols = [c for c in cols if c in r and r[c].notna().any()]
        if not cols:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in cols:
            d = r[["round", c]].dropna()
            ax.plot(d["round"], d[c], marker="o", label=c)
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        if name == "loss" and (r[cols] > 0).all().all():
            ax.set_yscale("log")
        ax.set_title(f"{Path(path).name}: {name}")
        ax.legend()
        fig.tight_layout()
        out = Path(path) / f"{name}.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)
    return written
