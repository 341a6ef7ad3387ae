"""The constrained problem's terms and the Lagrangian: what a problem function returns (:class:`CMPOutput`: the
loss, a differentiable proxy of each constraint, the strict value that drives the dual step, which constraints
were observed), the multipliers with their penalties (:class:`DualState`, held in a training state's optimizer
state as :class:`Multipliers`), the projection onto the feasible multipliers, and the Lagrangian the primal step
minimizes with its gradient with respect to the violations (:func:`lagrangian`, :func:`multiplier_weights`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax


class CMPOutput(NamedTuple):
    """What a problem function returns (a plain tuple in this order works too).

    ``violation`` must be finite for all K constraints (return 0 for a group
    absent from the batch): it enters the primal Lagrangian multiplied by its
    multiplier whether observed or not. ``strict_violation`` (default:
    ``violation``) and ``observed`` (default: all True) are not differentiated.
    """

    loss: chex.Array
    violation: chex.Array
    strict_violation: chex.Array | None = None
    observed: chex.Array | None = None
    aux: Any = None


def _as_cmp(out) -> CMPOutput:
    if isinstance(out, CMPOutput):
        return out
    if isinstance(out, (tuple, list)) and 2 <= len(out) <= 5:
        return CMPOutput(*out)
    raise TypeError("problem_fn must return CMPOutput or a tuple "
                    "(loss, violation[, strict_violation[, observed[, aux]]])")


# ---------------------------------------------------------------------------
# Dual state and the Lagrangian
# ---------------------------------------------------------------------------

class DualState(NamedTuple):
    """State of the multipliers; a pytree, carried through ``lax.scan``/jit.

    ``penalty`` is the augmented-Lagrangian coefficient ``rho`` per constraint
    (all 0 when the augmented Lagrangian is off: ``penalty > 0`` is what turns
    the quadratic terms on). ``is_equality`` is constant, carried so that
    :func:`lagrangian` needs nothing but the state. ``prev_violation`` is the
    feasibility measure at each constraint's last observation (for the penalty
    growth rule; ``inf`` before the first). ``count`` counts dual steps in
    which at least one constraint was observed.
    """

    multipliers: chex.Array
    opt_state: optax.OptState
    penalty: chex.Array
    is_equality: chex.Array
    prev_violation: chex.Array
    count: chex.Array


class StepInfo(NamedTuple):
    """What one constrained step reports (:func:`dual.dual_primal_grads`)."""

    loss: chex.Array
    lagrangian: chex.Array          # value with the multipliers used by the primal step
    violation: chex.Array
    strict_violation: chex.Array
    observed: chex.Array
    multipliers: chex.Array         # multipliers used by the primal step
    aux: Any


class Multipliers(NamedTuple):
    """The constraint multipliers of a training run, held in its optimizer state (``TrainState.opt_state``)
    around the primal optimizer's own state ``inner``, beside the masks (:class:`pruning.MaskState`):
    ``TrainState.dual`` reads them there and ``TrainState.with_dual`` puts new ones there."""

    dual: DualState
    inner: Any


def project_multipliers(multipliers: chex.Array, is_equality: chex.Array) -> chex.Array:
    """Inequality multipliers onto ``>= 0``; equality multipliers untouched."""
    return jnp.where(is_equality, multipliers, jnp.maximum(multipliers, 0.0))


def _terms(violation, lam, rho, is_eq):
    """Per-constraint Lagrangian terms.

    Plain (rho == 0): ``lam * v``. Augmented (rho > 0): ``lam * s + rho/2 * s**2``
    with ``s = v`` for equalities and ``s = max(v, -lam/rho)`` for
    inequalities. The latter is the Powell-Hestenes-Rockafellar form
    ``(max(0, lam + rho*v)**2 - lam**2) / (2*rho)`` written with the slack
    eliminated: ``lam*v + rho/2*v**2`` where ``lam + rho*v >= 0`` and
    ``-lam**2/(2*rho)`` (constant in v) elsewhere.
    """
    rho_safe = jnp.where(rho > 0, rho, 1.0)
    s = jnp.where(is_eq, violation, jnp.maximum(violation, -lam / rho_safe))
    aug = lam * s + 0.5 * rho * s * s
    return jnp.where(rho > 0, aug, lam * violation)


def lagrangian(loss: chex.Array, violation: chex.Array, state: DualState) -> chex.Array:
    """The scalar the primal step minimizes.

    ``loss + sum_k lam_k * v_k`` or, with the augmented Lagrangian on, ``loss +
    sum_k lam_k * s_k + rho_k/2 * s_k**2`` (see :func:`_terms`: ``s_k = h_k``
    for equalities, ``s_k = max(g_k, -lam_k/rho_k)`` for inequalities, i.e. the
    PHR form with ``max(0, lam + rho*g)``). Multipliers and penalties are
    constants (``stop_gradient``); differentiable through ``loss`` and
    ``violation``.
    """
    lam = jax.lax.stop_gradient(state.multipliers)
    rho = jax.lax.stop_gradient(state.penalty)
    v = jnp.asarray(violation)
    return loss + jnp.sum(_terms(v, lam, rho, state.is_equality).astype(jnp.result_type(loss, v)))


def multiplier_weights(violation: chex.Array, state: DualState) -> chex.Array:
    """``d lagrangian / d violation``: the weight each constraint's proxy gets.

    ``lam`` (plain); ``lam + rho*h`` (augmented, equality);
    ``max(0, lam + rho*g)`` (augmented, inequality).
    """
    lam, rho = state.multipliers, state.penalty
    v = jnp.asarray(violation, lam.dtype)
    shifted = lam + rho * v
    aug = jnp.where(state.is_equality, shifted, jnp.maximum(shifted, 0.0))
    return jax.lax.stop_gradient(jnp.where(rho > 0, aug, lam))
