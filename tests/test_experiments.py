"""The experiment library (fedmeta.lab) and every recorded reproduction command.

The second half collects every command recorded in README.md and in results/*/summary.json (`python
experiments/...` or `python benchmarks/...`), checks that each one parses, and runs each script once, in the
--quick form of its first recorded command, into a temporary folder: a recorded command cannot rot unnoticed.
"""

import dataclasses
import importlib
import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from fedmeta.algorithms import Evaluation
from fedmeta.config import parse_run_config
from fedmeta.lab import federation, protocol, tables
from fedmeta.lab.args import Args, arg, command, parse

REPO = Path(__file__).resolve().parents[1]


# --- args -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Demo(Args):
    SCRIPT: ClassVar[str] = "experiments/demo.py"
    NAME: ClassVar[str] = "demo"
    QUICK: ClassVar[dict] = {"rounds": 2, "sizes": (1,)}

    rounds: int = arg(100, "rounds")
    lr: float = arg(0.5, "a rate")
    compile: bool = arg(False, "a switch that is off")
    keep: bool = arg(True, "a switch that is on")
    sizes: tuple[int, ...] = arg((10, 100), "several values")
    only: tuple[str, ...] | None = arg(None, "a subset", choices=("a", "b"))
    mode: str | None = arg(None, "an optional choice", choices=("x", "y"))
    data: Path = arg(Path("/data"), "a path")


def test_args_parse_types_and_the_command_that_reparses_to_the_same_settings():
    a = parse(Demo, ["--rounds", "7", "--compile", "--no-keep", "--sizes", "3", "4", "--only", "b", "--mode", "y",
                     "--data", "/x y", "--lr", "1e-3"])
    assert (a.rounds, a.lr, a.compile, a.keep, a.sizes, a.only, a.mode, a.data) == \
        (7, 1e-3, True, False, (3, 4), ("b",), "y", Path("/x y"))
    assert command(a) == ("python experiments/demo.py --rounds 7 --lr 0.001 --compile --no-keep --sizes 3 4 "
                          "--only b --mode y --data '/x y'")
    assert parse(Demo, shlex.split(command(a))[2:]) == a
    assert command(parse(Demo, [])) == "python experiments/demo.py"  # defaults are not written
    assert parse(Demo, []).out_dir == REPO / "results" / "demo"


def test_quick_overrides_after_parsing_and_is_written_out_in_full():
    a = parse(Demo, ["--rounds", "5000", "--lr", "0.1", "--quick", "--out", "/tmp/q"])
    assert (a.rounds, a.sizes, a.lr, a.out_dir) == (2, (1,), 0.1, Path("/tmp/q"))
    cmd = command(a)
    assert "--quick" not in cmd and cmd.endswith("--out /tmp/q")
    assert dataclasses.replace(parse(Demo, shlex.split(cmd)[2:]), quick=True) == a
    assert parse(Demo, ["--quick"]).out_dir == Path("/tmp/fedmeta-demo-quick")  # never results/


def test_args_reject_what_could_not_be_recorded():
    with pytest.raises(SystemExit):
        parse(Demo, ["--compile", "True"])  # the form that once broke a recorded command
    with pytest.raises(SystemExit):
        parse(Demo, ["--mode", "z"])

    @dataclass(frozen=True)
    class NoHelp(Args):
        x: int = 1

    with pytest.raises(TypeError, match="needs help"):
        parse(NoHelp, [])

    @dataclass(frozen=True)
    class BadQuick(Args):
        QUICK: ClassVar[dict] = {"out": "/tmp/x"}

    with pytest.raises(TypeError, match="out"):
        parse(BadQuick, [])


# --- federation: the Config is the one description of a run ------------------------------------------------
def test_run_config_has_the_changed_keys_in_toml_and_parses_back_to_the_same_config():
    cfg = federation.app_config(task="omniglot", data_dir="/data dir/omniglot", inner_lr=1e-6, compile=True,
                                num_rounds=3, results_dir="/ignored", run_name="ignored")
    assert federation.run_config(cfg) == \
        'compile=true task="omniglot" data-dir="/data dir/omniglot" inner-lr=1e-06 num-rounds=3'
    again = federation.app_defaults().to_mapping() | parse_run_config([federation.run_config(cfg)])
    assert federation.Config.from_mapping(again) == cfg.replace(results_dir="", run_name="")
    assert federation.run_config(federation.app_defaults()) == ""
    with pytest.raises(ValueError, match="data-dir"):
        federation.run_config(cfg.replace(data_dir="it's"))


