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
candidate (in every grid, when several are given), so the entries are compared on the same cells; cells
finished for some entries or grids only are left out and named. Grids that share a name are told apart by
their config paths; the same grid given twice is refused. A candidate with a degenerate cell (a near-constant classifier) where the base has none is refused.
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


def common_cells(rows: list[dict], entries: list[str], cols: tuple[str, ...]) -> tuple[set, dict[str, list]]:
    """The ``(sparsity, seed)`` cells where every entry has every column of ``cols``, and per entry the cells it
    has (with all of them) beyond those."""
    have = {e: {(r["sparsity"], r["seed"]) for r in rows if r["method"] == e
                and all(r.get(c) not in (None, "", "None") for c in cols)} for e in entries}
    common = set.intersection(*have.values()) if have else set()
    return common, {e: sorted(c - common) for e, c in have.items() if c - common}


def load_grid(config: str, a) -> dict | int:
    """One grid's rows and the cells where its base and every candidate have validation accuracy and the
    metric; an exit status when the grid cannot be read."""
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
    cells, extra = common_cells(rows, entries, ("val_accuracy", a.metric))
    for e, c in extra.items():
        print(f"  note: {e}'s cells {', '.join(f's{s} seed {d}' for s, d in c)} are left out (not finished, or "
              f"without validation accuracy and {a.metric}, for every entry); the means below are over the cells "
              "all entries share")
    return {"name": cc.name, "out": Path(cc.out).resolve(), "config": config, "rows": rows, "cells": cells}


def candidates_of(grid: dict, cells: set, label_grid: bool, a) -> list[tuple]:
    """One grid's candidates as ``(label, accuracy, metric, ok, entry)`` rows on ``cells``, after its checks."""
    rows = grid["rows"]
    bar = means(rows, a.base, "val_accuracy", cells)
    print(f"{grid['name']}: {a.base} validation accuracy {bar:.4f} over {len(cells)} cells; candidates need >= "
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
        label = f"{grid['label']}:{e}" if label_grid else e
        table.append((label, acc, up, not why, e, grid))
        per = ", ".join(f"{s}: {means(rows, e, a.metric, {c for c in cells if c[0] == s}):.4f}" for s in sparsities)
        print(f"  {e:16s} validation accuracy {acc:.4f} (worst cell {worst:+.4f} vs {a.base}), validation "
              f"{a.metric} {up:.4f} (per sparsity {per})" + (f"  ({'; '.join(why)})" if why else ""))
    return table


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
    grids = []
    for config in a.config:
        got = load_grid(config, a)
        if isinstance(got, int):
            return got
        grids.append(got)
    outs = [g["out"] for g in grids]
    if len(set(outs)) < len(outs):
        ap.error("the same grid (results folder) is given twice: " + ", ".join(sorted({str(o) for o in outs
                                                                                      if outs.count(o) > 1})))
    names = [g["name"] for g in grids]
    for g in grids:      # a label names its grid; the config path where two grids share a name
        g["label"] = g["name"] if names.count(g["name"]) == 1 else g["config"]
    cells = set.intersection(*(g["cells"] for g in grids))
    if len(grids) > 1:   # candidates of different grids compared on the same (sparsity, seed) cells
        for g in grids:
            if g["cells"] - cells:
                print(f"  note: {g['label']}'s cells {', '.join(f's{s} seed {d}' for s, d in sorted(g['cells'] - cells))}"
                      " are left out (not finished in every grid); every mean is over the cells all grids share")
    if not cells:
        print("no cell is finished for the base and every candidate" + (" in every grid" if len(grids) > 1 else ""),
              file=sys.stderr)
        return 2
    table = [t for g in grids for t in candidates_of(g, cells, len(grids) > 1, a)]
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
    rows, entry = chosen[5]["rows"], chosen[4]
    test_col = "test_" + a.metric[len("val_"):]
    print(f"its test numbers (read once, same {len(cells)} cells): accuracy "
          f"{means(rows, entry, 'test_accuracy', cells):.4f}, {test_col} {means(rows, entry, test_col, cells):.4f} "
          f"(base {a.base}: {means(rows, a.base, test_col, cells):.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
