"""Choose a grid's setting on the validation split, so that the test split is read once.

Among the candidate entries of a finished ``fairprune compare`` grid (variants of one method with different
settings), pick the one with the lowest mean validation certified max psi_g (``val_psi_upper``) whose mean
validation accuracy is within ``--accuracy-tolerance`` of the base entry's (``nft`` by default). Only the
``val_*`` columns are read to choose; the chosen entry's test numbers are printed after the choice, once::

    python experiments/select_on_val.py experiments/certify_v2_utkface_race.toml \
        --candidates ceag ceag_eps005 ceag_eps0

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
    a = ap.parse_args(argv)
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
    table = []
    for e in a.candidates:
        acc, up = means(rows, e, "val_accuracy"), means(rows, e, "val_psi_upper")
        if acc is None or up is None:
            print(f"{e}: no finished cells with a validation certificate", file=sys.stderr)
            return 2
        table.append((e, acc, up, acc >= bar - a.accuracy_tolerance))
        print(f"  {e:16s} validation accuracy {acc:.4f}, validation certified max psi_g {up:.4f}"
              + ("" if table[-1][3] else "  (too inaccurate)"))
    ok = [t for t in table if t[3]]
    if not ok:
        print("no candidate is accurate enough", file=sys.stderr)
        return 1
    chosen = min(ok, key=lambda t: t[2])[0]
    print(f"chosen on validation: {chosen}")
    print(f"its test numbers (read once): accuracy {means(rows, chosen, 'test_accuracy'):.4f}, certified max psi_g "
          f"{means(rows, chosen, 'test_psi_upper'):.4f} (base {a.base}: {means(rows, a.base, 'test_psi_upper'):.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
