"""From finished cells to rows: one row per (method, sparsity, seed) with every column of :data:`METRICS` read
from the cell's ``results.json``, the dense model's row, the mean and std over seeds (:func:`aggregate`), a
constrained run's summary (did its multipliers ever move), the degenerate check for cells older than the flag,
and the small-group marks (:func:`small_marks`: which values rest on a group with too few rows).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fairprune_jax.core.config import RunConfig
from fairprune_jax.reporting import tables
from fairprune_jax.running.grid import DERIVED_COLUMNS, FLAG_COLUMNS, METRICS, CompareConfig


def _get(d: dict, path: tuple) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _small_ends(values: dict[str, float | None], rows: dict[str, int], limit: int, ends: str,
                present: set[str] | None = None) -> bool:
    """Does the maximum (``ends="max"``) or either end of max - min (``"range"``) rest on small groups only?

    ``values``: group -> value (None: absent). An end is small when every group that attains it has fewer than
    ``limit`` rows (``rows``: the count that decides the value): a tie with a large group means the value does
    not depend on the small one. ``present``: the groups in the split (default: those with a count above 0); a
    group present with a count of 0 (a TPR of a group without positives) is as small as a group can be.
    """
    vals = {g: v for g, v in values.items() if v is not None
            and (rows.get(g, 0) > 0 if present is None else g in present)}
    if not vals:
        return False
    picks = [max(vals.values())] + ([min(vals.values())] if ends == "range" else [])
    return any(all(rows.get(g, 0) < limit for g, v in vals.items() if abs(v - x) <= 1e-12) for x in picks)


def small_marks(cell: dict, which: str = "pruned") -> dict[str, bool]:
    """Column -> True where the cell's value of a per-group-derived column rests on a small group: a group
    with fewer rows of the column's split than the run's ``small_group`` threshold. The attaining group of a
    maximum (max psi_g, psi_g upper bound), either end of a max - min gap (psi_g spread, group accuracy gap,
    DP and EO differences: EO's worst side, counted in positives for a TPR and negatives for an FPR), any
    group for the certified share, a violated group for the
    violated-group count. The within-tolerance columns follow their max psi_g. When the groups are the
    classes, MCD follows the group accuracy gap and CWV is starred when any class is small."""
    limit = int((cell.get("config") or {}).get("small_group", RunConfig.small_group))
    out: dict[str, bool] = {}
    for split in ("train", "test"):
        rep = (cell.get(which) or {}).get(split)
        if not rep:
            continue
        groups = rep.get("groups") or {}
        rows = {g: int(v.get("n") or 0) for g, v in groups.items()}

        def field(key: str) -> dict[str, float | None]:
            return {g: v.get(key) for g, v in groups.items()}
        psi = (rep.get("excess_accuracy_gap") or {}).get("per_group")
        if psi:
            out[f"{split}_max_psi"] = out[f"{split}_psi_within_tol"] = _small_ends(psi, rows, limit, "max")
            out[f"{split}_psi_spread"] = _small_ends(psi, rows, limit, "range")
        if split != "test":
            continue
        out["test_group_acc_gap"] = _small_ends(field("accuracy"), rows, limit, "range")
        if tables.groups_are_classes(cell):       # MCD is the group accuracy gap; CWV spreads over every class
            out["test_mcd"] = out["test_group_acc_gap"]
            out["test_cwv"] = any(0 < n < limit for n in rows.values())
        out["test_dp_diff"] = _small_ends(field("selection_rate"), rows, limit, "range")
        eo = rep.get("equalized_odds_difference", {}).get("between_groups", {})
        tpr = {g: v for g, v in field("tpr").items() if v is not None and rows[g] > 0}
        fpr = {g: v for g, v in field("fpr").items() if v is not None and rows[g] > 0}
        if tpr and fpr and eo.get("worst_case") is not None:
            tpr_gap, fpr_gap = max(tpr.values()) - min(tpr.values()), max(fpr.values()) - min(fpr.values())
            # a TPR rests on the group's positives, an FPR on its negatives: properties of the test rows, the
            # same for the dense and the pruned model (:func:`_positives`)
            pos, neg = _positives(cell, groups)
            here = {g for g in rows if rows[g] > 0}
            sides = [_small_ends(tpr, pos, limit, "range", here) if abs(tpr_gap - eo["worst_case"]) <= 1e-12
                     else None,
                     _small_ends(fpr, neg, limit, "range", here) if abs(fpr_gap - eo["worst_case"]) <= 1e-12
                     else None]
            sides = [x for x in sides if x is not None]
            out["test_eo_diff"] = bool(sides) and all(sides)
        cert = rep.get("certificate")
        if cert:
            limit_c = int(cert.get("small_group_rows", limit))
            tested = {g: v for g, v in cert["groups"].items() if v.get("verdict") is not None}
            out["test_certified_share"] = any(v["small"] for v in tested.values())
            out["test_violated_groups"] = out["no_violated_group"] = any(
                v["small"] for v in tested.values() if v["verdict"] == "violated")
            out["test_psi_upper"] = _small_ends({g: v.get("upper", v["high"]) for g, v in tested.items()},
                                                {g: v["n"] for g, v in tested.items()}, limit_c, "max")
    return {k: v for k, v in out.items() if v}


def _positives(cell: dict, groups: dict) -> tuple[dict[str, int], dict[str, int]]:
    """Each test group's positives and negatives: recorded by the certificate (version 2 on) of either model's
    report (the dense model has none; the rows are the same), else solved from the group's rates (``n``,
    selection rate, TPR, FPR: ``sr n = tpr P + fpr (n - P)``) where the TPR and the FPR differ, else its rows."""
    cg = {}
    for which in ("pruned", "dense"):
        cg = ((((cell.get(which) or {}).get("test") or {}).get("certificate") or {}).get("groups") or {})
        if any("positives" in v for v in cg.values()):
            break
    pos, neg = {}, {}
    for g, v in groups.items():
        n = int(v.get("n") or 0)
        if "positives" in cg.get(g, {}):
            pos[g], neg[g] = int(cg[g]["positives"]), int(cg[g]["negatives"])
            continue
        sr, tpr, fpr = v.get("selection_rate"), v.get("tpr"), v.get("fpr")
        p = None
        if None not in (sr, tpr, fpr) and abs(tpr - fpr) > 1e-9:
            p = round(n * (sr - fpr) / (tpr - fpr))
        pos[g], neg[g] = (p, n - p) if p is not None and 0 <= p <= n else (n, n)
    return pos, neg


def constant_classifier(cell: dict) -> bool | None:
    """For cells written before the degenerate flag existed: does the pruned model predict one class for every
    test row? Decidable from what such cells hold for a binary target (every group's positive-prediction rate
    is the same 0 or 1) and when the groups are the classes (one class entirely right, every other entirely
    wrong); None otherwise."""
    rep = cell["pruned"]["test"]
    groups = [g for g in (rep.get("groups") or {}).values() if g.get("n")]
    if not groups:
        return None
    if len(cell.get("classes") or []) == 2:
        rates = {g.get("selection_rate") for g in groups}
        return None if None in rates else bool(len(rates) == 1 and rates <= {0.0, 1.0})
    if tables.groups_are_classes(cell):
        accs = [g.get("accuracy") for g in groups]
        return None if None in accs else bool(sum(a == 1.0 for a in accs) == 1 and
                                             all(a in (0.0, 1.0) for a in accs))
    return None


def dense_row(r: dict) -> dict:
    """The dense model's value of every metric column of a cell (psi and certificate columns: None)."""
    row = {col: _get(r["dense"].get(split, {}), path) for col, (split, path) in METRICS.items()}
    row["dense_test_accuracy"] = r["dense"]["test"]["accuracy"]
    return row


