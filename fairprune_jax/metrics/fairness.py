"""Group-fairness metrics from additive per-group counts.

Accumulation (:func:`group_counts`) is pure, jittable JAX: it reduces a batch to
per-group COUNTS with one ``jax.ops.segment_sum`` (no Python loop over groups).
Counts add across batches (:func:`add_counts`) and devices (:func:`psum_counts`),
so every metric below is computed on the host from the summed counts -- never
by averaging per-batch rates, which would be wrong for unequal batch/group sizes.

The fairlearn-defined metrics reproduce fairlearn 0.15 exactly (``MetricFrame``
semantics) on the same predictions, including its edge cases:

* a group with no positives has TPR 0 (not NaN), a group with no negatives has
  FPR 0: sklearn's ``confusion_matrix(normalize="true")`` maps 0/0 to 0;
* groups absent from the data (``n == 0``) are invisible to fairlearn, so they
  are skipped by every between-groups / to-overall reduction (their per-group
  rates are NaN here);
* ``to_overall`` compares each group with the metric computed on all rows;
* ratios are ``min / max`` (between groups) or ``min_g min(r_g, 1 / r_g)`` with
  ``r_g = value_g / overall`` (to overall); ``0 / 0`` is NaN, and NaN group
  ratios are skipped in the to-overall minimum;
* equalized odds ``worst_case`` uses Python's builtin ``max`` / ``min`` over
  ``[tpr, fpr]`` in that order, so a NaN TPR ratio makes the result NaN while a
  NaN FPR ratio is ignored; ``mean`` skips NaN (pandas ``Series.mean``).

Binary metrics apply to multi-class predictions through ``positive_label``
(``pred == positive_label`` vs ``y == positive_label``); accuracy always uses
the multi-class ``argmax == y``.

The counts and their accumulation are ``counts.py``; this module holds the metrics and the report built from
them, and re-exports the counts (``fairness.GroupCounts``, ``fairness.group_counts``, ... as before).
"""
from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np

from fairprune_jax.metrics.counts import (ClassGroupCounts, GroupCounts, add_counts,  # noqa: F401
                                          class_group_counts, group_counts, group_counts_jit, one_vs_rest,
                                          per_class_counts, psum_counts, to_numpy, zeros_counts)

Method = Literal["between_groups", "to_overall"]
Agg = Literal["worst_case", "mean"]

_METHODS = ("between_groups", "to_overall")
_AGGS = ("worst_case", "mean")


# ---------------------------------------------------------------------------
# Host-side metrics (after accumulation)
# ---------------------------------------------------------------------------


