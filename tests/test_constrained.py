"""Tests for fairprune_jax.constraints.constrained: Lagrangian machinery and group replay buffers."""
from __future__ import annotations

import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fairprune_jax.constraints import constrained as C


# ---------------------------------------------------------------------------
# Reference solver: min ||x - a||^2  s.t.  A_i x <= b_i (ineq) / A_i x == b_i (eq)
# ---------------------------------------------------------------------------

def qp_reference(a, A, b, eq):
    """KKT point by active-set enumeration (exact for this small strongly convex QP)."""
    n, m = a.size, A.shape[0]
    ineq = [i for i in range(m) if not eq[i]]
    for r in range(len(ineq) + 1):
        for S in itertools.combinations(ineq, r):
            act = sorted([i for i in range(m) if eq[i]] + list(S))
            Aa = A[act]
            M = np.block([[2 * np.eye(n), Aa.T], [Aa, np.zeros((len(act), len(act)))]])
            sol = np.linalg.solve(M, np.concatenate([2 * a, b[act]]))
            x, lam = sol[:n], np.zeros(m)
            lam[act] = sol[n:]
            g = A @ x - b
            if np.all(g[~eq] <= 1e-9) and np.all(lam[~eq] >= -1e-9):
                return x, lam
    raise AssertionError("no KKT point found")


A_QP = np.array([[1, 1, 1], [1, -1, 0], [0, 0, 1], [-1, 0, 0], [0, 1, -1]], np.float64)
B_QP = np.array([3.0, 0.5, 2.0, 1.0, 4.0])
A_VEC = np.array([3.0, 2.0, 1.0])


def make_problem(a, A, b):
    a, A, b = (jnp.asarray(z, jnp.float32) for z in (a, A, b))

    def problem_fn(x):
        v = A @ x - b
        return C.CMPOutput(loss=jnp.sum((x - a) ** 2), violation=v)

    return problem_fn


def run(problem_fn, dual, x0, steps, primal_lr, order="dual_primal", dual_state=None):
    primal_tx = optax.sgd(primal_lr)
    dual_state = dual.init() if dual_state is None else dual_state

    def body(carry, _):
        x, ost, ds = carry
        x, ost, ds, info = C.constrained_step(problem_fn, x, ost, primal_tx, dual, ds, order=order)
        return (x, ost, ds), info.lagrangian

    (x, _, ds), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))(
        (x0, primal_tx.init(x0), dual_state))
    return np.asarray(x), ds


def check_kkt(x, lam, a, A, b, eq, tol):
    g = A @ x - b
    stationarity = 2 * (x - a) + A.T @ lam
    assert np.max(np.abs(stationarity)) < tol, stationarity
    assert np.all(np.abs(g[eq]) < tol), g
    assert np.all(g[~eq] < tol), g                                 # primal feasibility
    assert np.all(lam[~eq] >= 0)                                   # dual feasibility
    assert np.max(np.abs(lam * g)[~eq], initial=0.0) < tol        # complementary slackness


# ---------------------------------------------------------------------------
# Convergence on convex problems with known solutions
# ---------------------------------------------------------------------------

def test_reference_problem_is_nondegenerate():
    x, lam = qp_reference(A_VEC, A_QP, B_QP, np.zeros(5, bool))
    g = A_QP @ x - B_QP
    np.testing.assert_allclose(x, [1.75, 1.25, 0.0], atol=1e-12)
    np.testing.assert_allclose(lam, [2.0, 0.5, 0, 0, 0], atol=1e-12)
    assert np.all(g[2:] < -1.0)          # clearly inactive


@pytest.mark.parametrize("order", ["dual_primal", "simultaneous"])
def test_inequality_gda_converges_to_kkt(order):
    eq = np.zeros(5, bool)
    x_ref, lam_ref = qp_reference(A_VEC, A_QP, B_QP, eq)
    dual = C.dual_optimizer(5, learning_rate=0.05)
    x, ds = run(make_problem(A_VEC, A_QP, B_QP), dual, jnp.zeros(3), 2000, 0.05, order=order)
    lam = np.asarray(ds.multipliers)
    np.testing.assert_allclose(x, x_ref, atol=1e-4)
    np.testing.assert_allclose(lam, lam_ref, atol=1e-4)
    assert np.all(lam[:2] > 0.4) and np.all(lam[2:] == 0.0)    # positive exactly on active
    check_kkt(x, lam, A_VEC, A_QP, B_QP, eq, 1e-4)


