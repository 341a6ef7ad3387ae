"""The per-group certificate: interval coverage by simulation, verdicts, counts, and its place in a run."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fairprune_jax import certify, fairness


def test_wilson_interval_coverage_by_simulation():
    rng = np.random.default_rng(0)
    z = certify.z_value(0.95)
    for n, p in [(40, 0.5), (60, 0.85), (300, 0.7)]:
        k = rng.binomial(n, p, size=20000)
        lo, hi = certify.wilson_interval(k, np.full_like(k, n), z)
        cover = np.mean((lo <= p) & (p <= hi))
        assert 0.925 <= cover <= 0.975, (n, p, cover)
    lo, hi = certify.wilson_interval(np.array([0.0]), np.array([0.0]), z)
    assert (lo[0], hi[0]) == (0.0, 1.0)          # no rows: nothing is known


def _simulate_psi(sizes, probs, level, comparisons, draws=6000, seed=0):
    """Draw paired test sets from known per-group (lost, gained, unchanged) probabilities; returns the
    per-group coverage of the psi intervals and the family-wise coverage."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes)
    probs = np.asarray(probs)                       # (G, 3): P(lost), P(gained), P(unchanged)
    w = sizes / sizes.sum()
    d_true = probs[:, 0] - probs[:, 1]
    psi_true = d_true - np.sum(w * d_true)
    z = certify.z_value(level, comparisons)
    covered = np.zeros((draws, len(sizes)), bool)
    for t in range(draws):
        cells = np.stack([rng.multinomial(n, p) for n, p in zip(sizes, probs)])
        _, lo, hi = certify.psi_intervals(sizes, cells[:, 0], cells[:, 1], z)
        covered[t] = (lo <= psi_true) & (psi_true <= hi)
    return covered.mean(0), covered.all(1).mean()


def test_psi_interval_coverage_by_simulation():
    # a large, a medium and a small group; pruning hurts the small one more
    sizes = [900, 250, 60]
    probs = [[0.06, 0.03, 0.91], [0.08, 0.02, 0.90], [0.15, 0.02, 0.83]]
    per_group, _ = _simulate_psi(sizes, probs, 0.95, comparisons=1)
    assert np.all(per_group >= 0.93) and np.all(per_group <= 0.975), per_group
    _, family = _simulate_psi(sizes, probs, 0.95, comparisons=3, seed=1)
    assert family >= 0.94, family                 # simultaneous (Bonferroni) coverage


def test_psi_interval_covers_an_unchanged_small_group():
    # no row of the small group changes in most draws: the adjusted interval must not collapse to a point
    per_group, _ = _simulate_psi([500, 20], [[0.05, 0.02, 0.93], [0.01, 0.0, 0.99]], 0.95, comparisons=1,
                                 draws=3000)
    assert np.all(per_group >= 0.93), per_group


def test_psi_point_estimate_equals_the_reported_excess_accuracy_gap():
    rng = np.random.default_rng(3)
    n, G, C = 400, 4, 3
    y, g = rng.integers(0, C, n), rng.integers(0, G, n)
    dense_pred = np.where(rng.random(n) < 0.8, y, rng.integers(0, C, n))
    pruned_pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, C, n))
    eye = np.eye(C, dtype=np.float32)
    pc = certify.paired_counts(jnp.asarray(eye[dense_pred]), jnp.asarray(eye[pruned_pred]), jnp.asarray(y),
                               jnp.asarray(g), jnp.ones(n), G, C)
    dc, pcn = dense_pred == y, pruned_pred == y
    np.testing.assert_allclose(pc["lost"], np.bincount(g, dc & ~pcn, G))
    np.testing.assert_allclose(pc["gained"], np.bincount(g, ~dc & pcn, G))
    np.testing.assert_allclose(pc["pred_hist"], np.bincount(pruned_pred, minlength=C))
    np.testing.assert_allclose(pc["dense_pred_hist"], np.bincount(dense_pred, minlength=C))
    counts = fairness.group_counts(jnp.asarray(pruned_pred), jnp.asarray(y), jnp.asarray(g), G)
    dense_counts = fairness.group_counts(jnp.asarray(dense_pred), jnp.asarray(y), jnp.asarray(g), G)
    cert = certify.certificate(counts, dense_counts, np.asarray(pc["lost"]), np.asarray(pc["gained"]), eps=0.02)
    psi = fairness.excess_accuracy_gap(dense_counts, counts)
    got = [cert["groups"][str(i)]["psi"] for i in range(G)]
    np.testing.assert_allclose(got, psi, atol=1e-6)
    for i in range(G):
        e = cert["groups"][str(i)]
        assert e["low"] <= e["psi"] + 0.05 and e["high"] >= e["psi"] - 0.05
        assert e["accuracy_low"] <= e["accuracy"] <= e["accuracy_high"]
    assert cert["holds"] + cert["violated"] + cert["undetermined"] == G
    dp = cert["demographic_parity_difference"]
    assert dp["low"] <= dp["value"] <= dp["high"]
    eo = cert["equalized_odds_difference"]
    assert eo["low"] <= eo["value"] <= eo["high"]


