"""Tabular data: shared preprocessing (used by Adult and the CSV loader) and the ``csv`` loader.

Preprocessing is fitted on the train split only: numeric columns are
standardized with the train mean/std, categorical columns are one-hot encoded
over the categories seen in train (a category first seen in val/test encodes as
all zeros). Rows with missing values (``""``, ``?``, ``NA``, ``N/A``, ``NaN``,
``nan``, ``null``) in a used column are dropped and counted by default.

The module is named ``tabular`` rather than ``csv`` so it never shadows the
standard library's ``csv`` module; the registered loader name is ``csv``.
"""
from __future__ import annotations

import csv as _csv
import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fairprune_jax.data.base import (Dataset, Split, carve_validation_indices, check_fraction, encode_groups,
                                     parse_attr_list, stratified_split)

MISSING_TOKENS = ("", "?", "NA", "N/A", "NaN", "nan", "null")
COLUMN_TYPES = ("numeric", "categorical")
_TYPE_ALIASES = {"numeric": "numeric", "num": "numeric", "number": "numeric", "float": "numeric",
                 "int": "numeric", "categorical": "categorical", "cat": "categorical", "category": "categorical",
                 "str": "categorical", "string": "categorical"}


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

def read_rows(path: Path, *, skip_prefixes: tuple[str, ...] = (), what: str = "table") -> list[list[str]]:
    """Comma-separated rows with surrounding spaces stripped; blank lines and lines starting with a prefix skipped."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in _csv.reader(f, skipinitialspace=True):
            row = [c.strip() for c in row]
            if not any(row):
                continue
            if skip_prefixes and row[0].startswith(skip_prefixes):
                continue
            rows.append(row)
    return rows


def rows_to_columns(rows: list[list[str]], names: Sequence[str], *, path: Path, first_line: int = 1
                    ) -> dict[str, np.ndarray]:
    """Column arrays (str) from rows, checking every row has ``len(names)`` fields."""
    k = len(names)
    for i, r in enumerate(rows):
        if len(r) != k:
            raise ValueError(f"{path}: data row {i + first_line} has {len(r)} fields, expected {k} "
                             f"({', '.join(names)}): {r[:6]}...")
    if not rows:
        return {n: np.zeros(0, dtype=str) for n in names}
    arr = np.asarray(rows, dtype=str)
    return {n: arr[:, j] for j, n in enumerate(names)}


def missing_mask(values: np.ndarray, tokens: Sequence[str] = MISSING_TOKENS) -> np.ndarray:
    return np.isin(values, list(tokens))


def as_float(values: np.ndarray, missing: np.ndarray) -> np.ndarray | None:
    """Float version of a string column (NaN where missing), or None if some value is not a number."""
    out = np.full(values.shape, np.nan, np.float64)
    try:
        out[~missing] = values[~missing].astype(np.float64)
    except ValueError:
        return None
    return out


def sorted_values(values: Sequence[str]) -> list[str]:
    """Unique values sorted numerically when they are all numbers, else as strings."""
    uniq = sorted(set(values))
    try:
        return sorted(uniq, key=float)
    except ValueError:
        return uniq


# ---------------------------------------------------------------------------
# Preprocessing (fitted on train only)
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class TabularPreprocessor:
    """Standardize numeric columns and one-hot encode categorical ones, with statistics from ``fit``."""

    numeric: list[str]
    categorical: list[str]
    mean: dict[str, float] = dataclasses.field(default_factory=dict)
    std: dict[str, float] = dataclasses.field(default_factory=dict)
    categories: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def fit(self, num: dict[str, np.ndarray], cat: dict[str, np.ndarray]) -> "TabularPreprocessor":
        for c in self.numeric:
            v = num[c][np.isfinite(num[c])]
            m = float(v.mean()) if len(v) else 0.0
            s = float(v.std()) if len(v) else 1.0
            self.mean[c] = m
            self.std[c] = s if s > 1e-12 else 1.0
        for c in self.categorical:
            self.categories[c] = sorted_values(cat[c].tolist())
        return self

    @property
    def feature_names(self) -> list[str]:
        names = list(self.numeric)
        for c in self.categorical:
            names += [f"{c}={v}" for v in self.categories[c]]
        return names

    def transform(self, num: dict[str, np.ndarray], cat: dict[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(num.values()))) if num else len(next(iter(cat.values())))
        blocks = []
        for c in self.numeric:
            v = (num[c] - self.mean[c]) / self.std[c]
            blocks.append(np.where(np.isfinite(v), v, 0.0)[:, None])  # missing (when kept) -> train mean
        for c in self.categorical:
            cats = self.categories[c]
            order = np.argsort(cats)
            sorted_cats = np.asarray(cats)[order]
            pos = np.searchsorted(sorted_cats, cat[c]) if len(cats) else np.zeros(n, np.int64)
            pos = np.clip(pos, 0, max(len(cats) - 1, 0))
            hit = (sorted_cats[pos] == cat[c]) if len(cats) else np.zeros(n, bool)
            onehot = np.zeros((n, len(cats)), np.float32)
            onehot[np.flatnonzero(hit), order[pos[hit]]] = 1.0
            blocks.append(onehot)
        if not blocks:
            return np.zeros((n, 0), np.float32)
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def to_meta(self) -> dict:
        return {"numeric_columns": list(self.numeric), "categorical_columns": list(self.categorical),
                "numeric_mean": dict(self.mean), "numeric_std": dict(self.std),
                "categories": {k: list(v) for k, v in self.categories.items()},
                "preprocessing_fitted_on": "train"}


@dataclasses.dataclass
class GroupAttr:
    """A protected attribute: a name, per-row category codes (pre-filtering) and the category names."""

    name: str
    codes: np.ndarray
    categories: list[str]
    source_columns: tuple[str, ...]


def attr_from_column(name: str, values: np.ndarray, *, categories: list[str] | None = None,
                     source: str | None = None) -> GroupAttr:
    """Groups from the raw values of a column (missing values get code 0; those rows are dropped anyway)."""
    miss = missing_mask(values)
    cats = categories if categories is not None else sorted_values(values[~miss].tolist())
    index = {c: i for i, c in enumerate(cats)}
    codes = np.asarray([index.get(v, -1) for v in values.tolist()], np.int64)
    unknown = (codes < 0) & ~miss
    if unknown.any():
        raise ValueError(f"protected attribute {name!r}: value(s) {sorted(set(values[unknown].tolist()))[:5]} "
                         f"are not among the expected categories {cats}")
    codes[codes < 0] = 0
    return GroupAttr(name, codes, list(cats), (source or name,))


def build_tabular_dataset(
    name: str,
    cols: dict[str, np.ndarray],
    part: np.ndarray | None,
    *,
    feature_columns: list[str],
    numeric_columns: list[str],
    target_column: str,
    labels: Callable[[np.ndarray], tuple[np.ndarray, list[str]]],
    group_attrs: list[GroupAttr],
    drop_missing: bool = True,
    test_fraction: float = 0.2,
    val_fraction: float | None = None,
    seed: int = 0,
    meta: dict | None = None,
) -> Dataset:
    """Everything after parsing, shared by the Adult and CSV loaders.

    ``cols`` holds string columns over all rows; ``part`` marks rows of a given
    train (0) / test (1) split or is ``None`` for a seeded stratified test split.
    ``labels(target_values_of_kept_rows)`` returns ``(y, class_names)``.
    """
    n = len(cols[target_column])
    group_cols = sorted({c for a in group_attrs for c in a.source_columns})
    # Rows without a label or a protected value cannot be used; missing features only with drop_missing.
    required = [target_column] + group_cols + (feature_columns if drop_missing else [])
    missing = {c: missing_mask(cols[c]) for c in dict.fromkeys(required + feature_columns)}
    bad = np.zeros(n, bool)
    for c in dict.fromkeys(required):
        bad |= missing[c]
    keep = ~bad
    part_names = ["train", "test"]
    dropped: dict[str, int] = {}
    rows_before: dict[str, int] = {}
    if part is None:
        rows_before["all"] = n
        dropped["all"] = int(bad.sum())
    else:
        for p, pn in enumerate(part_names):
            rows_before[pn] = int((part == p).sum())
            dropped[pn] = int((bad & (part == p)).sum())
    missing_by_column = {c: int(missing[c].sum()) for c in dict.fromkeys(required + feature_columns)
                         if missing[c].any()}
    if not keep.any():
        raise ValueError(f"{name}: no rows left after dropping rows with missing values "
                         f"(missing per column: {missing_by_column})")

    y, class_names = labels(cols[target_column][keep])
    g, group_names, group_info = encode_groups([a.codes for a in group_attrs], [a.categories for a in group_attrs],
                                               keep=keep, dataset=name)
    kept = {c: v[keep] for c, v in cols.items()}
    if part is None:
        test_fraction = check_fraction(test_fraction, "test_fraction")
        train_idx, test_idx = stratified_split(y, g, test_fraction, seed=seed)
    else:
        kp = part[keep]
        train_idx, test_idx = np.flatnonzero(kp == 0), np.flatnonzero(kp == 1)
        if len(test_idx) == 0 or len(train_idx) == 0:
            raise ValueError(f"{name}: the {'test' if len(test_idx) == 0 else 'train'} part has no rows left "
                             "after dropping rows with missing values")
    train_idx, val_idx = carve_validation_indices(train_idx, y, g, val_fraction, seed)

    categorical = [c for c in feature_columns if c not in numeric_columns]
    numeric = [c for c in feature_columns if c in numeric_columns]
    num_all = {}
    for c in numeric:
        f = as_float(kept[c], missing_mask(kept[c]))
        if f is None:
            raise ValueError(f"{name}: column {c!r} is declared numeric but has non-numeric values such as "
                             f"{[v for v in kept[c][:1000].tolist() if not _is_number(v)][:3]}; declare it "
                             f"categorical (column_types=\"{c}:categorical\")")
        num_all[c] = f
    cat_all = {c: np.where(missing_mask(kept[c]), "<missing>", kept[c]) for c in categorical}

    def sub(d: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in d.items()}

    pre = TabularPreprocessor(numeric, categorical).fit(sub(num_all, train_idx), sub(cat_all, train_idx))
    parts = {"train": train_idx, "test": test_idx}
    if val_idx is not None:
        parts["val"] = val_idx
    splits = {k: Split(pre.transform(sub(num_all, idx), sub(cat_all, idx)), y[idx], g[idx])
              for k, idx in parts.items()}
    out_meta = dict(meta or {})
    out_meta.update({
        "target": target_column, "protected": [a.name for a in group_attrs],
        "rows_before_dropping": rows_before, "rows_dropped_missing": dropped,
        "rows_dropped_missing_total": int(bad.sum()), "missing_values_per_column": missing_by_column,
        "drop_missing": bool(drop_missing), "rows_used": int(keep.sum()),
        "split_seed": seed, "val_fraction": val_fraction,
        "feature_names": pre.feature_names, **pre.to_meta(), **group_info,
    })
    if part is None:
        out_meta["test_fraction"] = test_fraction
    return Dataset(name=name, train=splits["train"], test=splits["test"], val=splits.get("val"),
                   group_names=group_names, group_attrs=[a.name for a in group_attrs],
                   class_names=list(class_names), meta=out_meta)


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------
# The generic CSV loader
# ---------------------------------------------------------------------------

CSV_LAYOUT = ("a CSV file with a header row naming the columns, comma-separated, one row per example "
              "(pass the FILE path as data_dir)")


def parse_column_types(spec: str | dict | None, columns: Sequence[str]) -> dict[str, str]:
    """``"age:numeric,zip:categorical"`` -> ``{"age": "numeric", "zip": "categorical"}`` (names checked)."""
    if spec is None or spec == "":
        return {}
    items = spec.items() if isinstance(spec, dict) else [
        tuple(p.rsplit(":", 1)) if ":" in p else (p, "") for p in (s.strip() for s in spec.split(",")) if p]
    out = {}
    for col, kind in items:
        col, kind = str(col).strip(), str(kind).strip().lower()
        if col not in columns:
            raise ValueError(f"csv: column_types names unknown column {col!r}; valid columns: {', '.join(columns)}")
        if kind not in _TYPE_ALIASES:
            raise ValueError(f"csv: column_types entry {col!r} has type {kind!r}; use one of "
                             f"{', '.join(COLUMN_TYPES)} (like \"age:numeric,zip:categorical\")")
        out[col] = _TYPE_ALIASES[kind]
    return out


def load_csv(data_dir: str | os.PathLike | None = None, *, target: str | None = None,
             protected: str | None = None, positive_label: str | None = None,
             column_types: str | None = None, drop_columns: str | None = None,
             include_protected: bool = True, drop_missing: bool = True, test_fraction: float = 0.2,
             val_fraction: float | None = None, seed: int = 0) -> Dataset:
    """Load any CSV file (``data_dir`` is the file path) as a tabular classification dataset.

    ``target`` names the label column; ``positive_label`` makes the task binary
    (that value is class 1, every other value class 0), otherwise the classes
    are the sorted unique values. ``protected`` is a column or comma-separated
    intersection of columns. Column types are inferred (numeric when every value
    parses as a number) unless ``column_types`` overrides them
    (``"age:numeric,zip:categorical"``). ``drop_columns`` (comma list) are not
    used as features; ``include_protected=False`` also leaves the protected
    columns out of the features. Rows with missing values are dropped (counted
    in meta) unless ``drop_missing=False``, which keeps rows whose missing
    values are only in feature columns (numeric -> train mean, categorical ->
    a ``<missing>`` category).
    """
    if data_dir is None:
        raise ValueError(f"csv: pass the CSV file path as data_dir (--data-dir); expected {CSV_LAYOUT}")
    path = Path(data_dir)
    if not path.exists():
        raise FileNotFoundError(f"csv: file {path} does not exist; expected {CSV_LAYOUT}")
    if path.is_dir():
        raise IsADirectoryError(f"csv: {path} is a directory; pass the CSV FILE path as data_dir ({CSV_LAYOUT})")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"csv: {path} is empty; expected {CSV_LAYOUT}")
    header, body = rows[0], rows[1:]
    if len(set(header)) != len(header) or any(h == "" for h in header):
        raise ValueError(f"csv: the header row of {path} has empty or repeated column names: {header}")
    if not body:
        raise ValueError(f"csv: {path} has a header but no data rows")
    cols = rows_to_columns(body, header, path=path, first_line=2)
    if target is None:
        raise ValueError(f"csv: pass target=<label column>; columns in {path.name}: {', '.join(header)}")
    if target not in header:
        raise ValueError(f"csv: unknown target column {target!r}; valid columns: {', '.join(header)}")
    if protected is None:
        raise ValueError(f"csv: pass protected=<column> (or a comma list for an intersection); "
                         f"columns in {path.name}: {', '.join(c for c in header if c != target)}")
    candidates = [c for c in header if c != target]
    if target in [p.strip() for p in (protected.split(",") if isinstance(protected, str) else protected)]:
        raise ValueError(f"csv: protected column {target!r} is also the target column: the groups would be the "
                         f"labels; choose another protected column ({', '.join(candidates)})")
    attrs = parse_attr_list(protected, candidates, what="protected column", dataset="csv")
    dropped_cols = parse_attr_list(drop_columns, candidates, what="drop_columns entry", dataset="csv") \
        if drop_columns else []
    features = [c for c in header if c != target and c not in dropped_cols
                and (include_protected or c not in attrs)]
    if not features:
        raise ValueError("csv: no feature columns left (all columns are target, protected or dropped)")
    types = parse_column_types(column_types, header)
    numeric = []
    for c in features:
        kind = types.get(c)
        if kind is None:
            kind = "numeric" if as_float(cols[c], missing_mask(cols[c])) is not None and \
                (~missing_mask(cols[c])).any() else "categorical"
        if kind == "numeric":
            numeric.append(c)
    for c in attrs:  # a numeric protected column groups by exact value; categories sort numerically
        if types.get(c) == "numeric" and as_float(cols[c], missing_mask(cols[c])) is None:
            raise ValueError(f"csv: protected column {c!r} is declared numeric but has non-numeric values")
    group_attrs = [attr_from_column(c, cols[c]) for c in attrs]

    target_values = cols[target]
    tmiss = missing_mask(target_values)

    def labels(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
        classes = sorted_values(values.tolist())
        if positive_label is None:
            index = {c: i for i, c in enumerate(classes)}
            return np.asarray([index[v] for v in values.tolist()], np.int32), classes
        pos = str(positive_label).strip()
        match = values == pos
        if not match.any() and _is_number(pos):
            fv = as_float(values, np.zeros(len(values), bool))
            if fv is not None:
                match = fv == float(pos)
        if not match.any():
            raise ValueError(f"csv: positive_label {positive_label!r} does not occur in target column {target!r}; "
                             f"its values are: {', '.join(classes[:20])}")
        neg = sorted_values(values[~match].tolist())
        neg_name = neg[0] if len(neg) == 1 else f"not {pos}"
        pos_name = sorted(set(values[match].tolist()))[0]
        return match.astype(np.int32), [neg_name, pos_name]

    if tmiss.all():
        raise ValueError(f"csv: target column {target!r} has no values")
    meta = {"source": str(path), "columns": header, "features_from": features,
            "column_types": {c: ("numeric" if c in numeric else "categorical") for c in features},
            "positive_label": positive_label, "include_protected": include_protected}
    return build_tabular_dataset(
        "csv", cols, None, feature_columns=features, numeric_columns=numeric, target_column=target,
        labels=labels, group_attrs=group_attrs, drop_missing=drop_missing, test_fraction=test_fraction,
        val_fraction=val_fraction, seed=seed, meta=meta)
