"""Omniglot on disk: reading it, MAML's preprocessing, and a cache of the preprocessed arrays.

Data: Lake, Salakhutdinov & Tenenbaum (2015), "Human-level concept learning through probabilistic
program induction", Science; 1623 characters of 50 alphabets, 20 drawings each, 105x105 pixels.
Nothing is ever downloaded. `data-dir` holds, for each set ("images_background",
"images_evaluation"), one of (first found wins, so layouts may be mixed):
1. `<set>.npz` plus `alphabet_ranges.json`: the arrays of ../shared/data/omniglot (see SOURCE.md);
2. `<set>/<Alphabet>/characterNN/IIII_DD.png`: the official release, extracted;
3. `<set>.zip`: the official release as downloaded (github.com/brendenlake/omniglot, python/).
IIII is the character id (1..1623, background first; it is also the row order of the npz
arrays) and DD the drawer (01..20). Characters are kept in id order and drawings in drawer order,
so every layout gives the same arrays.

Preprocessing (MAML, Finn et al. 2017, §5.2): ink = 255 on 0 in mode "L", resized 105 -> 28 with
PIL's LANCZOS filter, stored as uint8 (the sampler divides by 255, so ink = 1.0). Note: MAML's
script resized the mode-"1" PNGs directly, for which Pillow silently uses NEAREST; we resample
in mode "L", which is what "LANCZOS" means. The 28x28 arrays are cached in
`$FEDMETA_CACHE/omniglot/` (default `~/.cache/fedmeta/omniglot/`) under a hash of the source
files and the preprocessing version, so only the first run pays the ~32 460 resizes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

SETS = ("images_background", "images_evaluation")
DRAWINGS = 20  # drawers per character
RAW = 105  # side of the original drawings
SIZE = 28  # side after preprocessing
VERSION = 1  # bump when the preprocessing changes: old cache files are then ignored

HELP = ("Expected in that folder either the fedmeta arrays images_background.npz, images_evaluation.npz and "
        "alphabet_ranges.json (see SOURCE.md in ../shared/data/omniglot), or the official Omniglot release "
        "from https://github.com/brendenlake/omniglot (folder python/): images_background.zip and "
        "images_evaluation.zip, as downloaded or extracted to images_background/<Alphabet>/characterNN/"
        "IIII_DD.png and images_evaluation/<Alphabet>/characterNN/IIII_DD.png. Point the config key "
        "data-dir at that folder; nothing is downloaded automatically.")


class OmniglotDataError(OSError):
    """The Omniglot data is missing, incomplete or corrupt (the message says where to get it)."""


@dataclass(frozen=True, eq=False)
class Omniglot:
    """Characters in id order. `images` is (chars, 20, 105, 105) bool ink as read, or
    (chars, 20, 28, 28) uint8 (ink 255) once preprocessed."""

    images: np.ndarray
    char_ids: np.ndarray  # (chars,) int64, increasing
    alphabet: np.ndarray  # (chars,) int64 index into `alphabets`
    alphabets: tuple[tuple[str, str], ...]  # (set, name), in order of their first character id

    def alphabets_of(self, set_name: str) -> list[int]:
        return [i for i, (s, _) in enumerate(self.alphabets) if s == set_name]

    def rows_of(self, alphabets: list[int]) -> np.ndarray:
        """Rows (characters) of the given alphabets, in id order."""
        return np.flatnonzero(np.isin(self.alphabet, alphabets))


# --- locating and fingerprinting the sources ------------------------------------------------------
def _error(root: Path, problem: str) -> OmniglotDataError:
    return OmniglotDataError(f"Omniglot data at {root.resolve()}: {problem}. {HELP}")


def sources(data_dir: str | os.PathLike) -> list[tuple[str, str, Path]]:
    """(set, kind, path) per set, kind in "npz" | "tree" | "zip"; raises if a set is missing."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise _error(root, "no such folder")
    found = []
    for s in SETS:
        for kind, path in (("npz", root / f"{s}.npz"), ("tree", root / s), ("zip", root / f"{s}.zip")):
            if path.is_dir() if kind == "tree" else path.is_file():
                found.append((s, kind, path))
                break
        else:
            raise _error(root, f"found none of {s}.npz, {s}/ or {s}.zip")
    if any(kind == "npz" for _, kind, _ in found) and not (root / "alphabet_ranges.json").is_file():
        raise _error(root, "the .npz arrays need alphabet_ranges.json beside them")
    return found


