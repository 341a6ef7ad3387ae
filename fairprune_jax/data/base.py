"""The dataset interface every loader returns, seeded splits and batching.

A dataset is plain numpy: features ``x`` (float32), labels ``y`` (int32 class
ids), protected-group ids ``g`` (int32 in ``[0, num_groups)``) per split, plus
the names that make results readable. Batches are dicts ``{x, y, g, w}`` with
static shapes; ``w`` is 1.0 for real rows and 0.0 for padding, so evaluation of
a last partial batch reuses the same compiled step.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from fairprune_jax.core.notices import warn


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

    def fingerprint(self) -> dict:
        """What identifies this data: rows per split, the feature shape, class and group names, and a content
        hash over every split's features, labels and group ids (computed once per Dataset). ``--resume`` and
        a comparison's finished cells are only reused for data with the same fingerprint."""
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        import hashlib
        h = hashlib.blake2b(digest_size=12)
        for name, s in sorted(self.splits().items()):
            for arr in (s.x, s.y, s.g):
                a = np.ascontiguousarray(arr)
                h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
                h.update(a.data)
        h.update(repr((list(self.class_names), list(self.group_names))).encode())
        fp = {"rows": {k: int(len(s)) for k, s in self.splits().items()},
              "feature_shape": [int(d) for d in self.input_shape], "classes": len(self.class_names),
              "groups": len(self.group_names), "content": h.hexdigest()}
        self.__dict__["_fingerprint"] = fp
        return fp

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
    for idx in batch_indices(len(split), batch_size, seed, epoch):
        yield {"x": split.x[idx], "y": split.y[idx], "g": split.g[idx],
               "w": np.ones(batch_size, np.float32)}


def batch_indices(n: int, batch_size: int, seed: int, epoch: int = 0) -> Iterator[np.ndarray]:
    """The sorted row indices of each batch of :func:`train_batches` (one shuffle per ``(seed, epoch)``)."""
    if batch_size > n:
        raise ValueError(
            f"batch size {batch_size} is larger than the training split ({n} rows); use --batch-size <= {n}")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield np.sort(perm[start:start + batch_size])


def steps_per_epoch(split: Split, batch_size: int) -> int:
    return len(split) // batch_size


#: How :func:`eval_batches` fills the last batch: ``zeros`` (rows of zeros) or ``wrap`` (the split's first rows
#: again); either way with ``w = 0``, so no count includes them.
PADDINGS = ("zeros", "wrap")


def eval_batches(split: Split, batch_size: int, pad: str = "zeros") -> Iterator[dict[str, np.ndarray]]:
    """All rows in order, in batches of one static size; the last is padded with ``w = 0``.

    ``pad="wrap"`` fills it with the split's first rows instead of zeros: for a pass that runs BatchNorm in
    training mode (every row of a batch enters its statistics, ``w`` or not), where zero rows would skew the
    statistics of the last batch's real rows (FairGRAPE's importance, 3 real rows among 61 zero rows on digits)
    and make the result depend on the padding, i.e. on the device count that rounds the batch size."""
    if pad not in PADDINGS:
        raise ValueError(f"unknown padding {pad!r}; valid: {', '.join(PADDINGS)}")
    n = len(split)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        k = stop - start
        x, y, g = split.x[start:stop], split.y[start:stop], split.g[start:stop]
        w = np.ones(batch_size, np.float32)
        if k < batch_size:
            extra = batch_size - k
            if pad == "wrap":
                idx = np.arange(extra) % n
                x, y, g = (np.concatenate([a, b[idx]]) for a, b in ((x, split.x), (y, split.y), (g, split.g)))
            else:
                x = np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)])
                y = np.concatenate([y, np.zeros(extra, y.dtype)])
                g = np.concatenate([g, np.zeros(extra, g.dtype)])
            w[k:] = 0.0
        yield {"x": x, "y": y, "g": g, "w": w}


