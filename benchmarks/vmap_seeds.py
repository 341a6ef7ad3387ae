"""Time one training step for 1 seed vs S seeds vmapped into one program.

    python benchmarks/vmap_seeds.py [--seeds 8] [--model mlp|cnn] [--steps 200]

Writes benchmarks/results/vmap_seeds.json. The target (issue: seeds in parallel) is
S=8 vmapped seeds in under 3x the time of one seed.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from fairprune_jax import masks, scores, seeds as seeds_lib
from fairprune_jax.data import load_dataset, train_batches
from fairprune_jax.methods.base import make_optimizer
from fairprune_jax.models import build_model
from fairprune_jax.train import create_state, make_train_step


def time_steps(step, state, batches, steps: int) -> tuple[float, object]:
    state, _ = step(state, batches[0])          # compile
    jax.block_until_ready(state.params)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, stats = step(state, batches[i % len(batches)])
        jax.block_until_ready(stats["loss"])
        times.append(time.perf_counter() - t)
    return float(np.median(times)), state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vmap_seeds.json"))
    args = ap.parse_args()

    ds = load_dataset("digits", image=args.model == "cnn")
    tx = make_optimizer("adam", 1e-3)
    seed_list = list(range(args.seeds))
    states, fm = [], None
    for s in seed_list:
        fm, params, ms = build_model(args.model, ds.input_shape, ds.num_classes, seed=s)
        t = masks.prunable_template(params)
        m = masks.masks_from_scores(scores.magnitude(params, t), t, 0.9)
        states.append(create_state(params, ms, tx, masks=m, seed=s))
    step = make_train_step(fm, tx)
    stacked = seeds_lib.stack_states(states)   # a copy: the single-seed timing donates states[0]

    single_batches = [b for _, b in zip(range(20), train_batches(ds.train, args.batch_size, 0, 0))]
    t1, _ = time_steps(step, states[0], single_batches, args.steps)

    vstep = seeds_lib.vmap_step(step)
    vbatches = [b for _, b in zip(range(20), seeds_lib.stacked_batches(ds.train, args.batch_size, seed_list, 0))]
    tS, _ = time_steps(vstep, stacked, vbatches, args.steps)

    res = {"model": args.model, "seeds": args.seeds, "batch_size": args.batch_size,
           "one_seed_ms": 1e3 * t1, "vmapped_ms": 1e3 * tS, "ratio": tS / t1,
           "sequential_estimate_ms": 1e3 * t1 * args.seeds, "speedup_vs_sequential": t1 * args.seeds / tS,
           "device": jax.devices()[0].device_kind, "platform": platform.platform(), "jax": jax.__version__}
    print(f"{args.model}: 1 seed {res['one_seed_ms']:.3f} ms/step; {args.seeds} seeds vmapped "
          f"{res['vmapped_ms']:.3f} ms/step = {res['ratio']:.2f}x one seed "
          f"({res['speedup_vs_sequential']:.2f}x faster than {args.seeds} sequential)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing[args.model] = res
    out.write_text(json.dumps(existing, indent=2))


if __name__ == "__main__":
    main()
