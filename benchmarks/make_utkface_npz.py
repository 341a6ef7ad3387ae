"""Build a small uint8 ``.npz`` of UTKFace for ``benchmarks/accelerator.py`` (no JPEG decoding on the device).

    python benchmarks/make_utkface_npz.py --data-dir DIR [--size 32] [--max-mb 60] [--out benchmarks/data/utkface32.npz]

``DIR`` holds the UTKFace ``[age]_[gender]_[race]_[date&time].jpg.chip.jpg`` files (any resolution). Every
image is resized to ``size`` x ``size`` RGB (Pillow, LANCZOS, as the ``utkface`` loader does) and stored with
its labels:

    images  uint8 (N, size, size, 3)      age, gender, race  uint8 (N,)      names  str (N,)

compressed (``np.savez_compressed``). When the file would exceed ``--max-mb``, a seeded random subset of rows
(the same fraction of every race x gender cell) is kept so it fits, and the file says so (``subset``). The
output is data, not code: keep it out of git (``benchmarks/data/`` is ignored).
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

KEYS = ("images", "age", "gender", "race")


def parse_name(name: str) -> tuple[int, int, int] | None:
    """``(age, gender, race)`` from a UTKFace file name, or None when it does not parse."""
    parts = name.split("_")
    if len(parts) < 4:
        return None
    try:
        age, gender, race = int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        return None
    if not (0 <= age <= 255 and gender in (0, 1) and 0 <= race <= 4):
        return None
    return age, gender, race


def _decode(args: tuple[str, int]) -> np.ndarray | None:
    from PIL import Image
    path, size = args
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError):
        return None
    return arr if arr.shape == (size, size, 3) else None


def _compressed_bytes(arrays: dict) -> int:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.tell()


def build(data_dir: str | os.PathLike, out: str | os.PathLike, size: int = 32, max_mb: float = 60.0,
          limit: int | None = None, workers: int | None = None, seed: int = 0) -> dict:
    """Decode, subset if needed, write ``out``; returns a summary (rows, bytes, subset fraction)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"make_utkface_npz: {d} is not a folder of UTKFace images")
    files = sorted(e.name for e in os.scandir(d) if e.is_file() and e.name.lower().endswith((".jpg", ".jpeg", ".png")))
    parsed = [(n, parse_name(n)) for n in files]
    parsed = [(n, p) for n, p in parsed if p is not None]
    if limit:
        parsed = parsed[:int(limit)]
    if not parsed:
        raise FileNotFoundError(f"make_utkface_npz: no UTKFace-named images in {d}")
    jobs = [(str(d / n), size) for n, _ in parsed]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers == 1:
        imgs = [_decode(j) for j in jobs]
    else:   # spawn, not fork: forking a process whose JAX threads run can deadlock the child
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            imgs = list(ex.map(_decode, jobs, chunksize=256))
    keep = [i for i, a in enumerate(imgs) if a is not None]
    labels = np.asarray([parsed[i][1] for i in keep], np.uint8).reshape(-1, 3)
    arrays = {"images": np.stack([imgs[i] for i in keep]), "age": labels[:, 0], "gender": labels[:, 1],
              "race": labels[:, 2], "names": np.asarray([parsed[i][0] for i in keep])}
    full = _compressed_bytes(arrays)
    fraction = 1.0
    budget = max_mb * 1e6
    rng = np.random.default_rng(seed)
    while _compressed_bytes(arrays) > budget:
        fraction *= 0.97 * budget / _compressed_bytes(arrays)
        cell = arrays["race"].astype(np.int64) * 2 + arrays["gender"]
        rows = np.concatenate([rng.permutation(np.flatnonzero(cell == c))[:max(int(round(fraction * np.sum(cell == c))), 1)]
                               for c in np.unique(cell)])
        rows.sort()
        arrays = {k: v[rows] for k, v in arrays.items()}
        fraction = len(rows) / len(keep)
    arrays["subset"] = np.asarray(fraction)
    arrays["size"] = np.asarray(size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return {"rows": int(len(arrays["race"])), "decoded": len(keep), "skipped": len(parsed) - len(keep),
            "bytes": out.stat().st_size, "bytes_all_rows": full, "subset_fraction": fraction, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder of UTKFace JPEGs")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "data" / "utkface32.npz"))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--max-mb", type=float, default=60.0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N files (tests)")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    info = build(args.data_dir, args.out, args.size, args.max_mb, args.limit, args.workers)
    print(f"wrote {info['out']}: {info['rows']} images of {args.size}x{args.size}, {info['bytes'] / 1e6:.1f} MB "
          f"(all {info['decoded']} rows would be {info['bytes_all_rows'] / 1e6:.1f} MB; kept fraction "
          f"{info['subset_fraction']:.3f}; {info['skipped']} undecodable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
