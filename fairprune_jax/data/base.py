"""The dataset interface every loader returns, seeded splits and batching.

A dataset is plain numpy: features ``x`` (float32), labels ``y`` (int32 class
ids), protected-group ids ``g`` (int32 in ``[0, num_groups)``) per split, plus
the names that make results readable. Batches are dicts ``{x, y, g, w}`` with
static shapes; ``w`` is 1.0 for real rows and 0.0 for padding, so evaluation of
a last partial batch reuses the same compiled step.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np


@dataclasses.dataclass
class Split:
    """One split of a dataset: features, labels and group ids."""

    x: np.ndarray
    y: np.ndarray
    g: np.ndarray

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x)
        if self.x.dtype != np.float32:
            self.x = self.x.astype(np.float32)
        self.y = np.asarray(self.y).astype(np.int32)
        self.g = np.asarray(self.g).astype(np.int32)
        n = self.x.shape[0]
        if self.y.shape != (n,):
            raise ValueError(f"labels y must have shape ({n},) to match x {self.x.shape}; got {self.y.shape}")
        if self.g.shape != (n,):
            raise ValueError(f"group ids g must have shape ({n},) to match x {self.x.shape}; got {self.g.shape}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, idx: np.ndarray) -> "Split":
        return Split(self.x[idx], self.y[idx], self.g[idx])


@dataclasses.dataclass
class Dataset:
    """What every loader returns.

    ``group_names[i]`` names group id ``i``; ``group_attrs`` lists the
    protected attribute(s) the groups come from (several for intersections);
    ``class_names[c]`` names label ``c``. ``meta`` carries loader facts
    (source path, preprocessing, dropped rows) that go into results.json.
    """

    name: str
    train: Split
    test: Split
    group_names: list[str]
    group_attrs: list[str]
    class_names: list[str]
    val: Split | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def splits(self) -> dict[str, Split]:
        out = {"train": self.train, "test": self.test}
        if self.val is not None:
            out["val"] = self.val
        return out

    def validate(self) -> None:
        """Raise a clear error if labels or group ids are out of range or shapes disagree."""
        for split_name, s in self.splits().items():
            if len(s) == 0:
                raise ValueError(f"dataset {self.name!r}: split {split_name!r} is empty")
            if s.x.shape[1:] != self.input_shape:
                raise ValueError(
                    f"dataset {self.name!r}: split {split_name!r} has feature shape {s.x.shape[1:]}, "
                    f"train has {self.input_shape}")
            if s.y.min() < 0 or s.y.max() >= self.num_classes:
                raise ValueError(
                    f"dataset {self.name!r}: split {split_name!r} has labels in [{s.y.min()}, {s.y.max()}] "
                    f"but only {self.num_classes} class names ({self.class_names[:5]}...)")
            if s.g.min() < 0 or s.g.max() >= self.num_groups:
                raise ValueError(
                    f"dataset {self.name!r}: split {split_name!r} has group ids in [{s.g.min()}, {s.g.max()}] "
                    f"but only {self.num_groups} group names")
            if not np.isfinite(s.x).all():
                bad = int((~np.isfinite(s.x)).reshape(len(s), -1).any(axis=1).sum())
                raise ValueError(
                    f"dataset {self.name!r}: split {split_name!r} has {bad} rows with NaN or Inf features; "
                    "clean or impute them before training")


def stratified_split(
    y: np.ndarray, g: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of indices into (rest, held_out), stratified by (group, label).

    Each (group, label) cell contributes ``round(fraction * n_cell)`` rows to
    the held-out part (at least one when the cell has two or more rows).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1); got {fraction}")
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    g = np.asarray(g)
    cell = g.astype(np.int64) * (int(y.max()) + 1) + y.astype(np.int64)
    held = []
    for c in np.unique(cell):
        idx = np.flatnonzero(cell == c)
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        held.append(idx[:k])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(len(y), bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def train_batches(
    split: Split, batch_size: int, seed: int, epoch: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled full batches for one epoch (the last partial batch is dropped).

    The order depends only on ``(seed, epoch)``, so a run is reproducible and
    can resume mid-way.
    """
    n = len(split)
    if batch_size > n:
        raise ValueError(
            f"batch size {batch_size} is larger than the training split ({n} rows); use --batch-size <= {n}")
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        idx = np.sort(perm[start:start + batch_size])
        yield {"x": split.x[idx], "y": split.y[idx], "g": split.g[idx],
               "w": np.ones(batch_size, np.float32)}


def steps_per_epoch(split: Split, batch_size: int) -> int:
    return len(split) // batch_size


def eval_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """All rows in order, in batches of one static size; the last is padded with ``w = 0``."""
    n = len(split)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        k = stop - start
        x, y, g = split.x[start:stop], split.y[start:stop], split.g[start:stop]
        w = np.ones(batch_size, np.float32)
        if k < batch_size:
            pad = batch_size - k
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
            g = np.concatenate([g, np.zeros(pad, g.dtype)])
            w[k:] = 0.0
        yield {"x": x, "y": y, "g": g, "w": w}
