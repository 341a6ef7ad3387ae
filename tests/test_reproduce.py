"""Committed results reproduce: a few digits cells of the committed grids, rerun from scratch, give the committed
numbers bit for bit (experiments/reproduce.py; run it on a whole grid before a change that should not move
numbers)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _reproduce_module():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "experiments" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_differences_finds_every_changed_leaf_and_tells_new_entries_apart():
    rep = _reproduce_module()
    old = {"a": 1.0, "b": {"c": [1, 2], "d": float("nan")}, "gone": 1}
    new = {"a": 1.0000000001, "b": {"c": [1, 3], "d": float("nan"), "e": 0}}
    diffs = rep.differences(old, new)
    assert sorted(diffs) == sorted(["/a: committed 1.0, now 1.0000000001", "/b/c[1]: committed 2, now 3",
                                    "/b/e: new", "/gone: missing now"])
    assert rep.failures(diffs) == [d for d in diffs if not d.endswith("new")]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("grid, methods, sparsities", [("headline_digits", "magnitude,nft,ceag", None),
                                                       ("lottery_digits_v2", "lth,ballot", [0.89])])
def test_committed_digits_cells_reproduce_bit_for_bit(grid, methods, sparsities):
    """(Grids whose cells predate the current dense training, e.g. bifp_digits, differ in float rounding from
    the first digit of the dense model's loss on; experiments/README.md lists them.)"""
    rep = _reproduce_module()
    res = rep.reproduce(ROOT / "experiments" / f"{grid}.toml", seeds=[0], methods=methods.split(","),
                        sparsities=sparsities)
    bad = {cell: rep.failures(d)[:5] for cell, d in res.items() if rep.failures(d)}
    assert res and not bad, bad
