"""Rewinding a lottery ticket and reporting on it: shared by ``lth``, ``ballot`` and ``fair_scratch``.

The runner hands a method the *trained* dense state, while a ticket's
survivors go back to the weights the dense run had at step ``k``
(``rewind_step``; 0 = initialisation). :func:`rewind_checkpoint` produces them
without the runner having to keep a copy:

* ``k = 0``: the model is rebuilt with ``models.build_model(name, input_shape,
  num_classes, seed=cfg.seed, **cfg.model_options)``, the very call
  ``runner.build_context`` made, so params and BatchNorm statistics are
  bit-identical to the ones dense training started from (a user's own module,
  ``models.CustomModel``, carries a copy of its initial weights instead).
* ``k > 0``: the dense run is *replayed* from that initialisation for ``k``
  steps with its optimizer (``cfg.optimizer``, ``cfg.lr``, weight decay, the
  same cosine horizon of ``cfg.epochs`` epochs), PRNG seed, batch order
  (``train_batches(seed=cfg.seed, epoch)``) and augmentation, i.e. exactly
  what ``runner.train_dense`` does; the state after step ``k`` (weights and
  BatchNorm statistics) is the checkpoint. It costs ``k`` steps, no storage.

:func:`rewind` then builds the state to retrain: surviving weights equal the
checkpoint exactly, pruned weights are 0, non-prunable leaves (biases, norms)
and BatchNorm statistics come from the checkpoint, the optimizer state is
fresh. :func:`dense_tx` is the dense run's optimizer, the budget a rewound
ticket is retrained on when it should get what the dense model got.

:func:`iterative_magnitude` is the loop of iterative magnitude pruning with
rewinding (each round's masks from the magnitudes of the previous round's
trained weights, earlier pruned weights never revived), with the per-round
schedule of :func:`round_schedule`: the rounds are a :class:`pruning.Pruner`'s schedule
(:func:`pruning.iterative` / :func:`pruning.rounds`), and each round's masks are that pruner's
(:meth:`pruning.Pruner.masks_at`), the same code a user's pruning optimizer runs; ``lth`` trains every round
of it, ``ballot``
(``body="lth"``) uses it for the masks of the layers that do not vote.

Also here: per-split accuracy/disparity summaries (:func:`eval_summary`),
sparsity reports (:func:`sparsity_report`) and ``.npz`` mask files
(:func:`save_masks` / :func:`load_masks`), used by every lottery-ticket method.
This module sits below ``methods/``: a method file imports it, never another
method file.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.metrics import fairness
from fairprune_jax.sparsity import pruning, schedules
from fairprune_jax.sparsity.masks import load_masks, named_leaves, save_masks, sparsity_summary  # noqa: F401  (re-exported)
from fairprune_jax.models import build_model
from fairprune_jax.training.train import (TrainState, check_finite, create_state, evaluate, iterate_forever,
                                          make_optimizer, make_train_step)

if TYPE_CHECKING:
    from fairprune_jax.methods.base import Context


class Checkpoint(NamedTuple):
    """Weights (and model state) of the dense run after ``step`` optimizer steps."""

    step: int
    params: Any
    model_state: Any


def copy_tree(tree: Any) -> Any:
    """Fresh device buffers for every leaf (training steps donate their input state)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def dense_steps(ctx: Context) -> int:
    """Number of optimizer steps of the runner's dense training."""
    return ctx.settings.epochs * ctx.steps_per_epoch


def check_rewind_step(ctx: Context, rewind_step: int) -> int:
    """``rewind_step`` as an int in ``[0, dense steps]``, or a clear error."""
    k = int(rewind_step)
    total = dense_steps(ctx)
    if k < 0 or k > total:
        raise ValueError(f"rewind_step={rewind_step} is outside the dense run's steps [0, {total}] "
                         f"({ctx.settings.epochs} epochs x {ctx.steps_per_epoch} steps); "
                         "use 0 for the initialisation or a step of the dense run")
    return k


def initial_weights(ctx: Context) -> tuple[Any, Any]:
    """The params and model state the dense run started from (rebuilt from the model builder and seed).

    A user's own module (``models.CustomModel``) cannot be rebuilt by name: its weights as given, which
    dense training started from, are kept in ``fm.initial`` and copied.
    """
    initial = getattr(ctx.fm, "initial", None)
    if initial is not None:
        return copy_tree(initial[0]), copy_tree(initial[1])
    cfg = ctx.settings
    _, params, model_state = build_model(ctx.fm.name, ctx.fm.input_shape, ctx.fm.num_classes, seed=ctx.stream_seed("dense"),
                                         **cfg.model_options)
    return params, model_state


def dense_tx(ctx: Context):
    """The dense run's optimizer (same as ``runner.train_dense``)."""
    cfg = ctx.settings
    return make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, total_steps=dense_steps(ctx))


def _check_same_structure(ctx: Context, params: Any, reference: Any) -> None:
    a = [(n, tuple(v.shape)) for n, v in named_leaves(params)]
    b = [(n, tuple(v.shape)) for n, v in named_leaves(reference)]
    if a != b:
        raise ValueError("the rebuilt initial model does not match the dense model's parameters; rewinding "
                         f"needs the same model name/options/seed (ctx.fm.name={ctx.fm.name!r}, "
                         f"model_options={ctx.settings.model_options})")


