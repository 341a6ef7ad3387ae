"""The per-group certificate: interval coverage by simulation, verdicts, counts, and its place in a run."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fairprune_jax.metrics import certify, coverage, fairness


LEVEL = 0.95


def _floor(draws: int, level: float = LEVEL) -> float:
    """The nominal level minus Monte Carlo error (2.33 standard errors: a valid interval fails 1% of the time)."""
    return level - 2.33 * np.sqrt(level * (1 - level) / draws)


def test_clopper_pearson_keeps_its_level_at_every_rate():
    """Exact coverage (summed over the binomial pmf, no sampling) is >= the level, at the rates and sizes
    where normal intervals fail (0, a handful of successes)."""
    from scipy import stats
    for n in (1, 5, 20, 45, 200):
        k = np.arange(n + 1)
        lo, hi = certify.clopper_pearson(k, np.full(n + 1, n), 0.05)
        for p in (0.0, 0.001, 0.02, 0.08, 0.3, 0.5, 0.9, 1.0):
            cover = np.sum(stats.binom.pmf(k, n, p) * ((lo <= p) & (p <= hi)))
            assert cover >= 0.95 - 1e-12, (n, p, cover)
    lo, hi = certify.clopper_pearson(np.array([0.0]), np.array([0.0]), 0.05)
    assert (lo[0], hi[0]) == (0.0, 1.0)          # no rows: nothing is known


def test_paired_difference_interval_keeps_its_level_exactly():
    """Exact coverage of one group's accuracy-change interval, summed over every (lost, gained) outcome."""
    from scipy import stats
    for n in (20, 45, 120):
        b = np.arange(n + 1)[:, None]
        c = np.arange(n + 1)[None, :]
        ok = b + c <= n
        lo, hi = certify.paired_difference_interval(np.full(b.shape, n) + 0 * c, b + 0 * c, c + 0 * b, 0.05)
        for pb, pc in ((0.0, 0.0), (0.08, 0.0), (0.2, 0.0), (0.0, 0.08), (0.05, 0.05), (0.2, 0.2), (0.01, 0.1)):
            pmf = np.where(ok, stats.multinomial.pmf(np.stack(np.broadcast_arrays(b, c, n - b - c), -1), n,
                                                     [pb, pc, 1 - pb - pc]), 0.0)
            cover = np.sum(pmf * ((lo <= pb - pc + 1e-12) & (pb - pc - 1e-12 <= hi)))
            assert cover >= 0.95 - 1e-9, (n, pb, pc, cover)


# the regimes users hit: (sizes, lost rate, gained rate); the first two are the ones version 1 failed
REGIMES = [
    ([45] * 10, 0.08, 0.0),                          # 10 small groups, one-sided loss (v1: 0.85)
    ([200] * 10, 0.05, 0.0),                         # (v1: 0.89)
    ([20] * 10, 0.2, 0.0),                           # the smallest groups, a large one-sided loss
    ([20] * 200, 0.2, 0.0),                          # many tiny groups (v1: 0.11)
    ([20] * 200, 0.0, 0.0),                          # nothing changes
    ([5000] + [20] * 20, 0.0, 0.2),                  # one large group, many small ones, one-sided gain
    ([5000, 3000], 0.03, 0.01),                      # two large groups
    ([1500, 900, 600, 300, 200], 0.07, 0.05),        # UTKFace-like
    ([1000] * 50, 0.2, 0.2),                         # many flips both ways
    ([5000] * 200, 0.2, 0.2),                        # many groups, many rows, many flips
    ([20, 45, 200, 1000, 5000] * 2, [0.0, 0.2, 0.08, 0.02, 0.1] * 2, [0.2, 0.0, 0.02, 0.02, 0.0] * 2),
]


@pytest.mark.parametrize("method", certify.PSI_METHODS)
@pytest.mark.parametrize("sizes, lost, gained", REGIMES)
def test_psi_intervals_keep_their_family_wise_level(method, sizes, lost, gained):
    draws = 1500
    r = coverage.coverage_simulation(sizes, lost, gained, level=LEVEL, draws=draws, seed=len(sizes), method=method)
    assert r["family_coverage"] >= _floor(draws), r


@pytest.mark.parametrize("sizes", [[1000, 1000], [45] * 10, [200] * 10, [200] * 50])
def test_a_group_at_eps_is_rarely_declared_holds(sizes):
    """The verdict that matters: a group whose true psi_g equals eps must be declared `holds` at most
    1 - level of the time (a little more only by Monte Carlo error)."""
    draws = 2000
    r = coverage.coverage_simulation(sizes, 0.05, 0.02, level=LEVEL, eps=0.02, draws=draws, seed=1)
    assert r["false_holds"] <= (1 - LEVEL) + 2.33 * np.sqrt(LEVEL * (1 - LEVEL) / draws), r


