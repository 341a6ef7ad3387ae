"""A user's own module compacted after a structured method: same class, smaller layers, same logits; saved
and loaded."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fairprune_jax
from fairprune_jax.sparsity import compact


class ResidualMLP(nnx.Module):
    """Linear -> ReLU, a residual block (its two Linear layers' outputs added), a head."""

    def __init__(self, din: int, width: int, classes: int, *, rngs: nnx.Rngs):
        self.inp = nnx.Linear(din, width, rngs=rngs)
        self.a = nnx.Linear(width, 2 * width, rngs=rngs)
        self.b = nnx.Linear(2 * width, width, rngs=rngs)
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.inp(x))
        h = h + self.b(nnx.relu(self.a(h)))
        return self.head(h)


def _data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    g = rng.integers(0, 2, n).astype(np.int32)
    y = (x[:, 0] + 0.5 * x[:, 1] * g > 0).astype(np.int32)
    return x, y, g


def test_a_users_residual_module_compacts_saves_and_loads(tmp_path):
    x, y, g = _data()
    model = ResidualMLP(6, 16, 2, rngs=nnx.Rngs(0))
    res = fairprune_jax.prune(model, train=(x, y, g), method="structured_magnitude", sparsity=0.5, epochs=2,
                              finetune_epochs=1, progress=False)
    small = res.compact(x[:8])
    assert type(small) is ResidualMLP
    # the residual pair (inp, b) is one coupled group; a is its own: every width halves
    assert small.inp.kernel.value.shape == (6, 8) and small.b.kernel.value.shape[-1] == 8
    assert small.a.kernel.value.shape == (8, 16) and small.head.kernel.value.shape == (8, 2)
    want = np.asarray(res.model(jnp.asarray(x)))
    got = np.asarray(small(jnp.asarray(x)))
    assert np.abs(got - want).max() <= 1e-5
    compact.save_module(small, tmp_path / "small")
    again = compact.load_module(tmp_path / "small", like=ResidualMLP(6, 16, 2, rngs=nnx.Rngs(1)))
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(x))), got)
    with pytest.raises(ValueError, match="like= is a"):
        compact.load_module(tmp_path / "small", like=nnx.Linear(6, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(FileNotFoundError, match="save_module"):
        compact.load_module(tmp_path / "nothing", like=model)


def test_compacting_unstructured_masks_is_refused():
    x, y, g = _data()
    res = fairprune_jax.prune(ResidualMLP(6, 16, 2, rngs=nnx.Rngs(0)), train=(x, y, g), method="magnitude",
                              sparsity=0.5, epochs=1, finetune_epochs=1, progress=False)
    with pytest.raises(ValueError, match="structured method"):
        res.compact(x[:8])
