"""TensorFlow Datasets image datasets through ``tfds.data_source`` (array_record; TensorFlow not needed).

Registered as ``tfds:cifar10`` (classes are the groups), ``tfds:cifar100``
(groups are the 100 classes or the 20 coarse labels) and ``tfds:celeb_a``
(target and protected chosen from its 40 binary attributes). Nothing is
downloaded: the dataset must already be prepared in array_record format under
``data_dir`` (``tfds build <name> --file_format=array_record --data_dir DIR`` on
a connected machine, then copy ``DIR`` and pass ``--data-dir DIR``).

The reader is an optional extra (``pip install "fairprune_jax[tfds]"``): the
other datasets need neither it nor pyarrow, and a run that asks for a
``tfds:*`` dataset without it stops at once with that command.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fairprune_jax.data.base import Dataset, groups_over_splits, image_dataset, parse_attr_list

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")
CIFAR100_GROUPINGS = ("label", "coarse_label")
_FETCH_CHUNK = 1024


def _how_to_prepare(name: str, data_dir: Any) -> str:
    d = data_dir if data_dir is not None else "DIR"
    return (f"prepare it on a machine with internet access: `pip install tensorflow-datasets` then "
            f"`tfds build {name} --file_format=array_record --data_dir {d}` (or in Python: "
            f"tfds.builder({name!r}, data_dir={str(d)!r}, file_format='array_record').download_and_prepare()), "
            f"copy {d} here and pass --data-dir {d} (the folder that contains {name}/<version>/)")


class MissingExtra(ValueError):
    """A ``tfds:*`` dataset was asked for but the optional ``[tfds]`` extra is not installed."""


def tfds_module(name: str):
    """``tensorflow_datasets``, or :class:`MissingExtra` naming the install command."""
    try:
        import tensorflow_datasets as tfds_lib
    except ImportError as err:
        raise MissingExtra(f"tfds:{name} needs the optional TensorFlow Datasets reader, which is not installed: "
                           f"pip install \"fairprune_jax[tfds]\" (or pip install tensorflow-datasets)") from err
    return tfds_lib


def _open_split(name: str, split: str, data_dir: str | os.PathLike | None):
    tfds_lib = tfds_module(name)

    if data_dir is None:
        raise ValueError(f"tfds:{name}: no data_dir given and nothing is downloaded here; "
                         + _how_to_prepare(name, None))
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"tfds:{name}: data_dir {d} does not exist or is not a directory; "
                                + _how_to_prepare(name, d))
    try:
        return tfds_lib.data_source(name, split=split, data_dir=str(d), download=False)
    except Exception as err:  # tfds raises assorted errors (AssertionError, NotImplementedError, ...)
        raise FileNotFoundError(
            f"tfds:{name}: split {split!r} is not available as array_record under {d} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            + _how_to_prepare(name, d)) from err


def _fetch(src, n: int) -> list[dict]:
    """All records ``0..n-1`` of a data source, in chunks (``__getitems__`` when it works)."""
    out: list[dict] = []
    batch_ok = hasattr(src, "__getitems__")
    for start in range(0, n, _FETCH_CHUNK):
        keys = list(range(start, min(start + _FETCH_CHUNK, n)))
        if batch_ok:
            try:
                out.extend(src.__getitems__(keys))
                continue
            except TypeError:  # e.g. tfds.testing.mock_data's mock only supports __getitem__
                batch_ok = False
        out.extend(src[k] for k in keys)
    return out


def _to_size(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square, resize to ``size`` x ``size`` (Pillow, LANCZOS), 3 channels uint8."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    h, w = image.shape[:2]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        image = image[top:top + s, left:left + s]
    if image.shape[0] != size:
        from PIL import Image

        image = np.asarray(Image.fromarray(image.astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS))
    return image.astype(np.uint8)


def _read_split(name: str, split: str, data_dir, image_size: int, max_examples: int | None,
                fields: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray], Any]:
    src = _open_split(name, split, data_dir)
    n = len(src)
    if max_examples is not None:
        n = min(n, int(max_examples))
    if n == 0:
        raise ValueError(f"tfds:{name}: split {split!r} under {data_dir} has no examples")
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    values: dict[str, list] = {f: [] for f in fields}
    for i, ex in enumerate(_fetch(src, n)):
        images[i] = _to_size(ex["image"], image_size)
        for f in fields:
            if f.startswith("attributes/"):
                values[f].append(bool(ex["attributes"][f.split("/", 1)[1]]))
            else:
                values[f].append(int(ex[f]))
    info = getattr(src, "dataset_info", None)
    return images, {f: np.asarray(v) for f, v in values.items()}, info


def _class_names(info, feature: str, k: int) -> list[str]:
    try:
        names = list(info.features[feature].names)
        if len(names) == k:
            return names
    except Exception:  # info missing or a feature without names
        pass
    return [str(i) for i in range(k)]


def _check_size(image_size: int, name: str) -> int:
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"{name}: image_size must be a positive integer; got {image_size}")
    return image_size


def load_cifar10(data_dir: str | os.PathLike | None = None, *, image_size: int = 32,
                 val_fraction: float | None = None, seed: int = 0, normalize: bool = False,
                 max_examples: int | None = None) -> Dataset:
    """CIFAR-10 from TFDS; the 10 classes are also the protected groups."""
    return _load_cifar("cifar10", data_dir, image_size=image_size, grouping="label", val_fraction=val_fraction,
                       seed=seed, normalize=normalize, max_examples=max_examples)


def load_cifar100(data_dir: str | os.PathLike | None = None, *, protected: str = "label", image_size: int = 32,
                  val_fraction: float | None = None, seed: int = 0, normalize: bool = False,
                  max_examples: int | None = None) -> Dataset:
    """CIFAR-100 from TFDS; groups are the 100 classes (``protected="label"``) or the 20 ``coarse_label`` s."""
    if protected == "fine_label":
        protected = "label"
    if protected not in CIFAR100_GROUPINGS:
        raise ValueError(f"tfds:cifar100: unknown protected {protected!r}; valid choices: "
                         f"{', '.join(CIFAR100_GROUPINGS)} (fine_label is an alias of label)")
    return _load_cifar("cifar100", data_dir, image_size=image_size, grouping=protected, val_fraction=val_fraction,
                       seed=seed, normalize=normalize, max_examples=max_examples)


def _load_cifar(name, data_dir, *, image_size, grouping, val_fraction, seed, normalize, max_examples) -> Dataset:
    ds_name = f"tfds:{name}"
    image_size = _check_size(image_size, ds_name)
    fields = ["label"] + (["coarse_label"] if grouping == "coarse_label" else [])
    read = {s: _read_split(name, s, data_dir, image_size, max_examples, fields) for s in ("train", "test")}
    info = read["train"][2]
    num_classes = 10 if name == "cifar10" else 100
    class_names = _class_names(info, "label", num_classes)
    if grouping == "label":
        categories = [f"class {c}" if c.isdigit() else c for c in class_names]
    else:
        categories = _class_names(info, "coarse_label", 20)
    ys = [read[s][1]["label"].astype(np.int32) for s in ("train", "test")]
    codes = [read[s][1][grouping] for s in ("train", "test")]
    g, group_names, ginfo = groups_over_splits(ds_name, {"train": [codes[0]], "test": [codes[1]]}, [categories])
    parts = {"train": (read["train"][0], ys[0], g["train"]), "test": (read["test"][0], ys[1], g["test"])}
    meta = {"source": f"tfds.data_source({name!r}, data_dir={str(data_dir)!r})", "image_size": image_size,
            "protected": grouping, "max_examples": max_examples, **ginfo}
    return image_dataset(ds_name, parts, group_names=group_names, group_attrs=["class" if grouping == "label" else
                                                                           grouping],
                     class_names=class_names, val_fraction=val_fraction, seed=seed, normalize=normalize, meta=meta)


def load_celeb_a(data_dir: str | os.PathLike | None = None, *, target: str = "Smiling", protected: str = "Male",
                 image_size: int = 32, val_fraction: float | None = None, seed: int = 0,
                 normalize: bool = False, max_examples: int | None = None) -> Dataset:
    """CelebA from TFDS: binary ``target`` and ``protected`` (one or a comma list) from its 40 attributes.

    Images (218x178) are center-cropped to a square and resized to
    ``image_size``. Classes are ``["not <target>", "<target>"]``; groups are
    named ``"Male"`` / ``"not Male"`` (``"not Male|Young"`` for intersections).
    Uses TFDS's train and test splits; ``max_examples`` caps each split (the
    full train split is 162,770 images).
    """
    ds_name = "tfds:celeb_a"
    if target not in CELEBA_ATTRIBUTES:
        raise ValueError(f"{ds_name}: unknown target attribute {target!r}; valid attributes: "
                         f"{', '.join(CELEBA_ATTRIBUTES)}")
    attrs = parse_attr_list(protected, CELEBA_ATTRIBUTES, what="protected attribute", dataset=ds_name)
    image_size = _check_size(image_size, ds_name)
    fields = [f"attributes/{a}" for a in dict.fromkeys([target, *attrs])]
    read = {s: _read_split("celeb_a", s, data_dir, image_size, max_examples, fields) for s in ("train", "test")}
    ys = [read[s][1][f"attributes/{target}"].astype(np.int32) for s in ("train", "test")]
    codes = [[read[s][1][f"attributes/{a}"].astype(np.int64) for s in ("train", "test")] for a in attrs]
    split_codes = {s: [c[i] for c in codes] for i, s in enumerate(("train", "test"))}
    g, group_names, ginfo = groups_over_splits(ds_name, split_codes, [[f"not {a}", a] for a in attrs])
    parts = {"train": (read["train"][0], ys[0], g["train"]), "test": (read["test"][0], ys[1], g["test"])}
    meta = {"source": f"tfds.data_source('celeb_a', data_dir={str(data_dir)!r})", "image_size": image_size,
            "target": target, "protected": attrs, "max_examples": max_examples,
            "resize": "center crop to square, then LANCZOS", **ginfo}
    return image_dataset(ds_name, parts, group_names=group_names, group_attrs=attrs,
                     class_names=[f"not {target}", target], val_fraction=val_fraction, seed=seed,
                     normalize=normalize, meta=meta)
