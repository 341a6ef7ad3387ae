"""Masked training and evaluation as pure, jitted step functions.

A step is ``state, batch -> state, stats``. The state is one pytree holding
everything a run needs to continue: params, masks, optimizer state, model
state (BatchNorm statistics), PRNG key, step counter, the first step whose
loss was not finite, and ``extra`` for a method's own state (multipliers,
replay buffers, scores). The masks live in the optimizer state (see
:class:`TrainState`); they are applied in the forward pass, and the optimizer
update (:func:`pruning.masked_update`) keeps pruned weights exactly zero
whatever the optimizer does (momentum, weight decay).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from fairprune_jax.core.notices import tqdm

from fairprune_jax.training import checkpoint as checkpoint_lib
from fairprune_jax.training import tracking as tracking_lib
from fairprune_jax.metrics import certify, fairness
from fairprune_jax.constraints import constrained
from fairprune_jax.training import distributed
from fairprune_jax.sparsity import pruning
from fairprune_jax.core.config import OPTIMIZERS
from fairprune_jax.data.base import Split, eval_batches, steps_per_epoch, train_batches
from fairprune_jax.sparsity.masks import apply_masks
from fairprune_jax.models import FunctionalModel


def make_optimizer(name: str, lr: float, weight_decay: float = 0.0,
                   total_steps: int | None = None) -> optax.GradientTransformation:
    """Adam(W) or SGD with momentum 0.9; a cosine decay when ``total_steps`` is known.

    The optimizer of the dense run and of every method's fine-tuning (``lr`` may also be an optax schedule).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    schedule = optax.cosine_decay_schedule(lr, max(total_steps, 1)) if total_steps else lr
    if name == "adam":
        return optax.adamw(schedule, weight_decay=weight_decay) if weight_decay else optax.adam(schedule)
    tx = optax.sgd(schedule, momentum=0.9, nesterov=True)
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx


@struct.dataclass
class TrainState:
    """Everything a training run carries from step to step.

    The masks live in the optimizer state (a :class:`pruning.MaskState`, or the :class:`pruning.PrunerState`
    of a :class:`pruning.Pruner`): ``state.masks`` reads them there (None: a dense model), and
    ``state.replace(masks=m)`` / ``state.with_masks(m)`` put new ones there. So do a constrained method's
    multipliers (:class:`constrained.Multipliers`): ``state.dual``, ``state.with_dual(d)``. The optimizer's own
    state inside those holders is :func:`primal_state`.
    """

    params: Any
    opt_state: Any
    model_state: Any
    rng: jax.Array
    step: jax.Array
    nan_step: jax.Array  # first step with a non-finite loss, -1 while all are finite
    extra: Any = None

    @property
    def masks(self) -> Any:
        """The masks held in the optimizer state (None when nothing is pruned)."""
        return pruning.find_masks(self.opt_state)

    def with_masks(self, masks: Any) -> "TrainState":
        """This state with ``masks`` in its optimizer state (the params are not touched)."""
        return dataclasses.replace(self, opt_state=pruning.with_masks(self.opt_state, masks))

    @property
    def dual(self) -> Any:
        """The constraint multipliers held in the optimizer state (a :class:`constrained.DualState`; None when
        the run has no constraints)."""
        s = self.opt_state
        while isinstance(s, _HOLDERS):
            if isinstance(s, constrained.Multipliers):
                return s.dual
            s = s.inner
        return None

    def with_dual(self, dual: Any) -> "TrainState":
        """This state with the multipliers ``dual`` in its optimizer state (``None`` removes them)."""
        if dual is None:
            return dataclasses.replace(self, opt_state=_drop_multipliers(self.opt_state))
        if self.dual is not None:
            return dataclasses.replace(self, opt_state=_set_dual(self.opt_state, dual))
        primal = constrained.Multipliers(dual, primal_state(self.opt_state))
        return dataclasses.replace(self, opt_state=with_primal(self.opt_state, primal))


#: What the library keeps in a training state's optimizer state around the primal optimizer's own state: the
#: masks (:class:`pruning.MaskState`) and the constraint multipliers (:class:`constrained.Multipliers`).
_HOLDERS = (pruning.MaskState, constrained.Multipliers)


def primal_state(opt_state: Any) -> Any:
    """The state of the optimizer of the params (or of a method's scores) inside the library's holders."""
    while isinstance(opt_state, _HOLDERS):
        opt_state = opt_state.inner
    return opt_state


def with_primal(opt_state: Any, primal: Any) -> Any:
    """``opt_state`` with the state inside its holders replaced by ``primal`` (masks and multipliers kept)."""
    if isinstance(opt_state, _HOLDERS):
        return opt_state._replace(inner=with_primal(opt_state.inner, primal))
    return primal