def fingerprint(found: list[tuple[str, str, Path]]) -> str:
    """Hash of the source files (contents; for extracted trees, names, sizes and mtimes) and of
    the preprocessing, naming the cache file."""
    h = hashlib.sha256(f"v{VERSION} {SIZE} LANCZOS-L Pillow-{PIL.__version__}".encode())
    files = [p for _, kind, p in found if kind != "tree"]
    if any(kind == "npz" for _, kind, _ in found):
        files.append(found[0][2].parent / "alphabet_ranges.json")
    for s, kind, path in found:
        h.update(f"|{s}:{kind}".encode())
        if kind == "tree":
            for d, _, names in sorted(os.walk(path)):
                for n in sorted(names):
                    st = os.stat(os.path.join(d, n))
                    h.update(f"{os.path.relpath(os.path.join(d, n), path)}:{st.st_size}:{st.st_mtime_ns};".encode())
    for f in files:
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


# --- reading ------------------------------------------------------------------------------------
def read(data_dir: str | os.PathLike, found: list[tuple[str, str, Path]] | None = None) -> Omniglot:
    """The raw drawings, (chars, 20, 105, 105) bool with ink = True, from any accepted layout."""
    root = Path(data_dir).expanduser()
    found = sources(root) if found is None else found
    parts = []  # per set: (ink (n, 20, 105, 105), ids (n,), alphabet names (n,))
    for s, kind, path in found:
        try:
            parts.append(_read_npz(root, s, path) if kind == "npz" else _read_pngs(root, s, kind, path))
        except OmniglotDataError:
            raise
        except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise _error(root, f"cannot read {path.name} ({type(e).__name__}: {e}); the file is corrupt") from e
    ink = np.concatenate([p[0] for p in parts])
    ids = np.concatenate([p[1] for p in parts])
    keys = [(s, a) for (s, _, _), p in zip(found, parts, strict=True) for a in p[2]]
    order = np.argsort(ids, kind="stable")
    if len(np.unique(ids)) != len(ids):
        raise _error(root, "a character id appears twice")
    keys = [keys[i] for i in order]
    alphabets = tuple(dict.fromkeys(keys))  # unique, in order of first character id
    index = {a: i for i, a in enumerate(alphabets)}
    if (np.diff(order) < 0).any():  # the npz sets are in id order already: skip a 360 MB copy
        ink = ink[order]
    return Omniglot(ink, ids[order].astype(np.int64),
                    np.array([index[k] for k in keys], dtype=np.int64), alphabets)


