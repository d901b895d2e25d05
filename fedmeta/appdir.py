"""A lean copy of the Flower app for `flwr run`.

`flwr run <dir>` builds the app's FAB from <dir> on every run, and Flower 1.42 first lists every file under it
(`flwr.cli.utils.collect_files` resolves each path) before its include / exclude rules drop most of them. A project
virtual environment in the app directory (`.venv`, about 40 000 files) and run directories under `results/` make
that seconds per run (`python benchmarks/fab_build.py`: 4.2 s for this repository on the 2-core machine, 0.06 s
from the copy). The app never runs from its directory (`fedmeta run` passes
absolute data and results paths), so `fedmeta run` hands Flower a temporary copy holding the files a FAB can keep
(Flower's include patterns: .py .toml .md .yaml .yml .json .jsonl, LICENSE; and .gitignore, which Flower reads),
found by a walk that never enters hidden directories, `__pycache__`, the top-level environment / build directories
Flower excludes, or the results directories.

This module never imports Flower.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

KEEP_SUFFIXES = (".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl")  # Flower's FAB_INCLUDE_PATTERNS
KEEP_NAMES = ("LICENSE", ".gitignore")
TOP_SKIP = ("venv", "env", "ENV", "build", "eggs", "lib", "lib64", "parts", "results")  # top level only, as Flower's


def app_files(app: Path, skip: Iterable[Path] = ()) -> list[Path]:
    """The files of `app` (relative paths, sorted) that a FAB can contain, without entering skipped directories."""
    app = app.resolve()
    skip = {Path(p).resolve() for p in skip}
    found = []
    for dirpath, dirnames, filenames in os.walk(app):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and d != "__pycache__" and (here / d).resolve() not in skip
                       and not (here == app and d in TOP_SKIP)]
        found += [(here / f).relative_to(app) for f in filenames
                  if (f.endswith(KEEP_SUFFIXES) or f in KEEP_NAMES) and not (here / f).is_symlink()]
    return sorted(found)


@contextmanager
def lean_copy(app: Path, skip: Iterable[Path] = ()) -> Iterator[Path]:
    """A temporary directory with the same name as `app` holding `app_files(app, skip)`; removed on exit."""
    app = app.resolve()
    with tempfile.TemporaryDirectory(prefix="fedmeta-app-") as tmp:
        copy = Path(tmp) / app.name
        for rel in app_files(app, skip):
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(app / rel, copy / rel)
        yield copy
