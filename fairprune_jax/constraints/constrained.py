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

* :func:`dual_optimizer` -> a :class:`dual.Dual` ``(init, update)``: the dual
  ascent step with any optax ``GradientTransformation`` (plain gradient ascent
  by default; optax minimizes, so it is fed ``-strict_violation``), followed by
  the projection of inequality multipliers onto ``>= 0``. Optionally the
  augmented Lagrangian (penalty ``rho`` per constraint with a growth rule).
  :class:`dual.Dual` is the one dual implementation, for the methods and a
  user's own loop alike.
* :func:`nupi` -- the nuPI controller of Sohrabi et al. (ICML 2024) as an
  optax ``GradientTransformation``, usable as the dual ``tx``.
* :func:`lagrangian` -- the scalar the primal step minimizes (multipliers and
  penalties under ``stop_gradient``); :func:`multiplier_weights` its gradient
  with respect to ``violation``.
* :func:`constrained_grads` / :func:`constrained_step` -- one training step
  sharing ONE forward pass between the dual and the primal update, in
  ``"dual_primal"`` order (dual first, primal gradient with the NEW multipliers,
  as the Balancing Act code does) or ``"simultaneous"`` (primal gradient with
  the OLD multipliers): :data:`dual.ORDERS`. The trick: the Lagrangian depends on the parameters
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

Example (dual-then-primal step, to be closed over in a method's jitted train step)::

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
                                dual, dual_state, order="dual_primal")

With replay buffers the problem function updates the buffer from the batch's
per-sample correctness and returns it in ``aux``:
``buf2 = buffer_update(buf, correct, batch["g"], batch["w"]); acc, full =
buffer_means(buf2)``; strict violation from ``acc``, ``observed = full``.

Parts. The problem's terms and the Lagrangian are ``lagrangian.py``, the dual step ``dual.py`` (with nuPI and
the observed-only rule in ``dual_ascent.py``), the replay buffers ``buffers.py``; this module names the
one-forward-pass step in the methods' words and holds a method's dual options, and re-exports the rest
(``constrained.dual_optimizer``, ... as before).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import optax

from fairprune_jax.constraints.buffers import (GroupBuffer, _buffer_write_plan, buffer_init,  # noqa: F401
                                               buffer_means, buffer_update)
from fairprune_jax.constraints.dual import (ORDER_ALIASES, ORDERS, Dual, DualOptimizer, capped,  # noqa: F401
                                            dual_optimizer, dual_primal_grads, order_name)
from fairprune_jax.constraints.dual_ascent import NuPIState, nupi, select_observed  # noqa: F401
from fairprune_jax.constraints.lagrangian import (CMPOutput, DualState, Multipliers, StepInfo,  # noqa: F401
                                                  _as_cmp, _terms, lagrangian, multiplier_weights,
                                                  project_multipliers)


__all__ = [
    "CMPOutput", "DualState", "DualOptimizer", "NuPIState", "StepInfo", "GroupBuffer",
    "dual_optimizer", "nupi", "project_multipliers", "lagrangian", "multiplier_weights",
    "constrained_grads", "constrained_step", "buffer_init", "buffer_update", "buffer_means",
]

MODES = ORDERS  # the earlier name of dual.ORDERS


# ---------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------

def constrained_grads(
    problem_fn: Callable[[Any], Any],
    params: Any,
    dual: Dual,
    dual_state: DualState,
    order: str = "dual_primal",
) -> tuple[Any, DualState, StepInfo]:
    """Primal gradient of the Lagrangian and the new dual state, ONE forward pass.

    ``problem_fn(params)`` returns :class:`CMPOutput` or a tuple ``(loss,
    violation[, strict_violation[, observed[, aux]]])``. It is evaluated once
    under ``jax.vjp``; the dual state is updated from ``strict_violation`` and
    ``observed``; then the gradient of :func:`lagrangian` w.r.t. ``params`` is
    obtained by pulling back the cotangent ``(1, multiplier_weights(violation,
    state))``, where ``state`` is the NEW dual state (``"dual_primal"``) or the
    OLD one (``"simultaneous"``); ``order`` is one of :data:`dual.ORDERS` (the
    earlier ``"alternating"`` still reads as ``"dual_primal"``).

    Returns ``(grads, new_dual_state, info)``; apply ``grads`` with any primal
    optimizer (after masking them for pruning, for instance).
    """
    return dual_primal_grads(problem_fn, params, dual, dual_state, order)


def constrained_step(
    problem_fn: Callable[[Any], Any],
    params: Any,
    primal_opt_state: optax.OptState,
    primal_tx: optax.GradientTransformation,
    dual: Dual,
    dual_state: DualState,
    order: str = "dual_primal",
) -> tuple[Any, optax.OptState, DualState, StepInfo]:
    """:func:`constrained_grads` followed by the primal ``primal_tx`` update.

    Returns ``(params, primal_opt_state, dual_state, info)``.
    """
    grads, dual_state, info = constrained_grads(problem_fn, params, dual, dual_state, order)
    updates, primal_opt_state = primal_tx.update(grads, primal_opt_state, params)
    return optax.apply_updates(params, updates), primal_opt_state, dual_state, info


__all__ += ["capped"]


DUAL_OPTIMIZERS = ("sgd", "nupi", "adam")


@dataclasses.dataclass(frozen=True)
class DualOptions:
    """A method's dual-step options (ceag, el, and the bifp family, which raises ``dual_lr`` to 0.1): a method's
    options dataclass inherits them, :func:`check_dual_options` checks them, :func:`dual_from_options` builds the
    dual optimizer."""

    dual_lr: float = 1e-2
    dual_optimizer: str = "sgd"             # DUAL_OPTIMIZERS
    order: str = "dual_primal"              # dual.ORDERS
    augmented: bool = False
    nupi_kp: float = 1.0
    nupi_nu: float = 0.0


def check_dual_options(opts: DualOptions, method: str = "") -> None:
    """Value checks of a method's dual-step options, run before any data loads; ``method`` prefixes the message."""
    prefix = f"{method}: " if method else ""
    if opts.dual_optimizer not in DUAL_OPTIMIZERS:
        raise ValueError(f"{prefix}unknown dual_optimizer {opts.dual_optimizer!r}; valid: "
                         f"{', '.join(DUAL_OPTIMIZERS)}")
    try:
        order_name(opts.order)
    except ValueError:
        raise ValueError(f"{prefix}unknown order {opts.order!r}; valid: {', '.join(ORDERS)}") from None
    if not opts.dual_lr > 0:
        raise ValueError(f"{prefix}dual_lr must be > 0; got {opts.dual_lr}")


def dual_from_options(opts: DualOptions, num_constraints: int, *, equality: bool) -> Dual:
    """The dual optimizer of checked options: ``sgd`` (gradient ascent), ``nupi`` or ``adam`` at ``dual_lr``,
    augmented Lagrangian when ``augmented``."""
    if opts.dual_optimizer == "nupi":
        tx = nupi(opts.dual_lr, kp=opts.nupi_kp, nu=opts.nupi_nu)
    else:
        tx = {"sgd": optax.sgd, "adam": optax.adam}[opts.dual_optimizer](opts.dual_lr)
    return dual_optimizer(num_constraints, equality=equality, tx=tx, augmented=opts.augmented)


__all__ += ["DUAL_OPTIMIZERS", "DualOptions", "check_dual_options", "dual_from_options"]
