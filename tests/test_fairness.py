"""Fairness metrics from additive counts: parity with fairlearn, additivity, paper metrics."""
from __future__ import annotations

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

fairlearn_metrics = pytest.importorskip("fairlearn.metrics")
from sklearn.metrics import accuracy_score  # noqa: E402

from fairprune_jax.metrics import fairness as F  # noqa: E402

B_MAX = 64  # fixed padded batch: one compilation serves every hypothesis example
G_MAX = 8  # fixed number of group slots; unused slots are groups with n == 0
C_MAX = 4  # logits width
TOL = 1e-6
METHODS = ("between_groups", "to_overall")
AGGS = ("worst_case", "mean")

_counts_jit = jax.jit(F.group_counts, static_argnames=("num_groups", "positive_label"))


def close(ours: float, theirs: float, tol: float = TOL) -> bool:
    """Equal within tol, or both NaN."""
    ours, theirs = float(ours), float(theirs)
    if math.isnan(ours) or math.isnan(theirs):
        return math.isnan(ours) and math.isnan(theirs)
    return abs(ours - theirs) <= tol


# ---------------------------------------------------------------------------
# Data generation
# ---------------------------------------------------------------------------


@st.composite
def grouped_data(draw):
    """Labels, predictions and group ids with the edge cases fairlearn cares about.

    1-6 present groups of size 1-8 placed at random slots of G_MAX (so absent
    groups sit between present ones), binary or multi-class labels, and per group
    forced "no positives" / "no negatives" / "nothing selected" / "all selected".
    """
    num_classes = draw(st.sampled_from([2, 3, 4]))
    pos_label = draw(st.integers(0, num_classes - 1))
    n_groups = draw(st.integers(1, 6))
    slots = draw(st.lists(st.integers(0, G_MAX - 1), min_size=n_groups, max_size=n_groups,
                          unique=True))
    ys, ps, gs = [], [], []
    for slot in slots:
        size = draw(st.integers(1, 8))
        labels = st.lists(st.integers(0, num_classes - 1), min_size=size, max_size=size)
        y, p = np.array(draw(labels)), np.array(draw(labels))
        other = (pos_label + 1) % num_classes
        y_mode = draw(st.sampled_from(["free", "free", "no_pos", "no_neg"]))
        if y_mode == "no_pos":
            y = np.where(y == pos_label, other, y)
        elif y_mode == "no_neg":
            y = np.full(size, pos_label)
        p_mode = draw(st.sampled_from(["free", "free", "none", "all", "copy_y"]))
        if p_mode == "none":
            p = np.where(p == pos_label, other, p)
        elif p_mode == "all":
            p = np.full(size, pos_label)
        elif p_mode == "copy_y":
            p = y.copy()
        ys.append(y)
        ps.append(p)
        gs.append(np.full(size, slot))
    y, p, g = (np.concatenate(a).astype(np.int32) for a in (ys, ps, gs))
    order = np.array(draw(st.permutations(range(len(y)))), dtype=np.int64)
    use_logits = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(y=y[order], p=p[order], g=g[order], C=num_classes, pl=pos_label,
                use_logits=use_logits, seed=seed)


def padded_counts(d: dict, loss: np.ndarray | None = None) -> F.GroupCounts:
    """Our counts for example ``d``, padded to B_MAX with garbage weight-0 rows."""
    rng = np.random.default_rng(d["seed"])
    n = len(d["y"])
    pad = B_MAX - n
    y = np.concatenate([d["y"], rng.integers(0, C_MAX, pad)]).astype(np.int32)
    p = np.concatenate([d["p"], rng.integers(0, C_MAX, pad)]).astype(np.int32)
    g = np.concatenate([d["g"], rng.integers(0, G_MAX, pad)]).astype(np.int32)
    w = np.concatenate([np.ones(n), np.zeros(pad)]).astype(np.float32)
    if loss is None:
        loss = np.zeros(n)
    lpad = np.concatenate([loss, np.full(pad, np.nan)]).astype(np.float32)
    if d["use_logits"]:
        x = rng.normal(size=(B_MAX, C_MAX)).astype(np.float32)
        x[np.arange(B_MAX), p] = 10.0  # argmax == p
    else:
        x = p
    c = _counts_jit(x, y, g, num_groups=G_MAX, loss=lpad, weights=w, positive_label=d["pl"])
    return F.to_numpy(c)