def test_equality_constraints_converge_with_negative_multiplier():
    A = np.array([[1, 1, 1], [1, -2, 0]], np.float64)
    b = np.array([1.0, 4.0])
    eq = np.ones(2, bool)
    x_ref, lam_ref = qp_reference(A_VEC, A, b, eq)
    # closed form: lam = 2 (A A^T)^-1 (A a - b)
    np.testing.assert_allclose(lam_ref, 2 * np.linalg.solve(A @ A.T, A @ A_VEC - b), atol=1e-10)
    assert lam_ref[1] < -1.0        # the sign must be free
    dual = C.dual_optimizer(2, equality=True, learning_rate=0.05)
    x, ds = run(make_problem(A_VEC, A, b), dual, jnp.zeros(3), 2000, 0.05)
    lam = np.asarray(ds.multipliers)
    np.testing.assert_allclose(x, x_ref, atol=1e-4)
    np.testing.assert_allclose(lam, lam_ref, atol=1e-4)
    check_kkt(x, lam, A_VEC, A, b, eq, 1e-4)


@pytest.mark.parametrize("mixed", [False, True])
def test_augmented_lagrangian_converges(mixed):
    eq = np.array([1, 0, 0, 0, 1], bool) if mixed else np.zeros(5, bool)
    x_ref, lam_ref = qp_reference(A_VEC, A_QP, B_QP, eq)
    dual = C.dual_optimizer(5, equality=eq, augmented=True, penalty_init=0.5,
                            penalty_growth=1.05, penalty_max=2.0)
    x, ds = run(make_problem(A_VEC, A_QP, B_QP), dual, jnp.zeros(3), 2000, 0.05)
    lam = np.asarray(ds.multipliers)
    rho = np.asarray(ds.penalty)
    assert np.all(rho >= 0.5) and np.all(rho <= 2.0)
    np.testing.assert_allclose(x, x_ref, atol=1e-4)
    np.testing.assert_allclose(lam, lam_ref, atol=1e-4)
    check_kkt(x, lam, A_VEC, A_QP, B_QP, eq, 1e-4)
    if mixed:
        assert lam[4] < -1.0


@pytest.mark.parametrize("init", ["zeros", "sgd"])
def test_nupi_converges_to_kkt(init):
    eq = np.zeros(5, bool)
    x_ref, lam_ref = qp_reference(A_VEC, A_QP, B_QP, eq)
    dual = C.dual_optimizer(5, tx=C.nupi(0.05, kp=2.0, ki=1.0, nu=0.5, init=init))
    x, ds = run(make_problem(A_VEC, A_QP, B_QP), dual, jnp.zeros(3), 2000, 0.05)
    lam = np.asarray(ds.multipliers)
    np.testing.assert_allclose(x, x_ref, atol=1e-4)
    np.testing.assert_allclose(lam, lam_ref, atol=1e-4)
    check_kkt(x, lam, A_VEC, A_QP, B_QP, eq, 1e-4)


# ---------------------------------------------------------------------------
# Dual step: projection, masking, nuPI, augmented Lagrangian
# ---------------------------------------------------------------------------

def test_projection_and_equality_sign():
    K = 6
    is_eq = np.array([0, 0, 0, 1, 1, 1], bool)
    dual = C.dual_optimizer(K, equality=is_eq, learning_rate=0.5)
    state = dual.init()
    rng = np.random.default_rng(0)
    saw_negative_eq = False
    update = jax.jit(dual.update)
    for _ in range(30):
        strict = rng.normal(size=K).astype(np.float32) * 2 - 0.5
        state = update(state, strict)
        lam = np.asarray(state.multipliers)
        assert np.all(lam[~is_eq] >= 0.0)
        saw_negative_eq |= bool(np.any(lam[is_eq] < 0))
    assert saw_negative_eq
    # projection is exact: a single big negative step lands on 0
    s2 = dual.update(dual.init(jnp.ones(K)), -10.0 * jnp.ones(K))
    np.testing.assert_array_equal(np.asarray(s2.multipliers), [0, 0, 0, -4, -4, -4])
    # init projects too
    np.testing.assert_array_equal(np.asarray(dual.init(-1.0 * jnp.ones(K)).multipliers),
                                  [0, 0, 0, -1, -1, -1])