def test_the_old_wald_interval_fails_where_the_new_one_holds():
    """The simulation can fail: the version-1 interval (paired Agresti-Min Wald) under-covers 10 groups of 45
    rows losing 8%, measured the same way."""
    from statistics import NormalDist

    def wald(n, lost, gained, level):
        z = NormalDist().inv_cdf(1 - (1 - level) / n.shape[-1] / 2)
        w = n / n.sum()
        na = n + 2.0
        pb, pc = (lost + 0.5) / na, (gained + 0.5) / na
        var = (pb + pc - (pb - pc) ** 2) / na
        centre = (pb - pc) - np.sum(w * (pb - pc), -1, keepdims=True)
        half = z * np.sqrt((1 - w) ** 2 * var + np.sum(w ** 2 * var, -1, keepdims=True) - w ** 2 * var)
        return centre, centre - half, centre + half
    old = coverage.coverage_simulation([45] * 10, 0.08, 0.0, draws=1500, intervals=wald)
    new = coverage.coverage_simulation([45] * 10, 0.08, 0.0, draws=1500)
    assert old["family_coverage"] < _floor(1500) <= new["family_coverage"]


# the certified max psi_g: regimes where one group is clearly the worst (its own one-sided bound is all that
# protects the statement), where every group is alike, and the small-group regimes of version 1's failures
MAX_REGIMES = [
    ([45] * 10, 0.08, 0.0),
    ([200] * 10, 0.05, 0.0),
    ([20] * 200, 0.2, 0.0),
    ([20] * 200, 0.0, 0.0),
    ([45] * 10, [0.2] + [0.02] * 9, 0.0),             # one small group clearly worst
    ([5000] + [20] * 20, [0.2] + [0.0] * 20, 0.0),   # the large group worst, many small ones
    ([20] + [5000] * 3, [0.2, 0.02, 0.02, 0.02], [0.0, 0.02, 0.02, 0.02]),   # one tiny group worst
    ([1000] * 50, 0.2, 0.2),
    ([20, 45, 200, 1000, 5000] * 2, [0.0, 0.2, 0.08, 0.02, 0.1] * 2, [0.2, 0.0, 0.02, 0.02, 0.0] * 2),
]


@pytest.mark.parametrize("method", certify.PSI_METHODS)
@pytest.mark.parametrize("sizes, lost, gained", MAX_REGIMES)
def test_the_certified_max_psi_keeps_its_level(method, sizes, lost, gained):
    """The headline "no group lost more than U" holds at the nominal level: U covers the true max psi_g, and
    every group's one-sided bound covers its own psi_g (what the argument behind U needs), each at least
    the level minus Monte Carlo error; U is never above the largest simultaneous upper end."""
    draws = 1500
    r = coverage.coverage_simulation(sizes, lost, gained, level=LEVEL, draws=draws, seed=7, method=method)
    assert r["max_coverage"] >= _floor(draws) and r["min_upper_coverage"] >= _floor(draws), r


def test_the_one_sided_coverage_check_can_fail():
    """The same simulation rejects a bound that is too low: one-sided bounds at 80% claimed as 95%."""
    draws = 1500
    rng = np.random.default_rng(0)
    n = np.full(10, 1000.0)
    psi_true = np.full(10, 0.0)
    cells = rng.multinomial(np.full((draws, 10), 1000), [0.1, 0.1, 0.8])
    low80 = certify.psi_upper_bounds(n, cells[..., 0].astype(float), cells[..., 1].astype(float), 0.80)
    ok95 = certify.psi_upper_bounds(n, cells[..., 0].astype(float), cells[..., 1].astype(float), LEVEL)
    assert np.mean(psi_true <= low80, 0).min() < _floor(draws) <= np.mean(psi_true <= ok95, 0).min()


@pytest.mark.parametrize("sizes", [[1000, 1000], [45] * 10, [200] * 10, [200] * 50])
def test_every_group_at_once_is_rarely_certified_when_one_is_at_eps(sizes):
    """"all groups hold" (certified max psi_g <= eps) is declared at most 1 - level of the time when the worst
    group's true psi_g equals eps."""
    draws = 2000
    r = coverage.coverage_simulation(sizes, 0.05, 0.02, level=LEVEL, eps=0.02, draws=draws, seed=3)
    assert r["false_all_hold"] <= (1 - LEVEL) + 2.33 * np.sqrt(LEVEL * (1 - LEVEL) / draws), r


