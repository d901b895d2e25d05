"""`fedmeta run` hands `flwr run` a lean copy of the app (fedmeta.appdir): the FAB Flower builds from it holds
exactly the files of the FAB it builds from the app itself, minus the results directories, and the walk never
enters a virtual environment."""

from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedmeta.appdir import app_files, lean_copy

REPO = Path(__file__).resolve().parents[1]


def fab_names(app: Path) -> set[str]:
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    return {n for n in names if not n.startswith(".info/")}  # .info: Flower's manifest (hashes, sizes)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec's, inside Flower's FAB builder
def test_the_lean_copy_builds_the_fab_of_the_app_without_its_results():
    with lean_copy(REPO) as copy:
        assert copy.name == REPO.name
        assert fab_names(copy) == {n for n in fab_names(REPO) if not n.startswith("results/")}
        assert (copy / "pyproject.toml").read_bytes() == (REPO / "pyproject.toml").read_bytes()
    assert not copy.exists()  # removed afterwards


def test_the_walk_skips_environments_hidden_dirs_results_and_symlinks(tmp_path):
    app = tmp_path / "app"
    for rel in ("pyproject.toml", "pkg/m.py", "pkg/data.json", "pkg/weights.pt", ".venv/lib/x.py", "venv/y.py",
                "pkg/__pycache__/m.cpython-311.pyc", ".git/config.json", "results/run/summary.json",
                "elsewhere/out/a.json", "README.md", "LICENSE", ".gitignore", "pkg/lib/inner.py"):
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text("x")
    (app / "pkg" / "link.py").symlink_to(app / "pkg" / "m.py")
    got = {p.as_posix() for p in app_files(app, skip=[app / "elsewhere" / "out"])}
    assert got == {"pyproject.toml", "pkg/m.py", "pkg/data.json", "README.md", "LICENSE", ".gitignore",
                   "pkg/lib/inner.py"}  # lib/ is skipped at the top level only, as Flower excludes it
