"""Rerun committed cells of a comparison and check that they give the committed numbers, bit for bit.

    python experiments/reproduce.py experiments/headline_digits.toml --seeds 0 [--methods nft,ceag]
        [--sparsities 0.9] [--keep DIR]

Every chosen cell of the grid (its methods x sparsities x the chosen seeds) is run again from scratch (its own
dense model, trained again, shared by the cells of a seed as in the grid) into a temporary folder, and its
``dense``, ``pruned`` and ``sparsity`` entries (every metric, on every split, with the certificate) are compared
with the committed ``results.json`` of the same cell; entries the report gained after the cell was committed
are counted, not failed. Prints one line per cell, and for a cell that differs the
first differing entries (committed vs now); exits with 1 when any cell differs or is missing.

This is the check that a refactoring left the results unchanged: the test suite runs it on a few digits cells
(``tests/test_reproduce.py``); run it on a whole grid before committing a change that should not move numbers.

Float rounding depends on the host (``fairprune_jax.core.numerics``: XLA:CPU compiles for the host's vector
ISA), so a host whose numerics differ from the committed cells' keeps its own reference:
``experiments/reproduce_refs/<numerics key>/<grid>/<cell>.json`` (the compared entries of each cell, made
with ``--write-reference`` from the same code as the committed cells). A rerun is compared with the
reference of its own host when there is one, else with the committed cell. ``--tolerant`` accepts the
differences that float rounding on an unknown host can make (a few flipped rows; sparsity exact) and says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from fairprune_jax.core.numerics import numerics_key
from fairprune_jax.reporting.result import upgrade_certificates
from fairprune_jax.running.compare import cell_dir, load_config, run_compare

COMPARED = ("sparsity", "dense", "pruned")
REFERENCES = Path(__file__).resolve().parent / "reproduce_refs"


def differences(committed: Any, now: Any, path: str = "") -> list[str]:
    """Every leaf path where two JSON values differ (floats compared exactly; NaN equals NaN); an entry the
    committed cell lacks (added to the report since) is listed as ``new``, see :func:`failures`."""
    if isinstance(committed, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(committed) | set(now), key=str):
            if k not in committed or k not in now:
                out.append(f"{path}/{k}: {'missing now' if k not in now else 'new'}")
            else:
                out += differences(committed[k], now[k], f"{path}/{k}")
        return out
    if isinstance(committed, list) and isinstance(now, list) and len(committed) == len(now):
        return [d for i, (a, b) in enumerate(zip(committed, now)) for d in differences(a, b, f"{path}[{i}]")]
    if committed == now or (isinstance(committed, float) and isinstance(now, float) and committed != committed
                            and now != now):
        return []
    return [f"{path}: committed {committed!r}, now {now!r}"]


def failures(diffs: list[str]) -> list[str]:
    """The differences that change a committed number (not the entries the report gained since)."""
    return [d for d in diffs if not d.endswith(": new")]


#: count-valued leaves: an unknown host may flip a few rows, no more
COUNTS = {"n", "lost", "gained", "positives", "negatives", "correct"}


def rounding_failures(diffs: list[str], rows: int = 3, rate: float = 0.05) -> list[str]:
    """The failures (:func:`failures`) that float rounding on another host cannot explain: anything under
    ``sparsity``; a count leaf off by more than ``rows``; another number off by more than ``rate`` (absolute
    for values within [-1, 1], relative beyond); a text that differs, except which class a worst case falls on
    (``..._class``)."""
    out = []
    for d in failures(diffs):
        m = re.match(r"^(.*): committed (.*), now (.*)$", d)
        if m is None or m.group(1).startswith("sparsity"):
            out.append(d)
            continue
        leaf = m.group(1).rsplit("/", 1)[-1]
        try:
            a, b = float(m.group(2)), float(m.group(3))
        except ValueError:
            if not leaf.endswith("_class"):
                out.append(d)
            continue
        limit = rows if leaf in COUNTS else rate * max(1.0, abs(a))
        if not abs(a - b) <= limit:
            out.append(d)
    return out


def reference_path(config: str | Path, name: str, key: str | None = None) -> Path:
    """Where this host's (or ``key``'s) reference of one cell lives (see the module docstring)."""
    return REFERENCES / (key or numerics_key()) / Path(config).stem / f"{name}.json"


def reference_cell(config: str | Path, name: str, key: str | None = None) -> Path | None:
    """This host's reference of one cell, or None where it has none."""
    path = reference_path(config, name, key)
    return path if path.is_file() else None


