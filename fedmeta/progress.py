"""What `fedmeta run` shows while a run goes: the streamed log, and a live progress line on a terminal.

The ServerApp logs one line per round:

    [fedmeta] round 3/10 | elapsed 12.3 s | ETA 28.7 s | train_loss=0.512 eval_loss_post=0.301

On a terminal, `LiveOutput` turns those lines into one live progress line at the bottom (round r/N as a bar,
elapsed, ETA, the metrics), and prints every other log line above it. Anywhere else (a file, a pipe, CI),
`PlainOutput` passes every line through unchanged, the round lines included. `flwr.log` in the run directory
always gets the raw stream. (rich comes with Flower; this module does not import Flower.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.text import Text

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ROUND_LINE = re.compile(r"\[fedmeta\] round (?P<round>\d+)/(?P<total>\d+) \| elapsed (?P<elapsed>\S+) s "
                        r"\| ETA (?P<eta>\S+) s(?: \| (?P<metrics>.*))?")
METRIC = re.compile(r"([A-Za-z_][\w.-]*)=(\S+)")


@dataclass(frozen=True)
class RoundProgress:
    """One parsed round line: round r of `total`, seconds since the start, seconds left (None if unknown)."""

    round: int
    total: int
    elapsed: float | None
    eta: float | None
    metrics: dict[str, str] = field(default_factory=dict)


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_round(line: str) -> RoundProgress | None:
    """The round line's content, or None for any other log line (colour codes and log prefixes allowed)."""
    m = ROUND_LINE.search(ANSI.sub("", line))
    if m is None:
        return None
    metrics = dict(METRIC.findall(m["metrics"] or ""))
    return RoundProgress(int(m["round"]), int(m["total"]), _seconds(m["elapsed"]), _seconds(m["eta"]), metrics)


def _clock(seconds: float | None) -> str:
    """12.3 -> '12.3 s', 754 -> '12:34', 4000 -> '1:06:40', unknown -> '?'."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class PlainOutput:
    """Every line unchanged (not a terminal: files, pipes, CI logs)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def line(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class LiveOutput:
    """A live progress line fed by the round lines; every other line is printed above it."""

    def __init__(self, console: Console, refresh_per_second: float = 4) -> None:
        self.console = console
        self.last: RoundProgress | None = None
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
            TextColumn("elapsed {task.fields[elapsed]}"), TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[metrics]}"), console=console, refresh_per_second=refresh_per_second)
        self.task = self.progress.add_task("waiting for round 1", total=None, elapsed="?", eta="?", metrics="")
        self.progress.start()

    def line(self, text: str) -> None:
        state = parse_round(text)
        if state is None:
            self.progress.console.print(Text.from_ansi(text.rstrip("\n")), soft_wrap=True)
            return
        self.last = state
        metrics = "  ".join(f"{k}={v}" for k, v in state.metrics.items())
        self.progress.update(self.task, description=f"round {state.round}/{state.total}", total=state.total,
                             completed=state.round, elapsed=_clock(state.elapsed), eta=_clock(state.eta),
                             metrics=metrics)

    def close(self) -> None:
        self.progress.refresh()
        self.progress.stop()


def output_for(stream: TextIO, mode: str = "auto") -> PlainOutput | LiveOutput:
    """`live` on a terminal (mode 'auto') or when asked ('live'); plain lines otherwise or when asked ('plain')."""
    if mode not in ("auto", "live", "plain"):
        raise ValueError(f"progress mode must be 'auto', 'live' or 'plain', not {mode!r}")
    console = Console(file=stream, force_terminal=True if mode == "live" else None)
    if mode == "live" or (mode == "auto" and console.is_terminal and not console.is_dumb_terminal):
        return LiveOutput(console)
    return PlainOutput(stream)
