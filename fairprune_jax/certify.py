"""Per-group certificates: what a pruned model promises, with confidence intervals and a verdict.

A fair-pruning run promises, per group g, that the excess accuracy gap
psi_g = (dense_acc_g - pruned_acc_g) - (dense_acc - pruned_acc) is at most
eps. A number measured on a finite test split cannot prove that on its own:
this module turns the test predictions of the dense and the pruned model into
simultaneous confidence intervals and a verdict per group:

* ``holds``: the interval's upper end is <= eps;
* ``violated``: its lower end is > eps;
* ``undetermined``: the interval straddles eps (typically: too few rows).

Intervals (family-wise level ``level`` over the groups, Bonferroni):

* group accuracy: Wilson score interval;
* psi_g: paired. Row i of group h contributes d_i = dense_correct_i -
  pruned_correct_i in {-1, 0, 1}; D_h is their mean and psi_g = D_g -
  sum_h (n_h / n) D_h, a linear combination of independent per-group paired
  differences (group sizes held fixed, i.e. conditional on the test split's
  composition). Each D_h uses the Agresti-Min adjustment for matched
  proportions (half a row added to each cell of the 2x2 dense x pruned
  table), which keeps the variance positive for small or unchanged groups;
  the interval is the adjusted estimate +- z * SE. Deterministic, no
  resampling; the coverage is checked by simulation in the tests.
* demographic-parity and equalized-odds differences (between groups, worst
  case): simultaneous Wilson intervals of every group's selection rate (TPR,
  FPR), and the range of max - min over that box. Conservative by
  construction. A verdict is given only against an explicit bound.

Everything here is host-side numpy over additive counts; :func:`paired_counts`
is the jittable accumulation (one ``segment_sum``), summed over batches and
devices like :class:`fairness.GroupCounts`.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax import fairness

#: Groups with fewer test rows than this are marked ``small`` in every table.
SMALL_GROUP_ROWS = 30
#: A model whose most frequent prediction takes at least this share of the rows is flagged ``degenerate``.
DEGENERATE_SHARE = 0.98
VERDICTS = ("holds", "violated", "undetermined")


# ---------------------------------------------------------------------------
# Accumulation (device side)
# ---------------------------------------------------------------------------


def paired_counts(dense_logits: jax.Array, pruned_logits: jax.Array, y: jax.Array, g: jax.Array, w: jax.Array,
                  num_groups: int, num_classes: int) -> dict[str, jax.Array]:
    """Per-group discordant pairs and per-class prediction counts of one batch (jittable, additive).

    ``lost[g]``: rows of g the dense model gets right and the pruned one wrong;
    ``gained[g]``: the reverse; ``pred_hist`` / ``dense_pred_hist``: how many
    rows each class is predicted for. ``w`` = 0 marks padding rows.
    """
    dc = (jnp.argmax(dense_logits, -1) == y).astype(jnp.float32)
    pc_pred = jnp.argmax(pruned_logits, -1)
    pc = (pc_pred == y).astype(jnp.float32)
    w = w.astype(jnp.float32)
    cols = jnp.stack([w * dc * (1 - pc), w * (1 - dc) * pc], axis=1)
    by_group = jax.ops.segment_sum(cols, g.astype(jnp.int32), num_segments=num_groups)
    hist = jax.ops.segment_sum(w, pc_pred.astype(jnp.int32), num_segments=num_classes)
    dense_hist = jax.ops.segment_sum(w, jnp.argmax(dense_logits, -1).astype(jnp.int32), num_segments=num_classes)
    return {"lost": by_group[:, 0], "gained": by_group[:, 1], "pred_hist": hist, "dense_pred_hist": dense_hist}


# ---------------------------------------------------------------------------
# Intervals (host side)
# ---------------------------------------------------------------------------


def z_value(level: float, comparisons: int = 1) -> float:
    """Two-sided normal quantile for a family-wise ``level`` over ``comparisons`` intervals (Bonferroni)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1); got {level}")
    alpha = (1.0 - level) / max(int(comparisons), 1)
    return NormalDist().inv_cdf(1.0 - alpha / 2.0)


