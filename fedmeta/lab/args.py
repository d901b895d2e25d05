"""A script's command line as a typed dataclass: one small parser, presets, and the command that re-runs it.

Every field of a script's argument dataclass (a subclass of `Args`) is a flag: `seed` -> `--seed`,
`grad_rounds` -> `--grad-rounds`; its type gives the conversion (int, float, str, Path, bool, an optional of
those, or a list of them: `nargs`), `metadata["help"]` the help text (required: a field without help is an
error), `metadata["choices"]` the allowed values. Booleans are `--flag` / `--no-flag`. Two fields every script
has: `--quick`, a preset (the class's `QUICK` overrides, applied after parsing so that any recorded command
plus `--quick` is a smoke run of the same code), and `--out` (the output folder).

`command(args)` serialises a parsed dataclass back to the command line that re-runs it (only values that differ
from the defaults; a quick run is written out in full, `--quick` expanded), so the command a script records in
its summary cannot drift from what its parser accepts.

    @dataclass(frozen=True)
    class Settings(Args):
        SCRIPT: ClassVar[str] = "experiments/demo.py"
        QUICK: ClassVar[dict] = {"rounds": 2}
        rounds: int = arg(100, "communication rounds")

    args = parse(Settings)                     # sys.argv[1:]
    command(args)                              # 'python experiments/demo.py --rounds 2 ...'
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

REPO = Path(__file__).resolve().parents[2]  # the source checkout holding experiments/ and results/

T = TypeVar("T", bound="Args")


def arg(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A dataclass field with its help text (and allowed values); lists need a tuple default."""
    metadata = {"help": help, **({"choices": tuple(choices)} if choices is not None else {})}
    if isinstance(default, list):
        raise TypeError("use a tuple default for a list-valued argument (dataclass defaults are shared)")
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Args:
    """Fields every script has; subclasses add theirs and set SCRIPT, QUICK and NAME."""

    SCRIPT: ClassVar[str] = ""  # the script's path from the repository root, as recorded commands name it
    NAME: ClassVar[str] = ""  # results/<NAME> is the default output folder
    QUICK: ClassVar[dict[str, Any]] = {}  # --quick: these values replace the parsed ones

    quick: bool = arg(False, "smoke run of the same code: the script's quick preset replaces the given values; "
                             "output in a temporary folder unless --out")
    out: Path | None = arg(None, "output folder (default: results/<name>, or /tmp/fedmeta-<name>-quick with --quick)")

    @property
    def out_dir(self) -> Path:
        """Where the script writes: --out, else results/<NAME> (a quick run never overwrites results/)."""
        if self.out is not None:
            return Path(self.out)
        return Path(f"/tmp/fedmeta-{self.NAME}-quick") if self.quick else REPO / "results" / self.NAME


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, several values?) of a field annotation: `int`, `float | None`, `tuple[int, ...]`, ..."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"unsupported argument type {tp!r}")
        tp = members[0]
    if typing.get_origin(tp) in (tuple, list):
        return next(a for a in typing.get_args(tp) if a is not Ellipsis), True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parser(cls: type[Args], description: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of an argument dataclass (every field a flag, with its help and default)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: every argument needs help (use fedmeta.lab.args.arg)")
        tp, many = _base_type(hints[f.name])
        kw: dict[str, Any] = {"help": f.metadata["help"], "default": f.default, "dest": f.name}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            if many:
                raise TypeError(f"{cls.__name__}.{f.name}: a list of booleans is not supported")
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = tp
            if many:
                kw["nargs"] = "*" if f.default in ((), None) else "+"
        p.add_argument(_flag(f.name), **kw)
    return p


def parse(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse `argv` (default: sys.argv[1:]) into `cls`; `--quick` then applies `cls.QUICK`."""
    unknown = set(cls.QUICK) - {f.name for f in dataclasses.fields(cls)} | ({"out", "quick"} & set(cls.QUICK))
    if unknown:
        raise TypeError(f"{cls.__name__}.QUICK names {sorted(unknown)}: not (overridable) fields")
    values = vars(parser(cls, description).parse_args(argv))
    hints = typing.get_type_hints(cls)
    for name, value in values.items():  # nargs gives lists; the dataclass holds tuples (frozen, hashable)
        if isinstance(value, list):
            values[name] = tuple(value)
        elif value is not None and _base_type(hints[name])[0] is Path and not isinstance(value, Path):
            values[name] = Path(value)
    args = cls(**values)
    return dataclasses.replace(args, **cls.QUICK) if args.quick else args


def _render(value: Any) -> list[str]:
    if isinstance(value, (tuple, list)):
        return [str(v) for v in value]
    return [str(value)]


def command_args(args: Args) -> list[str]:
    """The flags that re-create `args` from the defaults (a quick run expanded: `--quick` itself is left out,
    its values written explicitly, so the command says exactly what ran)."""
    out: list[str] = []
    own = [f for f in dataclasses.fields(args) if f.name not in ("quick", "out")]
    for f in own + [f for f in dataclasses.fields(args) if f.name == "out"]:  # the script's own flags first
        value = getattr(args, f.name)
        if value == f.default:
            continue
        if isinstance(value, bool):
            out.append(_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif value is None:
            raise ValueError(f"--{f.name}: None differs from the default but cannot be written as a flag")
        else:
            out += [_flag(f.name), *_render(value)]
    return out


def command(args: Args, **changes: Any) -> str:
    """`python <SCRIPT> <flags>`: the command that re-runs `args` (with `changes` applied first)."""
    if changes:
        args = dataclasses.replace(args, **changes)
    return shlex.join(["python", args.SCRIPT, *command_args(args)])


def settings(args: Args) -> dict[str, Any]:
    """The parsed arguments as JSON-ready values (paths as strings, tuples as lists), for summaries."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {f.name: plain(getattr(args, f.name)) for f in dataclasses.fields(args)}