def _div(num: np.ndarray, den: np.ndarray, zero_den: float) -> np.ndarray:
    """``num / den`` with ``zero_den`` where ``den == 0`` (no warnings)."""
    out = np.full(np.shape(num), zero_den, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _overall(num: np.ndarray, den: np.ndarray, zero_den: float) -> float:
    d = float(den.sum())
    return float(num.sum()) / d if d != 0 else zero_den


def _rate(c: GroupCounts, num: np.ndarray, den: np.ndarray, zero_den: float) -> np.ndarray:
    """Per-group rate; ``zero_den`` for an empty denominator, NaN for absent groups."""
    return np.where(c.n > 0, _div(num, den, zero_den), np.nan)


def accuracy(counts: GroupCounts) -> float:
    """Overall accuracy on all rows (NaN when there are no rows)."""
    c = to_numpy(counts)
    return _overall(c.correct, c.n, math.nan)


def group_accuracy(counts: GroupCounts) -> np.ndarray:
    """Per-group accuracy, shape (G,); NaN for groups with n == 0."""
    c = to_numpy(counts)
    return _rate(c, c.correct, c.n, math.nan)


def mean_loss(counts: GroupCounts) -> float:
    """Overall mean per-sample loss."""
    c = to_numpy(counts)
    return _overall(c.loss_sum, c.n, math.nan)


def group_mean_loss(counts: GroupCounts) -> np.ndarray:
    """Per-group mean loss, shape (G,); NaN for groups with n == 0."""
    c = to_numpy(counts)
    return _rate(c, c.loss_sum, c.n, math.nan)


def selection_rate(counts: GroupCounts) -> np.ndarray:
    """Per-group P(pred == positive_label), shape (G,); NaN for absent groups."""
    c = to_numpy(counts)
    return _rate(c, c.pred_pos, c.n, math.nan)


def overall_selection_rate(counts: GroupCounts) -> float:
    """Selection rate on all rows."""
    c = to_numpy(counts)
    return _overall(c.pred_pos, c.n, math.nan)


def true_positive_rate(counts: GroupCounts) -> np.ndarray:
    """Per-group TPR, shape (G,): 0 for a group without positives (as fairlearn), NaN if absent."""
    c = to_numpy(counts)
    return _rate(c, c.tp, c.pos, 0.0)


def overall_true_positive_rate(counts: GroupCounts) -> float:
    """TPR on all rows (0 when there are no positives, as fairlearn)."""
    c = to_numpy(counts)
    return _overall(c.tp, c.pos, 0.0) if c.n.sum() > 0 else math.nan


def false_positive_rate(counts: GroupCounts) -> np.ndarray:
    """Per-group FPR, shape (G,): 0 for a group without negatives (as fairlearn), NaN if absent."""
    c = to_numpy(counts)
    return _rate(c, c.fp, c.neg, 0.0)


def overall_false_positive_rate(counts: GroupCounts) -> float:
    """FPR on all rows (0 when there are no negatives, as fairlearn)."""
    c = to_numpy(counts)
    return _overall(c.fp, c.neg, 0.0) if c.n.sum() > 0 else math.nan


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def _check_agg(agg: str) -> None:
    if agg not in _AGGS:
        raise ValueError(f"agg must be one of {_AGGS}, got {agg!r}")


def group_difference(values: np.ndarray, overall: float, n: np.ndarray,
                     method: Method = "between_groups") -> float:
    """fairlearn ``MetricFrame.difference`` over groups with ``n > 0``.

    ``between_groups``: max - min; ``to_overall``: max |value_g - overall|.
    NaN when no group is present.
    """
    _check_method(method)
    v = np.asarray(values, np.float64)[np.asarray(n) > 0]
    if v.size == 0:
        return math.nan
    if method == "between_groups":
        return float(v.max() - v.min())
    return float(np.abs(v - overall).max())


def group_ratio(values: np.ndarray, overall: float, n: np.ndarray,
                method: Method = "between_groups") -> float:
    """fairlearn ``MetricFrame.ratio`` over groups with ``n > 0``.

    ``between_groups``: min / max (NaN when both are 0); ``to_overall``: the
    minimum over groups of ``r`` or ``1 / r`` (whichever is <= 1) for
    ``r = value_g / overall``, skipping NaN (0 / 0) ratios.
    """
    _check_method(method)
    v = np.asarray(values, np.float64)[np.asarray(n) > 0]
    if v.size == 0:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "between_groups":
            return float(np.float64(v.min()) / np.float64(v.max()))
        r = v / np.float64(overall)
        r = np.where(r > 1, 1.0 / r, r)
    r = r[~np.isnan(r)]
    return float(r.min()) if r.size else math.nan


def _nanmean(*xs: float) -> float:
    """Mean skipping NaN (pandas ``Series.mean``); NaN if all are NaN."""
    vals = [x for x in xs if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else math.nan


def demographic_parity_difference(counts: GroupCounts, method: Method = "between_groups") -> float:
    """Selection-rate difference (fairlearn ``demographic_parity_difference``)."""
    c = to_numpy(counts)
    return group_difference(selection_rate(c), overall_selection_rate(c), c.n, method)


def demographic_parity_ratio(counts: GroupCounts, method: Method = "between_groups") -> float:
    """Selection-rate ratio (fairlearn ``demographic_parity_ratio``)."""
    c = to_numpy(counts)
    return group_ratio(selection_rate(c), overall_selection_rate(c), c.n, method)


def equal_opportunity_difference(counts: GroupCounts, method: Method = "between_groups") -> float:
    """TPR difference (fairlearn ``equal_opportunity_difference``)."""
    c = to_numpy(counts)
    return group_difference(true_positive_rate(c), overall_true_positive_rate(c), c.n, method)


def equal_opportunity_ratio(counts: GroupCounts, method: Method = "between_groups") -> float:
    """TPR ratio (fairlearn ``equal_opportunity_ratio``)."""
    c = to_numpy(counts)
    return group_ratio(true_positive_rate(c), overall_true_positive_rate(c), c.n, method)


def _fpr_difference(c: GroupCounts, method: Method) -> float:
    return group_difference(false_positive_rate(c), overall_false_positive_rate(c), c.n, method)


def _fpr_ratio(c: GroupCounts, method: Method) -> float:
    return group_ratio(false_positive_rate(c), overall_false_positive_rate(c), c.n, method)


def equalized_odds_difference(counts: GroupCounts, method: Method = "between_groups",
                              agg: Agg = "worst_case") -> float:
    """Worst (max) or mean of the TPR and FPR differences (fairlearn semantics)."""
    _check_agg(agg)
    c = to_numpy(counts)
    d_tpr, d_fpr = equal_opportunity_difference(c, method), _fpr_difference(c, method)
    if agg == "worst_case":
        return max(d_tpr, d_fpr)  # builtin max in fairlearn's [tpr, fpr] order (NaN handling)
    return _nanmean(d_tpr, d_fpr)


def equalized_odds_ratio(counts: GroupCounts, method: Method = "between_groups",
                         agg: Agg = "worst_case") -> float:
    """Worst (min) or mean of the TPR and FPR ratios (fairlearn semantics).

    As in fairlearn, ``worst_case`` is NaN whenever the TPR ratio is NaN (e.g. no
    true positive anywhere), while a NaN FPR ratio is ignored.
    """
    _check_agg(agg)
    c = to_numpy(counts)
    r_tpr, r_fpr = equal_opportunity_ratio(c, method), _fpr_ratio(c, method)
    if agg == "worst_case":
        return min(r_tpr, r_fpr)  # builtin min in fairlearn's [tpr, fpr] order (NaN handling)
    return _nanmean(r_tpr, r_fpr)


def accuracy_parity_gap(counts: GroupCounts, method: Method = "between_groups") -> float:
    """``MetricFrame(metrics=accuracy_score, ...).difference(method)`` from counts."""
    c = to_numpy(counts)
    return group_difference(group_accuracy(c), accuracy(c), c.n, method)


# --- Balancing Act (Hashemizadeh et al., ICLR 2024) --------------------------


def excess_accuracy_gap(dense_counts: GroupCounts, sparse_counts: GroupCounts) -> np.ndarray:
    """Per-group psi_g = (dense_acc_g - sparse_acc_g) - (dense_acc - sparse_acc).

    Positive psi_g: pruning hurt group g more than it hurt the whole dataset.
    Groups with n == 0 in either model's counts are NaN (excluded).
    """
    d, s = to_numpy(dense_counts), to_numpy(sparse_counts)
    if d.n.shape != s.n.shape:
        raise ValueError(f"group counts differ in shape: {d.n.shape} vs {s.n.shape}")
    psi = (_div(d.correct, d.n, math.nan) - _div(s.correct, s.n, math.nan)) - (
        accuracy(d) - accuracy(s))
    return np.where((d.n > 0) & (s.n > 0), psi, np.nan)


def _nanmax(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.max()) if v.size else math.nan


def _nanspread(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.max() - v.min()) if v.size else math.nan


def max_excess_accuracy_gap(dense_counts: GroupCounts, sparse_counts: GroupCounts) -> float:
    """max_g psi_g over present groups (the Balancing Act constraint target)."""
    return _nanmax(excess_accuracy_gap(dense_counts, sparse_counts))


def excess_accuracy_gap_spread(dense_counts: GroupCounts, sparse_counts: GroupCounts) -> float:
    """max_g psi_g - min_g psi_g over present groups."""
    return _nanspread(excess_accuracy_gap(dense_counts, sparse_counts))


# --- Ballot class-wise metrics -------------------------------------------------


def class_wise_variance(class_counts: GroupCounts) -> float:
    """CWV = mean_c (acc_c - acc)^2 over classes with n_c > 0; acc = overall accuracy."""
    c = to_numpy(class_counts)
    acc_c = group_accuracy(c)[c.n > 0]
    return float(np.mean((acc_c - accuracy(c)) ** 2)) if acc_c.size else math.nan


def max_class_discrepancy(class_counts: GroupCounts) -> float:
    """MCD = max_c acc_c - min_c acc_c over classes with n_c > 0."""
    return _nanspread(group_accuracy(class_counts))


# --- Every class vs the rest (multi-class targets) ------------------------------------


def per_class_parity(counts: ClassGroupCounts, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """DP and EO differences of every class vs the rest (fairlearn ``between_groups``, EO ``worst_case``).

    Returns ``demographic_parity_difference`` / ``equalized_odds_difference`` as ``{class: value}`` and their
    maxima over classes with the class that attains each (``..._max``, ``..._max_class``); NaN -> None.
    The value of class k equals the headline DP / EO of a run with ``--positive-class k``.
    """
    num_classes = np.shape(counts.pred)[1]
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(s) for s in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    out: dict[str, Any] = {}
    for key, fn in (("demographic_parity_difference", demographic_parity_difference),
                    ("equalized_odds_difference", equalized_odds_difference)):
        vals = np.array([fn(one_vs_rest(counts, k)) for k in range(num_classes)], np.float64)
        out[key] = {names[k]: _js(vals[k]) for k in range(num_classes)}
        finite = np.where(np.isnan(vals), -np.inf, vals)
        best = int(np.argmax(finite)) if np.isfinite(finite).any() else None
        out[f"{key}_max"] = None if best is None else _js(vals[best])
        out[f"{key}_max_class"] = None if best is None else names[best]
    return out


# --- Report ------------------------------------------------------------------------


def _js(x: Any) -> float | None:
    """JSON-safe float: NaN / inf -> None."""
    x = float(x)
    return x if math.isfinite(x) else None


def fairness_report(
    counts: GroupCounts,
    class_counts: GroupCounts | None = None,
    dense_counts: GroupCounts | None = None,
    group_names: Sequence[str] | None = None,
    class_group: ClassGroupCounts | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """All metrics as a JSON-serializable dict (NaN -> None).

    ``counts`` are the evaluated (e.g. pruned) model's group counts;
    ``class_counts`` (group id = class) add CWV / MCD; ``dense_counts`` (same
    rows, dense model) add the excess accuracy gap psi; ``class_group`` (same
    rows and model) adds DP / EO of every class vs the rest (``per_class_parity``).
    """
    c = to_numpy(counts)
    num_groups = c.n.shape[0]
    names = [str(i) for i in range(num_groups)] if group_names is None else [str(s) for s in group_names]
    if len(names) != num_groups:
        raise ValueError(f"{len(names)} group names for {num_groups} groups")

    acc_g, sel_g = group_accuracy(c), selection_rate(c)
    tpr_g, fpr_g, loss_g = true_positive_rate(c), false_positive_rate(c), group_mean_loss(c)
    rep: dict[str, Any] = {
        "n": int(round(float(c.n.sum()))),
        "accuracy": _js(accuracy(c)),
        "mean_loss": _js(mean_loss(c)),
        "selection_rate": _js(overall_selection_rate(c)),
        "tpr": _js(overall_true_positive_rate(c)),
        "fpr": _js(overall_false_positive_rate(c)),
        "groups": {
            names[i]: {"n": int(round(float(c.n[i]))), "accuracy": _js(acc_g[i]), "selection_rate": _js(sel_g[i]),
                       "tpr": _js(tpr_g[i]), "fpr": _js(fpr_g[i]), "mean_loss": _js(loss_g[i])}
            for i in range(num_groups)
        },
    }
    for name, fn in [("demographic_parity_difference", demographic_parity_difference),
                     ("demographic_parity_ratio", demographic_parity_ratio),
                     ("equal_opportunity_difference", equal_opportunity_difference),
                     ("equal_opportunity_ratio", equal_opportunity_ratio),
                     ("accuracy_parity_gap", accuracy_parity_gap)]:
        rep[name] = {m: _js(fn(c, m)) for m in _METHODS}
    for name, fn in [("equalized_odds_difference", equalized_odds_difference),
                     ("equalized_odds_ratio", equalized_odds_ratio)]:
        rep[name] = {m: {a: _js(fn(c, m, a)) for a in _AGGS} for m in _METHODS}
    if class_counts is not None:
        rep["class_wise_variance"] = _js(class_wise_variance(class_counts))
        rep["max_class_discrepancy"] = _js(max_class_discrepancy(class_counts))
    if dense_counts is not None:
        psi = excess_accuracy_gap(dense_counts, c)
        rep["excess_accuracy_gap"] = {
            "per_group": {names[i]: _js(psi[i]) for i in range(num_groups)},
            "max": _js(_nanmax(psi)),
            "spread": _js(_nanspread(psi)),
        }
    if class_group is not None:
        rep["per_class_parity"] = per_class_parity(class_group, class_names)
    return rep


__all__ = [
    "GroupCounts", "group_counts", "group_counts_jit", "per_class_counts", "add_counts",
    "zeros_counts", "psum_counts", "to_numpy", "accuracy", "group_accuracy", "mean_loss",
    "group_mean_loss", "selection_rate", "overall_selection_rate", "true_positive_rate",
    "overall_true_positive_rate", "false_positive_rate", "overall_false_positive_rate",
    "group_difference", "group_ratio", "demographic_parity_difference",
    "demographic_parity_ratio", "equal_opportunity_difference", "equal_opportunity_ratio",
    "equalized_odds_difference", "equalized_odds_ratio", "accuracy_parity_gap",
    "excess_accuracy_gap", "max_excess_accuracy_gap", "excess_accuracy_gap_spread",
    "class_wise_variance", "max_class_discrepancy", "fairness_report", "ClassGroupCounts",
    "class_group_counts", "one_vs_rest", "per_class_parity",
]
