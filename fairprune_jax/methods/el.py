"""EL, equalized loss (Tran et al. 2022), Balancing Act's other baseline: the same gradually pruned start as
ceag, then fine-tuning with one equality constraint per group, L_g - L = 0, its strict value from the batch or
(``buffers``) from replay buffers of per-sample losses."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.constraints import constrained
from fairprune_jax.constraints.surrogates import group_means
from fairprune_jax.methods.base import Context, register
from fairprune_jax.techniques.gradual import GradualOptions, pruned_start
from fairprune_jax.techniques.group_finetune import ProblemTerms, Terms, make_constrained_step
from fairprune_jax.training.train import Carry, TrainState, teacher_extra, without_teacher


@dataclasses.dataclass(frozen=True)
class ElOptions(constrained.DualOptions, GradualOptions):
    """el's ``--opt`` keys: the gradual start's, the dual step's, and its loss buffers."""

    buffers: bool = False                   # strict values from loss replay buffers instead of the batch
    buffer_size: int = 40


def el_terms(num_groups: int, use_buffers: bool) -> ProblemTerms:
    """Equalized loss: h_g = L_g - L = 0, strict from the batch or from loss replay buffers."""

    def terms(per, loss, correct, batch, extra):
        g, w = batch["g"], batch["w"]
        loss_g, n_g, _ = group_means(per, g, w, num_groups)
        present = n_g > 0
        proxy = jnp.where(present, loss_g - loss, 0.0)
        if not use_buffers:
            return Terms(proxy, jax.lax.stop_gradient(proxy), present)
        buf = constrained.buffer_update(extra.buffer, jax.lax.stop_gradient(per), g, w)
        overall = constrained.buffer_update(extra.overall, jax.lax.stop_gradient(per), jnp.zeros_like(g), w)
        bl_g, full_g = constrained.buffer_means(buf)
        bl, full = constrained.buffer_means(overall)
        return Terms(proxy, bl_g - bl[0], present & full_g & full[0], {"buffer": buf, "overall": overall})

    return terms


@register("el", "equalized loss (Tran et al. 2022): the same gradual pruning, then fine-tuning with one "
          "equality constraint per group L_g - L = 0", ElOptions,
          check=lambda o: constrained.check_dual_options(o, "el"))
def el(ctx: Context, dense: TrainState, opts: ElOptions) -> tuple[TrainState, dict]:
    start, template, info = pruned_start(ctx, dense, opts)
    G = ctx.dataset.num_groups
    dual = constrained.dual_from_options(opts, G, equality=True)
    tx = ctx.finetune_tx()
    extra = teacher_extra(dense) if opts.distill > 0 else Carry()
    if opts.buffers:
        extra = extra.replace(buffer=constrained.buffer_init(G, opts.buffer_size),
                              overall=constrained.buffer_init(1, 10 * opts.buffer_size))
    state = ctx.masked_state(start, start.masks, tx, extra=extra).with_dual(dual.init())
    step = make_constrained_step(ctx, tx, dual, el_terms(G, opts.buffers), opts.order, distill=opts.distill)
    state, hist = ctx.finetune(state, tx, step_fn=step, desc="fine-tune (el)")
    info.update(history=hist, multipliers=np.asarray(state.dual.multipliers).tolist())
    return without_teacher(state), info
