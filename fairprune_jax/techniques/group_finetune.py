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
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.constraints import constrained
from fairprune_jax.constraints.surrogates import group_means
from fairprune_jax.data.base import Split, carve_validation
from fairprune_jax.metrics import fairness
from fairprune_jax.training.checkpoint import resumable
from fairprune_jax.training.train import (StepOutput, TrainState, cross_entropy, distill_loss, evaluate, make_step,
                                          masked_forward, split_logits, weighted_mean)

if TYPE_CHECKING:
    from fairprune_jax.methods.base import Context


# A problem builder gets the per-sample loss, correctness, the batch and the
# method's extra state; it returns (violation, strict_violation, observed, new_extra).
ProblemTerms = Callable[[jax.Array, jax.Array, jax.Array, dict, dict], tuple]


def make_constrained_step(ctx: Context, tx: optax.GradientTransformation, dual: constrained.DualOptimizer,
                          terms: ProblemTerms, mode: str, pre: Callable | None = None,
                          distill: float = 0.0) -> Callable:
    """Jitted ``(state, batch) -> (state, stats)`` for a group-constrained fine-tuning step.

    ``state.dual`` holds the multipliers (in the optimizer state), ``state.extra`` the method's buffers. One forward
    pass serves the loss, the proxy violations, the buffers and both the dual
    and the primal update (:func:`constrained.constrained_grads`); the rest of
    the step is :func:`train.make_step`'s.
    ``pre(state) -> extra``: work outside the differentiated pass before it
    (e.g. CEAG's held-out estimates). Keys of ``extra`` that the terms do not
    return are carried over. With ``extra["trajectory"]`` (:func:`trajectory_init`)
    the multipliers and strict violations are recorded every ``stride`` steps,
    on device. ``distill`` > 0 adds that weight times the KL to ``extra["teacher"]`` to the objective (not
    to the constraints' losses).
    """

    def objective(forward, state: TrainState, batch: dict) -> StepOutput:
        def problem(params):
            logits, new_ms = forward(params)
            per = cross_entropy(logits, batch["y"])
            loss = weighted_mean(per, batch["w"])
            correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
            violation, strict, observed, new_extra = terms(per, loss, correct, batch, state.extra)
            return (loss + distill_loss(logits, batch), violation, strict, observed,
                    (logits, new_ms, correct, new_extra))

        grads, new_dual, info = constrained.constrained_grads(problem, state.params, dual, state.dual, mode)
        logits, new_ms, correct, new_extra = info.aux
        new_extra = dict(new_extra)
        group_acc = new_extra.pop("group_accuracy", None)   # what the dual step read, for tracking only
        new_extra = {**state.extra, **new_extra}
        if "trajectory" in new_extra:
            new_extra["trajectory"] = trajectory_record(new_extra["trajectory"], state.step, new_dual.multipliers,
                                                        info.strict_violation, info.observed)
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


