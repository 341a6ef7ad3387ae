"""Constrained optimisation that composes with optax.

The Lagrange multipliers are the dual's params, and the dual step is an optax
``GradientTransformation`` built from small pieces:

* :func:`ascent` -- gradient ascent with any optax optimizer: the incoming
  "gradient" is ``dL/dlam``, i.e. the (strict) violations, and the inner
  optimizer, which minimizes, is fed its negative;
* :func:`project` -- inequality multipliers onto ``>= 0`` (optionally capped);
  equality multipliers untouched; put it last;
* :func:`only_observed` -- wraps any transformation (a whole chain) so that
  constraints not observed this step (``observed=`` passed to ``update``, as
  optax's extra arguments) keep their multiplier and their optimizer state
  bit-for-bit.

So ``only_observed(optax.chain(optax.clip(1.0), ascent(learning_rate=1e-2), project()))``
is a dual optimizer, and ``optax.chain(optax.clip(1.0), ascent(...))`` works as any chain does.

The formulation is a value: :class:`Lagrangian` (``loss + sum lam * v``) or
:class:`Augmented` (the PHR augmented Lagrangian with a per-constraint penalty
and its growth rule). :class:`Dual` ties the pieces to *named constraint
groups* (``{"gap": Constraint(G), "budget": Constraint(1, equality=True)}``:
the multipliers are then a dict of vectors), and :func:`dual_primal_grads`
is the one-``vjp`` training step of :mod:`constrained` (dual update first,
then the primal gradient with the new multipliers; or ``simultaneous``) for
any such problem.

The arithmetic is that of :mod:`constrained` (its :func:`constrained.lagrangian`,
:func:`constrained.multiplier_weights` are reused per group), and with one
group the multipliers follow :func:`constrained.dual_optimizer` bit-for-bit;
the methods (ceag, el, bifp) still use :mod:`constrained` directly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.constraints import constrained

__all__ = ["ascent", "project", "only_observed", "Constraint", "Lagrangian", "Augmented", "Dual",
           "MultiplierState", "dual_primal_grads", "ORDERS"]

ORDERS = ("dual_primal", "simultaneous")


# ---------------------------------------------------------------------------
# Chainable pieces
# ---------------------------------------------------------------------------

def ascent(tx: optax.GradientTransformation | None = None, *,
           learning_rate: optax.ScalarOrSchedule = 1e-2) -> optax.GradientTransformationExtraArgs:
    """Gradient *ascent* on the multipliers with any optax optimizer (default ``optax.sgd(learning_rate)``).

    Feed it ``dL/dlam`` (the violations); ``tx`` is given their negative, since
    optax minimizes, so the default step is ``lam + learning_rate * violation``.
    """
    inner = optax.with_extra_args_support(optax.sgd(learning_rate) if tx is None else tx)

    def update_fn(updates, state, params=None, **extra_args):
        return inner.update(jax.tree.map(jnp.negative, updates), state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def project(equality: bool | Any = False, *, max_multiplier: float | None = None) -> optax.GradientTransformation:
    """Projection of the multipliers after the step: inequality ones onto ``>= 0``
    (and ``<= max_multiplier`` for all, when given). ``equality``: a bool, or a
    pytree of bools / bool arrays mirroring the multipliers. Put it last in the chain.

    Returns ``-lam`` where ``lam + update < 0``, so ``optax.apply_updates`` gives exactly 0 there
    and exactly ``lam + update`` elsewhere.
    """
    cap = None if max_multiplier is None or not np.isfinite(max_multiplier) else float(max_multiplier)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("project needs the multipliers: call update(grads, state, multipliers)")
        eq = _broadcast_tree(equality, params)

        def leaf(u, p, e):
            new = p + u
            u = jnp.where(jnp.logical_and(jnp.logical_not(e), new < 0), -p, u)
            if cap is not None:
                u = jnp.where(new > cap, cap - p, u)
            return u.astype(jnp.result_type(p))

        return jax.tree.map(leaf, updates, params, eq), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def only_observed(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` moving only the observed constraints: ``update(..., observed=mask)``.

    ``observed`` mirrors the multipliers (bool per constraint; default: all).
    Unobserved entries get a zero incoming gradient (a NaN from an absent group
    cannot leak), a zero update, and their per-constraint optimizer state
    (momenta, nuPI's error, ...) restored exactly; state leaves that are not
    per-constraint (step counts) advance only when something was observed.
    """
    inner = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, observed=None, **extra_args):
        obs = _observed_tree(observed, updates)
        g = jax.tree.map(lambda o, u: jnp.where(o, u, jnp.zeros_like(u)), obs, updates)
        new_u, new_state = inner.update(g, state, params, **extra_args)
        new_u = jax.tree.map(lambda o, u: jnp.where(o, u, jnp.zeros_like(u)), obs, new_u)
        return new_u, constrained.select_observed(new_state, state, obs, updates)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _broadcast_tree(flags: Any, like: Any) -> Any:
    """A bool (array) per leaf of ``like``: ``flags`` is one bool or a pytree prefix of ``like``."""
    if isinstance(flags, (bool, np.bool_)) or np.ndim(flags) == 0 and not isinstance(flags, dict):
        return jax.tree.map(lambda x: jnp.full(jnp.shape(x), bool(flags)), like)
    return jax.tree.map(lambda f, x: jnp.broadcast_to(jnp.asarray(f, bool), jnp.shape(x)), flags, like)


