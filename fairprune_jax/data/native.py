"""CIFAR-10, CIFAR-100, CelebA and FairFace read from the files their authors distribute (no TensorFlow).

Registered as ``cifar10``, ``cifar100``, ``celeba`` and ``fairface``: point ``--data-dir`` at the extracted
download (the layouts below; a missing file is an error that names the download and the layout). The
``tfds:*`` loaders read the same datasets from a TensorFlow Datasets build instead.

- ``cifar10``: ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``),
  the python pickles of https://www.cs.toronto.edu/~kriz/cifar.html; the 10 classes are the groups.
- ``cifar100``: ``cifar-100-python/`` (``train``, ``test``, ``meta``); groups are the 100 classes
  (``protected=label``) or the 20 superclasses (``coarse_label``), as in Balancing Act's CIFAR-100 table.
- ``celeba``: ``img_align_celeba/`` (``000001.jpg`` ..), ``list_attr_celeba.txt`` and ``list_eval_partition.txt``
  (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, "Align&Cropped Images" and the annotation files); the
  official train / val / test partition; target and protected from its 40 binary attributes.
- ``fairface``: ``fairface_label_train.csv``, ``fairface_label_val.csv`` and the image folders they name
  (``train/1.jpg``, ``val/1.jpg``; https://github.com/joojs/fairface, either padding); its val split is the test
  split (FairFace publishes no other), a ``val_fraction`` of train the validation split.

Images are center-cropped to a square and resized to ``image_size`` (Pillow, LANCZOS); ``max_examples`` caps
every split (the first rows of each, in file order), for a quick run on a CPU.
"""
from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fairprune_jax.data.base import Dataset, groups_over_splits, image_dataset, parse_attr_list
from fairprune_jax.data.tfds import CIFAR100_GROUPINGS, _check_size, _to_size
from fairprune_jax.data.utkface import _decode_files

CIFAR10_LAYOUT = ("cifar-10-batches-py/ holding data_batch_1 .. data_batch_5, test_batch and batches.meta (download "
                  "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it; --data-dir is that "
                  "folder or the one containing it)")
CIFAR100_LAYOUT = ("cifar-100-python/ holding train, test and meta (download "
                   "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it; --data-dir is that "
                   "folder or the one containing it)")
CELEBA_LAYOUT = ("a folder holding img_align_celeba/ (000001.jpg ...), list_attr_celeba.txt and "
                 "list_eval_partition.txt (from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html: 'Align&Cropped "
                 "Images' img_align_celeba.zip, Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt)")
FAIRFACE_LAYOUT = ("a folder holding fairface_label_train.csv, fairface_label_val.csv (columns file, age, gender, "
                   "race) and the image folders their file column names (train/1.jpg, val/1.jpg; from "
                   "https://github.com/joojs/fairface: the images zip, padding 0.25 or 1.25, and the label CSVs)")

FAIRFACE_ATTRIBUTES = ("race", "gender", "age")
#: FairFace's categories in the order of its paper (Karkkainen & Joo 2021); a value outside them is an error.
FAIRFACE_CATEGORIES = {
    "race": ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"),
    "gender": ("Male", "Female"),
    "age": ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"),
}


def _find(data_dir: str | os.PathLike | None, name: str, marker: str, layout: str, sub: str | None = None) -> Path:
    """The folder holding ``marker``: ``data_dir`` itself or its ``sub`` folder; else an error naming the layout."""
    if data_dir is None:
        raise FileNotFoundError(f"{name}: no --data-dir given and nothing is downloaded here; expected {layout}")
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"{name}: data_dir {d} does not exist or is not a folder; expected {layout}")
    for cand in ([d / sub] if sub else []) + [d]:
        if (cand / marker).exists():
            return cand
    raise FileNotFoundError(f"{name}: {marker} not found in {d}" + (f" or {d / sub}" if sub else "")
                            + f"; expected {layout}")


