"""Fair Scratch Tickets (Tang et al., CVPR 2023): fair sparse subnetworks of frozen random weights.

No weight is ever trained. Every prunable weight gets a learned score; the
forward pass uses the weights whose ``|score|`` is in the top-k (edge-popup,
Ramanujan et al. 2020), with k from the target sparsity and
``ctx.config.distribution``, so the mask has exactly the target sparsity at
every step. The top-k is not differentiable; the straight-through estimator
passes the gradient of the masked weight to the score as if the mask were
``|score|`` itself (``m + (|s| - stop_gradient(|s|))``: the forward value is
exactly the 0/1 mask, the gradient w.r.t. ``s`` is ``dL/d(w m) * w * sign(s)``).

The objective is ``cross-entropy + lam * fairness surrogate``, the surrogate
taken by name from :mod:`fairprune_jax.surrogates` (``dp_logistic`` by
default: the logistic convex surrogate of demographic parity used by the
paper, extended to many groups; ``eo*`` for equalized odds, ``ap`` for
accuracy parity) on the protected groups of each batch.

Weights: the model rebuilt with the run's seed (the initialisation the dense
run started from, ``methods.lth.initial_weights``). ``init="signed_constant"``
(default, edge-popup's best) replaces every prunable kernel entry by
``sign(w0) * sqrt(2 / (fan_in * density))`` (Kaiming constant, scaled for the
fraction of inputs kept); ``init="model"`` keeps the builder's random weights.
Biases and normalisation parameters stay at their initial values; BatchNorm
running statistics follow the masked network as usual. Scores start uniform
in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (edge-popup) and are trained with
``cfg.optimizer`` at ``score_lr`` with cosine decay for ``epochs`` (default
``ft_epochs``). The dense trained state is not used (only reported against).

The returned state's params are the frozen weights times the final mask;
``info`` holds the surrogate's value on the train split before and after.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax import masks as masks_lib
from fairprune_jax import surrogates
from fairprune_jax.data.base import Split, eval_batches
from fairprune_jax.masks import _is_none, apply_masks
from fairprune_jax.methods.base import METHODS, Context, make_optimizer, method_options, register
from fairprune_jax.methods.lth import eval_summary, initial_weights, sparsity_report
from fairprune_jax.train import (TrainState, create_state, cross_entropy, fit, masked_forward, step_inputs,
                                 weighted_mean)

INITS = ("signed_constant", "model")


def _fan_in(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1])) if len(shape) > 1 else int(shape[0])


def layer_densities(params: Any, template: Any, sparsity: float, distribution: str) -> dict[str, float]:
    """Fraction of each prunable leaf kept (``global`` has no per-layer count: the overall density)."""
    counts = masks_lib.keep_counts(params, template, sparsity, distribution)
    sizes = {n: int(np.prod(p.shape)) for n, p in masks_lib.named_leaves(params)}
    return {n: (counts[n] / sizes[n] if n in counts else 1.0 - sparsity)
            for n, t in masks_lib.named_leaves(template)}


def frozen_weights(params: Any, template: Any, init: str, densities: dict[str, float]) -> Any:
    """The weights the subnetwork is chosen from (``init``: ``signed_constant`` or ``model``)."""
    if init not in INITS:
        raise ValueError(f"fair_scratch: init must be one of {', '.join(INITS)}; got {init!r}")
    if init == "model":
        return params

    def sc(name, t, w):
        if t is None:
            return w
        std = math.sqrt(2.0 / (_fan_in(w.shape) * max(densities[name], 1e-12)))
        return jnp.where(w >= 0, std, -std).astype(w.dtype)

    return masks_lib.map_named(lambda n, w, t: sc(n, t, w), params, template)


def init_scores(key: jax.Array, params: Any, template: Any) -> Any:
    """Edge-popup initial scores: uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` per prunable weight."""
    restricted = jax.tree.map(lambda t, p: None if t is None else p, template, params, is_leaf=_is_none)
    leaves, treedef = jax.tree.flatten(restricted)
    out = []
    for i, p in enumerate(leaves):
        b = 1.0 / math.sqrt(_fan_in(p.shape))
        out.append(jax.random.uniform(jax.random.fold_in(key, i), p.shape, jnp.float32, -b, b))
    return jax.tree.unflatten(treedef, out)


def score_masks(scores: Any, template: Any, sparsity: float, distribution: str) -> Any:
    """The exact top-k mask of ``|scores|`` (jittable: counts depend on shapes only)."""
    mags = jax.tree.map(jnp.abs, scores)
    return masks_lib.masks_from_scores(mags, template, sparsity, distribution)


def ste_masks(scores: Any, template: Any, sparsity: float, distribution: str) -> tuple[Any, Any]:
    """``(straight-through masks, hard masks)``: forward value = hard 0/1 mask, gradient = d|s|."""
    hard = score_masks(jax.lax.stop_gradient(scores), template, sparsity, distribution)
    ste = jax.tree.map(lambda m, s: None if m is None else m + (jnp.abs(s) - jax.lax.stop_gradient(jnp.abs(s))),
                       hard, scores, is_leaf=_is_none)
    return ste, hard


def make_score_step(fm, tx: optax.GradientTransformation, template: Any, *, sparsity: float, distribution: str,
                    fair_fn: Callable, lam: float, num_groups: int, positive_label: int,
                    augment: Callable | None = None) -> Callable:
    """Jitted step training ``state.extra['scores']``; ``state.params`` (the frozen weights) never change."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, x = step_inputs(state, batch, augment)
        scores = state.extra["scores"]

        def loss_fn(s):
            ste, hard = ste_masks(s, template, sparsity, distribution)
            logits, new_ms = masked_forward(fm, state.params, ste, state.model_state, x, train=True)
            ce = weighted_mean(cross_entropy(logits, batch["y"]), batch["w"])
            fair = fair_fn(logits, batch["y"], batch["g"], batch["w"], num_groups, positive_label)
            return ce + lam * fair, (ce, fair, logits, new_ms, hard)

        (loss, (ce, fair, logits, new_ms, hard)), grads = jax.value_and_grad(loss_fn, has_aux=True)(scores)
        updates, opt_state = tx.update(grads, state.opt_state, scores)
        scores = optax.apply_updates(scores, updates)
        nan_step = jnp.where((state.nan_step < 0) & ~jnp.isfinite(loss), state.step, state.nan_step)
        new_state = state.replace(masks=hard, opt_state=opt_state, model_state=new_ms, rng=rng,
                                  step=state.step + 1, nan_step=nan_step, extra={"scores": scores})
        acc = weighted_mean((jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32), batch["w"])
        return new_state, {"loss": loss, "ce": ce, "fair": fair, "accuracy": acc}

    return jax.jit(step, donate_argnums=0)


def split_surrogate(ctx: Context, state: TrainState, fair_fn: Callable, split: Split,
                    masks: Any = None) -> float:
    """The surrogate on a whole split (one gap over all rows, not an average of batch gaps)."""
    masks = state.masks if masks is None else masks
    fwd = jax.jit(lambda p, m, ms, x: masked_forward(ctx.fm, p, m, ms, x, train=False)[0])
    bs = min(ctx.config.eval_batch_size, len(split))
    logits, ws = [], []
    for batch in eval_batches(split, bs):
        logits.append(np.asarray(fwd(state.params, masks, state.model_state, batch["x"])))
        ws.append(batch["w"])
    n = len(split)
    logits_all = jnp.asarray(np.concatenate(logits)[:n])
    return float(fair_fn(logits_all, jnp.asarray(split.y), jnp.asarray(split.g), jnp.ones(n, jnp.float32),
                         ctx.dataset.num_groups, ctx.config.positive_label))


FS_OPTIONS = {"lam": 1.0, "surrogate": "dp_logistic", "epochs": None, "score_lr": 0.01,
              "init": "signed_constant"}


def _options(ctx: Context) -> dict:
    opts = method_options(METHODS["fair_scratch"], ctx.config.method_options)
    surrogates.surrogate(opts["surrogate"])  # clear error on a bad name
    if opts["init"] not in INITS:
        raise ValueError(f"fair_scratch: init must be one of {', '.join(INITS)}; got {opts['init']!r}")
    if float(opts["lam"]) < 0:
        raise ValueError(f"fair_scratch: lam must be >= 0; got {opts['lam']}")
    if not float(opts["score_lr"]) > 0:
        raise ValueError(f"fair_scratch: score_lr must be > 0; got {opts['score_lr']}")
    if opts["epochs"] is not None and int(opts["epochs"]) < 1:
        raise ValueError(f"fair_scratch: epochs must be >= 1; got {opts['epochs']}")
    return opts


def train_scores(ctx: Context, opts: dict) -> tuple[TrainState, dict, Callable]:
    """Train the scores on frozen weights; the returned state still holds the full frozen weights."""
    cfg = ctx.config
    epochs = cfg.ft_epochs if opts["epochs"] is None else int(opts["epochs"])
    params, model_state = initial_weights(ctx)
    dens = layer_densities(params, ctx.template, cfg.sparsity, cfg.distribution)
    weights = frozen_weights(params, ctx.template, opts["init"], dens)
    scores = init_scores(jax.random.key(cfg.seed + 11), weights, ctx.template)
    tx = make_optimizer(cfg.optimizer, float(opts["score_lr"]), cfg.weight_decay,
                        total_steps=max(epochs, 1) * ctx.steps_per_epoch)
    fair_fn = surrogates.surrogate(opts["surrogate"])
    masks0 = score_masks(scores, ctx.template, cfg.sparsity, cfg.distribution)
    state = create_state(weights, model_state, optax.identity(), seed=cfg.seed + 3, extra={"scores": scores})
    state = state.replace(masks=masks0, opt_state=tx.init(scores))
    step = make_score_step(ctx.fm, tx, ctx.template, sparsity=cfg.sparsity, distribution=cfg.distribution,
                           fair_fn=fair_fn, lam=float(opts["lam"]), num_groups=ctx.dataset.num_groups,
                           positive_label=cfg.positive_label, augment=ctx.augment)
    state, hist = fit(state, step, ctx.dataset.train, epochs=epochs, batch_size=cfg.batch_size,
                      seed=cfg.seed + 3000, desc="fair scratch scores", progress=cfg.progress)
    final = score_masks(state.extra["scores"], ctx.template, cfg.sparsity, cfg.distribution)
    return state.replace(masks=final), hist, fair_fn


def finalize(ctx: Context, state: TrainState, fair_fn: Callable, opts: dict, hist: dict | None = None
             ) -> tuple[TrainState, dict]:
    """The pruned state (frozen weights times the final mask) and the method's info."""
    train_sur = split_surrogate(ctx, state, fair_fn, ctx.dataset.train)
    pruned = state.replace(params=apply_masks(state.params, state.masks), extra=None)
    info = {"options": opts, "history": hist or {},
            **sparsity_report(ctx, pruned, pruned.masks, ctx.config.sparsity),
            "train_surrogate": train_sur if math.isfinite(train_sur) else None,
            "test": eval_summary(ctx, pruned, "test")}
    return pruned, info


@register("fair_scratch", "Fair Scratch Tickets (Tang et al. 2023): edge-popup scores on frozen random weights "
                          "with a fairness-surrogate regulariser", FS_OPTIONS)
def fair_scratch(ctx: Context, dense: TrainState) -> tuple[TrainState, dict]:
    del dense  # a scratch ticket never looks at trained weights
    opts = _options(ctx)
    state, hist, fair_fn = train_scores(ctx, opts)
    return finalize(ctx, state, fair_fn, opts, hist)


__all__ = ["FS_OPTIONS", "INITS", "fair_scratch", "finalize", "frozen_weights", "init_scores", "layer_densities",
           "make_score_step", "score_masks", "split_surrogate", "ste_masks", "train_scores"]