def _observed_tree(observed: Any, like: Any) -> Any:
    if observed is None:
        return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), like)
    return jax.tree.map(lambda o, x: jnp.broadcast_to(jnp.asarray(o, bool), jnp.shape(x)), observed, like)


# ---------------------------------------------------------------------------
# Formulations
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Lagrangian:
    """``loss + sum_k lam_k v_k``; the dual step ascends on the strict violation."""

    augmented = False


@dataclasses.dataclass(frozen=True)
class Augmented:
    """The augmented Lagrangian (:func:`constrained.dual_optimizer` ``augmented=True``): quadratic PHR terms
    with a penalty ``rho`` per constraint, dual step ``lam + rho * strict`` (use ``ascent(learning_rate=1.0)``,
    the default of :class:`Dual` with this formulation); ``rho`` grows by ``penalty_growth`` (up to
    ``penalty_max``) on observed steps where the violation did not shrink by ``penalty_decrease``."""

    penalty_init: float = 1.0
    penalty_growth: float = 1.01
    penalty_max: float = 1e3
    penalty_decrease: float = 0.95
    penalty_tol: float = 1e-4
    augmented = True

    def __post_init__(self):
        if not self.penalty_init > 0:
            raise ValueError(f"augmented Lagrangian needs penalty_init > 0, got {self.penalty_init}")
        if self.penalty_growth < 1:
            raise ValueError(f"penalty_growth must be >= 1, got {self.penalty_growth}")


# ---------------------------------------------------------------------------
# Named constraint groups
# ---------------------------------------------------------------------------

class Constraint(NamedTuple):
    """A group of ``size`` constraints ``v <= 0`` (or ``v == 0`` with ``equality=True``)."""

    size: int
    equality: bool = False


class MultiplierState(NamedTuple):
    """The dual's state: multipliers (one vector, or a dict of vectors for named groups), the dual
    optimizer's state, the penalty ``rho`` (zeros for :class:`Lagrangian`), each constraint's
    violation at its last observation (penalty growth rule), and the steps with something observed."""

    multipliers: Any
    opt_state: optax.OptState
    penalty: Any
    prev_violation: Any
    count: chex.Array


