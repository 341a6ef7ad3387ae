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

:class:`Dual` is the library's one dual implementation: the methods (ceag, el, the bifp family) step their
multipliers with it too (:func:`constrained.dual_optimizer`, :func:`constrained.dual_from_options` and
:func:`constrained.capped` build a :class:`Dual`; :func:`constrained.constrained_grads` is
:func:`dual_primal_grads`). Its state is a :class:`lagrangian.DualState` (``MultiplierState`` is the same
class), so the Lagrangian arithmetic of :func:`lagrangian.lagrangian` applies to it unchanged. ``Dual.update``
applies the dual optimizer's update and then projects the multipliers (the optax pattern of a projection after
``apply_updates``); :meth:`Dual.transform` is the same step as one chainable optax transformation for a user's
own chain, projecting in update space (``-lam`` where the step would go below 0), which can differ from
``update`` in the last bit at a ceiling.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.constraints.dual_ascent import select_observed
from fairprune_jax.constraints.lagrangian import (DualState, StepInfo, _as_cmp, lagrangian, multiplier_weights,
                                                  project_multipliers)

__all__ = ["ascent", "project", "only_observed", "Constraint", "Lagrangian", "Augmented", "Dual",
           "MultiplierState", "dual_primal_grads", "ORDERS", "ORDER_ALIASES", "order_name", "dual_optimizer", "capped", "DualOptimizer"]

#: The order of a step's dual and primal updates: ``dual_primal`` (the dual step first, the primal gradient with
#: the NEW multipliers, as the Balancing Act code and cooper's alternating optimizer do) or ``simultaneous`` (the
#: primal gradient with the OLD multipliers). One list for the methods' ``order`` option and a user's own loop.
ORDERS = ("dual_primal", "simultaneous")
#: Earlier names of an order, still read (the methods' option was ``mode = "alternating"``).
ORDER_ALIASES = {"alternating": "dual_primal"}