def fake_fedmeta(tmp_path: Path, exit_code: int, status: dict) -> list[str]:
    """A stand-in for the `fedmeta` command: writes the run directory's log and status, exits with `exit_code`."""
    script = tmp_path / "fake_fedmeta.py"
    script.write_text(
        "import json, sys\nfrom pathlib import Path\n"
        "a = sys.argv\nrun = Path(a[a.index('--results-dir') + 1]) / a[a.index('--name') + 1]\n"
        "run.mkdir(parents=True, exist_ok=True)\n"
        "(run / 'flwr.log').write_text('\\n'.join(f'line {i}' for i in range(100)))\n"
        f"(run / 'status.json').write_text(json.dumps({status!r}))\n"
        "print('refused: a reason', file=sys.stderr)\n"
        f"sys.exit({exit_code})\n")
    return [sys.executable, str(script)]


def test_a_federation_that_fails_raises_with_the_end_of_its_log(tmp_path, monkeypatch):
    failed = {"status": "failed", "error": "boom"}
    monkeypatch.setattr(federation, "_fedmeta", lambda: fake_fedmeta(tmp_path, 1, failed))
    with pytest.raises(federation.FederationError) as err:
        federation.run(federation.app_defaults(), name="r", results_dir=tmp_path, num_supernodes=3)
    text = str(err.value)
    assert "did not complete" in text and "exit status 1" in text and "boom" in text and "a reason" in text
    assert "line 99" in text and "line 59" not in text  # the log's last 40 lines


def test_a_refused_federation_raises_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(federation, "_fedmeta", lambda: fake_fedmeta(tmp_path, 2, {"status": "failed"}))
    with pytest.raises(federation.FederationError, match="refused to start") as err:
        federation.run(federation.app_defaults(), name="r", results_dir=tmp_path, num_supernodes=3)
    assert "refused: a reason" in str(err.value) and "line 99" not in str(err.value)


def test_a_federation_completed_with_failures_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(federation, "_fedmeta", lambda: fake_fedmeta(tmp_path, 3, {"status": "completed"}))
    fed = federation.run(federation.app_config(num_rounds=2), name="r", results_dir=tmp_path, num_supernodes=3)
    assert fed.exit_code == 3 and fed.status == {"status": "completed"} and fed.run_dir == tmp_path / "r"
    assert fed.record()["overrides"] == "num-rounds=2"
    assert fed.command[fed.command.index("--federation-config") + 1] == \
        "num-supernodes=3 client-resources-num-cpus=1"


def test_the_library_never_imports_flower():
    code = ("import sys; from fedmeta.lab import args, central, federation, optimizers, protocol, tables; "
            "tables.machine(); print('flwr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


# --- tables and the protocol's rows ----------------------------------------------------------------------------
def test_interval_by_hand():
    mean, half = tables.interval([1.0, 2.0, 3.0, 4.0])  # sample std sqrt(5/3)
    assert mean == 2.5 and half == pytest.approx(1.96 * math.sqrt(5 / 3) / 2, rel=1e-15)
    assert math.isnan(tables.interval([3.0])[1])
    m, h = tables.curve_interval(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    assert m.tolist() == [2.0, 2.0] and h.tolist() == [pytest.approx(1.96 * math.sqrt(2) / math.sqrt(2)), 0.0]


def test_csv_keeps_integers_missing_cells_and_the_chosen_columns(tmp_path):
    rows = [{"a": 1, "b": None, "c": 0.1}, {"a": 2, "b": 3, "c": math.nan, "d": "x"}]
    path = tables.write_csv(tmp_path / "t.csv", rows)
    assert path.read_text() == "a,b,c,d\n1,,0.1,\n2,3,,x\n"
    tables.write_csv(tmp_path / "u.csv", rows, ["c", "a"])
    assert (tmp_path / "u.csv").read_text() == "c,a\n0.1,1\n,2\n"
    assert tables.markdown_table(["x", "y"], [[1, "a"]], align="lr") == ["| x | y |", "|---|---:|", "| 1 | a |"]


def test_machine_info_and_plot(tmp_path):
    info = tables.machine(("numpy",))
    assert info["torch"] == torch.__version__ and info["flwr"] and info["numpy"] and len(info["load_average"]) == 3
    path = tables.plot(tmp_path / "p.png", [tables.Line("a", [0, 1, 2], [1.0, 0.1, 0.01], [2.0, 0.2, 0.0]),
                                            tables.Line("b", [0, 2], [0.5, 0.5], reference=0.3)],
                       xlabel="x", ylabel="y", yscale="log", vlines=[(1, "mark")])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_protocol_rows_median_and_diverged_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, float("nan"), 500.0, 2.0]])  # (steps + 1, tasks)
    acc = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    r0, r1 = protocol.rows(Evaluation(loss, acc), (0, 1))
    assert (r0["loss"], r0["median"], r0["diverged"], r0["tasks"], r0["accuracy"]) == (2.5, 2.0, 0, 4, 0.5)
    assert math.isnan(r1["loss"]) and r1["median"] == 2.0 and r1["diverged"] == 2 and r1["accuracy"] == 0.75
    assert "accuracy" not in protocol.rows(Evaluation(loss, None), (0,))[0]


