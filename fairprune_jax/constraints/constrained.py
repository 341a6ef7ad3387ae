"""Lagrangian constrained learning as small pure, jittable functions.

The vocabulary follows the ``cooper`` library. A constrained minimization
problem (CMP) evaluated at the model parameters yields

* ``loss`` -- the scalar objective;
* ``violation`` (K,) -- a *differentiable* proxy of each constraint, the
  constraint being ``violation <= 0`` (inequality) or ``violation == 0``
  (equality); it drives the primal step;
* ``strict_violation`` (K,) -- the (possibly non-differentiable, e.g. an
  accuracy gap read from a replay buffer) value that drives the dual step;
  defaults to ``violation``;
* ``observed`` (K,) bool -- which constraints were measured this step (e.g. the
  groups present in the batch). Only observed constraints move their
  multipliers; unobserved multipliers and their dual-optimizer state stay
  bit-for-bit unchanged.

There is one Lagrange multiplier per constraint, a flat vector of K. The
pieces, in the spirit of optax:

* :func:`dual_optimizer` -> :class:`DualOptimizer` ``(init, update)``: the dual
  ascent step with any optax ``GradientTransformation`` (plain gradient ascent
  by default; optax minimizes, so it is fed ``-strict_violation``), followed by
  the projection of inequality multipliers onto ``>= 0``. Optionally the
  augmented Lagrangian (penalty ``rho`` per constraint with a growth rule).
* :func:`nupi` -- the nuPI controller of Sohrabi et al. (ICML 2024) as an
  optax ``GradientTransformation``, usable as the dual ``tx``.
* :func:`lagrangian` -- the scalar the primal step minimizes (multipliers and
  penalties under ``stop_gradient``); :func:`multiplier_weights` its gradient
  with respect to ``violation``.
* :func:`constrained_grads` / :func:`constrained_step` -- one training step
  sharing ONE forward pass between the dual and the primal update, in
  ``"alternating"`` (dual first, primal gradient with the NEW multipliers, as
  the Balancing Act code does) or ``"simultaneous"`` (primal gradient with the
  OLD multipliers) mode. The trick: the Lagrangian depends on the parameters
  only through ``(loss, violation)``, so a single ``jax.vjp`` of the problem
  function is taken, and its cotangent ``(1, dLagrangian/dviolation)`` is
  formed *after* the dual update. No second forward pass and no per-constraint
  Jacobian is needed, whatever K is.
* :func:`buffer_init` / :func:`buffer_update` / :func:`buffer_means` -- fixed
  shape per-group ring buffers of the last ``k`` per-sample values (per-sample
  correctness, say), from which a group's strict violation is read once its
  buffer is full.

Everything is a pytree of arrays (NamedTuples) and every function is jittable
and free of Python loops over constraints, groups or samples.

Example (alternating step, to be closed over in a method's jitted train step)::

    dual = dual_optimizer(num_groups, learning_rate=1e-2)      # inequalities
    dual_state = dual.init()

    def problem_fn(params):
        logits = model.apply(params, batch["x"])
        loss = cross_entropy(logits, batch["y"], batch["w"])
        violation = per_group_gap_proxy(...)              # (K,), differentiable
        strict = per_group_accuracy_gap(...)              # (K,), e.g. argmax based
        observed = group_present                          # (K,) bool
        return loss, violation, strict, observed, {"acc": acc}

    @jax.jit
    def train_step(params, opt_state, dual_state):
        return constrained_step(problem_fn, params, opt_state, primal_tx,
                                dual, dual_state, mode="alternating")

With replay buffers the problem function updates the buffer from the batch's
per-sample correctness and returns it in ``aux``:
``buf2 = buffer_update(buf, correct, batch["g"], batch["w"]); acc, full =
buffer_means(buf2)``; strict violation from ``acc``, ``observed = full``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax


__all__ = [
    "CMPOutput", "DualState", "DualOptimizer", "NuPIState", "StepInfo", "GroupBuffer",
    "dual_optimizer", "nupi", "project_multipliers", "lagrangian", "multiplier_weights",
    "constrained_grads", "constrained_step", "buffer_init", "buffer_update", "buffer_means",
]

MODES = ("alternating", "simultaneous")


# ---------------------------------------------------------------------------
# Problem output
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Dual optimizer
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------

class StepInfo(NamedTuple):
    loss: chex.Array
    lagrangian: chex.Array          # value with the multipliers used by the primal step
    violation: chex.Array
    strict_violation: chex.Array
    observed: chex.Array
    multipliers: chex.Array         # multipliers used by the primal step
    aux: Any


def constrained_grads(
    problem_fn: Callable[[Any], Any],
    params: Any,
    dual: DualOptimizer,
    dual_state: DualState,
    mode: str = "alternating",
) -> tuple[Any, DualState, StepInfo]:
    """Primal gradient of the Lagrangian and the new dual state, ONE forward pass.

    ``problem_fn(params)`` returns :class:`CMPOutput` or a tuple ``(loss,
    violation[, strict_violation[, observed[, aux]]])``. It is evaluated once
    under ``jax.vjp``; the dual state is updated from ``strict_violation`` and
    ``observed``; then the gradient of :func:`lagrangian` w.r.t. ``params`` is
    obtained by pulling back the cotangent ``(1, multiplier_weights(violation,
    state))``, where ``state`` is the NEW dual state (``"alternating"``:
    dual-then-primal) or the OLD one (``"simultaneous"``).

    Returns ``(grads, new_dual_state, info)``; apply ``grads`` with any primal
    optimizer (after masking them for pruning, for instance).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def split(p):
        out = _as_cmp(problem_fn(p))
        return (out.loss, out.violation), (out.strict_violation, out.observed, out.aux)

    (loss, violation), vjp_fn, (strict, observed, aux) = jax.vjp(split, params, has_aux=True)
    if strict is None:
        strict = violation
    strict = jax.lax.stop_gradient(strict)
    if observed is None:
        observed = jnp.ones(jnp.shape(violation), bool)
    new_dual_state = dual.update(dual_state, strict, observed)
    used = new_dual_state if mode == "alternating" else dual_state
    weights = multiplier_weights(violation, used).astype(jnp.result_type(violation))
    (grads,) = vjp_fn((jnp.ones_like(loss), weights))
    info = StepInfo(loss=loss, lagrangian=lagrangian(loss, violation, used),
                    violation=violation, strict_violation=strict,
                    observed=jnp.asarray(observed, bool), multipliers=used.multipliers, aux=aux)
    return grads, new_dual_state, info


