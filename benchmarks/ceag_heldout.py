"""Cost of CEAG's held-out estimates per fine-tuning step.

    python benchmarks/ceag_heldout.py [--model cnn|mlp] [--groups 5] [--rounds 7] [--steps 20]

Three jitted steps on the same pruned model and batches:

* ``plain``: masked cross-entropy fine-tuning (what ``nft`` runs);
* ``train_buffers``: CEAG as in the paper, strict psi_g from replay buffers of training rows
  (``constraint_data=train``);
* ``held_out``: CEAG's default, which also evaluates ``val_batch_size`` held-out rows per step and
  refreshes the on-device table of held-out correctness (``constraint_data=val``).

Timed in alternating rounds (plain, buffers, held-out, plain, ...) so load changes on a shared
machine hit all three alike; medians over rounds of the median step time. The checkpoint
selection (``select_points`` exact passes over the held-out rows per run) is timed separately as
one pass. Writes benchmarks/results/ceag_heldout.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.constraints import constrained
from fairprune_jax.sparsity import masks, scores
from fairprune_jax.data import Split, eval_batches, train_batches
from fairprune_jax.methods import ceag as ceag_lib
from fairprune_jax.methods.base import Context, RunConfig, make_optimizer
from fairprune_jax.models import build_model, count_flops, layer_order
from fairprune_jax.training.train import create_state, evaluate, make_eval_step, make_train_step


def synthetic(model: str, n: int, groups: int, seed: int = 0) -> tuple[Split, tuple, int]:
    rng = np.random.default_rng(seed)
    shape = (32, 32, 3) if model == "cnn" else (64,)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, 5, n).astype(np.int32)
    g = rng.integers(0, groups, n).astype(np.int32)
    return Split(x, y, g), shape, 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    ap.add_argument("--groups", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    train, shape, C = synthetic(args.model, 4096, args.groups)
    val, _, _ = synthetic(args.model, 1024, args.groups, seed=1)
    kw = {"channels": (8, 16, 32), "hidden": 32} if args.model == "cnn" else {"hidden": (256, 128)}
    fm, params, ms = build_model(args.model, shape, C, seed=0, **kw)
    template = masks.prunable_template(params)
    m = masks.masks_from_scores(scores.magnitude(params, template), template, 0.9)
    cfg = RunConfig(batch_size=args.batch_size, progress=False)
    G = args.groups
    eval_step = make_eval_step(fm, G, C)
    ctx = Context.from_config(cfg, dataset=None, fm=fm, template=template, flops=count_flops(fm, params, ms),
                  layer_order=layer_order(fm, params, ms), eval_step=eval_step)
    tx = make_optimizer("adam", 1e-3)
    dense = create_state(params, ms, tx, masks=None)
    train_counts, _ = evaluate(eval_step, dense, train, 512)
    val_counts, _ = evaluate(eval_step, dense, val, 512)
    ref, val_ref = ceag_lib.reference_from_counts(train_counts), ceag_lib.reference_from_counts(val_counts)
    dual = constrained.dual_from_options(ceag_lib.with_dual_lr(ceag_lib.CeagOptions(), "val"), G, equality=False)

    def fresh(extra):
        from fairprune_jax.training.train import Carry
        extra = dict(extra or {})
        dual = extra.pop("dual", None)          # the multipliers live in the optimizer state
        state = create_state(params, ms, tx, masks=m, extra=Carry(**extra) if extra else None)
        return state if dual is None else state.with_dual(dual)

    steps = {
        "plain": (make_train_step(fm, tx), lambda: fresh(None)),
        "train_buffers": (ceag_lib.make_constrained_step(ctx, tx, dual, ceag_lib.ceag_terms(G, ref, 0.01), "dual_primal"),
                          lambda: fresh({"dual": dual.init(), "buffer": constrained.buffer_init(G, 40),
                                         "overall": constrained.buffer_init(1, 1000)})),
        "held_out": (ceag_lib.make_constrained_step(
            ctx, tx, dual, ceag_lib.ceag_val_terms(G, ref, val_ref, jnp.asarray(val.g), jnp.full(G, 0.01)),
            "dual_primal", pre=ceag_lib.val_refresh(ctx, val, args.batch_size, seed=0)),
            lambda: fresh({"dual": dual.init(), "val_correct": jnp.zeros(len(val), jnp.float32)})),
    }
    batches = [b for _, b in zip(range(args.steps), train_batches(train, args.batch_size, 0, 0))]
    states = {k: init() for k, (_, init) in steps.items()}
    for k, (step, _) in steps.items():          # compile
        states[k], stats = step(states[k], batches[0])
        jax.block_until_ready(stats["loss"])
    per_round: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, (step, _) in steps.items():
            times = []
            for b in batches:
                t = time.perf_counter()
                states[k], stats = step(states[k], b)
                jax.block_until_ready(stats["loss"])
                times.append(time.perf_counter() - t)
            per_round[k].append(float(np.median(times)))
    ms_step = {k: 1e3 * float(np.median(v)) for k, v in per_round.items()}
    evaluate(eval_step, states["held_out"], val, 512)      # compile for the masked state
    t = time.perf_counter()
    evaluate(eval_step, states["held_out"], val, 512)
    sel_pass_ms = 1e3 * (time.perf_counter() - t)
    out = {"model": args.model, "groups": G, "batch_size": args.batch_size, "val_rows": len(val),
           "val_batch_size": args.batch_size, "ms_per_step": ms_step,
           "held_out_vs_plain": ms_step["held_out"] / ms_step["plain"],
           "held_out_vs_train_buffers": ms_step["held_out"] / ms_step["train_buffers"],
           "selection_pass_ms": sel_pass_ms, "rounds": args.rounds, "steps_per_round": args.steps,
           "load_average": os.getloadavg(), "cpus": len(os.sched_getaffinity(0)), "backend": jax.default_backend()}
    print(json.dumps(out, indent=2))
    path = Path(__file__).parent / "results" / "ceag_heldout.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old[f"{args.model}_G{G}"] = out
    path.write_text(json.dumps(old, indent=2))


if __name__ == "__main__":
    main()
