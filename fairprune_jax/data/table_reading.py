"""Reading a table as the tabular loaders need it: bytes from a file (gzip, bz2 and xz recognised by content),
text in its encoding (UTF-8, else cp1252 / latin-1), the delimiter read off the header line, pandas' reader
with every row's fields counted (a short row is an error naming it), a DataFrame read column by column, and the
column helpers that run once per distinct value: missing-value tokens, numbers in one spelling (decimal commas,
thousands separators), case variants, a stable order of category names.
"""
from __future__ import annotations

import csv as _csv
import io
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fairprune_jax.core.notices import warn


MISSING_TOKENS = ("", "?", "NA", "N/A", "NaN", "nan", "null", "None", "-", "--")
#: Missing-value tokens compared case-insensitively ("NAN", "Null", "NONE" are missing too).
_MISSING_LOWER = frozenset(t.lower() for t in MISSING_TOKENS)
#: Delimiters the CSV loader recognises from the header line (``delimiter=`` overrides).
DELIMITERS = (",", ";", "\t", "|")
#: Encodings tried in turn when ``encoding`` is not given (a UTF-8 byte-order mark is skipped).
ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


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


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


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
        if abs(f) >= 2 ** 53:          # beyond a float's exact integers: an id, kept exact, not rounded to a float
            s = v.strip().replace("_", "")
            try:
                return str(int(s))     # an integer literal, written once (01234... -> 1234...)
            except ValueError:
                return v               # 1.2e17 or 12345678901234567.0: kept as written, never merged
        return str(int(f)) if f == int(f) else repr(f)
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
