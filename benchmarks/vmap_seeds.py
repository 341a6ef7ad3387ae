"""1 seed vs S seeds vmapped into one program: per training step and per dense training run.

    taskset -c 1 python benchmarks/vmap_seeds.py [--seeds 8] [--model mlp|cnn] [--hidden 256 128]
                                                 [--rounds 7] [--steps 30] [--epochs 2]

Two measurements, each in alternating rounds (1 seed, then S seeds, then 1 seed
again, ...) so that a load change on a shared machine hits both sides alike; the
reported numbers are medians over the rounds:

* step: one masked training step (90% magnitude masks), awaited after every
  step. ``vmapped_nodonate`` is the step as ``seeds.vmap_step`` built it
  before (stacked state not donated), ``vmapped`` the current one.
* fit: a dense training run of ``--epochs`` epochs as ``fairprune compare``
  runs it: ``train.fit`` for each of the S seeds one after another
  (``sequential``) vs ``seeds.fit_seeds`` for all S at once (``vmapped``);
  ``one_seed`` is a single ``fit``.

Also times building one step's batches on the host (S separate
``train_batches`` + ``np.stack``, the old ``stacked_batches``, vs one fancy
index per array). Writes benchmarks/results/vmap_seeds.json with the load
average and the CPUs the process may use. The target (issue: seeds in
parallel) is S=8 vmapped seeds in under 3x the time of one seed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.sparsity import masks, scores
from fairprune_jax.training import seeds as seeds_lib
from fairprune_jax.data import load_dataset, train_batches
from fairprune_jax.methods.base import make_optimizer
from fairprune_jax.models import build_model
from fairprune_jax.training.train import create_state, fit, make_train_step


def step_time(step, state, batches, steps: int) -> tuple[float, object]:
    """Median seconds of ``steps`` awaited steps; returns the state to keep (the input is donated)."""
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, stats = step(state, batches[i % len(batches)])
        jax.block_until_ready(stats["loss"])
        times.append(time.perf_counter() - t)
    return float(np.median(times)), state


def old_stacked_batches(split, batch_size, seeds, epoch):
    """``stacked_batches`` as it was: one ``train_batches`` per seed, then ``np.stack``."""
    iters = [train_batches(split, batch_size, s, epoch) for s in seeds]
    for parts in zip(*iters):
        yield {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def host_batch_ms(gen, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        n = sum(1 for _ in gen())
        best = min(best, (time.perf_counter() - t) / n)
    return 1e3 * best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--hidden", type=int, nargs="+", default=None, help="MLP hidden widths (default 256 128)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per round and side")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of each timed dense run")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vmap_seeds.json"))
    args = ap.parse_args(argv)

    ds = load_dataset("digits", image=args.model == "cnn")
    S = args.seeds
    seed_list = list(range(S))
    kw = {"hidden": tuple(args.hidden)} if args.hidden and args.model == "mlp" else {}
    built = [build_model(args.model, ds.input_shape, ds.num_classes, seed=s, **kw) for s in seed_list]
    fm = built[0][0]

    # -- one training step ---------------------------------------------------------------------------------
    tx = make_optimizer("adam", 1e-3)
    masked = []
    for _, params, ms in built:
        t = masks.prunable_template(params)
        m = masks.masks_from_scores(scores.magnitude(params, t), t, 0.9)
        masked.append(create_state(params, ms, tx, masks=m, seed=len(masked)))
    step = make_train_step(fm, tx)
    vb = [jax.device_put(b) for _, b in zip(range(20), seeds_lib.stacked_batches(ds.train, args.batch_size,
                                                                                   seed_list, 0))]
    sides = {   # stacking copies, so every side has its own buffers (the donating steps consume theirs)
        "one_seed": (step, jax.tree.map(jnp.copy, masked[0]),
                     [jax.device_put(b) for _, b in zip(range(20), train_batches(ds.train, args.batch_size, 0, 0))]),
        "vmapped_nodonate": (jax.jit(jax.vmap(step)), seeds_lib.stack_states(masked), vb),
        "vmapped": (seeds_lib.vmap_step(step), seeds_lib.stack_states(masked), vb),
    }
    states = {}
    for name, (fn, st, batches) in sides.items():
        st, _ = fn(st, batches[0])            # compile
        jax.block_until_ready(st)
        states[name] = st
    step_ms: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.rounds):
        for name, (fn, _, batches) in sides.items():
            t, states[name] = step_time(fn, states[name], batches, args.steps)
            step_ms[name].append(1e3 * t)

    # -- a dense training run ------------------------------------------------------------------------------
    spe = len(ds.train) // args.batch_size
    dtx = make_optimizer("adam", 1e-3, total_steps=args.epochs * spe)
    dstep = make_train_step(fm, dtx)

    def fresh(s):
        _, params, ms = built[s]
        return create_state(params, ms, dtx, seed=s)

    def run_one():
        st, _ = fit(fresh(0), dstep, ds.train, epochs=args.epochs, batch_size=args.batch_size, seed=0,
                    progress=False)
        jax.block_until_ready(st.params)

    def run_sequential():
        for s in seed_list:
            st, _ = fit(fresh(s), dstep, ds.train, epochs=args.epochs, batch_size=args.batch_size, seed=s,
                        progress=False)
        jax.block_until_ready(st.params)

    def run_vmapped():
        sts, _ = seeds_lib.fit_seeds([fresh(s) for s in seed_list], dstep, ds.train, epochs=args.epochs,
                                     batch_size=args.batch_size, seeds=seed_list, progress=False)
        jax.block_until_ready(sts[-1].params)

    runs = {"one_seed": run_one, "sequential": run_sequential, "vmapped": run_vmapped}
    for fn in runs.values():
        fn()                                   # compile
    fit_s: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            fit_s[name].append(time.perf_counter() - t)

    host = {"one_seed": host_batch_ms(lambda: train_batches(ds.train, args.batch_size, 0, 0)),
            "old_stacked": host_batch_ms(lambda: old_stacked_batches(ds.train, args.batch_size, seed_list, 0)),
            "stacked": host_batch_ms(lambda: seeds_lib.stacked_batches(ds.train, args.batch_size, seed_list, 0))}

    med = {k: float(np.median(v)) for k, v in step_ms.items()}
    fmed = {k: float(np.median(v)) for k, v in fit_s.items()}
    res = {
        "model": args.model, "hidden": list(kw.get("hidden", ())) or None, "seeds": S,
        "batch_size": args.batch_size, "rounds": args.rounds, "steps_per_round": args.steps,
        "step_ms": {k: round(v, 4) for k, v in med.items()},
        "step_ratio_vs_one_seed": {k: round(v / med["one_seed"], 3) for k, v in med.items() if k != "one_seed"},
        "step_ms_rounds": {k: [round(x, 4) for x in v] for k, v in step_ms.items()},
        "fit_epochs": args.epochs, "fit_steps_per_epoch": spe,
        "fit_s": {k: round(v, 4) for k, v in fmed.items()},
        "fit_ratio_vs_one_seed": {k: round(v / fmed["one_seed"], 3) for k, v in fmed.items() if k != "one_seed"},
        "fit_speedup_vmapped_vs_sequential": round(fmed["sequential"] / fmed["vmapped"], 3),
        "host_batch_ms": {k: round(v, 4) for k, v in host.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()], "cpus_allowed": len(os.sched_getaffinity(0)),
        "cpus_total": os.cpu_count(), "device": jax.devices()[0].device_kind, "platform": platform.platform(),
        "jax": jax.__version__,
    }
    print(f"{args.model} {res['hidden'] or ''} S={S}, load average {res['load_average']}, "
          f"{res['cpus_allowed']}/{res['cpus_total']} CPUs")
    print(f"  step: 1 seed {med['one_seed']:.3f} ms; {S} vmapped {med['vmapped']:.3f} ms "
          f"= {med['vmapped'] / med['one_seed']:.2f}x (not donated: {med['vmapped_nodonate']:.3f} ms "
          f"= {med['vmapped_nodonate'] / med['one_seed']:.2f}x)")
    print(f"  dense fit ({args.epochs} epochs x {spe} steps): 1 seed {fmed['one_seed']:.3f} s; {S} sequential "
          f"{fmed['sequential']:.3f} s = {fmed['sequential'] / fmed['one_seed']:.2f}x; {S} vmapped "
          f"{fmed['vmapped']:.3f} s = {fmed['vmapped'] / fmed['one_seed']:.2f}x "
          f"({res['fit_speedup_vmapped_vs_sequential']:.2f}x faster than sequential)")
    print(f"  host batches per step: 1 seed {host['one_seed']:.3f} ms; {S} seeds old {host['old_stacked']:.3f} ms, "
          f"now {host['stacked']:.3f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    key = args.model if not kw else f"{args.model}_{'x'.join(map(str, kw['hidden']))}"
    existing[key] = res
    out.write_text(json.dumps(existing, indent=2))


if __name__ == "__main__":
    main()
