"""Tenth tester's round (structured pruning and compaction of a user's own NNX model; docs/HARDENING.md rows 184-):
what the refusal note counts as dense, a per-channel GroupNorm compacted, integer-id inputs named."""
from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fairprune_jax


def _data(shape, n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    return x, (x.reshape(n, -1)[:, 0] > 0).astype(np.int32), rng.integers(0, 2, n)


class ResMLP(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(6, 16, rngs=rngs)
        self.a = nnx.Linear(16, 32, rngs=rngs)
        self.b = nnx.Linear(32, 16, rngs=rngs)
        self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.inp(x))
        return self.out(h + self.b(nnx.relu(self.a(h))))


def test_a_residual_branchs_kernel_is_not_reported_as_staying_dense():
    """b/kernel adds into inp/kernel's channels (one group, both pruned), yet the note said it 'cannot lose whole
    units and stay[s] dense' and predicted 28% overall for a model pruned to 49%."""
    x, y, g = _data((6,))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = fairprune_jax.prune(ResMLP(nnx.Rngs(0)), train=(x, y, g), method="structured_magnitude",
                                  sparsity=0.5, epochs=1, finetune_epochs=1, progress=False)
    assert not [w for w in seen if "cannot lose whole units" in str(w.message)]
    assert res.report["sparsity"]["layers"]["b/kernel"]["sparsity"] == pytest.approx(0.5)


class GroupNormed(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=8, rngs=rngs)         # one group per channel
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.gn(self.conv(x))).mean(axis=(1, 2)))


def test_a_per_channel_group_norm_compacts_with_its_new_group_count(tmp_path):
    """The tracer lets a GroupNorm of one group per channel lose channels; the rebuilt module kept num_groups=8
    for 4 channels and failed at its first call."""
    x, y, g = _data((6, 6, 1))
    res = fairprune_jax.prune(GroupNormed(nnx.Rngs(0)), train=(x, y, g), method="structured_magnitude",
                              sparsity=0.5, epochs=1, finetune_epochs=1, progress=False)
    small = res.compact(x[:8])
    kept = small.conv.kernel[...].shape[-1]
    assert kept < 8 and small.gn.num_groups == kept
    res.model.eval()
    small.eval()
    np.testing.assert_allclose(np.asarray(small(jnp.asarray(x[:32]))), np.asarray(res.model(jnp.asarray(x[:32]))),
                               atol=1e-5)


class Tokens(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.embed(x).mean(axis=1))


def test_integer_ids_for_an_embedding_are_named_with_the_fix():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=(100, 5)).astype(np.int32)
    with pytest.raises(ValueError, match=r"features as float32 .* must cast them in its __call__"):
        fairprune_jax.prune(Tokens(nnx.Rngs(0)), train=(x, (x[:, 0] > 9).astype(int), x[:, 1] % 2),
                            method="magnitude", epochs=1, progress=False)


class Einsum(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (6, 16)))
        self.shared = nnx.Linear(16, 16, rngs=rngs)
        self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(jnp.einsum("bi,io->bo", x, self.w))
        return self.out(self.shared(nnx.relu(self.shared(h))))       # one layer called twice


def test_flops_count_a_users_einsum_matrices_and_both_calls_of_a_shared_layer():
    """An einsum layer's w (not named kernel) was left out of the FLOPs (flops_fraction 1.0 for a model pruned to
    half), and a layer called twice was counted once."""
    from fairprune_jax.models import count_flops
    from fairprune_jax.running.api import wrap_model
    fm, p, s = wrap_model(Einsum(nnx.Rngs(0)), (6,), 2)
    flops = count_flops(fm, p, s)
    assert flops == {"w": 6 * 16, "shared/kernel": 2 * 16 * 16, "out/kernel": 16 * 2}


class Grouped(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.c2(nnx.relu(self.c1(x)))).mean(axis=(1, 2)))


def test_a_model_without_removable_units_is_not_told_to_drop_exclusions_it_never_set():
    x, y, g = _data((6, 6, 1))
    with pytest.raises(ValueError, match="the model has no removable units .*Not removable: channel space of c1 "
                                         "passes through a grouped"):
        fairprune_jax.prune(Grouped(nnx.Rngs(0)), train=(x, y, g), method="structured_magnitude", sparsity=0.5,
                            epochs=1, progress=False)