def aggregate_dense(rows: list[dict]) -> dict | None:
    """Mean and std over seeds of the dense models (one row per seed), shaped like an aggregate row."""
    if not rows:
        return None
    out: dict[str, Any] = {"method": "dense", "sparsity": 0.0, "n_seeds": len(rows),
                           "small": {c: True for r in rows for c in (r.get("small") or {})}}
    for c in list(METRICS) + ["dense_test_accuracy"]:
        vals = np.array([float(r[c]) for r in rows if r.get(c) is not None], dtype=float)
        out[c] = {"mean": float(vals.mean()) if vals.size else None,
                  "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0 if vals.size else None,
                  "n": int(vals.size)}
    return out


def constraint_summary(r: dict) -> dict | None:
    """A constrained run's settings and whether its constraints acted: eps, where psi_g was read, the largest
    multiplier over the run (0: the constraints never acted, the run is plain fine-tuning) and its warnings."""
    info = r.get("method_info") or {}
    if "multipliers" not in info and "trajectory" not in info:
        return None
    traj = info.get("trajectory") or {}
    vals = [abs(v) for row in traj.get("multipliers", []) for v in row if v is not None]
    vals += [abs(v) for v in np.ravel(info.get("multipliers") or []) if v is not None]
    return {"eps": info.get("eps"), "constraint_data": info.get("constraint_data"),
            "max_multiplier": max(vals) if vals else None,
            "warnings": [w for w in info.get("warnings", []) if isinstance(w, str)]}


def aggregate(rows: list[dict], cc: CompareConfig) -> list[dict]:
    out = []
    cols = list(METRICS) + DERIVED_COLUMNS + FLAG_COLUMNS
    cols += ["train_psi_within_tol", "test_psi_within_tol"] if cc.tolerance is not None else []
    for s in cc.sparsities:
        for m in cc.methods:
            sel = [r for r in rows if r["method"] == m and r["sparsity"] == s]
            if not sel:
                continue
            a: dict[str, Any] = {"method": m, "sparsity": s, "n_seeds": len(sel),
                                 "small": {c: True for r in sel for c in (r.get("small") or {})}}
            for c in cols:
                vals = np.array([float(r[c]) for r in sel if r.get(c) is not None], dtype=float)
                a[c] = {"mean": float(vals.mean()) if vals.size else None,   # n: seeds where it is known
                        "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0 if vals.size else None,
                        "n": int(vals.size)}
            out.append(a)
    return out
