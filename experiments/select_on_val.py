"""Choose a grid's setting on the validation split, so that the test split is read once.

Among the candidate entries of a finished ``fairprune compare`` grid (variants of one method with different
settings), pick the one with the lowest mean validation ``--metric`` (default: the certified max psi_g,
``val_psi_upper``; ``val_eo_diff`` / ``val_dp_diff`` for the binary parity gaps) whose mean validation
accuracy is within ``--accuracy-tolerance`` of the base entry's (``nft`` by default) and, with
``--cell-tolerance``, no cell's validation accuracy more than that below the base's cell of the same sparsity
and seed (a candidate that collapses in one cell is refused even when its mean passes). Only the ``val_*``
columns are read to choose; the chosen entry's test numbers are printed after the choice, once. Several grids
that differ in one setting (a budget) choose the setting too: each candidate is an entry of one grid, held to
its own grid's base::

    python experiments/select_on_val.py experiments/certify_v2_utkface_race.toml \
        --candidates ceag ceag_eps005 ceag_eps0
    python experiments/select_on_val.py experiments/bifp_adult_eo_select.toml --base structured_magnitude \
        --metric val_eo_diff --cell-tolerance 0.03 --candidates bifp bifp_logistic bifp_hinge bifp_tau02
    python experiments/select_on_val.py experiments/certify_v4_utkface_race_ft4.toml \
        experiments/certify_v4_utkface_race.toml experiments/certify_v4_utkface_race_ft8.toml \
        --candidates ceag_cert ceag_bound

The grid must hold a validation split (``val_fraction`` in its ``[dataset_options]``), so that its cells
carry ``pruned.val.certificate``. Every mean is over the cells (sparsity, seed) finished for the base and every
candidate, so the entries are compared on the same cells; cells finished for some entries only are left out
and named. A candidate with a degenerate cell (a near-constant classifier) where the base has none is refused.
``val_accuracy`` as ``--metric`` is higher-is-better; every other column lower-is-better. A tie on the metric
is said, and the first candidate listed among the tied ones is chosen.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from fairprune_jax.reporting.paired import number
from fairprune_jax.running.compare import load_config


HIGHER_IS_BETTER = ("val_accuracy",)


def _yes(v) -> bool:
    return bool(number(v))          # a results.csv yes / no cell (True / False, 1 / 0, or empty)


def means(rows: list[dict], entry: str, col: str, cells: set | None = None) -> float | None:
    """Mean of ``col`` over ``entry``'s rows (only the ``(sparsity, seed)`` cells in ``cells`` when given)."""
    vals = [float(r[col]) for r in rows if r["method"] == entry and r.get(col) not in (None, "", "None")
            and (cells is None or (r["sparsity"], r["seed"]) in cells)]
    return float(np.mean(vals)) if vals else None


def common_cells(rows: list[dict], entries: list[str], col: str) -> tuple[set, dict[str, list]]:
    """The ``(sparsity, seed)`` cells where every entry has ``col``, and per entry the cells it has beyond them."""
    have = {e: {(r["sparsity"], r["seed"]) for r in rows if r["method"] == e and r.get(col) not in (None, "", "None")}
            for e in entries}
    common = set.intersection(*have.values()) if have else set()
    return common, {e: sorted(c - common) for e, c in have.items() if c - common}