def test_verdict_logic():
    lo = np.array([-0.05, 0.03, -0.01, np.nan])
    hi = np.array([0.01, 0.08, 0.04, np.nan])
    assert certify.verdicts(lo, hi, 0.02) == ["holds", "violated", "undetermined", None]
    assert certify.verdicts(np.array([0.02]), np.array([0.02]), 0.02) == ["holds"]   # high <= eps holds


def test_certificate_verdicts_follow_the_data_size():
    """The same 10-point extra loss is `violated` with many rows and `undetermined` with few."""
    def cert_for(scale):
        n = np.array([800.0, 200.0]) * scale
        lost, gained = np.array([0.05, 0.15]) * n, np.array([0.02, 0.02]) * n
        acc_d = np.array([0.9, 0.9]) * n
        z = np.zeros(2)
        dense = fairness.GroupCounts(n, acc_d, z, z, z, z, z, n)
        pruned = fairness.GroupCounts(n, acc_d - lost + gained, z, z, z, z, z, n)
        return certify.certificate(pruned, dense, lost, gained, eps=0.02, group_names=["big", "small"],
                                   fairness_bound=0.1)
    big = cert_for(5.0)
    assert big["groups"]["small"]["verdict"] == "violated" and big["violated_groups"] == ["small"]
    assert big["groups"]["big"]["verdict"] == "holds"
    tiny = cert_for(0.1)                            # 80 and 20 rows
    assert tiny["groups"]["small"]["verdict"] == "undetermined"
    assert tiny["groups"]["small"]["small"] is True and tiny["small_groups"] == ["small"]
    # nobody is predicted positive: DP = 0, certified with 4000 + 1000 rows, not with 80 + 20
    assert big["demographic_parity_difference"]["verdict"] == "holds"
    assert tiny["demographic_parity_difference"]["verdict"] == "undetermined"
    line = certify.summary_line(big)
    assert "1 of 2 groups" in line and "violated: small" in line


def test_certificate_marks_absent_groups():
    n = np.array([100.0, 0.0])
    z = np.zeros(2)
    c = fairness.GroupCounts(n, n * 0.9, z, z, z, z, z, n)
    cert = certify.certificate(c, c, z, z, eps=0.01, group_names=["a", "b"])
    assert cert["groups"]["b"] == {"n": 0, "small": True, "verdict": None}
    assert cert["groups_tested"] == 1 and cert["groups"]["a"]["verdict"] == "holds"


def test_degenerate_flag():
    const = certify.prediction_summary(np.array([0.0, 500.0, 0.0]), ["a", "b", "c"])
    assert const["degenerate"] and const["top_prediction"] == "b" and const["top_prediction_share"] == 1.0
    nearly = certify.prediction_summary(np.array([3.0, 497.0]))
    assert nearly["degenerate"]                     # 99.4% of the rows get one class
    good = certify.prediction_summary(np.array([260.0, 240.0]))
    assert not good["degenerate"] and good["top_prediction_share"] == pytest.approx(0.52)


def test_run_reports_certificate_and_flags_a_constant_model(tmp_path):
    """End to end: a model pruned to 99.9% (nearly every weight gone) on digits is flagged degenerate, its
    certificate is in results.json and results.md; a normal run is not flagged."""
    from fairprune_jax.cli import main

    common = ["--epochs", "2", "--finetune-epochs", "1", "--no-progress", "--method", "magnitude"]
    assert main(["run", *common, "--sparsity", "0.5", "--out", str(tmp_path / "ok")]) == 0
    ok = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert ok["pruned"]["test"]["degenerate"] is False
    cert = ok["pruned"]["test"]["certificate"]
    assert cert["eps"] == 0.01 and cert["level"] == 0.95 and cert["groups_tested"] == 10
    assert set(cert["groups"]) == {f"digit {i}" for i in range(10)}
    assert "## Certificate (test)" in (tmp_path / "ok" / "results.md").read_text()
    with pytest.warns(UserWarning, match="degenerate"):
        assert main(["run", *common, "--sparsity", "0.999", "--finetune-lr", "1e-9", "--certify-eps", "0.05",
                     "--out", str(tmp_path / "bad")]) == 0
    bad = json.loads((tmp_path / "bad" / "results.json").read_text())
    assert bad["pruned"]["test"]["degenerate"] is True
    assert bad["pruned"]["test"]["certificate"]["eps"] == 0.05
    assert "DEGENERATE MODEL" in (tmp_path / "bad" / "results.md").read_text()
