"""Encoding a read table into a :class:`Dataset`: the protected attributes as groups (:class:`GroupAttr`), the
split into train / val / test, rows with a missing value in a used column dropped and counted, and
scikit-learn's preprocessing fitted on the train split only (:class:`TabularPreprocessor`: numeric columns
standardized, categorical ones one-hot encoded), with the checks on top: ids and free text, label leaks
(:func:`leak_suspects`), numbers read as categories, small groups (:func:`build_tabular_dataset`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from fairprune_jax.core.notices import warn
from fairprune_jax.data.base import (Dataset, Split, carve_validation_indices, check_class_sizes, check_fraction,
                                     encode_groups, stratified_split)
from fairprune_jax.data.table_reading import _is_number, as_float, missing_mask, per_value, sorted_values


#: A categorical feature with more distinct values than this share of the rows (and > NEAR_UNIQUE_MIN) is
#: warned about as an id / name / timestamp; a feature that alone predicts held-out labels this well is
#: warned about as a possible leak of the target.
NEAR_UNIQUE_SHARE, NEAR_UNIQUE_MIN = 0.5, 50
LEAK_ACCURACY = 0.95


@dataclasses.dataclass
class TabularPreprocessor:
    """Standardize numeric columns and one-hot encode categorical ones, with statistics from ``fit``.

    The work is scikit-learn's: a ``ColumnTransformer`` of a ``StandardScaler`` over the numeric columns and a
    ``OneHotEncoder(categories=<ours>, handle_unknown="ignore")`` over the categorical ones (``encoder``, built
    by the first ``transform``). ``fit`` computes what they hold: the categories seen in train (sorted
    numerically when they are all numbers; one unseen in train encodes as all zeros) and numpy's mean and
    standard deviation of each column's finite train values (1 where that is <= 1e-12), set on the scaler:
    its own column sums differ from numpy's in the last bit now and then, which would change some float32
    features of every recorded run. A missing number (kept with ``drop_missing=False``) becomes 0, the mean.
    """

    numeric: list[str]
    categorical: list[str]
    mean: dict[str, float] = dataclasses.field(default_factory=dict)
    std: dict[str, float] = dataclasses.field(default_factory=dict)
    categories: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    encoder: object = dataclasses.field(default=None, repr=False, compare=False)

    def fit(self, num: dict[str, np.ndarray], cat: dict[str, np.ndarray]) -> "TabularPreprocessor":
        for c in self.numeric:
            v = num[c][np.isfinite(num[c])]
            m = float(v.mean()) if len(v) else 0.0
            s = float(v.std()) if len(v) else 1.0
            self.mean[c] = m
            self.std[c] = s if s > 1e-12 else 1.0
        for c in self.categorical:
            self.categories[c] = sorted_values(cat[c].tolist())
        self.encoder = None
        return self

    @property
    def feature_names(self) -> list[str]:
        names = list(self.numeric)
        for c in self.categorical:
            names += [f"{c}={v}" for v in self.categories[c]]
        return names

    def _frame(self, num: dict[str, np.ndarray], cat: dict[str, np.ndarray]):
        import pandas as pd
        return pd.DataFrame({**{c: pd.Series(num[c], dtype=np.float64) for c in self.numeric},
                             **{c: pd.Series(cat[c], dtype=object) for c in self.categorical}})

    def _fitted(self, frame):
        """The ColumnTransformer, fitted on the first row of ``frame`` if not yet: it learns nothing from the
        rows (the categories and the statistics are given), only the columns."""
        if self.encoder is None and (self.numeric or self.categorical):
            from sklearn.compose import ColumnTransformer
            from sklearn.preprocessing import OneHotEncoder, StandardScaler
            onehot = OneHotEncoder(categories=[np.asarray(self.categories[c], object) for c in self.categorical],
                                   handle_unknown="ignore", sparse_output=False, dtype=np.float32)
            parts = [("num", StandardScaler(), list(self.numeric))] if self.numeric else []
            parts += [("cat", onehot, list(self.categorical))] if self.categorical else []
            with np.errstate(invalid="ignore", divide="ignore"):        # a missing number in that row
                self.encoder = ColumnTransformer(parts).fit(frame.iloc[:1])
            if self.numeric:
                scaler = self.encoder.named_transformers_["num"]
                scaler.mean_ = np.asarray([self.mean[c] for c in self.numeric], np.float64)
                scaler.scale_ = np.asarray([self.std[c] for c in self.numeric], np.float64)
                scaler.var_ = scaler.scale_ ** 2
        return self.encoder

    def transform(self, num: dict[str, np.ndarray], cat: dict[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(num.values()))) if num else len(next(iter(cat.values())))
        if not (self.numeric or self.categorical):
            return np.zeros((n, 0), np.float32)
        frame = self._frame(num, cat)
        x = np.asarray(self._fitted(frame).transform(frame), np.float64)
        return np.where(np.isfinite(x), x, 0.0).astype(np.float32)       # missing (when kept) -> the train mean

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
    codes = per_value(values, lambda v: index.get(v, -1), np.int64)
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
    check_leaks: bool = False,
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
    check_class_sizes(y, class_names, dataset=name)
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
        f = as_float(kept[c], missing[c][keep])
        if f is None:
            raise ValueError(f"{name}: column {c!r} is declared numeric but has non-numeric values such as "
                             f"{[v for v in kept[c][:1000].tolist() if not _is_number(v)][:3]}; declare it "
                             f"categorical (column_types=\"{c}:categorical\")")
        num_all[c] = f
    cat_all = {c: np.where(missing[c][keep], "<missing>", kept[c]) for c in categorical}

    def sub(d: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in d.items()}

    leaks = leak_suspects(kept, feature_columns, numeric, y, train_idx, test_idx, target_column,
                          numbers=num_all) if check_leaks else {}
    pre = TabularPreprocessor(numeric, categorical).fit(sub(num_all, train_idx), sub(cat_all, train_idx))
    parts = {"train": train_idx, "test": test_idx}
    if val_idx is not None:
        parts["val"] = val_idx
    splits = {k: Split(pre.transform(sub(num_all, idx), sub(cat_all, idx)), y[idx], g[idx])
              for k, idx in parts.items()}
    unseen = {}            # categories of test / val rows that train never had: all-zero one-hot features
    for k, idx in parts.items():
        if k == "train":
            continue
        for c in categorical:
            known = set(pre.categories[c])
            vals = cat_all[c][idx]
            new = sorted({v for v in set(vals.tolist()) if v not in known}, key=str)
            if new:
                unseen.setdefault(k, {})[c] = {"rows": int(np.isin(vals, new).sum()), "values": new[:10]}
    for k, cols in unseen.items():
        shown = "; ".join(f"{c}: {', '.join(map(repr, u['values'][:3]))} ({u['rows']} rows)" for c, u in cols.items())
        warn(f"{name}: the {k} split has categories the training split never had ({shown}): those rows get "
             "all-zero features for that column, which the model never saw; check the file, or merge rare "
             "categories")
    out_meta = dict(meta or {})
    out_meta.update({
        "target": target_column, "protected": [a.name for a in group_attrs],
        "rows_before_dropping": rows_before, "rows_dropped_missing": dropped,
        "rows_dropped_missing_total": int(bad.sum()), "missing_values_per_column": missing_by_column,
        "drop_missing": bool(drop_missing), "rows_used": int(keep.sum()),
        "split_seed": seed, "val_fraction": val_fraction,
        "feature_names": pre.feature_names, **pre.to_meta(), **group_info,
        **({"unseen_categories": unseen} if unseen else {}),
    })
    if check_leaks:
        out_meta["leak_suspects"] = leaks
    if part is None:
        out_meta["test_fraction"] = test_fraction
    return Dataset(name=name, train=splits["train"], test=splits["test"], val=splits.get("val"),
                   group_names=group_names, group_attrs=[a.name for a in group_attrs],
                   class_names=list(class_names), meta=out_meta)


def leak_suspects(cols: dict[str, np.ndarray], features: list[str], numeric: list[str], y: np.ndarray,
                  train_idx: np.ndarray, test_idx: np.ndarray, target: str,
                  numbers: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Features that alone predict the held-out labels almost perfectly (warned: they may leak the target).

    Each feature on its own: the majority label of each of its values on train (numeric: of 20 train-quantile
    bins), applied to the test rows (unseen values: the overall majority). Flagged when that accuracy is at least
    ``LEAK_ACCURACY`` and removes three quarters of the majority class's error. Held-out, so an id column (which
    memorizes train) is not flagged; ``{column: accuracy}``. ``numbers``: the numeric columns as floats, if
    already parsed.
    """
    import pandas as pd
    if len(test_idx) == 0 or len(train_idx) == 0:
        return {}
    ytr, yte = y[train_idx], y[test_idx]
    c = int(max(y.max(initial=0), 0)) + 1
    overall = int(np.bincount(ytr, minlength=c).argmax())
    baseline = float(np.mean(yte == np.bincount(yte, minlength=c).argmax()))
    out = {}
    for col in features:
        v = cols[col]
        if col in numeric:
            f = np.asarray(numbers[col] if numbers else as_float(v, missing_mask(v)), np.float64)
            edges = np.unique(np.nanquantile(f[train_idx], np.linspace(0, 1, 21)[1:-1])) \
                if np.isfinite(f[train_idx]).any() else np.zeros(0)
            keys = np.where(np.isfinite(f), np.digitize(f, edges), -1)
        else:
            keys = pd.factorize(np.asarray(v, object))[0]         # one integer per distinct value
        uniq, inv = np.unique(keys[train_idx], return_inverse=True)
        counts = np.zeros((len(uniq), c), np.int64)
        np.add.at(counts, (inv, ytr), 1)
        majority = counts.argmax(1)
        pos = np.clip(np.searchsorted(uniq, keys[test_idx]), 0, len(uniq) - 1)
        seen = uniq[pos] == keys[test_idx]
        pred = np.where(seen, majority[pos], overall)
        acc = float(np.mean(pred == yte))
        # (above the majority class itself: with one class in test, every column would "predict" it)
        if acc >= LEAK_ACCURACY and acc > baseline and (1 - acc) <= 0.25 * (1 - baseline):
            out[col] = acc
    if out:
        listed = ", ".join(f"{k!r} ({a:.3f})" for k, a in out.items())
        warn(f"csv: column(s) {listed} predict the target {target!r} almost perfectly on their own (held-out "
             f"accuracy from that column alone; the majority class gets {baseline:.3f}): a column recorded "
             "after the outcome or derived from it leaks the label and makes every figure look better "
             f"than it is; drop it (drop_columns=\"{','.join(out)}\") unless it is a real predictor")
    return out
