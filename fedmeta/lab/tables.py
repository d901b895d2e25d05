"""Writing what an experiment measured: CSV, JSON and markdown tables, machine info, 95 % intervals, plots.

One way each: rows (a list of dicts) -> CSV through pandas (missing values as empty cells, integers kept
integers); JSON with two-space indentation (paths and other objects as strings); markdown tables from rows of
already formatted cells; `machine()` for the environment a number was measured in; `interval()` for every
mean +- 95 % half-width; `plot()` for every figure (mean lines with a shaded interval, Agg backend).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch


# --- files ----------------------------------------------------------------------------------------------------
def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """`rows` as a CSV file with a header; `columns` selects and orders them (default: every key, in order
    of first appearance). Returns the path."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(columns), dtype=object).to_csv(path, index=False)
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """A CSV written by `write_csv` back as rows (numbers parsed, empty cells as NaN)."""
    return pd.read_csv(path).to_dict("records")


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """Lines of a markdown table; cells are str()-ed as given (format numbers before). `align`: one
    character per column, "l" or "r" (default: plain `---`)."""
    sep = ["---:" if a == "r" else "---" for a in (align or "l" * len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_text(path: str | Path, lines: str | Iterable[str]) -> Path:
    """A text (markdown) file from a string or lines, ending with one newline."""
    text = lines if isinstance(lines, str) else "\n".join(lines)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")
    return path


def write_summary(out: str | Path, summary: dict[str, Any], lines: list[str]) -> None:
    """A script's output folder: `summary.json`, and `summary.md` = `lines` + the command that made them
    (`summary["command"]`), which is also printed."""
    write_json(Path(out) / "summary.json", summary)
    lines = [*lines, "", f"Command: `{summary['command']}`"]
    write_text(Path(out) / "summary.md", lines)
    print("\n".join(lines))


# --- the environment ------------------------------------------------------------------------------------------
def version(package: str) -> str | None:
    """An installed package's version from its metadata (never imports it), or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(packages: Sequence[str] = ()) -> dict[str, Any]:
    """Where and when a number was measured: python, torch, flwr (and `packages`) versions, the CPU, its
    cores, torch's intra-op threads, the date and the load average (1, 5, 15 min) at the time of the call."""
    return {"python": platform.python_version(), "torch": torch.__version__, "flwr": version("flwr"),
            **{p: version(p) for p in packages},
            "cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_average": list(os.getloadavg())}


# --- 95 % intervals --------------------------------------------------------------------------------------------
Z95 = 1.96  # normal approximation


def interval(values: Any) -> tuple[float, float]:
    """Mean and 95 % half-width (normal approximation, 1.96 x sample std / sqrt(n)) of a 1-d set of values,
    in float64; the half-width is NaN for fewer than two values (nothing to estimate a spread from)."""
    mean, half = curve_interval(_double(values).reshape(1, -1))
    return float(mean[0]), float(half[0])


def curve_interval(values: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 95 % half-width along the last axis of a (points, samples) array, in float64: e.g. the loss of
    every problem at every step (transposed) -> the mean curve and its band."""
    v = _double(values)
    n = v.shape[-1]
    half = Z95 * v.std(dim=-1, unbiased=True) / math.sqrt(n) if n > 1 else torch.full(v.shape[:-1], math.nan)
    return v.mean(dim=-1), half


def _double(values: Any) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double()
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


# --- figures ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    """One curve of a figure: y over x, optionally a 95 % half-width band and a reference level drawn as a
    dotted horizontal line of the same colour (e.g. a paper's number)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    half: Sequence[float] | None = None
    style: str = "-"
    marker: str | None = None
    reference: float | None = None


def plot(path: str | Path, lines: Sequence[Line], *, xlabel: str, ylabel: str, title: str = "",
         xscale: str = "linear", yscale: str = "linear", vlines: Sequence[tuple[float, str]] = (),
         grid: bool = False, legend_size: float = 8, size: tuple[float, float] = (7, 4)) -> Path:
    """Mean lines with shaded 95 % bands into a PNG (matplotlib, Agg backend, so no display is needed).
    On a log y axis the band's lower edge is clipped above zero. `vlines`: (x, label) gray dotted markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    for line in lines:
        x, y = np.asarray(line.x, dtype=float), np.asarray(line.y, dtype=float)
        (drawn,) = ax.plot(x, y, ls=line.style, marker=line.marker, label=line.label)
        if line.half is not None:
            half = np.asarray(line.half, dtype=float)
            low = np.clip(y - half, 1e-12, None) if yscale == "log" else y - half
            ax.fill_between(x, low, y + half, color=drawn.get_color(), alpha=0.2)
        if line.reference is not None:
            ax.axhline(line.reference, color=drawn.get_color(), ls=":", lw=1)
    for x, label in vlines:
        ax.axvline(x, color="gray", ls=":", lw=1, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xscale=xscale, yscale=yscale)
    if grid:
        ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
