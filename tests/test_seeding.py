"""Named random streams (fedmeta/seeding.py): names stand for the ints older code wrote out, so every
stream keeps its numbers; and no code passes an integer literal as a stream key."""

import ast
from pathlib import Path

import pytest
import torch

from fedmeta import seeding

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("fedmeta", "clients", "strategies", "experiments", "benchmarks")
# The files of the core whose stream keys are named (the other owners' files: test_repository_...)
CORE = ("fedmeta/algorithms", "fedmeta/tasks", "fedmeta/local.py", "fedmeta/partition.py", "fedmeta/seeding.py",
        "fedmeta/models.py", "fedmeta/devices.py", "fedmeta/losses.py")


def test_names_expand_to_the_ints_written_before():
    for seed in (0, 3, 2**40):
        assert seeding.derive(seed, "lstm-starts", 7) == seeding.derive(seed, 1, 1_000_003, 7)
        assert seeding.derive(seed, "client-sampling", 5) == seeding.derive(seed, "train", 10**6 + 5)
        assert seeding.derive(seed, "eval", 4, "starts") == seeding.derive(seed, 2, 4, 1)
        assert seeding.derive(seed, "server-eval", "starts") == seeding.derive(seed, 3, 1)
        assert seeding.derive(seed, "partition", 10, "training-bins") == seeding.derive(seed, 4, 10, 1)
        assert seeding.derive(seed, "protocol-tasks") == seeding.derive(seed, "test", 600)
        assert seeding.derive(seed, "lstm-validation", 3) == seeding.derive(seed, "eval", 903)
        assert seeding.derive(seed, "lstm-test") == seeding.derive(seed, "test", 900)  # a Shift alone: + 0
    assert seeding.keys_of("client-sampling", 2, "starts") == [1, 10**6 + 2, 1]
    assert seeding.keys_of("lstm-test-starts", "starts") == [5, 950, 1]  # a Shift followed by a name
    a, b = seeding.generator(0, "train", 1, 2), seeding.generator(0, "train", 1, 2)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert seeding.derive(0, "train", 1, 2) != seeding.derive(0, "train", 2, 1)
    # a hand-computed value: SeedSequence([0, 1, 1]).generate_state(2) = [s0, s1] -> (s0 << 31) ^ s1
    import numpy as np

    s0, s1 = (int(v) for v in np.random.SeedSequence([0, 1, 1]).generate_state(2, dtype=np.uint32))
    assert seeding.derive(0, "train", 1) == ((s0 << 31) ^ s1) & (2**63 - 1)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown random stream 'trian'.*STREAMS"):
        seeding.derive(0, "trian")


def _literal_keys(call: ast.Call) -> list[str]:
    """The stream keys (arguments after the seed) of a `derive`/`generator` call that are integer
    literals or arithmetic holding one (`10**6 + r`); names, variables and indexing are fine."""
    bad = []
    for arg in call.args[1:]:
        subscripts = {id(n) for s in ast.walk(arg) if isinstance(s, ast.Subscript) for n in ast.walk(s.slice)}
        if any(isinstance(n, ast.Constant) and type(n.value) is int and id(n) not in subscripts
               for n in ast.walk(arg)):
            bad.append(ast.unparse(arg))
    return bad


def scan(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, call) of every call of seeding.derive / seeding.generator / derive / generator in `tree`
    with a literal stream key."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute):
            if not (isinstance(f.value, ast.Name) and f.value.id == "seeding"):
                continue  # another object's method (np.random.Generator, ...)
            name = f.attr
        else:
            name = f.id if isinstance(f, ast.Name) else None
        if name in ("derive", "generator") and (bad := _literal_keys(node)):
            found.append((node.lineno, f"{ast.unparse(f)}(... {', '.join(bad)} ...)"))
    return found


def offenders(roots) -> list[str]:
    """file:line: call, for every offending call under `roots` (files or folders of the repository)."""
    found = []
    for root in roots:
        path = REPO / root
        for file in sorted([path] if path.is_file() else path.rglob("*.py")):
            found += [f"{file.relative_to(REPO)}:{line}: {call}" for line, call in scan(ast.parse(file.read_text()))]
    return found


def test_the_scan_finds_literal_keys():
    src = ("seeding.generator(s, 'train', 1_000_003, step)\nderive(s, 'train', 10**6 + r)\n"
           "seeding.derive(s, 'eval', pid, 'starts')\ngenerator(s, 'train', ids[0], r)\nother.generator(s, 1)\n"
           "seeding.generator(s, stream, 1)\n")
    assert scan(ast.parse(src)) == [(1, "seeding.generator(... 1000003 ...)"), (2, "derive(... 10 ** 6 + r ...)"),
                                    (6, "seeding.generator(... 1 ...)")]


def test_the_core_uses_named_streams_only():
    assert offenders(CORE) == []


def test_repository_uses_named_streams_only():
    """Every stream key in fedmeta/, clients/, strategies/, experiments/ and benchmarks/ is a name or a
    variable; an offender is named file:line."""
    found = offenders(SCANNED)
    assert not found, f"{len(found)} literal stream keys:\n" + "\n".join(found)
