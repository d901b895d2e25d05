"""`fedmeta run`'s output: the ServerApp's round lines parsed, a live progress line on a terminal (rendered by
rich into a string buffer here), every line unchanged anywhere else."""

import io
import re

import pytest
from rich.console import Console

from fedmeta.progress import (
    LiveOutput,
    PlainOutput,
    RoundProgress,
    output_for,
    parse_round,
)

# what the ServerApp logs, as `flwr run --stream` relays it (Flower's coloured level prefix included)
ROUND3 = "\x1b[92mINFO \x1b[0m:      [fedmeta] round 3/10 | elapsed 12.3 s | ETA 28.7 s | train_loss=0.512 " \
         "eval_loss_post=0.301\n"
OTHER = "\x1b[92mINFO \x1b[0m:      configure_train: 8 of 8 training nodes\n"


def test_round_lines_are_parsed_exactly():
    assert parse_round(ROUND3) == RoundProgress(3, 10, 12.3, 28.7, {"train_loss": "0.512", "eval_loss_post": "0.301"})
    plain = "[fedmeta] round 10/10 | elapsed 754.0 s | ETA 0.0 s | no metrics"
    assert parse_round(plain) == RoundProgress(10, 10, 754.0, 0.0, {})
    assert parse_round("[fedmeta] round 1/4 | elapsed 2.5 s | ETA nan s | train_loss=nan") == \
        RoundProgress(1, 4, 2.5, None, {"train_loss": "nan"})  # unknown ETA: shown as '?'
    for line in (OTHER, "INFO :      [ROUND 3/10]", "round 3: {'num_sampled': 8}", "[fedmeta] round three/10", ""):
        assert parse_round(line) is None, line


def test_plain_output_passes_every_line_through_unchanged():
    buf = io.StringIO()
    out = output_for(buf, "auto")  # a StringIO is not a terminal
    assert isinstance(out, PlainOutput)
    for line in (OTHER, ROUND3, "no newline at the end"):
        out.line(line)
    out.close()
    assert buf.getvalue() == OTHER + ROUND3 + "no newline at the end"


def _screen(text: str) -> list[str]:
    """What a terminal shows after `text`: per line, what follows the last carriage return (rich redraws its
    live line as "\r" + erase-line + the new line), colour codes removed."""
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line.rsplit("\r", 1)[-1]).rstrip() for line in text.split("\n")]
    return [line for line in lines if line]


def test_live_output_renders_round_elapsed_eta_and_metrics_below_the_log():
    buf = io.StringIO()
    out = LiveOutput(Console(file=buf, force_terminal=True, width=120, color_system="truecolor"))
    out.line(OTHER)
    out.line(ROUND3)
    out.line("\x1b[93mWARNING \x1b[0m:   round 4: node 7 failed\n")
    out.line(ROUND3.replace("round 3/10", "round 4/10").replace("12.3 s", "16.4 s").replace("28.7 s", "24.6 s"))
    out.close()
    *log, live = _screen(buf.getvalue())
    assert log == ["INFO :      configure_train: 8 of 8 training nodes", "WARNING :   round 4: node 7 failed"]
    expected = r"round 4/10 [━╺╸ ]+ elapsed 16\.4 s ETA 24\.6 s train_loss=0\.512  eval_loss_post=0\.301"
    assert re.fullmatch(expected, live), live  # round lines drive the live line instead of scrolling by
    assert "\x1b[92mINFO" in buf.getvalue()  # the log's colours survive on a terminal


def test_live_output_before_the_first_round_and_long_times():
    buf = io.StringIO()
    out = output_for(buf, "live")
    assert isinstance(out, LiveOutput)
    out.line("[fedmeta] round 1/200 | elapsed 75.0 s | ETA 4000.0 s | train_loss=7.4\n")
    out.close()
    [live] = _screen(buf.getvalue())
    assert re.fullmatch(r"round 1/200 [━╺╸ ]+ elapsed 1:15 ETA 1:06:40 train_loss=7\.4", live), live
    empty = io.StringIO()
    output_for(empty, "live").close()
    assert re.fullmatch(r"waiting for round 1 [━╺╸ ]+ elapsed \? ETA \?", _screen(empty.getvalue())[-1])
    with pytest.raises(ValueError, match="progress mode"):
        output_for(io.StringIO(), "fancy")
