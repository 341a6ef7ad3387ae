"""The generic CSV loader (and the tabular preprocessing it shares with Adult) on small synthetic files."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fairprune_jax.data import load_dataset
from fairprune_jax.data.tabular import TabularPreprocessor, load_csv, parse_column_types

HEADER = "age,zip,color,sex,income,score\n"


def _write(tmp_path, n=120, seed=0, extra_rows=""):
    rng = np.random.default_rng(seed)
    lines = [HEADER]
    for i in range(n):
        age = int(rng.integers(18, 80))
        zip_ = rng.choice(["10001", "94110", "60601"])
        color = rng.choice(["red", "green", "blue"])
        sex = rng.choice(["F", "M"])
        income = rng.choice(["high", "low", "mid"])
        score = round(float(rng.normal(50, 10)), 3)
        lines.append(f"{age}, {zip_},{color},{sex},{income},{score}\n")
    p = tmp_path / "data.csv"
    p.write_text("".join(lines) + extra_rows)
    return p


MISSING_ROWS = ("30,10001,,F,low,40.0\n"        # missing color
                "31,10001,red,?,low,41.0\n"     # missing protected value
                "32,10001,red,M,NA,42.0\n"      # missing target
                "33,94110,blue,F,high,\n"       # missing numeric
                "\n")


def test_missing_values_are_dropped_counted_and_reported(tmp_path):
    p = _write(tmp_path, extra_rows=MISSING_ROWS)
    ds = load_dataset("csv", str(p), target="income", protected="sex", seed=0)
    assert ds.meta["rows_before_dropping"] == {"all": 124}
    assert ds.meta["rows_dropped_missing"] == {"all": 4}
    assert ds.meta["missing_values_per_column"] == {"color": 1, "sex": 1, "income": 1, "score": 1}
    assert len(ds.train) + len(ds.test) == 120
    assert ds.class_names == ["high", "low", "mid"]
    assert ds.group_names == ["F", "M"]
    assert ds.meta["column_types"] == {"age": "numeric", "zip": "numeric", "color": "categorical",
                                       "sex": "categorical", "score": "numeric"}
    assert ds.input_shape == (3 + 3 + 2,)  # age, zip, score + color one-hot + sex one-hot

    kept = load_dataset("csv", str(p), target="income", protected="sex", drop_missing=False)
    # rows missing only a feature are kept (missing colour -> "<missing>", missing score -> train mean)
    assert kept.meta["rows_dropped_missing"] == {"all": 2}
    assert len(kept.train) + len(kept.test) == 122
    assert np.isfinite(kept.train.x).all() and np.isfinite(kept.test.x).all()


def test_positive_label_and_column_types(tmp_path):
    p = _write(tmp_path)
    ds = load_csv(p, target="income", protected="sex,color", positive_label="high",
                  column_types="zip:categorical,age:numeric")
    assert ds.class_names == ["not high", "high"]
    assert ds.meta["column_types"]["zip"] == "categorical"
    assert "zip=94110" in ds.meta["feature_names"]
    raw = np.genfromtxt(p, delimiter=",", dtype=str, skip_header=1, autostrip=True)
    y_all = np.concatenate([ds.train.y, ds.test.y])
    assert int(y_all.sum()) == int((raw[:, 4] == "high").sum())
    assert ds.group_names[0] == "F|blue" and len(ds.group_names) == 6
    assert ds.group_attrs == ["sex", "color"]
    # a binary target whose other value gets its own name
    binary = tmp_path / "b.csv"
    binary.write_text("x,g,label\n" + "".join(f"{i},{'ab'[i % 2]},{'yes' if i % 3 else 'no'}\n" for i in range(60)))
    b = load_csv(binary, target="label", protected="g", positive_label="yes")
    assert b.class_names == ["no", "yes"]
    num = tmp_path / "n.csv"
    num.write_text("x,g,label\n" + "".join(f"{i},{'ab'[i % 2]},{i % 2}\n" for i in range(60)))
    assert load_csv(num, target="label", protected="g", positive_label="1.0").class_names == ["0", "1"]


def test_train_only_standardization_and_onehot(tmp_path):
    p = _write(tmp_path, n=300)
    ds = load_csv(p, target="income", protected="sex", val_fraction=0.2, seed=4)
    names = ds.meta["feature_names"]
    j = names.index("age")
    assert abs(float(ds.train.x[:, j].mean())) < 1e-5
    assert float(ds.train.x[:, j].std()) == pytest.approx(1.0, abs=1e-4)
    assert abs(float(ds.test.x[:, j].mean())) > 1e-4
    assert len(ds.train) + len(ds.val) + len(ds.test) == 300
    idx = [i for i, n in enumerate(names) if n.startswith("color=")]
    np.testing.assert_array_equal(ds.train.x[:, idx].sum(1), 1.0)

    pre = TabularPreprocessor(["a"], ["c"]).fit({"a": np.array([1.0, 3.0])}, {"c": np.array(["x", "y"])})
    out = pre.transform({"a": np.array([2.0, 5.0])}, {"c": np.array(["y", "unseen"])})
    np.testing.assert_allclose(out, [[0.0, 0.0, 1.0], [3.0, 0.0, 0.0]])


def test_seeded_stratified_split(tmp_path):
    p = _write(tmp_path, n=400)
    a = load_csv(p, target="income", protected="sex", seed=7)
    b = load_csv(p, target="income", protected="sex", seed=7)
    c = load_csv(p, target="income", protected="sex", seed=8)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    assert not np.array_equal(a.test.x, c.test.x)
    assert len(a.test) == pytest.approx(80, abs=6)
    for k in range(2):
        for lab in range(3):
            n_te = ((a.test.g == k) & (a.test.y == lab)).sum()
            n_tr = ((a.train.g == k) & (a.train.y == lab)).sum()
            assert n_te == round(0.2 * (n_te + n_tr))


def test_group_emptied_by_dropping_is_warned_and_dropped(tmp_path):
    p = _write(tmp_path, extra_rows="44,10001,red,X,low,\n45,10001,red,X,high,\n")
    with pytest.warns(UserWarning, match=r"1 protected group\(s\) have no rows.*: X"):
        ds = load_csv(p, target="income", protected="sex")
    assert ds.group_names == ["F", "M"]
    assert set(np.concatenate([ds.train.g, ds.test.g]).tolist()) == {0, 1}


def test_errors(tmp_path):
    p = _write(tmp_path)
    with pytest.raises(ValueError, match=r"unknown target column 'salary'; valid columns: age, zip, color"):
        load_csv(p, target="salary", protected="sex")
    with pytest.raises(ValueError, match=r"unknown protected column 'gender'.*valid choices: age, zip, color, sex"):
        load_csv(p, target="income", protected="gender")
    with pytest.raises(ValueError, match=r"column_types names unknown column 'zipcode'; valid columns"):
        load_csv(p, target="income", protected="sex", column_types="zipcode:categorical")
    with pytest.raises(ValueError, match="use one of numeric, categorical"):
        load_csv(p, target="income", protected="sex", column_types="zip:date")
    with pytest.raises(ValueError, match="declared numeric but has non-numeric"):
        load_csv(p, target="income", protected="sex", column_types="color:numeric")
    with pytest.raises(ValueError, match=r"positive_label 'rich' does not occur.*high, low, mid"):
        load_csv(p, target="income", protected="sex", positive_label="rich")
    with pytest.raises(FileNotFoundError, match=r"missing\.csv does not exist.*header row"):
        load_csv(tmp_path / "missing.csv", target="income", protected="sex")
    with pytest.raises(IsADirectoryError, match="pass the CSV FILE path"):
        load_csv(tmp_path, target="income", protected="sex")
    with pytest.raises(ValueError, match="pass target="):
        load_csv(p, protected="sex")
    bad = tmp_path / "ragged.csv"
    bad.write_text("a,b,c\n1,2,3\n4,5\n")
    with pytest.raises(ValueError, match="data row 3 has 2 fields, expected 3"):
        load_csv(bad, target="c", protected="a")
    assert parse_column_types("age:num, zip:cat", ["age", "zip"]) == {"age": "numeric", "zip": "categorical"}


def test_no_warning_on_clean_file(tmp_path):
    p = _write(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_csv(p, target="income", protected="sex")


# ---------------------------------------------------------------------------
# Read with pandas, encoded with scikit-learn
# ---------------------------------------------------------------------------

def _reference_features(train_num, train_cat, rows_num, rows_cat):
    """The features written out with numpy alone: standardized numbers (train mean / std of the finite
    values, std 1 when <= 1e-12, a missing number 0), then one-hot over the train categories (numeric order
    when they are all numbers), an unseen category all zeros."""
    blocks, names = [], []
    for j, (a, b) in enumerate(zip(train_num, rows_num)):
        f = a[np.isfinite(a)]
        m, s = (float(f.mean()), float(f.std())) if len(f) else (0.0, 1.0)
        z = (b - m) / (s if s > 1e-12 else 1.0)
        blocks.append(np.where(np.isfinite(z), z, 0.0)[:, None])
        names.append(f"n{j}")
    for j, (a, b) in enumerate(zip(train_cat, rows_cat)):
        cats = sorted(set(a.tolist()))
        if all(c.lstrip("-").isdigit() for c in cats):
            cats = sorted(cats, key=float)
        blocks.append((b[:, None] == np.asarray(cats)[None, :]).astype(np.float32))
        names += [f"c{j}={c}" for c in cats]
    return np.concatenate(blocks, axis=1).astype(np.float32), names


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_sklearn_encoder_equals_a_numpy_reference(data):
    """TabularPreprocessor (a ColumnTransformer of StandardScaler and OneHotEncoder) gives, bit for bit, the
    features of the straightforward numpy computation, on random columns with missing numbers, constant
    columns, numeric-looking categories and categories unseen in train."""
    n_train, n_rows = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 30))
    n_num, n_cat = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
    if n_num + n_cat == 0:
        n_num = 1
    number = st.one_of(st.floats(-1e4, 1e4, allow_nan=False), st.sampled_from([0.0, 1.5, np.nan]))
    word = st.sampled_from(["a", "b", "B", "10", "9", "-1", "<missing>", "zz"])

    def column(elem, n, dtype):
        return np.asarray(data.draw(st.lists(elem, min_size=n, max_size=n)), dtype)

    train_num = [column(number, n_train, np.float64) for _ in range(n_num)]
    rows_num = [column(number, n_rows, np.float64) for _ in range(n_num)]
    train_cat = [column(word, n_train, object) for _ in range(n_cat)]
    rows_cat = [column(word, n_rows, object) for _ in range(n_cat)]
    numeric, categorical = [f"n{j}" for j in range(n_num)], [f"c{j}" for j in range(n_cat)]
    pre = TabularPreprocessor(numeric, categorical).fit(dict(zip(numeric, train_num)),
                                                        dict(zip(categorical, train_cat)))
    got = pre.transform(dict(zip(numeric, rows_num)), dict(zip(categorical, rows_cat)))
    want, names = _reference_features(train_num, train_cat, rows_num, rows_cat)
    assert pre.feature_names == names
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
    assert type(pre.encoder).__name__ == "ColumnTransformer"


def test_a_short_or_long_row_is_an_error_naming_its_line(tmp_path):
    """pandas' C parser pads a short row with empty fields without a word; every row's fields are counted too,
    so a row of the wrong length anywhere (quoted file or not, Adult's files too) is an error, never read."""
    rows = "".join(f"{i},{'ab'[i % 2]},{i % 3}\n" for i in range(40))
    for head, bad, fields in (("a,b,c", "4,5", 2), ('a,"b",c', "4,5", 2), ("a,b,c", "4,5,6,7", 4),
                              ('a,"b",c', '4,"5",6,7', 4)):
        p = tmp_path / "rows.csv"
        p.write_text(f"{head}\n{rows}\n{bad}\n{rows}")
        with pytest.raises(ValueError, match=rf"data row 42 has {fields} fields, expected 3 \(a, b, c\).*\(line 43\)"):
            load_csv(p, target="c", protected="b")
    from fairprune_jax.data.adult import read_adult_file
    adult = tmp_path / "adult.data"
    line = "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, "
    adult.write_text("|1x3 Cross validator\n" + (line + "United-States, <=50K\n") * 3 + line + "<=50K\n")
    with pytest.raises(ValueError, match=r"adult\.data: data row 4 has 14 fields, expected 15 .*\(line 5\)"):
        read_adult_file(adult)


def test_a_dataframe_of_every_kind_of_column_is_read_like_its_csv(tmp_path):
    """load_dataframe reads the columns directly (no CSV text in between) and gets the dataset of the same
    table written by to_csv and read by load_csv: floats, float32, ints, booleans, strings with spaces, commas
    and quotes, categoricals, nullable ints, dates, mixed objects, missing values of every kind."""
    pd = pytest.importorskip("pandas")
    from fairprune_jax.data import load_dataframe
    rng, n = np.random.default_rng(0), 120
    df = pd.DataFrame({"f64": rng.normal(size=n).round(3), "f32": rng.normal(size=n).astype(np.float32),
                       "i": rng.integers(0, 5, n), "b": rng.random(n) > 0.5,
                       "s": rng.choice(["x", " y ", "z,w", 'q"r', "NA"], n),
                       "cat": pd.Categorical(rng.choice(["u", "v"], n)),
                       "I": pd.array(rng.integers(0, 3, n), dtype="Int64"),
                       "d": pd.to_datetime("2020-01-01") + pd.to_timedelta(rng.integers(0, 3, n), "D"),
                       "o": pd.Series([1, "a", 2.5, None] * 30, dtype=object), "g": rng.choice(["F", "M"], n),
                       "y": rng.integers(0, 2, n)})
    df.loc[3, "f64"], df.loc[4, "I"], df.loc[5, "s"] = np.nan, pd.NA, None
    df.to_csv(tmp_path / "d.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = load_dataframe(df, target="y", protected="g", drop_missing=False)
        b = load_csv(tmp_path / "d.csv", target="y", protected="g", drop_missing=False)
    assert a.fingerprint()["content"] == b.fingerprint()["content"]
    assert a.meta["feature_names"] == b.meta["feature_names"] and a.meta["column_types"] == b.meta["column_types"]
    assert a.meta["source"] == "dataframe" and a.meta["delimiter"] is None


def test_a_parquet_file_is_read_like_the_same_table(tmp_path, monkeypatch):
    """A Parquet file (recognised by its PAR1 bytes, whatever its name) is read with pandas.read_parquet when
    pyarrow is installed, and gives the dataset of the same table as a CSV; without pyarrow, the message says
    to install it."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    import sys
    rng, n = np.random.default_rng(1), 200
    df = pd.DataFrame({"age": rng.integers(18, 80, n), "score": rng.normal(50, 10, n).round(2),
                       "color": rng.choice(["red", "green", "blue"], n), "sex": rng.choice(["F", "M"], n),
                       "income": rng.choice(["high", "low"], n)})
    df.loc[7, "score"], df.loc[9, "color"] = np.nan, None
    df.to_parquet(tmp_path / "d.data")
    df.to_csv(tmp_path / "d.csv", index=False)
    a = load_dataset("csv", str(tmp_path / "d.data"), target="income", protected="sex", drop_missing=False)
    b = load_dataset("csv", str(tmp_path / "d.csv"), target="income", protected="sex", drop_missing=False)
    assert a.fingerprint()["content"] == b.fingerprint()["content"]
    assert a.meta["feature_names"] == b.meta["feature_names"] and a.meta["missing_values_per_column"] == \
        {"score": 1, "color": 1}
    monkeypatch.setitem(sys.modules, "pyarrow", None)            # import pyarrow now fails
    monkeypatch.setitem(sys.modules, "fastparquet", None)
    with pytest.raises(ValueError, match=r"is a Parquet file, not a CSV: reading it needs pyarrow \(pip install "
                                         r"pyarrow\)"):
        load_csv(tmp_path / "d.data", target="income", protected="sex")
