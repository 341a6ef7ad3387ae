"""The pruned starting point shared by CEAG, NFT and EL (Balancing Act's protocol).

The dense model is pruned with gradual magnitude pruning on the cubic
schedule, with plain cross-entropy (no fairness mitigation while pruning);
by default the first layer (when it is a convolution) and the last layer stay
dense, as in the Balancing Act code. The mitigation methods then differ only
in how they fine-tune this same pruned model.

This module sits below ``methods/``: the method files that start from this
pruned model import it, never one another.
"""
from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from fairprune_jax.training import caches, checkpoint
from fairprune_jax.sparsity import scores, schedules
from fairprune_jax.training.checkpoint import resumable
from fairprune_jax.core.notices import warn
from fairprune_jax.techniques.rewind import copy_tree
from fairprune_jax.sparsity.masks import apply_masks
from fairprune_jax.training.train import TrainState

if TYPE_CHECKING:
    from fairprune_jax.methods.base import Context


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    """Distillation from the dense model during fine-tuning (every fine-tuning method's options inherit it)."""

    distill: float = 0.0                    # weight of KL(dense || pruned) added to the fine-tuning loss


@dataclasses.dataclass(frozen=True)
class PrunePhaseOptions:
    """Options of a masked pruning phase before fine-tuning (a method's options dataclass inherits them)."""

    prune_epochs: int = -1                  # -1: half the fine-tuning epochs, at least 1
    keep_first_conv_dense: bool = True      # the first layer stays dense when it is a convolution
    keep_last_dense: bool = True


@dataclasses.dataclass(frozen=True)
class GradualOptions(DistillOptions, PrunePhaseOptions):
    """:func:`pruned_start`'s options and the fine-tuning's distillation, shared by ceag, nft and el."""

    prune_updates: int = 10                 # mask updates on the cubic schedule


