"""Masked training as pure, jitted step functions.

A step is ``state, batch -> state, stats``. The state is one pytree holding
everything a run needs to continue: params, masks, optimizer state, model
state (BatchNorm statistics), PRNG key, step counter, the first step whose
loss was not finite, and ``extra`` for a method's own state (multipliers,
replay buffers, scores). The masks live in the optimizer state (see
:class:`TrainState`); they are applied in the forward pass, and the optimizer
update (:func:`pruning.masked_step`) keeps pruned weights exactly zero
whatever the optimizer does (momentum, weight decay).

This module holds the one masked step (:func:`make_step`, :func:`apply_gradients`) and the loop over epochs
(:func:`fit`, checkpointed and tracked). The state is ``state.py``, the forward pass and losses
``losses.py``, evaluation over a split ``evaluation.py``; their names are re-exported here
(``train.TrainState``, ``train.evaluate``, ... work as they always have).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.core.notices import raise_if_interrupted, tqdm
from fairprune_jax.data.base import Split, steps_per_epoch, train_batches
from fairprune_jax.models import FunctionalModel
from fairprune_jax.sparsity import pruning
from fairprune_jax.training import checkpoint as checkpoint_lib
from fairprune_jax.training import distributed
from fairprune_jax.training import tracking as tracking_lib
from fairprune_jax.training.evaluation import (Evaluator, evaluate, evaluate_paired, logits_step,  # noqa: F401
                                               make_eval_step, make_paired_eval_step, rows_over_split,
                                               split_logits, sum_over_split)
from fairprune_jax.training.losses import (cross_entropy, distill_loss, masked_forward,  # noqa: F401
                                           teacher_extra, weighted_mean, without_teacher)
from fairprune_jax.training.state import (_HOLDERS, _KEEP, TrainState, _drop_multipliers,  # noqa: F401
                                          Carry, Weights, _holds_masks, _replace, _set_dual, carried, carry_of,
                                          create_state, make_optimizer, primal_state, with_primal)


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation, *,
                    model_state: Any = None, loss: jax.Array | None = None, rng: jax.Array | None = None,
                    extra: Any = None) -> TrainState:
    """One optimizer update that keeps pruned weights at exactly zero.

    With masks in ``state.opt_state`` (a :class:`pruning.MaskState`) the gradients of pruned weights are
    zeroed before ``tx`` runs on the state inside it (so optimizer moments never build up for them) and the
    masks are applied to the updated params (:func:`pruning.masked_step`). A ``tx`` that is itself a
    :meth:`pruning.Pruner.wrap_optax` optimizer (a :class:`pruning.PrunerState` in the state) keeps them at
    zero by its own update.
    """
    primal = primal_state(state.opt_state)
    if _holds_masks(state.opt_state):
        params, primal = pruning.masked_step(tx, state.masks, primal, grads, state.params)
    else:
        updates, primal = tx.update(grads, primal, state.params)
        params = optax.apply_updates(state.params, updates)
    opt_state = with_primal(state.opt_state, primal)
    nan_step = state.nan_step if loss is None else first_nan_step(state, loss)
    return state.replace(params=params, opt_state=opt_state,
                         model_state=state.model_state if model_state is None else model_state,
                         rng=state.rng if rng is None else rng, step=state.step + 1, nan_step=nan_step,
                         extra=state.extra if extra is None else extra)


def first_nan_step(state: TrainState, loss: jax.Array) -> jax.Array:
    """``state.nan_step``, or this step's number if it is the first whose ``loss`` is NaN/Inf."""
    return jnp.where((state.nan_step < 0) & ~jnp.isfinite(loss), state.step, state.nan_step)


Augment = Callable[[jax.Array, jax.Array], jax.Array]