def order_name(order: str) -> str:
    """``order`` as one of :data:`ORDERS` (an earlier name of :data:`ORDER_ALIASES` mapped to its current one);
    anything else is an error naming the valid orders."""
    name = ORDER_ALIASES.get(order, order)
    if name not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return name


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
    Without ``observed``, a non-finite violation is not observed (a user's 0/0
    for a group absent from the batch made that multiplier NaN for the rest of
    the run); the library's methods pass their own mask, and their compiled
    steps are unchanged. Unobserved entries get a zero incoming gradient (a NaN from an absent group
    cannot leak), a zero update, and their per-constraint optimizer state
    (momenta, nuPI's error, ...) restored exactly; state leaves that are not
    per-constraint (step counts) advance only when something was observed.
    """
    inner = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, observed=None, **extra_args):
        obs = _observed_tree(observed, updates)
        if observed is None:    # then a non-finite violation is not observed (with a mask given, the mask decides)
            obs = jax.tree.map(lambda o, u: o & jnp.isfinite(u), obs, updates)
        g = jax.tree.map(lambda o, u: jnp.where(o, u, jnp.zeros_like(u)), obs, updates)
        new_u, new_state = inner.update(g, state, params, **extra_args)
        new_u = jax.tree.map(lambda o, u: jnp.where(o, u, jnp.zeros_like(u)), obs, new_u)
        return new_u, select_observed(new_state, state, obs, updates)

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
    """A group of ``size`` constraints ``v <= 0`` (or ``v == 0`` with ``equality=True``; a tuple of ``size``
    bools mixes both, and keeps the :class:`Dual` hashable, so it can be a static argument of ``jax.jit``)."""

    size: int
    equality: Any = False


#: The dual's state: multipliers (one vector, or a dict of vectors for named groups), the dual optimizer's
#: state, the penalty ``rho`` (zeros for :class:`Lagrangian`), which constraints are equalities, each
#: constraint's violation at its last observation (penalty growth rule), and the steps with something observed.
#: The same class as :class:`lagrangian.DualState` (one state type for the library's methods and a user's loop).
MultiplierState = DualState


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

    def __post_init__(self):
        cap = self.max_multiplier
        if cap is not None and not (isinstance(cap, (int, float, np.integer, np.floating)) and float(cap) > 0):
            raise ValueError(f"max_multiplier must be a ceiling above 0 (None or inf: no ceiling); got {cap!r}, "
                             "which would leave the multipliers without one")

    def _check_violation(self, violation: Any, multipliers: Any, where: str) -> None:
        """A violation must have its multipliers' shape (a (G, 1) column would broadcast to (G, G) silently)."""
        if isinstance(multipliers, dict):
            if not isinstance(violation, dict) or set(violation) != set(multipliers):
                raise ValueError(f"Dual.{where}: the violations must be a dict with the constraint groups' names "
                                 f"{sorted(multipliers)}; got {sorted(violation) if isinstance(violation, dict) else type(violation).__name__}")
            for k in multipliers:
                self._check_violation(violation[k], multipliers[k], f"{where}[{k!r}]")
            return
        got, want = tuple(jnp.shape(violation)), tuple(jnp.shape(multipliers))
        if got != want:
            raise ValueError(f"Dual.{where}: the violation has shape {got}; the Dual has {want[0] if want else 1} "
                             f"constraint(s), so it needs shape {want}")

    def _groups(self) -> Any:
        c = self.constraints
        if isinstance(c, dict):
            return {k: v if isinstance(v, Constraint) else Constraint(int(v)) for k, v in c.items()}
        return c if isinstance(c, Constraint) else Constraint(int(c))

    def _is_equality(self) -> Any:
        g = self._groups()
        eq = lambda v: jnp.asarray(np.broadcast_to(np.asarray(v.equality, bool), (v.size,)))  # noqa: E731
        if isinstance(g, dict):
            return {k: eq(v) for k, v in g.items()}
        return eq(g)

    def _ascent(self) -> optax.GradientTransformation:
        return self.tx if self.tx is not None else ascent(learning_rate=1.0 if self.formulation.augmented else 1e-2)

    def _cap(self) -> float | None:
        cap = self.max_multiplier
        return None if cap is None or not (0 < cap < float("inf")) else float(cap)

    def transform(self) -> optax.GradientTransformationExtraArgs:
        """The whole dual step as one chainable optax transformation: ``only_observed(chain(tx, project))``
        (for a user's own chain; :meth:`update` is the same step with the projection applied to the new
        multipliers, and its optimizer state is ``tx``'s own, not the chain's)."""
        return only_observed(optax.chain(self._ascent(), project(self._is_equality(), max_multiplier=self._cap())))

    def init(self, multipliers: Any = None) -> MultiplierState:
        g, eq = self._groups(), self._is_equality()
        full = lambda v, fill: jnp.full((v.size,), fill, self.dtype)  # noqa: E731
        groups = g if isinstance(g, dict) else {None: g}
        if multipliers is None:
            lam = {k: full(v, self.init_multiplier) for k, v in groups.items()}
            lam = lam if isinstance(g, dict) else lam[None]
        else:
            lam = jax.tree.map(lambda m, e: jnp.broadcast_to(jnp.asarray(m, self.dtype), e.shape), multipliers, eq)
        lam = jax.tree.map(project_multipliers, lam, eq)
        if self._cap() is not None:
            lam = jax.tree.map(lambda x: jnp.minimum(x, self._cap()), lam)
        rho0 = self.formulation.penalty_init if self.formulation.augmented else 0.0
        return DualState(multipliers=lam, opt_state=only_observed(self._ascent()).init(lam),
                         penalty=jax.tree.map(lambda x: jnp.full(x.shape, rho0, self.dtype), lam), is_equality=eq,
                         prev_violation=jax.tree.map(lambda x: jnp.full(x.shape, jnp.inf, self.dtype), lam),
                         count=jnp.zeros((), jnp.int32))

    def update(self, state: DualState, strict_violation: Any, observed: Any = None) -> DualState:
        """One dual step from the strict violations (a vector, or a dict of them, like the multipliers).

        Order: gradient (``rho * strict`` when augmented) -> ``tx`` (only observed constraints) -> apply ->
        projection (inequalities onto >= 0, the ceiling) -> unobserved multipliers and per-constraint
        optimizer state restored exactly; then the penalty growth rule (augmented)."""
        if isinstance(strict_violation, DualState):   # called as optax's update(updates, state, params)
            raise TypeError(
                "Dual.update is not an optax GradientTransformation's update: its arguments are (state, "
                "strict_violation, observed), so it cannot sit in optax.chain. For a chainable dual step use "
                "Dual(...).transform(), or fairprune_jax.constraints.dual: only_observed(optax.chain("
                "optax.clip(1.0), ascent(learning_rate=1e-2), project()))")
        lam = state.multipliers
        self._check_violation(strict_violation, lam, "update")
        obs = _observed_tree(observed, lam)
        strict = jax.tree.map(lambda v, x: jnp.asarray(v, x.dtype), strict_violation, lam)
        if observed is None:    # a non-finite violation is then not observed (as in only_observed)
            obs = jax.tree.map(lambda o, v: o & jnp.isfinite(v), obs, strict)
        grad = (jax.tree.map(jnp.multiply, strict, state.penalty) if self.formulation.augmented else strict)
        updates, opt_state = only_observed(self._ascent()).update(grad, state.opt_state, lam, observed=obs)
        cap = self._cap()

        def step(x, u, e, o):
            new = project_multipliers(optax.apply_updates(x, u), e)
            new = jnp.minimum(new, cap) if cap is not None else new
            return jnp.where(o, new, x)

        new_lam = jax.tree.map(step, lam, updates, state.is_equality, obs)
        penalty, prev = state.penalty, state.prev_violation
        if self.formulation.augmented:
            f = self.formulation
            eq = state.is_equality

            def grow(rho, m_prev, s, e, o):
                s = jnp.where(o, s, 0.0)
                m = jnp.where(e, jnp.abs(s), jnp.maximum(s, 0.0))
                up = o & (m > f.penalty_tol) & (m > f.penalty_decrease * m_prev)
                return jnp.where(up, jnp.minimum(rho * f.penalty_growth, f.penalty_max), rho), jnp.where(o, m, m_prev)

            out = jax.tree.map(grow, penalty, prev, strict, eq, obs)
            penalty = jax.tree.map(lambda _, t: t[0], lam, out)
            prev = jax.tree.map(lambda _, t: t[1], lam, out)
        any_obs = jnp.any(jnp.stack([jnp.any(o) for o in jax.tree.leaves(obs)]))
        return DualState(multipliers=new_lam, opt_state=opt_state, penalty=penalty, is_equality=state.is_equality,
                         prev_violation=prev, count=state.count + any_obs.astype(jnp.int32))

    @staticmethod
    def _per_group(state: DualState) -> Any:
        """Each group as its own :class:`DualState`, so the Lagrangian arithmetic is :mod:`lagrangian`'s own."""
        return jax.tree.map(lambda lam, rho, e: DualState(lam, None, rho, e, None, None),
                            state.multipliers, state.penalty, state.is_equality)

    def lagrangian(self, loss: chex.Array, violation: Any, state: DualState) -> chex.Array:
        """The scalar the primal step minimizes (multipliers and penalties are constants)."""
        self._check_violation(violation, state.multipliers, "lagrangian")
        if not isinstance(state.multipliers, dict):
            return lagrangian(loss, violation, state)
        is_group = lambda x: isinstance(x, DualState)  # noqa: E731
        terms = jax.tree.leaves(jax.tree.map(lambda st, v: lagrangian(0.0, v, st), self._per_group(state),
                                             violation, is_leaf=is_group))
        return loss + sum(terms)

    def weights(self, violation: Any, state: DualState) -> Any:
        """``d lagrangian / d violation`` per constraint (mirrors the multipliers)."""
        self._check_violation(violation, state.multipliers, "weights")
        if not isinstance(state.multipliers, dict):
            return multiplier_weights(violation, state)
        is_group = lambda x: isinstance(x, DualState)  # noqa: E731
        return jax.tree.map(lambda st, v: multiplier_weights(v, st), self._per_group(state), violation,
                            is_leaf=is_group)


# ---------------------------------------------------------------------------
# The one-vjp training step
# ---------------------------------------------------------------------------

def dual_primal_grads(problem_fn: Callable[[Any], Any], params: Any, dual: Dual, state: DualState,
                      order: str = "dual_primal") -> tuple[Any, DualState, StepInfo]:
    """Primal gradient of the Lagrangian and the new dual state from ONE forward pass.

    ``problem_fn(params)`` returns :class:`constrained.CMPOutput` or ``(loss, violation[, strict[, observed[,
    aux]]])`` with violations shaped like the multipliers (dicts for named groups). As in
    :func:`constrained.constrained_grads`: the problem is evaluated once under ``jax.vjp``, the dual state is
    updated from the strict violations, and the cotangent ``(1, dual.weights(violation, state))`` is pulled
    back with the NEW state (``"dual_primal"``) or the OLD one (``"simultaneous"``).
    """
    order = order_name(order)

    def split(p):
        out = _as_cmp(problem_fn(p))
        return (out.loss, out.violation), (out.strict_violation, out.observed, out.aux)

    (loss, violation), vjp_fn, (strict, observed, aux) = jax.vjp(split, params, has_aux=True)
    strict = jax.lax.stop_gradient(violation if strict is None else strict)
    dual._check_violation(violation, state.multipliers, "dual_primal_grads (the problem's violation)")
    dual._check_violation(strict, state.multipliers, "dual_primal_grads (the problem's strict violation)")
    given = observed is not None
    observed = _observed_tree(observed, state.multipliers)
    if not given:       # a problem that says nothing of what it observed: a non-finite violation is not
        observed = jax.tree.map(lambda o, v: o & jnp.isfinite(v), observed, strict)
    new_state = dual.update(state, strict, observed)
    used = new_state if order == "dual_primal" else state
    weights = jax.tree.map(lambda w, v: w.astype(jnp.result_type(v)), dual.weights(violation, used), violation)
    (grads,) = vjp_fn((jnp.ones_like(loss), weights))
    info = StepInfo(loss=loss, lagrangian=dual.lagrangian(loss, violation, used), violation=violation,
                    strict_violation=strict, observed=observed, multipliers=used.multipliers, aux=aux)
    return grads, new_state, info


# ---------------------------------------------------------------------------
# The methods' constructors (one vector of K multipliers)
# ---------------------------------------------------------------------------

#: The name the methods' dual optimizers had: they are :class:`Dual` objects (``init``, ``update``).
DualOptimizer = Dual


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
) -> Dual:
    """A :class:`Dual` over one vector of K Lagrange multipliers (the methods' dual step).

    Args:
      num_constraints: K.
      equality: ``False`` (all inequalities ``g <= 0``), ``True`` (all equalities ``h == 0``) or a (K,) bool
        array mixing both.
      tx: any optax ``GradientTransformation`` for the multipliers, fed the gradient ``-strict_violation``
        (``-rho * strict_violation`` when augmented) since optax minimizes; e.g. ``optax.adam(1e-3)`` or
        :func:`dual_ascent.nupi`. Default: ``optax.sgd(learning_rate)``, plain gradient ascent
        ``lam <- lam + lr * strict_violation``.
      learning_rate: for the default ``tx``; default 1e-2, or 1.0 when augmented so that the step is exactly
        ``lam <- lam + rho * strict``. Ignored when ``tx`` is given.
      init_multiplier: initial value of every multiplier (projected).
      augmented: the augmented Lagrangian (:class:`Augmented` with the ``penalty_*`` arguments): quadratic
        terms in the primal objective, dual step ``lam <- proj(lam + rho * strict)``, and ``rho`` growing by
        ``penalty_growth`` (to ``penalty_max``) on observed steps where the feasibility measure ``|h|`` or
        ``max(0, g)`` exceeds ``penalty_tol`` and did not shrink by ``penalty_decrease`` since the
        constraint's last observation; the multipliers move with the old ``rho``. ``penalty_growth=1``: a
        constant penalty.

    The update order is that of :meth:`Dual.update`.
    """
    k = int(num_constraints)
    is_eq = np.broadcast_to(np.asarray(equality, dtype=bool), (k,)).copy()
    formulation = (Augmented(penalty_init, penalty_growth, penalty_max, penalty_decrease, penalty_tol)
                   if augmented else Lagrangian())
    if tx is None:
        tx = optax.sgd(learning_rate if learning_rate is not None else (1.0 if augmented else 1e-2))
    equality = bool(is_eq[0]) if k and (is_eq.all() or not is_eq.any()) else tuple(bool(e) for e in is_eq)
    return Dual(Constraint(k, equality=equality), tx=ascent(tx), formulation=formulation,
                init_multiplier=init_multiplier, dtype=dtype)


def capped(dual: Dual, max_multiplier: float) -> Dual:
    """``dual`` with every multiplier projected onto ``[.., max_multiplier]`` after each update.

    A ceiling keeps a multiplier from integrating without bound when its constraint cannot be met (or is
    read from a noisy estimate): the primal weight of a constraint never exceeds ``max_multiplier``. ``inf``
    (or any value <= 0) returns ``dual`` unchanged. The projection runs inside ``update``, so a dual-then-primal
    step weights the primal gradient with the capped values.
    """
    cap = float(max_multiplier)
    if not (0 < cap < float("inf")):
        return dual
    return dataclasses.replace(dual, max_multiplier=cap)