def _version2(cert: dict) -> dict:
    """What a version-2 certificate of the same rows held: the headline was the largest simultaneous upper end,
    the floor the simultaneous one; no one-sided bounds."""
    names = [k for k, g in cert["groups"].items() if g.get("n")]
    n = np.array([float(cert["groups"][k]["n"]) for k in names])
    _, _, floor2 = certify.psi_intervals(n, np.zeros(len(n)), np.zeros(len(n)))
    groups = {k: {f: v for f, v in g.items() if f != "upper"} for k, g in cert["groups"].items()}
    for i, k in enumerate(names):
        groups[k]["floor"] = float(floor2[i])
    old = {k: v for k, v in cert.items() if k not in ("all_hold", "max_simultaneous_high")}
    old.update(groups=groups, interval_version=2, certified_max_psi=cert["max_simultaneous_high"],
               worst_upper=cert["max_simultaneous_high"], floor_max_psi=float(floor2.max()))
    return old


def test_a_version_2_certificate_is_rebuilt_from_its_counts():
    n = np.array([800.0, 200.0, 45.0])
    lost, gained = np.array([40.0, 20.0, 6.0]), np.array([30.0, 8.0, 1.0])
    z = np.zeros(3)
    acc = np.round(0.9 * n)                          # row counts (the certificate refuses weighted sums)
    dense = fairness.GroupCounts(n, acc, z, z, z, z, z, n)
    pruned = fairness.GroupCounts(n, acc - lost + gained, z, z, z, z, z, n)
    new = certify.certificate(pruned, dense, lost, gained, eps=0.05, group_names=["a", "b", "c"])
    assert new["interval_version"] == 3 == certify.INTERVAL_VERSION
    assert new["certified_max_psi"] == max(g["upper"] for g in new["groups"].values())
    assert new["certified_max_psi"] < new["max_simultaneous_high"] == max(g["high"] for g in new["groups"].values())
    old = _version2(new)
    up = certify.upgrade(old)
    assert up["interval_version"] == 3 and old["interval_version"] == 2      # the input is left as it was
    for key in ("certified_max_psi", "floor_max_psi", "max_simultaneous_high", "all_hold", "holds"):
        assert up[key] == pytest.approx(new[key], abs=1e-12), key
    for k in new["groups"]:
        for f in ("upper", "floor", "high", "low", "verdict"):
            assert up["groups"][k][f] == pytest.approx(new["groups"][k][f], abs=1e-12), (k, f)
        assert list(up["groups"][k]) == list(new["groups"][k])
    assert up["interval"] == new["interval"]
    # counts that do not give the stored intervals (weighted rows rounded, say): not rebuilt
    bad = _version2(new)
    bad["groups"]["b"]["lost"] += 1
    assert certify.upgrade(bad) is bad
    # results.json: every split's version-2 certificate, in place, counted
    from fairprune_jax.reporting.result import upgrade_certificates
    res = {"pruned": {"test": {"certificate": _version2(new)}, "val": {"certificate": bad}, "train": {}}}
    assert upgrade_certificates(res) == 1
    assert res["pruned"]["test"]["certificate"]["interval_version"] == 3
    assert res["pruned"]["val"]["certificate"]["interval_version"] == 2


def test_every_group_at_once_when_the_max_bound_is_below_eps():
    """The summary line says "all groups at once" when the certified max psi_g is at most eps, even where the
    simultaneous two-sided per-group intervals leave some group undetermined."""
    n = np.array([3000.0, 3000.0, 3000.0])
    lost = gained = np.array([30.0, 30.0, 30.0])
    z = np.zeros(3)
    dense = fairness.GroupCounts(n, 0.9 * n, z, z, z, z, z, n)
    cert = certify.certificate(dense, dense, lost, gained, eps=0.007, group_names=["a", "b", "c"])
    assert cert["all_hold"] and cert["certified_max_psi"] <= 0.007 < cert["max_simultaneous_high"]
    line = certify.summary_line(cert)
    assert line.startswith("certified (psi_g <= 0.007) for all 3 groups at once") and "group by group" in line