@pytest.mark.parametrize("tx", ["sgd", "adam", "nupi_sgd_init", "clip_global"])
def test_unobserved_constraints_do_not_move(tx):
    K = 5
    tx = {"sgd": None, "adam": optax.adam(0.1),
          "nupi_sgd_init": C.nupi(0.1, kp=1.0, nu=0.3, init="sgd"),
          # not elementwise: an unobserved NaN would poison every coordinate
          "clip_global": optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))}[tx]
    dual = C.dual_optimizer(K, tx=tx, learning_rate=0.1, init_multiplier=0.3)
    update = jax.jit(dual.update)
    rng = np.random.default_rng(1)
    state = dual.init()
    for _ in range(20):
        obs = rng.random(K) < 0.5
        strict = rng.normal(size=K).astype(np.float32)
        strict[~obs] = np.nan                           # absent groups may be NaN: must not leak
        new = update(state, strict, obs)
        old_leaves, new_leaves = jax.tree.leaves(state), jax.tree.leaves(new)
        for o, n in zip(old_leaves, new_leaves):
            o, n = np.asarray(o), np.asarray(n)
            assert not np.any(np.isnan(n.astype(np.float64)))
            if n.shape == (K,):
                np.testing.assert_array_equal(n[~obs], o[~obs])
        state = new
    # nothing observed: the whole state, step counts included, is unchanged
    new = update(state, np.ones(K, np.float32), np.zeros(K, bool))
    for o, n in zip(jax.tree.leaves(state), jax.tree.leaves(new)):
        np.testing.assert_array_equal(np.asarray(n), np.asarray(o))
    # and observed ones do move
    new = update(state, np.ones(K, np.float32), np.array([1, 0, 0, 0, 0], bool))
    assert float(new.multipliers[0]) != float(state.multipliers[0])


@pytest.mark.parametrize("init", ["zeros", "sgd"])
@pytest.mark.parametrize("nu", [0.0, 0.7])
def test_nupi_kp0_is_exactly_gradient_ascent(init, nu):
    K, lr = 7, 0.03
    is_eq = np.array([0, 0, 0, 0, 1, 1, 1], bool)
    ga = C.dual_optimizer(K, equality=is_eq, learning_rate=lr)
    pi = C.dual_optimizer(K, equality=is_eq, tx=C.nupi(lr, kp=0.0, ki=1.0, nu=nu, init=init))
    sa, sb = ga.init(), pi.init()
    rng = np.random.default_rng(2)
    ua, ub = jax.jit(ga.update), jax.jit(pi.update)
    for _ in range(60):
        strict = rng.normal(size=K).astype(np.float32)
        obs = rng.random(K) < 0.7
        sa, sb = ua(sa, strict, obs), ub(sb, strict, obs)
        np.testing.assert_array_equal(np.asarray(sa.multipliers), np.asarray(sb.multipliers))
    assert np.any(np.asarray(sa.multipliers) != 0)


@pytest.mark.parametrize("init", ["zeros", "sgd"])
def test_nupi_matches_reference_recurrence(init):
    """Equality constraints (no projection): lam <- lam + eta*(ki e + kp (xi_t - xi_{t-1}))."""
    K, eta, kp, ki, nu = 4, 0.1, 1.5, 0.7, 0.6
    dual = C.dual_optimizer(K, equality=True, tx=C.nupi(eta, kp=kp, ki=ki, nu=nu, init=init))
    state = dual.init()
    lam, xi, started = np.zeros(K), np.zeros(K), np.zeros(K, bool)
    rng = np.random.default_rng(3)
    for t in range(25):
        e = rng.normal(size=K)
        obs = rng.random(K) < 0.6
        obs[3] = t >= 10                                 # constraint 3 first observed late
        state = dual.update(state, e.astype(np.float32), obs)
        for k in np.flatnonzero(obs):
            xi_prev = xi[k] if (started[k] or init == "zeros") else e[k]
            xi_new = nu * xi_prev + (1 - nu) * e[k]
            lam[k] += eta * (ki * e[k] + kp * (xi_new - xi_prev))
            xi[k], started[k] = xi_new, True
        np.testing.assert_allclose(np.asarray(state.multipliers), lam, rtol=1e-5, atol=1e-6)
    # the first step: "zeros" -> (ki + kp(1-nu)) e_0 ; "sgd" -> ki e_0
    s1 = dual.update(dual.init(), jnp.ones(K))
    expected = eta * (ki + kp * (1 - nu)) if init == "zeros" else eta * ki
    np.testing.assert_allclose(np.asarray(s1.multipliers), expected, rtol=1e-6)