def _unpickle(path: Path, name: str, layout: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} is missing; expected {layout}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{name}: {path} is not a CIFAR python pickle ({type(e).__name__}: {e}); expected "
                         f"{layout}") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_images(d: dict, path: Path, name: str, image_size: int, cap: int | None) -> np.ndarray:
    data = np.asarray(d.get("data"))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{name}: {path} holds data of shape {data.shape}, not (N, 3072) rows of 32x32x3 images")
    if data.dtype != np.uint8 and not (np.issubdtype(data.dtype, np.integer) and data.size
                                       and 0 <= data.min() and data.max() <= 255):
        span = f", values {data.min():g} to {data.max():g}" if data.size and np.issubdtype(data.dtype, np.number) \
            else ""
        raise ValueError(f"{name}: {path} holds {data.dtype} pixels{span}; CIFAR pickles hold uint8 pixels 0-255 "
                         "(convert it with (x * 255).round().astype(np.uint8) if it holds 0-1 floats)")
    images = data[:cap].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8)   # planes R, G, B -> NHWC
    if image_size != 32:
        images = np.stack([_to_size(im, image_size) for im in images])
    return images


def _cifar_labels(d: dict, key: str, path: Path, name: str, k: int, layout: str) -> np.ndarray:
    """``d[key]`` as int64 labels, one per image row of ``d["data"]``, each in ``[0, k)``; else an error naming
    the file (a short label list would shift every later label onto another image)."""
    if key not in d:
        raise ValueError(f"{name}: {path} has no {key}; expected {layout}")
    raw = np.asarray(d[key])
    if raw.ndim != 1 or not (np.issubdtype(raw.dtype, np.integer) or raw.size == 0):
        raise ValueError(f"{name}: {path}'s {key} must be a list of integers; got {raw.dtype} of shape {raw.shape}")
    rows = int(np.shape(d.get("data"))[0]) if np.ndim(d.get("data")) == 2 else None
    if rows is not None and raw.shape[0] != rows:
        raise ValueError(f"{name}: {path} holds {rows} images and {raw.shape[0]} {key}: each image needs one label "
                         "(a damaged or partly written file; copy it again)")
    bad = np.flatnonzero((raw < 0) | (raw >= k))
    if bad.size:
        raise ValueError(f"{name}: {path}'s {key} holds {bad.size} value(s) outside 0-{k - 1} (e.g. {raw[bad[0]]} at "
                         f"row {bad[0]})")
    return raw.astype(np.int64)


def _names(meta: dict, key: str, k: int) -> list[str]:
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(key, [])]
    return names if len(names) == k else [str(i) for i in range(k)]


def load_cifar10(data_dir: str | os.PathLike | None = None, *, image_size: int = 32,
                 val_fraction: float | None = None, seed: int = 0, normalize: bool = False,
                 max_examples: int | None = None) -> Dataset:
    """CIFAR-10 from its python pickle batches; the 10 classes are also the protected groups."""
    name = "cifar10"
    image_size = _check_size(image_size, name)
    d = _find(data_dir, name, "data_batch_1", CIFAR10_LAYOUT, sub="cifar-10-batches-py")
    meta = _unpickle(d / "batches.meta", name, CIFAR10_LAYOUT) if (d / "batches.meta").is_file() else {}
    class_names = _names(meta, "label_names", 10)
    train = [_unpickle(d / f"data_batch_{i}", name, CIFAR10_LAYOUT) for i in range(1, 6)]
    test = _unpickle(d / "test_batch", name, CIFAR10_LAYOUT)
    cap = None if max_examples is None else int(max_examples)
    x_tr = np.concatenate([_cifar_images(b, d / f"data_batch_{i + 1}", name, image_size, None)
                           for i, b in enumerate(train)])[:cap]
    y_tr = np.concatenate([_cifar_labels(b, "labels", d / f"data_batch_{i + 1}", name, 10, CIFAR10_LAYOUT)
                           for i, b in enumerate(train)])[:cap]
    x_te = _cifar_images(test, d / "test_batch", name, image_size, cap)
    y_te = _cifar_labels(test, "labels", d / "test_batch", name, 10, CIFAR10_LAYOUT)[:cap]
    return _cifar(name, {"train": (x_tr, y_tr), "test": (x_te, y_te)}, "label", {"label": class_names},
                  class_names, image_size, str(d), val_fraction, seed, normalize, max_examples)


