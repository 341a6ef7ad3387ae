"""CEAG (Hashemizadeh et al., *Balancing Act*, ICLR 2024), and its NFT and EL baselines.

All three start from the same gradually pruned model (:mod:`.gradual`) and
differ in the fine-tuning:

* ``nft``: plain cross-entropy fine-tuning.
* ``ceag``: one inequality constraint per group on the excess accuracy gap,
  psi_g = (dense_acc_g - sparse_acc_g) - (dense_acc - sparse_acc) <= eps.
  The primal step uses the loss-based proxy
  (L_sparse,g - L_dense,g) - (L_sparse - L_dense) from the batch; the dual
  step uses the strict psi_g - eps read from replay buffers of the last k
  per-sample correctness values of each group (and of all samples for the
  overall accuracy). Dense per-group accuracy and loss are computed once on
  the train split before fine-tuning.
* ``el``: equalized loss (Tran et al. 2022), one equality constraint per
  group L_g - L = 0, with the strict value from the batch or (``buffers``)
  from replay buffers of per-sample losses.

Per-group quantities come from ``segment_sum``: the step costs the same for 2
or 1000 groups.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax import constrained
from fairprune_jax.methods.base import METHODS, Context, method_options, register
from fairprune_jax.methods.gradual import PRUNE_OPTIONS, pruned_start
from fairprune_jax.surrogates import group_means
from fairprune_jax.train import (TrainState, apply_gradients, cross_entropy, masked_forward, step_inputs,
                                 weighted_mean)

DUAL_OPTIONS = {"dual_lr": 1e-2, "dual_optimizer": "sgd", "mode": "alternating", "augmented": False,
                "nupi_kp": 1.0, "nupi_nu": 0.0}


def make_dual(opts: dict, num_constraints: int, equality: bool) -> constrained.DualOptimizer:
    """The dual optimizer from method options: ``sgd`` (gradient ascent), ``nupi`` or ``adam``."""
    name = opts["dual_optimizer"]
    if name == "sgd":
        tx = optax.sgd(opts["dual_lr"])
    elif name == "nupi":
        tx = constrained.nupi(opts["dual_lr"], kp=opts["nupi_kp"], nu=opts["nupi_nu"])
    elif name == "adam":
        tx = optax.adam(opts["dual_lr"])
    else:
        raise ValueError(f"unknown dual_optimizer {name!r}; valid: sgd, nupi, adam")
    if opts["mode"] not in constrained.MODES:
        raise ValueError(f"unknown mode {opts['mode']!r}; valid: {', '.join(constrained.MODES)}")
    return constrained.dual_optimizer(num_constraints, equality=equality, tx=tx,
                                      augmented=bool(opts["augmented"]))


# A problem builder gets the per-sample loss, correctness, the batch and the
# method's extra state; it returns (violation, strict_violation, observed, new_extra).
ProblemTerms = Callable[[jax.Array, jax.Array, jax.Array, dict, dict], tuple]


def make_constrained_step(ctx: Context, tx: optax.GradientTransformation, dual: constrained.DualOptimizer,
                          terms: ProblemTerms, mode: str) -> Callable:
    """Jitted ``(state, batch) -> (state, stats)`` for a group-constrained fine-tuning step.

    ``state.extra`` is ``{"dual": DualState, ...method buffers}``. One forward
    pass serves the loss, the proxy violations, the buffers and both the dual
    and the primal update (:func:`constrained.constrained_grads`).
    """
    fm, augment = ctx.fm, ctx.augment

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, x = step_inputs(state, batch, augment)

        def problem(params):
            logits, new_ms = masked_forward(fm, params, state.masks, state.model_state, x, train=True)
            per = cross_entropy(logits, batch["y"])
            loss = weighted_mean(per, batch["w"])
            correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
            violation, strict, observed, new_extra = terms(per, loss, correct, batch, state.extra)
            return loss, violation, strict, observed, (new_ms, correct, new_extra)

        grads, new_dual, info = constrained.constrained_grads(problem, state.params, dual, state.extra["dual"],
                                                              mode)
        new_ms, correct, new_extra = info.aux
        new_extra = dict(new_extra, dual=new_dual)
        new_state = apply_gradients(state, grads, tx, model_state=new_ms, loss=info.loss, rng=rng,
                                    extra=new_extra)
        stats = {"loss": info.loss, "accuracy": weighted_mean(correct, batch["w"]),
                 "max_multiplier": jnp.max(new_dual.multipliers),
                 "max_strict_violation": jnp.max(jnp.where(info.observed, info.strict_violation, -jnp.inf))}
        return new_state, stats

    return jax.jit(step, donate_argnums=0)


def dense_reference(ctx: Context) -> dict[str, jax.Array]:
    """Dense per-group and overall accuracy and mean loss on the train split (computed once)."""
    c = ctx.dense_train_counts
    n = np.maximum(c.n, 1.0)
    return {"acc_g": jnp.asarray(c.correct / n, jnp.float32), "loss_g": jnp.asarray(c.loss_sum / n, jnp.float32),
            "acc": jnp.asarray(c.correct.sum() / c.n.sum(), jnp.float32),
            "loss": jnp.asarray(c.loss_sum.sum() / c.n.sum(), jnp.float32)}


CEAG_OPTIONS = {"eps": 0.01, "buffer_size": 40, "overall_buffer_size": 1000, **DUAL_OPTIONS, **PRUNE_OPTIONS}


def ceag_terms(num_groups: int, ref: dict, eps: float) -> ProblemTerms:
    """Proxy (loss-based) and strict (buffer accuracy-based) excess-gap violations."""

    def terms(per, loss, correct, batch, extra):
        g, w = batch["g"], batch["w"]
        loss_g, n_g, _ = group_means(per, g, w, num_groups)
        present = n_g > 0
        proxy = jnp.where(present, (loss_g - ref["loss_g"]) - (loss - ref["loss"]), 0.0)
        buf = constrained.buffer_update(extra["buffer"], correct, g, w)
        overall = constrained.buffer_update(extra["overall"], correct, jnp.zeros_like(g), w)
        acc_g, full_g = constrained.buffer_means(buf)
        acc, full = constrained.buffer_means(overall)
        strict = (ref["acc_g"] - acc_g) - (ref["acc"] - acc[0]) - eps
        observed = present & full_g & full[0]
        return proxy, strict, observed, {"buffer": buf, "overall": overall}

    return terms


@register("ceag", "Balancing Act: gradual magnitude pruning, then fine-tuning with one constraint per group "
          "on the excess accuracy gap psi_g <= eps (Lagrange multipliers, replay buffers)", CEAG_OPTIONS)
def ceag(ctx: Context, dense: TrainState) -> tuple[TrainState, dict]:
    opts = method_options(METHODS["ceag"], ctx.config.method_options)
    if opts["augmented"] and opts["dual_optimizer"] != "sgd":
        raise ValueError("ceag: augmented=True uses its own dual step; leave dual_optimizer=sgd")
    start, template, info = pruned_start(ctx, dense, opts)
    G = ctx.dataset.num_groups
    dual = make_dual(opts, G, equality=False)
    tx = ctx.finetune_tx()
    extra = {"dual": dual.init(), "buffer": constrained.buffer_init(G, int(opts["buffer_size"])),
             "overall": constrained.buffer_init(1, int(opts["overall_buffer_size"]))}
    state = ctx.masked_state(start, start.masks, tx, extra=extra)
    step = make_constrained_step(ctx, tx, dual, ceag_terms(G, dense_reference(ctx), float(opts["eps"])),
                                 opts["mode"])
    state, hist = ctx.finetune(state, tx, step_fn=step, desc="fine-tune (ceag)")
    info.update(history=hist, multipliers=np.asarray(state.extra["dual"].multipliers).tolist(),
                eps=float(opts["eps"]))
    return state, info


NFT_OPTIONS = dict(PRUNE_OPTIONS)


@register("nft", "naive fine-tuning: the same gradual pruning as ceag, then plain cross-entropy fine-tuning",
          NFT_OPTIONS)
def nft(ctx: Context, dense: TrainState) -> tuple[TrainState, dict]:
    opts = method_options(METHODS["nft"], ctx.config.method_options)
    start, template, info = pruned_start(ctx, dense, opts)
    tx = ctx.finetune_tx()
    state = ctx.masked_state(start, start.masks, tx)
    state, hist = ctx.finetune(state, tx, desc="fine-tune (nft)")
    info.update(history=hist)
    return state, info


EL_OPTIONS = {"buffers": False, "buffer_size": 40, **DUAL_OPTIONS, **PRUNE_OPTIONS}


def el_terms(num_groups: int, use_buffers: bool) -> ProblemTerms:
    """Equalized loss: h_g = L_g - L = 0, strict from the batch or from loss replay buffers."""

    def terms(per, loss, correct, batch, extra):
        g, w = batch["g"], batch["w"]
        loss_g, n_g, _ = group_means(per, g, w, num_groups)
        present = n_g > 0
        proxy = jnp.where(present, loss_g - loss, 0.0)
        if not use_buffers:
            return proxy, jax.lax.stop_gradient(proxy), present, {}
        buf = constrained.buffer_update(extra["buffer"], jax.lax.stop_gradient(per), g, w)
        overall = constrained.buffer_update(extra["overall"], jax.lax.stop_gradient(per), jnp.zeros_like(g), w)
        bl_g, full_g = constrained.buffer_means(buf)
        bl, full = constrained.buffer_means(overall)
        return proxy, bl_g - bl[0], present & full_g & full[0], {"buffer": buf, "overall": overall}

    return terms


@register("el", "equalized loss (Tran et al. 2022): the same gradual pruning, then fine-tuning with one "
          "equality constraint per group L_g - L = 0", EL_OPTIONS)
def el(ctx: Context, dense: TrainState) -> tuple[TrainState, dict]:
    opts = method_options(METHODS["el"], ctx.config.method_options)
    start, template, info = pruned_start(ctx, dense, opts)
    G = ctx.dataset.num_groups
    dual = make_dual(opts, G, equality=True)
    tx = ctx.finetune_tx()
    extra: dict[str, Any] = {"dual": dual.init()}
    if opts["buffers"]:
        extra["buffer"] = constrained.buffer_init(G, int(opts["buffer_size"]))
        extra["overall"] = constrained.buffer_init(1, 10 * int(opts["buffer_size"]))
    state = ctx.masked_state(start, start.masks, tx, extra=extra)
    step = make_constrained_step(ctx, tx, dual, el_terms(G, bool(opts["buffers"])), opts["mode"])
    state, hist = ctx.finetune(state, tx, step_fn=step, desc="fine-tune (el)")
    info.update(history=hist, multipliers=np.asarray(state.extra["dual"].multipliers).tolist())
    return state, info