def test_psi_floor_is_the_bound_of_a_model_that_changes_nothing():
    n = np.array([5000.0, 500.0, 50.0])
    floor = certify.psi_floor(n)
    np.testing.assert_allclose(floor, certify.psi_upper_bounds(n, np.zeros(3), np.zeros(3)))
    _, _, hi = certify.psi_intervals(n, np.zeros(3), np.zeros(3))
    assert np.all(floor < hi)                       # one-sided, marginal: below the simultaneous upper end
    assert floor[0] < floor[1] < floor[2] < 1.0 and floor[0] > 0     # smaller groups: a looser floor
    # any model that loses rows of a group is certified no lower than the floor
    hi_lost = certify.psi_upper_bounds(n, np.array([0.0, 0.0, 3.0]), np.zeros(3))
    assert hi_lost[2] > floor[2]


def test_predicted_halfwidth_is_the_certificate_of_a_model_flipping_that_many_rows():
    """At integer counts the prediction is the certificate's own upper end above psi_g; more flips or fewer
    rows widen it; the reachable bound is the rows-weighted mean, and psi_g = t - h_g (which averages to 0)
    puts every upper end exactly at t."""
    n = np.array([2000.0, 800.0, 300.0])
    q = np.array([0.1, 0.2, 0.1])
    h = certify.predicted_halfwidth(n, q)
    psi, _, hi = certify.psi_intervals(n, q * n / 2, q * n / 2)
    np.testing.assert_allclose(h, hi - psi)
    assert h[1] > certify.predicted_halfwidth(n, np.array([0.1, 0.1, 0.1]))[1]      # more flips: wider
    assert h[2] > h[0]                                                                # fewer rows: wider
    # (the simultaneous upper end: ceag's aim=certificate plans for every group's verdict, see its docs)
    np.testing.assert_allclose(certify.predicted_halfwidth(n, np.zeros(3)),
                               certify.psi_intervals(n, np.zeros(3), np.zeros(3))[2])
    w = n / n.sum()
    t = certify.reachable_bound(w, h)
    assert t == pytest.approx(float(np.sum(w * h)))
    assert float(np.sum(w * (t - h))) == pytest.approx(0.0, abs=1e-12)              # a feasible psi_g
    assert certify.reachable_bound(np.array([0.5, 0.5, 0.0]), np.array([0.1, 0.3, np.nan])) == pytest.approx(0.2)


def test_psi_standard_error_is_positive_for_unchanged_groups():
    se = certify.psi_standard_error(np.array([500.0, 20.0]), np.array([25.0, 0.0]), np.array([10.0, 0.0]))
    assert np.all(se > 0) and se[1] > se[0]


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
        lost, gained = np.round(np.array([0.05, 0.15]) * n), np.round(np.array([0.02, 0.02]) * n)
        acc_d = np.round(np.array([0.9, 0.9]) * n)   # row counts (the certificate refuses weighted sums)
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


def test_run_reports_certificate_and_flags_a_constant_model(tmp_path, capsys):
    """End to end: a model pruned to 99.9% (nearly every weight gone) on digits is flagged degenerate, its
    certificate is in results.json and results.md; a normal run is not flagged. The warning is printed once."""
    from fairprune_jax.running.cli import main

    common = ["--dataset", "digits", "--epochs", "2", "--finetune-epochs", "1", "--no-progress", "--method", "magnitude"]
    assert main(["run", *common, "--sparsity", "0.5", "--out", str(tmp_path / "ok")]) == 0
    ok = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert ok["pruned"]["test"]["degenerate"] is False
    cert = ok["pruned"]["test"]["certificate"]
    assert cert["eps"] == 0.01 and cert["level"] == 0.95 and cert["groups_tested"] == 10
    assert set(cert["groups"]) == {f"digit {i}" for i in range(10)}
    md = (tmp_path / "ok" / "results.md").read_text()
    assert "## Certificate (test)" in md and "no group lost more than" in md and "floor" in md
    assert cert["interval_version"] == certify.INTERVAL_VERSION and cert["floor_max_psi"] > 0.05   # 45-row classes
    assert cert["certified_max_psi"] == max(g["upper"] for g in cert["groups"].values())
    out = capsys.readouterr().out
    assert "with 95% confidence, no group lost more than" in out
    assert main(["run", *common, "--sparsity", "0.999", "--finetune-lr", "1e-9", "--certify-eps", "0.05",
                 "--out", str(tmp_path / "bad")]) == 0
    err = capsys.readouterr().err
    assert err.count("the pruned model is degenerate") == 1 and "UserWarning" not in err
    bad = json.loads((tmp_path / "bad" / "results.json").read_text())
    assert bad["pruned"]["test"]["degenerate"] is True
    assert bad["pruned"]["test"]["certificate"]["eps"] == 0.05
    assert "DEGENERATE MODEL" in (tmp_path / "bad" / "results.md").read_text()
