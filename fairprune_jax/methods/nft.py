"""NFT, Balancing Act's naive fine-tuning baseline: the same gradually pruned start as ceag, then plain
cross-entropy fine-tuning; ``early_stop=true`` is the paper's "NFT + early stopping", the most accurate of
``select_points`` checkpoints on held-out rows (the authors pick the best test epoch,
merajhashemi/balancing-act main.py:150-154)."""
from __future__ import annotations

import dataclasses

import numpy as np

from fairprune_jax.methods.base import Context, register
from fairprune_jax.techniques.gradual import GradualOptions, pruned_start
from fairprune_jax.techniques.group_finetune import held_out_rows, selection_hook, selection_init, selection_result
from fairprune_jax.training.train import TrainState, carried, carry_of, evaluate, teacher_extra, without_teacher


@dataclasses.dataclass(frozen=True)
class NftOptions(GradualOptions):
    """nft's ``--opt`` keys: the gradual start's, and early stopping (Balancing Act's "NFT + early stopping"
    baseline, chosen here on held-out rows: the authors' code picks the best epoch on the test split,
    merajhashemi/balancing-act main.py:150-154)."""

    early_stop: bool = False                # return the most accurate of select_points checkpoints on held-out rows
    select_points: int = 8
    val_fraction: float = 0.1


#: The bound that makes every checkpoint "feasible" in :func:`selection_hook`: psi_g lies in [-1, 1], so the
#: choice is by held-out accuracy alone (early stopping).
_ANY_PSI = 2.0


@register("nft", "naive fine-tuning: the same gradual pruning as ceag, then plain cross-entropy fine-tuning "
          "(early_stop=true: the most accurate checkpoint on held-out rows)", NftOptions,
          check=lambda o: _check_nft(o))  # noqa: E731 (defined below)
def nft(ctx: Context, dense: TrainState, opts: NftOptions) -> tuple[TrainState, dict]:
    start, template, info = pruned_start(ctx, dense, opts)
    hook, points = None, []
    if opts.early_stop:
        ctx, val, where = held_out_rows(ctx, opts.val_fraction)
        total = ctx.settings.ft_epochs * ctx.steps_per_epoch
        points = sorted({max(int(round(total * (k + 1) / opts.select_points)), 1) for k in range(opts.select_points)})
        dense_val = evaluate(ctx.eval_step, dense, val, ctx.settings.eval_batch_size)[0]
        hook = selection_hook(ctx, val, dense_val, np.full(ctx.dataset.num_groups, _ANY_PSI, np.float32), points)
    tx = ctx.finetune_tx()
    extra = teacher_extra(dense) if opts.distill > 0 else None
    state = ctx.masked_state(start, start.masks, tx, extra=extra)
    if opts.early_stop:
        state = state.replace(extra=carry_of(state).replace(selection=selection_init(state, len(points))))
    state, hist = ctx.finetune(state, tx, desc="fine-tune (nft)", distill=opts.distill, hook=hook)
    info.update(history=hist)
    if opts.early_stop:
        state = hook(state, total)   # the last point comes after the last step
        state, sel = selection_result(state, points, _ANY_PSI)
        sel.update(rule="most accurate checkpoint on the held-out rows (early stopping); of equal ones the later",
                   rows=where.replace("constrained fine-tuning", "fine-tuning"))
        sel.pop("feasible", None)
        info["selection"] = sel
        state = state.replace(extra=carried(carry_of(state).replace(selection=None)))
    return without_teacher(state), info


def _check_nft(opts: NftOptions) -> None:
    if opts.select_points < 1:
        raise ValueError(f"nft: select_points must be >= 1; got {opts.select_points}")
    if not 0 < opts.val_fraction < 1:
        raise ValueError(f"nft: val_fraction must be in (0, 1); got {opts.val_fraction}")
