"""The certificate and the reports under a tester's inputs (sixth tour, docs/HARDENING.md rows 131-145): each
input here once gave a wrong number without a word, lost a finished run, or a misleading message."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fairprune_jax.metrics import certify, counts as counts_mod
from fairprune_jax.metrics.coverage import coverage_simulation
from fairprune_jax.reporting import report


def _counts(dense_correct, pruned_correct, g, G):
    """GroupCounts of (B,) correctness vectors as the runner sums them (predicted labels against y = 1)."""
    y = np.ones(len(g), np.int32)
    dc = counts_mod.group_counts(np.asarray(dense_correct, np.int32), y, np.asarray(g), G)
    pc = counts_mod.group_counts(np.asarray(pruned_correct, np.int32), y, np.asarray(g), G)
    return dc, pc


def _paired(dense_correct, pruned_correct, g, G, w=None):
    y = np.ones(len(g), np.int32)
    w = np.ones(len(g), np.float32) if w is None else w
    return certify.paired_counts(np.asarray(dense_correct, np.int32), np.asarray(pruned_correct, np.int32), y,
                                 np.asarray(g), w, G, 2)


def test_a_run_with_a_non_finite_record_is_written_as_strict_json(tmp_path):
    """ceag's automatic choice recorded an infinite standard error for a group without held-out rows, and
    bifp's `multiplier_max = inf` (no cap) sat in its options: the run trained, then died writing
    results.json (`Out of range float values are not JSON compliant`), leaving nothing."""
    res = {"method_info": {"options": {"multiplier_max": float("inf"), "floor": -float("inf")},
                           "se": float("nan")}, "x": [1.0, np.float32("inf")]}
    report.write_json_atomic(res, tmp_path / "r.json")
    back = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert back == {"method_info": {"options": {"multiplier_max": "inf", "floor": "-inf"}, "se": None},
                    "x": [1.0, "inf"]}


def test_default_ceag_with_a_group_too_small_to_hold_out_writes_its_results(tmp_path):
    from flax import nnx
    import fairprune_jax as fp
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1004, 6)).astype(np.float32)
    g = np.r_[np.zeros(500, int), np.ones(500, int), np.full(4, 2)]
    model = nnx.Sequential(nnx.Linear(6, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 2, rngs=nnx.Rngs(1)))
    _, _, rep, _ = fp.prune(model, train=(x, (x[:, 0] > 0).astype(int), g), sparsity=0.5, epochs=1,
                            finetune_epochs=1, progress=False, out=str(tmp_path / "run"))
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    choice = written["method_info"]["constraint_data_choice"]
    assert choice["held_out_rows_min"] == 0 and choice["max_standard_error"] is None
    assert choice["chosen"] != "val" and rep["method_info"]["constraint_data_choice"] == choice


def test_levels_are_written_unrounded():
    assert [certify.level_text(v) for v in (0.95, 0.999, 0.975, 0.9)] == ["95%", "99.9%", "97.5%", "90%"]
    dc, pc = _counts([1] * 40, [1] * 40, [0] * 20 + [1] * 20, 2)
    lost, gained = np.zeros(2), np.zeros(2)
    cert = certify.certificate(pc, dc, lost, gained, eps=0.5, level=0.999)
    assert "with 99.9% confidence" in certify.headline(cert) and "at 99.9%" in certify.summary_line(cert)


def test_the_certified_bound_names_its_group_and_is_starred_when_a_group_is_small():
    """The headline bound came from a group of 1 test row without a mark, while the plain max psi_g row,
    decided by a large group, was starred."""
    g = [0] * 200 + [1] * 200 + [2]
    dense = [1] * 401
    pruned = [1] * 190 + [0] * 10 + [1] * 200 + [0]
    dc, pc = _counts(dense, pruned, g, 3)
    p = {k: np.asarray(v) for k, v in _paired(dense, pruned, g, 3).items()}
    cert = certify.certificate(pc, dc, p["lost"], p["gained"], eps=0.02, group_names=["a", "b", "tiny"])
    assert cert["certified_max_psi_group"] == "tiny" and cert["groups"]["tiny"]["small"]
    assert "the bound of group tiny: 1 test rows, a small group" in certify.headline(cert)
    res = {"config": {"small_group": 30}, "pruned": {"test": {"certificate": cert, "groups": cert["groups"]}}}
    assert report._row_label(res, "certified max psi_g (upper bound)", "test").endswith(" *")


def test_paired_counts_take_labels_and_refuse_float_ids_short_arrays_and_weights():
    g = np.array([0, 0, 1, 1])
    logits = np.eye(2, dtype=np.float32)[[1, 0, 1, 1]]
    labels = np.array([1, 0, 1, 1])
    a = certify.paired_counts(logits, logits[::-1], np.ones(4, np.int32), g, np.ones(4), 2, 2)
    b = certify.paired_counts(labels, labels[::-1], np.ones(4, np.int32), g, np.ones(4), 2, 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)         # predicted labels count like their logits
    with pytest.raises(TypeError, match="integers"):
        certify.paired_counts(labels, labels, np.ones(4, np.int32), g + 0.5, np.ones(4), 2, 2)
    with pytest.raises(ValueError, match=r"y must have one entry per row, shape \(4,\); got \(1,\)"):
        certify.paired_counts(labels, labels, np.ones(1, np.int32), g, np.ones(4), 2, 2)
    with pytest.raises(ValueError, match="0 \\(padding\\) or 1"):
        certify.paired_counts(labels, labels, np.ones(4, np.int32), g, np.full(4, 10.0), 2, 2)
    with pytest.raises(ValueError, match=r"y must have one entry per row"):
        counts_mod.group_counts(labels, np.ones(1, np.int32), g, 2)
    with pytest.raises(ValueError, match=r"weights must have one entry per row"):
        counts_mod.class_group_counts(labels, labels, g, 2, 2, weights=np.ones(3))


def test_certificate_refuses_counts_that_are_not_its_models():
    g = [0] * 100 + [1] * 100
    dense = [1] * 200
    pruned = [1] * 85 + [0] * 15 + [1] * 100
    dc, pc = _counts(dense, pruned, g, 2)
    p = {k: np.asarray(v) for k, v in _paired(dense, pruned, g, 2).items()}
    ok = certify.certificate(pc, dc, p["lost"], p["gained"], eps=0.02)
    assert ok["groups"]["0"]["psi"] == pytest.approx(0.075)
    with pytest.raises(ValueError, match="paired counts do not match"):      # lost and gained swapped
        certify.certificate(pc, dc, p["gained"], p["lost"], eps=0.02)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        certify.certificate(pc, dc, p["lost"], p["gained"], eps=float("nan"))
    weighted = type(pc)(*(np.asarray(f) * 0.1 for f in pc))
    with pytest.raises(ValueError, match="row counts"):
        certify.certificate(weighted, type(dc)(*(np.asarray(f) * 0.1 for f in dc)), p["lost"] * 0.1,
                            p["gained"] * 0.1, eps=0.02)


def test_coverage_simulation_takes_rates_that_sum_to_one_and_names_impossible_ones():
    out = coverage_simulation([50, 50], [0.9, 0.0], [0.1, 0.0], draws=50)   # 1 - 0.9 - 0.1 = -3e-17
    assert 0.0 <= out["family_coverage"] <= 1.0
    with pytest.raises(ValueError, match="exceeds 1"):
        coverage_simulation([50, 50], [0.9, 0.0], [0.2, 0.0], draws=10)
    with pytest.raises(ValueError, match=r"lost_rate must be in \[0, 1\]"):
        coverage_simulation([50, 50], [-0.1, 0.0], [0.0, 0.0], draws=10)


def test_integer_group_ids_with_gaps_are_names():
    """Census codes 1000 and 2000 were read as 2001 groups, 1999 of them empty ("no method can protect
    them"); they are two groups named by their codes (ids beyond 32 bits likewise, kept apart)."""
    from fairprune_jax.running.api import arrays_dataset
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    ds = arrays_dataset((x, y, np.repeat([1000, 2000], 200)))
    assert ds.group_names == ["1000", "2000"] and ds.num_groups == 2
    ds = arrays_dataset((x, y, np.where(rng.random(400) < 0.5, 1, 2**32 + 1)))
    assert ds.group_names == ["1", "4294967297"]
    ds = arrays_dataset((x, y, np.repeat([0, 1], 200)))
    assert ds.num_groups == 2 and ds.group_names == ["0", "1"]             # 0..k-1: as given