@dataclasses.dataclass(frozen=True)
class Dual:
    """Multipliers for named constraint groups and the composable dual step.

    Args:
      constraints: an int (one group of inequalities, plain vector multipliers), a :class:`Constraint`,
        or a dict ``name -> Constraint | int`` (multipliers, violations and ``observed`` are then dicts).
      tx: the dual ascent transformation, e.g. ``ascent(optax.adam(1e-3))`` or
        ``optax.chain(optax.clip(1.0), ascent(learning_rate=1e-2))``; default ``ascent(learning_rate=1e-2)``
        (``1.0`` with :class:`Augmented`). :meth:`transform` adds the projection and the observed mask.
      formulation: :class:`Lagrangian` or :class:`Augmented`.
      max_multiplier: a ceiling on every multiplier (``None``: none).
      init_multiplier: starting value of every multiplier.
    """

    constraints: int | Constraint | dict
    tx: optax.GradientTransformation | None = None
    formulation: Lagrangian | Augmented = dataclasses.field(default_factory=Lagrangian)
    max_multiplier: float | None = None
    init_multiplier: float = 0.0
    dtype: Any = jnp.float32

    def _groups(self) -> Any:
        c = self.constraints
        if isinstance(c, dict):
            return {k: v if isinstance(v, Constraint) else Constraint(int(v)) for k, v in c.items()}
        return c if isinstance(c, Constraint) else Constraint(int(c))

    def _is_equality(self) -> Any:
        g = self._groups()
        if isinstance(g, dict):
            return {k: jnp.full((v.size,), bool(v.equality)) for k, v in g.items()}
        return jnp.full((g.size,), bool(g.equality))

    def transform(self) -> optax.GradientTransformationExtraArgs:
        """The whole dual step as one optax transformation: ``only_observed(chain(tx, project))``."""
        tx = self.tx if self.tx is not None else ascent(learning_rate=1.0 if self.formulation.augmented else 1e-2)
        return only_observed(optax.chain(tx, project(self._is_equality(), max_multiplier=self.max_multiplier)))

    def init(self, multipliers: Any = None) -> MultiplierState:
        g, eq = self._groups(), self._is_equality()
        full = lambda v, fill: jnp.full((v.size,), fill, self.dtype)  # noqa: E731
        groups = g if isinstance(g, dict) else {None: g}
        if multipliers is None:
            lam = {k: full(v, self.init_multiplier) for k, v in groups.items()}
            lam = lam if isinstance(g, dict) else lam[None]
        else:
            lam = jax.tree.map(lambda m, e: jnp.broadcast_to(jnp.asarray(m, self.dtype), e.shape), multipliers, eq)
        lam = jax.tree.map(constrained.project_multipliers, lam, eq)
        if self.max_multiplier is not None:
            lam = jax.tree.map(lambda x: jnp.minimum(x, self.max_multiplier), lam)
        rho0 = self.formulation.penalty_init if self.formulation.augmented else 0.0
        return MultiplierState(multipliers=lam, opt_state=self.transform().init(lam),
                               penalty=jax.tree.map(lambda x: jnp.full(x.shape, rho0, self.dtype), lam),
                               prev_violation=jax.tree.map(lambda x: jnp.full(x.shape, jnp.inf, self.dtype), lam),
                               count=jnp.zeros((), jnp.int32))

    def update(self, state: MultiplierState, strict_violation: Any, observed: Any = None) -> MultiplierState:
        """One dual step from the strict violations (a vector, or a dict of them, like the multipliers)."""
        lam = state.multipliers
        obs = _observed_tree(observed, lam)
        strict = jax.tree.map(lambda v, x: jnp.asarray(v, x.dtype), strict_violation, lam)
        grad = (jax.tree.map(jnp.multiply, strict, state.penalty) if self.formulation.augmented else strict)
        updates, opt_state = self.transform().update(grad, state.opt_state, lam, observed=obs)
        penalty, prev = state.penalty, state.prev_violation
        if self.formulation.augmented:
            f = self.formulation
            eq = self._is_equality()

            def grow(rho, m_prev, s, e, o):
                s = jnp.where(o, s, 0.0)
                m = jnp.where(e, jnp.abs(s), jnp.maximum(s, 0.0))
                up = o & (m > f.penalty_tol) & (m > f.penalty_decrease * m_prev)
                return jnp.where(up, jnp.minimum(rho * f.penalty_growth, f.penalty_max), rho), jnp.where(o, m, m_prev)

            out = jax.tree.map(grow, penalty, prev, strict, eq, obs)
            penalty = jax.tree.map(lambda _, t: t[0], lam, out)
            prev = jax.tree.map(lambda _, t: t[1], lam, out)
        any_obs = jnp.any(jnp.stack([jnp.any(o) for o in jax.tree.leaves(obs)]))
        return MultiplierState(multipliers=optax.apply_updates(lam, updates), opt_state=opt_state, penalty=penalty,
                               prev_violation=prev, count=state.count + any_obs.astype(jnp.int32))

    def _per_group(self, state: MultiplierState) -> Any:
        """Each group as a :class:`constrained.DualState`, so the Lagrangian arithmetic is constrained's own."""
        return jax.tree.map(lambda lam, rho, e: constrained.DualState(lam, None, rho, e, None, None),
                            state.multipliers, state.penalty, self._is_equality())

    def lagrangian(self, loss: chex.Array, violation: Any, state: MultiplierState) -> chex.Array:
        """The scalar the primal step minimizes (multipliers and penalties are constants)."""
        groups = self._per_group(state)
        is_group = lambda x: isinstance(x, constrained.DualState)  # noqa: E731
        terms = jax.tree.leaves(jax.tree.map(lambda st, v: constrained.lagrangian(0.0, v, st), groups, violation,
                                             is_leaf=is_group))
        return loss + sum(terms)

    def weights(self, violation: Any, state: MultiplierState) -> Any:
        """``d lagrangian / d violation`` per constraint (mirrors the multipliers)."""
        is_group = lambda x: isinstance(x, constrained.DualState)  # noqa: E731
        return jax.tree.map(lambda st, v: constrained.multiplier_weights(v, st), self._per_group(state), violation,
                            is_leaf=is_group)