# ---------------------------------------------------------------------------
# Helpers shared by the loaders (groups, validation split, data locations).
# ---------------------------------------------------------------------------

#: Environment variable that overrides where the staged shared data lives.
SHARED_DATA_ENV = "FAIRPRUNE_SHARED_DATA"


def default_data_root() -> Path:
    """Where the staged real data lives: ``$FAIRPRUNE_SHARED_DATA`` or ``../shared/data`` from the repo root."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def derived_seed(seed: int, stream: int) -> int:
    """A seed for a separate random stream (e.g. the validation split) derived from ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1)[0])


def parse_attr_list(spec: str | list[str] | tuple[str, ...], valid: list[str] | tuple[str, ...], *,
                    what: str, dataset: str) -> list[str]:
    """Turn ``"race,gender"`` (or a list) into attribute names, checking each against ``valid``."""
    if isinstance(spec, str):
        names = [s.strip() for s in spec.split(",")]
    else:
        names = [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{dataset}: empty {what}; valid choices: {', '.join(valid)}")
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"{dataset}: unknown {what} {', '.join(repr(b) for b in bad)}; "
                         f"valid choices: {', '.join(valid)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{dataset}: {what} {', '.join(dup)} given more than once in {spec!r}")
    return names


#: A protected attribute is refused when it makes more than MANY_GROUPS groups of which at least half hold a
#: single row (a number column such as an age with decimals makes nearly every row its own group: nothing can be
#: trained, measured or certified). Small groups of several rows (100 classes of a small sample) are only
#: starred as small.
SINGLE_ROW_SHARE, MANY_GROUPS = 0.5, 20


def group_label(value: Any, *, quote: bool = False) -> str:
    """A category as it is written into group names: control characters (a newline in a CSV cell) shown
    escaped so a name stays on one line of every table; with ``quote`` (an intersection), a value holding the
    separator ``|`` or a double quote is double-quoted, so ``p|q`` x ``r`` and ``p`` x ``q|r`` stay apart."""
    s = str(value)
    if any(ord(ch) < 32 or ch == "\x7f" for ch in s):
        s = s.encode("unicode_escape").decode("ascii")
    if quote and ("|" in s or '"' in s):
        s = '"' + s.replace('"', '""') + '"'
    return s


def check_group_sizes(sizes: np.ndarray, names: list[str], rows: int, *, dataset: str) -> None:
    """Refuse groups too small to mean anything, with the numbers and the fix (bin the column)."""
    sizes = np.asarray(sizes)
    if sizes.size <= MANY_GROUPS:
        return
    median = float(np.median(sizes))
    if np.mean(sizes == 1) >= SINGLE_ROW_SHARE:
        raise ValueError(
            f"{dataset}: the protected attribute makes {sizes.size} groups over {rows} rows (median "
            f"{median:g} row(s) per group, {int((sizes == 1).sum())} groups of one row; e.g. "
            f"{', '.join(names[:5])}): per-group accuracy, gaps and certificates need groups of many rows. A "
            f"number column (an age, an income)? Bin it, e.g. --data-opt bins=COLUMN:30,45,60 (CSV), or choose a "
            f"column of a few categories")


def check_class_sizes(y: np.ndarray, names: Sequence[str], *, dataset: str) -> None:
    """Refuse a target whose classes are mostly single rows (the rule of :func:`check_group_sizes`): a number
    column (a price, an age with decimals) taken as the target makes every value a class, nothing can be
    learnt or measured, and the stratified test split shrinks to the few classes with two rows or more."""
    sizes = np.bincount(np.asarray(y, np.int64))
    sizes = sizes[sizes > 0]
    if sizes.size > MANY_GROUPS and np.mean(sizes == 1) >= SINGLE_ROW_SHARE:
        raise ValueError(
            f"{dataset}: the target makes {sizes.size} classes over {len(y)} rows ({int((sizes == 1).sum())} "
            f"classes of one row; e.g. {', '.join(map(str, list(names)[:5]))}): fairprune classifies, and each "
            "class needs many rows. A number column? Bin it into a few classes first, or predict one value "
            "against the rest (--data-opt positive_label=VALUE for a CSV)")


