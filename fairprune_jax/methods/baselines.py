"""Baselines: one-shot magnitude, gradual magnitude (GMP) and random pruning."""
from __future__ import annotations

import dataclasses

import jax

from fairprune_jax.sparsity import scores, schedules
from fairprune_jax.techniques.gradual import DistillOptions, cubic_points, magnitude_hook
from fairprune_jax.sparsity.masks import ones_like_template
from fairprune_jax.methods.base import Context, register
from fairprune_jax.training.train import TrainState


@register("magnitude", "one-shot magnitude pruning to the target, then fine-tuning", DistillOptions)
def magnitude(ctx: Context, dense: TrainState, opts: DistillOptions) -> tuple[TrainState, dict]:
    masks = ctx.masks_from_scores(scores.magnitude(dense.params, ctx.template), ctx.settings.sparsity)
    state, hist = ctx.finetune_masks(dense, masks, distill=opts.distill)
    return state, {"history": hist}


@register("random", "one-shot random pruning to the target, then fine-tuning", DistillOptions)
def random(ctx: Context, dense: TrainState, opts: DistillOptions) -> tuple[TrainState, dict]:
    key = jax.random.key(ctx.stream_seed("random_scores"))
    masks = ctx.masks_from_scores(scores.random(key, dense.params, ctx.template), ctx.settings.sparsity)
    state, hist = ctx.finetune_masks(dense, masks, distill=opts.distill)
    return state, {"history": hist}


def gradual_magnitude_hook(ctx: Context, total_steps: int, prune_fraction: float, updates: int):
    """A ``fit`` hook that raises sparsity on the cubic schedule (Zhu & Gupta 2017) by magnitude.

    Pruning happens over the first ``prune_fraction`` of ``total_steps`` in
    ``updates`` mask updates; already-pruned weights never come back.
    """
    prune_steps = max(int(total_steps * prune_fraction), 1)
    points = cubic_points(ctx.settings.sparsity, prune_steps, updates)
    points[0] = schedules.cubic(0, ctx.settings.sparsity, prune_steps)
    return magnitude_hook(ctx, points, ctx.template), points


@dataclasses.dataclass(frozen=True)
class GmpOptions(DistillOptions):
    prune_fraction: float = 0.75            # of the fine-tuning steps, over which sparsity rises
    updates: int = 10                       # mask updates on the cubic schedule


@register("gmp", "gradual magnitude pruning on the cubic schedule during fine-tuning", GmpOptions)
def gmp(ctx: Context, dense: TrainState, opts: GmpOptions) -> tuple[TrainState, dict]:
    total = ctx.settings.ft_epochs * ctx.steps_per_epoch
    hook, points = gradual_magnitude_hook(ctx, total, opts.prune_fraction, opts.updates)
    state, hist = ctx.finetune_masks(dense, ones_like_template(dense.params, ctx.template), hook=hook,
                                     distill=opts.distill)
    last = max(points)
    if last >= total:
        # The hook runs before steps 0..total-1, so a schedule whose last point is not before the end
        # (prune_fraction >= 1, or 0 or 1 fine-tuning steps) would stop short of the target: finish it here.
        state = hook(state, last)
    return state, {"history": hist, "schedule": sorted(points.items())}
