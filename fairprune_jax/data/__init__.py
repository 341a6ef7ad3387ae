"""Datasets with protected groups, all returning :class:`Dataset`."""
from __future__ import annotations

from typing import Callable

from fairprune_jax.data.base import (Dataset, Split, eval_batches, steps_per_epoch,
                                     stratified_split, train_batches)
from fairprune_jax.data.digits import load_digits

# name -> loader(data_dir, **options) -> Dataset. Loaders register here.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
}


def load_dataset(name: str, data_dir: str | None = None, **options) -> Dataset:
    """Load a dataset by name (see ``DATASETS``) and validate it."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(sorted(DATASETS))}")
    ds = DATASETS[name](data_dir, **options)
    ds.validate()
    return ds


__all__ = ["DATASETS", "Dataset", "Split", "eval_batches", "load_dataset", "load_digits",
           "steps_per_epoch", "stratified_split", "train_batches"]
