"""Run one of the papers' settings (``experiments/paper/*.toml``) end to end within a time budget.

    python benchmarks/paper_run.py experiments/paper/balancing_act_utkface.toml --budget-minutes 10
    python benchmarks/paper_run.py CONFIG --plan --seconds-per-step 0.05   # print the scaled schedule only

On whatever this machine has (one GPU or TPU host, or a CPU), it times the configured model's training step on
the configured data (a few steps after compiling), estimates the grid's training steps (the dense epochs of
every seed, the pruning + fine-tuning epochs of every cell, times the number of trainings a method runs), and
shrinks every epoch count of the grid by one factor, each to at least 1, so that the estimate fits in 80% of
the budget. The scaled grid then runs through ``fairprune compare``'s own machinery (progress bars, checkpoints
of finished cells: run the same command again to resume) into ``--out`` (default
``runs/paper-NAME-<budget>min``) and its table is printed, with the factor and the epochs it ran beside the
paper's. ``--seeds``, ``--sparsities`` and ``--methods`` take a part of the grid first. A factor below 1 is a
shortened run of the paper's schedule, not the paper's result: the output says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

#: Epoch counts a method option may hold (scaled with the run's).
EPOCH_OPTIONS = ("prune_epochs", "round_epochs", "vote_epochs", "retrain_epochs")
#: Trainings a cell runs, relative to one fine-tuning (rough: lth trains a round per pruning step, ballot a vote
#: run and a retraining); the estimate is for the budget only.
TRAININGS = {"lth": lambda o: int(o.get("max_rounds", 5)), "ballot": lambda o: 2}


def subset(cc, seeds=None, sparsities=None, methods=None):
    """The grid restricted to the given seeds / sparsities / entries (each must be in it)."""
    for name, given, have in (("seeds", seeds, cc.seeds), ("sparsities", sparsities, cc.sparsities),
                              ("methods", methods, cc.methods)):
        if given and not set(given) <= set(have):
            raise ValueError(f"--{name} {given} not all in the grid's {have}")
    return dataclasses.replace(cc, seeds=seeds or cc.seeds, sparsities=sparsities or cc.sparsities,
                               methods=methods or cc.methods)


def grid_epochs(cc) -> tuple[float, float]:
    """``(dense epochs, cell epochs)`` the grid trains: all seeds' dense runs, and every cell's pruning and
    fine-tuning epochs times the trainings its method runs."""
    run = cc.run
    dense = float(run.get("epochs", 30)) * len(cc.seeds)
    ft = float(run.get("finetune_epochs", run.get("epochs", 30)))
    cells = 0.0
    for entry in cc.methods:
        method, opts = cc.resolve(entry)
        per = (float(opts.get("prune_epochs", 0)) + ft) * TRAININGS.get(method, lambda o: 1)(opts)
        cells += per * len(cc.sparsities) * len(cc.seeds)
    return dense, cells


def scale_epochs(cc, factor: float):
    """The grid with every epoch count times ``factor`` (rounded, at least 1; 0 / -1 sentinels kept)."""
    def s(v):
        return v if not isinstance(v, int) or v <= 0 else max(1, int(round(v * factor)))

    run = {k: (s(v) if k in ("epochs", "finetune_epochs") else v) for k, v in cc.run.items()}
    mopts = {m: {k: (s(v) if k in EPOCH_OPTIONS else v) for k, v in o.items()} for m, o in cc.method_options.items()}
    variants = {n: {k: (s(v) if k in EPOCH_OPTIONS else v) for k, v in o.items()} for n, o in cc.variants.items()}
    return dataclasses.replace(cc, run=run, method_options=mopts, variants=variants)


def plan(cc, seconds_per_step: float, steps_per_epoch: int, budget_s: float, compile_s: float = 0.0) -> dict:
    """The factor that fits the estimated training into 80% of the budget (at most 1), and what it gives.

    ``compile_s`` (one compilation of the training step) is charged once per seed and twice per cell (a method
    compiles its pruning and its fine-tuning steps) and is not scaled."""
    dense, cells = grid_epochs(cc)
    overhead = compile_s * (len(cc.seeds) + 2 * len(cc.methods) * len(cc.sparsities) * len(cc.seeds))
    train_s = (dense + cells) * steps_per_epoch * seconds_per_step
    factor = min(1.0, max(0.8 * budget_s - overhead, 0.0) / train_s) if train_s > 0 else 1.0
    scaled = scale_epochs(cc, factor)
    d2, c2 = grid_epochs(scaled)
    return {"factor": factor, "full_estimate_s": train_s + overhead,
            "scaled_estimate_s": (d2 + c2) * steps_per_epoch * seconds_per_step + overhead, "grid": scaled,
            "epochs": scaled.run, "paper_epochs": cc.run}


def time_step(cc, steps: int = 10) -> tuple[float, int, float]:
    """``(seconds per training step, steps per epoch, seconds to compile)`` of the grid's model on its data."""
    import jax
    from fairprune_jax.running.compare import cell_config
    from fairprune_jax.running.preparation import build_context, dense_start, load_checked
    from fairprune_jax.training.train import iterate_forever
    cfg = cell_config(cc, cc.methods[0], cc.sparsities[0], cc.seeds[0])
    ds, _ = load_checked(cfg)
    ctx, params, model_state = build_context(cfg, ds)
    state, step = dense_start(ctx, params, model_state)
    batches = iterate_forever(ds.train, cfg.batch_size, 0)
    t = time.perf_counter()
    for _ in range(2):                                   # compile, warm up
        state, _ = step(state, next(batches))
    jax.block_until_ready(state.params)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, _ = step(state, next(batches))
    jax.block_until_ready(state.params)
    return (time.perf_counter() - t) / steps, ctx.steps_per_epoch, compile_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="experiments/paper/NAME.toml (or any compare grid)")
    ap.add_argument("--budget-minutes", type=float, required=True, help="wall time for the whole grid")
    ap.add_argument("--out", help="output folder (default runs/paper-NAME-<budget>min)")
    ap.add_argument("--seeds", help="comma-separated subset of the grid's seeds")
    ap.add_argument("--sparsities", help="comma-separated subset of the grid's sparsities")
    ap.add_argument("--methods", help="comma-separated subset of the grid's entries")
    ap.add_argument("--plan", action="store_true", help="print the scaled schedule and stop")
    ap.add_argument("--seconds-per-step", type=float, help="skip the timing run and use this")
    ap.add_argument("--steps-per-epoch", type=int, help="with --seconds-per-step: the grid's steps per epoch")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.budget_minutes <= 0:
        ap.error("--budget-minutes must be > 0")
    from fairprune_jax.running.compare import load_config, markdown_table, run_compare, table_columns
    split = lambda s, kind: [kind(v) for v in s.split(",")] if s else None  # noqa: E731
    out = args.out or str(Path("runs") / f"paper-{Path(args.config).stem}-{args.budget_minutes:g}min")
    cc = subset(load_config(args.config, out=out), split(args.seeds, int), split(args.sparsities, float),
                split(args.methods, str))
    if args.seconds_per_step is not None:
        sps, spe, comp = args.seconds_per_step, args.steps_per_epoch or 100, 0.0
    else:
        print(f"timing the training step of {cc.run.get('model') or 'the default model'} on {cc.dataset} ...",
              flush=True)
        sps, spe, comp = time_step(cc)
    p = plan(cc, sps, spe, 60 * args.budget_minutes, comp)
    print(f"{sps * 1e3:.1f} ms a step, {spe} steps an epoch, {comp:.0f} s to compile: the full grid is about {p['full_estimate_s'] / 60:.1f} "
          f"min here; epochs x {p['factor']:.3g} -> about {p['scaled_estimate_s'] / 60:.1f} min", flush=True)
    for k in ("epochs", "finetune_epochs"):
        if k in p["paper_epochs"]:
            print(f"  {k}: {p['paper_epochs'][k]} (config) -> {p['epochs'][k]}")
    if p["scaled_estimate_s"] > 60 * args.budget_minutes:
        print(f"warning: even one epoch per phase is about {p['scaled_estimate_s'] / 60:.1f} min here, over the "
              "budget: take part of the grid (--seeds 0, --sparsities, --methods) or a larger budget", flush=True)
    if args.plan:
        return 0
    summary = run_compare(p["grid"], progress=not args.no_progress)
    cols, _ = table_columns(p["grid"], summary["aggregate"], summary.get("setting") or {})
    print(markdown_table(p["grid"], summary["aggregate"], cols))
    if p["factor"] < 1:
        print(f"note: a shortened run (every epoch count x {p['factor']:.3g}), not the paper's schedule; "
              f"rerun with a larger --budget-minutes for more of it")
    print(f"wrote {p['grid'].out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