def encode_groups(codes: list[np.ndarray], categories: list[list[str]], *, keep: np.ndarray | None = None,
                  dataset: str = "dataset") -> tuple[np.ndarray, list[str], dict]:
    """Group ids for the (intersection of) protected attributes.

    ``codes[a]`` holds, for every row *before* filtering, the index of the row's
    value in ``categories[a]``. The groups are the product of the categories (in
    that order) named ``"A|B"``; combinations without rows are dropped and the
    remaining groups are numbered ``0..k-1``. ``keep`` (a boolean mask) marks the
    rows that survive filtering; group ids are returned for those rows only.

    A group that had rows before filtering but none after, or a category of a
    single attribute without rows, is reported in one warning. Intersections that
    never occur at all are dropped quietly (their number is in the returned info).
    """
    if len(codes) != len(categories) or not codes:
        raise ValueError("encode_groups needs one code array per attribute")
    dims = tuple(len(c) for c in categories)
    n = len(codes[0])
    if keep is None:
        keep = np.ones(n, bool)
    keep = np.asarray(keep, bool)
    flat = np.ravel_multi_index([np.asarray(c, np.int64) for c in codes], dims) if n else np.zeros(0, np.int64)
    size = int(np.prod(dims))
    before = np.bincount(flat, minlength=size)
    after = np.bincount(flat[keep], minlength=size)
    present = np.flatnonzero(after > 0)
    if len(codes) == 1:
        reported = np.flatnonzero(after == 0)
    else:
        reported = np.flatnonzero((before > 0) & (after == 0))
    never = int(((before == 0) & (after == 0)).sum()) if len(codes) > 1 else 0

    def name(i: int) -> str:
        idx = np.unravel_index(i, dims)
        return "|".join(group_label(categories[a][int(j)], quote=len(codes) > 1) for a, j in enumerate(idx))

    dropped = [name(int(i)) for i in reported]
    if dropped:
        shown = ", ".join(dropped[:10]) + (f", ... ({len(dropped) - 10} more)" if len(dropped) > 10 else "")
        warn(f"{dataset}: {len(dropped)} protected group(s) have no rows after filtering and were "
             f"dropped from the group names (ids re-numbered): {shown}")
    check_group_sizes(after[present], [name(int(i)) for i in present], int(keep.sum()), dataset=dataset)
    remap = np.full(size, -1, np.int64)
    remap[present] = np.arange(len(present))
    g = remap[flat[keep]].astype(np.int32)
    names = [name(int(i)) for i in present]
    info = {"empty_groups_dropped": dropped, "empty_intersections_dropped": never}
    return g, names, info


def carve_validation(train: Split, val_fraction: float | None, seed: int) -> tuple[Split, Split | None]:
    """Split a validation part off ``train`` (stratified by group and label); ``None`` keeps train whole."""
    if val_fraction is None or val_fraction == 0:
        return train, None
    val_fraction = float(val_fraction)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    rest, held = stratified_split(train.y, train.g, val_fraction, seed=derived_seed(seed, 1))
    if len(held) == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves the validation split empty "
                         f"(train has {len(train)} rows); use a larger fraction")
    return train.take(rest), train.take(held)


def check_fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1); got {value}")
    return value


