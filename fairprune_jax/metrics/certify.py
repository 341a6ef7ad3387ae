"""Per-group certificates: what a pruned model promises, with confidence intervals and a verdict.

A fair-pruning run promises, per group g, that the excess accuracy gap
psi_g = (dense_acc_g - pruned_acc_g) - (dense_acc - pruned_acc) is at most
eps. A number measured on a finite test split cannot prove that on its own:
this module turns the test predictions of the dense and the pruned model into
simultaneous confidence intervals and a verdict per group:

* ``holds``: the interval's upper end is <= eps;
* ``violated``: its lower end is > eps;
* ``undetermined``: the interval straddles eps (typically: too few rows).

Intervals: simultaneous at family-wise ``level`` (default 95%) over the
groups (Bonferroni), built to keep that level for small groups, unchanged
groups and one-sided changes (the normal approximation used before version 2
covered 0.85 for 10 groups of 45 rows losing 8%; ``docs/CERTIFICATE.md`` has
the coverage table that ``experiments/certify_coverage.py`` measures):

* group accuracy: Clopper-Pearson (exact);
* psi_g: paired. Row i of group h contributes d_i = dense_correct_i -
  pruned_correct_i in {-1, 0, 1}; D_h is their mean and psi_g = D_g - D,
  D = sum_h (n_h / n) D_h (group sizes held fixed, i.e. conditional on the
  test split's composition). Each D_h gets an exact interval from its flip
  rate and, given the flips, its lost share
  (:func:`paired_difference_interval`); :func:`psi_intervals` combines them
  by MOVER (default; measured) or by interval arithmetic with the
  complements' intervals (``exact``: conservative by construction, wider);
* demographic-parity and equalized-odds differences (between groups, worst
  case): simultaneous Clopper-Pearson intervals of every group's selection
  rate (TPR, FPR), and the range of max - min over that box (conservative).
  A verdict is given only against an explicit bound.

Beside each interval the certificate reports the headline number, the
certified max psi_g (with ``level`` confidence no group lost more than that
beyond the overall loss): the largest of the groups' one-sided upper bounds at
the marginal level (:func:`psi_upper_bounds`; one statement about the largest
psi_g needs no correction over groups, so it is tighter than the largest
simultaneous upper end; version 3), and the *floor*: what a model that changes
no prediction would get on the same rows. A group's bound goes below its floor
only when it loses less accuracy than the average (psi_g < 0); a model that
flips its rows stays above it. When the certified max psi_g is at most eps, every
group holds at once (``all_hold``), at ``level``.

Everything here is host-side numpy over additive counts; :func:`paired_counts`
is the jittable accumulation (one ``segment_sum``), summed over batches and
devices like :class:`fairness.GroupCounts`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from fairprune_jax.core.groups import check_rows, group_ids
from fairprune_jax.metrics import fairness
from fairprune_jax.metrics.counts import predictions

#: Groups with fewer test rows than this are marked ``small`` in every table.
SMALL_GROUP_ROWS = 30
#: A model whose most frequent prediction takes at least this share of the rows is flagged ``degenerate``.
DEGENERATE_SHARE = 0.98
VERDICTS = ("holds", "violated", "undetermined")
#: 1: paired Agresti-Min Wald + Wilson (under-covered small groups; certificates of that version are not
#: shown as certified bounds). 2: exact-conservative intervals, below; certified max psi_g = the largest
#: simultaneous upper end. 3: the same intervals and verdicts; certified max psi_g = the largest one-sided
#: marginal upper bound (:func:`psi_upper_bounds`), floor likewise. A version-2 certificate is rebuilt as
#: version 3 from the counts it stores (:func:`upgrade`).
INTERVAL_VERSION = 3
#: The first version whose intervals keep their level (version 1's under-covered): its headline is shown.
FIRST_VALID_VERSION = 2
INTERVAL_TEXT = {
    "mover": ("psi_g: exact per-group intervals (Clopper-Pearson on the flip rate and, given the flips, the lost "
              "share) combined by MOVER, coverage checked by simulation; accuracy and rates: Clopper-Pearson; "
              "Bonferroni over groups"),
    "exact": ("psi_g: exact per-group and per-complement intervals (Clopper-Pearson), conservative by "
              "construction; accuracy and rates: Clopper-Pearson; Bonferroni over groups")}
#: What version 3 added to the text above: how the headline bound is made.
MAX_TEXT = "; certified max psi_g: the largest one-sided bound at the marginal level (no correction needed)"


# ---------------------------------------------------------------------------
# Accumulation (device side)
# ---------------------------------------------------------------------------


def paired_counts(dense_logits: jax.Array, pruned_logits: jax.Array, y: jax.Array, g: jax.Array, w: jax.Array,
                  num_groups: int, num_classes: int) -> dict[str, jax.Array]:
    """Per-group discordant pairs and per-class prediction counts of one batch (jittable, additive).

    ``lost[g]``: rows of g the dense model gets right and the pruned one wrong;
    ``gained[g]``: the reverse; ``pred_hist`` / ``dense_pred_hist``: how many
    rows each class is predicted for. ``w`` marks rows (1) and padding (0); the certificate reads the sums as
    row counts, so other weights are refused where they are known (outside a trace). Either model's output may
    be (B, C) logits or (B,) integer predicted labels.
    """
    dense_pred = predictions(dense_logits, "dense predictions")
    pc_pred = predictions(pruned_logits, "pruned predictions")
    check_rows(dense_pred.shape[0], "paired_counts", pruned=pc_pred, y=y, g=g, w=w)
    if not isinstance(w, jax.core.Tracer) and not np.all(np.isin(np.asarray(w), (0, 1))):
        raise ValueError("paired_counts: w must be 0 (padding) or 1 (a row): the certificate's intervals count "
                         "rows, and weighted sums would claim more (or fewer) rows than were tested")
    y = jnp.asarray(y).astype(jnp.int32)
    dc = (dense_pred == y).astype(jnp.float32)
    pc = (pc_pred == y).astype(jnp.float32)
    w = jnp.asarray(w).astype(jnp.float32)
    cols = jnp.stack([w * dc * (1 - pc), w * (1 - dc) * pc], axis=1)
    by_group = jax.ops.segment_sum(cols, group_ids(g), num_segments=num_groups)
    hist = jax.ops.segment_sum(w, pc_pred, num_segments=num_classes)
    dense_hist = jax.ops.segment_sum(w, dense_pred, num_segments=num_classes)
    return {"lost": by_group[:, 0], "gained": by_group[:, 1], "pred_hist": hist, "dense_pred_hist": dense_hist}


# ---------------------------------------------------------------------------
# Intervals (host side)
# ---------------------------------------------------------------------------


def clopper_pearson(k: np.ndarray, n: np.ndarray, alpha: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) two-sided interval for a binomial rate: each tail at most ``alpha / 2``.

    Conservative for every n and rate, including 0 or n successes; also for a sum of independent trials with
    unequal rates (Hoeffding 1956: such a count is more concentrated than the binomial of the same mean, so
    the binomial tails overstate its tails). n = 0 gives [0, 1]. Broadcasts over any shape.
    """
    k, n = np.broadcast_arrays(np.asarray(k, np.float64), np.asarray(n, np.float64))
    a = np.broadcast_to(np.asarray(alpha, np.float64), k.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, special.betaincinv(np.maximum(k, 1e-300), np.maximum(n - k + 1, 1e-300), a / 2), 0.0)
        hi = np.where(k < n, special.betaincinv(k + 1, np.maximum(n - k, 1e-300), 1 - a / 2), 1.0)
    empty = n <= 0
    return np.where(empty, 0.0, lo), np.where(empty, 1.0, hi)


