"""Group-constrained fine-tuning from a gradually pruned start: the pieces ceag, nft and el share.

One jitted step for a fine-tuning with per-group constraints (:func:`make_constrained_step`: one forward pass
for the loss, the proxy and strict violations and both updates, the multipliers in the optimizer state), the
trajectory of multipliers and violations recorded on device, the dense model's per-group reference, held-out
rows (the validation split, or a part carved from train) with per-row correctness and exact held-out psi_g,
and the checkpoint selection that returns the most accurate checkpoint meeting a per-group bound on those rows
(a resumable ``fit`` hook). Methods compose these; none of it knows which method runs it.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.constraints import constrained
from fairprune_jax.constraints.surrogates import group_means
from fairprune_jax.data.base import Split, carve_validation
from fairprune_jax.metrics import fairness
from fairprune_jax.training.checkpoint import resumable
from fairprune_jax.training.train import (Carry, StepOutput, TrainState, Weights, carry_of, cross_entropy, distill_loss,
                                          evaluate, make_step, masked_forward, split_logits, weighted_mean)

if TYPE_CHECKING:
    from fairprune_jax.methods.base import Context


class Terms(NamedTuple):
    """What a problem builder returns for one batch: the differentiable ``violation`` (K,), the
    ``strict`` violation the dual step reads and which constraints are ``observed``; ``updates``: the
    :class:`Carry` fields to replace (e.g. replay buffers); ``group_accuracy``: the per-group accuracy the
    dual step read, for tracking (None: the batch's own)."""

    violation: jax.Array
    strict: jax.Array
    observed: jax.Array
    updates: dict | None = None
    group_accuracy: jax.Array | None = None


# A problem builder gets the per-sample loss, the loss, correctness, the batch and the method's carry
# (``state.extra``, a ``Carry``) and returns its :class:`Terms`.
ProblemTerms = Callable[[jax.Array, jax.Array, jax.Array, dict, Carry], Terms]


def make_constrained_step(ctx: Context, tx: optax.GradientTransformation, dual: constrained.Dual,
                          terms: ProblemTerms, order: str, pre: Callable | None = None,
                          distill: float = 0.0) -> Callable:
    """Jitted ``(state, batch) -> (state, stats)`` for a group-constrained fine-tuning step.

    ``state.dual`` holds the multipliers (in the optimizer state), ``state.extra`` the method's buffers. One forward
    pass serves the loss, the proxy violations, the buffers and both the dual
    and the primal update (:func:`constrained.constrained_grads`); the rest of
    the step is :func:`train.make_step`'s.
    ``pre(state) -> Carry``: work outside the differentiated pass before it
    (e.g. CEAG's held-out estimates). Fields of the carry that the terms do not
    return are carried over. With ``extra.trajectory`` (:func:`trajectory_init`)
    the multipliers and strict violations are recorded every ``stride`` steps,
    on device. ``distill`` > 0 adds that weight times the KL to ``extra.teacher`` to the objective (not
    to the constraints' losses).
    """

    def objective(forward, state: TrainState, batch: dict) -> StepOutput:
        def problem(params):
            logits, new_ms = forward(params)
            per = cross_entropy(logits, batch["y"])
            loss = weighted_mean(per, batch["w"])
            correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
            t = terms(per, loss, correct, batch, carry_of(state))
            return (loss + distill_loss(logits, batch), t.violation, t.strict, t.observed,
                    (logits, new_ms, correct, t.updates or {}, t.group_accuracy))

        grads, new_dual, info = constrained.constrained_grads(problem, state.params, dual, state.dual, order)
        logits, new_ms, correct, updates, group_acc = info.aux
        new_extra = carry_of(state).replace(**updates)
        if new_extra.trajectory is not None:
            new_extra = new_extra.replace(trajectory=trajectory_record(new_extra.trajectory, state.step,
                                                                       new_dual.multipliers, info.strict_violation,
                                                                       info.observed))
        if group_acc is None:      # the batch's per-group accuracy (NaN for groups absent from the batch)
            acc_g, n_g, _ = group_means(correct, batch["g"], batch["w"], info.observed.shape[0])
            group_acc = jnp.where(n_g > 0, acc_g, jnp.nan)
        stats = {"max_multiplier": jnp.max(new_dual.multipliers),
                 "max_strict_violation": jnp.max(jnp.where(info.observed, info.strict_violation, -jnp.inf)),
                 # per group (tracking.py): multipliers, the violation the dual step read, its accuracy
                 "multipliers": new_dual.multipliers,
                 "violation": jnp.where(info.observed, info.strict_violation, jnp.nan),
                 "group_accuracy": group_acc}
        return StepOutput(info.loss, logits, new_ms, grads=grads, extra=new_extra, stats=stats, dual=new_dual)

    return make_step(ctx.fm, tx, objective, augment=ctx.augment, distill=distill,
                     pre=None if pre is None else (lambda state: state.replace(extra=pre(state))))


TRAJECTORY_POINTS = 128   # at most this many recorded rows of multipliers / violations per run


class Trajectory(NamedTuple):
    """The multipliers and strict violations recorded on device (``Carry.trajectory``): one row every
    ``stride`` steps, and which constraints were ever observed / ever violated."""

    stride: jax.Array
    multipliers: jax.Array
    violation: jax.Array
    observed: jax.Array
    violated: jax.Array


def trajectory_init(num_constraints: int, total_steps: int, points: int = TRAJECTORY_POINTS) -> Trajectory:
    """Device buffers for the multiplier / strict-violation trajectory: one row every ``stride`` steps."""
    stride = max(-(-int(total_steps) // points), 1)
    rows = max(-(-int(total_steps) // stride), 1)
    nan = lambda: jnp.full((rows, num_constraints), jnp.nan, jnp.float32)  # noqa: E731 (two buffers: donated)
    return Trajectory(jnp.asarray(stride, jnp.int32), nan(), nan(), jnp.zeros((num_constraints,), bool),
                      jnp.zeros((num_constraints,), bool))


def trajectory_record(traj: Trajectory, step: jax.Array, multipliers: jax.Array, strict: jax.Array,
                      observed: jax.Array) -> Trajectory:
    """Write this step's row (the last step of each stride wins) and the ever-observed / ever-violated flags."""
    row = jnp.minimum(step // traj.stride, traj.multipliers.shape[0] - 1)
    strict = jnp.where(observed, strict, jnp.nan)
    return Trajectory(traj.stride, traj.multipliers.at[row].set(multipliers), traj.violation.at[row].set(strict),
                      traj.observed | observed, traj.violated | (observed & (strict > 0)))


def trajectory_info(traj: Trajectory, names: list[str], offset: np.ndarray | float = 0.0) -> dict:
    """The recorded trajectory for ``results.json``: steps, multipliers, and violation + ``offset``
    (CEAG: + eps_g, i.e. the psi_g estimate the dual step saw)."""
    stride = int(traj.stride)
    m, v = np.asarray(traj.multipliers), np.asarray(traj.violation) + np.asarray(offset)
    keep = ~np.all(np.isnan(m), axis=1)
    r = lambda a: [[None if not np.isfinite(x) else round(float(x), 6) for x in row] for row in a[keep]]  # noqa: E731
    return {"groups": list(names), "steps": [int(i * stride) for i in np.flatnonzero(keep)],
            "multipliers": r(m), "estimate": r(v)}


def dense_reference(ctx: Context) -> dict[str, jax.Array]:
    """Dense per-group and overall accuracy and mean loss on the train split (computed once)."""
    return reference_from_counts(ctx.dense_train_counts)


def val_refresh(ctx: Context, val: Split, batch_rows: int, seed: int) -> Callable:
    """``pre`` step: re-evaluate the next ``batch_rows`` held-out rows (a fixed shuffled sweep) in eval mode."""
    n = len(val)
    rows = int(min(max(batch_rows, 1), n))
    perm = jnp.asarray(np.random.default_rng(seed).permutation(n), jnp.int32)
    vx, vy = jnp.asarray(val.x), jnp.asarray(val.y)
    fm = ctx.fm

    def pre(state: TrainState) -> Any:
        idx = perm[(state.step * rows + jnp.arange(rows)) % n]
        params = jax.lax.stop_gradient(state.params)
        logits, _ = masked_forward(fm, params, state.masks, state.model_state, vx[idx], train=False)
        correct = (jnp.argmax(logits, -1) == vy[idx]).astype(jnp.float32)
        carry = carry_of(state)
        return carry.replace(val_correct=carry.val_correct.at[idx].set(correct))

    return pre


def row_correct(ctx: Context, state: TrainState, split: Split) -> np.ndarray:
    """Per-row correctness (float32 0/1, split order) of ``state`` on ``split``, in evaluation batches."""
    logits = split_logits(ctx.fm, state.params, state.masks, state.model_state, split, ctx.settings.eval_batch_size)
    return (np.argmax(logits, -1) == split.y).astype(np.float32)


def reference_from_counts(c: fairness.GroupCounts) -> dict[str, jax.Array]:
    """Per-group and overall accuracy and mean loss from evaluation counts."""
    n = np.maximum(c.n, 1.0)
    return {"acc_g": jnp.asarray(c.correct / n, jnp.float32), "loss_g": jnp.asarray(c.loss_sum / n, jnp.float32),
            "acc": jnp.asarray(c.correct.sum() / max(c.n.sum(), 1.0), jnp.float32),
            "loss": jnp.asarray(c.loss_sum.sum() / max(c.n.sum(), 1.0), jnp.float32)}


def held_out_psi(ctx: Context, state: TrainState, val: Split, dense_val: fairness.GroupCounts) -> tuple[float, np.ndarray]:
    """(accuracy, psi_g per group) of ``state`` on the held-out rows, from exact counts."""
    gc, _ = evaluate(ctx.eval_step, state, val, ctx.settings.eval_batch_size)
    return fairness.accuracy(gc), fairness.excess_accuracy_gap(dense_val, gc)


def held_out_rows(ctx: Context, val_fraction: float) -> tuple[Context, Split, str]:
    """The rows CEAG's dual step reads: the dataset's validation split, or a part carved from train.

    Carved rows (stratified by group and label) are removed from the rows the
    constrained fine-tuning trains on; the dense model and the gradual-pruning
    phase have seen them, so the dense reference accuracy on them is a training
    accuracy (pass ``--val-fraction`` to hold them out of everything).
    """
    ds = ctx.dataset
    if ds.val is not None and len(ds.val):
        return ctx, ds.val, "validation split (held out from dense training)"
    rest, held = carve_validation(ds.train, val_fraction, ctx.stream_seed("ceag_holdout"))
    ctx = dataclasses.replace(ctx, dataset=dataclasses.replace(ds, train=rest, val=held))
    return ctx, held, f"{val_fraction:g} of train carved out (seen by the dense model and gradual pruning, not by the constrained fine-tuning)"


class Selection(NamedTuple):
    """The checkpoint selection's device state (``Carry.selection``): the best weights so far, their score
    (feasible, key, step) and the log (step, accuracy, max psi - eps_g, max psi per selection point)."""

    best: Weights
    score: jax.Array
    log: jax.Array


def selection_init(state: TrainState, points: int) -> Selection:
    """Device state of the checkpoint selection: the best weights so far, their score, and a log."""
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    return Selection(Weights(copy(state.params), copy(state.model_state)),
                     jnp.asarray([-1.0, -jnp.inf, -1.0], jnp.float32),   # feasible, key, step
                     jnp.full((points, 4), jnp.nan, jnp.float32))   # step, accuracy, max psi - eps_g, max psi


def selection_hook(ctx: Context, val: Split, dense_val: fairness.GroupCounts, eps_g: np.ndarray,
                   points: list[int]) -> Callable:
    """A ``fit`` hook (pure in ``(state, step)``, so resumable): at each selection point, evaluate the model
    on the held-out rows and keep it if it is the most accurate feasible one (max_g psi_g - eps_g <= 0; eps_g the
    state's ``Carry.targets`` when a method plans them again during fine-tuning) or,
    while none is feasible, the least violating one; of equally good points the later one (the longer trained:
    when the constraint never pushed, ceag then returns what nft does)."""
    where = {p: i for i, p in enumerate(points)}

    def hook(s: TrainState, step: int) -> TrainState:
        if step not in where:
            return s
        acc, psi = held_out_psi(ctx, s, val, dense_val)
        plan = carry_of(s).targets            # targets planned again during fine-tuning (ceag's aim_refresh)
        worst = float(np.nanmax(psi - (eps_g if plan is None else np.asarray(plan.eps_g, np.float64))))
        feasible = worst <= 0.0
        key = float(np.float32(acc if feasible else -worst))   # compared as stored: ties keep the later point
        sel = carry_of(s).selection
        best = np.asarray(sel.score)
        row = jnp.asarray([step, acc, worst, float(np.nanmax(psi))], jnp.float32)
        sel = sel._replace(log=sel.log.at[where[step]].set(row))
        if (float(feasible), key) >= (float(best[0]), float(best[1])):
            sel = sel._replace(best=Weights(jax.tree.map(jnp.copy, s.params), jax.tree.map(jnp.copy, s.model_state)),
                               score=jnp.asarray([float(feasible), key, step], jnp.float32))
        return s.replace(extra=carry_of(s).replace(selection=sel))

    return resumable(hook)


def selection_result(state: TrainState, points: list[int], eps: float) -> tuple[TrainState, dict]:
    """The selected weights and what ``results.json`` records about the selection."""
    sel = carry_of(state).selection
    best, log = np.asarray(sel.score), np.asarray(sel.log)
    chosen = state.replace(params=sel.best.params, model_state=sel.best.model_state)
    step = int(best[2])
    rows = [r for r in log if np.isfinite(r[0]) and int(r[0]) == step]
    row = rows[0] if rows else None
    return chosen, {"rule": "most accurate checkpoint with max_g (psi_g - eps_g) <= 0 on the rows the constraint "
                            "reads, else the least violating; of equal ones the later", "points": points, "feasible": bool(best[0] > 0), "step": step,
                    # the checkpoint's own max psi_g (its targets eps_g may differ from eps: aim, margin_z)
                    "max_psi": None if row is None else (float(row[3]) if len(row) > 3 else float(row[2]) + eps),
                    "max_violation": None if row is None else float(row[2]),
                    "log": [{"step": int(r[0]), "accuracy": float(r[1]), "max_violation": float(r[2]),
                             **({"max_psi": float(r[3])} if len(r) > 3 else {})} for r in log if np.isfinite(r[0])]}
