"""Composable dual optimisation (fairprune_jax.constraints.dual) against constrained.py's dual optimizer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairprune_jax.constraints import constrained, dual

K = 4


def _violations(steps, seed=0):
    """Per step: strict violations (NaN where unobserved, as an absent group gives) and observed masks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        obs = rng.random(K) < 0.7
        v = rng.normal(0.05, 0.3, K).astype(np.float32)
        out.append((jnp.asarray(np.where(obs, v, np.nan)), jnp.asarray(obs)))
    return out


@pytest.mark.parametrize("kind", ["sgd", "adam", "nupi", "augmented", "equality"])
def test_one_group_matches_constrained_dual_optimizer_bit_for_bit(kind):
    old_tx = {"sgd": optax.sgd(0.1), "adam": optax.adam(0.05), "nupi": constrained.nupi(0.1, kp=1.0, nu=0.3),
              "augmented": None, "equality": optax.sgd(0.1)}[kind]
    old = constrained.dual_optimizer(K, tx=old_tx, augmented=kind == "augmented", equality=kind == "equality",
                                     penalty_growth=1.2)
    new = dual.Dual(dual.Constraint(K, equality=kind == "equality"),
                    tx=None if old_tx is None else dual.ascent(old_tx),
                    formulation=dual.Augmented(penalty_growth=1.2) if kind == "augmented" else dual.Lagrangian())
    # eager: the same operations, bit for bit; under jit XLA may contract multiply-adds differently in
    # the two graphs (1 ulp), so there the multipliers agree to float32 rounding
    for jit in (lambda f: f, jax.jit):
        so, sn = old.init(), new.init()
        step_old, step_new = jit(old.update), jit(new.update)
        for v, obs in _violations(12):
            so, sn = step_old(so, v, obs), step_new(sn, v, obs)
            if jit is jax.jit:
                np.testing.assert_allclose(np.asarray(so.multipliers), np.asarray(sn.multipliers), rtol=1e-6)
                continue
            np.testing.assert_array_equal(np.asarray(so.multipliers), np.asarray(sn.multipliers))
            np.testing.assert_array_equal(np.asarray(so.penalty), np.asarray(sn.penalty))
            assert int(so.count) == int(sn.count)
        assert np.all(np.isfinite(np.asarray(sn.multipliers)))
        if kind != "equality":
            assert np.all(np.asarray(sn.multipliers) >= 0)
        if jit is not jax.jit:
            v = jnp.linspace(-0.5, 0.5, K)
            assert float(new.lagrangian(2.0, v, sn)) == float(constrained.lagrangian(2.0, v, so))
            np.testing.assert_array_equal(new.weights(v, sn), constrained.multiplier_weights(v, so))


def test_unobserved_constraints_keep_multiplier_and_optimizer_state():
    tx = dual.only_observed(optax.chain(dual.ascent(optax.adam(0.1)), dual.project()))
    lam = jnp.zeros(K)
    state = tx.init(lam)
    obs = jnp.array([True, False, True, False])
    for _ in range(3):
        upd, state = tx.update(jnp.array([1.0, jnp.nan, -1.0, 1.0]), state, lam, observed=obs)
        lam = optax.apply_updates(lam, upd)
    assert float(lam[0]) > 0 and float(lam[2]) == 0.0            # ascent, then projection onto >= 0
    assert float(lam[1]) == 0.0 and float(lam[3]) == 0.0          # never observed: never moved
    adam_state = state[0][0]
    assert np.all(np.asarray(adam_state.mu)[[1, 3]] == 0) and np.all(np.asarray(adam_state.nu)[[1, 3]] == 0)
    assert int(adam_state.count) == 3
    _, state2 = tx.update(jnp.ones(K), state, lam, observed=jnp.zeros(K, bool))   # nothing observed
    assert int(state2[0][0].count) == 3


def test_ascent_chains_with_optax_clip():
    """The brief's example: optax.chain(optax.clip(1.0), <dual ascent>) builds and updates."""
    tx = optax.chain(optax.clip(1.0), dual.ascent(learning_rate=0.5), dual.project())
    lam = jnp.zeros(3)
    upd, _ = tx.update(jnp.array([4.0, 0.2, -3.0]), tx.init(lam), lam)
    np.testing.assert_allclose(optax.apply_updates(lam, upd), [0.5, 0.1, 0.0])
    capped = optax.chain(dual.ascent(learning_rate=1.0), dual.project(max_multiplier=0.3))
    upd, _ = capped.update(jnp.array([4.0, 0.2, -3.0]), capped.init(lam), lam)
    np.testing.assert_allclose(optax.apply_updates(lam, upd), [0.3, 0.2, 0.0])
    # the old dual optimizer is not an optax transformation: a clear error, not an AttributeError
    old = optax.chain(optax.clip(1.0), constrained.dual_optimizer(3))
    with pytest.raises(TypeError, match="fairprune_jax.constraints.dual"):
        old.update(jnp.ones(3), old.init(jnp.zeros(3)), jnp.zeros(3))
    # through Dual: a clipped ascent moves each multiplier by at most lr * 1
    d = dual.Dual(3, tx=optax.chain(optax.clip(1.0), dual.ascent(learning_rate=0.5)))
    s = d.update(d.init(), jnp.array([4.0, 0.2, -3.0]))
    np.testing.assert_allclose(s.multipliers, [0.5, 0.1, 0.0])


