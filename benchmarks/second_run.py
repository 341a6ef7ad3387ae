"""Wall time of the default ``fairprune run``: a first run on a machine with empty caches, then the same
command again (the compilation cache and the dense-model cache of :mod:`fairprune_jax.training.caches` filled by the
first). Each repeat starts from an empty cache folder (``XDG_CACHE_HOME`` set to a new temporary folder, so the
user's own cache is neither read nor touched); the median of the repeats is reported.

    python benchmarks/second_run.py [--repeat 3] [-- EXTRA fairprune run ARGS]

Writes ``benchmarks/results/second_run.{json,md}``. Times are of the whole command (process start, imports,
data loading, training, evaluation, plots), as a user sees them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "second_run"), help="prefix of the .json / .md files")
    ap.add_argument("extra", nargs="*", help="more `fairprune run` arguments (after --)")
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "FAIRPRUNE_XLA_CACHE", "FAIRPRUNE_DENSE_CACHE", "CI")}
    rows = []
    for r in range(a.repeat):
        with tempfile.TemporaryDirectory() as home:
            e = dict(env, XDG_CACHE_HOME=home)
            base = [sys.executable, "-m", "fairprune_jax.running.cli", "run", "--no-progress", *a.extra]
            first = timed([*base, "--out", os.path.join(home, "first")], e)
            second = timed([*base, "--out", os.path.join(home, "second")], e)
            res = json.loads(Path(home, "second", "results.json").read_text())
        rows.append({"first_s": round(first, 2), "second_s": round(second, 2),
                     "dense_from_cache": res["runtime"]["dense_from_cache"]})
        print(f"repeat {r}: first {first:.1f} s, second {second:.1f} s ({second / first:.2f})", flush=True)
    f, s = statistics.median(x["first_s"] for x in rows), statistics.median(x["second_s"] for x in rows)
    out = {"command": "fairprune run " + " ".join(a.extra), "repeats": rows, "median_first_s": f,
           "median_second_s": s, "ratio": round(s / f, 3), "cpus": os.cpu_count(), "machine": platform.machine(),
           "date": time.strftime("%Y-%m-%d")}
    Path(a.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    Path(a.out + ".md").write_text(
        f"# Second default run vs first\n\n`{out['command']}` ({out['cpus']} CPUs, {out['date']}; "
        f"`python benchmarks/second_run.py`)\n\n| repeat | first run (s) | second run (s) | ratio |\n|---|---|---|---|\n"
        + "".join(f"| {i} | {x['first_s']:.1f} | {x['second_s']:.1f} | {x['second_s'] / x['first_s']:.2f} |\n"
                  for i, x in enumerate(rows))
        + f"| median | {f:.1f} | {s:.1f} | {s / f:.2f} |\n")
    print(f"median: first {f:.1f} s, second {s:.1f} s, ratio {s / f:.2f}")


if __name__ == "__main__":
    main()
