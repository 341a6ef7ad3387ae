"""The library's pieces in a user's own training loop, given the inputs a user's loop produces (a fourth
tester's tour, docs/HARDENING.md): float group ids, a NaN violation, a reference of another size, an optax chain
with the pruner's wrapper not last, params in another container than the optimizer's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fairprune_jax.constraints import constrained, dual
from fairprune_jax.constraints.surrogates import group_means
from fairprune_jax.methods.ceag import ceag_terms
from fairprune_jax.metrics import counts
from fairprune_jax.sparsity import pruning
from fairprune_jax.training.state import Carry

G = 3
REF = {"loss_g": jnp.zeros(G), "acc_g": jnp.ones(G), "loss": 0.0, "acc": 1.0}


def _terms(g):
    per = jnp.arange(1.0, 7.0)
    correct = jnp.asarray([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    extra = Carry(buffer=constrained.buffer_init(G, 2), overall=constrained.buffer_init(1, 4))
    terms = ceag_terms(G, REF, eps=0.02)
    return jax.jit(lambda g: terms(per, per.mean(), correct, {"g": g, "w": jnp.ones(6)}, extra))(g)


def test_float_group_ids_are_refused_where_the_step_is_traced():
    """A float id (a standardised group column) was truncated by an int32 cast, merging groups without a word;
    every helper a user's step calls refuses it when traced, and integer ids of any width still work."""
    floats = jnp.asarray([0.5, 0.0, 1.0, 1.0, 2.0, 2.7])
    with pytest.raises(TypeError, match="group ids must be integers; got dtype float32"):
        _terms(floats)
    with pytest.raises(TypeError, match="must be integers"):
        jax.jit(lambda g: group_means(jnp.ones(6), g, jnp.ones(6), G))(floats)
    with pytest.raises(TypeError, match="must be integers"):
        constrained.buffer_update(constrained.buffer_init(G, 2), jnp.ones(6), floats, jnp.ones(6))
    with pytest.raises(TypeError, match="must be integers"):
        counts.group_counts(jnp.zeros((6, 2)), jnp.zeros(6, jnp.int32), floats, G)
    ok = _terms(np.asarray([0, 0, 1, 1, 2, 2], np.int64))
    assert np.asarray(ok.observed).shape == (G,)


def test_a_reference_of_another_size_is_named_when_the_terms_are_built():
    ref = {"loss_g": jnp.zeros(2), "acc_g": jnp.ones(2), "loss": 0.0, "acc": 1.0}
    with pytest.raises(ValueError, match=r"ref\['loss_g'\] has shape \(2,\), not \(3,\)"):
        ceag_terms(3, ref, 0.02)


def test_a_non_finite_violation_never_moves_its_multiplier():
    """A user's 0/0 for a group absent from the batch (observed left out) made that multiplier NaN for the rest
    of the run; a non-finite violation is now unobserved, and the others still move."""
    d = dual.Dual(3, tx=dual.ascent(learning_rate=0.1))
    s = d.init()
    for _ in range(3):
        s = d.update(s, jnp.asarray([0.1, jnp.nan, -0.1]))
    np.testing.assert_allclose(np.asarray(s.multipliers), [0.03, 0.0, 0.0], atol=1e-7)
    s = d.update(s, jnp.asarray([0.1, jnp.inf, 0.3]))
    assert np.isfinite(np.asarray(s.multipliers)).all()
    assert np.isfinite(float(d.lagrangian(1.0, jnp.asarray([0.1, 0.0, 0.3]), s)))


class Net(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(8, 16, rngs=rngs)
        self.b = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


def _train(tx, steps=30):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    gd, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    st = tx.init(params)

    @jax.jit
    def step(p, s, xb, yb):
        g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            nnx.merge(gd, p, rest)(xb), yb).mean())(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        idx = rng.integers(0, 256, 32)
        params, st = step(params, st, x[idx], y[idx])
    return params, st


def test_summary_says_when_the_masks_and_the_weights_disagree():
    """With the wrapper not last in the chain the summary read the masks (0.8) while no weight was zero; it now
    counts the pruned entries that are not zero and warns; with the wrapper last there are none."""
    pr = pruning.Pruner(sparsity=0.8, schedule=pruning.cubic(end=20, frequency=10))
    params, st = _train(optax.chain(pr.wrap_optax(optax.scale_by_adam()), optax.scale(-1e-2)))
    with pytest.warns(UserWarning, match="not zero in these params.*put the pruner's wrapper last"):
        out = pruning.Pruner.summary(params, st)
    assert out["pruned_nonzero"] > 0 and out["sparsity_prunable"] == pytest.approx(0.8, abs=0.01)
    fixed = pruning.Pruner.apply_masks(params, st)
    assert pruning.Pruner.summary(fixed, st)["pruned_nonzero"] == 0
    pr2 = pruning.Pruner(sparsity=0.8, schedule=pruning.cubic(end=20, frequency=10))
    params2, st2 = _train(pr2.wrap_optax(optax.adam(1e-2)))
    assert pruning.Pruner.summary(params2, st2)["pruned_nonzero"] == 0


def test_apply_masks_matches_leaves_by_name_across_containers():
    """Masks built on a pure dict apply to the same weights held in an nnx.State (names drop '.value')."""
    pr = pruning.Pruner(sparsity=0.5)
    params, st = _train(pr.wrap_optax(optax.adam(1e-2)), steps=2)
    state = nnx.state(Net(nnx.Rngs(1)), nnx.Param)
    masked = pruning.Pruner.apply_masks(state, st)
    kernel = np.asarray(nnx.to_pure_dict(masked)["a"]["kernel"])
    mask = np.asarray(pruning.Pruner.masks(st)["a"]["kernel"])
    assert ((kernel == 0) | (mask != 0)).all() and (kernel[mask == 0] == 0).all()