def test_named_groups_in_one_problem():
    """CEAG-like per-group inequalities and an equality constraint held by one dual."""
    d = dual.Dual({"gap": dual.Constraint(3), "budget": dual.Constraint(1, equality=True)},
                  tx=dual.ascent(learning_rate=0.5), max_multiplier=10.0)
    s = d.init()
    assert set(s.multipliers) == {"gap", "budget"} and s.multipliers["gap"].shape == (3,)
    step = jax.jit(d.update)
    for _ in range(2):
        s = step(s, {"gap": jnp.array([0.4, -1.0, jnp.nan]), "budget": jnp.array([-0.2])},
                 {"gap": jnp.array([True, True, False]), "budget": True})
    np.testing.assert_allclose(s.multipliers["gap"], [0.4, 0.0, 0.0])
    np.testing.assert_allclose(s.multipliers["budget"], [-0.2])      # equality: may go negative
    v = {"gap": jnp.array([1.0, 1.0, 1.0]), "budget": jnp.array([2.0])}
    assert float(d.lagrangian(1.0, v, s)) == pytest.approx(1.0 + 0.4 - 0.4)


def test_dual_primal_grads_matches_constrained_grads():
    """One vjp, dual first: the same gradients and multipliers as constrained.constrained_grads."""
    x = jax.random.normal(jax.random.key(0), (64, 3))
    g = jnp.arange(64) % K
    params = {"w": jnp.array([0.5, -0.3, 0.2]), "b": jnp.array(0.1)}

    def problem(p):
        per = (x @ p["w"] + p["b"] - 1.0) ** 2
        loss = jnp.mean(per)
        loss_g = jax.ops.segment_sum(per, g, K) / jax.ops.segment_sum(jnp.ones_like(per), g, K)
        return loss, loss_g - loss - 0.01, None, jnp.array([True, True, False, True]), {"n": 1}

    # the methods' path (constrained.constrained_grads, here with the order's earlier name "alternating") and a
    # user's (dual.dual_primal_grads) are one computation
    for order, mode in (("dual_primal", "alternating"), ("simultaneous", "simultaneous")):
        old = constrained.dual_optimizer(K, learning_rate=0.5)
        new = dual.Dual(K, tx=dual.ascent(learning_rate=0.5))
        so, sn = old.init(0.2), new.init(0.2)
        for _ in range(3):
            go, so, io = constrained.constrained_grads(problem, params, old, so, mode)
            gn, sn, i_n = dual.dual_primal_grads(problem, params, new, sn, order)
            for a, b in zip(jax.tree.leaves(go), jax.tree.leaves(gn)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            np.testing.assert_array_equal(np.asarray(so.multipliers), np.asarray(sn.multipliers))
            assert float(io.lagrangian) == float(i_n.lagrangian) and i_n.aux == {"n": 1}
    with pytest.raises(ValueError, match="order"):
        dual.dual_primal_grads(problem, params, new, sn, "primal_dual")


@pytest.mark.parametrize("formulation", [dual.Lagrangian(), dual.Augmented(penalty_init=2.0)])
def test_dual_primal_grads_with_named_groups_is_the_gradient_of_the_lagrangian(formulation):
    """Per-group gap constraints and an equality budget in one problem: the one-vjp gradient equals
    jax.grad of the Lagrangian at the updated multipliers."""
    x = jax.random.normal(jax.random.key(1), (48, 3))
    g = jnp.arange(48) % 3
    params = {"w": jnp.array([0.4, -0.2, 0.3])}

    def parts(p):
        per = (x @ p["w"] - 1.0) ** 2
        loss = per.mean()
        gap = jax.ops.segment_sum(per, g, 3) / 16.0 - loss
        return loss, {"gap": gap, "budget": jnp.sum(p["w"] ** 2, keepdims=True) - 0.1}

    def problem(p):
        loss, v = parts(p)
        return loss, v, None, {"gap": jnp.array([True, False, True]), "budget": jnp.array([True])}

    d = dual.Dual({"gap": 3, "budget": dual.Constraint(1, equality=True)}, formulation=formulation,
                  tx=dual.ascent(learning_rate=0.3))
    state = d.init({"gap": 0.1, "budget": 0.2})
    grads, new_state, info = jax.jit(lambda p, s: dual.dual_primal_grads(problem, p, d, s))(params, state)
    assert float(new_state.multipliers["gap"][1]) == pytest.approx(0.1)      # unobserved: unchanged
    want = jax.grad(lambda p: d.lagrangian(*parts(p), new_state))(params)
    np.testing.assert_allclose(grads["w"], want["w"], rtol=1e-5, atol=1e-6)
    assert float(info.lagrangian) == pytest.approx(float(d.lagrangian(*parts(params), new_state)), rel=1e-6)


def test_the_methods_dual_step_is_dual_Dual():
    """One dual implementation: the methods' constructors build a dual.Dual, whose state is lagrangian's
    DualState; a ceiling is a Dual field, and the capped values are what the step returns."""
    from fairprune_jax.constraints import constrained, lagrangian
    from fairprune_jax.constraints.constrained import DualOptions

    d = constrained.dual_from_options(DualOptions(dual_lr=0.5), 3, equality=False)
    assert isinstance(d, dual.Dual) and constrained.DualOptimizer is dual.Dual
    st = d.init()
    assert isinstance(st, lagrangian.DualState) and dual.MultiplierState is lagrangian.DualState
    capped = constrained.capped(d, 0.3)
    assert isinstance(capped, dual.Dual) and capped.max_multiplier == 0.3
    s2 = capped.update(capped.init(), jnp.asarray([1.0, -1.0, 0.2]))
    np.testing.assert_allclose(np.asarray(s2.multipliers), [0.3, 0.0, 0.1], rtol=1e-6)
    hash(capped)                                                # a static argument of jax.jit
    with pytest.raises(TypeError, match="not an optax"):
        d.update(st, st)
