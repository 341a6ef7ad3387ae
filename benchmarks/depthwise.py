"""MobileNet-V2's depthwise convolutions: XLA's grouped convolution vs the shifted per-channel sums.

Times one jitted training step (gradient of the cross-entropy) and one forward pass of MobileNet-V2 with each
``depthwise`` implementation (``models.nets.depthwise_impl``) on random inputs, after compiling, and checks that
both give the same logits. The two implementations share parameters, so a model trained with one runs with the
other.

    python benchmarks/depthwise.py [--width 0.35] [--size 64] [--batch 128] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fairprune_jax.models.nets import MobileNetV2


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))                     # compile and warm up
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / repeats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.35)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    x = jax.random.normal(jax.random.key(0), (a.batch, a.size, a.size, 3))
    y = jnp.zeros((a.batch,), jnp.int32)
    rows, logits = [], {}
    for impl in ("grouped", "shifted"):
        model = MobileNetV2(3, a.classes, width=a.width, depthwise=impl, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(st, x, y, graphdef=graphdef):
            out = nnx.merge(graphdef, st)(x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

        grad = jax.jit(jax.grad(loss))
        forward = jax.jit(lambda st, x, graphdef=graphdef: nnx.merge(graphdef, st)(x))
        logits[impl] = np.asarray(forward(state, x))
        rows.append((impl, timed(grad, state, x, y, repeats=a.repeats), timed(forward, state, x, repeats=a.repeats)))
    print(f"MobileNet-V2 width {a.width}, {a.size} px, batch {a.batch}, {jax.default_backend()} "
          f"({jax.device_count()} device)")
    print("| depthwise | training step (s) | forward (s) |\n|---|---:|---:|")
    for impl, step, fwd in rows:
        print(f"| {impl} | {step:.3f} | {fwd:.3f} |")
    print(f"speed-up: step {rows[0][1] / rows[1][1]:.2f}x, forward {rows[0][2] / rows[1][2]:.2f}x; "
          f"max |logit difference| {np.abs(logits['grouped'] - logits['shifted']).max():.2e}")


if __name__ == "__main__":
    main()