def trajectory_init(num_constraints: int, total_steps: int, points: int = TRAJECTORY_POINTS) -> dict:
    """Device buffers for the multiplier / strict-violation trajectory: one row every ``stride`` steps."""
    stride = max(-(-int(total_steps) // points), 1)
    rows = max(-(-int(total_steps) // stride), 1)
    nan = lambda: jnp.full((rows, num_constraints), jnp.nan, jnp.float32)  # noqa: E731 (two buffers: donated)
    return {"stride": jnp.asarray(stride, jnp.int32), "multipliers": nan(), "violation": nan(),
            "observed": jnp.zeros((num_constraints,), bool), "violated": jnp.zeros((num_constraints,), bool)}


def trajectory_record(traj: dict, step: jax.Array, multipliers: jax.Array, strict: jax.Array,
                      observed: jax.Array) -> dict:
    """Write this step's row (the last step of each stride wins) and the ever-observed / ever-violated flags."""
    row = jnp.minimum(step // traj["stride"], traj["multipliers"].shape[0] - 1)
    strict = jnp.where(observed, strict, jnp.nan)
    return {"stride": traj["stride"], "multipliers": traj["multipliers"].at[row].set(multipliers),
            "violation": traj["violation"].at[row].set(strict), "observed": traj["observed"] | observed,
            "violated": traj["violated"] | (observed & (strict > 0))}


def trajectory_info(traj: dict, names: list[str], offset: np.ndarray | float = 0.0) -> dict:
    """The recorded trajectory for ``results.json``: steps, multipliers, and violation + ``offset``
    (CEAG: + eps_g, i.e. the psi_g estimate the dual step saw)."""
    stride = int(traj["stride"])
    m, v = np.asarray(traj["multipliers"]), np.asarray(traj["violation"]) + np.asarray(offset)
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

    def pre(state: TrainState) -> dict:
        idx = perm[(state.step * rows + jnp.arange(rows)) % n]
        params = jax.lax.stop_gradient(state.params)
        logits, _ = masked_forward(fm, params, state.masks, state.model_state, vx[idx], train=False)
        correct = (jnp.argmax(logits, -1) == vy[idx]).astype(jnp.float32)
        return dict(state.extra, val_correct=state.extra["val_correct"].at[idx].set(correct))

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


def selection_init(state: TrainState, points: int) -> dict:
    """Device state of the checkpoint selection: the best weights so far, their score, and a log."""
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    return {"best": {"params": copy(state.params), "model_state": copy(state.model_state)},
            "best_score": jnp.asarray([-1.0, -jnp.inf, -1.0], jnp.float32),   # feasible, key, step
            "selection_log": jnp.full((points, 3), jnp.nan, jnp.float32)}     # step, accuracy, max psi - eps_g


def selection_hook(ctx: Context, val: Split, dense_val: fairness.GroupCounts, eps_g: np.ndarray,
                   points: list[int]) -> Callable:
    """A ``fit`` hook (pure in ``(state, step)``, so resumable): at each selection point, evaluate the model
    on the held-out rows and keep it if it is the most accurate feasible one (max_g psi_g - eps_g <= 0) or,
    while none is feasible, the least violating one; of equally good points the later one (the longer trained:
    when the constraint never pushed, ceag then returns what nft does)."""
    where = {p: i for i, p in enumerate(points)}

    def hook(s: TrainState, step: int) -> TrainState:
        if step not in where:
            return s
        acc, psi = held_out_psi(ctx, s, val, dense_val)
        worst = float(np.nanmax(psi - eps_g))
        feasible = worst <= 0.0
        key = float(np.float32(acc if feasible else -worst))   # compared as stored: ties keep the later point
        best = np.asarray(s.extra["best_score"])
        extra = dict(s.extra)
        extra["selection_log"] = s.extra["selection_log"].at[where[step]].set(
            jnp.asarray([step, acc, worst], jnp.float32))
        if (float(feasible), key) >= (float(best[0]), float(best[1])):
            extra["best"] = {"params": jax.tree.map(jnp.copy, s.params),
                             "model_state": jax.tree.map(jnp.copy, s.model_state)}
            extra["best_score"] = jnp.asarray([float(feasible), key, step], jnp.float32)
        return s.replace(extra=extra)

    return resumable(hook)


def selection_result(state: TrainState, points: list[int], eps: float) -> tuple[TrainState, dict]:
    """The selected weights and what ``results.json`` records about the selection."""
    best = np.asarray(state.extra["best_score"])
    log = np.asarray(state.extra["selection_log"])
    chosen = state.replace(params=state.extra["best"]["params"], model_state=state.extra["best"]["model_state"])
    step = int(best[2])
    rows = [r for r in log if np.isfinite(r[0]) and int(r[0]) == step]
    row = rows[0] if rows else None
    return chosen, {"rule": "most accurate checkpoint with max_g (psi_g - eps_g) <= 0 on the rows the constraint "
                            "reads, else the least violating; of equal ones the later", "points": points, "feasible": bool(best[0] > 0), "step": step,
                    "max_psi": None if row is None else float(row[2]) + eps,
                    "max_violation": None if row is None else float(row[2]),
                    "log": [{"step": int(r[0]), "accuracy": float(r[1]), "max_violation": float(r[2])}
                            for r in log if np.isfinite(r[0])]}