def constrained_step(
    problem_fn: Callable[[Any], Any],
    params: Any,
    primal_opt_state: optax.OptState,
    primal_tx: optax.GradientTransformation,
    dual: DualOptimizer,
    dual_state: DualState,
    mode: str = "alternating",
) -> tuple[Any, optax.OptState, DualState, StepInfo]:
    """:func:`constrained_grads` followed by the primal ``primal_tx`` update.

    Returns ``(params, primal_opt_state, dual_state, info)``.
    """
    grads, dual_state, info = constrained_grads(problem_fn, params, dual, dual_state, mode)
    updates, primal_opt_state = primal_tx.update(grads, primal_opt_state, params)
    return optax.apply_updates(params, updates), primal_opt_state, dual_state, info


# ---------------------------------------------------------------------------
# Group replay buffer
# ---------------------------------------------------------------------------

class GroupBuffer(NamedTuple):
    """Per-group ring buffers of the last ``k`` per-sample values.

    ``values`` (G, k); ``pos`` (G,) next slot to write; ``count`` (G,) number
    of valid entries (``<= k``). Until a group has wrapped, its entries occupy
    slots ``0 .. count-1``.
    """

    values: chex.Array
    pos: chex.Array
    count: chex.Array


def buffer_init(num_groups: int, size: int = 40, dtype=jnp.float32) -> GroupBuffer:
    if size < 1:
        raise ValueError(f"buffer size must be >= 1, got {size}")
    return GroupBuffer(values=jnp.zeros((num_groups, size), dtype),
                       pos=jnp.zeros((num_groups,), jnp.int32),
                       count=jnp.zeros((num_groups,), jnp.int32))


def _buffer_write_plan(buf: GroupBuffer, g: chex.Array, weights: chex.Array | None):
    """Where each sample of a batch goes: ``(row, slot, n)``.

    ``row`` (B,) is the sample's group, or ``G`` (out of bounds, dropped) for a
    padding row, a bad group id, or a sample that a later one of its group in
    the same batch would overwrite; ``slot`` (B,) is ``(pos[g] + rank) % k``;
    ``n`` (G,) counts the valid samples per group. The kept (row, slot) pairs
    are distinct, so the scatter is deterministic on every backend.
    """
    G, k = buf.values.shape
    g = jnp.asarray(g, jnp.int32).reshape(-1)
    B = g.shape[0]
    valid = (g >= 0) & (g < G)
    if weights is not None:
        valid = valid & (jnp.asarray(weights).reshape(-1) != 0)
    key = jnp.where(valid, g, G)                          # invalid rows sort last
    order = jnp.argsort(key, stable=True)
    skey = key[order]
    start = jnp.searchsorted(skey, skey, side="left")     # first index of each key's run
    rank = jnp.zeros((B,), jnp.int32).at[order].set(jnp.arange(B, dtype=jnp.int32) - start.astype(jnp.int32))
    n = jnp.zeros((G,), jnp.int32).at[key].add(1, mode="drop")
    gc = jnp.clip(g, 0, G - 1)
    keep = valid & (rank >= n[gc] - k)                    # only the last k of a group
    slot = (buf.pos[gc] + rank) % k
    return jnp.where(keep, gc, G), slot, n