def wilson_interval(k: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for k successes out of n (n = 0 gives [0, 1])."""
    k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
    safe = np.maximum(n, 1e-12)
    p = k / safe
    den = 1.0 + z * z / safe
    centre = (p + z * z / (2 * safe)) / den
    half = z * np.sqrt(np.maximum(p * (1 - p) / safe + z * z / (4 * safe * safe), 0.0)) / den
    low, high = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    empty = n <= 0
    return np.where(empty, 0.0, low), np.where(empty, 1.0, high)


def psi_intervals(n: np.ndarray, lost: np.ndarray, gained: np.ndarray, z: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point estimate and interval of psi_g for every group from paired per-group counts.

    ``n``, ``lost``, ``gained``: (G,) rows, dense-right/pruned-wrong and
    dense-wrong/pruned-right rows per group. Groups with n = 0 are NaN and do
    not enter the overall accuracy.
    """
    n, lost, gained = (np.asarray(a, np.float64) for a in (n, lost, gained))
    present = n > 0
    total = n.sum()
    wgt = np.where(present, n / max(total, 1e-12), 0.0)
    d = np.where(present, (lost - gained) / np.maximum(n, 1e-12), 0.0)
    psi = np.where(present, d - np.sum(wgt * d), np.nan)
    # Agresti-Min: half a row in each cell of the paired 2x2 table
    na = n + 2.0
    pb, pc = (lost + 0.5) / na, (gained + 0.5) / na
    d_adj = np.where(present, pb - pc, 0.0)
    var = np.where(present, (pb + pc - (pb - pc) ** 2) / na, 0.0)
    centre = d_adj - np.sum(wgt * d_adj)
    # Var(psi_g) = (1 - w_g)^2 V_g + sum_{h != g} w_h^2 V_h
    var_psi = (1 - wgt) ** 2 * var + (np.sum(wgt ** 2 * var) - wgt ** 2 * var)
    half = z * np.sqrt(var_psi)
    return psi, np.where(present, centre - half, np.nan), np.where(present, centre + half, np.nan)


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


def certificate(counts: fairness.GroupCounts, dense_counts: fairness.GroupCounts, lost: np.ndarray,
                gained: np.ndarray, *, eps: float, level: float = 0.95, group_names: Sequence[str] | None = None,
                fairness_bound: float | None = None, small_group: int = SMALL_GROUP_ROWS) -> dict[str, Any]:
    """The per-group certificate of a pruned model on one split (see the module docstring).

    ``counts`` / ``dense_counts``: the pruned and dense model's group counts on
    the same rows; ``lost`` / ``gained``: their paired discordant counts
    (:func:`paired_counts` summed over the split). ``eps``: the psi bound;
    ``fairness_bound``: if given, DP and EO differences get a verdict too.
    """
    c, dc = fairness.to_numpy(counts), fairness.to_numpy(dense_counts)
    G = c.n.shape[0]
    names = [str(i) for i in range(G)] if group_names is None else [str(s) for s in group_names]
    present = c.n > 0
    m = int(present.sum())
    z = z_value(level, m)
    acc_lo, acc_hi = wilson_interval(c.correct, c.n, z)
    psi, lo, hi = psi_intervals(c.n, lost, gained, z)
    verdict = verdicts(lo, hi, eps)
    groups = {}
    for i, name in enumerate(names):
        if not present[i]:
            groups[name] = {"n": 0, "small": True, "verdict": None}
            continue
        groups[name] = {"n": int(round(c.n[i])), "small": bool(c.n[i] < small_group),
                        "accuracy": float(c.correct[i] / c.n[i]), "accuracy_low": float(acc_lo[i]),
                        "accuracy_high": float(acc_hi[i]),
                        "dense_accuracy": float(dc.correct[i] / dc.n[i]) if dc.n[i] > 0 else None,
                        "psi": float(psi[i]), "low": float(lo[i]), "high": float(hi[i]), "verdict": verdict[i]}
    by = {v: [n for n in names if groups[n]["verdict"] == v] for v in VERDICTS}
    # DP: one rate per group; EO (worst case): TPR and FPR per group, 2m intervals
    z_dp, z_eo = z_value(level, m), z_value(level, 2 * m)
    sel_lo, sel_hi = wilson_interval(c.pred_pos, c.n, z_dp)
    tpr_lo, tpr_hi = wilson_interval(c.tp, c.pos, z_eo)
    fpr_lo, fpr_hi = wilson_interval(c.fp, c.neg, z_eo)
    dp = _range_interval(sel_lo, sel_hi, present)
    t_lo, t_hi = _range_interval(tpr_lo, tpr_hi, present)
    f_lo, f_hi = _range_interval(fpr_lo, fpr_hi, present)
    highs = [float(hi[i]) for i in range(G) if present[i]]
    return {
        "level": level, "eps": eps, "groups_tested": m, "small_group_rows": small_group,
        "interval": "psi: paired Agresti-Min-adjusted Wald; accuracy and rates: Wilson; Bonferroni over groups",
        "groups": groups,
        "holds": len(by["holds"]), "violated": len(by["violated"]), "undetermined": len(by["undetermined"]),
        "violated_groups": by["violated"], "undetermined_groups": by["undetermined"],
        "small_groups": [n for n in names if present[names.index(n)] and groups[n]["small"]],
        "certified_share": len(by["holds"]) / m if m else None,
        "worst_upper": max(highs) if highs else None,
        "demographic_parity_difference": _diff_entry(fairness.demographic_parity_difference(c), *dp,
                                                     fairness_bound),
        "equalized_odds_difference": _diff_entry(fairness.equalized_odds_difference(c), max(t_lo, f_lo),
                                                 max(t_hi, f_hi), fairness_bound),
    }


def summary_line(cert: dict) -> str:
    """One line for a terminal: how many groups are certified, and which are not."""
    m = cert["groups_tested"]
    parts = [f"certified (psi_g <= {cert['eps']:g}) for {cert['holds']} of {m} groups at "
             f"{cert['level']:.0%}"]
    if cert["violated_groups"]:
        parts.append("violated: " + ", ".join(cert["violated_groups"][:8])
                     + (" ..." if len(cert["violated_groups"]) > 8 else ""))
    if cert["undetermined_groups"]:
        parts.append("undetermined: " + ", ".join(cert["undetermined_groups"][:8])
                     + (" ..." if len(cert["undetermined_groups"]) > 8 else ""))
    return "; ".join(parts)


__all__ = ["SMALL_GROUP_ROWS", "DEGENERATE_SHARE", "VERDICTS", "paired_counts", "z_value", "wilson_interval",
           "psi_intervals", "verdicts", "prediction_summary", "certificate", "summary_line"]
