"""Tabular data: the ``csv`` loader (a CSV or Parquet file, a pandas DataFrame) and the preprocessing it
shares with Adult.

Reading is pandas': ``read_csv`` (C parser) for text, ``read_parquet`` (with pyarrow) for a Parquet file,
a DataFrame column by column, each value spelled as ``DataFrame.to_csv`` would write it. Around it, what
files exported by hand need: compression recognised by content (gzip, bz2, xz), the encoding (UTF-8, else
cp1252 / latin-1 with a warning), the delimiter read off the header line or an Excel ``sep=;`` line, values
stripped, blank rows skipped, header checks, repeated header lines skipped with a warning, and every row's
fields counted, since pandas pads a short row silently (here it is an error naming the row). Each check or
rewrite of a column (missing-value tokens, one spelling per number, types) runs once per distinct value.

Preprocessing is scikit-learn's (:class:`TabularPreprocessor`: ``StandardScaler`` and
``OneHotEncoder(handle_unknown="ignore")`` in a ``ColumnTransformer``), fitted on the train split only:
numeric columns standardized with the train mean / std, categorical ones one-hot encoded over the categories
seen in train (one first seen in val / test encodes as all zeros). Rows with a missing value (``""``, ``?``,
``NA``, ``NaN``, ``null``, ... in any case) in a used column are dropped and counted by default. Our checks
stay on top: ids and free text, label leaks, numbers read as categories, non-finite numbers, small groups.

The module is named ``tabular`` rather than ``csv`` so it never shadows the
standard library's ``csv`` module; the registered loader name is ``csv``.

Parts. Reading (files, encodings, delimiters, value spellings) is ``table_reading.py``; encoding into a
:class:`Dataset` (groups, splits, preprocessing, checks) ``table_encoding.py``; this module is the ``csv``
loader over both, and re-exports their names (``tabular.read_table``, ``tabular.GroupAttr``, ... as before).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from fairprune_jax.core.notices import warn
from fairprune_jax.data.base import Dataset, parse_attr_list
from fairprune_jax.data.table_encoding import (LEAK_ACCURACY, NEAR_UNIQUE_MIN, NEAR_UNIQUE_SHARE,  # noqa: F401
                                               GroupAttr, TabularPreprocessor, attr_from_column,
                                               build_tabular_dataset, leak_suspects)
from fairprune_jax.data.table_reading import (_COMMA_DECIMAL, _COMPRESSED, _MISSING_LOWER, _THOUSANDS,  # noqa: F401
                                              _WHITESPACE, DELIMITERS, ENCODINGS, MISSING_TOKENS, _as_text,
                                              _field_counts, _filled_rows, _is_number, _warn_comma_numbers,
                                              as_float, canonical_numbers, check_fields, decode_text, frame_table,
                                              missing_mask, number_format, per_value, read_bytes, read_parquet,
                                              read_table, sniff_delimiter, sorted_values, warn_case_variants)

COLUMN_TYPES = ("numeric", "categorical")
_TYPE_ALIASES = {"numeric": "numeric", "num": "numeric", "number": "numeric", "float": "numeric",
                 "int": "numeric", "categorical": "categorical", "cat": "categorical", "category": "categorical",
                 "str": "categorical", "string": "categorical"}


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
             column_types: str | None = None, drop_columns: str | None = None, features: str | None = None,
             include_protected: bool = True, drop_missing: bool = True, test_fraction: float = 0.2,
             val_fraction: float | None = None, seed: int = 0, delimiter: str | None = None,
             encoding: str | None = None, bins: str | None = None, decimal: str = ".",
             thousands: str | None = None, _frame=None) -> Dataset:
    """Load any CSV file (``data_dir`` is the file path) as a tabular classification dataset.

    ``target`` names the label column; ``positive_label`` makes the task binary
    (that value is class 1, every other value class 0), otherwise the classes
    are the sorted unique values. ``protected`` is a column or comma-separated
    intersection of columns. Column types are inferred (numeric when every value
    parses as a number) unless ``column_types`` overrides them
    (``"age:numeric,zip:categorical"``). ``features`` (comma list) keeps only
    those columns as features (a keep-list: everything else, ids and free text
    included, is ignored); ``drop_columns`` (comma list) are not used as
    features; ``include_protected=False`` also leaves the protected columns out
    of the features. ``delimiter`` (``,``, ``;``, a tab, ``|``) is otherwise
    read off the header line; ``encoding`` is otherwise UTF-8 (a byte-order mark
    is skipped), else cp1252 / latin-1 with a warning. Warned about: columns of
    near-unique values (ids, names, timestamps), columns that are mostly numbers
    but read as categorical, columns that alone predict the target almost
    perfectly on held-out rows, header lines repeated inside the file (skipped).
    ``inf`` or out-of-range numbers in a numeric column are an error;
    missing-value tokens (``""``, ``?``, ``NA``, ``N/A``, ``NaN``, ``null``,
    ``None``, ``-``, ``--``, in any case) are missing. Rows with missing values are dropped (counted
    in meta) unless ``drop_missing=False``, which keeps rows whose missing
    values are only in feature columns (numeric -> train mean, categorical ->
    a ``<missing>`` category). Numbers that are equal are one value (``1``,
    ``1.0``, ``01``); values differing only by case or spacing are warned
    about. ``bins="age:30,45,60"`` groups a numeric protected column into
    ranges (``<30``, ``30-45``, ``45-60``, ``>=60``; several columns separated
    by ``;``): a protected column whose groups hold a median of fewer than 5
    rows is refused (an age with decimals would make one group per row).
    A gzip / bz2 / xz file is read as is; an Excel ``sep=;`` first line sets
    the delimiter; a trailing delimiter on every line (an empty last column)
    is dropped; a row with too few or too many fields is an error naming its
    line. ``decimal=","`` reads ``3,5`` as 3.5; ``thousands`` (``,``,
    ``.``, a space or ``'``) is dropped from numbers such as ``1,234``. A
    Parquet file is read as its table (``pandas.read_parquet``, with pyarrow).
    """
    if decimal not in (".", ","):
        raise ValueError(f"csv: decimal must be \".\" or \",\"; got {decimal!r}")
    if thousands is not None and (thousands not in _THOUSANDS or thousands == decimal):
        raise ValueError(f"csv: thousands must be one of {', '.join(map(repr, _THOUSANDS))} and differ from the "
                         f"decimal mark; got {thousands!r}")
    if data_dir is None:
        raise ValueError(f"csv: pass the CSV file path as data_dir (--data-dir); expected {CSV_LAYOUT}")
    path = Path(data_dir)
    delim = used_encoding = excel = None
    if _frame is None:
        if not path.exists():
            raise FileNotFoundError(f"csv: file {path} does not exist; expected {CSV_LAYOUT}")
        if path.is_dir():
            raise IsADirectoryError(f"csv: {path} is a directory; pass the CSV FILE path as data_dir ({CSV_LAYOUT})")
        raw = read_bytes(path)
        if raw.startswith(b"PAR1"):
            _frame = read_parquet(path, raw)
    if _frame is not None:
        columns, fields, lines = frame_table(_frame)
    else:
        text, used_encoding = decode_text(raw, path, encoding)
        if encoding is None and used_encoding not in ("utf-8-sig", "utf-16"):
            warn(f"csv: {path.name} is not valid UTF-8; read it as {used_encoding} (pass encoding=... if "
                 "names or categories look wrong)")
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        if delimiter is not None and delimiter not in DELIMITERS and len(delimiter) != 1:
            raise ValueError(f"csv: delimiter must be one character such as , ; | or a tab; got {delimiter!r}")
        excel = re.fullmatch(r'\s*"?sep=(.)"?\s*', first)
        if excel:      # spreadsheet exports may name their delimiter on a first line of its own: "sep=;"
            delimiter = delimiter if delimiter is not None else excel.group(1)
            text = text[text.index(first) + len(first):]
            first = next((ln for ln in text.splitlines() if ln.strip()), "")
        delim = delimiter if delimiter is not None else sniff_delimiter(first)
        columns, fields, lines = read_table(text, path=path, delimiter=delim)
    if not len(fields):
        raise ValueError(f"csv: {path} is empty; expected {CSV_LAYOUT}")
    k = int(fields[0])
    header = [str(c[0]) for c in columns[:k]]
    columns, fields, lines = [c[1:] for c in columns], fields[1:], lines[1:]
    if k > 1 and header[-1] == "" and (fields == k).all() and (columns[k - 1] == "").all():
        header, fields = header[:-1], fields - 1        # every line ends with the delimiter
    empty = [str(i + 1) for i, h in enumerate(header) if h == ""]
    repeated = {h: [i + 1 for i, x in enumerate(header) if x == h] for h in header if h and header.count(h) > 1}
    if empty or repeated:
        parts = [f"column {', '.join(empty)} {'has' if len(empty) == 1 else 'have'} no name"] if empty else []
        parts += [f"{h!r} names columns {' and '.join(map(str, idx))}" for h, idx in repeated.items()]
        raise ValueError(f"csv: the header row of {path.name}: {'; '.join(parts)}; every column needs its own name")
    again = fields == len(header)
    for j, h in enumerate(header):
        again &= columns[j] == h
    if again.any():      # files concatenated from several exports repeat their header line
        warn(f"csv: {path.name} repeats its header line {int(again.sum())} time(s) inside the data (first at "
             f"data row {int(np.flatnonzero(again)[0]) + 2}); those lines were skipped")
        columns, fields, lines = [c[~again] for c in columns], fields[~again], lines[~again]
    if not len(fields):
        raise ValueError(f"csv: {path} has a header but no data rows")
    cols = check_fields(columns, fields, lines, header, path=path, first_row=2 + bool(excel))
    cols = {c: canonical_numbers(number_format(v, decimal, thousands)) for c, v in cols.items()}
    if target is None:
        raise ValueError(f"csv: pass target=<label column>; columns in {path.name}: {', '.join(header)}")
    if target not in header:
        numeric = sum(1 for h in header if re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", h))
        hint = (f" (the header has one column: is the file delimited by something other than {delim!r}? pass "
                "delimiter=...)" if len(header) == 1 else
                f" (the first line looks like data, not column names: {numeric} of its {len(header)} fields are "
                "numbers; the file needs a header line naming its columns, e.g. UCI Adult's adult.data has none: "
                "use --dataset adult for it)" if numeric * 3 >= len(header) else "")
        raise ValueError(f"csv: unknown target column {target!r}; valid columns: {', '.join(header)}{hint}")
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
    keep = parse_attr_list(features, candidates, what="features entry", dataset="csv") if features else None
    feature_list = features
    features = [c for c in header if c != target and c not in dropped_cols and (keep is None or c in keep)
                and (include_protected or c not in attrs)]
    if not features:
        raise ValueError("csv: no feature columns left (all columns are target, protected or dropped"
                         + (f", or not in features={feature_list!r}" if keep is not None else "") + ")")
    types = parse_column_types(column_types, header)
    numeric = []
    for c in features:
        kind = types.get(c)
        miss = missing_mask(cols[c])
        if kind is None:
            kind = "numeric" if as_float(cols[c], miss) is not None and (~miss).any() else "categorical"
            if kind == "categorical":
                _warn_mostly_numbers(c, cols[c][~miss])
                _warn_comma_numbers(c, cols[c][~miss])
        if kind == "numeric":
            numeric.append(c)
            odd_nan = _check_finite(c, cols[c], miss)
            if odd_nan is not None and odd_nan.any():      # "-nan", "+NaN": missing like the NaN token
                cols[c] = np.where(odd_nan, "", cols[c])
        else:
            _warn_near_unique(c, cols[c][~miss], len(fields))
            if c not in attrs:
                warn_case_variants(c, cols[c][~miss], what="feature column")
    for c, what in [(target, "target column")] + [(a, "protected column") for a in attrs]:
        warn_case_variants(c, cols[c][~missing_mask(cols[c])], what=what)
    for c in attrs:  # a numeric protected column groups by exact value; categories sort numerically
        if types.get(c) == "numeric" and as_float(cols[c], missing_mask(cols[c])) is None:
            raise ValueError(f"csv: protected column {c!r} is declared numeric but has non-numeric values")
    binned = parse_bins(bins, attrs)
    group_attrs = []
    for c in attrs:
        if c in binned:
            values, ranges = bin_column(c, cols[c], binned[c])
            group_attrs.append(attr_from_column(c, values, categories=ranges))
        else:
            group_attrs.append(attr_from_column(c, cols[c]))

    target_values = cols[target]
    tmiss = missing_mask(target_values)

    def labels(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
        classes = sorted_values(values.tolist())
        if positive_label is None:
            index = {c: i for i, c in enumerate(classes)}
            return per_value(values, index.__getitem__, np.int32), classes
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
    meta = {"source": str(path), "columns": header, "features_from": features, "delimiter": delim,
            "encoding": used_encoding, "repeated_header_lines_skipped": int(again.sum()), "features_keep_list": keep,
            "column_types": {c: ("numeric" if c in numeric else "categorical") for c in features},
            "positive_label": positive_label, "include_protected": include_protected}
    return build_tabular_dataset(
        "csv", cols, None, feature_columns=features, numeric_columns=numeric, target_column=target,
        labels=labels, group_attrs=group_attrs, drop_missing=drop_missing, test_fraction=test_fraction,
        val_fraction=val_fraction, seed=seed, meta=meta, check_leaks=True)


def parse_bins(spec: str | dict | None, attrs: Sequence[str]) -> dict[str, list[float]]:
    """``"age:30,45,60;income:20000"`` (or a dict) -> ``{"age": [30, 45, 60], ...}``: bin edges per protected
    column, ascending."""
    if spec is None or spec == "":
        return {}
    items = spec.items() if isinstance(spec, dict) else [
        part.split(":", 1) if ":" in part else (part, "") for part in str(spec).split(";") if part.strip()]
    out = {}
    for col, edges in items:
        col = str(col).strip()
        if col not in attrs:
            raise ValueError(f"csv: bins names {col!r}, which is not a protected column ({', '.join(attrs)}); "
                             "write bins=\"COLUMN:EDGE,EDGE,...\"")
        try:
            vals = [float(e) for e in (edges if isinstance(edges, (list, tuple)) else str(edges).split(",")) if
                    str(e).strip()]
        except ValueError:
            vals = []
        if not vals or not all(np.isfinite(vals)) or sorted(set(vals)) != vals:
            raise ValueError(f"csv: bins for {col!r} must be increasing finite numbers, like "
                             f"bins=\"{col}:30,45,60\"; got {edges!r}")
        out[col] = vals
    return out


def bin_column(col: str, values: np.ndarray, edges: list[float]) -> tuple[np.ndarray, list[str]]:
    """A numeric column's values replaced by the names of their ranges (``<30``, ``30-45``, ``>=60``), and the
    range names in order; missing values stay missing."""
    miss = missing_mask(values)
    f = as_float(values, miss)
    if f is None:
        raise ValueError(f"csv: bins for {col!r} need a numeric column; it has values such as "
                         f"{[v for v in values.tolist() if not _is_number(v)][:3]}")
    fmt = lambda e: f"{e:g}"  # noqa: E731
    names = [f"<{fmt(edges[0])}"] + [f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges, edges[1:])] + [f">={fmt(edges[-1])}"]
    idx = np.searchsorted(np.asarray(edges), np.where(miss, 0.0, f), side="right")
    out = np.where(miss, values, np.asarray(names, dtype=object)[idx]).astype(str)
    present = set(out[~miss].tolist())
    return out, [n for n in names if n in present]


def _check_finite(col: str, values: np.ndarray, missing: np.ndarray) -> np.ndarray | None:
    """A numeric column holding inf, -inf or numbers beyond float range is an error naming them (a NaN spelled
    another way than the missing tokens counts as missing, like them)."""
    f = as_float(values, missing)
    if f is None:
        return None
    bad = np.isinf(f)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"csv: numeric column {col!r} has {int(bad.sum())} value(s) that are not finite numbers "
                         f"({', '.join(sorted(set(values[rows].tolist()))[:5])}; data rows "
                         f"{', '.join(str(i + 2) for i in rows[:5])}{' ...' if len(rows) > 5 else ''}): clean "
                         f"them, mark them missing (an empty field), or declare the column categorical "
                         f"(column_types=\"{col}:categorical\")")
    return np.isnan(f) & ~missing


def _warn_mostly_numbers(col: str, values: np.ndarray) -> None:
    """A column read as categorical although nearly all its values are numbers (one ``n.a.`` turns 40 ages into
    40 one-hot columns): warned, naming the values that are not numbers."""
    if values.size == 0:
        return
    is_num = per_value(values, _is_number, bool)
    share = float(is_num.mean())
    if share >= 0.9:
        others = sorted(set(values[~is_num].tolist()))
        warn(f"csv: column {col!r} is read as categorical ({len(set(values.tolist()))} one-hot columns) "
             f"although {share:.0%} of its values are numbers; the others: "
             f"{', '.join(repr(o) for o in others[:5])}{' ...' if len(others) > 5 else ''}. Make them "
             f"missing (an empty field) to read it as numeric, or declare column_types=\"{col}:categorical\"")


def _warn_near_unique(col: str, values: np.ndarray, n_rows: int) -> None:
    """A categorical column with nearly one value per row (an id, a name, a date, free text): one-hot encoding
    gives the model one feature per row to memorize, and nothing it can use on new rows."""
    k = len(set(values.tolist()))
    if k > NEAR_UNIQUE_MIN and k > NEAR_UNIQUE_SHARE * n_rows:
        warn(f"csv: column {col!r} has {k} distinct values in {n_rows} rows (an id, a name, a date, free "
             f"text?): one-hot encoded it adds {k} features that only memorize rows; drop it "
             f"(drop_columns=\"{col}\") or list the columns to use (features=\"a,b,...\")")


def load_dataframe(frame, *, target: str, protected: str, **options) -> Dataset:
    """A pandas DataFrame as a dataset, read exactly as the same table saved as a CSV file would be by
    :func:`load_csv` (the same options, checks and warnings; missing values, NaN included, are missing). Its
    columns are read directly (:func:`frame_table`), each value spelled as ``DataFrame.to_csv`` writes it."""
    import pandas as pd
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"load_dataframe takes a pandas DataFrame; got {type(frame).__name__}")
    return load_csv("dataframe", target=target, protected=protected, _frame=frame, **options)