# --- every recorded command ----------------------------------------------------------------------------------
COMMAND = re.compile(r"(?:^|[\s/])python ((?:experiments|benchmarks)/\w+\.py)((?:\s+[^\s`]+)*)\s*$")


def recorded() -> list[tuple[str, str, list[str]]]:
    """(where, script, arguments) of every recorded command: README.md's code spans, then every string of
    results/*/summary.json, in that order."""
    found = []
    readme = (REPO / "README.md").read_text()
    fences = re.compile(r"^```.*?^```", re.M | re.S)
    candidates = [line for block in fences.findall(readme) for line in block.splitlines()]  # fenced commands
    candidates += re.findall(r"`([^`]+)`", fences.sub("", readme))  # inline code, possibly across a line break
    for text in candidates:
        if m := COMMAND.search(" ".join(text.split())):
            found.append(("README.md", m.group(1), shlex.split(m.group(2))))
    for path in sorted(REPO.glob("results/*/summary.json")):
        def walk(x):
            if isinstance(x, dict):
                for v in x.values():
                    yield from walk(v)
            elif isinstance(x, list):
                for v in x:
                    yield from walk(v)
            elif isinstance(x, str) and (m := COMMAND.search(" ".join(x.split()))):
                yield m

        found += [(str(path.relative_to(REPO)), m.group(1), shlex.split(m.group(2)))
                  for m in walk(json.loads(path.read_text()))]
    return found


RECORDED = recorded()
SCRIPTS = {script: argv for _, script, argv in reversed(RECORDED)}  # the first recorded command of each script
SCRIPTS = {s: SCRIPTS[s] for s in sorted(SCRIPTS)}


def settings_class(script: str, monkeypatch) -> type[Args]:
    """The script's argument dataclass (its module imported as Python would run it: its folder on the path)."""
    monkeypatch.syspath_prepend(str(REPO / Path(script).parent))
    return importlib.import_module(Path(script).stem).Settings


def test_every_script_has_a_recorded_command():
    scripts = {str(p.relative_to(REPO)) for d in ("experiments", "benchmarks") for p in (REPO / d).glob("*.py")}
    assert scripts - {"benchmarks/references.py"} == set(SCRIPTS)


@pytest.mark.parametrize("where,script,argv", RECORDED, ids=[f"{w}:{s}" for w, s, _ in RECORDED])
def test_every_recorded_command_parses(where, script, argv, monkeypatch):
    settings = settings_class(script, monkeypatch)
    assert settings.SCRIPT == script
    parse(settings, argv)  # argparse exits on anything it does not accept


# the whole quick run of these takes minutes (omniglot_federated: 10 variants, 8 of them Flower runs); the default
# suite runs a subset of their variants below, `pytest -m slow` the whole recorded command
SLOW_QUICK = {"experiments/omniglot_federated.py"}


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_QUICK else s for s in SCRIPTS])
def test_recorded_command_runs_quick(script, tmp_path, monkeypatch):
    """The script's first recorded command with --quick runs to the end, and the command its summary records
    re-parses to the settings that ran."""
    argv = [*SCRIPTS[script], "--quick", "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} {shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    settings = settings_class(script, monkeypatch)
    ran = parse(settings, argv)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    commands = [m for m in re.findall(r'"(python (?:experiments|benchmarks)/[^"]+)"', json.dumps(summary))
                if m.startswith(f"python {script}")]
    assert commands, f"{script}: its summary.json records no command"
    assert dataclasses.replace(parse(settings, shlex.split(commands[0])[2:]), quick=True) == ran


def test_omniglot_federated_quick_subset(tmp_path):
    """The Omniglot federation's quick preset for a subset of its variants: a tuned (cosine) FedMeta through
    Flower, central MAML at matched iterations and a client alone in-process; each with its summary row and its
    own re-run command."""
    script = "experiments/omniglot_federated.py"
    want = ["fedmeta-lr10-cos", "central", "alone"]
    proc = subprocess.run([sys.executable, script, "--quick", "--only", *want, "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    variants = json.loads((tmp_path / "out" / "summary.json").read_text())["variants"]
    assert set(want) <= set(variants)
    for name in want:
        argv = shlex.split(variants[name]["command"])
        assert argv[argv.index("--only") + 1:argv.index("--only") + 2] == [name], argv  # `... --only <name> ...`
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["fresh"]) == {"fedmeta-lr10-cos", "central"}  # the fresh-episode check of every saved model
    assert all(0.0 <= x <= 1.0 for x in summary["fresh"].values())
    assert summary["goal"]["fresh"]["central"] == summary["fresh"]["central"]