def _read_npz(root: Path, set_name: str, path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with np.load(path, allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    n = len(images)
    if images.dtype != np.bool_ or images.shape[1:] != (DRAWINGS, RAW, RAW) or labels.shape != (n, DRAWINGS) \
            or not (labels == np.arange(n)[:, None]).all():
        raise _error(root, f"{path.name} holds images {images.dtype} {images.shape} and labels {labels.shape}; "
                     f"expected bool (chars, {DRAWINGS}, {RAW}, {RAW}) and row numbers (chars, {DRAWINGS})")
    ranges = sorted((r for r in json.loads((root / "alphabet_ranges.json").read_text()) if r[0] == set_name),
                    key=lambda r: r[2])  # [set, alphabet, first id, last id, count]
    ids = np.concatenate([np.arange(r[2], r[3] + 1) for r in ranges]) if ranges else np.zeros(0, np.int64)
    names = [r[1] for r in ranges for _ in range(r[3] - r[2] + 1)]
    if len(ids) != n or any(r[4] != r[3] - r[2] + 1 for r in ranges):
        raise _error(root, f"alphabet_ranges.json covers {len(ids)} characters of {set_name}, the npz holds {n}")
    return ~images, ids, names  # stored True = white paper; ink = ~images


_PNG = re.compile(r"^(\d+)_(\d+)\.png$")


def _read_pngs(root: Path, set_name: str, kind: str, path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The official layout <Alphabet>/characterNN/IIII_DD.png, from a folder or a zip."""
    chars: dict[tuple[str, str], dict[int, tuple[int, Callable[[], object]]]] = {}
    for (alpha, char, name), opener in _png_entries(kind, path):
        m = _PNG.match(name)
        if not m:
            raise _error(root, f"unexpected file {set_name}/{alpha}/{char}/{name}: expected IIII_DD.png")
        chars.setdefault((alpha, char), {})[int(m[2])] = (int(m[1]), opener)
    if not chars:
        raise _error(root, f"{path.name} holds no <Alphabet>/characterNN/IIII_DD.png files")
    ink = np.empty((len(chars), DRAWINGS, RAW, RAW), dtype=bool)
    ids, names = np.empty(len(chars), np.int64), []
    for c, ((alpha, char), drawings) in enumerate(chars.items()):
        where = f"{set_name}/{alpha}/{char}"
        char_ids = sorted({i for i, _ in drawings.values()})
        if sorted(drawings) != list(range(1, DRAWINGS + 1)) or len(char_ids) != 1:
            raise _error(root, f"{where} holds drawers {sorted(drawings)} of character ids {char_ids}; "
                         f"expected drawers 1..{DRAWINGS} of one character id")
        for d, (_, opener) in drawings.items():
            with Image.open(opener()) as im:
                if im.size != (RAW, RAW):
                    raise _error(root, f"{where} drawing {d} is {im.size}, expected {RAW}x{RAW}")
                ink[c, d - 1] = np.asarray(im.convert("L")) < 128  # black strokes on white paper
        ids[c] = char_ids[0]
        names.append(alpha)
    return ink, ids, names


def _png_entries(kind: str, path: Path) -> Iterator[tuple[tuple[str, str, str], Callable[[], object]]]:
    if kind == "tree":
        for alpha in sorted(p for p in path.iterdir() if p.is_dir()):
            for char in sorted(p for p in alpha.iterdir() if p.is_dir()):
                for png in sorted(char.glob("*.png")):
                    yield (alpha.name, char.name, png.name), (lambda p=png: p)
        return
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if info.is_dir() or not info.filename.endswith(".png") or "__MACOSX" in parts or len(parts) < 3:
                continue
            data = z.read(info)  # raises BadZipFile on a CRC mismatch
            yield (parts[-3], parts[-2], parts[-1]), (lambda b=data: io.BytesIO(b))


# --- preprocessing and cache ---------------------------------------------------------------------------
def resize(ink: np.ndarray) -> np.ndarray:
    """(..., 105, 105) bool ink -> (..., 28, 28) uint8: ink 255 on 0, PIL LANCZOS in mode "L"."""
    flat = ink.reshape(-1, RAW, RAW).view(np.uint8)  # 0/1, no copy
    out = np.empty((len(flat), SIZE, SIZE), dtype=np.uint8)
    for i, im in enumerate(flat):  # PIL works one image at a time; cached, so paid once
        out[i] = np.asarray(Image.fromarray(im * np.uint8(255), "L").resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    return out.reshape(*ink.shape[:-2], SIZE, SIZE)


def preprocess(raw: Omniglot) -> Omniglot:
    return Omniglot(resize(raw.images), raw.char_ids, raw.alphabet, raw.alphabets)


def cache_root() -> Path:
    """`$FEDMETA_CACHE`, else ~/.cache/fedmeta."""
    return Path(os.environ.get("FEDMETA_CACHE") or Path.home() / ".cache" / "fedmeta").expanduser()


_MEMO: dict[str, Omniglot] = {}  # per process: key -> preprocessed data


def forget() -> None:
    """Drop the in-process copies (the next `load` reads the disk cache)."""
    _MEMO.clear()


def load(data_dir: str | os.PathLike) -> Omniglot:
    """The preprocessed data, (chars, 20, 28, 28) uint8: from memory, the disk cache, or the source."""
    found = sources(data_dir)
    key = fingerprint(found)
    if key in _MEMO:
        return _MEMO[key]
    path = cache_root() / "omniglot" / f"omniglot-{key[:24]}.npz"
    data = _read_cache(path)
    if data is None:
        with _lock(path):  # concurrent clients: one preprocesses, the others wait and read its file
            data = _read_cache(path)
            if data is None:
                data = preprocess(read(data_dir, found))
                _write_cache(path, data)
    _MEMO[key] = data
    return data


def _read_cache(path: Path) -> Omniglot | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = Omniglot(z["images"], z["char_ids"], z["alphabet"],
                            tuple(zip(z["alphabet_sets"].tolist(), z["alphabet_names"].tolist(), strict=True)))
        if data.images.dtype != np.uint8 or data.images.shape[1:] != (DRAWINGS, SIZE, SIZE) \
                or not len(data.images) == len(data.char_ids) == len(data.alphabet) \
                or not 0 <= data.alphabet.min(initial=0) <= data.alphabet.max(initial=0) < len(data.alphabets):
            raise ValueError(f"shapes {data.images.shape}, {data.char_ids.shape}, {data.alphabet.shape}")
        return data
    except Exception as e:  # a damaged cache is only a miss: rebuild it from the source
        warnings.warn(f"ignoring unreadable Omniglot cache {path} ({type(e).__name__}: {e}); rebuilding it",
                      stacklevel=3)
        return None


def _write_cache(path: Path, data: Omniglot) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, images=data.images, char_ids=data.char_ids, alphabet=data.alphabet,
                     alphabet_sets=np.array([s for s, _ in data.alphabets]),
                     alphabet_names=np.array([a for _, a in data.alphabets]))
        os.replace(tmp, path)  # atomic: readers never see half a file
    except OSError as e:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"cannot write the Omniglot cache {path} ({e}); set FEDMETA_CACHE to a writable "
                      "folder to avoid preprocessing on every run", stacklevel=3)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.with_name(path.name + ".lock"), "a")
    except (ImportError, OSError):  # no fcntl (Windows) or read-only cache: no lock, no harm
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