def _set_dual(opt_state: Any, dual: Any) -> Any:
    if isinstance(opt_state, constrained.Multipliers):
        return opt_state._replace(dual=dual)
    return opt_state._replace(inner=_set_dual(opt_state.inner, dual))


def _drop_multipliers(opt_state: Any) -> Any:
    if isinstance(opt_state, constrained.Multipliers):
        return opt_state.inner
    if isinstance(opt_state, _HOLDERS):
        return opt_state._replace(inner=_drop_multipliers(opt_state.inner))
    return opt_state


def _holds_masks(opt_state: Any) -> bool:
    while isinstance(opt_state, _HOLDERS):
        if isinstance(opt_state, pruning.MaskState):
            return True
        opt_state = opt_state.inner
    return False


def _replace(self: TrainState, **updates: Any) -> TrainState:
    """``dataclasses.replace``, where ``masks=`` and ``dual=`` go into the optimizer state (after a new
    ``opt_state``)."""
    masks = updates.pop("masks", _KEEP)
    dual = updates.pop("dual", _KEEP)
    new = dataclasses.replace(self, **updates)
    if masks is not _KEEP:
        new = new.with_masks(masks)
    return new if dual is _KEEP else new.with_dual(dual)


_KEEP = object()
TrainState.replace = _replace      # (flax's struct.dataclass sets its own replace on the class)


def create_state(params: Any, model_state: Any, tx: optax.GradientTransformation, *, masks: Any = None,
                 seed: int = 0, extra: Any = None) -> TrainState:
    """A fresh state; with ``masks`` the params are masked right away.

    Params and model state are copied: train steps donate their input state,
    and the caller's arrays (a dense model reused by several methods) must
    survive that.
    """
    params = jax.tree.map(jnp.copy, params)
    model_state = jax.tree.map(jnp.copy, model_state)
    masks = None if masks is None else jax.tree.map(jnp.copy, masks)
    if masks is not None:
        params = apply_masks(params, masks)
    return TrainState(params=params, opt_state=pruning.with_masks(tx.init(params), masks), model_state=model_state,
                      rng=jax.random.key(seed), step=jnp.zeros((), jnp.int32),
                      nan_step=jnp.full((), -1, jnp.int32), extra=extra)


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)


def weighted_mean(values: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def masked_forward(fm: FunctionalModel, params: Any, masks: Any, model_state: Any, x: jax.Array,
                   train: bool) -> tuple[jax.Array, Any]:
    """Logits of the masked model (``params * mask``) and the updated model state."""
    if masks is not None:
        params = apply_masks(params, masks)
    return fm.apply(params, model_state, x, train=train)


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


def teacher_extra(dense: TrainState) -> dict:
    """``state.extra`` entries that let a step distil from ``dense`` (copied: train steps donate their state)."""
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    return {"teacher": {"params": copy(dense.params), "model_state": copy(dense.model_state)}}


def without_teacher(state: TrainState) -> TrainState:
    """``state`` with the teacher of :func:`teacher_extra` removed from ``extra`` (a finished method's result)."""
    if not isinstance(state.extra, dict) or "teacher" not in state.extra:
        return state
    rest = {k: v for k, v in state.extra.items() if k != "teacher"}
    return state.replace(extra=rest or None)


def distill_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """``batch["distill"]`` times the mean KL(teacher || model) of the batch's rows; 0 without a teacher.

    :func:`make_step` with ``distill > 0`` puts the dense model's logits (eval mode, no gradient) into
    ``batch["teacher_logits"]``. Matching the dense model's predictions lowers the number of rows whose
    correctness changes, and with it the width of the certificate's psi_g intervals.
    """
    if "teacher_logits" not in batch:
        return jnp.zeros((), jnp.float32)
    t = jax.nn.log_softmax(batch["teacher_logits"].astype(jnp.float32), -1)
    s = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(t) * (t - s), -1)
    return batch["distill"] * weighted_mean(kl, batch["w"])


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
    ``distill`` > 0: the step also runs the teacher in ``state.extra["teacher"]`` (:func:`teacher_extra`) on
    the same inputs and hands its logits to the objective, which adds :func:`distill_loss`.
    """

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, x = step_inputs(state, batch, augment)
        if pre is not None:
            state = pre(state)
        if distill > 0:
            t = state.extra["teacher"]
            t_logits, _ = fm.apply(t["params"], t["model_state"], x, train=False)
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
    times the KL to the teacher in ``state.extra["teacher"]`` (:func:`teacher_extra`).
    """
    return make_step(fm, tx, cross_entropy_objective, augment=augment, distill=distill)