def step_inputs(state: TrainState, batch: dict, augment: Augment | None) -> tuple[jax.Array, jax.Array]:
    """``(next_rng, x)`` for a train step: the state's key advanced and the batch's
    features, augmented inside the step when ``augment`` is given."""
    rng, aug_rng = jax.random.split(state.rng)
    return rng, batch["x"] if augment is None else augment(aug_rng, batch["x"])


class StepOutput(NamedTuple):
    """What a step's objective returns to :func:`make_step`."""

    loss: jax.Array            # the objective's value: ``stats["loss"]`` and the NaN check (``nan_step``)
    logits: jax.Array          # of the step's forward pass: ``stats["accuracy"]``
    model_state: Any           # after the forward pass (BatchNorm statistics)
    grads: Any = None          # d loss / d params: the masked optimizer update of ``state.params``
    extra: Any = None          # the new ``state.extra`` (None: unchanged)
    stats: dict | None = None  # further statistics (a ``loss`` here is reported instead of the objective's)
    fields: dict | None = None  # with ``grads=None``: the TrainState fields the objective updated itself
                                # (e.g. ``masks`` and ``opt_state`` of a step that trains mask scores: the state
                                # of its own optimizer, :func:`primal_state`; masks and multipliers stay around it)
    dual: Any = None           # the new constraint multipliers (kept in the optimizer state; None: unchanged)


Forward = Callable[..., tuple[jax.Array, Any]]
Objective = Callable[[Forward, TrainState, dict], StepOutput]


