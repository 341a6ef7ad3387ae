"""The generic CSV loader (and the tabular preprocessing it shares with Adult) on small synthetic files."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

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