def load_cifar100(data_dir: str | os.PathLike | None = None, *, protected: str = "label", image_size: int = 32,
                  val_fraction: float | None = None, seed: int = 0, normalize: bool = False,
                  max_examples: int | None = None) -> Dataset:
    """CIFAR-100 from its python pickles; groups are the 100 classes (``protected="label"``) or the 20
    superclasses (``"coarse_label"``)."""
    name = "cifar100"
    if protected == "fine_label":
        protected = "label"
    if protected not in CIFAR100_GROUPINGS:
        raise ValueError(f"{name}: unknown protected {protected!r}; valid choices: {', '.join(CIFAR100_GROUPINGS)} "
                         "(fine_label is an alias of label)")
    image_size = _check_size(image_size, name)
    d = _find(data_dir, name, "train", CIFAR100_LAYOUT, sub="cifar-100-python")
    meta = _unpickle(d / "meta", name, CIFAR100_LAYOUT) if (d / "meta").is_file() else {}
    cap = None if max_examples is None else int(max_examples)
    parts, coarse = {}, {}
    for split in ("train", "test"):
        b = _unpickle(d / split, name, CIFAR100_LAYOUT)
        parts[split] = (_cifar_images(b, d / split, name, image_size, cap),
                        _cifar_labels(b, "fine_labels", d / split, name, 100, CIFAR100_LAYOUT)[:cap])
        if protected == "coarse_label":          # the superclasses are the groups: they must be there
            coarse[split] = _cifar_labels(b, "coarse_labels", d / split, name, 20, CIFAR100_LAYOUT)[:cap]
    names = {"label": _names(meta, "fine_label_names", 100), "coarse_label": _names(meta, "coarse_label_names", 20)}
    return _cifar(name, parts, protected, names, names["label"], image_size, str(d), val_fraction, seed, normalize,
                  max_examples, coarse=coarse)


def _cifar(name, parts, grouping, names, class_names, image_size, source, val_fraction, seed, normalize,
           max_examples, coarse=None) -> Dataset:
    codes = {s: [parts[s][1] if grouping == "label" else coarse[s]] for s in parts}
    cats = [[f"class {c}" if c.isdigit() else c for c in names[grouping]]]
    g, group_names, ginfo = groups_over_splits(name, codes, cats)
    img_parts = {s: (parts[s][0], parts[s][1].astype(np.int32), g[s]) for s in parts}
    meta = {"source": source, "format": "CIFAR python pickles", "image_size": image_size, "protected": grouping,
            "max_examples": max_examples, **ginfo}
    return image_dataset(name, img_parts, group_names=group_names,
                            group_attrs=["class" if grouping == "label" else grouping], class_names=class_names,
                            val_fraction=val_fraction, seed=seed, normalize=normalize, meta=meta)


def _decode_all(paths: list[str], image_size: int, num_workers: int | None, *, name: str, what: str,
                layout: str, error: type) -> np.ndarray:
    """Every image of ``paths`` decoded (center crop, resize), or ``error`` naming the unreadable ones."""
    images, ok = _decode_files(paths, image_size, num_workers, crop=True)
    if not ok.all():
        bad = [paths[i] for i in np.flatnonzero(~ok)]
        raise error(f"{name}: {len(bad)} image(s) {what} cannot be read (e.g. {bad[0]}); expected {layout}")
    return images


def _read_lines(path: Path, name: str, layout: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} is missing; expected {layout}")
    return [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


#: the values of list_attr_celeba.txt: 1 present, -1 absent (0 also read as absent)
CELEBA_VALUES = {"1": True, "+1": True, "-1": False, "0": False}


def _celeba_tables(d: Path) -> tuple[list[str], np.ndarray, dict[str, int], list[str]]:
    """(file names, attributes (n, 40) in {0, 1}, file -> partition 0/1/2, attribute names)."""
    name = "celeba"
    lines = _read_lines(d / "list_attr_celeba.txt", name, CELEBA_LAYOUT)
    if len(lines) < 3 or not lines[0].strip().isdigit():
        raise ValueError(f"{name}: {d / 'list_attr_celeba.txt'} does not start with the image count and the 40 "
                         f"attribute names; expected {CELEBA_LAYOUT}")
    attrs = lines[1].split()
    path = d / "list_attr_celeba.txt"
    files, values, seen = [], [], set()
    for i, ln in enumerate(lines[2:], start=3):
        parts = ln.split()
        if len(parts) != len(attrs) + 1:
            raise ValueError(f"{name}: {path}: a row has {len(parts) - 1} values for "
                             f"{len(attrs)} attributes: {ln[:80]!r}")
        odd = [v for v in parts[1:] if v not in CELEBA_VALUES]
        if odd:
            raise ValueError(f"{name}: {path}, line {i} ({parts[0]}): attribute value {odd[0]!r}; CelebA writes 1 "
                             "for present and -1 (or 0) for absent")
        if parts[0] in seen:
            raise ValueError(f"{name}: {path} lists {parts[0]} twice (line {i}): each image once")
        seen.add(parts[0])
        files.append(parts[0])
        values.append([CELEBA_VALUES[v] for v in parts[1:]])
    if int(lines[0].strip()) != len(files):
        raise ValueError(f"{name}: {path} says it lists {int(lines[0].strip())} images and lists {len(files)} (a "
                         "file cut short by an interrupted copy loses the test images, listed last): copy it again")
    part: dict[str, int] = {}
    ppath = d / "list_eval_partition.txt"
    for i, ln in enumerate(_read_lines(ppath, name, CELEBA_LAYOUT), start=1):
        fields = ln.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{name}: {ppath}, line {i}: {ln[:80]!r}; each line is an image and its partition, "
                             "0 (train), 1 (val) or 2 (test), as in '000001.jpg 0'")
        part[fields[0]] = int(fields[1])
    return files, np.asarray(values, bool), part, attrs