def candidates_of(config: str, a) -> tuple[list[tuple], dict] | int:
    """One grid's candidates as ``(label, accuracy, metric, ok)`` rows after its checks, and what the test read
    needs (its rows and cells); an exit status when the grid cannot be read."""
    cc = load_config(config)
    path = Path(cc.out) / "results.csv"
    if not path.exists():
        print(f"{path} not found: run `fairprune compare --config {config}` first", file=sys.stderr)
        return 2
    rows = list(csv.DictReader(path.open()))
    print(f"reading {path}")
    if means(rows, a.base, "val_accuracy") is None:
        print(f"no validation accuracy for {a.base!r}: does the grid hold a validation split?", file=sys.stderr)
        return 2
    for e in a.candidates:
        if means(rows, e, "val_accuracy") is None or means(rows, e, a.metric) is None:
            print(f"{e}: no finished cells with validation {a.metric}", file=sys.stderr)
            return 2
    entries = list(dict.fromkeys([a.base, *a.candidates]))
    cells, extra = common_cells(rows, entries, "val_accuracy")
    cells &= common_cells(rows, entries, a.metric)[0]
    for e, c in extra.items():
        print(f"  note: {e}'s cells {', '.join(f's{s} seed {d}' for s, d in c)} are left out (not finished for "
              "every entry); the means below are over the cells all entries share")
    if not cells:
        print("no cell is finished for the base and every candidate", file=sys.stderr)
        return 2
    bar = means(rows, a.base, "val_accuracy", cells)
    print(f"{a.base}: validation accuracy {bar:.4f} over {len(cells)} cells; candidates need >= "
          f"{bar - a.accuracy_tolerance:.4f}")
    by_cell = {(r["method"], r["sparsity"], r["seed"]): r for r in rows}
    base_cells = {c: float(by_cell[(a.base, *c)]["val_accuracy"]) for c in cells}
    sparsities = sorted({c[0] for c in cells}, key=float)
    table = []
    for e in a.candidates:
        acc, up = means(rows, e, "val_accuracy", cells), means(rows, e, a.metric, cells)
        worst = min(float(by_cell[(e, *c)]["val_accuracy"]) - base_cells[c] for c in cells)
        degenerate = sorted(c for c in cells if _yes(by_cell[(e, *c)].get("degenerate"))
                            and not _yes(by_cell[(a.base, *c)].get("degenerate")))
        why = []
        if acc < bar - a.accuracy_tolerance or (a.cell_tolerance is not None and worst < -a.cell_tolerance):
            why.append("too inaccurate")
        if degenerate:
            why.append(f"degenerate in {len(degenerate)} cell(s): "
                       + ", ".join(f"s{s} seed {d}" for s, d in degenerate))
        label = e if len(a.config) == 1 else f"{cc.name}:{e}"
        table.append((label, acc, up, not why, e))
        per = ", ".join(f"{s}: {means(rows, e, a.metric, {c for c in cells if c[0] == s}):.4f}" for s in sparsities)
        print(f"  {e:16s} validation accuracy {acc:.4f} (worst cell {worst:+.4f} vs {a.base}), validation "
              f"{a.metric} {up:.4f} (per sparsity {per})" + (f"  ({'; '.join(why)})" if why else ""))
    return table, {"rows": rows, "cells": cells}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="+", help="one grid, or several that differ in one setting (a budget): "
                    "each candidate is then an entry of one grid, held to its own grid's base")
    ap.add_argument("--candidates", nargs="+", required=True, help="grid entries to choose among")
    ap.add_argument("--base", default="nft", help="the entry whose validation accuracy sets the bar")
    ap.add_argument("--accuracy-tolerance", type=float, default=0.01)
    ap.add_argument("--metric", default="val_psi_upper", help="a val_* column of results.csv, lower is better")
    ap.add_argument("--cell-tolerance", type=float, default=None,
                    help="refuse a candidate with any cell this far below the base's cell in validation accuracy")
    a = ap.parse_args(argv)
    if not a.metric.startswith("val_"):
        ap.error(f"--metric must be a validation column (val_*), got {a.metric!r}: the test split is not read to "
                 "choose")
    table, grids = [], {}
    for config in a.config:
        got = candidates_of(config, a)
        if isinstance(got, int):
            return got
        for t in got[0]:
            grids[t[0]] = got[1]
        table += got[0]
    higher = a.metric in HIGHER_IS_BETTER
    ok = [t for t in table if t[3]]
    if not ok:
        print("no candidate is accurate enough and non-degenerate", file=sys.stderr)
        return 1
    best = (max if higher else min)(t[2] for t in ok)
    tied = [t for t in ok if abs(t[2] - best) <= 1e-12]
    chosen = tied[0]
    if len(tied) > 1:
        print(f"tie on validation {a.metric} ({best:.4f}) between {', '.join(t[0] for t in tied)}: the first listed "
              "is chosen")
    print(f"chosen on validation ({'highest' if higher else 'lowest'} {a.metric}): {chosen[0]}")
    rows, cells, entry = grids[chosen[0]]["rows"], grids[chosen[0]]["cells"], chosen[4]
    test_col = "test_" + a.metric[len("val_"):]
    print(f"its test numbers (read once, same {len(cells)} cells): accuracy "
          f"{means(rows, entry, 'test_accuracy', cells):.4f}, {test_col} {means(rows, entry, test_col, cells):.4f} "
          f"(base {a.base}: {means(rows, a.base, test_col, cells):.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