def carve_validation_indices(idx: np.ndarray, y: np.ndarray, g: np.ndarray, val_fraction: float | None,
                             seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Index version of :func:`carve_validation`: split ``idx`` (train rows) into (train, val)."""
    if val_fraction is None or val_fraction == 0:
        return idx, None
    val_fraction = check_fraction(val_fraction, "val_fraction")
    rest, held = stratified_split(y[idx], g[idx], val_fraction, seed=derived_seed(seed, 1))
    if len(held) == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves the validation split empty "
                         f"(train has {len(idx)} rows); use a larger fraction")
    return idx[rest], idx[held]


def uint8_channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std of uint8 NHWC images, in [0, 1] units (integer sums, in chunks)."""
    c = images.shape[-1]
    flat = images.reshape(-1, c)
    s = np.zeros(c, np.int64)
    ss = np.zeros(c, np.int64)
    for start in range(0, flat.shape[0], 1 << 16):
        chunk = flat[start:start + (1 << 16)].astype(np.int32)
        s += chunk.sum(0, dtype=np.int64)
        ss += (chunk * chunk).sum(0, dtype=np.int64)
    n = max(flat.shape[0], 1)
    mean = s / n
    var = np.maximum(ss / n - mean * mean, 0.0)
    std = np.where(var > 1e-12, np.sqrt(var), 255.0)
    return [float(v) for v in mean / 255.0], [float(v) for v in std / 255.0]


def image_dataset(name: str, parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], *, group_names,
                  group_attrs, class_names, val_fraction, seed, normalize, meta) -> Dataset:
    """A :class:`Dataset` from uint8 NHWC image parts per split; a ``val`` part is used as given, else
    ``val_fraction`` of train (stratified; none when it is None)."""
    if "val" not in parts:
        images, y, g = parts["train"]
        tr, va = carve_validation_indices(np.arange(len(y)), y, g, val_fraction, seed)
        parts = dict(parts, train=(images[tr], y[tr], g[tr]))
        if va is not None:
            parts["val"] = (images[va], y[va], g[va])
    splits, img_meta = image_splits(parts, normalize=normalize)
    return Dataset(name=name, train=splits["train"], test=splits["test"], val=splits.get("val"),
                   group_names=group_names, group_attrs=group_attrs, class_names=class_names,
                   meta={**meta, "val_fraction": val_fraction, "split_seed": seed, **img_meta})


def groups_over_splits(name: str, split_codes: dict[str, list[np.ndarray]], categories: list[list[str]]
                       ) -> tuple[dict[str, np.ndarray], list[str], dict]:
    """Group ids over every split together (one numbering), from per-attribute category indices."""
    order = list(split_codes)
    sizes = [len(split_codes[s][0]) for s in order]
    codes = [np.concatenate([split_codes[s][a] for s in order]) for a in range(len(categories))]
    g, names, info = encode_groups(codes, categories, dataset=name)
    cuts = np.cumsum([0] + sizes)
    return {s: g[cuts[i]:cuts[i + 1]] for i, s in enumerate(order)}, names, info


def image_splits(parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                 normalize: bool = False) -> tuple[dict[str, Split], dict]:
    """uint8 NHWC images per split -> float32 :class:`Split` objects in [0, 1].

    The per-channel mean/std of the *train* split (in [0, 1] units) always go
    into the returned meta; ``normalize=True`` also applies them to every split.
    """
    out: dict[str, Split] = {}
    train_images = np.asarray(parts["train"][0])
    if train_images.dtype != np.uint8:
        raise TypeError(f"image_splits expects uint8 images; got {train_images.dtype}")
    mean, std = uint8_channel_stats(train_images)
    for name, (images, y, g) in parts.items():
        x = np.divide(np.asarray(images), np.float32(255.0), dtype=np.float32)
        out[name] = Split(x, y, g)
    if normalize:
        m = np.asarray(mean, np.float32)
        s = np.asarray(std, np.float32)
        for split in out.values():
            split.x -= m
            split.x /= s
    meta = {"layout": "NHWC", "pixel_scale": "x / 255 in [0, 1]",
            "normalized": bool(normalize), "channel_mean": mean, "channel_std": std,
            "normalization_fitted_on": "train"}
    return out, meta
