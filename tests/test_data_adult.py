"""Adult loader against the original UCI files staged in ../shared/data/adult."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fairprune_jax.data import load_dataset
from fairprune_jax.data.adult import COLUMNS, NUMERIC, _resolve_dir, load_adult, read_adult_file

SHARED = Path(os.environ.get("FAIRPRUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ADULT = SHARED / "adult"
pytestmark = pytest.mark.skipif(not (ADULT / "adult.data").exists(), reason=f"Adult data not staged at {ADULT}")


def _independent_parse(path: Path) -> list[list[str]]:
    """A deliberately different parser: plain string splitting, quirks handled by hand."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("|"):
            continue
        rows.append([f.strip() for f in line.split(",")])
    return rows


@pytest.fixture(scope="module")
def adult():
    return load_dataset("adult", str(ADULT))


def test_raw_files_row_and_label_counts():
    train = read_adult_file(ADULT / "adult.data")
    test = read_adult_file(ADULT / "adult.test")
    assert len(train["age"]) == 32_561
    assert len(test["age"]) == 16_281
    assert (train["income"] == "<=50K").sum() == 24_720 and (train["income"] == ">50K").sum() == 7_841
    # the test labels' trailing dots are gone
    assert (test["income"] == "<=50K").sum() == 12_435 and (test["income"] == ">50K").sum() == 3_846
    assert (train["sex"] == "Male").sum() == 21_790 and (train["sex"] == "Female").sum() == 10_771
    assert not any(v.startswith(" ") for v in train["workclass"][:100])


def test_rows_after_dropping_missing(adult):
    assert len(adult.train) == 30_162
    assert len(adult.test) == 15_060
    m = adult.meta
    assert m["rows_before_dropping"] == {"train": 32_561, "test": 16_281}
    assert m["rows_dropped_missing"] == {"train": 2_399, "test": 1_221}
    assert m["rows_dropped_missing_total"] == 3_620
    assert set(m["missing_values_per_column"]) == {"workclass", "occupation", "native-country"}
    # independent check of the drop count
    raw = _independent_parse(ADULT / "adult.data")
    assert sum("?" in r for r in raw) == 2_399


def test_sex_groups_and_label_balance(adult):
    assert adult.group_names == ["Male", "Female"]
    assert adult.group_attrs == ["sex"]
    assert adult.class_names == ["<=50K", ">50K"]
    assert np.bincount(adult.train.g).tolist() == [20_380, 9_782]
    assert np.bincount(adult.test.g).tolist() == [10_147, 4_913]
    assert int(adult.train.y.sum()) == 7_508 and int(adult.test.y.sum()) == 3_700
    pos_train = [int(adult.train.y[adult.train.g == k].sum()) for k in range(2)]
    pos_test = [int(adult.test.y[adult.test.g == k].sum()) for k in range(2)]
    assert pos_train == [6_396, 1_112]
    assert pos_test == [3_143, 557]


def test_features_and_train_only_standardization(adult):
    assert adult.input_shape == (104,)
    names = adult.meta["feature_names"]
    assert names[:6] == list(NUMERIC)
    # Holand-Netherlands occurs only in adult.data: the encoder was fitted on train
    assert "native-country=Holand-Netherlands" in names
    xtr, xte = adult.train.x, adult.test.x
    np.testing.assert_allclose(xtr[:, :6].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(xtr[:, :6].std(0), 1.0, atol=1e-3)

    raw_tr = [r for r in _independent_parse(ADULT / "adult.data") if "?" not in r]
    raw_te = [r for r in _independent_parse(ADULT / "adult.test") if "?" not in r]
    for j, col in enumerate(NUMERIC):
        k = COLUMNS.index(col)
        tr = np.array([float(r[k]) for r in raw_tr])
        te = np.array([float(r[k]) for r in raw_te])
        assert adult.meta["numeric_mean"][col] == pytest.approx(tr.mean(), rel=1e-9)
        assert adult.meta["numeric_std"][col] == pytest.approx(tr.std(), rel=1e-9)
        # test rows use the *train* statistics, not their own
        np.testing.assert_allclose(xte[:, j], (te - tr.mean()) / tr.std(), rtol=1e-4, atol=1e-4)
    assert abs(float(xte[:, 0].mean())) > 1e-3  # test age is not re-centred on itself

    # every categorical block is one-hot on train rows
    for col in adult.meta["categorical_columns"]:
        idx = [i for i, n in enumerate(names) if n.startswith(col + "=")]
        np.testing.assert_array_equal(xtr[:, idx].sum(1), 1.0)
    sex_cols = [names.index("sex=Female"), names.index("sex=Male")]
    np.testing.assert_array_equal(xtr[:, sex_cols[0]], (adult.train.g == 1).astype(np.float32))


def test_other_protected_attributes():
    race = load_adult(ADULT, protected="race")
    assert race.group_names == ["White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other"]
    assert np.bincount(race.train.g).tolist() == [25_933, 2_817, 895, 286, 231]
    age = load_adult(ADULT, protected="age")
    assert age.group_names == ["<25", "25-44", "45-64", "65+"]
    assert np.bincount(age.train.g).tolist() == [4_869, 15_848, 8_470, 975]
    both = load_adult(ADULT, protected="sex,race", include_protected=False)
    assert len(both.group_names) == 10
    assert both.group_names[0] == "Male|White" and both.group_names[-1] == "Female|Other"
    assert np.bincount(both.train.g).sum() == 30_162
    assert both.group_attrs == ["sex", "race"]
    assert both.input_shape == (104 - 2 - 5,)
    assert not any(n.startswith(("sex=", "race=")) for n in both.meta["feature_names"])


def test_validation_split_is_carved_from_train():
    ds = load_adult(ADULT, val_fraction=0.1, seed=3)
    assert len(ds.train) + len(ds.val) == 30_162
    assert len(ds.val) == pytest.approx(3_016, abs=4)
    assert len(ds.test) == 15_060
    for k in range(2):  # stratified by group
        frac = (ds.val.g == k).sum() / ((ds.val.g == k).sum() + (ds.train.g == k).sum())
        assert frac == pytest.approx(0.1, abs=0.002)
    # the scaler sees only the reduced train split
    np.testing.assert_allclose(ds.train.x[:, :6].mean(0), 0.0, atol=1e-5)
    assert abs(float(ds.val.x[:, :6].mean())) > 1e-6


def test_default_location_and_shared_root(monkeypatch):
    monkeypatch.setenv("FAIRPRUNE_SHARED_DATA", str(SHARED))
    assert len(load_adult().train) == 30_162
    assert _resolve_dir(SHARED) == SHARED / "adult"  # the shared data root also works
