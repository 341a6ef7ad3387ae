"""Choose a grid's setting on the validation split, so that the test split is read once.

Among the candidate entries of a finished ``fairprune compare`` grid (variants of one method with different
settings), pick the one with the lowest mean validation ``--metric`` (default: the certified max psi_g,
``val_psi_upper``; ``val_eo_diff`` / ``val_dp_diff`` for the binary parity gaps) whose mean validation
accuracy is within ``--accuracy-tolerance`` of the base entry's (``nft`` by default) and, with
``--cell-tolerance``, no cell's validation accuracy more than that below the base's cell of the same sparsity
and seed (a candidate that collapses in one cell is refused even when its mean passes). Only the ``val_*``
columns are read to choose; the chosen entry's test numbers are printed after the choice, once::

    python experiments/select_on_val.py experiments/certify_v2_utkface_race.toml \
        --candidates ceag ceag_eps005 ceag_eps0
    python experiments/select_on_val.py experiments/bifp_adult_eo_select.toml --base structured_magnitude \
        --metric val_eo_diff --cell-tolerance 0.03 --candidates bifp bifp_logistic bifp_hinge bifp_tau02

The grid must hold a validation split (``val_fraction`` in its ``[dataset_options]``), so that its cells
carry ``pruned.val.certificate``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from fairprune_jax.running.compare import load_config


def means(rows: list[dict], entry: str, col: str) -> float | None:
    vals = [float(r[col]) for r in rows if r["method"] == entry and r.get(col) not in (None, "", "None")]
    return float(np.mean(vals)) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
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
    cc = load_config(a.config)
    path = Path(cc.out) / "results.csv"
    if not path.exists():
        print(f"{path} not found: run `fairprune compare --config {a.config}` first", file=sys.stderr)
        return 2
    rows = list(csv.DictReader(path.open()))
    bar = means(rows, a.base, "val_accuracy")
    if bar is None:
        print(f"no validation accuracy for {a.base!r}: does the grid hold a validation split?", file=sys.stderr)
        return 2
    print(f"{a.base}: validation accuracy {bar:.4f}; candidates need >= {bar - a.accuracy_tolerance:.4f}")
    base_cells = {(r["sparsity"], r["seed"]): float(r["val_accuracy"]) for r in rows
                  if r["method"] == a.base and r.get("val_accuracy") not in (None, "", "None")}
    table = []
    for e in a.candidates:
        acc, up = means(rows, e, "val_accuracy"), means(rows, e, a.metric)
        if acc is None or up is None:
            print(f"{e}: no finished cells with validation {a.metric}", file=sys.stderr)
            return 2
        worst = min((float(r["val_accuracy"]) - base_cells[(r["sparsity"], r["seed"])] for r in rows
                     if r["method"] == e and (r["sparsity"], r["seed"]) in base_cells), default=0.0)
        ok = acc >= bar - a.accuracy_tolerance and (a.cell_tolerance is None or worst >= -a.cell_tolerance)
        table.append((e, acc, up, ok))
        print(f"  {e:16s} validation accuracy {acc:.4f} (worst cell {worst:+.4f} vs {a.base}), validation "
              f"{a.metric} {up:.4f}" + ("" if ok else "  (too inaccurate)"))
    ok = [t for t in table if t[3]]
    if not ok:
        print("no candidate is accurate enough", file=sys.stderr)
        return 1
    chosen = min(ok, key=lambda t: t[2])[0]
    print(f"chosen on validation: {chosen}")
    test_col = "test_" + a.metric[len("val_"):]
    print(f"its test numbers (read once): accuracy {means(rows, chosen, 'test_accuracy'):.4f}, {test_col} "
          f"{means(rows, chosen, test_col):.4f} (base {a.base}: {means(rows, a.base, test_col):.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
