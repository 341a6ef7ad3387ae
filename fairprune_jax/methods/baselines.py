"""Baselines: one-shot magnitude, gradual magnitude (GMP) and random pruning."""
from __future__ import annotations

import dataclasses

import jax

from fairprune_jax import scores, schedules
from fairprune_jax.checkpoint import resumable
from fairprune_jax.masks import apply_masks, ones_like_template
from fairprune_jax.methods.base import Context, NoOptions, register
from fairprune_jax.train import TrainState


@register("magnitude", "one-shot magnitude pruning to the target, then fine-tuning")
def magnitude(ctx: Context, dense: TrainState, opts: NoOptions) -> tuple[TrainState, dict]:
    masks = ctx.masks_from_scores(scores.magnitude(dense.params, ctx.template), ctx.config.sparsity)
    tx = ctx.finetune_tx()
    state, hist = ctx.finetune(ctx.masked_state(dense, masks, tx), tx)
    return state, {"history": hist}


@register("random", "one-shot random pruning to the target, then fine-tuning")
def random(ctx: Context, dense: TrainState, opts: NoOptions) -> tuple[TrainState, dict]:
    key = jax.random.key(ctx.stream_seed("random_scores"))
    masks = ctx.masks_from_scores(scores.random(key, dense.params, ctx.template), ctx.config.sparsity)
    tx = ctx.finetune_tx()
    state, hist = ctx.finetune(ctx.masked_state(dense, masks, tx), tx)
    return state, {"history": hist}


def gradual_magnitude_hook(ctx: Context, total_steps: int, prune_fraction: float, updates: int):
    """A ``fit`` hook that raises sparsity on the cubic schedule (Zhu & Gupta 2017) by magnitude.

    Pruning happens over the first ``prune_fraction`` of ``total_steps`` in
    ``updates`` mask updates; already-pruned weights never come back.
    """
    prune_steps = max(int(total_steps * prune_fraction), 1)
    points = dict(schedules.cubic_steps(ctx.config.sparsity, prune_steps,
                                        max(prune_steps // max(updates, 1), 1)))
    points[0] = schedules.cubic(0, ctx.config.sparsity, prune_steps)

    @resumable  # a pure function of (state, step): a checkpointed phase can continue mid-way
    def hook(state: TrainState, step: int) -> TrainState:
        if step not in points:
            return state
        masks = ctx.masks_from_scores(scores.magnitude(state.params, ctx.template), points[step],
                                      prev_masks=state.masks)
        return state.replace(masks=masks, params=apply_masks(state.params, masks))

    return hook, points


@dataclasses.dataclass(frozen=True)
class GmpOptions:
    prune_fraction: float = 0.75            # of the fine-tuning steps, over which sparsity rises
    updates: int = 10                       # mask updates on the cubic schedule


@register("gmp", "gradual magnitude pruning on the cubic schedule during fine-tuning", GmpOptions)
def gmp(ctx: Context, dense: TrainState, opts: GmpOptions) -> tuple[TrainState, dict]:
    tx = ctx.finetune_tx()
    state = ctx.masked_state(dense, ones_like_template(dense.params, ctx.template), tx)
    total = ctx.config.ft_epochs * ctx.steps_per_epoch
    hook, points = gradual_magnitude_hook(ctx, total, opts.prune_fraction, opts.updates)
    state, hist = ctx.finetune(state, tx, hook=hook)
    last = max(points)
    if last >= total:
        # The hook runs before steps 0..total-1, so a schedule whose last point is not before the end
        # (prune_fraction >= 1, or 0 or 1 fine-tuning steps) would stop short of the target: finish it here.
        state = hook(state, last)
    return state, {"history": hist, "schedule": sorted(points.items())}
