"""What `flwr run` pays to package the app before every run: Flower's FAB build from the app directory (the
reference: what `flwr run .` does) against fedmeta's lean copy of it plus the same build (what `fedmeta run` does,
fedmeta/appdir.py), side by side in one run, alternating, median of --reps.

Flower 1.42 lists and resolves every file under the app directory before its include / exclude rules drop them,
so the cost grows with whatever lies there: a project `.venv` (about 40 000 files), run directories under
results/. Both paths give the same package, minus results/ (tests/test_appdir.py).

    python benchmarks/fab_build.py                # this repository, as it is on disk
    python benchmarks/fab_build.py --quick        # smoke run
"""

from __future__ import annotations

import io
import os
import statistics
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from flwr.cli.build import build_fab_from_disk

from fedmeta.appdir import lean_copy
from fedmeta.lab import tables
from fedmeta.lab.args import REPO, Args, arg, command, parse


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "benchmarks/fab_build.py"
    NAME: ClassVar[str] = "fab_build"
    QUICK: ClassVar[dict] = {"reps": 1}

    app: Path = arg(REPO, "the Flower app directory (default: this repository)")
    reps: int = arg(5, "repetitions of each path (median reported)")


def files_under(app: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(app))


def flower(app: Path) -> bytes:
    return build_fab_from_disk(app)


def fedmeta(app: Path) -> bytes:
    with lean_copy(app) as copy:
        return build_fab_from_disk(copy)


def main(argv: list[str] | None = None) -> dict:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    times: dict[str, list[float]] = {"flwr build (the app directory)": [], "fedmeta (lean copy + flwr build)": []}
    sizes = {}
    for _ in range(args.reps):
        for (name, seconds), build in zip(times.items(), (flower, fedmeta)):
            t = time.perf_counter()
            fab = build(args.app)
            seconds.append(time.perf_counter() - t)
            sizes[name] = (len(fab), len(zipfile.ZipFile(io.BytesIO(fab)).namelist()))
    med = {name: statistics.median(s) for name, s in times.items()}
    ref = med["flwr build (the app directory)"]
    rows = [{"path": name, "median_s": m, "ratio_vs_flower": m / ref, "fab_bytes": sizes[name][0],
             "fab_files": sizes[name][1]} for name, m in med.items()]
    summary = {"command": command(args), "machine": tables.machine(["flwr"]),
               "files_under_app": files_under(args.app), "rows": rows}
    lines = [f"# Packaging the app before a run ({summary['files_under_app']} files under the app directory)", "",
             *tables.markdown_table(["path", "median s", "vs flwr build", "FAB bytes", "FAB files"],
                                    [[r["path"], f"{r['median_s']:.3f}", f"{r['ratio_vs_flower']:.3f}",
                                      r["fab_bytes"], r["fab_files"]] for r in rows])]
    tables.write_summary(args.out_dir, summary, lines)
    return summary


if __name__ == "__main__":
    main()
