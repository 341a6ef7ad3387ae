"""UCI Adult (Census Income) from the original ``adult.data`` / ``adult.test`` files.

Quirks handled: fields separated by ``", "``, ``?`` for missing values, the
test file's first line ``|1x3 Cross validator``, trailing dots on the test
labels (``<=50K.``) and empty trailing lines. The task is income ``>50K``
(class 1). ``adult.test`` is the test split; preprocessing (one-hot,
standardization) is fitted on the train split only (shared with the CSV loader,
see :mod:`fairprune_jax.data.tabular`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fairprune_jax.data.base import Dataset, default_data_root, parse_attr_list
from fairprune_jax.data.tabular import (GroupAttr, attr_from_column, build_tabular_dataset, check_fields, per_value,
                                        read_bytes, read_table)

COLUMNS = ("age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
           "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country",
           "income")
NUMERIC = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")
RACES = ("White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other")
SEXES = ("Male", "Female")
AGE_EDGES = (25, 45, 65)
AGE_BUCKETS = ("<25", "25-44", "45-64", "65+")
PROTECTED = ("sex", "race", "age")
CLASS_NAMES = ["<=50K", ">50K"]

LAYOUT = ("a folder with the original UCI files adult.data and adult.test (no header, ', '-separated, "
          "'?' for missing; gzipped as adult.data.gz / adult.test.gz also works), such as shared/data/adult/")
#: The copy shipped with the package (CC BY 4.0, see its README): read when no data_dir is given.
EMBEDDED = Path(__file__).resolve().parent / "embedded" / "adult"


def _file(d: Path, name: str) -> Path | None:
    """``d/name``, else ``d/name.gz``, else None."""
    for p in (d / name, d / f"{name}.gz"):
        if p.is_file():
            return p
    return None


def source_files(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The two files :func:`load_adult` reads for ``data_dir`` (the embedded copy without one)."""
    d = _resolve_dir(data_dir)
    return [_file(d, "adult.data"), _file(d, "adult.test")]


def _resolve_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None and _file(EMBEDDED, "adult.data") and _file(EMBEDDED, "adult.test"):
        return EMBEDDED
    d = Path(data_dir) if data_dir is not None else default_data_root() / "adult"
    hint = "" if data_dir is not None else " (no data_dir given: this is the default; pass --data-dir)"
    if not d.exists():
        raise FileNotFoundError(f"adult: data_dir {d} does not exist{hint}; expected {LAYOUT}")
    if not d.is_dir():
        raise NotADirectoryError(f"adult: data_dir {d} is not a directory; expected {LAYOUT}")
    if _file(d, "adult.data") is None and _file(d / "adult", "adult.data") is not None:  # the shared data root
        d = d / "adult"
    missing = [f for f in ("adult.data", "adult.test") if _file(d, f) is None]
    if missing:
        raise FileNotFoundError(f"adult: {', '.join(str(d / f) for f in missing)} not found{hint}; "
                                f"expected {LAYOUT}")
    return d


def read_adult_file(path: Path) -> dict[str, np.ndarray]:
    """One original Adult file as string columns (labels without the test file's trailing dot)."""
    text = read_bytes(path).decode("utf-8")
    columns, fields, lines = read_table(text, path=path, delimiter=",", skip_prefixes=("|",))
    cols = check_fields(columns, fields, lines, COLUMNS, path=path)
    cols["income"] = per_value(cols["income"], lambda v: v.rstrip("."))
    bad = sorted(set(cols["income"].tolist()) - set(CLASS_NAMES))
    if bad:
        raise ValueError(f"adult: {path} has unexpected income labels {bad[:5]}; expected {CLASS_NAMES}")
    return cols


def load_adult(data_dir: str | os.PathLike | None = None, *, protected: str = "sex",
               include_protected: bool = True, val_fraction: float | None = None, seed: int = 0) -> Dataset:
    """Load Adult: predict income >50K; groups by ``sex`` (default), ``race``, ``age`` or an intersection.

    ``protected="sex,race"`` gives intersectional groups such as ``"Male|White"``;
    ``age`` is bucketed as <25, 25-44, 45-64, 65+. Rows with a missing value
    (``?``) are dropped and counted per split in ``meta``. Numeric columns are
    standardized and categorical ones one-hot encoded with statistics from the
    train split only; ``include_protected=False`` leaves the protected columns
    out of the features. The optional validation split (``val_fraction``) is
    carved from adult.data, stratified by group and label.
    """
    attrs = parse_attr_list(protected, PROTECTED, what="protected attribute", dataset="adult")
    d = _resolve_dir(data_dir)
    train = read_adult_file(_file(d, "adult.data"))
    test = read_adult_file(_file(d, "adult.test"))
    cols = {c: np.concatenate([train[c], test[c]]) for c in COLUMNS}
    part = np.concatenate([np.zeros(len(train["age"]), np.int8), np.ones(len(test["age"]), np.int8)])

    group_attrs: list[GroupAttr] = []
    for a in attrs:
        if a == "sex":
            group_attrs.append(attr_from_column("sex", cols["sex"], categories=list(SEXES)))
        elif a == "race":
            group_attrs.append(attr_from_column("race", cols["race"], categories=list(RACES)))
        else:
            ages = np.where(cols["age"] == "?", "-1", cols["age"]).astype(np.float64)
            group_attrs.append(GroupAttr("age", np.digitize(ages, AGE_EDGES).astype(np.int64),
                                         list(AGE_BUCKETS), ("age",)))
    dropped_features = {"sex": "sex", "race": "race", "age": "age"}
    features = [c for c in COLUMNS[:-1] if include_protected or c not in {dropped_features[a] for a in attrs}]

    def labels(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
        return (values == ">50K").astype(np.int32), list(CLASS_NAMES)

    meta = {"source": "embedded copy (CC BY 4.0)" if d == EMBEDDED else str(d),
            "files": {"train": _file(d, "adult.data").name, "test": _file(d, "adult.test").name},
            "include_protected": include_protected, "age_buckets": list(AGE_BUCKETS)}
    return build_tabular_dataset(
        "adult", cols, part, feature_columns=features, numeric_columns=list(NUMERIC), target_column="income",
        labels=labels, group_attrs=group_attrs, drop_missing=True, val_fraction=val_fraction, seed=seed,
        meta=meta)