def test_nupi_is_an_optax_transformation_on_pytrees():
    tx = C.nupi(optax.constant_schedule(0.1), kp=1.0, nu=0.5)
    params = {"a": jnp.ones(3), "b": jnp.zeros((2, 2))}
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    upd, state = jax.jit(tx.update)(grads, state, params)
    # first step with zeros init: -eta (ki + kp (1-nu)) g
    np.testing.assert_allclose(np.asarray(upd["a"]), -0.1 * 1.5)
    assert int(state.count) == 1
    chained = optax.chain(optax.clip(0.5), C.nupi(0.1))
    upd, _ = chained.update(grads, chained.init(params), params)
    np.testing.assert_allclose(np.asarray(upd["b"]), -0.05)


def test_augmented_lagrangian_terms_and_weights():
    K = 6
    is_eq = np.array([0, 0, 0, 1, 1, 1], bool)
    dual = C.dual_optimizer(K, equality=is_eq, augmented=True, penalty_init=2.0)
    lam = np.array([1.0, 0.5, 0.0, 1.0, -1.0, 0.0], np.float32)
    state = dual.init(lam)
    v = np.array([0.3, -1.0, -0.2, 0.3, 0.5, -0.4], np.float32)
    rho = 2.0
    phr = np.where(is_eq, lam * v + rho / 2 * v ** 2,
                   (np.maximum(0, lam + rho * v) ** 2 - lam ** 2) / (2 * rho))
    np.testing.assert_allclose(float(C.lagrangian(jnp.float32(1.5), v, state)), 1.5 + phr.sum(), rtol=1e-6)
    w = np.asarray(C.multiplier_weights(v, state))
    np.testing.assert_allclose(w, np.where(is_eq, lam + rho * v, np.maximum(0, lam + rho * v)), rtol=1e-6)
    auto = jax.grad(lambda vv: C.lagrangian(0.0, vv, state))(jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(auto), w, rtol=1e-6, atol=1e-7)
    # dual step: lam + rho * strict, projected for inequalities
    new = dual.update(state, v)
    np.testing.assert_allclose(np.asarray(new.multipliers),
                               np.where(is_eq, lam + rho * v, np.maximum(0, lam + rho * v)), rtol=1e-6)
    # plain Lagrangian: no quadratic term, weights are the multipliers
    plain = C.dual_optimizer(K, equality=is_eq).init(lam)
    np.testing.assert_allclose(float(C.lagrangian(1.5, v, plain)), 1.5 + float(lam @ v), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(C.multiplier_weights(v, plain)), lam)


def test_penalty_growth_rule():
    dual = C.dual_optimizer(4, equality=np.array([0, 0, 1, 0], bool), augmented=True,
                            penalty_init=1.0, penalty_growth=2.0, penalty_max=5.0,
                            penalty_decrease=0.5, penalty_tol=1e-3)
    s = dual.init()
    obs = np.array([1, 1, 1, 0], bool)
    # first observation: nothing to compare with -> no growth
    s = dual.update(s, np.array([1.0, -1.0, -1.0, 1.0], np.float32), obs)
    np.testing.assert_array_equal(np.asarray(s.penalty), [1, 1, 1, 1])
    # 0: 0.6 > 0.5 * 1.0 (not halved) -> grows; 1: feasible inequality -> never;
    # 2: |h| 0.4 <= 0.5*1 -> enough decrease, no growth; 3: unobserved -> frozen
    s = dual.update(s, np.array([0.6, -2.0, 0.4, 9.0], np.float32), obs)
    np.testing.assert_array_equal(np.asarray(s.penalty), [2, 1, 1, 1])
    for _ in range(5):                  # stagnating violation: grows, capped at penalty_max
        s = dual.update(s, np.array([0.6, -2.0, 0.4, 9.0], np.float32), obs)
    np.testing.assert_array_equal(np.asarray(s.penalty), [5, 1, 5, 1])
    # below tolerance: no growth
    s2 = dual.update(dual.update(dual.init(), np.full(4, 1e-4, np.float32), obs),
                     np.full(4, 1e-4, np.float32), obs)
    np.testing.assert_array_equal(np.asarray(s2.penalty), [1, 1, 1, 1])