def load_celeba(data_dir: str | os.PathLike | None = None, *, target: str = "Smiling", protected: str = "Male",
                image_size: int = 64, val_fraction: float | None = None, seed: int = 0, normalize: bool = False,
                max_examples: int | None = None, num_workers: int | None = None) -> Dataset:
    """CelebA from its aligned images and annotation files, with the official train / val / test partition.

    ``target`` and ``protected`` (one or a comma list) are among its 40 binary attributes; classes are
    ``["not <target>", "<target>"]`` and groups ``"Male"`` / ``"not Male"`` (``"not Male|Young"`` for
    intersections), as ``tfds:celeb_a`` names them. ``max_examples`` caps each split (train has 162,770 images);
    ``num_workers`` decoding processes (default: every core). ``val_fraction``: None keeps the official val
    partition as the validation split; a number carves that share of train instead (official val unused).
    """
    name = "celeba"
    d = _find(data_dir, name, "list_attr_celeba.txt", CELEBA_LAYOUT)
    files, values, part, attr_names = _celeba_tables(d)
    if target not in attr_names:
        raise ValueError(f"{name}: unknown target attribute {target!r}; valid attributes: {', '.join(attr_names)}")
    attrs = parse_attr_list(protected, attr_names, what="protected attribute", dataset=name)
    image_size = _check_size(image_size, name)
    img_dir = next((c for c in (d / "img_align_celeba" / "img_align_celeba", d / "img_align_celeba")
                    if c.is_dir()), None)
    if img_dir is None:
        raise FileNotFoundError(f"{name}: no img_align_celeba/ folder in {d}; expected {CELEBA_LAYOUT}")
    missing = [f for f in files if f not in part]
    if missing:
        raise ValueError(f"{name}: {len(missing)} image(s) of list_attr_celeba.txt have no partition in "
                         f"list_eval_partition.txt (e.g. {missing[0]})")
    col = {a: attr_names.index(a) for a in dict.fromkeys([target, *attrs])}
    cap = None if max_examples is None else int(max_examples)
    split_rows = {s: np.flatnonzero([part[f] == p for f in files])[:cap]
                  for s, p in (("train", 0), ("val", 1), ("test", 2))}
    split_rows = {s: r for s, r in split_rows.items() if s != "val" or (len(r) and val_fraction is None)}
    for s in ("train", "test"):
        if not len(split_rows[s]):
            raise ValueError(f"{name}: list_eval_partition.txt puts no image in the {s} split")
    decoded = {s: _decode_all([str(img_dir / files[i]) for i in rows], image_size, num_workers, name=name,
                              what=f"of the {s} split", layout=CELEBA_LAYOUT, error=ValueError)
               for s, rows in split_rows.items()}
    codes = {s: [values[r, col[a]].astype(np.int64) for a in attrs] for s, r in split_rows.items()}
    g, group_names, ginfo = groups_over_splits(name, codes, [[f"not {a}", a] for a in attrs])
    parts = {s: (decoded[s], values[r, col[target]].astype(np.int32), g[s]) for s, r in split_rows.items()}
    meta = {"source": str(d), "format": "CelebA aligned images + list_attr_celeba.txt + list_eval_partition.txt",
            "image_size": image_size, "target": target, "protected": attrs, "max_examples": max_examples,
            "split": "official partition (0 train, 1 val, 2 test)" + (
                "" if val_fraction is None else f"; val: {val_fraction} of train instead of the official val"),
            "resize": "center crop to square, then LANCZOS", **ginfo}
    return image_dataset(name, parts, group_names=group_names, group_attrs=attrs,
                            class_names=[f"not {target}", target], val_fraction=val_fraction, seed=seed,
                            normalize=normalize, meta=meta)


