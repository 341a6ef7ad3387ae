"""Data augmentation in JAX, vectorized over the batch (jit-friendly, static shapes)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def random_crop_flip(rng: jax.Array, x: jax.Array, pad: int = 4, *, flip: bool = True,
                     mode: str = "constant") -> jax.Array:
    """Random ``pad``-pixel-translated crops plus random horizontal flips of NHWC images.

    Each image is padded by ``pad`` on every side (zeros for ``mode="constant"``;
    any ``jnp.pad`` mode works, e.g. ``"reflect"``), cropped back to ``H x W``
    at an independent random offset in ``[0, 2 * pad]`` per axis, and flipped
    left-right with probability 1/2 (``flip=False`` turns flipping off). One
    gather for the whole batch, no per-image Python loop; ``pad``, ``flip`` and
    ``mode`` must be static under ``jax.jit``. Returns an array of ``x``'s shape
    and dtype.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"random_crop_flip expects NHWC images (4 dims); got shape {x.shape}")
    pad = int(pad)
    if pad < 0:
        raise ValueError(f"pad must be >= 0; got {pad}")
    n, h, w, _ = x.shape
    k_y, k_x, k_f = jax.random.split(rng, 3)
    if pad:
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
        oy = jax.random.randint(k_y, (n,), 0, 2 * pad + 1)
        ox = jax.random.randint(k_x, (n,), 0, 2 * pad + 1)
    else:
        xp = x
        oy = jnp.zeros((n,), jnp.int32)
        ox = jnp.zeros((n,), jnp.int32)
    cols = jnp.arange(w)
    if flip:
        flips = jax.random.bernoulli(k_f, 0.5, (n,))
        cols = jnp.where(flips[:, None], cols[::-1][None, :], cols[None, :])  # (n, w)
    else:
        cols = jnp.broadcast_to(cols[None, :], (n, w))
    rows = oy[:, None] + jnp.arange(h)[None, :]  # (n, h)
    cols = ox[:, None] + cols  # (n, w)
    batch = jnp.arange(n)[:, None, None]
    return xp[batch, rows[:, :, None], cols[:, None, :]]