# ---------------------------------------------------------------------------
# The one-vjp training step
# ---------------------------------------------------------------------------

def dual_primal_grads(problem_fn: Callable[[Any], Any], params: Any, dual: Dual, state: MultiplierState,
                      order: str = "dual_primal") -> tuple[Any, MultiplierState, constrained.StepInfo]:
    """Primal gradient of the Lagrangian and the new dual state from ONE forward pass.

    ``problem_fn(params)`` returns :class:`constrained.CMPOutput` or ``(loss, violation[, strict[, observed[,
    aux]]])`` with violations shaped like the multipliers (dicts for named groups). As in
    :func:`constrained.constrained_grads`: the problem is evaluated once under ``jax.vjp``, the dual state is
    updated from the strict violations, and the cotangent ``(1, dual.weights(violation, state))`` is pulled
    back with the NEW state (``"dual_primal"``) or the OLD one (``"simultaneous"``).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")

    def split(p):
        out = constrained._as_cmp(problem_fn(p))
        return (out.loss, out.violation), (out.strict_violation, out.observed, out.aux)

    (loss, violation), vjp_fn, (strict, observed, aux) = jax.vjp(split, params, has_aux=True)
    strict = jax.lax.stop_gradient(violation if strict is None else strict)
    observed = _observed_tree(observed, state.multipliers)
    new_state = dual.update(state, strict, observed)
    used = new_state if order == "dual_primal" else state
    weights = jax.tree.map(lambda w, v: w.astype(jnp.result_type(v)), dual.weights(violation, used), violation)
    (grads,) = vjp_fn((jnp.ones_like(loss), weights))
    info = constrained.StepInfo(loss=loss, lagrangian=dual.lagrangian(loss, violation, used), violation=violation,
                                strict_violation=strict, observed=observed, multipliers=used.multipliers, aux=aux)
    return grads, new_state, info