def make_step(fm: FunctionalModel, tx: optax.GradientTransformation | None, objective: Objective, *,
              augment: Augment | None = None, pre: Callable[[TrainState], TrainState] | None = None,
              distill: float = 0.0) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The one masked training step: jitted ``(state, batch) -> (state, stats)``, the state donated.

    The step owns the PRNG key and augmentation (:func:`step_inputs`), the forward pass, the
    optimizer update that keeps pruned weights at zero (:func:`apply_gradients`), the first
    non-finite loss (``nan_step``) and the ``loss`` / ``accuracy`` statistics. A method supplies
    only ``objective(forward, state, batch) -> StepOutput``: ``forward(params, masks=state.masks,
    model_state=state.model_state)`` is the train-mode forward pass on this step's (augmented)
    inputs, returning ``(logits, new_model_state)``; the objective differentiates through it
    however it needs (``value_and_grad``, one ``vjp`` with several cotangents, a constrained
    dual-then-primal step) and returns the gradient w.r.t. ``state.params`` plus its own extra
    state (multipliers, buffers, votes). An objective that trains something other than the masked
    params (mask scores) returns ``grads=None`` and the updated fields in ``fields``.
    ``pre(state) -> state`` runs before the forward pass, outside differentiation (e.g. CEAG's
    held-out estimates). Rows with ``w = 0`` do not count in the statistics.
    ``distill`` > 0: the step also runs the teacher in ``state.extra.teacher`` (:func:`teacher_extra`) on
    the same inputs and hands its logits to the objective, which adds :func:`distill_loss`.
    """

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, x = step_inputs(state, batch, augment)
        if pre is not None:
            state = pre(state)
        if distill > 0:
            t = state.extra.teacher
            t_logits, _ = fm.apply(t.params, t.model_state, x, train=False)
            batch = {**batch, "teacher_logits": jax.lax.stop_gradient(t_logits),
                     "distill": jnp.asarray(distill, jnp.float32)}

        def forward(params, masks=state.masks, model_state=state.model_state):
            return masked_forward(fm, params, masks, model_state, x, train=True)

        out = objective(forward, state, batch)
        if out.grads is not None:
            new_state = apply_gradients(state, out.grads, tx, model_state=out.model_state, loss=out.loss, rng=rng,
                                        extra=out.extra)
        else:
            fields = dict(out.fields or {})
            if "opt_state" in fields:
                fields["opt_state"] = with_primal(state.opt_state, fields["opt_state"])
            new_state = state.replace(**fields, model_state=out.model_state, rng=rng,
                                      step=state.step + 1, nan_step=first_nan_step(state, out.loss),
                                      extra=state.extra if out.extra is None else out.extra)
        if out.dual is not None:
            new_state = new_state.with_dual(out.dual)
        acc = weighted_mean((jnp.argmax(out.logits, -1) == batch["y"]).astype(jnp.float32), batch["w"])
        return new_state, {"loss": out.loss, "accuracy": acc, **(out.stats or {})}

    return jax.jit(step, donate_argnums=0)


def cross_entropy_objective(forward: Forward, state: TrainState, batch: dict) -> StepOutput:
    """Masked mean cross-entropy of the batch (the dense run's and plain fine-tuning's objective)."""

    def loss_fn(params):
        logits, new_ms = forward(params)
        per = cross_entropy(logits, batch["y"])
        return weighted_mean(per, batch["w"]) + distill_loss(logits, batch), (logits, new_ms)

    (loss, (logits, new_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return StepOutput(loss, logits, new_ms, grads=grads)


def make_train_step(fm: FunctionalModel, tx: optax.GradientTransformation, *, augment: Augment | None = None,
                    distill: float = 0.0) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Jitted masked cross-entropy step: ``(state, batch) -> (state, stats)``.

    ``batch`` is ``{x, y, g, w}``; rows with ``w = 0`` do not count.
    ``augment(rng, x)`` (e.g. random crop + flip) runs inside the step. ``distill`` > 0 adds that weight
    times the KL to the teacher in ``state.extra.teacher`` (:func:`teacher_extra`).
    """
    return make_step(fm, tx, cross_entropy_objective, augment=augment, distill=distill)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or Inf loss."""


def check_finite(state: TrainState, what: str) -> None:
    """Raise with the exact step if any loss so far was NaN/Inf (one host sync)."""
    bad = int(state.nan_step)
    if bad >= 0:
        raise NonFiniteLossError(
            f"{what}: the loss became NaN/Inf at step {bad}. Lower the learning rate (--lr), "
            "check the input features for NaN/Inf, or use gradient clipping.")


Hook = Callable[[TrainState, int], TrainState]


def fit(state: TrainState, train_step: Callable, split: Split, *, epochs: int, batch_size: int, seed: int,
        desc: str = "train", hook: Hook | None = None, progress: bool = True,
        log_every: int = 10, mesh: Any = None, checkpointer: Any = None) -> tuple[TrainState, dict]:
    """Run ``epochs`` epochs of ``train_step`` over shuffled full batches.

    ``hook(state, step)`` runs on the host before each step (mask schedules
    use it). The progress bar shows the running loss; the loss is read back
    only every ``log_every`` steps, so the device is never stalled per step.
    Returns the state and a history of per-epoch mean loss/accuracy.

    ``mesh`` (default: :func:`distributed.current_mesh`): data-parallel over
    its devices; the state is replicated, each batch split over the devices.
    ``checkpointer`` (default: :func:`checkpoint.current`): this call is one
    checkpointed phase named ``desc``: saved every ``checkpointer.every`` steps
    and at its end; on resume a finished phase returns its final state without
    training and an interrupted one continues from its saved (epoch, step).
    A hook must be marked :func:`checkpoint.resumable` (a pure function of
    ``(state, step)``) for its phase to be checkpointed.
    """
    mesh = mesh if mesh is not None else distributed.current_mesh()
    ckpt = checkpointer if checkpointer is not None else checkpoint_lib.current()
    phase = None
    if ckpt is not None:
        phase = ckpt.phase(desc, resumable=hook is None or bool(getattr(hook, "resumable", False)))
    if mesh is not None:
        distributed.check_batch_size(batch_size, mesh, what="batch size")
        state = distributed.replicate(state, mesh)
    n_steps = steps_per_epoch(split, batch_size) * epochs
    history: dict[str, Any] = {"loss": [], "accuracy": []}
    start_epoch = start_in_epoch = global_step = 0
    ep_stats: list[dict] = []
    restored = phase.restore(state) if phase is not None else None
    if restored is not None:
        state, pos = restored
        history = {k: list(pos["history"][k]) for k in ("loss", "accuracy")}
        if pos["final"]:
            history["seconds"] = 0.0
            history["restored"] = True
            return state, history
        start_epoch, start_in_epoch, global_step = pos["epoch"], pos["step_in_epoch"], pos["global_step"]
        ep_stats = [{"loss": np.float32(l), "accuracy": np.float32(a)}
                    for l, a in zip(pos["epoch_stats"]["loss"], pos["epoch_stats"]["accuracy"])]
    sync = distributed.sync_each_step(mesh)
    tracker = tracking_lib.current()          # per-step statistics to TensorBoard, fetched every log_every steps
    tphase = tracker.phase(desc) if tracker is not None else None
    pending: list = []
    t0 = time.perf_counter()
    bar = None      # created after the first step: its rate and ETA leave out the compilation of the step
    for epoch in range(start_epoch, epochs):
        skip = start_in_epoch if epoch == start_epoch else 0
        if epoch != start_epoch:
            ep_stats = []
        for i, batch in enumerate(train_batches(split, batch_size, seed, epoch)):
            if i < skip:
                continue  # already trained before the checkpoint we resumed from
            raise_if_interrupted()      # a Ctrl-C whose KeyboardInterrupt Python dropped (core.notices)
            if hook is not None:
                state = hook(state, global_step)
            state, stats = train_step(state, distributed.shard_batch(batch, mesh))
            if sync:
                jax.block_until_ready(stats)
            ep_stats.append(stats)
            global_step += 1
            if tphase is not None:
                pending.append((global_step, stats))
            if global_step % log_every == 0 and bar is not None:
                bar.set_postfix(loss=f"{float(stats['loss']):.4f}")
                check_finite(state, desc)
                pending = _track(tracker, tphase, pending)
            if phase is not None and phase.due(global_step):
                check_finite(state, desc)
                phase.save(state, epoch=epoch, step_in_epoch=i + 1, global_step=global_step, history=history,
                           epoch_stats=ep_stats, final=False)
            if bar is None:
                if progress:
                    jax.block_until_ready(stats)
                bar = tqdm(total=n_steps, initial=global_step, desc=desc, disable=not progress, leave=False,
                           dynamic_ncols=True, mininterval=0.5)
            else:
                bar.update(1)
        if ep_stats:
            # one host copy of the epoch's statistics (np.stack: no jitted stack compiled per epoch length)
            losses = np.stack(jax.device_get([s["loss"] for s in ep_stats]))
            accs = np.stack(jax.device_get([s["accuracy"] for s in ep_stats]))
            history["loss"].append(float(np.mean(losses)))
            history["accuracy"].append(float(np.mean(accs)))
        check_finite(state, desc)
    if bar is not None:
        bar.close()
    _track(tracker, tphase, pending)
    if phase is not None:
        phase.save(state, epoch=epochs, step_in_epoch=0, global_step=global_step, history=history, epoch_stats=[],
                   final=True)
    history["seconds"] = time.perf_counter() - t0
    return state, history


def _track(tracker: Any, phase: str | None, pending: list) -> list:
    """Hand the pending steps' statistics to the tracker (one device-to-host copy); returns an empty list."""
    if phase is not None and pending:
        steps, stats = zip(*pending)
        tracker.log(phase, list(steps), jax.device_get(list(stats)))
    return []


def iterate_forever(split: Split, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled full batches, epoch after epoch (split over the devices of the current mesh)."""
    mesh = distributed.current_mesh()
    epoch = 0
    while True:
        for batch in train_batches(split, batch_size, seed, epoch):
            yield distributed.shard_batch(batch, mesh)
        epoch += 1