# ---------------------------------------------------------------------------
# One step: dual_primal vs simultaneous, one forward pass
# ---------------------------------------------------------------------------

def test_dual_primal_uses_updated_multipliers_single_step():
    a = jnp.array([3.0, 2.0, 1.0])
    A = jnp.asarray(A_QP, jnp.float32)
    b = jnp.asarray(B_QP, jnp.float32)
    calls = []

    def problem_fn(x):
        calls.append(1)                                   # counts traces/evaluations
        v = A @ x - b
        strict = jnp.round(v)                             # non-differentiable strict value
        observed = jnp.array([1, 1, 0, 1, 1], bool)
        return jnp.sum((x - a) ** 2), v, strict, observed, {"v": v}

    dual = C.dual_optimizer(5, learning_rate=0.5, init_multiplier=1.0)
    ds = dual.init()
    x = jnp.array([2.0, -1.0, 0.5])
    grads = jax.jit(C.constrained_grads, static_argnums=(0, 2, 4))
    g_alt, ds_alt, info_alt = grads(problem_fn, x, dual, ds, "dual_primal")
    assert len(calls) == 1                                # ONE forward pass (traced once)
    g_sim, ds_sim, info_sim = grads(problem_fn, x, dual, ds, "simultaneous")

    v = np.asarray(A @ x - b)
    lam_old = np.ones(5)
    lam_new = np.maximum(0.0, lam_old + 0.5 * np.round(v))
    lam_new[2] = 1.0                                      # unobserved: unchanged
    assert np.abs(lam_new - lam_old).max() > 0.4          # the two modes must differ
    # both modes take the same dual step
    np.testing.assert_allclose(np.asarray(ds_alt.multipliers), lam_new, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ds_alt.multipliers), np.asarray(ds_sim.multipliers))
    grad_f = 2 * (np.asarray(x) - np.asarray(a))
    np.testing.assert_allclose(np.asarray(g_alt), grad_f + A_QP.T @ lam_new, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_sim), grad_f + A_QP.T @ lam_old, rtol=1e-5, atol=1e-5)
    # and they equal autodiff of the Lagrangian with the new / old multipliers
    lag = jax.jit(lambda st: jax.grad(lambda p: C.lagrangian(*problem_fn(p)[:2], st))(x))
    np.testing.assert_allclose(np.asarray(g_alt), np.asarray(lag(ds_alt)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_sim), np.asarray(lag(ds)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(info_alt.multipliers), lam_new, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(info_sim.multipliers), lam_old)
    np.testing.assert_allclose(np.asarray(info_alt.aux["v"]), v, rtol=1e-6)
    np.testing.assert_allclose(float(info_alt.lagrangian),
                               float(np.sum((x - a) ** 2)) + lam_new @ v, rtol=1e-5)


def test_constrained_step_augmented_alternating_matches_autodiff():
    """AL primal gradient (nonlinear in v) through the single VJP, pytree params."""
    a = jnp.array([3.0, 2.0, 1.0])
    A = jnp.asarray(A_QP, jnp.float32)
    b = jnp.asarray(B_QP, jnp.float32)

    def problem_fn(p):
        x = p["w"] * p["s"]
        return C.CMPOutput(jnp.sum((x - a) ** 2), A @ x - b)   # strict/observed default

    dual = C.dual_optimizer(5, equality=np.array([1, 0, 0, 0, 0], bool), augmented=True,
                            penalty_init=1.5, init_multiplier=0.2)
    ds = dual.init()
    params = {"w": jnp.array([2.0, -1.0, 0.5]), "s": jnp.float32(1.3)}
    tx = optax.sgd(0.1)
    step = jax.jit(lambda p, o, d: C.constrained_step(problem_fn, p, o, tx, dual, d))
    new_p, _, new_ds, info = step(params, tx.init(params), ds)
    expect_ds = dual.update(ds, A @ (params["w"] * params["s"]) - b)
    g = jax.grad(lambda p: C.lagrangian(*problem_fn(p)[:2], expect_ds))(params)
    for k in params:
        np.testing.assert_allclose(np.asarray(new_p[k]), np.asarray(params[k] - 0.1 * g[k]),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_ds.multipliers), np.asarray(expect_ds.multipliers))
    assert bool(jnp.all(info.observed))


