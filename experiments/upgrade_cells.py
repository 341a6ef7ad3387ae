"""Rebuild the certificates of finished cells as the current version, from the counts they store.

    python experiments/upgrade_cells.py [experiments/results]   # every cells/*/results.json below the folder

Certificate version 3 changed only the headline bound (the certified max psi_g and the floor: one-sided
marginal bounds instead of the largest simultaneous upper end); intervals and verdicts are the same, and every
number it needs (each group's rows, lost and gained) is in a version-2 cell. Each such cell's ``results.json``
(test and validation certificates) and ``results.md`` are rewritten; a certificate whose stored counts do not
give its stored intervals is left as it is and listed. ``fairprune compare`` rebuilds version-2 cells the same
way when it reads them, so a user's own grids need nothing; this script keeps committed cells' files and their
per-cell reports in step with the tables. Then rewrite each grid's tables with ``fairprune compare --config``
(nothing is rerun) and ``python experiments/update_tables.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fairprune_jax.reporting.report import markdown_report, write_json_atomic
from fairprune_jax.reporting.result import upgrade_certificates


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0] if args else Path(__file__).resolve().parent / "results")
    rebuilt, left = 0, []
    for path in sorted(root.glob("**/cells/*/results.json")):
        results = json.loads(path.read_text())
        n = upgrade_certificates(results)
        if n:
            write_json_atomic(results, path)
            (path.parent / "results.md").write_text(markdown_report(results))
            rebuilt += 1
        if any((rep.get("certificate") or {}).get("interval_version") == 2
               for rep in results.get("pruned", {}).values() if isinstance(rep, dict)):
            left.append(str(path))
    print(f"{rebuilt} cells rebuilt; {len(left)} with a certificate left at version 2")
    for p in left:
        print(f"  left: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