def make_eval_step(fm: FunctionalModel, num_groups: int, num_classes: int, positive_label: int = 1, *,
                   per_class: bool = False) -> Callable[..., tuple]:
    """Jitted ``(params, masks, model_state, batch) -> (group counts, class counts)``.

    ``per_class``: a third output, the :class:`fairness.ClassGroupCounts` behind DP / EO of every class vs
    the rest (for a multi-class target's report), from the same forward pass.
    """

    def step(params, masks, model_state, batch):
        logits, _ = masked_forward(fm, params, masks, model_state, batch["x"], train=False)
        per = cross_entropy(logits, batch["y"])
        by_group = fairness.group_counts(logits, batch["y"], batch["g"], num_groups, loss=per,
                                         weights=batch["w"], positive_label=positive_label)
        by_class = fairness.group_counts(logits, batch["y"], batch["y"], num_classes, loss=per,
                                         weights=batch["w"], positive_label=positive_label)
        if per_class:
            return by_group, by_class, fairness.class_group_counts(logits, batch["y"], batch["g"], num_groups,
                                                                   num_classes, weights=batch["w"])
        return by_group, by_class

    return jax.jit(step)


def evaluate(eval_step: Callable, state: TrainState, split: Split, batch_size: int = 512, *,
             mesh: Any = None) -> tuple:
    """Sum group and class counts (and, from a ``per_class`` step, the class-group counts) over a whole
    split (numpy, float64).

    With a ``mesh`` (default: :func:`distributed.current_mesh`) the batches are
    split over its devices (the batch size is rounded up to a multiple of the
    device count; padding rows have ``w = 0``) and the counts are global.
    """
    totals = sum_over_split(eval_step, (state.params, state.masks, state.model_state), split, batch_size,
                            mesh=mesh)
    return tuple(type(t)(*t) for t in totals)


def sum_over_split(step: Callable, args: Any, split: Split, batch_size: int = 512, *, mesh: Any = None) -> Any:
    """``step(*args, batch)`` summed over every evaluation batch of ``split`` (a pytree of additive counts,
    returned as float64 numpy); ``args`` are replicated over the mesh's devices, batches split over them."""
    mesh = mesh if mesh is not None else distributed.current_mesh()
    bs = min(batch_size, max(len(split), 1))
    if mesh is not None:
        bs = distributed.round_up(bs, mesh)
        args = distributed.replicate(args, mesh)
    sync = distributed.sync_each_step(mesh)
    total = None
    for batch in eval_batches(split, bs):
        out = step(*args, distributed.shard_batch(batch, mesh))
        if sync:
            jax.block_until_ready(out)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    return jax.tree.map(lambda v: np.asarray(v, np.float64), total)


def logits_step(fm: FunctionalModel) -> Callable:
    """Jitted ``(params, masks, model_state, batch) -> logits`` in evaluation mode: the one forward pass that
    the per-row evaluations share (made once per model and kept on it)."""
    step = fm.__dict__.get("_logits_step")
    if step is None:
        step = jax.jit(lambda p, m, s, batch: masked_forward(fm, p, m, s, batch["x"], train=False)[0])
        fm.__dict__["_logits_step"] = step
    return step


def rows_over_split(step: Callable, args: Any, split: Split, batch_size: int = 512) -> np.ndarray:
    """``step(*args, batch)`` for every evaluation batch of ``split``, the rows concatenated in split order
    (padding dropped): the per-row counterpart of :func:`sum_over_split`, for what does not add up over
    batches (a surrogate over all rows, per-row correctness, logits to compare)."""
    bs = min(batch_size, max(len(split), 1))
    return np.concatenate([np.asarray(step(*args, b))[b["w"] > 0] for b in eval_batches(split, bs)])


def split_logits(fm: FunctionalModel, params: Any, masks: Any, model_state: Any, split: Split,
                 batch_size: int = 512) -> np.ndarray:
    """Evaluation-mode logits of the masked model on every row of ``split`` (split order)."""
    return rows_over_split(logits_step(fm), (params, masks, model_state), split, batch_size)


def make_paired_eval_step(fm: FunctionalModel, num_groups: int, num_classes: int) -> Callable:
    """Jitted ``(dense (params, masks, model_state), pruned (...), batch) -> certify.paired_counts``."""
    def step(dense, pruned, batch):
        d_logits, _ = masked_forward(fm, *dense, batch["x"], train=False)
        p_logits, _ = masked_forward(fm, *pruned, batch["x"], train=False)
        return certify.paired_counts(d_logits, p_logits, batch["y"], batch["g"], batch["w"], num_groups,
                                     num_classes)

    return jax.jit(step)


def evaluate_paired(paired_step: Callable, dense: TrainState, pruned: TrainState, split: Split,
                    batch_size: int = 512, *, mesh: Any = None) -> dict[str, np.ndarray]:
    """Paired dense-vs-pruned counts over a whole split (the input of :func:`certify.certificate`)."""
    args = ((dense.params, dense.masks, dense.model_state), (pruned.params, pruned.masks, pruned.model_state))
    return sum_over_split(paired_step, args, split, batch_size, mesh=mesh)


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
        distributed.check_batch_size(batch_size, mesh)
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
