"""Lottery tickets: iterative magnitude pruning with rewinding, and the rewinding machinery.

``lth`` (Frankle & Carbin 2019; late rewinding, Frankle et al. 2020): every
round removes ``fraction`` of the *remaining* prunable weights by magnitude
(``ctx.config.distribution``: ``uniform`` = layerwise, ``global`` = one ranking
over all layers, or ``erk``), rewinds the survivors to the checkpoint and
retrains them for ``round_epochs``. Round r reaches ``1 - (1 - fraction)^r``;
the last round is clipped to the target (``schedules.iterative_rounds``).

Cap on the number of rounds
---------------------------
At 90% sparsity ``fraction = 0.2`` needs 11 rounds, each a full retraining.
``max_rounds`` (default 5; 0 = no cap) bounds that: when the schedule would
need more rounds, the per-round fraction is raised to
``1 - (1 - target)^(1 / max_rounds)`` so the target is still reached exactly,
in ``max_rounds`` rounds (recorded as ``fraction_used`` in the info).

Rewinding (shared with Ballot)
------------------------------
The runner hands a method the *trained* dense state, while a ticket's
survivors go back to the weights the dense run had at step ``k``
(``rewind_step``; 0 = initialisation). :func:`rewind_checkpoint` produces them
without the runner having to keep a copy:

* ``k = 0``: the model is rebuilt with ``models.build_model(name, input_shape,
  num_classes, seed=cfg.seed, **cfg.model_options)``, the very call
  ``runner.build_context`` made, so params and BatchNorm statistics are
  bit-identical to the ones dense training started from.
* ``k > 0``: the dense run is *replayed* from that initialisation for ``k``
  steps with its optimizer (``cfg.optimizer``, ``cfg.lr``, weight decay, the
  same cosine horizon of ``cfg.epochs`` epochs), PRNG seed, batch order
  (``train_batches(seed=cfg.seed, epoch)``) and augmentation, i.e. exactly
  what ``runner.train_dense`` does; the state after step ``k`` (weights and
  BatchNorm statistics) is the checkpoint. It costs ``k`` steps, no storage.

:func:`rewind` then builds the state to retrain: surviving weights equal the
checkpoint exactly, pruned weights are 0, non-prunable leaves (biases, norms)
and BatchNorm statistics come from the checkpoint, the optimizer state is
fresh. Each round retrains with ``ctx.finetune_tx`` (``ft_lr``, cosine over
the round) rather than continuing the dense schedule from step ``k``.

Outputs per round
-----------------
``info["rounds"]`` holds one sparsity report per round (target and achieved
sparsity, kept weights per layer, train loss/accuracy, test accuracy and
group/class disparity); ``info["round_masks"]`` keeps the masks in memory for
Python callers (shown as one line in ``results.json``). With
``ctx.config.out`` set, ``out/rounds/round_XX.npz`` holds each round's mask
(one array per leaf name, e.g. ``layers/0/kernel``) plus the report as JSON
under ``__report__``.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax import fairness, scores, schedules
from fairprune_jax.masks import named_leaves, ones_like_template, sparsity_summary
from fairprune_jax.methods.base import METHODS, Context, make_optimizer, method_options, register
from fairprune_jax.models import build_model
from fairprune_jax.train import (TrainState, check_finite, create_state, evaluate, iterate_forever,
                                 make_train_step)


# ---------------------------------------------------------------------------
# Rewinding
# ---------------------------------------------------------------------------


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
    return ctx.config.epochs * ctx.steps_per_epoch


def check_rewind_step(ctx: Context, rewind_step: int) -> int:
    """``rewind_step`` as an int in ``[0, dense steps]``, or a clear error."""
    k = int(rewind_step)
    total = dense_steps(ctx)
    if k < 0 or k > total:
        raise ValueError(f"rewind_step={rewind_step} is outside the dense run's steps [0, {total}] "
                         f"({ctx.config.epochs} epochs x {ctx.steps_per_epoch} steps); "
                         "use 0 for the initialisation or a step of the dense run")
    return k


def initial_weights(ctx: Context) -> tuple[Any, Any]:
    """The params and model state the dense run started from (rebuilt from the model builder and seed)."""
    cfg = ctx.config
    _, params, model_state = build_model(ctx.fm.name, ctx.fm.input_shape, ctx.fm.num_classes, seed=cfg.seed,
                                         **cfg.model_options)
    return params, model_state


def dense_tx(ctx: Context):
    """The dense run's optimizer (same as ``runner.train_dense``)."""
    cfg = ctx.config
    return make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, total_steps=dense_steps(ctx))


def _check_same_structure(ctx: Context, params: Any, reference: Any) -> None:
    a = [(n, tuple(v.shape)) for n, v in named_leaves(params)]
    b = [(n, tuple(v.shape)) for n, v in named_leaves(reference)]
    if a != b:
        raise ValueError("the rebuilt initial model does not match the dense model's parameters; rewinding "
                         f"needs the same model name/options/seed (ctx.fm.name={ctx.fm.name!r}, "
                         f"model_options={ctx.config.model_options})")


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
    cfg = ctx.config
    tx = dense_tx(ctx)
    state = create_state(params, model_state, tx, seed=cfg.seed)
    step = make_train_step(ctx.fm, tx, augment=ctx.augment)
    batches = iterate_forever(ctx.dataset.train, cfg.batch_size, cfg.seed)
    for _ in range(k):
        state, _ = step(state, next(batches))
    check_finite(state, f"replaying the dense run to rewind step {k}")
    return Checkpoint(k, copy_tree(state.params), copy_tree(state.model_state))


