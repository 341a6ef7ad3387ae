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

from typing import TYPE_CHECKING, Any

from fairprune_jax import scores, schedules
from fairprune_jax.checkpoint import resumable
from fairprune_jax.masks import apply_masks
from fairprune_jax.train import TrainState

if TYPE_CHECKING:
    from fairprune_jax.methods.base import Context

PRUNE_OPTIONS = {"prune_epochs": -1, "keep_first_conv_dense": True, "keep_last_dense": True,
                 "prune_updates": 10}


def pruned_start(ctx: Context, dense: TrainState, opts: dict) -> tuple[TrainState, Any, dict]:
    """Gradually prune ``dense`` to the target; returns (pruned state, template, info).

    ``prune_epochs`` (-1: half the fine-tuning epochs, at least 1) of masked
    training during which sparsity follows the cubic schedule over the first
    75% of the steps and then stays at the target.
    """
    cfg = ctx.config
    template = ctx.template_for(dense.params,
                                exclude_first=bool(opts["keep_first_conv_dense"]) and ctx.first_layer_is_conv(dense.params),
                                exclude_last=bool(opts["keep_last_dense"]))
    state, tx, epochs, total = ctx.prune_phase(dense, template, opts["prune_epochs"])
    prune_steps = max(int(0.75 * total), 1)
    points = dict(schedules.cubic_steps(cfg.sparsity, prune_steps,
                                        max(prune_steps // max(int(opts["prune_updates"]), 1), 1)))
    if cfg.sparsity == 0.0:
        points = {}
    else:
        points[prune_steps] = float(cfg.sparsity)

    @resumable  # a pure function of (state, step): a checkpointed prune phase can continue mid-way
    def hook(s: TrainState, step: int) -> TrainState:
        if step not in points:
            return s
        m = ctx.masks_from_scores(scores.magnitude(s.params, template), points[step], prev_masks=s.masks,
                                  template=template)
        return s.replace(masks=m, params=apply_masks(s.params, m))

    if epochs > 0:
        state, hist = ctx.finetune(state, tx, epochs=epochs, hook=hook, desc="prune (gmp)")
    else:  # pragma: no cover - prune_epochs=0 means one-shot
        hist = {}
    if cfg.sparsity > 0:  # idempotent when the schedule already reached the target
        state = hook(state, prune_steps) if prune_steps in points else state
    return state, template, {"prune_history": hist, "prune_epochs": epochs,
                             "schedule": sorted(points.items())}
