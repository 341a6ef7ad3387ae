"""Paired per-seed comparison of two methods of one compare grid.

Every seed of a grid prunes the same dense model with each method, so the per-seed difference ``method - base``
removes the dense model's share of the seed-to-seed spread. For each sparsity this prints the two means over the
paired seeds, the mean difference with its Student-t 95% interval over them, the verdict (``lower`` / ``higher``
when the interval excludes 0, ``not distinguishable`` when it includes 0, ``no interval`` with fewer than two
paired seeds), in how many seeds the method is lower (better, for a disparity metric) and in how many the two
are equal (``fairprune_jax.reporting.paired``, which also writes a grid's "Paired differences")::

    python experiments/paired_seeds.py experiments/bifp_digits_seeds.toml \\
        --base structured_magnitude --method bifp --metric test_mcd --metric test_accuracy

The grid must be finished for both methods (``fairprune compare --config ...``; ``--out`` where it was written
elsewhere). Seeds finished for only one of the two are left out and named; a seed where either model is
degenerate (a near-constant classifier) is named, and so is a difference resting on a small group (the grid's
``*``); yes / no columns (``degenerate``, ``no_violated_group``) count as 1 / 0.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from fairprune_jax.reporting.paired import interval_text, paired
from fairprune_jax.running.compare import load_config


def small_marked(grid: Path, methods: tuple[str, str], metric: str, sparsity: float) -> bool:
    """Does the grid's table star ``metric`` for either method at ``sparsity`` (a value resting on a small
    group in some seed)? Read from the grid's ``results.json``; False when it has no marks."""
    path = grid / "results.json"
    if not path.exists():
        return False
    agg = json.loads(path.read_text()).get("aggregate") or []
    return any((r.get("small") or {}).get(metric) for r in agg
               if r.get("method") in methods and math.isclose(float(r.get("sparsity", -1)), sparsity))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a compare grid's TOML file (its results.csv is read)")
    ap.add_argument("--base", required=True, help="the reference method (a method or variant name of the grid)")
    ap.add_argument("--method", required=True, help="the method compared against it")
    ap.add_argument("--metric", action="append", required=True, help="a results.csv column; repeatable")
    ap.add_argument("--out", default=None, help="the grid's folder, where `fairprune compare --out` put it "
                                                "(default: the TOML's out)")
    args = ap.parse_args(argv)
    cc = load_config(args.config)
    grid = Path(args.out) if args.out else Path(cc.out)
    csv_path = grid / "results.csv"
    if not csv_path.exists():
        raise SystemExit(f"{csv_path} does not exist: run `fairprune compare --config {args.config}` first")
    rows = list(csv.DictReader(csv_path.open()))
    print(f"reading {csv_path}")
    for name in (args.base, args.method):
        if not any(r["method"] == name for r in rows):
            raise SystemExit(f"{name!r} has no rows in {csv_path}; methods there: "
                             f"{', '.join(sorted({r['method'] for r in rows}))}")
    for metric in args.metric:
        if metric not in rows[0]:
            raise SystemExit(f"{metric!r} is not a column of {csv_path}")
        print(f"\n{metric}: {args.method} - {args.base}, paired over seeds (95% t-interval)\n")
        print(f"| sparsity | seeds | {args.base} | {args.method} | difference | 95% interval | verdict "
              "| seeds lower | ties |")
        print("|---:|---:|---:|---:|---:|---|---|---:|---:|")
        notes = []
        for s in cc.sparsities:
            p = paired(rows, args.base, args.method, metric, s)
            star = " *" if small_marked(grid, (args.base, args.method), metric, s) else ""
            print(f"| {s:g} | {p['seeds']} | {p['base_mean']:.4f} | {p['entry_mean']:.4f} | {p['diff']:+.4f}{star} "
                  f"| {interval_text(p)} | {p['verdict']} | {p['entry_lower']}/{p['seeds']} | {p['ties']} |")
            if p["left_out"]:
                notes.append(f"at {s:g}, seed(s) {', '.join(map(str, p['left_out']))} left out: finished for one "
                             "of the two methods only")
            if p["degenerate"]:
                notes.append(f"at {s:g}, seed(s) {', '.join(map(str, p['degenerate']))}: a degenerate model "
                             "(near-constant classifier) on either side")
            if star:
                notes.append(f"at {s:g}, `*`: in some seed the value rests on a small group (few rows, positives "
                             "or negatives): mostly noise")
        for n in notes:
            print(f"- {n}")


if __name__ == "__main__":
    main()
