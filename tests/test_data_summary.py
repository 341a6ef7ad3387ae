"""summarize / format_summary on a hand-made dataset with known counts."""
from __future__ import annotations

import json

import numpy as np

from fairprune_jax.data import Dataset, Split, load_dataset
from fairprune_jax.data.summary import format_summary, summarize


def _split(cells: dict[tuple[int, int], int]) -> Split:
    g, y = [], []
    for (gi, yi), n in cells.items():
        g += [gi] * n
        y += [yi] * n
    return Split(np.zeros((len(y), 3), np.float32), np.array(y), np.array(g))


def _dataset() -> Dataset:
    train = _split({(0, 0): 60, (0, 1): 40, (1, 0): 5, (1, 1): 15, (2, 0): 50})
    test = _split({(0, 0): 30, (0, 1): 10, (1, 1): 4})
    val = _split({(0, 0): 35, (1, 0): 1, (2, 1): 40})
    return Dataset(name="toy", train=train, test=test, val=val, group_names=["big", "small", "gone"],
                   group_attrs=["attr"], class_names=["neg", "pos"])


def test_summarize_counts_balance_and_warnings():
    d = summarize(_dataset(), small_group_threshold=30)
    json.dumps(d)  # JSON-friendly
    assert {k: v["size"] for k, v in d["splits"].items()} == {"train": 170, "val": 76, "test": 44}
    assert list(d["splits"]) == ["train", "val", "test"]
    assert d["splits"]["train"]["label_counts"] == {"neg": 115, "pos": 55}
    big, small, gone = d["groups"]
    assert big["counts"] == {"train": 100, "val": 35, "test": 40}
    assert small["counts"] == {"train": 20, "val": 1, "test": 4}
    assert gone["counts"] == {"train": 50, "val": 40, "test": 0}
    assert big["label_balance"] == {"neg": 0.6, "pos": 0.4}
    assert small["label_balance"] == {"neg": 0.25, "pos": 0.75}
    assert small["label_counts"]["test"] == {"neg": 0, "pos": 4}
    w = d["warnings"]
    assert any("'small' has only 20 rows in the train split" in s for s in w)
    assert any("'small' has only 1 rows in the val split" in s for s in w)
    assert any("'gone' has no rows in the test split" in s for s in w)
    assert not any("'big'" in s for s in w)
    assert not any("class(es)" in s for s in w)
    assert len(w) == 4
    assert summarize(_dataset(), small_group_threshold=0)["warnings"] == ["group 'gone' has no rows in the test split"]


def test_format_summary_is_a_readable_table():
    text = format_summary(summarize(_dataset()))
    lines = text.splitlines()
    assert lines[0].startswith("dataset: toy")
    assert "train: 170" in text and "val: 76" in text and "test: 44" in text
    row = next(line for line in lines if " small " in line)
    assert row.split()[:5] == ["1", "small", "20", "1", "4"]
    assert "75.0% pos" in row and row.endswith("*")
    big = next(line for line in lines if " big " in line)
    assert "40.0% pos" in big and not big.endswith("*")
    assert "warnings (4" in text


def test_summary_of_a_multiclass_dataset():
    ds = load_dataset("digits", val_fraction=0.1)
    d = summarize(ds)
    assert d["num_groups"] == 10 and d["groups"][3]["label_balance"]["3"] == 1.0
    assert sum(g["counts"]["train"] for g in d["groups"]) == len(ds.train)
    text = format_summary(d)
    assert "digit 9" in text and "top 9 100%" in text