def test_bad_order_and_output_rejected():
    dual = C.dual_optimizer(1)
    with pytest.raises(ValueError, match="dual_primal"):
        C.constrained_grads(lambda p: (p ** 2, p[None]), jnp.float32(1.0), dual, dual.init(), order="x")
    with pytest.raises(TypeError):
        C.constrained_grads(lambda p: p ** 2, jnp.float32(1.0), dual, dual.init())


# ---------------------------------------------------------------------------
# Group replay buffer
# ---------------------------------------------------------------------------

_update = jax.jit(C.buffer_update)
_means = jax.jit(C.buffer_means)


class RefBuffer:
    """Sequential reference: per-group ring arrays, filled sample by sample."""

    def __init__(self, G, k):
        self.k = k
        self.values = np.zeros((G, k), np.float32)
        self.pos = np.zeros(G, np.int64)
        self.count = np.zeros(G, np.int64)
        self.recent = [collections.deque(maxlen=k) for _ in range(G)]

    def update(self, values, g, w):
        for v, gi, wi in zip(values, g, w):
            if wi == 0 or not (0 <= gi < len(self.pos)):
                continue
            self.values[gi, self.pos[gi]] = v
            self.pos[gi] = (self.pos[gi] + 1) % self.k
            self.count[gi] = min(self.count[gi] + 1, self.k)
            self.recent[gi].append(v)


def assert_buffers_equal(buf, ref):
    np.testing.assert_array_equal(np.asarray(buf.values), ref.values)
    np.testing.assert_array_equal(np.asarray(buf.pos), ref.pos)
    np.testing.assert_array_equal(np.asarray(buf.count), ref.count)
    means, full = _means(buf)
    exp = np.array([np.mean(d) if d else 0.0 for d in ref.recent], np.float32)
    np.testing.assert_allclose(np.asarray(means), exp, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(full), ref.count == ref.k)




# few (G, k) shapes: each one compiles the jitted update once
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(Gk=st.sampled_from([(1, 3), (4, 1), (4, 3)]),
       seed=st.integers(0, 2 ** 31 - 1), n_batches=st.integers(1, 6))
def test_buffer_matches_python_reference(Gk, seed, n_batches):
    (G, k), B = Gk, 12
    rng = np.random.default_rng(seed)
    buf, ref = C.buffer_init(G, k), RefBuffer(G, k)
    for _ in range(n_batches):
        values = rng.integers(0, 2, B).astype(np.float32) + rng.random(B).astype(np.float32)
        skew = rng.random() < 0.5                         # often many samples of one group
        g = (np.where(rng.random(B) < 0.7, 0, rng.integers(0, G, B)) if skew
             else rng.integers(0, G, B)).astype(np.int32)
        w = np.where(rng.random(B) < 0.25, 0.0, rng.choice([1.0, 0.5], B)).astype(np.float32)
        buf = _update(buf, values, g, w)
        ref.update(values, g, w)
        assert_buffers_equal(buf, ref)


