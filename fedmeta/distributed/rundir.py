"""The run directory of `fedmeta.distributed`, written by rank 0 only.

    config.json                        kind, resolved config, dtype, world size, backend, versions
    iterations.csv                     iteration, loss, seconds, reduce_seconds, world_size (whole lines)
    checkpoints/iteration-NNNNNNNN.pt  `State`: params, Adam state, task stream state, iteration (atomic)
    model.pt                           the final meta-model (`fedmeta.load_meta_model`; checkpoints load too)
    status.json                        {"status": "completed" | "failed", ...}

A directory holds one run: starting in a directory that holds a run of the same config (ignoring
`EXECUTION_KEYS`) continues it from its newest loadable checkpoint; another config, dtype or kind of
run is refused, naming what differs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..optim import Params
from ..results import MODEL_FORMAT, atomic_write, versions

KIND = "fedmeta-distributed/1"  # config.json "kind" and the checkpoints' "distributed" entry
TABLE = "iterations.csv"
COLUMNS = ["iteration", "loss", "seconds", "reduce_seconds", "world_size"]
# keys that say where and how a run executes, not what it computes: a run may continue under others
EXECUTION_KEYS = {"device", "threads", "compile", "data-dir", "results-dir", "run-name", "resume"}


class Refused(RuntimeError):
    """Rank 0 refused to start (directory, checkpoint or config); every rank exits with status 2."""


@dataclass
class State:
    """Everything the next meta-iteration depends on."""

    iteration: int  # meta-iterations done
    params: Params
    adam: dict  # optim.adam_init's layout: {"step": int, "exp_avg": Params, "exp_avg_sq": Params}
    stream: torch.Tensor  # the "train" task stream's generator state (uint8)

    def to(self, device: torch.device | str) -> State:
        def move(d: Params) -> Params:
            return {k: v.detach().to(device) for k, v in d.items()}

        adam = {"step": int(self.adam["step"]), "exp_avg": move(self.adam["exp_avg"]),
                "exp_avg_sq": move(self.adam["exp_avg_sq"])}
        return State(self.iteration, move(self.params), adam, self.stream.cpu().clone())


@dataclass(frozen=True)
class Options:
    """What a run does besides its Config."""

    iterations: int  # meta-iterations in all, a continued run's included
    out: Path
    dtype: torch.dtype = torch.float32
    checkpoint_every: int = 100  # 0: at the end only
    resume: str = ""  # a checkpoint or run directory to continue from (the `out` directory's own comes first)
    log_every: int = 100
    argv: tuple[str, ...] = ()


def prepare(cfg: Config, opts: Options, world_size: int, backend: str | None, fresh: Callable[[], State]) -> State:
    """Check the directory, find the state to start from (the directory's newest checkpoint, else
    `resume`'s, else `fresh()`), write config.json; raises `Refused` naming the problem."""
    out = opts.out
    held = (out / "config.json").is_file()
    if held:
        try:
            saved = json.loads((out / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise Refused(f"{out / 'config.json'} cannot be read: {err}") from err
        check_same(saved, cfg, opts.dtype, out / "config.json")
    elif out.is_dir() and any(out.iterdir()):
        raise Refused(f"{out} is not empty and holds no fedmeta.distributed run; choose another --out")
    resume = opts.resume or cfg.resume
    # the directory's own newest checkpoint first: torchrun's restarts repeat the command, --resume included
    found = newest_checkpoint(out) if held else None
    if found is None and resume:
        found = newest_checkpoint(Path(resume).expanduser())
        if found is None:
            raise Refused(f"resume: no loadable fedmeta.distributed checkpoint in {resume}")
    if found is not None:
        path, payload = found
        check_same(payload, cfg, opts.dtype, path)
        state = State(int(payload["iteration"]), payload["params"], payload["adam"], payload["generator"])
        if state.iteration > opts.iterations:
            raise Refused(f"{path} is already at meta-iteration {state.iteration} > --iterations {opts.iterations}")
        print(f"fedmeta.distributed: continuing from {path} (meta-iteration {state.iteration})", flush=True)
    else:
        state = fresh()
    info = {"kind": KIND, "config": cfg.to_mapping(), "seed": cfg.seed, "dtype": dtype_name(opts.dtype),
            "world_size": world_size, "backend": backend, "iterations": opts.iterations,
            "continued_from": str(found[0]) if found else None, "command": " ".join(opts.argv),
            "versions": versions()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
    (out / "status.json").unlink(missing_ok=True)
    truncate_table(out, state.iteration)
    return state.to("cpu")


def check_same(saved: dict, cfg: Config, dtype: torch.dtype, path: Path) -> None:
    """Refuse to continue a run of another kind, config or dtype, naming what differs."""
    kind = saved.get("kind", saved.get("distributed"))
    if kind != KIND:
        raise Refused(f"{path} is not from a fedmeta.distributed run (kind {kind!r}); choose another --out")
    mine, theirs = cfg.to_mapping(), saved.get("config", {})
    differ = sorted(k for k in set(mine) | set(theirs) if k not in EXECUTION_KEYS and mine.get(k) != theirs.get(k))
    if saved.get("dtype") != dtype_name(dtype):
        differ.append(f"dtype ({saved.get('dtype')} there, {dtype_name(dtype)} here)")
    if differ:
        raise Refused(f"{path} belongs to a run with other settings ({', '.join(differ)}); continue it with the "
                      "same ones or choose another --out")


def checkpoint_path(out: Path, iteration: int) -> Path:
    return out / "checkpoints" / f"iteration-{iteration:08d}.pt"


def save_checkpoint(opts: Options, cfg: Config, state: State, world_size: int) -> Path:
    """Atomically (temporary file + rename); a meta-model file plus the training state, so that
    `fedmeta.load_meta_model` reads it too. Plain tensors and containers only (weights_only loads)."""
    cpu = state.to("cpu")
    payload = {"format": MODEL_FORMAT, "distributed": KIND, "config": cfg.to_mapping(),
               "dtype": dtype_name(opts.dtype), "round": cpu.iteration, "iteration": cpu.iteration,
               "params": cpu.params, "adam": cpu.adam, "generator": cpu.stream, "world_size": world_size}
    path = checkpoint_path(opts.out, state.iteration)
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def newest_checkpoint(path: Path) -> tuple[Path, dict] | None:
    """The newest loadable checkpoint of a file, a run directory or its checkpoints/ (unreadable ones,
    e.g. cut by a full disk, are skipped, naming them); None if there is none."""
    if path.is_file():
        try:
            return path, _load(path)
        except Exception as err:  # truncated or foreign files fail in many ways
            raise Refused(f"resume: cannot read {path}: {type(err).__name__}: {err}") from err
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for candidate in sorted(folder.glob("iteration-*.pt"), reverse=True):
        try:
            payload = _load(candidate)
        except Exception as err:  # noqa: BLE001 -- as above; an older checkpoint may still serve
            print(f"fedmeta.distributed: skipping unreadable checkpoint {candidate}: {err}", file=sys.stderr)
            continue
        if isinstance(payload, dict) and payload.get("distributed") == KIND:
            return candidate, payload
    return None


def append_row(out: Path, row: dict[str, Any]) -> None:
    """One whole line per write (O_APPEND, unbuffered): a crash never leaves half a row."""
    path = out / TABLE
    header = "" if path.exists() else ",".join(COLUMNS) + "\n"
    cells = (repr(row[c]) if isinstance(row[c], float) else str(row[c]) for c in COLUMNS)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (header + ",".join(cells) + "\n").encode())
    finally:
        os.close(fd)


def truncate_table(out: Path, iteration: int) -> None:
    """Keep the rows up to `iteration`: a continued run writes the later ones again."""
    path = out / TABLE
    if not path.exists():
        return
    lines = path.read_text().split("\n")  # the last element: "" after a whole last line, else a cut line
    keep = [lines[0]] + [ln for ln in lines[1:-1] if ln and int(ln.split(",")[0]) <= iteration]
    atomic_write(path, lambda f: f.write(("\n".join(keep) + "\n").encode()))


def write_status(out: Path, status: str, **info: Any) -> None:
    body = json.dumps({"status": status, **info}, indent=2, default=str).encode()
    atomic_write(out / "status.json", lambda f: f.write(body))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["COLUMNS", "KIND", "TABLE", "Options", "Refused", "State", "append_row",
           "checkpoint_path", "newest_checkpoint", "prepare", "save_checkpoint", "write_status"]