def buffer_update(buf: GroupBuffer, values: chex.Array, g: chex.Array,
                  weights: chex.Array | None = None) -> GroupBuffer:
    """Append a batch, in batch order, to each sample's group buffer.

    Rows with ``weights == 0`` (padding) or a group id outside ``[0, G)`` are
    ignored. Vectorized: each sample's rank among the valid samples of its
    group in the batch comes from a stable sort; it is written to slot
    ``(pos[g] + rank) % k``. When more than ``k`` samples of a group arrive,
    only the last ``k`` are written (exactly what a sequential ring buffer ends
    with), so no two writes hit the same slot.
    """
    k = buf.values.shape[1]
    values = jnp.asarray(values, buf.values.dtype).reshape(-1)
    row, slot, n = _buffer_write_plan(buf, g, weights)
    new_values = buf.values.at[row, slot].set(values, mode="drop")
    return GroupBuffer(values=new_values, pos=(buf.pos + n) % k,
                       count=jnp.minimum(buf.count + n, k))


def buffer_means(buf: GroupBuffer) -> tuple[chex.Array, chex.Array]:
    """``(means (G,), is_full (G,) bool)``.

    ``means`` averages the valid entries (0 for an empty buffer); use
    ``is_full`` as the ``observed`` mask of a strict violation read from the
    buffers: before its buffer is full a group counts as not observed.
    """
    k = buf.values.shape[1]
    total = jnp.sum(buf.values, axis=1)
    means = total / jnp.maximum(buf.count, 1).astype(total.dtype)
    return means, buf.count >= k


# ---------------------------------------------------------------------------
# Bounded multipliers
# ---------------------------------------------------------------------------

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


__all__ += ["capped"]


DUAL_OPTIMIZERS = ("sgd", "nupi", "adam")


@dataclasses.dataclass(frozen=True)
class DualOptions:
    """A method's dual-step options (ceag, el, and the bifp family, which raises ``dual_lr`` to 0.1): a method's
    options dataclass inherits them, :func:`check_dual_options` checks them, :func:`dual_from_options` builds the
    dual optimizer."""

    dual_lr: float = 1e-2
    dual_optimizer: str = "sgd"             # DUAL_OPTIMIZERS
    mode: str = "alternating"               # MODES
    augmented: bool = False
    nupi_kp: float = 1.0
    nupi_nu: float = 0.0


def check_dual_options(opts: DualOptions, method: str = "") -> None:
    """Value checks of a method's dual-step options, run before any data loads; ``method`` prefixes the message."""
    prefix = f"{method}: " if method else ""
    if opts.dual_optimizer not in DUAL_OPTIMIZERS:
        raise ValueError(f"{prefix}unknown dual_optimizer {opts.dual_optimizer!r}; valid: "
                         f"{', '.join(DUAL_OPTIMIZERS)}")
    if opts.mode not in MODES:
        raise ValueError(f"{prefix}unknown mode {opts.mode!r}; valid: {', '.join(MODES)}")
    if not opts.dual_lr > 0:
        raise ValueError(f"{prefix}dual_lr must be > 0; got {opts.dual_lr}")


def dual_from_options(opts: DualOptions, num_constraints: int, *, equality: bool) -> DualOptimizer:
    """The dual optimizer of checked options: ``sgd`` (gradient ascent), ``nupi`` or ``adam`` at ``dual_lr``,
    augmented Lagrangian when ``augmented``."""
    if opts.dual_optimizer == "nupi":
        tx = nupi(opts.dual_lr, kp=opts.nupi_kp, nu=opts.nupi_nu)
    else:
        tx = {"sgd": optax.sgd, "adam": optax.adam}[opts.dual_optimizer](opts.dual_lr)
    return dual_optimizer(num_constraints, equality=equality, tx=tx, augmented=opts.augmented)


__all__ += ["DUAL_OPTIMIZERS", "DualOptions", "check_dual_options", "dual_from_options"]