def cubic_points(sparsity: float, prune_steps: int, updates: int) -> dict[int, float]:
    """``{step: sparsity}`` of the cubic schedule (Zhu & Gupta 2017) over ``prune_steps`` in ``updates`` mask
    updates."""
    return dict(schedules.cubic_steps(sparsity, prune_steps, max(prune_steps // max(updates, 1), 1)))


def score_hook(ctx: Context, points: dict[int, float], template: Any, score=scores.magnitude):
    """The ``fit`` hook of gradual pruning by ``score(params, template)`` (default: magnitude): before step ``s``
    in ``points``, the masks keep the highest-scoring weights at sparsity ``points[s]`` (already-pruned weights
    never come back); other steps are untouched. A pure function of ``(state, step)``, so a checkpointed phase
    can continue mid-way. With :func:`cubic_points` and :meth:`Context.finetune_masks` it is a whole gradual
    method (``tests/test_layering.py`` builds one in a few lines)."""

    @resumable
    def hook(s: TrainState, step: int) -> TrainState:
        if step not in points:
            return s
        m = ctx.masks_from_scores(score(s.params, template), points[step], prev_masks=s.masks, template=template)
        return s.replace(masks=m, params=apply_masks(s.params, m))

    return hook


magnitude_hook = score_hook      # gradual magnitude pruning (gmp, and the pruned start of ceag / nft / el)


def phase_template(ctx: Context, params: Any, opts: PrunePhaseOptions) -> Any:
    """The prunable template of a pruning phase: the run's exclusions plus the options' first / last layer."""
    return ctx.template_for(params, exclude_first=opts.keep_first_conv_dense and ctx.first_layer_is_conv(params),
                            exclude_last=opts.keep_last_dense)


def pruned_start(ctx: Context, dense: TrainState, opts: GradualOptions) -> tuple[TrainState, Any, dict]:
    """Gradually prune ``dense`` to the target; returns (pruned state, template, info).

    ``prune_epochs`` (-1: half the fine-tuning epochs, at least 1) of masked
    training during which sparsity follows the cubic schedule over the first
    75% of the steps and then stays at the target.
    """
    cfg = ctx.settings
    template = phase_template(ctx, dense.params, opts)
    state, tx, epochs, total = ctx.prune_phase(dense, template, opts.prune_epochs)
    key = start_key(ctx, opts, dense if ctx.cache_dir is not None else None)   # (saved: keyed by the dense model)
    memo_key = ("gradual.pruned_start", json.dumps(key, sort_keys=True, default=str))
    path = ctx.cache_dir / f"pruned-start-{caches.digest(key)}" if ctx.cache_dir is not None else None
    hit = ctx.memo.get(memo_key)
    if hit is None and path is not None:
        got = caches.load_state(path, state, key)
        if got is not None:
            hit = (got[0], dict(got[1]["info"], prune_history=dict(got[1]["info"]["prune_history"], cached=True)))
    if hit is not None:
        if checkpoint.current() is not None:
            checkpoint.current().skip_phase()      # the phases after it keep their numbers on --resume
        ctx.memo[memo_key] = hit
        return copy_tree(hit[0]), template, dict(hit[1])      # copies: training steps donate their state
    prune_steps = max(int(0.75 * total), 1)
    points = cubic_points(cfg.sparsity, prune_steps, opts.prune_updates)
    if cfg.sparsity == 0.0:
        points = {}
    else:
        points[prune_steps] = float(cfg.sparsity)
    hook = magnitude_hook(ctx, points, template)

    if epochs > 0:
        state, hist = ctx.finetune(state, tx, epochs=epochs, hook=hook, desc="prune (gmp)")
    else:  # pragma: no cover - prune_epochs=0 means one-shot
        hist = {}
    if cfg.sparsity > 0:  # idempotent when the schedule already reached the target
        state = hook(state, prune_steps) if prune_steps in points else state
    info = {"prune_history": hist, "prune_epochs": epochs, "schedule": [list(p) for p in sorted(points.items())]}
    ctx.memo[memo_key] = (copy_tree(state), info)
    if path is not None:              # (ctx.cache_dir is set in single-process runs only)
        try:
            caches.save_state(path, state, {"fingerprint": key, "info": info})
        except OSError as e:          # a full disk or a read-only cache folder: this run is unaffected
            warn(f"the pruned model could not be saved for later runs in {path.parent} ({e}); this run is "
                 "unaffected, the next one prunes again")
    return state, template, dict(info)


#: Bump when :func:`pruned_start` computes something else from the same settings (saved starts then miss).
START_VERSION = 1
#: Setting names that cannot change the pruned start (a saved one serves any of their values).
NOT_START = {"method", "method_options", "out", "save_compact", "progress", "certify_eps", "certify_level",
             "certify_interval", "fairness_bound", "small_group", "eval_batch_size"}


def start_key(ctx: Context, opts: GradualOptions, dense: TrainState | None = None) -> dict:
    """What :func:`pruned_start` depends on: the dense model it starts from (a digest of its params and model
    state, when given: a folder's dense model retrained on other data must not find the old one's start), the run's
    settings but those in :data:`NOT_START`, the pruning-phase options (not the fine-tuning's distillation) and
    :data:`START_VERSION`."""
    config = {k: v for k, v in dataclasses.asdict(ctx.settings).items() if k not in NOT_START}
    config["seed"] = ctx.seed
    if ctx.streams != "offset":         # (starts saved before the setting existed are offset ones)
        config["streams"] = ctx.streams
    prune = {f.name: getattr(opts, f.name) for f in dataclasses.fields(GradualOptions)
             if f.name not in {g.name for g in dataclasses.fields(DistillOptions)}}
    key = {"version": START_VERSION, "config": config, "prune": prune}
    if dense is not None:
        key["dense"] = caches.arrays_digest((dense.params, dense.model_state))
    return json.loads(json.dumps(key, default=str))
