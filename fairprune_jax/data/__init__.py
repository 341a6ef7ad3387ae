"""Datasets with protected groups, all returning :class:`Dataset`."""
from __future__ import annotations

import inspect
import re
from typing import Callable

import numpy as np

from fairprune_jax.data.adult import load_adult
from fairprune_jax.data.base import (Dataset, Split, eval_batches, steps_per_epoch,
                                     stratified_split, train_batches)
from fairprune_jax.data.digits import load_digits
from fairprune_jax.data import native
from fairprune_jax.data.tabular import load_csv, load_dataframe
from fairprune_jax.data.tfds import load_celeb_a, load_cifar10, load_cifar100
from fairprune_jax.data.utkface import load_utkface

# name -> loader(data_dir, **options) -> Dataset. Loaders register here.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "utkface": load_utkface,
    "adult": load_adult,
    "csv": load_csv,
    "cifar10": native.load_cifar10,
    "cifar100": native.load_cifar100,
    "celeba": native.load_celeba,
    "fairface": native.load_fairface,
    "tfds:cifar10": load_cifar10,
    "tfds:cifar100": load_cifar100,
    "tfds:celeb_a": load_celeb_a,
}


def loader_options(name: str) -> list[str]:
    """The options (keyword arguments besides ``data_dir``) that dataset ``name``'s loader accepts."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(sorted(DATASETS))}")
    params = list(inspect.signature(DATASETS[name]).parameters.values())[1:]  # the first is data_dir
    return [p.name for p in params if not p.name.startswith("_")
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def source_files(name: str, data_dir: str | None = None) -> list | None:
    """The files a tabular loader reads (what its parsed result depends on besides its options and code), or
    None for a loader whose result is not kept between runs (images have their own decoded caches)."""
    from pathlib import Path
    if name == "adult":
        from fairprune_jax.data.adult import source_files as adult_files
        files = adult_files(data_dir)
        return files if all(f is not None for f in files) else None
    if name == "csv" and data_dir is not None and Path(data_dir).is_file():
        return [Path(data_dir)]
    return None


def load_dataset(name: str, data_dir: str | None = None, **options) -> Dataset:
    """Load a dataset by name (see ``DATASETS``) and validate it.

    Options whose value is ``None`` count as not given (the loader's default
    applies). An option the loader does not take is a ``ValueError`` that lists
    the valid ones.
    """
    valid = loader_options(name)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ValueError(f"dataset {name!r} does not take option(s) {', '.join(repr(u) for u in unknown)}; "
                         f"valid options: {', '.join(valid) if valid else '(none)'}")
    check_option_types(name, options)
    ds = DATASETS[name](data_dir, **options)
    ds.validate()
    return ds


#: the smallest value of the loaders' integer options that have one
MINIMUM = {"seed": 0, "image_size": 1, "max_examples": 1, "num_workers": 0}


def check_option_types(name: str, options: dict) -> None:
    """Refuse a value of the wrong kind for a loader's typed option, naming it, before any data is read: a bool
    option takes a bool (``--data-opt include_protected=F`` was read as true, and the protected column stayed in
    the features), a number option a number (``seed=abc`` ended in a numpy traceback), an integer one an
    integer. Options typed as text (or not typed) are the loader's to read."""
    params = dict(list(inspect.signature(DATASETS[name]).parameters.items())[1:])
    for key, value in options.items():
        ann = params[key].annotation if key in params else inspect.Parameter.empty
        kinds = set(re.findall(r"\b(bool|int|float|str)\b", ann if isinstance(ann, str) else getattr(ann, "__name__", "")))
        if not kinds or "str" in kinds:
            continue
        if kinds == {"bool"}:
            ok, want = isinstance(value, (bool, np.bool_)), "true or false"
        elif "float" in kinds:
            ok, want = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool), \
                "a number"
        else:
            ok, want = isinstance(value, (int, np.integer)) and not isinstance(value, bool), "an integer"
        if not ok:
            raise ValueError(f"dataset {name!r}: option {key} must be {want}; got {value!r} (--data-opt {key}=...)")
        low = MINIMUM.get(key)
        if low is not None and value is not None and value < low:      # (numpy's "expected non-negative integer")
            raise ValueError(f"dataset {name!r}: option {key} must be {low} or more; got {value!r} "
                             f"(--data-opt {key}=...)")


__all__ = ["DATASETS", "Dataset", "Split", "eval_batches", "load_adult", "load_celeb_a", "load_cifar10",
           "load_cifar100", "load_csv", "load_dataframe", "load_dataset", "load_digits", "load_utkface", "loader_options",
           "source_files",
           "steps_per_epoch", "stratified_split", "train_batches"]