def rewind_checkpoint(ctx: Context, rewind_step: int = 0, *, reference: Any = None) -> Checkpoint:
    """The dense run's state at ``rewind_step`` (0: initialisation), recreated as described above.

    ``reference`` (e.g. the trained dense params) is only used to check that
    the rebuilt model has the same leaves and shapes.
    """
    k = check_rewind_step(ctx, rewind_step)
    params, model_state = initial_weights(ctx)
    if reference is not None:
        _check_same_structure(ctx, params, reference)
    if k == 0:
        return Checkpoint(0, params, model_state)
    cfg = ctx.settings
    tx = dense_tx(ctx)
    state = create_state(params, model_state, tx, seed=ctx.stream_seed("dense"))
    step = make_train_step(ctx.fm, tx, augment=ctx.augment)
    batches = iterate_forever(ctx.dataset.train, cfg.batch_size, ctx.stream_seed("dense"))
    for _ in range(k):
        state, _ = step(state, next(batches))
    check_finite(state, f"replaying the dense run to rewind step {k}")
    return Checkpoint(k, copy_tree(state.params), copy_tree(state.model_state))


def rewind(ctx: Context, ckpt: Checkpoint, masks: Any, tx, extra: Any = None) -> TrainState:
    """A fresh state at the checkpoint under ``masks``: survivors = checkpoint exactly, pruned = 0."""
    # copies: training steps donate their state, and callers keep using the checkpoint and the masks
    return create_state(copy_tree(ckpt.params), copy_tree(ckpt.model_state), tx, masks=copy_tree(masks),
                        seed=ctx.stream_seed("finetune_state"), extra=extra)


# ---------------------------------------------------------------------------
# Reports and mask files
# ---------------------------------------------------------------------------


def round_schedule(final_sparsity: float, fraction: float, max_rounds: int) -> tuple[list[float], float]:
    """Per-round sparsities and the per-round fraction actually used (raised when capped by ``max_rounds``):
    the points of :func:`pruning.iterative` with ``max_rounds``."""
    pts = pruning.iterative(1, fraction=fraction, max_rounds=max_rounds).points(final_sparsity)
    return [s for _, s in pts], schedules.capped_rounds(final_sparsity, fraction, max_rounds)[1]


def iterative_magnitude(ctx: Context, state: TrainState, schedule: Sequence[float],
                        train_round: Any, template: Any = None) -> tuple[TrainState, Any]:
    """Iterative magnitude pruning: round r keeps the largest weights of ``state`` at ``schedule[r - 1]``.

    ``train_round(r, target, masks)`` returns the state the next round's magnitudes are read from (a
    rewound, retrained ticket), or ``None`` to stop after computing round r's masks. Weights pruned in
    a round stay pruned. ``template``: the layers to prune (default ``ctx.template``). Returns the last
    state returned by ``train_round`` and the last masks.
    """
    pruner = pruning.Pruner(sparsity=float(schedule[-1]), schedule=pruning.rounds(schedule), score="magnitude",
                            distribution=ctx.settings.distribution,
                            template=ctx.template if template is None else template)
    masks = None
    for r, target in enumerate(schedule, start=1):
        masks = pruner.masks_at(state.params, r - 1, prev_masks=masks)
        nxt = train_round(r, target, masks)
        if nxt is None:
            break
        state = nxt
    return state, masks


class MaskHistory(Sequence):
    """Masks kept in memory for Python callers; ``results.json`` shows only a one-line summary."""

    def __init__(self, masks: list | None = None, where: str | None = None):
        self._masks = list(masks or [])
        self.where = where

    def append(self, masks: Any) -> None:
        self._masks.append(masks)

    def __getitem__(self, i):
        return self._masks[i]

    def __len__(self) -> int:
        return len(self._masks)

    def __str__(self) -> str:
        loc = f"saved under {self.where}" if self.where else "not saved (no --out)"
        return f"{len(self)} mask(s) kept in memory; {loc}"

    __repr__ = __str__


def _js(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def eval_summary(ctx: Context, state: TrainState, split_name: str = "test") -> dict:
    """Accuracy and disparity of ``state`` on one split (JSON-safe)."""
    split = ctx.dataset.splits()[split_name]
    gc, cc = evaluate(ctx.eval_step, state, split, ctx.settings.eval_batch_size)
    return {"accuracy": _js(fairness.accuracy(gc)),
            "accuracy_parity_gap": _js(fairness.accuracy_parity_gap(gc)),
            "worst_group_accuracy": _js(np.nanmin(fairness.group_accuracy(gc))),
            "class_wise_variance": _js(fairness.class_wise_variance(cc)),
            "max_class_discrepancy": _js(fairness.max_class_discrepancy(cc))}


def sparsity_report(ctx: Context, state: TrainState, masks: Any, target: float) -> dict:
    """Target vs achieved sparsity, overall and per layer."""
    s = sparsity_summary(state.params, masks, ctx.flops)
    return {"sparsity_target": float(target), "sparsity": s["sparsity_prunable"],
            "sparsity_overall": s["sparsity_overall"], "prunable_kept": s["prunable_kept"],
            "prunable_total": s["prunable_total"], "flops_fraction": s.get("flops_fraction"),
            "layers": {n: {"kept": d["kept"], "size": d["size"], "sparsity": d["sparsity"]}
                       for n, d in s["layers"].items()}}


__all__ = ["Checkpoint", "MaskHistory", "copy_tree", "check_rewind_step", "dense_steps", "dense_tx",
           "eval_summary", "initial_weights", "load_masks", "rewind", "rewind_checkpoint", "save_masks",
           "sparsity_report"]
