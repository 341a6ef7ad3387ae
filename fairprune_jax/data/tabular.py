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
"""
from __future__ import annotations

import csv as _csv
import dataclasses
import io
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fairprune_jax.core.notices import warn
from fairprune_jax.data.base import (Dataset, Split, carve_validation_indices, check_fraction, encode_groups,
                                     parse_attr_list, stratified_split)

MISSING_TOKENS = ("", "?", "NA", "N/A", "NaN", "nan", "null", "None", "-", "--")
#: Missing-value tokens compared case-insensitively ("NAN", "Null", "NONE" are missing too).
_MISSING_LOWER = frozenset(t.lower() for t in MISSING_TOKENS)
#: Delimiters the CSV loader recognises from the header line (``delimiter=`` overrides).
DELIMITERS = (",", ";", "\t", "|")
#: Encodings tried in turn when ``encoding`` is not given (a UTF-8 byte-order mark is skipped).
ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")
#: A categorical feature with more distinct values than this share of the rows (and > NEAR_UNIQUE_MIN) is
#: warned about as an id / name / timestamp; a feature that alone predicts held-out labels this well is
#: warned about as a possible leak of the target.
NEAR_UNIQUE_SHARE, NEAR_UNIQUE_MIN = 0.5, 50
LEAK_ACCURACY = 0.95
COLUMN_TYPES = ("numeric", "categorical")
_TYPE_ALIASES = {"numeric": "numeric", "num": "numeric", "number": "numeric", "float": "numeric",
                 "int": "numeric", "categorical": "categorical", "cat": "categorical", "category": "categorical",
                 "str": "categorical", "string": "categorical"}


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

#: Compressed files are recognised by their first bytes, whatever their name (``.csv.gz``, ``.bz2``, ``.xz``).
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip / bz2 / xz (recognised by content)."""
    import importlib
    raw = path.read_bytes()
    for magic, module in _COMPRESSED:
        if raw.startswith(magic):
            try:
                return importlib.import_module(module).decompress(raw)
            except Exception as e:  # noqa: BLE001 - a truncated archive
                raise ValueError(f"{path}: looks {module}-compressed but cannot be decompressed ({e}); "
                                 "is the file complete?") from None
    if raw.startswith(b"PK\x03\x04"):
        raise ValueError(f"{path} is a zip archive; unzip it and pass the CSV file inside")
    return raw


def decode_text(raw: bytes, path: Path, encoding: str | None = None) -> tuple[str, str]:
    """The text of a file's bytes and the encoding that read it: ``encoding``, else UTF-8 (byte-order mark
    skipped), else the first of ``ENCODINGS`` that decodes it (UTF-16 with a byte-order mark is recognised)."""
    if b"\x00" in raw[:4096] and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"{path} is not a text file (it holds NUL bytes: a binary, a spreadsheet or an archive); "
                         "pass a CSV file (from a spreadsheet: save as CSV)")
    if encoding is not None:
        try:
            return raw.decode(encoding), encoding
        except (UnicodeDecodeError, LookupError) as e:
            raise ValueError(f"{path}: cannot be read as encoding={encoding!r}: {e}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16"), "utf-16"
    for enc in ENCODINGS:
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def read_parquet(path: Path, raw: bytes):
    """A Parquet file (its bytes) as a pandas DataFrame; needs pyarrow (or fastparquet)."""
    import pandas as pd
    try:
        return pd.read_parquet(io.BytesIO(raw))
    except ImportError:
        raise ValueError(f"{path} is a Parquet file, not a CSV: reading it needs pyarrow (pip install pyarrow), "
                         "or write it as CSV where pyarrow is installed (pandas.read_parquet(path).to_csv("
                         "\"data.csv\", index=False))") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's errors on a damaged file
        raise ValueError(f"{path} is a Parquet file, not a CSV, and pyarrow cannot read it ({e}); is the file "
                         "complete?") from None


def sniff_delimiter(first_line: str) -> str:
    """The delimiter of ``DELIMITERS`` that occurs most often in the header line (outside quotes); ``,`` on a tie."""
    counts = {d: 0 for d in DELIMITERS}
    quoted = False
    for ch in first_line:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in counts:
            counts[ch] += 1
    best = max(DELIMITERS, key=lambda d: (counts[d], d == ","))
    return best if counts[best] else ","


