"""A run directory, written as the rounds go and read back into pandas.

    <run>/config.json            resolved config, versions, seed
    <run>/rounds.csv             one row per server round (ROUND_COLUMNS)
    <run>/clients.csv            one row per (round, client, phase) (CLIENT_COLUMNS)
    <run>/model.pt               the final global meta-model (`load_meta_model`)
    <run>/checkpoints/round-NNNN.pt   meta-model + server optimizer + round + RNG states
    <run>/status.json            {"status": "completed" | "failed", ...}, written last

Rows are appended (and flushed) round by round and checkpoints are written atomically
(temporary file + rename), so a crash leaves every finished round readable and the last good
checkpoint loadable.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .config import Config
from .optim import Params

ROUND_COLUMNS = ["round", "num_sampled", "num_replies", "num_rejected", "num_failures", "train_loss",
                 "eval_loss_pre", "eval_loss_post", "eval_accuracy_pre", "eval_accuracy_post",
                 "server_loss_pre", "server_loss_post", "seconds"]
CLIENT_COLUMNS = ["round", "node_id", "partition_id", "phase", "status", "reason", "weight", "num_tasks",
                  "loss", "loss_pre", "loss_post", "accuracy_pre", "accuracy_post", "seconds"]
ROUND_DTYPES = {"round": "int64", "num_sampled": "int64", "num_replies": "int64", "num_rejected": "int64",
                "num_failures": "int64", **{c: "float64" for c in ROUND_COLUMNS[5:]}}
CLIENT_DTYPES = {"round": "int64", "node_id": "UInt64", "partition_id": "Int64", "phase": "category",
                 "status": "category", "reason": "string", "weight": "float64", "num_tasks": "Int64",
                 **{c: "float64" for c in CLIENT_COLUMNS[8:]}}
MODEL_FORMAT = "fedmeta-meta-model/1"
CHECKPOINT_FORMAT = "fedmeta-checkpoint/1"


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


class RunWriter:
    """Creates a run directory and appends rows, checkpoints and the final model to it."""

    def __init__(self, run_dir: str | Path, cfg: Config, extra: dict[str, Any] | None = None) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        info = {"config": cfg.to_mapping(), "seed": cfg.seed, "versions": versions(), **(extra or {})}
        atomic_write(self.dir / "config.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
        (self.dir / "status.json").unlink(missing_ok=True)

    def _append(self, name: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
        path = self.dir / name
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
            if new:
                w.writeheader()
            for row in rows:
                w.writerow({c: _cell(row.get(c)) for c in columns})
            f.flush()

    def append_round(self, row: dict[str, Any]) -> None:
        self._append("rounds.csv", ROUND_COLUMNS, [row])

    def append_clients(self, rows: list[dict[str, Any]]) -> None:
        self._append("clients.csv", CLIENT_COLUMNS, rows)

    def save_checkpoint(self, server_round: int, params: Params, server_state: dict[str, Any]) -> Path:
        path = self.dir / "checkpoints" / f"round-{server_round:04d}.pt"
        payload = {"format": CHECKPOINT_FORMAT, "round": server_round, "params": params,
                   "server_state": server_state, "config": self.cfg.to_mapping(), "rng": rng_state()}
        atomic_write(path, lambda f: torch.save(payload, f))
        return path

    def save_model(self, params: Params, server_round: int) -> Path:
        return save_meta_model(self.dir / "model.pt", params, self.cfg, server_round)

    def finish(self, status: str, **info: Any) -> None:
        body = json.dumps({"status": status, **info}, indent=2).encode()
        atomic_write(self.dir / "status.json", lambda f: f.write(body))


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# --- meta-models and checkpoints --------------------------------------------------------------
def save_meta_model(path: str | Path, params: Params, cfg: Config, server_round: int | None = None) -> Path:
    path = Path(path)
    payload = {"format": MODEL_FORMAT, "config": cfg.to_mapping(), "round": server_round,
               "params": {k: v.detach().cpu().clone() for k, v in params.items()}}
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


def load_meta_model(path: str | Path) -> MetaModel:
    """Load a `model.pt` (or a checkpoint): the config, the meta-parameters and the nn.Module."""
    from . import models

    payload = _load(path, (MODEL_FORMAT, CHECKPOINT_FORMAT))
    cfg = Config.from_mapping(payload["config"])
    module = models.build(models.model_name(cfg), cfg)
    own = {k: v for k, v in payload["params"].items() if "/" not in k}
    if own:
        module.load_state_dict(own, strict=True)
    return MetaModel(cfg, payload["params"], module, payload.get("round"))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return _load(path, (CHECKPOINT_FORMAT,))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = sorted((Path(run_dir) / "checkpoints").glob("round-*.pt"))
    return found[-1] if found else None


def _load(path: str | Path, formats: tuple[str, ...]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fedmeta model or checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        raise ValueError(f"{path} is not a fedmeta file of format {formats}")
    return payload


# --- reading runs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    path: Path | None
    config: dict[str, Any]
    rounds: pd.DataFrame
    clients: pd.DataFrame
    status: dict[str, Any]


def _read_csv(path: Path, columns: list[str], dtypes: dict[str, str]) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in columns})
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    out = {}
    for c in columns:
        col = frame[c] if c in frame else pd.Series([""] * len(frame))
        kind = dtypes[c]
        if kind in ("float64",):
            out[c] = np.array([float(v) if v != "" else np.nan for v in col], dtype=np.float64)
        elif kind in ("int64", "Int64", "UInt64"):
            out[c] = pd.array([None if v == "" else int(v) for v in col], dtype=kind if kind != "int64" else "Int64")
            if kind == "int64":
                out[c] = out[c].astype("int64")
        elif kind == "category":
            out[c] = col.astype("category")
        else:
            out[c] = col.astype("string")
    return pd.DataFrame(out)


def load_run(path: str | Path) -> Run:
    """Read a run directory: `.config` (dict), `.rounds`, `.clients` (typed DataFrames), `.status`."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a fedmeta run directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    status_file = path / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {"status": "incomplete"}
    return Run(path, config, _read_csv(path / "rounds.csv", ROUND_COLUMNS, ROUND_DTYPES),
               _read_csv(path / "clients.csv", CLIENT_COLUMNS, CLIENT_DTYPES), status)


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
               cat([r.clients for r in runs]), {n: r.status for n, r in zip(names, runs)})


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
