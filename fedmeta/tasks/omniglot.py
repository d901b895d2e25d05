"""Few-shot Omniglot, N-way K-shot, as in MAML (Finn, Abbeel & Levine 2017, §5.2; data: Lake et al.
2015). Reading, preprocessing and caching live in `omniglot_io`.

A task draws `ways` classes and, per class, `shots + query_shots` distinct drawings of its 20.
Labels 0..ways-1 follow the random order the classes were drawn in; support and query are
class-major: (tasks, ways * shots, 1, 28, 28) float32 with ink = 1.

Classes are characters and, for meta-training when `omniglot-rotations` is on, their rotations by
0/90/180/270 degrees as four distinct classes (`torch.rot90`, counter-clockwise); never for
meta-test or held-out clients.

Splits (`omniglot-split`):
- "character": the MAML split. `p = numpy.random.RandomState(1).permutation(1623)` (a frozen,
  version-stable stream, independent of the run seed); the characters with ids `p[:1200] + 1`
  meta-train, the other 423 meta-test (ids 1..1623 count background then evaluation, the row order
  of `images_background.npz` then `images_evaluation.npz`).
- "alphabet": the 30 background alphabets (964 characters) meta-train, the 20 evaluation
  alphabets (659 characters) meta-test.

Federated partition (`partition`, any `omniglot-split`): the first `num_partitions - heldout_partitions`
partitions are training clients owning contiguous groups of the 30 background alphabets (one
each with 30 training partitions); the last `heldout_partitions` own contiguous groups of the 20
evaluation alphabets, which no training client sees.

Global labels (`algorithm = "pretrain-global"`): every class a training partition may own (the
background alphabets with `partition = "non-iid"`, the meta-train split with "iid"; rotations
included) has one label, its rank in (character id, quarter turns) order, so that every client
agrees on the label ids: 964 x 4 = 3856 classes for the background alphabets, and a training
partition's classes are a contiguous range of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config
from . import Episode
from .omniglot_io import DRAWINGS, SETS, SIZE, Omniglot, OmniglotDataError, load

SPLIT_SEED = 1  # numpy RandomState seed of the "character" split
TRAIN_CHARACTERS = 1200


@dataclass(frozen=True, eq=False)
class OmniglotTasks:
    """N-way episodes over a set of classes; a rotated character is a class of its own, stored
    rotated, so that sampling is one `index_select`."""

    images: torch.Tensor  # (classes, 20, 28, 28) uint8, ink 255
    char_ids: torch.Tensor  # (classes,) int64 character id (1..1623) of each class
    turns: torch.Tensor  # (classes,) int64 quarter turns (counter-clockwise) of each class
    ways: int
    what: str = "omniglot"  # names the source in error messages
    labels: torch.Tensor | None = None  # (classes,) int64 global label of each class; None: outside the space

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.shape[1:] != (DRAWINGS, SIZE, SIZE):
            raise ValueError(f"images must be uint8 (classes, {DRAWINGS}, {SIZE}, {SIZE}); got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if not len(self.images) == len(self.char_ids) == len(self.turns):
            raise ValueError("images, char_ids and turns must have one row per class")
        if self.labels is not None and self.labels.shape != self.char_ids.shape:
            raise ValueError("labels must have one entry per class")
        if self.ways < 1:
            raise ValueError(f"ways = {self.ways}: must be >= 1")
        if self.ways > len(self.images):
            raise ValueError(f"ways = {self.ways}: {self.what} has only {len(self.images)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.images)

    def sample_indices(self, num_tasks: int, shots: int, query_shots: int,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Classes (tasks, ways) and drawings (tasks, ways, shots + query_shots) of an episode."""
        if num_tasks < 1 or shots < 1 or query_shots < 1:
            raise ValueError(f"need num_tasks, shots, query_shots >= 1; got {num_tasks}, {shots}, {query_shots}")
        if shots + query_shots > DRAWINGS:
            raise ValueError(f"shots + query-shots = {shots} + {query_shots} exceeds the {DRAWINGS} drawings of an "
                             "Omniglot character (this includes eval-shots + eval-query-shots)")
        # ways distinct classes per task, in random order: the `ways` largest of iid uniforms
        cls = torch.rand(num_tasks, self.num_classes, generator=generator).topk(self.ways, 1).indices
        draw = torch.rand(num_tasks, self.ways, DRAWINGS, generator=generator).argsort(2)[..., :shots + query_shots]
        return cls, draw

    def sample(self, num_tasks: int, shots: int, query_shots: int,
               generator: torch.Generator | None) -> Episode:
        cls, draw = self.sample_indices(num_tasks, shots, query_shots, generator)
        n, ways = shots + query_shots, self.ways
        rows = (cls[..., None] * DRAWINGS + draw).flatten()  # into (classes * 20) drawings
        img = self.images.view(-1, SIZE * SIZE).index_select(0, rows)  # (tasks * ways * n, 784) uint8
        x = img.view(num_tasks, ways, n, 1, SIZE, SIZE).float().div_(255.0)  # ink = 1
        y = torch.arange(ways).view(1, ways, 1)  # label = position of the class in the draw

        def part(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
            k = hi - lo  # class-major: (tasks, ways * k, ...)
            return (x[:, :, lo:hi].reshape(num_tasks, ways * k, 1, SIZE, SIZE),
                    y.expand(num_tasks, ways, k).reshape(num_tasks, ways * k))

        return Episode(*part(0, shots), *part(shots, n))

    def sample_labelled(self, num_images: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`num_images` images of uniformly drawn classes and drawings (with replacement) and their
        global labels: x (images, 1, 28, 28) float32 with ink = 1, y (images,) int64."""
        if self.labels is None:
            raise ValueError(f"{self.what} has no global labels: not all its classes are among those training "
                             "partitions own (held-out partitions and meta-test sets only evaluate; central "
                             "training with partition = 'non-iid' needs omniglot-split = 'alphabet')")
        cls = torch.randint(self.num_classes, (num_images,), generator=generator)
        draw = torch.randint(DRAWINGS, (num_images,), generator=generator)
        x = self.images[cls, draw].unsqueeze(1).float().div_(255.0)  # (images, 1, 28, 28)
        return x, self.labels[cls]


def tasks_of(data: Omniglot, rows: np.ndarray, ways: int, rotations: bool, what: str,
             space: torch.Tensor | None = None) -> OmniglotTasks:
    """A task source over the characters `rows` of `data`, with 4 rotations each if `rotations`; its
    classes get global labels if they all lie in `space` (`global_space`)."""
    images = torch.from_numpy(data.images[np.asarray(rows, dtype=np.int64)])  # (chars, 20, 28, 28), a copy
    ids = torch.from_numpy(data.char_ids[rows])
    turns = 4 if rotations else 1
    if rotations:  # class order (character, turns)
        images = torch.stack([torch.rot90(images, k, (-2, -1)) for k in range(turns)], 1).flatten(0, 1)
    char_ids, quarter_turns = ids.repeat_interleave(turns), torch.arange(turns).repeat(len(ids))
    return OmniglotTasks(images.contiguous(), char_ids, quarter_turns, ways, what,
                         None if space is None else _labels(space, char_ids, quarter_turns))


def _key(char_ids: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """One int per class, increasing in (character id, quarter turns)."""
    return char_ids * 4 + turns


def _labels(space: torch.Tensor, char_ids: torch.Tensor, turns: torch.Tensor) -> torch.Tensor | None:
    """The global labels of classes: their ranks in `space`; None if one is not in it."""
    keys = _key(char_ids, turns)
    labels = torch.searchsorted(space, keys).clamp_(max=len(space) - 1)
    return labels if bool((space[labels] == keys).all()) else None


# --- splits ---------------------------------------------------------------------------------------------
def character_split(num_chars: int, train: int = TRAIN_CHARACTERS) -> tuple[np.ndarray, np.ndarray]:
    """MAML's random character split: (train rows, test rows), each sorted."""
    if not 0 < train < num_chars:
        raise ValueError(f"the character split takes {train} meta-training characters, the data has "
                         f"{num_chars}; use omniglot-split = 'alphabet' for a partial data set")
    perm = np.random.RandomState(SPLIT_SEED).permutation(num_chars)
    return np.sort(perm[:train]), np.sort(perm[train:])


def alphabet_split(data: Omniglot) -> tuple[np.ndarray, np.ndarray]:
    """Background alphabets meta-train, evaluation alphabets meta-test: (train rows, test rows)."""
    return tuple(data.rows_of(data.alphabets_of(s)) for s in SETS)  # type: ignore[return-value]


def alphabet_groups(alphabets: list[int], groups: int) -> list[list[int]]:
    """`groups` contiguous groups of `alphabets`, sizes differing by at most one."""
    n = len(alphabets)
    if not 0 < groups <= n:
        raise ValueError(f"cannot cut {n} alphabets into {groups} groups")
    return [alphabets[g * n // groups:(g + 1) * n // groups] for g in range(groups)]


# --- the family's entry points (fedmeta.tasks.families) --------------------------------------------------
def _split(cfg: Config, data: Omniglot) -> tuple[np.ndarray, np.ndarray]:
    """(meta-train rows, meta-test rows) of `omniglot-split`."""
    return character_split(len(data.char_ids)) if cfg.omniglot_split == "character" else alphabet_split(data)


def global_space(cfg: Config, data: Omniglot) -> torch.Tensor:
    """Sorted keys (`_key`) of every class a training partition may own: the background alphabets
    (non-iid partitions) or the meta-train split (iid), 4 rotations each if `omniglot-rotations`."""
    rows = data.rows_of(data.alphabets_of(SETS[0])) if cfg.partition == "non-iid" else _split(cfg, data)[0]
    ids = torch.from_numpy(data.char_ids[rows])  # increasing
    turns = 4 if cfg.omniglot_rotations else 1
    return _key(ids[:, None], torch.arange(turns)).flatten()  # (classes,)


def global_classes(cfg: Config) -> int:
    """The size of the global label space (3856 for the background alphabets with rotations)."""
    return len(global_space(cfg, _load(cfg)))


def source(cfg: Config, split: str = "train") -> OmniglotTasks:
    """Central meta-train ("train", with rotations if enabled) or meta-test ("test") source."""
    if split not in ("train", "test"):
        raise ValueError(f"split = {split!r}: must be 'train' or 'test'")
    data = _load(cfg)
    train, test = _split(cfg, data)
    rows = train if split == "train" else test
    return tasks_of(data, rows, cfg.ways, cfg.omniglot_rotations and split == "train",
                    f"the Omniglot {cfg.omniglot_split} split's {split} set ({len(rows)} characters)",
                    global_space(cfg, data) if split == "train" else None)


def partition(cfg: Config, partition_id: int, num_partitions: int) -> OmniglotTasks:
    """A client's alphabets: background groups for training clients, evaluation groups held out."""
    heldout = cfg.heldout_partitions
    n_train = num_partitions - heldout
    if not 0 <= partition_id < num_partitions or n_train < 0:
        raise ValueError(f"partition-id = {partition_id}, num-partitions = {num_partitions}, "
                         f"heldout-partitions = {heldout}: no such partition")
    data = _load(cfg)
    background, evaluation = (data.alphabets_of(s) for s in SETS)
    for count, alphabets, kind in ((n_train, background, "training"), (heldout, evaluation, "held-out")):
        if count > len(alphabets):
            raise ValueError(f"{count} {kind} partitions but only {len(alphabets)} "
                             f"{'background' if kind == 'training' else 'evaluation'} alphabets: a partition "
                             "would own no alphabet (num-partitions, heldout-partitions)")
    train = partition_id < n_train
    group = (alphabet_groups(background, n_train)[partition_id] if train
             else alphabet_groups(evaluation, heldout)[partition_id - n_train])
    rows = data.rows_of(group)
    names = ", ".join(data.alphabets[a][1] for a in group)
    if len(rows) < cfg.ways:
        raise ValueError(f"partition {partition_id} owns {len(rows)} characters ({names}), fewer than "
                         f"ways = {cfg.ways}; use fewer partitions or fewer ways")
    return tasks_of(data, rows, cfg.ways, cfg.omniglot_rotations and train, f"partition {partition_id} ({names})",
                    global_space(cfg, data) if train else None)


def _load(cfg: Config) -> Omniglot:
    return load(os.path.expanduser(cfg.data_dir))


__all__ = ["OmniglotDataError", "OmniglotTasks", "alphabet_groups", "alphabet_split", "character_split",
           "global_classes", "global_space", "partition", "source", "tasks_of"]


def main(argv: list[str] | None = None) -> dict:
    """Prepare the cache and time it: `python -m fedmeta.tasks.omniglot [--data-dir D] [--fresh-cache]
    [--out results/omniglot-data]`. --fresh-cache times a cold start in a temporary cache."""
    import argparse
    import json
    import tempfile
    import time

    from . import omniglot_io

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--data-dir", default=Config.data_dir)
    ap.add_argument("--fresh-cache", action="store_true")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.fresh_cache:
            os.environ["FEDMETA_CACHE"] = tmp
        times = {"cache": str(omniglot_io.cache_root()), "torch_threads": 1}
        t = time.perf_counter()
        omniglot_io.load(args.data_dir)
        times["first_load_s"] = time.perf_counter() - t  # cold with --fresh-cache
        omniglot_io.forget()
        t = time.perf_counter()
        omniglot_io.load(args.data_dir)
        times["warm_load_s"] = time.perf_counter() - t  # from the disk cache
        for ways, tasks, shots, query in ((5, 32, 1, 15), (20, 16, 5, 15)):
            cfg = Config(task="omniglot", data_dir=args.data_dir, ways=ways)
            for split in ("train", "test"):
                t = time.perf_counter()
                src = source(cfg, split)
                name = f"{split}_{ways}way"
                times[f"source_{name}_s"] = time.perf_counter() - t
                g = torch.Generator().manual_seed(0)
                t = time.perf_counter()
                for _ in range(args.episodes):
                    src.sample(tasks, shots, query, g)
                dt = (time.perf_counter() - t) / args.episodes
                times[f"sample_{name}_{tasks}tasks_{shots}shot_{query}query_ms"] = 1e3 * dt
                times[f"sample_{name}_images_per_s"] = tasks * ways * (shots + query) / dt
    print(json.dumps(times, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "timings.json"), "w") as f:
            json.dump(times, f, indent=1)
    return times


if __name__ == "__main__":
    main()
