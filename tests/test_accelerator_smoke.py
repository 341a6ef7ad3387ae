"""``benchmarks/accelerator.py --smoke`` runs end to end on a CPU and writes its one JSON; the .npz builder
reads UTKFace-named images (a handful of real ones when staged, else synthetic JPEGs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FAIRPRUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def test_accelerator_smoke(tmp_path):
    out = tmp_path / "acc.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] is True and set(res["sections"]) == {"step", "vmap_seeds", "utkface"}
    step = res["sections"]["step"]["models"]["mlp"]["groups"]["2"]
    assert step["jax_plain"]["median_ms"] > 0 and step["jax_ceag"]["median_ms"] > 0
    assert res["sections"]["vmap_seeds"]["mlp"]["seeds"] == 2
    utk = res["sections"]["utkface"]
    assert 0.8 < utk["ceag"]["sparsity"] <= 0.9     # a 1-conv CNN: its first conv and head stay dense
    assert 0.0 <= utk["ceag"]["test_accuracy"] <= 1.0


def test_make_utkface_npz(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import make_utkface_npz as mk
    src = SHARED / "utkface64"
    if src.is_dir():
        d = src
        limit = 40
    else:
        from PIL import Image
        d = tmp_path / "imgs"
        d.mkdir()
        rng = np.random.default_rng(0)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(
                d / f"{20 + i}_{i % 2}_{i % 5}_2017010{i}.jpg.chip.jpg")
        (d / "bad_name.jpg").write_bytes(b"x")
        limit = None
    info = mk.build(d, tmp_path / "u.npz", size=8, max_mb=60, limit=limit, workers=1)
    z = np.load(tmp_path / "u.npz")
    n = info["rows"]
    assert z["images"].shape == (n, 8, 8, 3) and z["images"].dtype == np.uint8
    assert z["race"].shape == (n,) and z["race"].max() <= 4 and set(np.unique(z["gender"])) <= {0, 1}
    # a budget smaller than the data keeps a subset that fits
    small = mk.build(d, tmp_path / "s.npz", size=8, max_mb=info["bytes"] / 2e6, limit=limit, workers=1)
    assert small["bytes"] <= info["bytes"] / 2 and 0 < small["rows"] < n
