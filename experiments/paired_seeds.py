"""Paired per-seed comparison of two methods of one compare grid.

Every seed of a grid prunes the same dense model with each method, so the
per-seed difference ``method - base`` removes the dense model's share of the
seed-to-seed spread. For each sparsity this prints the two means, the mean
difference with its Student-t interval over the seeds, and in how many seeds
the method is lower (better, for a disparity metric)::

    python experiments/paired_seeds.py experiments/bifp_digits_seeds.toml \
        --base structured_magnitude --method bifp --metric test_mcd --metric test_accuracy

The grid must be finished for both methods (``fairprune compare --config ...``);
seeds missing for either method are left out and counted.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np
from scipy import stats

from fairprune_jax.running.compare import load_config


def paired(rows: list[dict], base: str, method: str, metric: str, sparsity: float) -> dict:
    """Per-seed values of both methods at one sparsity and the paired difference's summary."""
    def by_seed(m):
        return {int(r["seed"]): float(r[metric]) for r in rows
                if r["method"] == m and math.isclose(float(r["sparsity"]), sparsity) and r.get(metric) not in ("", None)}
    a, b = by_seed(base), by_seed(method)
    seeds = sorted(set(a) & set(b))
    d = np.array([b[s] - a[s] for s in seeds])
    n = len(d)
    out = {"sparsity": sparsity, "seeds": n, "base_mean": float(np.mean([a[s] for s in seeds])) if n else math.nan,
           "method_mean": float(np.mean([b[s] for s in seeds])) if n else math.nan,
           "diff": float(d.mean()) if n else math.nan, "lo": math.nan, "hi": math.nan,
           "method_lower": int(np.sum(d < 0)), "ties": int(np.sum(d == 0))}
    if n >= 2:
        half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
        out["lo"], out["hi"] = out["diff"] - half, out["diff"] + half
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a compare grid's TOML file (its results.csv is read)")
    ap.add_argument("--base", required=True, help="the reference method (a method or variant name of the grid)")
    ap.add_argument("--method", required=True, help="the method compared against it")
    ap.add_argument("--metric", action="append", required=True, help="a results.csv column; repeatable")
    args = ap.parse_args(argv)
    cc = load_config(args.config)
    csv_path = Path(cc.out) / "results.csv"
    if not csv_path.exists():
        raise SystemExit(f"{csv_path} does not exist: run `fairprune compare --config {args.config}` first")
    rows = list(csv.DictReader(csv_path.open()))
    for name in (args.base, args.method):
        if not any(r["method"] == name for r in rows):
            raise SystemExit(f"{name!r} has no rows in {csv_path}; methods there: "
                             f"{', '.join(sorted({r['method'] for r in rows}))}")
    for metric in args.metric:
        if metric not in rows[0]:
            raise SystemExit(f"{metric!r} is not a column of {csv_path}")
        print(f"\n{metric}: {args.method} - {args.base}, paired over seeds (95% t-interval)\n")
        print(f"| sparsity | seeds | {args.base} | {args.method} | difference | 95% interval | seeds lower |")
        print("|---:|---:|---:|---:|---:|---|---:|")
        for s in cc.sparsities:
            p = paired(rows, args.base, args.method, metric, s)
            print(f"| {s:g} | {p['seeds']} | {p['base_mean']:.4f} | {p['method_mean']:.4f} | {p['diff']:+.4f} | "
                  f"[{p['lo']:+.4f}, {p['hi']:+.4f}] | {p['method_lower']}/{p['seeds']} |")


if __name__ == "__main__":
    main()
