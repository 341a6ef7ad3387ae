"""The certificate's coverage, measured: :func:`coverage_simulation` draws paired test splits from known
per-group lost / gained rates and counts how often the intervals of :mod:`fairprune_jax.metrics.certify`
hold the true psi_g (family-wise, per group, the certified max and each group's one-sided bound) and how
often a group at psi_g = eps is wrongly declared to hold. ``tests/test_certify.py`` runs it over the regimes
users hit; ``experiments/certify_coverage.py`` writes the table of ``docs/CERTIFICATE.md``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fairprune_jax.metrics.certify import psi_intervals, psi_upper_bounds


def coverage_simulation(sizes: Sequence[int], lost_rate: Sequence[float], gained_rate: Sequence[float], *,
                        level: float = 0.95, eps: float | None = None, draws: int = 2000, seed: int = 0,
                        method: str = "mover", intervals=None) -> dict[str, float]:
    """Monte Carlo check of the psi_g intervals on known per-group (lost, gained) rates.

    Draws ``draws`` paired test splits (each group's rows multinomial over lost / gained / unchanged) and
    returns the family-wise coverage (every group's interval holds its true psi_g), the worst per-group
    coverage and the mean width; and for the certified max psi_g (:func:`psi_upper_bounds`), how often it is
    at or above the true max psi_g (``max_coverage``) and the worst group's one-sided coverage of its own
    bound (``min_upper_coverage``, the property the max bound rests on). With ``eps``, group 0's lost rate
    is moved so that its true psi_g equals ``eps``, ``false_holds`` is how often it is declared ``holds``
    and, where group 0 then has the largest psi_g, ``false_all_hold`` how often every group is certified
    at once (both should be at most 1 - level).
    ``intervals(n, lost, gained, level) -> (psi, low, high)`` replaces :func:`psi_intervals` (to measure
    another construction the same way).
    """
    rng = np.random.default_rng(seed)
    n = np.asarray(sizes, np.int64)
    b = np.broadcast_to(np.asarray(lost_rate, np.float64), n.shape).copy()
    c = np.broadcast_to(np.asarray(gained_rate, np.float64), n.shape).copy()
    w = n / n.sum()
    for name, r in (("lost_rate", b), ("gained_rate", c)):
        if not np.all((r >= 0) & (r <= 1)):
            raise ValueError(f"coverage_simulation: every {name} must be in [0, 1]; got {r.tolist()}")
    if np.any(b + c > 1 + 1e-9):
        raise ValueError(f"coverage_simulation: a group's lost + gained rate exceeds 1: "
                         f"{(b + c).round(6).tolist()}")
    if eps is not None:
        rest = np.sum(w[1:] * (b[1:] - c[1:]))
        b[0] = c[0] + (eps + rest) / (1 - w[0])
        if not 0.0 <= b[0] <= 1.0 - c[0]:
            raise ValueError(f"no lost rate puts group 0 at psi = {eps} with these rates (needs {b[0]:.3f})")
    d = b - c
    psi_true = d - np.sum(w * d)
    probs = np.stack([b, c, np.clip(1.0 - b - c, 0.0, 1.0)], axis=-1)     # 1 - 0.9 - 0.1 is -3e-17
    probs /= probs.sum(-1, keepdims=True)
    cells = rng.multinomial(n[None, :], probs[None, :, :], size=(draws, len(n)))
    args = (n.astype(np.float64), cells[..., 0].astype(np.float64), cells[..., 1].astype(np.float64), level)
    _, lo, hi = psi_intervals(*args, method=method) if intervals is None else intervals(*args)
    tol = 1e-12
    covered = (lo <= psi_true + tol) & (psi_true - tol <= hi)
    out = {"family_coverage": float(covered.all(-1).mean()), "min_group_coverage": float(covered.mean(0).min()),
           "mean_width": float(np.mean(hi - lo)), "draws": int(draws)}
    if intervals is None:
        upper = psi_upper_bounds(*args, method=method)
        out["max_coverage"] = float(np.mean(psi_true.max() - tol <= upper.max(-1)))
        out["min_upper_coverage"] = float(np.mean(psi_true - tol <= upper, axis=0).min())
        out["mean_max_bound"] = float(np.mean(upper.max(-1)))
    if eps is not None:
        out["false_holds"] = float(np.mean(hi[:, 0] <= eps))
        if intervals is None and psi_true[0] >= psi_true.max() - tol:
            out["false_all_hold"] = float(np.mean(upper.max(-1) <= eps))
    return out