def _fairface_rows(path: Path) -> list[dict[str, str]]:
    name = "fairface"
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} is missing; expected {FAIRFACE_LAYOUT}")
    with open(path, newline="", encoding="utf-8-sig") as f:   # -sig: a byte-order mark (Excel's) is not a name
        rows = list(csv.DictReader(f))
    need = {"file", *FAIRFACE_ATTRIBUTES}
    if not rows or not need <= set(rows[0]):
        have = ", ".join(rows[0]) if rows else "(no rows)"
        raise ValueError(f"{name}: {path} needs the columns {', '.join(sorted(need))}; it has {have}")
    return rows


def _fairface_codes(rows: list[dict[str, str]], attr: str, path: Path) -> np.ndarray:
    cats = FAIRFACE_CATEGORIES[attr]
    bad = sorted({r[attr] for r in rows} - set(cats))
    if bad:
        raise ValueError(f"fairface: {path}: unknown {attr} value(s) {', '.join(repr(b) for b in bad[:5])}; "
                         f"valid: {', '.join(cats)}")
    return np.asarray([cats.index(r[attr]) for r in rows], np.int64)


def load_fairface(data_dir: str | os.PathLike | None = None, *, target: str = "gender", protected: str = "race",
                  image_size: int = 64, val_fraction: float | None = None, seed: int = 0, normalize: bool = False,
                  max_examples: int | None = None, num_workers: int | None = None) -> Dataset:
    """FairFace from its label CSVs and image folders: ``target`` one of race (7), gender (2) or age (9 bins),
    ``protected`` one or a comma list of them (FairGRAPE and Balancing Act use race, and race x gender).
    FairFace's val split is the test split; ``val_fraction`` of train the validation split."""
    name = "fairface"
    if target not in FAIRFACE_ATTRIBUTES:
        raise ValueError(f"{name}: unknown target {target!r}; valid choices: {', '.join(FAIRFACE_ATTRIBUTES)}")
    attrs = parse_attr_list(protected, FAIRFACE_ATTRIBUTES, what="protected attribute", dataset=name)
    image_size = _check_size(image_size, name)
    d = _find(data_dir, name, "fairface_label_train.csv", FAIRFACE_LAYOUT)
    cap = None if max_examples is None else int(max_examples)
    parts_in = {"train": d / "fairface_label_train.csv", "test": d / "fairface_label_val.csv"}
    rows = {s: _fairface_rows(p)[:cap] for s, p in parts_in.items()}
    decoded = {s: _decode_all([str(d / r["file"]) for r in rs], image_size, num_workers, name=name,
                              what=f"named in {parts_in[s].name}", layout=FAIRFACE_LAYOUT, error=FileNotFoundError)
               for s, rs in rows.items()}
    codes = {s: [_fairface_codes(rs, a, parts_in[s]) for a in attrs] for s, rs in rows.items()}
    g, group_names, ginfo = groups_over_splits(name, codes, [list(FAIRFACE_CATEGORIES[a]) for a in attrs])
    parts = {s: (decoded[s], _fairface_codes(rs, target, parts_in[s]).astype(np.int32), g[s])
             for s, rs in rows.items()}
    meta: dict[str, Any] = {"source": str(d), "format": "FairFace label CSVs + images", "image_size": image_size,
                            "target": target, "protected": attrs, "max_examples": max_examples,
                            "split": "FairFace train -> train, FairFace val -> test",
                            "resize": "center crop to square, then LANCZOS", **ginfo}
    return image_dataset(name, parts, group_names=group_names, group_attrs=attrs,
                            class_names=list(FAIRFACE_CATEGORIES[target]), val_fraction=val_fraction, seed=seed,
                            normalize=normalize, meta=meta)
