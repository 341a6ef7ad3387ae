"""random_crop_flip: vectorized, jit-able random crops and flips of NHWC batches."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairprune_jax.data.augment import random_crop_flip


def _candidates(img: np.ndarray, pad: int) -> list[np.ndarray]:
    """Every crop (and its mirror) of the zero-padded image: the only valid outputs."""
    h, w = img.shape[:2]
    p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = p[dy:dy + h, dx:dx + w]
            out += [crop, crop[:, ::-1]]
    return out


def test_outputs_are_crops_of_the_padded_image_or_their_mirror():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 255, (16, 6, 7, 3)).astype(np.float32)  # no zeros inside, so padding is visible
    out = np.asarray(random_crop_flip(jax.random.key(0), x, pad=2))
    assert out.shape == x.shape and out.dtype == np.float32
    chosen = set()
    for i in range(len(x)):
        matches = [k for k, c in enumerate(_candidates(x[i], 2)) if np.array_equal(out[i], c)]
        assert matches, f"image {i} is not a crop of its padded self (or the mirror of one)"
        chosen.add(matches[0])
    assert len(chosen) > 4  # offsets and flips are drawn per image, not once per batch


def test_per_image_randomness_and_determinism():
    x = jnp.tile(jnp.arange(8 * 8, dtype=jnp.float32).reshape(1, 8, 8, 1) + 1, (64, 1, 1, 1))
    a = random_crop_flip(jax.random.key(1), x, pad=4)
    b = random_crop_flip(jax.random.key(1), x, pad=4)
    c = random_crop_flip(jax.random.key(2), x, pad=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    distinct = {np.asarray(a[i]).tobytes() for i in range(64)}
    assert len(distinct) > 20  # identical inputs get different crops


def test_pad_zero_only_flips_about_half():
    x = jnp.arange(200 * 3 * 4 * 2, dtype=jnp.float32).reshape(200, 3, 4, 2)
    out = np.asarray(random_crop_flip(jax.random.key(3), x, pad=0))
    xn = np.asarray(x)
    same = np.array([np.array_equal(out[i], xn[i]) for i in range(200)])
    flipped = np.array([np.array_equal(out[i], xn[i, :, ::-1]) for i in range(200)])
    assert (same ^ flipped).all()
    assert 60 < flipped.sum() < 140
    no_flip = random_crop_flip(jax.random.key(3), x, pad=0, flip=False)
    np.testing.assert_array_equal(no_flip, x)


def test_jit_and_dtype():
    f = jax.jit(random_crop_flip, static_argnames=("pad",))
    x = jnp.ones((5, 32, 32, 3), jnp.uint8)
    y = f(jax.random.key(0), x, pad=4)
    assert y.shape == x.shape and y.dtype == jnp.uint8
    # lowered once: one gather over the batch, no per-image unrolling
    hlo = jax.jit(lambda k, v: random_crop_flip(k, v, 4)).lower(jax.random.key(0), x).as_text()
    assert hlo.count("gather") <= 2
    with pytest.raises(ValueError, match="NHWC"):
        random_crop_flip(jax.random.key(0), jnp.ones((4, 4, 3)))
