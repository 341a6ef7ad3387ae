"""Time the UTKFace image decoding (every image of a folder, resized), serial and with N worker processes.

    python benchmarks/utkface_decode.py ../shared/data/utkface64 --size 32 --workers 1 2

Measured on 2 cores (23,705 images at 32 px): serial 4.7-5.0 s; 2 joblib (loky) processes 2.7-3.8 s
(medians of 3: 2.80 and 3.53 s in two rounds); the earlier hand-built pool of ``python -c`` subprocesses,
timed alternately with it, 2.5-3.7 s (median 2.78 s); 2 threads 5.6 s (Python work per image dominates, so
threads do not help). Same images, bit for bit.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from fairprune_jax.data import utkface


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    d = Path(a.folder)
    paths = [str(d / e.name) for e in sorted(utkface._list_images(d), key=lambda e: e.name)]
    for w in a.workers:
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            utkface._decode_files(paths, a.size, w)
            times.append(time.perf_counter() - t)
        print(f"{len(paths)} images at {a.size} px, {w} worker(s): median {statistics.median(times):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in times)})")


if __name__ == "__main__":
    main()