def reproduce(config: str | Path, seeds: list[int] | None = None, methods: list[str] | None = None,
              keep: str | Path | None = None, progress: bool = False, sparsities: list[float] | None = None,
              references: bool = True, write_reference: bool = False) -> dict[str, list[str]]:
    """``{cell name: differences}`` for the chosen cells of a committed grid (an empty list: identical).

    Each rerun cell is compared with this host's reference of it when ``references`` and there is one, else with
    the committed cell. ``write_reference``: store the rerun cells as this host's references (their
    differences from the committed cells are still returned)."""
    committed = load_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        cc = dataclasses.replace(committed, out=Path(keep or tmp), seeds=seeds or committed.seeds,
                                 methods=methods or committed.methods,
                                 sparsities=sparsities or committed.sparsities)
        unknown = sorted(set(cc.methods) - set(committed.methods))
        if unknown:
            raise ValueError(f"{config}: no such method in the grid: {unknown}")
        outside = sorted(set(cc.sparsities) - set(committed.sparsities))
        if outside:
            raise ValueError(f"{config}: no such sparsity in the grid: {outside}")
        run_compare(cc, progress=progress)
        out = {}
        for seed in cc.seeds:
            for s in cc.sparsities:
                for m in cc.methods:
                    name = cell_dir(cc, m, s, seed).name
                    old = cell_dir(committed, m, s, seed) / "results.json"
                    ref = reference_cell(config, name) if references and not write_reference else None
                    if ref is None and not old.is_file():
                        out[name] = [f"no committed cell {old}"]
                        continue
                    a = json.loads((ref or old).read_text())
                    upgrade_certificates(a)      # a committed cell of an earlier certificate version
                    b = json.loads((cell_dir(cc, m, s, seed) / "results.json").read_text())
                    out[name] = [d for k in COMPARED for d in differences(a.get(k), b.get(k), k)]
                    if write_reference:
                        path = reference_path(config, name)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(json.dumps(dict({"numerics": numerics_key(), "differences_from_committed":
                                                         len(failures(out[name]))},
                                                        **{k: b.get(k) for k in COMPARED}), indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--seeds", default=None, help="comma-separated (default: the grid's)")
    ap.add_argument("--methods", default=None, help="comma-separated grid entries (default: all)")
    ap.add_argument("--sparsities", default=None, help="comma-separated (default: the grid's)")
    ap.add_argument("--keep", default=None, help="rerun into this folder and keep it (default: a temporary one)")
    ap.add_argument("--show", type=int, default=5, help="differences shown per cell")
    ap.add_argument("--committed", action="store_true", help="compare with the committed cells even where this "
                    "host has references")
    ap.add_argument("--write-reference", action="store_true", help="store the rerun cells as this host's "
                    f"references ({REFERENCES.name}/{numerics_key()}/)")
    ap.add_argument("--tolerant", action="store_true", help="accept differences float rounding can explain")
    a = ap.parse_args(argv)
    print(f"host numerics: {numerics_key()}")
    res = reproduce(a.config, seeds=[int(s) for s in a.seeds.split(",")] if a.seeds else None,
                    methods=a.methods.split(",") if a.methods else None, keep=a.keep, progress=True,
                    sparsities=[float(s) for s in a.sparsities.split(",")] if a.sparsities else None,
                    references=not a.committed, write_reference=a.write_reference)
    check = rounding_failures if a.tolerant else failures
    for name, diffs in res.items():
        bad, new = check(diffs), len(diffs) - len(failures(diffs))
        rounding = len(failures(diffs)) - len(bad)
        print(f"{name}: {f'{len(bad)} differences' if bad else 'identical'}"
              + (f" ({rounding} differences within float rounding)" if rounding else "")
              + (f" ({new} entries the committed cell predates)" if new else ""))
        for d in bad[:a.show]:
            print(f"    {d}")
    bad = sum(1 for d in res.values() if check(d))
    print(f"{len(res) - bad} of {len(res)} cells {'within float rounding of' if a.tolerant else 'identical to'} "
          + ("the committed ones" if a.committed or a.write_reference else
             "their baseline (this host's reference where it has one, else the committed cell)"))
    return 1 if bad and not a.write_reference else 0


if __name__ == "__main__":
    sys.exit(main())
