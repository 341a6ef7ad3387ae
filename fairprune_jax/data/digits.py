"""scikit-learn's bundled 8x8 digits: the embedded default dataset (no download).

The ten classes are also the protected groups, as in Balancing Act's
CIFAR-100 setting where every class is a group.
"""
from __future__ import annotations

import numpy as np

from fairprune_jax.data.base import Dataset, Split, carve_validation_indices, stratified_split


def load_digits(data_dir: str | None = None, *, test_fraction: float = 0.25, seed: int = 0,
                image: bool = False, val_fraction: float | None = None, **_: object) -> Dataset:
    """Load digits as flat 64-vectors in [0, 1] (``image=True`` gives 8x8x1 images).

    ``val_fraction`` carves a stratified validation split from the train part.
    """
    from sklearn.datasets import load_digits as _sk_load

    bunch = _sk_load()
    x = (bunch.data / 16.0).astype(np.float32)
    if image:
        x = x.reshape(-1, 8, 8, 1)
    y = bunch.target.astype(np.int32)
    g = y.copy()
    train_idx, test_idx = stratified_split(y, g, test_fraction, seed=seed)
    train_idx, val_idx = carve_validation_indices(train_idx, y, g, val_fraction, seed)
    names = [str(c) for c in range(10)]
    return Dataset(
        name="digits",
        train=Split(x[train_idx], y[train_idx], g[train_idx]),
        test=Split(x[test_idx], y[test_idx], g[test_idx]),
        val=None if val_idx is None else Split(x[val_idx], y[val_idx], g[val_idx]),
        group_names=[f"digit {c}" for c in names],
        group_attrs=["class"],
        class_names=names,
        meta={"source": "sklearn.datasets.load_digits", "test_fraction": test_fraction, "split_seed": seed,
              "val_fraction": val_fraction},
    )
