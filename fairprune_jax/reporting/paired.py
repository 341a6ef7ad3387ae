"""Paired comparisons over seeds: every seed of a grid prunes one dense model with each entry, so the per-seed
difference ``entry - base`` removes the dense model's share of the seed-to-seed spread. The difference's mean
gets a Student-t 95% interval over the paired seeds and a verdict: ``lower`` / ``higher`` when the interval
excludes 0, ``not distinguishable`` when it includes 0, no interval with fewer than two paired seeds.

Used by a grid's ``results.md`` ("Paired differences": each entry against the grid's first entry) and by
``experiments/paired_seeds.py`` (any two entries, any column).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
from scipy import stats

LEVEL = 0.95
_YES = {"true": 1.0, "false": 0.0}


def number(v: Any) -> float | None:
    """A cell value as a float: None for a missing one; yes / no columns (True / False, as CSV text too) as 1 / 0."""
    if v is None or v == "" or v == "None":
        return None
    if isinstance(v, str) and v.lower() in _YES:
        return _YES[v.lower()]
    x = float(v)
    return None if math.isnan(x) else x


def _at(rows: Iterable[dict], entry: str, sparsity: float) -> dict[int, dict]:
    return {int(r["seed"]): r for r in rows
            if r["method"] == entry and math.isclose(float(r["sparsity"]), sparsity, rel_tol=0, abs_tol=1e-9)}


def paired(rows: list[dict], base: str, entry: str, metric: str, sparsity: float, level: float = LEVEL) -> dict:
    """``entry - base`` in ``metric`` at ``sparsity`` over the seeds both have (rows: one per cell, with
    ``method``, ``sparsity``, ``seed`` and the metric; numbers or CSV text). Returns the means over the paired
    seeds, the mean difference, its interval (NaN with fewer than 2 seeds) and verdict, the seeds where the
    entry is lower and where the two are equal, the seeds finished for one of the two only (``left_out``) and
    the paired seeds where either model is degenerate."""
    ra, rb = _at(rows, base, sparsity), _at(rows, entry, sparsity)
    a = {s: v for s, r in ra.items() if (v := number(r.get(metric))) is not None}
    b = {s: v for s, r in rb.items() if (v := number(r.get(metric))) is not None}
    seeds = sorted(set(a) & set(b))
    d = np.array([b[s] - a[s] for s in seeds])
    n = len(d)
    out = {"sparsity": sparsity, "metric": metric, "seeds": n,
           "base_mean": float(np.mean([a[s] for s in seeds])) if n else math.nan,
           "entry_mean": float(np.mean([b[s] for s in seeds])) if n else math.nan,
           "diff": float(d.mean()) if n else math.nan, "lo": math.nan, "hi": math.nan,
           "entry_lower": int(np.sum(d < 0)), "ties": int(np.sum(d == 0)), "left_out": sorted(set(a) ^ set(b)),
           "degenerate": [s for s in seeds if number(ra[s].get("degenerate")) or number(rb[s].get("degenerate"))],
           "verdict": "no interval (fewer than 2 paired seeds)"}
    if n >= 2:
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
        out["lo"], out["hi"] = out["diff"] - half, out["diff"] + half
        out["verdict"] = "lower" if out["hi"] < 0 else "higher" if out["lo"] > 0 else "not distinguishable"
    return out


def interval_text(p: dict) -> str:
    return "–" if math.isnan(p["lo"]) else f"[{p['lo']:+.4f}, {p['hi']:+.4f}]"


def paired_section(rows: list[dict], entries: list[str], sparsities: list[float], metrics: list[str],
                   label=lambda c: c) -> list[str]:
    """Markdown lines: each entry against the first of ``entries`` in each of ``metrics`` at each sparsity,
    where at least two seeds pair; empty when none does."""
    if len(entries) < 2:
        return []
    base, lines = entries[0], []
    for s in sparsities:
        for e in entries[1:]:
            for m in metrics:
                p = paired(rows, base, e, m, s)
                if p["seeds"] < 2:
                    continue
                note = "; degenerate in seed(s) " + ", ".join(map(str, p["degenerate"])) if p["degenerate"] else ""
                lines.append(f"| {e} | {s:g} | {label(m)} | {p['seeds']} | {p['diff']:+.4f} | {interval_text(p)} | "
                             f"{p['verdict']}{note} | {p['entry_lower']}/{p['seeds']} |")
    if not lines:
        return []
    return [f"## Paired differences (each entry minus `{base}`, over the seeds both ran)", "",
            f"Mean difference with its Student-t {LEVEL:.0%} interval over the paired seeds (one dense model per "
            "seed, shared); \"not distinguishable\" when the interval includes 0. Bold in the table above marks "
            "the best mean, which is a comparison only where the interval here excludes 0.", "",
            "| entry | sparsity | metric | seeds | difference | 95% interval | verdict | seeds lower |",
            "|---|---:|---|---:|---:|---|---|---:|", *lines, ""]


__all__ = ["LEVEL", "interval_text", "number", "paired", "paired_section"]
