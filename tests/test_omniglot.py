"""Few-shot Omniglot: reading every layout, preprocessing, cache, episodes, splits, partitions.

Fast tests use 30 real characters (6 of each of 3 background and 2 evaluation alphabets), cut
from ../shared/data/omniglot into a tmp folder; the cache goes to a tmp FEDMETA_CACHE.
"""

import json
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fedmeta import algorithms, partition, seeding
from fedmeta.config import Config
from fedmeta.tasks import bins, families, omniglot
from fedmeta.tasks import omniglot_io as oio
from fedmeta.tasks.omniglot import OmniglotDataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
PER_ALPHABET = 6
ALPHABETS = {"images_background": 3, "images_evaluation": 2}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Every test of this file caches into a tmp folder, never ~/.cache, the repo or shared/."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDMETA_CACHE", str(root))
        oio.forget()
        yield root
        oio.forget()


def _first_rows(npz: Path, stop: int) -> np.ndarray:
    """The first `stop` characters of a shipped npz, inflating only those bytes."""
    with zipfile.ZipFile(npz) as z, z.open("images.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = header(f)
        assert dtype == np.bool_ and not fortran
        per = int(np.prod(shape[1:]))
        return np.frombuffer(f.read(stop * per), dtype=bool).reshape(stop, *shape[1:])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small data set in the shipped npz format: ink (30, 20, 105, 105) in id order, ids 1..30."""
    ranges = json.loads((DATA / "alphabet_ranges.json").read_text())
    root = tmp_path_factory.mktemp("small")
    ink, alphabets, new_ranges, next_id = [], [], [], 1
    for s, count in ALPHABETS.items():
        mine = [r for r in ranges if r[0] == s][:count]
        offset = min(r[2] for r in ranges if r[0] == s)  # first id of the set = its row 0
        rows = [r[2] - offset + k for r in mine for k in range(PER_ALPHABET)]
        paper = _first_rows(DATA / f"{s}.npz", max(rows) + 1)[rows]  # True = white paper
        np.savez_compressed(root / f"{s}.npz", images=paper,
                            labels=np.repeat(np.arange(len(rows))[:, None], 20, 1))
        for r in mine:
            new_ranges.append([s, r[1], next_id, next_id + PER_ALPHABET - 1, PER_ALPHABET])
            next_id += PER_ALPHABET
            alphabets.append((s, r[1]))
        ink.append(~paper)
    (root / "alphabet_ranges.json").write_text(json.dumps(new_ranges))
    return SimpleNamespace(dir=root, ink=np.concatenate(ink), alphabets=tuple(alphabets), ranges=new_ranges)


def _write_official(small, root: Path, sets=oio.SETS, as_zip=()) -> Path:
    """The official layout <set>/<Alphabet>/characterNN/IIII_DD.png (mode "1" PNGs, white paper);
    the folder numbering of the first alphabet is reversed, to show characters are ordered by id."""
    for s, alpha, first, last, _ in small.ranges:
        if s not in sets:
            continue
        for k, char_id in enumerate(range(first, last + 1)):
            n = (last - first - k) if (s, alpha) == small.alphabets[0] else k
            folder = root / s / alpha / f"character{n + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(20):
                Image.fromarray(~small.ink[char_id - 1, d]).save(folder / f"{char_id:04d}_{d + 1:02d}.png")
    for s in as_zip:
        with zipfile.ZipFile(root / f"{s}.zip", "w") as z:
            for png in sorted((root / s).rglob("*.png")):
                z.write(png, png.relative_to(root).as_posix())
        shutil.rmtree(root / s)
    return root


def _same(a, b):
    assert np.array_equal(a.images, b.images) and np.array_equal(a.char_ids, b.char_ids)
    assert np.array_equal(a.alphabet, b.alphabet) and a.alphabets == b.alphabets


# --- reading and preprocessing ------------------------------------------------------------------------
def test_npz_reads_ink_in_id_order(small):
    raw = oio.read(small.dir)
    assert raw.images.shape == (30, 20, 105, 105) and raw.images.dtype == np.bool_
    assert np.array_equal(raw.images, small.ink) and raw.char_ids.tolist() == list(range(1, 31))
    assert raw.alphabets == small.alphabets
    assert np.bincount(raw.alphabet).tolist() == [PER_ALPHABET] * 5
    assert 0.02 < raw.images.mean() < 0.2  # ink is the minority of pixels


@pytest.mark.parametrize("layout", ["tree", "zip", "mixed"])
def test_official_layouts_give_the_npz_arrays(small, tmp_path, layout):
    if layout == "tree":
        root = _write_official(small, tmp_path)
    elif layout == "zip":
        root = _write_official(small, tmp_path, as_zip=oio.SETS)
    else:  # background from the npz, evaluation from the official zip
        shutil.copy(small.dir / "images_background.npz", tmp_path)
        shutil.copy(small.dir / "alphabet_ranges.json", tmp_path)
        root = _write_official(small, tmp_path, sets=("images_evaluation",), as_zip=("images_evaluation",))
    kinds = [k for _, k, _ in oio.sources(root)]
    assert kinds == {"tree": ["tree"] * 2, "zip": ["zip"] * 2, "mixed": ["npz", "zip"]}[layout]
    _same(oio.read(root), oio.read(small.dir))
    _same(oio.load(root), oio.load(small.dir))


def test_resize_is_pil_lanczos_not_nearest(small):
    ink = small.ink[[0, 7, 25], :2]  # (3, 2, 105, 105)
    ours = oio.resize(ink)
    assert ours.shape == (3, 2, 28, 28) and ours.dtype == np.uint8
    for c in range(3):
        for d in range(2):
            png = Image.fromarray(~ink[c, d])  # as the official PNG: mode "1", white paper
            want = ImageOps.invert(png.convert("L")).resize((28, 28), Image.Resampling.LANCZOS)
            assert np.array_equal(ours[c, d], np.asarray(want))
            # Pillow silently resizes mode "1" images with NEAREST (MAML's script): not what we do
            nearest = 255 - np.asarray(png.resize((28, 28), Image.Resampling.LANCZOS).convert("L"))
            assert not np.array_equal(ours[c, d], nearest)
    assert ((ours > 0) & (ours < 255)).mean() > 0.05  # anti-aliased grey levels, not a binary image


def test_cache_is_written_then_hit_without_preprocessing(small, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDMETA_CACHE", str(cache))
    oio.forget()
    first = oio.load(small.dir)
    files = list((cache / "omniglot").glob("omniglot-*.npz"))
    assert len(files) == 1 and files[0].stat().st_size > first.images.nbytes
    assert first.images.shape == (30, 20, 28, 28) and first.images.dtype == np.uint8
    assert np.array_equal(first.images, oio.resize(small.ink))

    def fail(*_):
        raise AssertionError("preprocessed again despite the cache")

    preprocess = oio.preprocess
    monkeypatch.setattr(oio, "preprocess", fail)
    assert oio.load(small.dir) is first  # in-process copy
    oio.forget()
    _same(oio.load(small.dir), first)  # disk cache

    files[0].write_bytes(b"not an npz")  # a damaged cache is rebuilt, with a warning
    oio.forget()
    monkeypatch.setattr(oio, "preprocess", preprocess)
    with pytest.warns(UserWarning, match="unreadable Omniglot cache"):
        _same(oio.load(small.dir), first)


def test_cache_key_follows_the_source_files(small, tmp_path):
    copy = Path(shutil.copytree(small.dir, tmp_path / "copy"))
    key = oio.fingerprint(oio.sources(copy))
    assert key == oio.fingerprint(oio.sources(small.dir))  # contents, not paths
    ranges = json.loads((copy / "alphabet_ranges.json").read_text())
    ranges[0][1] = "Renamed"
    (copy / "alphabet_ranges.json").write_text(json.dumps(ranges))
    assert oio.fingerprint(oio.sources(copy)) != key
    assert oio.load(copy).alphabets[0] == ("images_background", "Renamed")


def test_cache_root_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDMETA_CACHE", raising=False)
    assert oio.cache_root() == Path.home() / ".cache" / "fedmeta"
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path))
    assert oio.cache_root() == tmp_path


def _corrupt(small, root, what):
    shutil.copytree(small.dir, root)
    if what == "garbage npz":
        (root / "images_background.npz").write_bytes(b"garbage")
    elif what == "truncated npz":
        data = (small.dir / "images_evaluation.npz").read_bytes()
        (root / "images_evaluation.npz").write_bytes(data[: len(data) // 2])
    elif what == "no ranges":
        (root / "alphabet_ranges.json").unlink()
    elif what == "wrong ranges":
        (root / "alphabet_ranges.json").write_text(json.dumps(small.ranges[:-1]))
    elif what == "garbage zip":
        (root / "images_evaluation.npz").unlink()
        (root / "images_evaluation.zip").write_bytes(b"PK\x03\x04 garbage")
    elif what == "missing drawing":
        (root / "images_evaluation.npz").unlink()
        _write_official(small, root, sets=("images_evaluation",))
        next((root / "images_evaluation").rglob("*_20.png")).unlink()
    elif what == "bad png name":
        (root / "images_evaluation.npz").unlink()
        _write_official(small, root, sets=("images_evaluation",))
        png = next((root / "images_evaluation").rglob("*_03.png"))
        png.rename(png.with_name("drawing.png"))
    return root


@pytest.mark.parametrize("what, says", [
    ("missing folder", "no such folder"), ("empty folder", "found none of images_background.npz"),
    ("garbage npz", "corrupt"), ("truncated npz", "corrupt"), ("no ranges", "alphabet_ranges.json"),
    ("wrong ranges", "alphabet_ranges.json covers"), ("garbage zip", "corrupt"),
    ("missing drawing", "drawers"), ("bad png name", "expected IIII_DD.png"),
])
def test_bad_data_says_what_and_where_to_get_it(small, tmp_path, what, says):
    root = tmp_path / "data"
    if what == "empty folder":
        root.mkdir()
    elif what != "missing folder":
        _corrupt(small, root, what)
    with pytest.raises(OmniglotDataError, match=says) as err:
        oio.load(root)
    assert isinstance(err.value, OSError)
    message = str(err.value)
    assert str(root.resolve()) in message and "github.com/brendenlake/omniglot" in message
    assert "images_background.zip" in message and "characterNN" in message


# --- episodes ---------------------------------------------------------------------------------------------
def _cfg(small, **changes):
    return Config(task="omniglot", data_dir=str(small.dir), omniglot_split="alphabet", **changes)


def test_episode_shapes_dtypes_and_labels(small):
    src = omniglot.source(_cfg(small, ways=5), "test")  # 12 evaluation characters, no rotations
    cfg = _cfg(small, ways=5)  # the model and loss of the task: one table (fedmeta.tasks.families)
    assert (families.model_name(cfg), families.loss_name(cfg), src.num_classes) == ("conv4", "cross_entropy", 12)
    ep = src.sample(3, 2, 4, seeding.generator(0, "test"))
    assert [tuple(t.shape) for t in ep] == [(3, 10, 1, 28, 28), (3, 10), (3, 20, 1, 28, 28), (3, 20)]
    assert [t.dtype for t in ep] == [torch.float32, torch.int64, torch.float32, torch.int64]
    assert ep.support_x.min() >= 0 and ep.support_x.max() <= 1 and ep.query_x.max() == 1
    for t in range(3):
        assert torch.bincount(ep.support_y[t]).tolist() == [2] * 5
        assert torch.bincount(ep.query_y[t]).tolist() == [4] * 5


def test_each_label_is_one_character_with_distinct_drawings(small):
    """Find every episode image among all drawings: a label's support and query images are distinct
    drawings of one character, and different labels are different characters."""
    src = omniglot.source(_cfg(small, ways=4), "test")
    data = oio.load(small.dir)
    test_rows = np.flatnonzero(np.isin(data.char_ids, src.char_ids.numpy()))
    every = torch.from_numpy(data.images[test_rows]).flatten(2).float() / 255  # (12, 20, 784)
    ep = src.sample(5, 3, 2, seeding.generator(1, "test"))
    for t in range(5):
        chars = []
        for label in range(4):
            x = torch.cat([ep.support_x[t][ep.support_y[t] == label], ep.query_x[t][ep.query_y[t] == label]])
            hits = (x.flatten(1)[:, None, None, :] == every[None]).all(-1).nonzero()  # (image, char, drawing)
            assert len(hits) == 5 and hits[:, 0].tolist() == list(range(5))  # each found exactly once
            assert len(set(hits[:, 1].tolist())) == 1 and len(set(hits[:, 2].tolist())) == 5
            chars.append(int(hits[0, 1]))
        assert len(set(chars)) == 4


def test_sampling_is_seeded_and_classes_come_in_random_order(small):
    src = omniglot.source(_cfg(small, ways=5), "train")
    a = src.sample(4, 1, 3, seeding.generator(3, "test"))
    b = src.sample(4, 1, 3, seeding.generator(3, "test"))
    c = src.sample(4, 1, 3, seeding.generator(4, "test"))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a.support_x, c.support_x)
    cls, _ = src.sample_indices(200, 1, 1, seeding.generator(0, "test"))  # (200, 5)
    assert all(len(set(row)) == 5 for row in cls.tolist())
    assert (cls.diff(dim=1) < 0).any() and (cls.diff(dim=1) > 0).any()  # not sorted
    assert len(set(cls[:, 0].tolist())) > 30  # label 0 can be any class


def test_sample_images_are_the_indexed_drawings(small):
    src = omniglot.source(_cfg(small, ways=3), "train")
    ep = src.sample(2, 2, 3, seeding.generator(5, "test"))
    cls, draw = src.sample_indices(2, 2, 3, seeding.generator(5, "test"))
    want = src.images[cls[..., None], draw].float() / 255  # (2, 3, 5, 28, 28)
    assert torch.equal(ep.support_x.view(2, 3, 2, 28, 28), want[:, :, :2])
    assert torch.equal(ep.query_x.view(2, 3, 3, 28, 28), want[:, :, 2:])


def test_too_many_shots_or_ways_is_a_clear_error(small):
    src = omniglot.source(_cfg(small, ways=5), "test")
    g = seeding.generator(0, "test")
    with pytest.raises(ValueError, match="exceeds the 20 drawings"):
        src.sample(2, 5, 16, g)
    src.sample(1, 5, 15, g)  # exactly 20 is fine
    with pytest.raises(ValueError, match="has only 12 classes"):
        omniglot.source(_cfg(small, ways=13), "test")


def test_rotations_are_extra_classes_for_meta_training_only(small):
    train = omniglot.source(_cfg(small, ways=5), "train")  # 18 background characters
    assert train.num_classes == 72 and train.turns.tolist()[:5] == [0, 1, 2, 3, 0]
    base = train.images[train.turns == 0]  # (18, 20, 28, 28)
    for k in range(4):
        assert torch.equal(train.images[train.turns == k], torch.rot90(base, k, (-2, -1)))
        assert train.char_ids[train.turns == k].tolist() == list(range(1, 19))
    assert torch.equal(base, torch.from_numpy(oio.load(small.dir).images[:18]))
    assert not torch.equal(base, torch.rot90(base, 2, (-2, -1)))
    assert omniglot.source(_cfg(small, ways=5), "test").num_classes == 12
    assert omniglot.source(_cfg(small, ways=5, omniglot_rotations=False), "train").num_classes == 18


# --- splits and partitions ---------------------------------------------------------------------------------
def test_character_split_is_the_documented_maml_split():
    train, test = omniglot.character_split(1623)
    assert len(train) == 1200 and len(test) == 423
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1623))
    perm = np.random.RandomState(1).permutation(1623)  # the documented recipe
    assert set(train) == set(perm[:1200])
    assert test[:8].tolist() == [15, 20, 21, 24, 25, 36, 43, 44]  # pinned: the split must never move
    with pytest.raises(ValueError, match="omniglot-split = 'alphabet'"):
        omniglot.character_split(30)


def test_split_sources(small):
    with pytest.raises(ValueError, match="1200 meta-training characters"):
        omniglot.source(_cfg(small).replace(omniglot_split="character"))
    train, test = (omniglot.source(_cfg(small, omniglot_rotations=False), s) for s in ("train", "test"))
    assert train.char_ids.tolist() == list(range(1, 19)) and test.char_ids.tolist() == list(range(19, 31))
    with pytest.raises(ValueError, match="split"):
        omniglot.source(_cfg(small), "val")


def test_real_alphabets_and_their_groups():
    ranges = json.loads((DATA / "alphabet_ranges.json").read_text())
    counts = {s: [r[4] for r in ranges if r[0] == s] for s in oio.SETS}
    assert [len(counts[s]) for s in oio.SETS] == [30, 20] and [sum(counts[s]) for s in oio.SETS] == [964, 659]
    assert omniglot.alphabet_groups(list(range(30)), 30) == [[a] for a in range(30)]
    for n in (1, 4, 7, 29):
        groups = omniglot.alphabet_groups(list(range(30)), n)
        assert sum(groups, []) == list(range(30)) and max(map(len, groups)) - min(map(len, groups)) <= 1
    with pytest.raises(ValueError):
        omniglot.alphabet_groups(list(range(20)), 21)


def test_partitions_own_alphabets_and_heldout_ones_are_unseen(small):
    cfg = _cfg(small, ways=5, heldout_partitions=2)
    parts = [partition.task_source(cfg, p, 5) for p in range(5)]  # through fedmeta.partition
    ids = [set(p.char_ids.tolist()) for p in parts]
    assert ids[:3] == [set(range(1, 7)), set(range(7, 13)), set(range(13, 19))]  # one alphabet each
    assert ids[3] | ids[4] == set(range(19, 31)) and not ids[3] & ids[4]  # evaluation alphabets
    assert [p.num_classes for p in parts] == [24, 24, 24, 6, 6]  # rotations: training clients only
    assert small.alphabets[0][1] in parts[0].what and small.alphabets[3][1] in parts[3].what
    two = [set(omniglot.partition(cfg, p, 4).char_ids.tolist()) for p in range(2)]
    assert two == [set(range(1, 7)), set(range(7, 19))]  # 3 alphabets in contiguous groups of 1 and 2


def test_a_partition_is_one_call_to_its_family(small, monkeypatch):
    calls, real = [], omniglot.partition
    monkeypatch.setattr(bins, "bin_of", lambda *a: pytest.fail("omniglot partitions own alphabets, not bins"))
    monkeypatch.setattr(omniglot, "partition", lambda *a: calls.append(a) or real(*a))
    cfg = _cfg(small, heldout_partitions=2)
    assert set(partition.task_source(cfg, 1, 5).char_ids.tolist()) == set(range(7, 13))
    assert calls == [(cfg, 1, 5)]


def test_partition_errors(small):
    with pytest.raises(ValueError, match="own no alphabet"):
        omniglot.partition(_cfg(small, heldout_partitions=2), 0, 6)  # 4 training, 3 alphabets
    with pytest.raises(ValueError, match="own no alphabet"):
        omniglot.partition(_cfg(small, heldout_partitions=3), 0, 5)  # 3 held out, 2 alphabets
    with pytest.raises(ValueError, match="fewer than ways = 7"):
        omniglot.partition(_cfg(small, ways=7, heldout_partitions=2), 3, 5)
    with pytest.raises(ValueError, match="no such partition"):
        omniglot.partition(_cfg(small), 5, 5)


def test_maml_meta_gradient_on_an_omniglot_episode(small):
    cfg = _cfg(small, ways=3, algorithm="maml", inner_steps=1, inner_lr=0.4)
    algo = algorithms.build(cfg)
    meta = algo.init(seeding.generator(0, "init"))
    ep = partition.full_source(cfg).sample(2, 1, 2, seeding.generator(0, "train"))
    grads, loss = algo.meta_gradient(meta, ep)
    assert grads.keys() == meta.keys() and 0.5 < loss < 5.0
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


# --- the whole data set (slow: ~10 s cold) ----------------------------------------------------------------
@pytest.mark.slow
def test_full_data_splits_and_partitions():
    oio.forget()
    cfg = Config(task="omniglot", data_dir=str(DATA))
    data = oio.load(DATA)
    assert data.images.shape == (1623, 20, 28, 28) and data.char_ids.tolist() == list(range(1, 1624))
    assert len(data.alphabets_of("images_background")) == 30 and len(data.alphabets) == 50
    train, test = omniglot.source(cfg, "train"), omniglot.source(cfg, "test")
    assert (train.num_classes, test.num_classes) == (4800, 423)
    assert not set(train.char_ids.tolist()) & set(test.char_ids.tolist())
    assert test.char_ids.tolist() == (omniglot.character_split(1623)[1] + 1).tolist()
    a_train = omniglot.source(cfg.replace(omniglot_split="alphabet"), "train")
    assert a_train.num_classes == 964 * 4 and int(a_train.char_ids.max()) == 964
    parts = [omniglot.partition(cfg, p, 32) for p in range(32)]
    ids = [set(p.char_ids.tolist()) for p in parts]
    assert set().union(*ids[:30]) == set(range(1, 965)) and set().union(*ids[30:]) == set(range(965, 1624))
    assert sum(map(len, ids)) == 1623
    with pytest.raises(ValueError, match="fewer than ways = 20"):  # Blackfoot has 14 characters
        omniglot.partition(cfg.replace(ways=20), 5, 32)
