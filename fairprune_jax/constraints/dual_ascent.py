"""The dual optimizers: one multiplier per constraint moved by any optax transformation on the strict violations
(plain gradient ascent by default) and projected back onto the feasible set, only where a constraint was
observed (:func:`dual_optimizer`, :func:`select_observed`); the nuPI controller as an optax transformation
(:func:`nupi`); and a ceiling on every multiplier (:func:`capped`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.constraints.lagrangian import DualState, project_multipliers


class DualOptimizer(NamedTuple):
    """``init(multipliers=None) -> DualState``;
    ``update(state, strict_violation, observed=None) -> DualState``."""

    init: Callable[..., DualState]
    update: Callable[..., DualState]


def select_observed(new: Any, old: Any, observed: Any, like: Any) -> Any:
    """Keep ``old`` where a constraint is unobserved: the one rule of both dual steps (this module's and
    :mod:`dual`'s). Subtrees shaped like the multipliers ``like`` (a vector, or a dict of them: per-constraint
    optimizer state such as momenta or nuPI's error) are selected elementwise by ``observed`` (mirroring
    ``like``); every other leaf (step counts) advances only when at least one constraint is observed."""
    pdef = jax.tree.structure(like)
    pshapes = [jnp.shape(x) for x in jax.tree.leaves(like)]
    any_obs = jnp.any(jnp.stack([jnp.any(o) for o in jax.tree.leaves(observed)]))

    def like_params(x):
        return jax.tree.structure(x) == pdef and [jnp.shape(v) for v in jax.tree.leaves(x)] == pshapes

    def sel(n, o):
        if like_params(n):
            return jax.tree.map(lambda a, b, m: jnp.where(m, a, b), n, o, observed)
        return jnp.where(any_obs, n, o)

    return jax.tree.map(sel, new, old, is_leaf=like_params)


def dual_optimizer(
    num_constraints: int,
    *,
    equality: bool | Any = False,
    tx: optax.GradientTransformation | None = None,
    learning_rate: float | None = None,
    init_multiplier: float = 0.0,
    augmented: bool = False,
    penalty_init: float = 1.0,
    penalty_growth: float = 1.01,
    penalty_max: float = 1e3,
    penalty_decrease: float = 0.95,
    penalty_tol: float = 1e-4,
    dtype=jnp.float32,
) -> DualOptimizer:
    """Dual ascent on K Lagrange multipliers.

    Args:
      num_constraints: K.
      equality: ``False`` (all inequalities ``g <= 0``), ``True`` (all
        equalities ``h == 0``) or a (K,) bool array mixing both.
      tx: any optax ``GradientTransformation`` for the multipliers, fed the
        gradient ``-strict_violation`` (``-rho * strict_violation`` when
        augmented) since optax minimizes; e.g. ``optax.adam(1e-3)`` or
        :func:`nupi`. Default: ``optax.sgd(learning_rate)`` -- plain gradient
        ascent ``lam <- lam + lr * strict_violation``.
      learning_rate: for the default ``tx``; default 1e-2, or 1.0 when
        augmented so that the step is exactly ``lam <- lam + rho * strict``.
        Ignored when ``tx`` is given.
      init_multiplier: initial value of every multiplier (projected).
      augmented: augmented Lagrangian. The primal objective gets the quadratic
        terms of :func:`lagrangian` and the dual step becomes ``lam <- proj(lam
        + rho * strict_violation)``. Penalty growth rule, per constraint and only
        on observed steps: with the feasibility measure ``m = |h|`` (equality) or
        ``max(0, g)`` (inequality) of ``strict_violation``, if ``m > penalty_tol``
        and ``m > penalty_decrease * m_prev`` (the violation did not shrink by
        the factor ``penalty_decrease`` since the constraint's last
        observation), ``rho <- min(rho * penalty_growth, penalty_max)``. The
        multipliers are updated with the old ``rho``, then ``rho`` grows.
        Set ``penalty_growth=1`` for a constant penalty.

    The update order is: gradient -> ``tx`` -> projection -> masking of
    unobserved constraints (multipliers and per-constraint optimizer state
    restored exactly).
    """
    K = int(num_constraints)
    is_eq = np.broadcast_to(np.asarray(equality, dtype=bool), (K,)).copy()
    if augmented:
        if not penalty_init > 0:
            raise ValueError(f"augmented Lagrangian needs penalty_init > 0, got {penalty_init}")
        if penalty_growth < 1:
            raise ValueError(f"penalty_growth must be >= 1, got {penalty_growth}")
    if tx is None:
        lr = learning_rate if learning_rate is not None else (1.0 if augmented else 1e-2)
        tx = optax.sgd(lr)

    def init(multipliers=None) -> DualState:
        is_eq_arr = jnp.asarray(is_eq)
        if multipliers is None:
            lam = jnp.full((K,), init_multiplier, dtype)
        else:
            lam = jnp.broadcast_to(jnp.asarray(multipliers, dtype), (K,))
        lam = project_multipliers(lam, is_eq_arr)
        return DualState(
            multipliers=lam,
            opt_state=tx.init(lam),
            penalty=jnp.full((K,), penalty_init if augmented else 0.0, dtype),
            is_equality=is_eq_arr,
            prev_violation=jnp.full((K,), jnp.inf, dtype),
            count=jnp.zeros((), jnp.int32),
        )

    def update(state: DualState, strict_violation, observed=None) -> DualState:
        if isinstance(strict_violation, DualState):   # called as optax's update(updates, state, params)
            raise TypeError(
                "constrained.dual_optimizer is not an optax GradientTransformation: its update is "
                "(state, strict_violation, observed), so it cannot sit in optax.chain. For a chainable dual step use "
                "fairprune_jax.constraints.dual: only_observed(optax.chain(optax.clip(1.0), "
                "ascent(learning_rate=1e-2), project())) or dual.Dual(num_constraints, tx=...)")
        lam = state.multipliers
        obs = (jnp.ones((K,), bool) if observed is None
               else jnp.broadcast_to(jnp.asarray(observed, bool), (K,)))
        # zero (not just mask) unobserved entries so NaNs from absent groups cannot leak
        strict = jnp.where(obs, jnp.asarray(strict_violation, lam.dtype), 0.0)
        ascent = strict * state.penalty if augmented else strict
        updates, new_opt = tx.update(-ascent, state.opt_state, lam)
        new_lam = project_multipliers(optax.apply_updates(lam, updates), state.is_equality)
        new_lam = jnp.where(obs, new_lam, lam)
        new_opt = select_observed(new_opt, state.opt_state, obs, lam)
        penalty, prev = state.penalty, state.prev_violation
        if augmented:
            m = jnp.where(state.is_equality, jnp.abs(strict), jnp.maximum(strict, 0.0))
            grow = obs & (m > penalty_tol) & (m > penalty_decrease * prev)
            penalty = jnp.where(grow, jnp.minimum(penalty * penalty_growth, penalty_max), penalty)
            prev = jnp.where(obs, m, prev)
        return DualState(multipliers=new_lam, opt_state=new_opt, penalty=penalty,
                         is_equality=state.is_equality, prev_violation=prev,
                         count=state.count + jnp.any(obs).astype(jnp.int32))

    return DualOptimizer(init, update)


# ---------------------------------------------------------------------------
# nuPI
# ---------------------------------------------------------------------------

class NuPIState(NamedTuple):
    count: chex.Array        # int32 step count (for learning-rate schedules)
    xi: Any                  # EMA of the error, same tree as the params
    initialized: Any         # bool tree: has this coordinate taken a step yet ("sgd" init)


def nupi(
    learning_rate: optax.ScalarOrSchedule,
    kp: float | chex.Array = 0.0,
    ki: float | chex.Array = 1.0,
    nu: float = 0.0,
    init: str = "zeros",
) -> optax.GradientTransformation:
    """The nuPI controller (Sohrabi et al., "On PI Controllers for Updating
    Lagrange Multipliers in Constrained Optimization", ICML 2024) as an optax
    ``GradientTransformation``.

    With the error ``e_t`` (the incoming gradient; for the dual this is
    ``-strict_violation``, so the result is ascent on the constraint):

        xi_t   = nu * xi_{t-1} + (1 - nu) * e_t
        update = -eta * (ki * e_t + kp * (xi_t - xi_{t-1}))

    i.e. ``theta_{t+1} = theta_t + update`` (for the multipliers, followed by
    the projection in :func:`dual_optimizer`). ``kp``/``ki`` may be scalars or
    arrays broadcastable to the params (per-constraint gains).

    Initialization ``init``:

    * ``"zeros"`` (default): ``xi_{-1} = 0``. This is the paper's PI controller
      in its closed form ``lam_{t+1} = lam_0 + ki * sum_{s<=t} e_s + kp * xi_t``
      (zero initial error state); the first step is
      ``-eta * (ki + kp * (1 - nu)) * e_0``.
    * ``"sgd"``: ``xi_{-1} = e_0`` (so ``xi_0 = e_0`` and the first step is
      exactly gradient descent ``-eta * ki * e_0``; cooper's default). Tracked per
      coordinate, so a constraint first observed late also starts with a plain
      gradient step.

    With ``kp = 0`` and ``ki = 1`` this is exactly ``optax.sgd(eta)`` (whatever
    ``nu``; bit-identical, also under jit, when the gains are Python numbers);
    ``kp = ki = 1, nu = 0`` is the optimistic gradient method.
    """
    if init not in ("zeros", "sgd"):
        raise ValueError(f"init must be 'zeros' or 'sgd', got {init!r}")
    if not -1.0 < nu < 1.0:
        raise ValueError(f"nu must lie in (-1, 1), got {nu}")

    # Static gains are special-cased so that nupi(kp=0, ki=1) builds the very same
    # computation as optax.sgd: bit-identical even after XLA fusion under jit.
    static_kp_zero = isinstance(kp, (int, float)) and kp == 0
    static_ki_one = isinstance(ki, (int, float)) and ki == 1

    def init_fn(params):
        return NuPIState(
            count=jnp.zeros((), jnp.int32),
            xi=jax.tree.map(jnp.zeros_like, params),
            initialized=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), bool), params),
        )

    def update_fn(updates, state, params=None):
        del params
        eta = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def leaf(e, xi_prev, done):
            if init == "sgd":
                xi_prev = jnp.where(done, xi_prev, e)
            xi = nu * xi_prev + (1.0 - nu) * e
            signal = e if static_ki_one else ki * e
            if not static_kp_zero:
                signal = signal + kp * (xi - xi_prev)
            u = -eta * signal
            return u.astype(e.dtype), xi.astype(e.dtype), jnp.ones_like(done)

        out = jax.tree.map(leaf, updates, state.xi, state.initialized)
        treedef = jax.tree.structure(updates)
        u, xi, done = (jax.tree.unflatten(treedef, list(x))
                       for x in zip(*treedef.flatten_up_to(out)))
        return u, NuPIState(count=optax.safe_increment(state.count), xi=xi, initialized=done)

    return optax.GradientTransformation(init_fn, update_fn)


def capped(dual: DualOptimizer, max_multiplier: float) -> DualOptimizer:
    """``dual`` with every multiplier projected onto ``[.., max_multiplier]`` after each update.

    A ceiling keeps a multiplier from integrating without bound when its
    constraint cannot be met (or is read from a noisy estimate): the primal
    weight of a constraint never exceeds ``max_multiplier``. ``inf`` (or any
    value <= 0) returns ``dual`` unchanged. The projection runs inside
    ``update``, so :func:`constrained_grads` in ``"alternating"`` mode weights
    the primal step with the capped values.
    """
    cap = float(max_multiplier)
    if not (0 < cap < float("inf")):
        return dual

    def init(multipliers=None) -> DualState:
        st = dual.init(multipliers)
        return st._replace(multipliers=jnp.minimum(st.multipliers, cap))

    def update(state: DualState, strict_violation, observed=None) -> DualState:
        st = dual.update(state, strict_violation, observed)
        return st._replace(multipliers=jnp.minimum(st.multipliers, cap))

    return DualOptimizer(init, update)