def binarized(d: dict) -> tuple[np.ndarray, np.ndarray]:
    return (d["y"] == d["pl"]).astype(int), (d["p"] == d["pl"]).astype(int)


def sensitive(d: dict) -> pd.Series:
    # A Series: fairlearn np.squeeze()s plain arrays, which breaks on a 1-row dataset.
    return pd.Series(d["g"], name="group")


# ---------------------------------------------------------------------------
# Parity with fairlearn
# ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=grouped_data())
def test_counts_rates_and_accuracy_gap_match_fairlearn(d):
    fm = fairlearn_metrics
    loss = np.random.default_rng(d["seed"]).uniform(0, 3, len(d["y"]))
    c = padded_counts(d, loss)
    present = np.unique(d["g"])
    absent = np.setdiff1d(np.arange(G_MAX), present)

    # Raw counts against numpy.
    yb, pb = binarized(d)
    for k in present:
        m = d["g"] == k
        assert c.n[k] == m.sum()
        assert c.correct[k] == (d["p"][m] == d["y"][m]).sum()
        assert c.pred_pos[k] == pb[m].sum() and c.pos[k] == yb[m].sum()
        assert c.neg[k] == (1 - yb[m]).sum()
        assert c.tp[k] == (pb[m] & yb[m]).sum() and c.fp[k] == (pb[m] & (1 - yb[m])).sum()
        assert np.isclose(c.loss_sum[k], loss[m].sum(), rtol=1e-5)
    assert np.all(np.stack(c)[:, absent] == 0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf = fm.MetricFrame(
            metrics={"sel": fm.selection_rate, "tpr": fm.true_positive_rate,
                     "fpr": fm.false_positive_rate},
            y_true=yb, y_pred=pb, sensitive_features=sensitive(d))
        mf_acc = fm.MetricFrame(metrics=accuracy_score, y_true=d["y"], y_pred=d["p"],
                                sensitive_features=sensitive(d))

    ours = {"sel": F.selection_rate(c), "tpr": F.true_positive_rate(c),
            "fpr": F.false_positive_rate(c)}
    overall = {"sel": F.overall_selection_rate(c), "tpr": F.overall_true_positive_rate(c),
               "fpr": F.overall_false_positive_rate(c)}
    diff = {m: mf.difference(method=m) for m in METHODS}
    ratio = {m: mf.ratio(method=m) for m in METHODS}
    for name in ours:
        for k in present:
            assert close(ours[name][k], mf.by_group[name][k]), (name, k)
        assert np.all(np.isnan(ours[name][absent]))
        assert close(overall[name], mf.overall[name]), name
        # MetricFrame's reductions (the building blocks of every fairlearn disparity metric).
        for method in METHODS:
            assert close(F.group_difference(ours[name], overall[name], c.n, method),
                         diff[method][name]), (name, method)
            assert close(F.group_ratio(ours[name], overall[name], c.n, method),
                         ratio[method][name]), (name, method)

    acc_g = F.group_accuracy(c)
    for k in present:
        assert close(acc_g[k], mf_acc.by_group[k])
    assert close(F.accuracy(c), mf_acc.overall)
    assert close(F.mean_loss(c), loss.mean(), 1e-5)
    for method in METHODS:
        assert close(F.accuracy_parity_gap(c, method), mf_acc.difference(method=method)), method


# The public fairlearn functions rebuild a MetricFrame per call (~25-70 ms each), so
# this test draws one (method, agg) per example and uses fewer examples; the
# MetricFrame reductions themselves get 150 examples above, and the NaN ordering
# rules of equalized odds are pinned by the edge cases below.
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=grouped_data(), method=st.sampled_from(METHODS), agg=st.sampled_from(AGGS))
def test_fairness_functions_match_fairlearn(d, method, agg):
    fm = fairlearn_metrics
    c = padded_counts(d)
    yb, pb = binarized(d)
    kw = dict(sensitive_features=sensitive(d), method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {
            "dpd": fm.demographic_parity_difference(yb, pb, **kw),
            "dpr": fm.demographic_parity_ratio(yb, pb, **kw),
            "eod": fm.equalized_odds_difference(yb, pb, agg=agg, **kw),
            "eor": fm.equalized_odds_ratio(yb, pb, agg=agg, **kw),
            "eop": fm.equal_opportunity_difference(yb, pb, **kw),
            "eopr": fm.equal_opportunity_ratio(yb, pb, **kw),
        }
    ours = {
        "dpd": F.demographic_parity_difference(c, method),
        "dpr": F.demographic_parity_ratio(c, method),
        "eod": F.equalized_odds_difference(c, method, agg),
        "eor": F.equalized_odds_ratio(c, method, agg),
        "eop": F.equal_opportunity_difference(c, method),
        "eopr": F.equal_opportunity_ratio(c, method),
    }
    for k in expected:
        assert isinstance(ours[k], float)
        assert close(ours[k], expected[k]), (k, ours[k], expected[k])


# Hand-picked edge cases, checked against fairlearn AND against known values, so
# the NaN-propagation rules are covered whatever hypothesis happens to draw.
EDGE_CASES = {
    # group 1 has no positives: its TPR is 0, not NaN.
    "no_positives_in_group": ([1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1],
                              {"eop": 1.0, "eor_wc": 0.0}),
    # no true positive anywhere: TPR ratio 0/0 = NaN poisons worst_case, mean skips it.
    "no_tp_anywhere": ([1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1],
                       {"eor_wc": math.nan, "eor_mean": 0.0, "eopr": math.nan}),
    # nothing selected: every ratio is NaN, differences are 0.
    "nothing_selected": ([1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 1],
                         {"dpr": math.nan, "eor_wc": math.nan, "eor_mean": math.nan, "dpd": 0.0}),
    # no negatives anywhere: FPR ratio NaN is *ignored* by worst_case (builtin min order).
    "no_negatives_anywhere": ([1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 1],
                              {"eor_wc": 0.5, "eor_mean": 0.5, "dpd": 0.5}),
    "size_one_groups": ([1, 0, 1], [1, 1, 0], [0, 1, 2], {"dpd": 1.0, "eod_wc": 1.0}),
    "single_group": ([1, 0, 1], [1, 1, 0], [3, 3, 3], {"dpd": 0.0, "dpr": 1.0, "eor_wc": 1.0}),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_match_fairlearn(case):
    fm = fairlearn_metrics
    y, p, g, known = EDGE_CASES[case]
    y, p, g = (np.asarray(a) for a in (y, p, g))
    c = F.to_numpy(F.group_counts(jnp.asarray(p), y, g, G_MAX))
    for method in METHODS:
        kw = dict(sensitive_features=g, method=method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pairs = [(F.demographic_parity_difference(c, method),
                      fm.demographic_parity_difference(y, p, **kw)),
                     (F.demographic_parity_ratio(c, method), fm.demographic_parity_ratio(y, p, **kw)),
                     (F.equal_opportunity_difference(c, method),
                      fm.equal_opportunity_difference(y, p, **kw)),
                     (F.equal_opportunity_ratio(c, method), fm.equal_opportunity_ratio(y, p, **kw))]
            for agg in AGGS:
                pairs += [(F.equalized_odds_difference(c, method, agg),
                           fm.equalized_odds_difference(y, p, agg=agg, **kw)),
                          (F.equalized_odds_ratio(c, method, agg),
                           fm.equalized_odds_ratio(y, p, agg=agg, **kw))]
        for ours, theirs in pairs:
            assert close(ours, theirs), (method, ours, theirs)
    ours_bg = {"dpd": F.demographic_parity_difference(c), "dpr": F.demographic_parity_ratio(c),
               "eop": F.equal_opportunity_difference(c), "eopr": F.equal_opportunity_ratio(c),
               "eod_wc": F.equalized_odds_difference(c), "eor_wc": F.equalized_odds_ratio(c),
               "eor_mean": F.equalized_odds_ratio(c, agg="mean")}
    for k, v in known.items():
        assert close(ours_bg[k], v), (k, ours_bg[k], v)


def test_group_reductions_match_metricframe_on_custom_metric():
    # |selection rate - 1/2| has overall 0 while groups are not all 0, so the
    # to_overall ratios mix x/0 = inf (-> 1/inf = 0) with 0/0 = NaN (skipped).
    fm = fairlearn_metrics

    def off_half(y_true, y_pred):
        return abs(float(np.mean(y_pred)) - 0.5)

    # Group values 0.5, 0.5, 0, 0 (slot 3 absent); overall selection rate 1/2 -> 0.
    g_full = np.array([0, 0, 1, 1, 2, 2, 4, 4])
    p_full = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    mf = fm.MetricFrame(metrics=off_half, y_true=p_full, y_pred=p_full,
                        sensitive_features=pd.Series(g_full, name="g"))
    values = np.full(5, np.nan)
    n = np.zeros(5)
    for k in np.unique(g_full):
        values[k] = off_half(None, p_full[g_full == k])
        n[k] = (g_full == k).sum()
    overall = off_half(None, p_full)
    assert overall == 0.0
    for method in METHODS:
        assert close(F.group_ratio(values, overall, n, method), mf.ratio(method=method)), method
        assert close(F.group_difference(values, overall, n, method),
                     mf.difference(method=method)), method
    assert F.group_ratio(values, overall, n, "to_overall") == 0.0
    assert math.isnan(F.group_ratio(np.zeros(2), 0.0, np.ones(2), "between_groups"))
    assert math.isnan(F.group_difference(values, overall, np.zeros(5)))


def test_multiclass_positive_label_binarization():
    # 3 classes, positive label 2: class 1 predictions are *not* selections,
    # but accuracy is the multi-class argmax accuracy.
    y = np.array([2, 1, 0, 2, 1, 0])
    p = np.array([2, 2, 1, 1, 1, 0])
    g = np.array([0, 0, 0, 1, 1, 1])
    c = F.to_numpy(F.group_counts(jnp.asarray(p), y, g, 2, positive_label=2))
    np.testing.assert_array_equal(c.pred_pos, [2, 0])
    np.testing.assert_array_equal(c.tp, [1, 0])
    np.testing.assert_array_equal(c.fp, [1, 0])
    np.testing.assert_array_equal(c.pos, [1, 1])
    np.testing.assert_array_equal(c.correct, [1, 2])
    np.testing.assert_allclose(F.selection_rate(c), [2 / 3, 0])
    assert close(F.accuracy(c), 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_and_eo_of_every_class_vs_the_rest_match_fairlearn(seed):
    """Per-class (one vs rest) DP / EO from class-group counts summed over padded batches equal fairlearn's on
    the binarized labels and predictions, class by class; the maximum names its class; class k equals the
    headline of ``positive_label=k``. Group 4 is absent (skipped, as fairlearn does not see it)."""
    rng = np.random.default_rng(seed)
    n, G, C = 90, 5, 4
    y, p, g = rng.integers(0, C, n), rng.integers(0, C, n), rng.integers(0, G - 1, n)
    p[g == 2] = np.where(rng.random((g == 2).sum()) < 0.6, 3, p[g == 2])      # a group that over-selects class 3
    step = jax.jit(F.class_group_counts, static_argnames=("num_groups", "num_classes"))
    total = None
    for lo in range(0, n, 32):          # padded batches of 32: padding rows have w = 0 and junk labels
        sl = slice(lo, lo + 32)
        m = len(y[sl])
        pad = 32 - m
        w = np.r_[np.ones(m), np.zeros(pad)].astype(np.float32)
        out = step(jnp.asarray(np.r_[p[sl], np.zeros(pad, int)]), np.r_[y[sl], np.full(pad, 1)],
                   np.r_[g[sl], np.zeros(pad, int)], num_groups=G, num_classes=C, weights=w)
        total = out if total is None else F.ClassGroupCounts(*(a + b for a, b in zip(total, out)))
    names = ["zero", "one", "two", "three"]
    per = F.per_class_parity(total, names)
    want_dp, want_eo = {}, {}
    for k, name in enumerate(names):
        yk, pk = (y == k).astype(int), (p == k).astype(int)
        want_dp[name] = fairlearn_metrics.demographic_parity_difference(yk, pk, sensitive_features=g)
        want_eo[name] = fairlearn_metrics.equalized_odds_difference(yk, pk, sensitive_features=g)
        assert close(per["demographic_parity_difference"][name], want_dp[name]), name
        assert close(per["equalized_odds_difference"][name], want_eo[name]), name
        head = F.group_counts(jnp.asarray(p), y, g, G, positive_label=k)
        assert per["demographic_parity_difference"][name] == F.demographic_parity_difference(head)
        assert per["equalized_odds_difference"][name] == F.equalized_odds_difference(head)
    for key, want in (("demographic_parity_difference", want_dp), ("equalized_odds_difference", want_eo)):
        best = max(want, key=want.get)
        assert per[f"{key}_max_class"] == best and close(per[f"{key}_max"], want[best])
    rep = F.fairness_report(F.group_counts(jnp.asarray(p), y, g, G), class_group=total, class_names=names)
    assert rep["per_class_parity"] == per and json.loads(json.dumps(rep, allow_nan=False))
    assert "per_class_parity" not in F.fairness_report(F.group_counts(jnp.asarray(p), y, g, G))


# ---------------------------------------------------------------------------
# Accumulation
# ---------------------------------------------------------------------------

BATCH = 16
_add = jax.jit(F.add_counts)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 100), seed=st.integers(0, 2**31 - 1))
def test_counts_additive_over_padded_batches(n, seed):
    rng = np.random.default_rng(seed)
    G, C = 5, 3
    x = rng.normal(size=(n, C)).astype(np.float32)
    y = rng.integers(0, C, n).astype(np.int32)
    g = rng.integers(0, G, n).astype(np.int32)
    loss = rng.uniform(0, 2, n).astype(np.float32)
    # Whole dataset in one call (padded to a fixed 128 rows: one compilation).
    pad = 128 - n
    whole = F.to_numpy(_counts_jit(
        np.concatenate([x, np.zeros((pad, C), np.float32)]), np.pad(y, (0, pad)),
        np.pad(g, (0, pad)), num_groups=G, loss=np.pad(loss, (0, pad)),
        weights=np.pad(np.ones(n, np.float32), (0, pad))))
    np.testing.assert_array_equal(whole.n, np.bincount(g, minlength=G))
    np.testing.assert_array_equal(whole.correct, np.bincount(g, x.argmax(1) == y, minlength=G))

    acc = F.zeros_counts(G)
    for s in range(0, n, BATCH):
        m = min(BATCH, n - s)
        pad = BATCH - m
        # Padding rows carry garbage (NaN logits/loss, valid labels and groups).
        xb = np.concatenate([x[s:s + m], np.full((pad, C), np.nan, np.float32)])
        yb = np.concatenate([y[s:s + m], rng.integers(0, C, pad)]).astype(np.int32)
        gb = np.concatenate([g[s:s + m], rng.integers(0, G, pad)]).astype(np.int32)
        lb = np.concatenate([loss[s:s + m], np.full(pad, np.nan, np.float32)])
        wb = np.concatenate([np.ones(m), np.zeros(pad)]).astype(np.float32)
        acc = _add(acc, _counts_jit(xb, yb, gb, num_groups=G, loss=lb, weights=wb))
    acc = F.to_numpy(acc)
    for field in F.GroupCounts._fields:
        if field == "loss_sum":
            np.testing.assert_allclose(acc.loss_sum, whole.loss_sum, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(getattr(acc, field), getattr(whole, field), field)
    assert whole.n.sum() == n
    assert np.all(np.isfinite(acc.loss_sum))


def test_psum_counts_over_mapped_devices():
    rng = np.random.default_rng(0)
    D, B, G = 4, 10, 3
    p = rng.integers(0, 2, (D, B)).astype(np.int32)
    y = rng.integers(0, 2, (D, B)).astype(np.int32)
    g = rng.integers(0, G, (D, B)).astype(np.int32)
    per_dev = jax.vmap(lambda a, b, c: F.psum_counts(F.group_counts(a, b, c, G), "dev"),
                       axis_name="dev")(p, y, g)
    whole = F.group_counts(p.reshape(-1), y.reshape(-1), g.reshape(-1), G)
    for got, want in zip(per_dev, whole):
        np.testing.assert_array_equal(np.asarray(got)[0], np.asarray(want))
        np.testing.assert_array_equal(np.asarray(got)[-1], np.asarray(want))


def test_out_of_range_group_ids_are_dropped_and_1d_float_rejected():
    c = F.group_counts(jnp.array([1, 1, 0]), jnp.array([1, 0, 0]), jnp.array([0, 5, -1]), 2)
    np.testing.assert_array_equal(np.asarray(c.n), [1, 0])
    with pytest.raises(TypeError):
        F.group_counts(jnp.array([0.2, 0.9]), jnp.array([0, 1]), jnp.array([0, 0]), 1)
    with pytest.raises(ValueError):
        F.demographic_parity_difference(c, method="to_mean")
    with pytest.raises(ValueError):
        F.equalized_odds_ratio(c, agg="best_case")


def test_jit_segment_sum_scales_to_1000_groups():
    rng = np.random.default_rng(1)
    N, G, C = 5000, 1000, 7
    x = rng.normal(size=(N, C)).astype(np.float32)
    y = rng.integers(0, C, N).astype(np.int32)
    g = rng.integers(0, G, N).astype(np.int32)
    c = F.to_numpy(_counts_jit(x, y, g, num_groups=G, positive_label=3))
    pred = x.argmax(1)
    np.testing.assert_array_equal(c.n, np.bincount(g, minlength=G))
    np.testing.assert_array_equal(c.correct, np.bincount(g, pred == y, minlength=G))
    np.testing.assert_array_equal(c.tp, np.bincount(g, (pred == 3) & (y == 3), minlength=G))
    np.testing.assert_array_equal(c.neg, np.bincount(g, y != 3, minlength=G))
    assert c.n.shape == (G,)
    # No Python loop over groups: the traced program does not grow with G.
    sizes = [len(jax.make_jaxpr(lambda a, b, s: F.group_counts(a, b, s, k))(x, y, g).eqns)
             for k in (2, 1000)]
    assert sizes[0] == sizes[1]
    jaxpr = str(jax.make_jaxpr(lambda a, b, s: F.group_counts(a, b, s, G))(x, y, g))
    assert "scatter-add" in jaxpr or "scatter_add" in jaxpr
    # Metrics on the host handle many (partly empty) groups.
    assert 0.0 <= F.demographic_parity_difference(c) <= 1.0


# ---------------------------------------------------------------------------
# Balancing Act psi and Ballot class-wise metrics
# ---------------------------------------------------------------------------


def make_counts(n, correct) -> F.GroupCounts:
    n = np.asarray(n, np.float32)
    z = np.zeros_like(n)
    return F.GroupCounts(n, np.asarray(correct, np.float32), z, z, z, z, z, z)


def test_excess_accuracy_gap_hand_computed():
    # Dense group accs 0.9, 0.8, (empty), 0.5 (overall 19/24); sparse 0.8, 0.8, -, 0.25 (17/24).
    dense = make_counts([10, 10, 0, 4], [9, 8, 0, 2])
    sparse = make_counts([10, 10, 0, 4], [8, 8, 0, 1])
    d_acc, s_acc = 19 / 24, 17 / 24
    expected = np.array([(0.9 - 0.8) - (d_acc - s_acc), (0.8 - 0.8) - (d_acc - s_acc), np.nan,
                         (0.5 - 0.25) - (d_acc - s_acc)])
    psi = F.excess_accuracy_gap(dense, sparse)
    np.testing.assert_allclose(psi, expected, atol=1e-12)
    assert np.isnan(psi[2])
    assert close(F.max_excess_accuracy_gap(dense, sparse), 0.25 - 2 / 24, 1e-12)
    assert close(F.excess_accuracy_gap_spread(dense, sparse), 0.25, 1e-12)
    # Identical models: psi == 0 for present groups.
    np.testing.assert_array_equal(F.excess_accuracy_gap(dense, dense)[[0, 1, 3]], 0.0)
    # All groups empty -> NaN, not an exception.
    empty = make_counts([0, 0], [0, 0])
    assert math.isnan(F.max_excess_accuracy_gap(empty, empty))
    with pytest.raises(ValueError):
        F.excess_accuracy_gap(dense, empty)


def test_class_wise_variance_and_max_class_discrepancy_hand_computed():
    # Classes: acc 1.0 (n=2), 0.5 (n=4), empty, 0.0 (n=2); overall 4/8 = 0.5.
    cc = make_counts([2, 4, 0, 2], [2, 2, 0, 0])
    assert close(F.class_wise_variance(cc), (0.25 + 0.0 + 0.25) / 3, 1e-12)
    assert close(F.max_class_discrepancy(cc), 1.0, 1e-12)
    # From raw predictions through per_class_counts.
    y = jnp.array([0, 0, 1, 1, 1, 1, 3, 3])
    p = jnp.array([0, 0, 1, 1, 0, 2, 0, 1])
    from_preds = F.to_numpy(F.per_class_counts(p, y, 4))
    np.testing.assert_array_equal(from_preds.n, cc.n)
    np.testing.assert_array_equal(from_preds.correct, cc.correct)
    assert close(F.class_wise_variance(from_preds), 1 / 6, 1e-12)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def test_fairness_report_json_and_consistent():
    y = np.array([1, 0, 1, 0, 1, 1, 0, 2])
    p = np.array([1, 0, 0, 0, 1, 1, 1, 2])
    g = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    loss = np.linspace(0.1, 0.8, 8).astype(np.float32)
    c = F.group_counts(jnp.asarray(p), y, g, 3, loss=loss)  # group 2 is empty
    dense = F.group_counts(jnp.asarray(y), y, g, 3)  # perfect dense model
    cc = F.per_class_counts(jnp.asarray(p), y, 3)
    rep = F.fairness_report(c, class_counts=cc, dense_counts=dense, group_names=["a", "b", "c"])
    text = json.dumps(rep, allow_nan=False)  # no NaN/inf leaks into JSON
    assert json.loads(text) == rep

    assert close(rep["accuracy"], 6 / 8)
    assert close(rep["mean_loss"], float(loss.mean()), 1e-6)
    assert set(rep["groups"]) == {"a", "b", "c"}
    assert rep["groups"]["c"] == {"n": 0.0, "accuracy": None, "selection_rate": None,
                                  "tpr": None, "fpr": None, "mean_loss": None}
    assert close(rep["groups"]["a"]["accuracy"], 3 / 4) and close(rep["groups"]["b"]["fpr"], 0.5)
    assert close(rep["groups"]["a"]["mean_loss"], float(loss[[0, 1, 2, 7]].mean()), 1e-6)
    for m in METHODS:
        assert close(rep["demographic_parity_difference"][m], F.demographic_parity_difference(c, m))
        assert close(rep["accuracy_parity_gap"][m], F.accuracy_parity_gap(c, m))
        for a in AGGS:
            assert close(rep["equalized_odds_ratio"][m][a], F.equalized_odds_ratio(c, m, a))
            assert close(rep["equalized_odds_difference"][m][a],
                         F.equalized_odds_difference(c, m, a))
    assert close(rep["class_wise_variance"], F.class_wise_variance(cc))
    assert close(rep["max_class_discrepancy"], F.max_class_discrepancy(cc))
    psi = rep["excess_accuracy_gap"]
    assert psi["per_group"]["c"] is None
    # dense acc 1 everywhere; sparse acc a=3/4, b=3/4 -> psi = 0 for both.
    assert close(psi["per_group"]["a"], 0.0) and close(psi["max"], 0.0)
    assert close(psi["spread"], 0.0)

    minimal = F.fairness_report(c)
    assert "class_wise_variance" not in minimal and "excess_accuracy_gap" not in minimal
    assert set(minimal["groups"]) == {"0", "1", "2"}
    with pytest.raises(ValueError):
        F.fairness_report(c, group_names=["only-one"])
