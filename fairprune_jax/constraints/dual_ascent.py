"""Pieces of the dual step: the rule that keeps unobserved constraints' multipliers and optimizer state
(:func:`select_observed`) and the nuPI controller as an optax transformation (:func:`nupi`). The dual step
itself is :class:`dual.Dual` (``constrained.dual_optimizer`` and ``constrained.capped`` build one).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax


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
