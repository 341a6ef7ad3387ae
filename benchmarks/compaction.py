"""Inference time and FLOPs of dense vs compacted models at 50 / 70 / 90% channel sparsity.

What is measured (CPU, evaluation mode, batch 256, jitted forward pass):

* ``dense`` -- the unpruned model. A structured *masked* model has exactly the
  dense shapes, so it runs at dense speed: masking alone buys nothing, which is
  what compaction is for.
* ``compact@s`` -- :func:`fairprune_jax.sparsity.compact.compact` of a structured mask
  removing the fraction ``s`` of the units of every removable layer (all convs
  and the hidden ``fc`` of the CNN, every hidden layer of the MLPs; the
  classifier head keeps its outputs). Its outputs are checked against the
  masked dense model before timing (max abs difference reported).

FLOPs are multiply-accumulates per example of all conv / linear kernels
(:func:`fairprune_jax.models.count_flops`, the same count the run reports);
removing a fraction ``s`` of the channels of consecutive layers cuts a
middle layer's cost by ``(1 - s)^2``. The target is a measured speedup
within 30% of the FLOP reduction (``speedup >= 0.7 * flop_reduction``).

Settings: ``cnn`` = our CNN (conv3x3-BN-ReLU x [32, 64, 128], 2x2 max pool
after the first two, global average pool, Linear 128, head) on 32x32x3
images, 10 classes; ``mlp`` = our default MLP (256-128) on Adult-sized rows
(104 features, 2 classes); ``mlp_wide`` = MLP 1024-1024 on 784 features
(10 classes). Weights are random (time does not depend on the values), masks
are the structured L1 top-k.

Timing: after warm-up, ``--rounds`` rounds; in each round every variant runs
``--inner`` forward passes back to back (asynchronous dispatch, one
``block_until_ready`` at the end) and round time / inner is one sample.
Variants are interleaved round by round so background load from other jobs
hits them alike; we report the median (and min) ms per batch.

``resnet18`` (width 32, CIFAR stem, 32 px), ``mobilenet_v2`` (width 0.5, 64 px) and ``vit`` (dim 128, 4 blocks of
4 heads, 32 px patches of 4) are compacted through their coupled groups (``sparsity/coupling.py``): residual
stages, depthwise blocks and attention heads lose units together; their "widths" column shows the build options.

Usage::

    python benchmarks/compaction.py            # writes benchmarks/results/compaction.{json,md}
    python benchmarks/compaction.py --quick    # fewer rounds
    python benchmarks/compaction.py --settings mlp,cnn,resnet18,mobilenet_v2,vit --batch 1,64,256
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.techniques import bilevel
from fairprune_jax.sparsity import compact
from fairprune_jax.sparsity.masks import apply_masks, map_named, prunable_template
from fairprune_jax.models import count_flops

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SETTINGS = {
    "cnn": {"model": "cnn", "input_shape": [32, 32, 3], "num_classes": 10,
            "options": {"channels": [32, 64, 128], "hidden": 128}},
    "mlp": {"model": "mlp", "input_shape": [104], "num_classes": 2, "options": {"hidden": [256, 128]}},
    "mlp_wide": {"model": "mlp", "input_shape": [784], "num_classes": 10, "options": {"hidden": [1024, 1024]}},
    # the traced zoo models (coupled groups: residual stages, depthwise blocks, attention heads pruned as one)
    "resnet18": {"model": "resnet18", "input_shape": [32, 32, 3], "num_classes": 10,
                 "options": {"width": 32, "stem": "cifar"}},
    "mobilenet_v2": {"model": "mobilenet_v2", "input_shape": [64, 64, 3], "num_classes": 5,
                     "options": {"width": 0.5}},
    "vit": {"model": "vit", "input_shape": [32, 32, 3], "num_classes": 10,
            "options": {"patch": 4, "dim": 128, "depth": 4, "heads": 4, "mlp": 256}},
}
SPARSITIES = (0.5, 0.7, 0.9)


def random_model(arch: dict, seed: int = 0):
    """A model with random weights and BatchNorm statistics (no initializer compiled)."""
    fm, ps, ss = compact.functional_model(dict(arch, format=compact.FORMAT, traced=arch["model"] in compact.TRACED))
    rng = np.random.default_rng(seed)

    def param(n, sd):
        fan_in = float(np.prod(sd.shape[:-1])) if len(sd.shape) > 1 else 1.0
        base = 1.0 if n.endswith("scale") else 0.0
        return jnp.asarray(base + rng.normal(size=sd.shape) / np.sqrt(fan_in), jnp.float32)

    def stat(n, sd):
        return jnp.asarray(rng.uniform(0.5, 1.5, sd.shape) if n.endswith("var") else 0.1 * rng.normal(size=sd.shape),
                           jnp.float32)

    return fm, map_named(param, ps), map_named(stat, ss)


def structured_masks(fm, params, sparsity: float, state=None):
    groups = (compact.model_unit_groups(fm, params, state) if fm.name in compact.TRACED
              else compact.unit_groups(fm.name, params))
    template = compact.structured_template(groups, prunable_template(params))
    counts = bilevel.unit_keep_counts(params, template, sparsity, "uniform", True)
    _, masks = bilevel.initial_scores_and_masks(params, template, counts, groups)
    return masks


def macs(fm, params, state) -> float:
    return float(sum(count_flops(fm, params, state).values()))


def bench_setting(name: str, arch: dict, batch: int, rounds: int, inner: int, warmup: int) -> list[dict]:
    fm, params, state = random_model(arch)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(batch, *arch["input_shape"])), jnp.float32)
    dense_fwd = jax.jit(lambda p, s, xx: fm.apply(p, s, xx, train=False)[0])
    variants = {"dense": (dense_fwd, params, state)}
    meta = {"dense": {"macs": macs(fm, params, state), "params": sum(int(np.size(v)) for v in jax.tree.leaves(params)),
                      "max_abs_diff": 0.0}}
    for s in SPARSITIES:
        masks = structured_masks(fm, params, s, state)
        c = compact.compact(fm, params, state, masks, options=arch["options"])
        cfwd = jax.jit(lambda p, st, xx, _fm=c.fm: _fm.apply(p, st, xx, train=False)[0])
        ref = dense_fwd(apply_masks(params, masks), state, x)
        diff = float(jnp.max(jnp.abs(cfwd(c.params, c.model_state, x) - ref)))
        key = f"compact@{s:g}"
        variants[key] = (cfwd, c.params, c.model_state)
        meta[key] = {"macs": compact.flops(c), "params": c.num_params, "max_abs_diff": diff,
                     "widths": c.arch["options"]}
    for fn, p, st in variants.values():          # compile + warm up
        for _ in range(warmup):
            fn(p, st, x).block_until_ready()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, (fn, p, st) in variants.items():
            t = time.perf_counter()
            out = None
            for _ in range(inner):
                out = fn(p, st, x)
            out.block_until_ready()
            samples[k].append((time.perf_counter() - t) / inner * 1e3)
    dense_ms = statistics.median(samples["dense"])
    rows = []
    for k in variants:
        med = statistics.median(samples[k])
        flop_red = meta["dense"]["macs"] / meta[k]["macs"]
        speedup = dense_ms / med
        rows.append({"setting": name, "variant": k, "sparsity": 0.0 if k == "dense" else float(k.split("@")[1]),
                     "batch": batch, "ms_median": med, "ms_min": min(samples[k]),
                     "macs_per_example": meta[k]["macs"], "params": meta[k]["params"],
                     "flop_reduction": flop_red, "speedup": speedup, "speedup_over_flop_reduction": speedup / flop_red,
                     "within_30pct": bool(speedup >= 0.7 * flop_red), "max_abs_diff": meta[k]["max_abs_diff"],
                     "widths": meta[k].get("widths", arch["options"]), "samples": len(samples[k])})
    return rows


def first_conv_breakdown(batch: int, rounds: int, inner: int, widths=(32, 16, 10, 3)) -> list[dict]:
    """The CNN's first layer alone (3x3 conv on 32x32x3 + BN-ReLU + 2x2 max pool) at the compacted widths.

    Explains the CNN's speedup floor: on XLA:CPU a conv with few channels
    runs far below the machine's MAC rate, so this layer's time falls much
    less than its MACs when channels are removed.
    """
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(2).normal(size=(batch, 32, 32, 3)), jnp.float32)

    @jax.jit
    def layer(xx, k):
        y = jax.lax.conv_general_dilated(xx, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return nnx.max_pool(jax.nn.relu(y * 1.1 + 0.1), (2, 2), strides=(2, 2))

    ks = {c: jnp.full((3, 3, 3, c), 0.1, jnp.float32) for c in widths}
    for c in widths:
        layer(x, ks[c]).block_until_ready()
    samples = {c: [] for c in widths}
    for _ in range(rounds):
        for c in widths:
            t = time.perf_counter()
            out = None
            for _ in range(inner):
                out = layer(x, ks[c])
            out.block_until_ready()
            samples[c].append((time.perf_counter() - t) / inner * 1e3)
    base = statistics.median(samples[widths[0]])
    return [{"out_channels": c, "macs_per_example": 32 * 32 * 27 * c, "ms_median": statistics.median(samples[c]),
             "mac_reduction": widths[0] / c, "speedup": base / statistics.median(samples[c])} for c in widths]


def markdown(rows: list[dict], env: dict, breakdown: list[dict] | None = None) -> str:
    lines = ["# Compaction: dense vs physically pruned models", "",
             f"CPU: {env['cpu']} ({env['cores']} cores visible), jax {env['jax']}, "
             f"median of {rows[0]['samples']} interleaved rounds; MACs = conv/linear multiply-accumulates per example.",
             "", "| setting | batch | variant | widths | MMACs/ex | params | FLOP reduction | ms/batch (median) | speedup | "
             "speedup / FLOP red. | within 30% | max abs diff |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        w = ", ".join(f"{k}={v}" for k, v in r["widths"].items())
        lines.append(f"| {r['setting']} | {r['batch']} | {r['variant']} | {w} | {r['macs_per_example'] / 1e6:.3f} | {r['params']} | "
                     f"{r['flop_reduction']:.2f}x | {r['ms_median']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['speedup_over_flop_reduction']:.2f} | {'yes' if r['within_30pct'] else 'no'} | "
                     f"{r['max_abs_diff']:.1e} |")
    if breakdown:
        lines += ["", "CNN first layer alone (conv 3x3, 3 -> C channels on 32x32, BN-ReLU, max pool), same batch:", "",
                  "| C | MACs/ex | MAC reduction | ms/batch (median) | speedup |", "|---:|---:|---:|---:|---:|"]
        for b in breakdown:
            lines.append(f"| {b['out_channels']} | {b['macs_per_example']} | {b['mac_reduction']:.1f}x | "
                         f"{b['ms_median']:.3f} | {b['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def load_note(env: dict) -> str:
    """The load average line under the table: whether other jobs shared the cores while it was measured."""
    busy = env["load_avg_start"][0] > 0.5 * (env["cores"] or 1)     # the end's includes the benchmark's own
    return (f"\nLoad average (1, 5, 15 min) at start {tuple(round(x, 2) for x in env['load_avg_start'])}, end "
            f"{tuple(round(x, 2) for x in env['load_avg_end'])}: "
            + ("other jobs shared the cores.\n" if busy else "nothing else ran on the cores (the benchmark's own "
               "load only).\n"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="cnn,mlp,mlp_wide", help="comma-separated: " + ", ".join(SETTINGS))
    ap.add_argument("--batch", default="256", help="batch size(s), comma-separated, e.g. 1,64,256")
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="11 rounds of 3")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the CNN first-layer diagnosis")
    ap.add_argument("--out", default=str(RESULTS), help="results folder ('' to write nothing)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.inner = 11, 3
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        raise SystemExit(f"unknown setting(s) {bad}; valid: {', '.join(SETTINGS)}")
    env = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "jax": jax.__version__,
           "backend": jax.default_backend(), "load_avg_start": os.getloadavg()}
    rows = []
    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    for n in names:
        for b in batches:
            t = time.perf_counter()
            rows += bench_setting(n, SETTINGS[n], b, args.rounds, args.inner, args.warmup)
            print(f"{n} at batch {b}: {time.perf_counter() - t:.0f} s", flush=True)
    breakdown = None
    if "cnn" in names and not args.no_breakdown:
        breakdown = first_conv_breakdown(batches[-1], args.rounds, args.inner)
    env["load_avg_end"] = os.getloadavg()
    md = markdown(rows, env, breakdown)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compaction.json").write_text(json.dumps({"env": env, "rows": rows, "first_conv": breakdown},
                                                        indent=2) + "\n")
        (out / "compaction.md").write_text(md + load_note(env))
        print(f"wrote {out / 'compaction.json'} and compaction.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
