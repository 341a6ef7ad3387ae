"""The authors' voting run of Ballot (``variant="authors"``; Gao et al. 2024, the Antimony5292/Ballot code):
an "LTH" run from a global magnitude mask whose pruned weights restart at zero but stay trainable, with the
summed accuracy and class-weighted fairness gradients of every epoch turned into signed conflict scores
(:mod:`fairprune_jax.techniques.voting`). ``methods/ballot.py`` votes on them like on its own run's scores.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.data.base import train_batches
from fairprune_jax.metrics import fairness
from fairprune_jax.sparsity import masks as masks_lib
from fairprune_jax.sparsity import scores as scores_lib
from fairprune_jax.techniques.rewind import copy_tree, rewind_checkpoint
from fairprune_jax.techniques.voting import _restrict, signed_scores, truncated_weights
from fairprune_jax.training.train import (TrainState, check_finite, create_state, cross_entropy, evaluate, fit,
                                          make_optimizer, make_train_step, masked_forward, weighted_mean)

if TYPE_CHECKING:
    from fairprune_jax.methods.base import Context


def authors_vote_run(ctx: Context, dense: TrainState, opts: Any, template: Any, num_keys: int) -> dict:
    """The authors' "LTH" run with conflict counting (Antimony5292/Ballot ``ballot.py`` 173-226, ``utils.py`` 160-182).

    * Global L1 mask over every prunable weight of the *trained* model at
      ``vote_prune`` (0.95), survivors rewound to the initialisation, pruned
      weights set to 0 **but left trainable** (the mask is removed).
    * Trained for ``cfg.epochs`` with the dense optimizer on a random 90% of
      the train split; the other ``holdout`` (10%) measures the per-class
      accuracy.
    * After each epoch: the summed gradient over the 90% of plain
      cross-entropy on the *post*-epoch weights (eval mode) and of the
      class-weighted cross-entropy (``truncated_weights`` from the held-out
      accuracy of the post-epoch model; PyTorch's weighted mean per batch) on
      the *pre*-epoch weights, both restricted to ``template`` (the
      classifier).
    """
    cfg = ctx.settings
    fair_by, eta = opts.fair_by, opts.eta
    memo_key = ("ballot.authors_vote_run", fair_by, eta, opts.normalize, opts.vote_prune, opts.holdout, ctx.stream_seed("dense"),
                cfg.epochs, cfg.lr)
    hit = ctx.memo.get(memo_key)
    if hit is not None and hit["dense"] is dense:
        return hit
    lth_mask = masks_lib.masks_from_scores(scores_lib.magnitude(dense.params, ctx.template), ctx.template,
                                           opts.vote_prune, "global")
    init = rewind_checkpoint(ctx, 0, reference=dense.params)
    params = masks_lib.apply_masks(copy_tree(init.params), lth_mask)   # pruned weights restart at 0 ...
    train = ctx.dataset.train
    n = len(train)
    perm = ctx.stream_rng("ballot_holdout").permutation(n)
    n_hold = int(round(opts.holdout * n))
    sub, hold = train.take(np.sort(perm[n_hold:])), train.take(np.sort(perm[:n_hold]))
    spe = max(len(sub) // cfg.batch_size, 1)
    tx = make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, total_steps=cfg.epochs * spe)
    state = create_state(params, copy_tree(init.model_state), tx, seed=ctx.stream_seed("dense"))   # ... but trainable: no mask
    step_fn = make_train_step(ctx.fm, tx, augment=ctx.augment)

    def key_of(batch):
        return batch["y"] if fair_by == "class" else batch["g"]

    @jax.jit
    def grads(post, pre, ms_post, ms_pre, batch, w_key):
        def acc_loss(p):
            logits, _ = masked_forward(ctx.fm, p, None, ms_post, batch["x"], train=False)
            return weighted_mean(cross_entropy(logits, batch["y"]), batch["w"])

        def fair_loss(p):
            logits, _ = masked_forward(ctx.fm, p, None, ms_pre, batch["x"], train=True)
            rw = w_key[key_of(batch)] * batch["w"]
            return jnp.sum(cross_entropy(logits, batch["y"]) * rw) / jnp.maximum(jnp.sum(rw), 1e-30)

        return _restrict(jax.grad(acc_loss)(post), template), _restrict(jax.grad(fair_loss)(pre), template)

    epoch_scores, key_acc_hist = [], []
    for epoch in range(cfg.epochs):
        pre_params, pre_ms = copy_tree(state.params), copy_tree(state.model_state)
        state, _ = fit(state, step_fn, sub, epochs=1, batch_size=cfg.batch_size, seed=ctx.stream_seed("ballot_lth_batches", epoch),
                       desc=f"ballot (authors) LTH run {epoch + 1}/{cfg.epochs}", progress=False)
        gc, cc = evaluate(ctx.eval_step, state, hold, cfg.eval_batch_size)
        key_acc = np.nan_to_num(fairness.group_accuracy(cc if fair_by == "class" else gc), nan=1.0)
        key_acc_hist.append(key_acc.tolist())
        w_key = truncated_weights(jnp.asarray(key_acc))
        g_acc = g_fair = None
        for b in train_batches(sub, cfg.batch_size, seed=ctx.stream_seed("ballot_lth_grads"), epoch=epoch):
            b = {**b, "w": b.get("w", np.ones(len(b["y"]), np.float32))}
            a, f = grads(state.params, pre_params, state.model_state, pre_ms, b, w_key)
            g_acc = a if g_acc is None else jax.tree.map(jnp.add, g_acc, a)
            g_fair = f if g_fair is None else jax.tree.map(jnp.add, g_fair, f)
        epoch_scores.append(signed_scores(g_acc, g_fair, template, eta, opts.normalize))
    check_finite(state, "ballot's authors-style LTH run")
    run = {"epoch_scores": epoch_scores, "vote_epochs": cfg.epochs, "key_acc_hist": key_acc_hist,
           "replay_diff": None, "history": {}, "captured": {}, "dense": dense,
           "holdout_rows": int(n_hold), "vote_prune": opts.vote_prune}
    ctx.memo[memo_key] = run
    return run
