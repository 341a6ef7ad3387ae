"""The typed result a user reads back (a thirteenth tester's round): a Report built from an older results.json
shows the headline every table shows (version-2 certificates rebuilt, version-1 intervals not shown), says what
it is (schema and certificate version, degenerate, warnings, a one-line repr), refuses a grid's file by name; a
0 / 1 protected column is not "the classes"; a class chosen by name; names escaped in Markdown prose."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fairprune_jax.reporting.result import Report

ROOT = Path(__file__).resolve().parents[1]
V2 = ROOT / "experiments/paper/results/balancing_act_utkface_cpu/cells/ceag_s0.9_seed0/results.json"
V1 = ROOT / "experiments/results/bifp_adult_ablation/cells/bifp_before_2x_s0.8_seed0/results.json"
GRID = ROOT / "experiments/results/certify_v2_digits/results.json"


def test_an_older_results_file_gives_the_headline_every_table_shows():
    import csv
    r = Report.load(V2)
    row = next(x for x in csv.DictReader(open(V2.parents[2] / "results.csv"))
               if (x["method"], x["sparsity"], x["seed"]) == ("ceag", "0.9", "0"))
    assert r.certificate_version == 3 and r.certified_max_psi == pytest.approx(float(row["test_psi_upper"]))
    assert r.floor_max_psi == pytest.approx(float(row["test_psi_floor"]))
    assert all(g["psi_upper"] is not None for g in r.by_group(frame=False))
    assert repr(r).startswith("Report(method='ceag', dataset='utkface'") and len(repr(r)) < 300


@pytest.mark.skipif(not V1.exists(), reason="the committed version-1 cell")
def test_a_version_1_certificate_shows_no_interval_and_says_so():
    with pytest.warns(UserWarning, match="version-1 certificate"):
        r = Report(json.loads(V1.read_text()))
    assert r.certificate_version == 1 and r.certified_max_psi is None and r.schema_version == 1
    rows = r.by_group(frame=False)
    assert all(g["verdict"] is None and g["psi_high"] is None for g in rows) and rows[0]["n"] > 0


def test_a_grid_results_file_is_refused_by_name():
    with pytest.raises(ValueError, match="a grid's results.json"):
        Report.load(GRID)


def test_a_binary_protected_column_coded_0_1_is_not_the_classes():
    from fairprune_jax.reporting.tables import groups_are_classes
    cell = {"groups": {"names": ["0", "1"], "attributes": ["grp"]}, "classes": ["0", "1"],
            "dataset_meta": {"target": "label"}}
    assert not groups_are_classes(cell)
    assert groups_are_classes(dict(cell, groups={"names": ["0", "1"], "attributes": ["label"]}))
    assert groups_are_classes({"groups": {"names": ["a", "b"]}, "classes": ["a", "b"]})     # older cells
    assert groups_are_classes({"groups": {"names": ["3"], "attributes": ["class"]}, "classes": ["3", "4"]})


def test_markdown_prose_escapes_group_names():
    from fairprune_jax.metrics import certify
    from fairprune_jax.reporting.tables import md_prose
    assert md_prose("*bold*") == "\\*bold\\*" and md_prose("x\ny") == "x y" and md_prose("a|b") == "a\\|b"
    cert = {"groups_tested": 2, "all_hold": False, "eps": 0.01, "holds": 0, "level": 0.95,
            "violated_groups": ["*bold*"], "undetermined_groups": ["x\ny"]}
    assert "violated: \\*bold\\*; undetermined: x y" in certify.summary_line(cert, md_prose)


def test_prune_takes_the_positive_class_by_name_and_says_which_it_compares():
    from flax import nnx
    import fairprune_jax
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 4)).astype(np.float32)
    y = np.where(x[:, 0] > 0, "approved", "denied")
    g = np.arange(160) % 2

    def run(**kw):
        return fairprune_jax.prune(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), train=(x, y, g), method="magnitude",
                                   sparsity=0.5, epochs=1, finetune_epochs=1, progress=False, **kw)
    with pytest.warns(UserWarning, match="DP and EO compare the rates of 'denied'"):
        res = run()
    assert res.report["positive_class"]["name"] == "denied"
    res = run(config={"positive_label": "approved"})
    assert res.report["positive_class"] == {**res.report["positive_class"], "id": 0, "name": "approved"}
    with pytest.raises(ValueError, match="not a class; the classes are 'approved', 'denied'"):
        run(config={"positive_label": "yes"})
