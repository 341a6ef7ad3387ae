"""Cost of one FairGRAPE importance sweep, and of the selection, by ``group_chunk``.

    python benchmarks/fairgrape_sweep.py [--data-dir ../shared/data/utkface64] [--rows 2048]
                                         [--chunks 5 1] [--sweeps 2]

On the UTKFace CNN of ``experiments/fairgrape_utkface_race.toml`` (8-16-32 channels at 32 px, target and
protected race, G = 5): ``--sweeps`` importance sweeps over ``--rows`` training rows for each
``group_chunk`` (groups vmapped together; 1 = one group after another), each followed by the selection
that FairGRAPE runs after it. The first sweep of each setting includes compilation. Prints seconds per
sweep and writes benchmarks/results/fairgrape_sweep.json.

Measured on a 2-core CPU at a load of about 8 (fifth session): 330-390 s per sweep with the groups vmapped
(``group_chunk`` >= 5), 95-123 s with ``group_chunk = 1``; the selection took 1-24 s per iteration. On
XLA:CPU the vmapped backward pass of a conv net is the slow part; on an accelerator keep the default.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from fairprune_jax.techniques import group_importance as gi
from fairprune_jax.running import runner
from fairprune_jax.data import load_dataset
from fairprune_jax.methods import RunConfig

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "utkface64"))
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--chunks", type=int, nargs="+", default=[5, 1])
    ap.add_argument("--sweeps", type=int, default=2)
    args = ap.parse_args()
    ds = load_dataset("utkface", args.data_dir, target="race", protected="race", image_size=32)
    cfg = RunConfig(method="fairgrape", dataset="utkface", model="cnn",
                    model_options={"channels": [8, 16, 32], "hidden": 32}, epochs=1, batch_size=128, progress=False)
    ctx, params, model_state = runner.build_context(cfg, ds)
    split = ds.train.take(np.arange(min(args.rows, len(ds.train))))
    G = ds.num_groups
    out = {"rows": len(split), "groups": G, "backend": jax.default_backend(), "chunks": {}}
    for chunk in args.chunks:
        step = gi.make_importance_step(ctx.fm, ctx.template, G, group_chunk=chunk)
        masks, runs = None, []
        for i in range(args.sweeps):
            t0 = time.perf_counter()
            imp = jax.block_until_ready(gi.group_importance(step, params, masks, model_state, ctx.template, split,
                                                            G, cfg.batch_size))
            t1 = time.perf_counter()
            masks, rep = gi.proportional_masks(imp, masks, ctx.template, params, 0.1 * (i + 1), "uniform",
                                               picks=2, max_decisions=256)
            runs.append({"sweep_s": round(t1 - t0, 2), "selection_s": round(rep["seconds"], 2)})
            print(f"group_chunk={chunk} sweep {i}: importance {t1 - t0:.1f} s, selection {rep['seconds']:.1f} s",
                  flush=True)
        out["chunks"][str(chunk)] = runs
    path = HERE / "results" / "fairgrape_sweep.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