def per_value(values: np.ndarray, fn: Callable, dtype=object) -> np.ndarray:
    """``fn`` applied once to each distinct value of a text column (pandas' hash-based factorize), the
    results spread back over the rows: a check or a rewrite costs one call per distinct value, not per row."""
    import pandas as pd
    values = np.asarray(values, dtype=object)
    codes, uniq = pd.factorize(values)
    if len(codes) and codes.min() < 0:          # None / NaN among the values: a value of its own too
        codes, uniq = pd.factorize(values, use_na_sentinel=False)
    return np.asarray([fn(v) for v in uniq.tolist()], dtype=dtype)[codes]


#: What ``str.strip()`` strips: a line of these and delimiters only is a blank row.
_WHITESPACE = "".join(filter(str.isspace, map(chr, range(0x3001))))


def _field_counts(text: str, delimiter: str, path: Path, skip_prefixes: tuple[str, ...]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """For each non-blank row: its number of fields, the line it ends on and whether its first field starts
    with one of ``skip_prefixes``; and the most fields of any row. Without quotes a row is a line, its fields
    split at the delimiter; with quotes the csv module reads it (a quoted field may hold either)."""
    if '"' not in text and delimiter != " ":
        lines = (text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text).split("\n")
        counts = [ln.count(delimiter) + 1 for ln in lines]
        blank = _WHITESPACE + delimiter
        filled = [i for i, ln in enumerate(lines) if ln.strip(blank)]
        fields, width = np.asarray(counts, np.int64)[filled], max(counts)
        first = [lines[i].split(delimiter, 1)[0] if lines[i].lstrip().startswith(skip_prefixes) else ""
                 for i in filled] if skip_prefixes else []
        ends = np.asarray(filled, np.int64) + 1
    else:
        reader = _csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
        rows, width = [], 1
        try:
            for r in reader:
                width = max(width, len(r))
                if "".join(r).strip():
                    rows.append((len(r), reader.line_num, r[0]))
        except _csv.Error as e:
            raise ValueError(f"{path}: line {reader.line_num} cannot be read: {e}") from None
        fields, ends = (np.asarray([r[i] for r in rows], np.int64).reshape(-1) for i in (0, 1))
        first = [r[2] for r in rows]
    skipped = np.asarray([f.strip().startswith(skip_prefixes) for f in first], bool) if skip_prefixes \
        else np.zeros(len(fields), bool)
    return fields, ends, skipped, width


def read_table(text: str, *, path: Path, delimiter: str = ",", skip_prefixes: tuple[str, ...] = ()
               ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Delimited text read by pandas' C parser: ``(columns, fields, lines)``.

    ``columns[j]`` holds field ``j`` of every row (surrounding spaces stripped, ``""`` past a row's end),
    ``fields`` each row's own number of fields and ``lines`` the line of the file it ends on. Blank rows and
    rows whose first field starts with one of ``skip_prefixes`` are left out. pandas pads a short row with
    empty fields without a word, so the fields are also counted row by row (:func:`_field_counts`): a row of
    the wrong length is the caller's error to raise (:func:`check_fields`), never a silently shifted row.
    """
    import pandas as pd
    fields, ends, skipped, width = _field_counts(text, delimiter, path, skip_prefixes)
    if not len(fields):
        return [np.zeros(0, object)], fields, ends
    try:
        frame = pd.read_csv(io.StringIO(text), sep=delimiter, header=None, names=range(width), dtype=object,
                            na_filter=False, skipinitialspace=True, engine="c")
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        raise ValueError(f"{path}: line {m.group(2)} has {m.group(3)} fields, expected at most {m.group(1)}" if m
                         else f"{path} cannot be read as delimited text: {e}") from None
    columns = [per_value(frame[j].to_numpy(), str.strip) for j in range(width)]
    rows = _filled_rows(columns)
    if len(rows) != len(fields) or any((c[rows][fields <= j] != "").any() for j, c in enumerate(columns)):
        raise ValueError(f"{path}: its rows are read differently by pandas and by the csv module ({len(rows)} and "
                         f"{len(fields)} non-blank rows); check its quotes")
    rows = rows[~skipped]
    return [c[rows] for c in columns], fields[~skipped], ends[~skipped]


def check_fields(columns: list[np.ndarray], fields: np.ndarray, lines: np.ndarray, names: Sequence[str], *,
                 path: Path, first_row: int = 1) -> dict[str, np.ndarray]:
    """The columns by name, after checking that every row has ``len(names)`` fields (the error names the first
    row that has not, by its number among the data rows, starting at ``first_row``, and by its line)."""
    k = len(names)
    bad = np.flatnonzero(fields != k)
    if len(bad):
        i = int(bad[0])
        n = int(fields[i])
        shown = [str(columns[j][i]) for j in range(min(n, 6))]
        raise ValueError(f"{path}: data row {i + first_row} has {n} fields, expected {k} ({', '.join(names)}): "
                         f"{shown}... (line {int(lines[i])})")
    return {name: columns[j] if j < len(columns) else np.full(len(fields), "", object)
            for j, name in enumerate(names)}


def frame_table(frame) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """A DataFrame as :func:`read_table` returns the same table written by ``DataFrame.to_csv``: the header
    row, then every row's values as to_csv spells them (missing values empty), stripped; blank rows left out."""
    header = np.asarray([str(name).strip() for name in frame.columns], object)
    columns = [np.concatenate([header[j:j + 1], per_value(_as_text(frame.iloc[:, j]), str.strip)])
               for j in range(len(header))]
    rows = _filled_rows(columns)
    return [c[rows] for c in columns], np.full(len(rows), len(columns), np.int64), rows + 1


def _filled_rows(columns: list[np.ndarray]) -> np.ndarray:
    """The rows with a field that is not empty (the others are blank rows)."""
    return np.flatnonzero(np.logical_or.reduce([c != "" for c in columns])) if columns else np.zeros(0, np.int64)


def _as_text(s) -> np.ndarray:
    """One DataFrame column as text, spelled as ``DataFrame.to_csv`` writes it: numpy numbers and booleans
    with numpy's shortest spelling, other objects with ``str``, dates, categories and nullable types by
    pandas' own CSV writer; missing values empty."""
    import pandas as pd
    kind = s.dtype.kind if isinstance(s.dtype, np.dtype) else ""
    if kind and kind in "fiub":
        text = s.to_numpy().astype(str).astype(object)
    elif kind == "O" or isinstance(s.dtype, pd.StringDtype):
        text = np.asarray([str(v) for v in s.to_numpy(dtype=object)], object)
    else:
        written = s.to_csv(index=False, header=False, na_rep="")
        text = pd.read_csv(io.StringIO(written), header=None, names=[0], dtype=object, na_filter=False,
                           skip_blank_lines=False)[0].to_numpy(copy=True)
    text[s.isna().to_numpy()] = ""
    return text


def missing_mask(values: np.ndarray, tokens: Sequence[str] = MISSING_TOKENS) -> np.ndarray:
    """True where a value is a missing-value token (compared case-insensitively: ``NAN``, ``None``, ``-``)."""
    lower = frozenset(t.lower() for t in tokens) if tokens is not MISSING_TOKENS else _MISSING_LOWER
    return per_value(values, lambda v: str(v).lower() in lower, bool)


def as_float(values: np.ndarray, missing: np.ndarray) -> np.ndarray | None:
    """Float version of a string column (NaN where missing), or None if some value is not a number."""
    import pandas as pd
    values = np.asarray(values)
    out = np.full(values.shape, np.nan, np.float64)
    codes, uniq = pd.factorize(np.asarray(values[~missing], dtype=object), use_na_sentinel=False)
    try:
        out[~missing] = uniq.astype(str).astype(np.float64)[codes]     # numpy's parsing, once per distinct value
    except ValueError:
        return None
    return out


_COMMA_DECIMAL = re.compile(r"^[+-]?\d+,\d+$")
_THOUSANDS = {",": re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$"), ".": re.compile(r"^[+-]?\d{1,3}(\.\d{3})+(,\d+)?$"),
              " ": re.compile(r"^[+-]?\d{1,3}( \d{3})+([.,]\d+)?$"), "'": re.compile(r"^[+-]?\d{1,3}('\d{3})+(\.\d+)?$")}


def number_format(values: np.ndarray, decimal: str = ".", thousands: str | None = None) -> np.ndarray:
    """Numbers written the local way rewritten the standard way: ``thousands`` separators dropped (``1,234``
    -> ``1234``) and a ``decimal`` comma made a point (``3,5`` -> ``3.5``), only in values that are such numbers."""
    if decimal == "." and thousands is None:
        return values

    def one(v: str) -> str:
        s = v.strip()
        if thousands is not None and _THOUSANDS[thousands].match(s):
            s = s.replace(thousands, "")
        if decimal == "," and re.fullmatch(r"[+-]?\d+(,\d+)?", s):
            s = s.replace(",", ".")
        return s if s != v.strip() else v
    return per_value(values, one)


def _warn_comma_numbers(col: str, values: np.ndarray) -> None:
    """A column read as categorical whose values are numbers written with commas (``3,5``, ``1,234``)."""
    if values.size == 0:
        return
    words = [v for v in set(values.tolist()) if not _is_number(v)]        # the values that are not plain numbers
    commas = [v for v in words if _COMMA_DECIMAL.match(v) or _THOUSANDS[","].match(v)]
    if commas and len(commas) == len(words):
        warn(f"csv: column {col!r} holds numbers written with a comma ({', '.join(sorted(commas)[:3])}) "
             "and is read as categories; pass decimal=\",\" (3,5 is three and a half) or thousands=\",\" "
             "(1,234 is one thousand ...) to read it as numbers (--data-opt decimal=, )")


def canonical_numbers(values: np.ndarray) -> np.ndarray:
    """One spelling per number: every value that parses as a finite number is rewritten to its shortest form
    (``1``, ``1.0``, ``01``, `` 1e0`` -> ``1``; ``2.50`` -> ``2.5``), so numbers that are equal are one label,
    one group and one category; other values are kept as they are."""
    def one(v: str) -> str:
        try:
            f = float(v)
        except ValueError:
            return v
        if not np.isfinite(f) or v.strip().lower() in _MISSING_LOWER:
            return v
        return str(int(f)) if f == int(f) and abs(f) < 2 ** 53 else repr(f)
    return per_value(values, one)


def warn_case_variants(column: str, values: np.ndarray, *, what: str = "column") -> None:
    """Values that differ only by letter case or inner spacing (``Male`` / ``male`` / ``MALE``) stay apart
    (they may mean different things) but are warned about, since they are usually one value typed two ways."""
    seen: dict[str, list[str]] = {}
    for v in sorted({str(v) for v in set(np.asarray(values, object).tolist())}):
        seen.setdefault(" ".join(v.split()).casefold(), []).append(v)
    clashes = [vs for vs in seen.values() if len(vs) > 1]
    if clashes:
        shown = "; ".join(" / ".join(repr(v) for v in vs) for vs in clashes[:5])
        warn(f"csv: {what} {column!r} has values that differ only by case or spacing ({shown}"
             f"{' ...' if len(clashes) > 5 else ''}); they are kept as different values. If they are one "
             "value, write them one way in the file")


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
    out_meta = dict(meta or {})
    out_meta.update({
        "target": target_column, "protected": [a.name for a in group_attrs],
        "rows_before_dropping": rows_before, "rows_dropped_missing": dropped,
        "rows_dropped_missing_total": int(bad.sum()), "missing_values_per_column": missing_by_column,
        "drop_missing": bool(drop_missing), "rows_used": int(keep.sum()),
        "split_seed": seed, "val_fraction": val_fraction,
        "feature_names": pre.feature_names, **pre.to_meta(), **group_info,
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
        if acc >= LEAK_ACCURACY and (1 - acc) <= 0.25 * (1 - baseline):
            out[col] = acc
    if out:
        listed = ", ".join(f"{k!r} ({a:.3f})" for k, a in out.items())
        warn(f"csv: column(s) {listed} predict the target {target!r} almost perfectly on their own (held-out "
             f"accuracy from that column alone; the majority class gets {baseline:.3f}): a column recorded "
             "after the outcome or derived from it leaks the label and makes every figure look better "
             f"than it is; drop it (drop_columns=\"{','.join(out)}\") unless it is a real predictor")
    return out


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
        hint = (f" (the header has one column: is the file delimited by something other than {delim!r}? pass "
                "delimiter=...)" if len(header) == 1 else "")
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