def test_buffer_more_than_k_in_one_batch_keeps_last_k():
    buf = C.buffer_init(2, 4)
    buf = _update(buf, jnp.array([9.0]), jnp.array([0]))           # pos[0] = 1
    vals = jnp.arange(10, dtype=jnp.float32)
    buf = _update(buf, vals, jnp.array([0, 1, 0, 0, 0, 0, 0, 1, 0, 0]))
    # group 0 then gets 0,2,3,4,5,6,8,9 written from slot 1: the last 4 land on slots 1,2,3,0
    assert sorted(np.asarray(buf.values[0]).tolist()) == [5.0, 6.0, 8.0, 9.0]
    np.testing.assert_array_equal(np.asarray(buf.values[0]), [9.0, 5.0, 6.0, 8.0])
    np.testing.assert_array_equal(np.asarray(buf.pos), [1, 2])
    np.testing.assert_array_equal(np.asarray(buf.count), [4, 2])
    means, full = _means(buf)
    np.testing.assert_allclose(np.asarray(means), [7.0, 4.0])
    np.testing.assert_array_equal(np.asarray(full), [True, False])


def test_buffer_write_plan_has_no_colliding_writes():
    """Scatter order with duplicate indices is unspecified (GPU): kept writes must be distinct."""
    rng = np.random.default_rng(5)
    plan = jax.jit(C._buffer_write_plan)
    for G, k, B in [(3, 2, 40), (5, 4, 64), (1, 1, 7)]:
        buf = C.buffer_init(G, k)._replace(pos=jnp.asarray(rng.integers(0, k, G), jnp.int32))
        g = rng.integers(0, G, B).astype(np.int32)
        w = (rng.random(B) < 0.8).astype(np.float32)
        row, slot, n = (np.asarray(z) for z in plan(buf, g, w))
        kept = row < G
        pairs = list(zip(row[kept], slot[kept]))
        assert len(pairs) == len(set(pairs))
        valid_n = np.bincount(g[w > 0], minlength=G)
        np.testing.assert_array_equal(n, valid_n)
        np.testing.assert_array_equal(np.bincount(row[kept], minlength=G), np.minimum(valid_n, k))
        for gi in range(G):                               # the kept ones are the LAST k of the group
            idx = np.flatnonzero((g == gi) & (w > 0))
            np.testing.assert_array_equal(np.flatnonzero(kept & (g == gi)), idx[len(idx) - min(len(idx), k):])


def test_buffer_weights_zero_and_bad_groups_ignored():
    buf = C.buffer_init(3, 2)
    buf = _update(buf, jnp.array([1.0, 5.0, 7.0, 3.0]), jnp.array([0, 0, 3, -1]),
                          jnp.array([0.0, 1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(buf.values), [[5, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(np.asarray(buf.count), [1, 0, 0])
    means, full = _means(buf)
    np.testing.assert_array_equal(np.asarray(means), [5, 0, 0])
    assert not bool(jnp.any(full))


def test_buffer_scales_to_1000_groups():
    G, k, B = 1000, 40, 512
    rng = np.random.default_rng(4)
    buf, ref = C.buffer_init(G, k), RefBuffer(G, k)
    for i in range(4):
        g = (rng.integers(0, 20, B) if i % 2 else rng.integers(0, G, B)).astype(np.int32)
        values = (rng.random(B) < 0.8).astype(np.float32)
        w = (rng.random(B) < 0.9).astype(np.float32)
        buf = _update(buf, values, g, w)
        ref.update(values, g, w)
    assert_buffers_equal(buf, ref)
    assert 0 < int(np.sum(np.asarray(_means(buf)[1]))) <= 20


def test_buffer_drives_observed_mask_in_a_step():
    """Strict violation read from the buffer; a group counts as observed once full."""
    G, k = 3, 2
    dual = C.dual_optimizer(G, learning_rate=1.0)

    def make_problem(buf, correct, g):
        def problem_fn(p):
            new_buf = C.buffer_update(buf, correct, g)
            acc, full = C.buffer_means(new_buf)
            v = p * jnp.ones(G)
            return v.sum(), v, 0.5 - acc, full, new_buf
        return problem_fn

    buf, ds = C.buffer_init(G, k), dual.init()
    problem_fn = make_problem(buf, jnp.array([0.0, 0.0, 1.0]), jnp.array([0, 0, 1]))
    _, ds, info = jax.jit(lambda p, d: C.constrained_grads(problem_fn, p, dual, d))(jnp.float32(1.0), ds)
    np.testing.assert_array_equal(np.asarray(info.observed), [True, False, False])
    np.testing.assert_allclose(np.asarray(ds.multipliers), [0.5, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(info.aux.count), [2, 1, 0])