def paired_difference_interval(n: np.ndarray, lost: np.ndarray, gained: np.ndarray, alpha: float | np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact-conservative interval of D = P(lost) - P(gained) for one group's i.i.d. paired rows (level 1 - alpha).

    D = q (2 pi - 1) with q = P(the two models disagree on correctness) and pi = P(lost | disagree). The
    number of discordant rows m is binomial(n, q), and given m the lost rows are binomial(m, pi), whatever
    m is; so Clopper-Pearson intervals for q and (conditionally) for pi, each at alpha / 2, hold together
    with probability >= 1 - alpha, and D's interval is the range of q (2 pi - 1) over their box. Its width is
    about that of the paired Wald interval when flips go both ways (pi near 1/2, the usual case after
    fine-tuning) and at most about 1.4 times it otherwise; m = 0 gives [-q_hi, q_hi], never a point.
    """
    n, lost, gained = (np.asarray(a, np.float64) for a in (n, lost, gained))
    m = lost + gained
    q_lo, q_hi = clopper_pearson(m, n, np.asarray(alpha) / 2)
    p_lo, p_hi = clopper_pearson(lost, m, np.asarray(alpha) / 2)
    s_lo, s_hi = 2 * p_lo - 1, 2 * p_hi - 1
    return np.where(s_lo <= 0, q_hi * s_lo, q_lo * s_lo), np.where(s_hi >= 0, q_hi * s_hi, q_lo * s_hi)


def rate_difference_interval(n: np.ndarray, lost: np.ndarray, gained: np.ndarray, alpha: float | np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Conservative interval of P(lost) - P(gained) over rows that need not share one distribution.

    For the overall accuracy change, whose rows come from groups with different rates: Clopper-Pearson
    intervals of the lost and the gained rate at alpha / 2 each (valid for unequal rates, see
    :func:`clopper_pearson`), combined by the union bound.
    """
    b_lo, b_hi = clopper_pearson(lost, n, np.asarray(alpha) / 2)
    c_lo, c_hi = clopper_pearson(gained, n, np.asarray(alpha) / 2)
    return b_lo - c_hi, b_hi - c_lo


PSI_METHODS = ("mover", "exact")


def psi_intervals(n: np.ndarray, lost: np.ndarray, gained: np.ndarray, level: float = 0.95,
                  method: str = "mover", simultaneous: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point estimate and simultaneous interval of psi_g for every group (family-wise ``level``).

    ``n``, ``lost``, ``gained``: (..., G) rows, dense-right/pruned-wrong and dense-wrong/pruned-right rows
    per group (leading axes: independent problems, e.g. simulation draws). Conditional on the split's
    group sizes, psi_g = (1 - w_g) D_g - sum_{h != g} w_h D_h, a combination of independent per-group
    accuracy changes D_h with w_h = n_h / n. Groups with n = 0 are NaN and do not count.

    ``method="mover"`` (default): every psi_g at level 1 - (1 - level) / G (Bonferroni), from the exact
    per-group intervals of :func:`paired_difference_interval` at that level, combined by MOVER (Zou &
    Donner 2008: each term's distance from its estimate to its own interval's end, added in quadrature on
    the side that matters, which keeps the skew of small groups). The pieces are exact, the combination
    is not; its coverage is measured over group sizes 20-5000, 2-200 groups and one- and two-sided
    changes (``experiments/certify_coverage.py``, ``docs/CERTIFICATE.md``) and checked in the tests.

    ``simultaneous=False``: each interval at the marginal ``level`` instead (no correction over groups; see
    :func:`psi_upper_bounds` for the one statement that needs no more).

    ``method="exact"``: conservative by construction, about 1.3 times wider. 2G intervals at
    (1 - level) / (2G) each: one per group (exact) and one per complement (the rows outside g, whose
    groups differ in rate: :func:`rate_difference_interval`); when all hold, psi_g = (1 - w_g) (D_g - D_-g)
    lies in (1 - w_g) [lo_g - hi_-g, hi_g - lo_-g] and in the interval the group intervals imply for the
    weighted sum; the result is their intersection.
    """
    if method not in PSI_METHODS:
        raise ValueError(f"unknown interval method {method!r}; valid: {', '.join(PSI_METHODS)}")
    n, lost, gained = np.broadcast_arrays(*(np.asarray(a, np.float64) for a in (n, lost, gained)))
    present = n > 0
    m = np.sum(present, axis=-1, keepdims=True)
    total = np.sum(n, axis=-1, keepdims=True)
    w = np.where(present, n / np.maximum(total, 1e-12), 0.0)
    d = np.where(present, (lost - gained) / np.maximum(n, 1e-12), 0.0)
    psi = d - np.sum(w * d, axis=-1, keepdims=True)
    alpha = _alpha(level) / np.maximum((m if simultaneous else 1) * (1 if method == "mover" else 2), 1)
    lo_g, hi_g = paired_difference_interval(n, lost, gained, alpha)
    lo_g, hi_g = np.where(present, lo_g, 0.0), np.where(present, hi_g, 0.0)
    if method == "mover":
        below, above = (d - lo_g) ** 2, (hi_g - d) ** 2
        s_below = np.sum(w ** 2 * below, -1, keepdims=True)
        s_above = np.sum(w ** 2 * above, -1, keepdims=True)
        high = psi + np.sqrt(np.maximum((1 - w) ** 2 * above + s_below - w ** 2 * below, 0.0))
        low = psi - np.sqrt(np.maximum((1 - w) ** 2 * below + s_above - w ** 2 * above, 0.0))
    else:
        lo_c, hi_c = rate_difference_interval(total - n, np.sum(lost, -1, keepdims=True) - lost,
                                              np.sum(gained, -1, keepdims=True) - gained, alpha)
        low, high = (1 - w) * (lo_g - hi_c), (1 - w) * (hi_g - lo_c)
        if simultaneous:
            # with every group's interval holding at once, the weighted sum they imply bounds psi_g too (a
            # marginal interval has only its own group's and complement's pieces to rely on)
            sum_lo, sum_hi = np.sum(w * lo_g, -1, keepdims=True), np.sum(w * hi_g, -1, keepdims=True)
            low = np.maximum(low, (1 - w) * lo_g - (sum_hi - w * hi_g))
            high = np.minimum(high, (1 - w) * hi_g - (sum_lo - w * lo_g))
    nan = lambda a: np.where(present, a, np.nan)  # noqa: E731
    return nan(psi), nan(low), nan(high)


def psi_upper_bounds(n: np.ndarray, lost: np.ndarray, gained: np.ndarray, level: float = 0.95,
                     method: str = "mover") -> np.ndarray:
    """Per group, a one-sided upper confidence bound of psi_g at marginal ``level`` (no correction over groups).

    Their maximum is an upper confidence bound of max_g psi_g at ``level``: if g* is the group with the largest
    true psi_g (a fixed group, not a random one), then whenever psi_g* <= U_g* (probability >= ``level``),
    every psi_g <= psi_g* <= U_g* <= max_h U_h. No Bonferroni factor is needed for that one statement ("no
    group lost more than U beyond the overall loss"), and the same argument makes "every group holds" (max_g
    U_g <= eps) a valid level test of "some group violates eps" (an intersection-union test, Berger 1982).
    Per-group verdicts, which claim something of each group separately, keep the simultaneous intervals of
    :func:`psi_intervals`. Built as the upper end of the two-sided marginal interval at 1 - 2 (1 - level)
    (each end of these constructions errs with at most half the two-sided error).
    """
    if not 0.5 < float(level) < 1.0:
        raise ValueError(f"a one-sided confidence level must be in (0.5, 1); got {level}")
    return psi_intervals(n, lost, gained, 1.0 - 2.0 * _alpha(level), method, simultaneous=False)[2]


def psi_floor(n: np.ndarray, level: float = 0.95, method: str = "mover") -> np.ndarray:
    """Per group, the one-sided upper bound of psi_g (:func:`psi_upper_bounds`, the certified max psi_g's) that
    a pruned model changing no prediction would get on this split.

    It depends only on the group sizes and the level: the certificate a pruned model identical to the dense one
    would get. A model whose own bound is close to it is limited by the split, not by its predictions (only a
    model that also loses rows elsewhere, making psi_g < 0, goes below it; one that flips rows of g stays
    above it).
    """
    z = np.zeros_like(np.asarray(n, np.float64))
    return psi_upper_bounds(n, z, z, level, method)


def predicted_halfwidth(n: np.ndarray, flip_rate: np.ndarray, level: float = 0.95,
                        method: str = "mover", headline: bool = False) -> np.ndarray:
    """Per group, how far above psi_g the certificate's simultaneous upper end (the verdicts') will sit on a split
    of ``n`` rows per group (may be fractional) whose pruned model flips ``flip_rate`` of each group's rows (half
    lost, half gained); ``headline=True``: its one-sided bound (:func:`psi_upper_bounds`), lower. A planning
    number: what a certified bound E leaves for psi_g (CEAG's ``aim=certificate`` / ``bound``: psi_g <= E - h_g)
    and, through :func:`reachable_bound`, the smallest bound such a split can certify."""
    n = np.asarray(n, np.float64)
    half = np.asarray(flip_rate, np.float64) * n / 2
    psi, _, high = psi_intervals(n, half, half, level, method)
    return (psi_upper_bounds(n, half, half, level, method) if headline else high) - psi


def reachable_bound(weights: np.ndarray, halfwidth: np.ndarray) -> float:
    """The smallest certified max psi_g any model with these half-widths can reach: sum_g w_g h_g.

    psi_g averages to zero over the rows (sum_g w_g psi_g = 0 with w_g the groups' shares), so max_g (psi_g +
    h_g) >= sum_g w_g (psi_g + h_g) = sum_g w_g h_g, with equality when psi_g = t - h_g for every g.
    """
    w = np.asarray(weights, np.float64)
    h = np.asarray(halfwidth, np.float64)
    ok = np.isfinite(h) & (w > 0)
    return float(np.sum(w[ok] * h[ok]) / max(float(np.sum(w[ok])), 1e-12))


def psi_standard_error(n: np.ndarray, lost: np.ndarray, gained: np.ndarray) -> np.ndarray:
    """Approximate standard error of each group's psi_g estimate (paired, Agresti-Min adjusted; never 0).

    A scale for margins and sample-size advice (CEAG's ``margin_z``), not a confidence statement: the
    certificate's intervals come from :func:`psi_intervals`.
    """
    n, lost, gained = (np.asarray(a, np.float64) for a in (n, lost, gained))
    present = n > 0
    wgt = np.where(present, n / max(float(n.sum()), 1e-12), 0.0)
    na = n + 2.0
    pb, pc = (lost + 0.5) / na, (gained + 0.5) / na
    var = np.where(present, (pb + pc - (pb - pc) ** 2) / na, 0.0)
    var_psi = (1 - wgt) ** 2 * var + (np.sum(wgt ** 2 * var) - wgt ** 2 * var)
    return np.where(present, np.sqrt(var_psi), np.nan)


def verdicts(low: np.ndarray, high: np.ndarray, bound: float) -> list[str | None]:
    """``holds`` (high <= bound), ``violated`` (low > bound), ``undetermined``; None where the group is absent."""
    out: list[str | None] = []
    for lo, hi in zip(np.asarray(low, np.float64), np.asarray(high, np.float64)):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            out.append(None)
        elif hi <= bound:
            out.append("holds")
        elif lo > bound:
            out.append("violated")
        else:
            out.append("undetermined")
    return out


def _range_interval(low: np.ndarray, high: np.ndarray, present: np.ndarray) -> tuple[float, float]:
    """Interval of max_g p_g - min_g p_g when every p_g lies in [low_g, high_g] (present groups only)."""
    lo, hi = low[present], high[present]
    if lo.size < 2:
        return 0.0, 0.0
    return float(max(0.0, lo.max() - hi.min())), float(hi.max() - lo.min())


def _diff_entry(value: float, low: float, high: float, bound: float | None) -> dict:
    entry = {"value": fairness._js(value), "low": low, "high": high}
    if bound is not None:
        entry["bound"] = bound
        entry["verdict"] = verdicts(np.array([low]), np.array([high]), bound)[0]
    return entry


def prediction_summary(pred_hist: np.ndarray, class_names: Sequence[str] | None = None,
                       threshold: float = DEGENERATE_SHARE) -> dict:
    """The most frequent prediction, its share of the rows, and whether the model is degenerate."""
    h = np.asarray(pred_hist, np.float64)
    total = h.sum()
    top = int(np.argmax(h)) if h.size else 0
    share = float(h[top] / total) if total > 0 else None
    name = str(class_names[top]) if class_names is not None and top < len(class_names) else str(top)
    return {"top_prediction": name, "top_prediction_share": share,
            "degenerate": bool(share is not None and share >= threshold), "degenerate_threshold": threshold}


def _alpha(level: float) -> float:
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"confidence level must be in (0, 1); got {level}")
    return 1.0 - float(level)


def check_certificate_inputs(c: fairness.GroupCounts, dc: fairness.GroupCounts, lost: np.ndarray,
                             gained: np.ndarray, eps: float) -> None:
    """Refuse inputs the intervals would turn into a confident wrong statement: counts that are not row counts
    (weighted sums), paired counts that do not belong to these two models' counts (``lost`` and ``gained``
    swapped, or from another split), and an eps that is not a number."""
    if not (isinstance(eps, (int, float, np.floating, np.integer)) and math.isfinite(float(eps))):
        raise ValueError(f"certificate: eps must be a finite number; got {eps!r}")
    G = c.n.shape[0]
    for name, a in (("lost", lost), ("gained", gained), ("dense counts", dc.n)):
        if np.shape(a) != (G,):
            raise ValueError(f"certificate: {name} must have one entry per group ({G}); got shape {np.shape(a)}")
    counts = {"n": c.n, "correct": c.correct, "dense n": dc.n, "dense correct": dc.correct, "lost": lost,
              "gained": gained}
    for name, a in counts.items():
        if not np.all(np.isfinite(np.asarray(a, np.float64))):
            raise ValueError(f"certificate: {name} holds NaN or infinite entries ({np.asarray(a).tolist()[:8]}): "
                             "counts must be finite row counts (a NaN in the labels or predictions, or a metric "
                             "passed for a count?)")
        if np.any(a < -1e-6) or np.any(np.abs(a - np.round(a)) > 1e-4 * np.maximum(1.0, np.abs(a))):
            raise ValueError(f"certificate: {name} must be row counts (non-negative integers; padding weight 0, "
                             f"every row weight 1); got {np.round(a, 4).tolist()[:8]}")
    tol = 1e-4 * np.maximum(1.0, c.n)
    bad = [i for i in range(G) if abs(c.n[i] - dc.n[i]) > tol[i] or lost[i] + gained[i] > c.n[i] + tol[i]
           or abs((lost[i] - gained[i]) - (dc.correct[i] - c.correct[i])) > tol[i]]
    if bad:
        i = bad[0]
        raise ValueError(
            f"certificate: the paired counts do not match the two models' counts in {len(bad)} group(s) (group "
            f"{i}: n {c.n[i]:g} vs dense n {dc.n[i]:g}, lost {lost[i]:g} + gained {gained[i]:g}, dense correct "
            f"{dc.correct[i]:g} - pruned correct {c.correct[i]:g} should equal lost - gained): pass `lost` (dense "
            "right, pruned wrong) and `gained` (the reverse) from paired_counts over the same rows as the counts")


def certificate(counts: fairness.GroupCounts, dense_counts: fairness.GroupCounts, lost: np.ndarray,
                gained: np.ndarray, *, eps: float, level: float = 0.95, group_names: Sequence[str] | None = None,
                fairness_bound: float | None = None, small_group: int = SMALL_GROUP_ROWS,
                interval: str = "mover") -> dict[str, Any]:
    """The per-group certificate of a pruned model on one split (see the module docstring).

    ``counts`` / ``dense_counts``: the pruned and dense model's group counts on
    the same rows; ``lost`` / ``gained``: their paired discordant counts
    (:func:`paired_counts` summed over the split). ``eps``: the psi bound;
    ``fairness_bound``: if given, DP and EO differences get a verdict too. ``interval``: the psi_g
    construction (:data:`PSI_METHODS`, see :func:`psi_intervals`).
    """
    c, dc = fairness.to_numpy(counts), fairness.to_numpy(dense_counts)
    lost, gained = np.asarray(lost, np.float64), np.asarray(gained, np.float64)
    G = c.n.shape[0]
    check_certificate_inputs(c, dc, lost, gained, eps)
    names = [str(i) for i in range(G)] if group_names is None else [str(s) for s in group_names]
    present = c.n > 0
    m = int(present.sum())
    alpha = _alpha(level)
    acc_lo, acc_hi = clopper_pearson(c.correct, c.n, alpha / max(m, 1))
    psi, lo, hi = psi_intervals(c.n, lost, gained, level, interval)
    upper = psi_upper_bounds(c.n, lost, gained, level, interval)
    floor = psi_floor(c.n, level, interval)
    verdict = verdicts(lo, hi, eps)
    # the count that decides a metric: rows for accuracy, psi and DP; positives and negatives for EO
    rate_rows = np.minimum(c.pos, c.neg)
    groups = {}
    for i, name in enumerate(names):
        if not present[i]:
            groups[name] = {"n": 0, "small": True, "verdict": None}
            continue
        groups[name] = {"n": int(round(c.n[i])), "small": bool(c.n[i] < small_group),
                        "positives": int(round(c.pos[i])), "negatives": int(round(c.neg[i])),
                        "small_for_eo": bool(rate_rows[i] < small_group),
                        "accuracy": float(c.correct[i] / c.n[i]), "accuracy_low": float(acc_lo[i]),
                        "accuracy_high": float(acc_hi[i]),
                        "dense_accuracy": float(dc.correct[i] / dc.n[i]) if dc.n[i] > 0 else None,
                        "lost": int(round(lost[i])), "gained": int(round(gained[i])),
                        "flip_rate": float((lost[i] + gained[i]) / c.n[i]),
                        "psi": float(psi[i]), "low": float(lo[i]), "high": float(hi[i]),
                        "upper": float(upper[i]), "floor": float(floor[i]), "verdict": verdict[i]}
    by = {v: [n for n in names if groups[n]["verdict"] == v] for v in VERDICTS}
    # DP: one rate per group; EO (worst case): TPR and FPR per group, 2m intervals
    sel_lo, sel_hi = clopper_pearson(c.pred_pos, c.n, alpha / max(m, 1))
    tpr_lo, tpr_hi = clopper_pearson(c.tp, c.pos, alpha / max(2 * m, 1))
    fpr_lo, fpr_hi = clopper_pearson(c.fp, c.neg, alpha / max(2 * m, 1))
    dp = _range_interval(sel_lo, sel_hi, present)
    t_lo, t_hi = _range_interval(tpr_lo, tpr_hi, present)
    f_lo, f_hi = _range_interval(fpr_lo, fpr_hi, present)
    uppers = [float(upper[i]) for i in range(G) if present[i]]
    floors = [float(floor[i]) for i in range(G) if present[i]]
    certified = max(uppers) if uppers else None
    at = [names[i] for i in range(G) if present[i] and float(upper[i]) == certified]
    return {
        "level": level, "eps": eps, "groups_tested": m, "small_group_rows": small_group,
        "interval_version": INTERVAL_VERSION, "interval_method": interval, "interval": INTERVAL_TEXT[interval] + MAX_TEXT,
        "groups": groups,
        "holds": len(by["holds"]), "violated": len(by["violated"]), "undetermined": len(by["undetermined"]),
        "violated_groups": by["violated"], "undetermined_groups": by["undetermined"],
        "small_groups": [n for n in names if groups[n]["verdict"] is not None and groups[n]["small"]],
        "small_groups_eo": [n for n in names if groups[n]["verdict"] is not None and groups[n]["small_for_eo"]],
        "certified_share": len(by["holds"]) / m if m else None,
        # the headline: with `level` confidence, no group lost more than this beyond the overall loss
        "certified_max_psi": certified,
        "certified_max_psi_group": at[0] if at else None,     # the group whose bound it is
        # every group within eps at once (intersection-union test at `level`)
        "all_hold": bool(certified is not None and certified <= eps),
        # what these rows would certify for a model identical to the dense one (see psi_floor)
        "floor_max_psi": max(floors) if floors else None,
        "worst_upper": certified,           # the version-1 name of certified_max_psi, for readers of older files
        "max_simultaneous_high": max(float(hi[i]) for i in range(G) if present[i]) if m else None,
        "flip_rate": float((lost[present].sum() + gained[present].sum()) / max(c.n[present].sum(), 1.0)),
        "demographic_parity_difference": _diff_entry(fairness.demographic_parity_difference(c), *dp,
                                                     fairness_bound),
        "equalized_odds_difference": _diff_entry(fairness.equalized_odds_difference(c), max(t_lo, f_lo),
                                                 max(t_hi, f_hi), fairness_bound),
    }


def upgrade(cert: dict) -> dict:
    """A version-2 certificate rebuilt as version 3 from the per-group counts it stores (n, lost, gained).

    Version 3 changed only the headline (certified max psi_g and the floor: one-sided marginal bounds, see
    :func:`psi_upper_bounds`); intervals and verdicts are the same. The stored simultaneous upper ends are
    recomputed from the counts first: if any differs (counts rounded from weighted rows, say), the
    certificate is returned unchanged, still version 2, rather than rebuilt from numbers that are not its own.
    Other versions are returned as they are.
    """
    if cert.get("interval_version") != 2:
        return cert
    names = [k for k, g in cert["groups"].items() if g.get("n")]
    if not names:
        return cert
    n, lost, gained = (np.array([float(cert["groups"][k][f]) for k in names]) for f in ("n", "lost", "gained"))
    level, method = float(cert["level"]), cert.get("interval_method", "mover")
    _, _, hi = psi_intervals(n, lost, gained, level, method)
    if not np.allclose(hi, [cert["groups"][k]["high"] for k in names], rtol=0, atol=1e-9):
        return cert
    upper, floor = psi_upper_bounds(n, lost, gained, level, method), psi_floor(n, level, method)
    out = dict(cert, groups={k: dict(g) for k, g in cert["groups"].items()})
    for i, k in enumerate(names):
        g = out["groups"][k]
        # the key order of a version-3 certificate: upper before floor
        rest = {f: g.pop(f) for f in list(g) if f in ("floor", "verdict")}
        g.update(upper=float(upper[i]), floor=float(floor[i]), verdict=rest.get("verdict"))
    out.update(interval_version=3, interval=INTERVAL_TEXT[method] + MAX_TEXT,
               certified_max_psi=float(upper.max()), certified_max_psi_group=names[int(np.argmax(upper))],
               worst_upper=float(upper.max()),
               floor_max_psi=float(floor.max()), max_simultaneous_high=float(hi.max()),
               all_hold=bool(upper.max() <= float(cert["eps"])))
    return out


def level_text(level: float) -> str:
    """A confidence level in words, unrounded: 0.95 -> "95%", 0.999 -> "99.9%", 0.975 -> "97.5%"."""
    return f"{100 * float(level):.10g}%"


def headline(cert: dict, name=str) -> str:
    """The certified bound in words: "with 95% confidence, no group lost more than U beyond the overall loss".
    ``name``: how a group's name is written (Markdown escapes it)."""
    u, f = cert.get("certified_max_psi"), cert.get("floor_max_psi")
    if u is None:
        return "no group has test rows: nothing is certified"
    out = (f"with {level_text(cert['level'])} confidence, no group lost more than {u:.4f} accuracy beyond the "
           f"overall loss (certified max psi_g")
    who = cert.get("certified_max_psi_group")
    g = (cert.get("groups") or {}).get(who) or {}
    if who is not None and g.get("n"):
        out += f", the bound of group {name(who)}: {g['n']} test rows" + (", a small group" if g.get("small") else "")
    out += ")"
    if f is not None:
        out += f"; on these test rows a model identical to the dense one would get {f:.4f} (the floor)"
    return out


def summary_line(cert: dict, name=str) -> str:
    """One line for a terminal: how many groups are certified, and which are not (``name``: as in
    :func:`headline`)."""
    m = cert["groups_tested"]
    if cert.get("all_hold"):
        parts = [f"certified (psi_g <= {cert['eps']:g}) for all {m} groups at once at {level_text(cert['level'])} "
                 f"(certified max psi_g {cert['certified_max_psi']:.4f})"]
        if cert["holds"] < m:
            parts.append(f"group by group (simultaneous two-sided intervals) {cert['holds']} of {m} hold")
        return "; ".join(parts)
    parts = [f"certified (psi_g <= {cert['eps']:g}) for {cert['holds']} of {m} groups at "
             f"{level_text(cert['level'])}"]
    if cert["violated_groups"]:
        parts.append("violated: " + ", ".join(map(name, cert["violated_groups"][:8]))
                     + (" ..." if len(cert["violated_groups"]) > 8 else ""))
    if cert["undetermined_groups"]:
        parts.append("undetermined: " + ", ".join(map(name, cert["undetermined_groups"][:8]))
                     + (" ..." if len(cert["undetermined_groups"]) > 8 else ""))
    return "; ".join(parts)


__all__ = ["SMALL_GROUP_ROWS", "DEGENERATE_SHARE", "VERDICTS", "INTERVAL_VERSION", "FIRST_VALID_VERSION", "paired_counts",
           "clopper_pearson",
           "paired_difference_interval", "rate_difference_interval", "PSI_METHODS", "psi_intervals", "psi_upper_bounds", "psi_floor", "upgrade",
           "predicted_halfwidth", "reachable_bound", "level_text",
           "psi_standard_error", "verdicts", "prediction_summary", "certificate", "headline", "summary_line"]


def __getattr__(name: str):
    """``certify.coverage_simulation`` still works: it lives in :mod:`fairprune_jax.metrics.coverage` (which
    imports this module, hence the lazy lookup)."""
    if name == "coverage_simulation":
        from fairprune_jax.metrics.coverage import coverage_simulation
        return coverage_simulation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