def rewind(ctx: Context, ckpt: Checkpoint, masks: Any, tx, extra: Any = None) -> TrainState:
    """A fresh state at the checkpoint under ``masks``: survivors = checkpoint exactly, pruned = 0."""
    # copies: training steps donate their state, and callers keep using the checkpoint and the masks
    return create_state(copy_tree(ckpt.params), copy_tree(ckpt.model_state), tx, masks=copy_tree(masks),
                        seed=ctx.config.seed + 1, extra=extra)


# ---------------------------------------------------------------------------
# Reports and mask files
# ---------------------------------------------------------------------------


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
    gc, cc = evaluate(ctx.eval_step, state, split, ctx.config.eval_batch_size)
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


def save_masks(path: Path, masks: Any, report: dict | None = None, **arrays: Any) -> Path:
    """``.npz`` with one array per mask leaf (named like ``layers/0/kernel``), extra arrays, and the report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {n: np.asarray(m) for n, m in named_leaves(masks)}
    for prefix, tree in arrays.items():
        content.update({f"{prefix}/{n}": np.asarray(v) for n, v in named_leaves(tree)})
    if report is not None:
        content["__report__"] = np.array(json.dumps(report))
    np.savez(path, **content)
    return path


def load_masks(path: str | Path) -> tuple[dict[str, np.ndarray], dict | None]:
    """Inverse of :func:`save_masks`: ``({leaf name: array}, report)``."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "__report__"}
        report = json.loads(str(z["__report__"])) if "__report__" in z.files else None
    return arrays, report


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------


def round_schedule(final_sparsity: float, fraction: float, max_rounds: int) -> tuple[list[float], float]:
    """Per-round sparsities and the per-round fraction actually used (raised when capped by ``max_rounds``)."""
    sched = schedules.iterative_rounds(final_sparsity, fraction)
    max_rounds = int(max_rounds)
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0 (0 = no cap); got {max_rounds}")
    if max_rounds and len(sched) > max_rounds:
        fraction = 1.0 - (1.0 - final_sparsity) ** (1.0 / max_rounds)
        sched = [1.0 - (1.0 - fraction) ** r for r in range(1, max_rounds + 1)]
        sched[-1] = float(final_sparsity)
    return sched, float(fraction)


LTH_OPTIONS = {"fraction": 0.2, "rewind_step": 0, "round_epochs": None, "max_rounds": 5}


@register("lth", "lottery ticket: iterative magnitude pruning, survivors rewound to init or step k and "
                 "retrained each round", LTH_OPTIONS)
def lth(ctx: Context, dense: TrainState) -> tuple[TrainState, dict]:
    opts = method_options(METHODS["lth"], ctx.config.method_options)
    cfg = ctx.config
    fraction = float(opts["fraction"])
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"lth: fraction (pruned per round, of the remaining weights) must be in (0, 1); "
                         f"got {fraction}")
    k = check_rewind_step(ctx, opts["rewind_step"])
    round_epochs = cfg.ft_epochs if opts["round_epochs"] is None else int(opts["round_epochs"])
    if round_epochs < 0:
        raise ValueError(f"lth: round_epochs must be >= 0; got {round_epochs}")
    sched, fraction_used = round_schedule(cfg.sparsity, fraction, opts["max_rounds"])
    if fraction_used != fraction:
        warnings.warn(f"lth: {len(schedules.iterative_rounds(cfg.sparsity, fraction))} rounds of fraction "
                      f"{fraction} exceed max_rounds={opts['max_rounds']}; using fraction {fraction_used:.4f} "
                      "per round instead (set --opt max_rounds=0 for no cap)", stacklevel=2)
    rounds_dir = Path(cfg.out) / "rounds" if cfg.out else None
    info: dict[str, Any] = {"schedule": sched, "fraction": fraction, "fraction_used": fraction_used,
                            "rewind_step": k, "round_epochs": round_epochs, "rounds": [],
                            "round_masks": MaskHistory(where=str(rounds_dir) if rounds_dir else None),
                            "history": {}}
    if not sched:  # sparsity 0: the dense model is its own ticket
        return dense.replace(masks=ones_like_template(dense.params, ctx.template)), info

    ckpt = rewind_checkpoint(ctx, k, reference=dense.params)
    tx = ctx.finetune_tx(epochs=round_epochs)  # the same fresh schedule every round: compile the step once
    step_fn = make_train_step(ctx.fm, tx, augment=ctx.augment)
    state, masks = dense, None
    for r, target in enumerate(sched, start=1):
        masks = ctx.masks_from_scores(scores.magnitude(state.params, ctx.template), target, prev_masks=masks)
        state = rewind(ctx, ckpt, masks, tx)
        state, hist = ctx.finetune(state, tx, epochs=round_epochs, step_fn=step_fn,
                                   desc=f"lth round {r}/{len(sched)}")
        report = {"round": r, **sparsity_report(ctx, state, masks, target),
                  "train_loss": hist["loss"][-1] if hist["loss"] else None,
                  "train_accuracy": hist["accuracy"][-1] if hist["accuracy"] else None,
                  "test": eval_summary(ctx, state, "test")}
        if rounds_dir is not None:
            report["mask_file"] = str(save_masks(rounds_dir / f"round_{r:02d}.npz", masks, report))
        info["rounds"].append(report)
        info["round_masks"].append(masks)
        info["history"][f"round_{r}"] = hist
    return state, info


__all__ = ["Checkpoint", "MaskHistory", "copy_tree", "dense_steps", "dense_tx", "eval_summary", "initial_weights",
           "load_masks", "lth", "rewind", "rewind_checkpoint", "round_schedule", "save_masks", "sparsity_report"]
