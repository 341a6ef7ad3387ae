"""Ballot (Gao et al., "Efficient DNN-Powered Software with Fair Sparse Models", 2024).

A lottery ticket whose mask comes from votes instead of magnitudes:

1. **Voting run.** Over the epochs of a training run, every step computes per
   weight the gradient of the accuracy loss (plain cross-entropy) and of a
   fairness loss: the cross-entropy of each row weighted by ``1 / acc_k`` of its
   class (``fair_by="class"``) or protected group (``fair_by="group"``). This is
   the intended weighting; the public code truncates the weight to an integer,
   which makes it 1 for every class above 50% accuracy. ``acc_k`` is the accuracy of class
   or group ``k`` over the *previous* epoch, counted inside the jitted step
   with ``segment_sum`` (``fairness.group_counts`` on the step's predictions);
   for the first epoch it is the starting model's accuracy on the train split.
   It is floored at ``min_acc`` so an empty or hopeless class cannot blow up
   the loss. The optimizer step itself uses the accuracy gradient only, so with
   ``vote_from="init"`` the voting run is a replay of the dense training run
   (same initialisation, optimizer, seed and batch order) with votes recorded.
   ``vote_from="dense"`` instead continues from the trained dense weights for
   ``vote_epochs`` (default ``ft_epochs``) at the fine-tuning learning rate.
2. **Per-epoch score and vote.** The gradients summed over the epoch are
   normalised per *input column* (``normalize="column"``): every column of a
   Flax kernel, i.e. the weights feeding one output unit from all its inputs
   (``kernel[..., j]``: all ``in`` features of a Linear ``(in, out)`` kernel, all
   ``(kh, kw, in)`` taps of a conv ``(kh, kw, in, out)`` kernel; one row of
   PyTorch's ``(out, in, ...)`` weight), is divided by its L2 norm:
   ``g_hat[..., j] = g[..., j] / ||g[..., j]||_2`` (an all-zero column stays 0).
   Every output unit (and every class of the last layer) thus gets the same
   total say in the vote. The alternatives ``"row"`` (the weights leaving one
   input unit, normalised over the outputs), ``"layer"`` (whole tensor) and
   ``"none"`` are available; on digits (MLP, 10 epochs, 80% sparsity, seed 0)
   they let some classes lose almost all their last-layer weights (worst-class
   test accuracy 0-9% vs 77% with ``"column"``). The conflict score is ``|g_hat_acc + eta * g_hat_fair|``:
   where the two objectives agree the normalised gradients add up, where they
   conflict (``g_hat_acc = -eta * g_hat_fair``) they cancel to 0 and the weight
   loses.
   Each epoch, the top-k weights by score get one vote, k from the target
   sparsity and ``ctx.config.distribution`` (``masks.masks_from_scores``).
3. **Final mask.** The most-voted weights are kept, at exactly the target
   sparsity. Ties in the vote count are broken by the score summed over all
   epochs (scaled into [0, 0.5) so it never outranks a whole vote), then by the
   lower flat index (``masks.topk_mask``): the same votes always give the same
   mask.
4. **Refinement.** Survivors are rewound to the initialisation or to step
   ``rewind_step`` of the dense run (``methods.lth.rewind_checkpoint``; with
   ``vote_from="init"`` and the full ``vote_epochs`` the step-k weights are
   captured during the voting replay at no extra cost) and retrained for
   ``retrain_epochs`` (default ``ft_epochs``) with a learning-rate schedule:
   linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to
   0 (``warmup_fraction=0`` gives the plain cosine schedule).

All prunable layers vote by default; ``final_layer_only=True`` prunes only the
last layer (as the public code does), at the target sparsity.

With ``ctx.config.out`` set, ``out/ballot/votes.npz`` holds the final mask,
the votes (``votes/<leaf>``) and the summed scores (``score_sum/<leaf>``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax import fairness
from fairprune_jax import masks as masks_lib
from fairprune_jax.masks import _is_none
from fairprune_jax.methods.base import METHODS, Context, make_optimizer, method_options, register
from fairprune_jax.methods.lth import (Checkpoint, check_rewind_step, copy_tree, dense_tx, eval_summary,
                                       initial_weights, rewind, rewind_checkpoint, save_masks, sparsity_report)
from fairprune_jax.train import (TrainState, step_inputs, apply_gradients, create_state, cross_entropy, evaluate, fit,
                                 masked_forward, weighted_mean)

FAIR_BY = ("class", "group")
VOTE_FROM = ("init", "dense")


# ---------------------------------------------------------------------------
# Scores and votes (pure functions, usable on their own)
# ---------------------------------------------------------------------------


NORMALIZATIONS = ("column", "row", "layer", "none")


def normalize_columns(g: jax.Array, how: str = "column") -> jax.Array:
    """Gradients divided by the L2 norm of each kernel column (``how``: see module doc); zeros stay 0."""
    g = jnp.asarray(g, jnp.float32)
    if how == "none":
        return g
    if how == "column":
        axes = tuple(range(g.ndim - 1))   # all inputs (and taps) of one output unit
    elif how == "row":
        axes = (g.ndim - 1,)              # all outputs of one input unit / tap
    elif how == "layer":
        axes = tuple(range(g.ndim))
    else:
        raise ValueError(f"ballot: normalize must be one of {', '.join(NORMALIZATIONS)}; got {how!r}")
    norm = jnp.sqrt(jnp.sum(g * g, axis=axes, keepdims=True))
    return g / jnp.where(norm > 0, norm, 1.0)


def conflict_scores(g_acc: Any, g_fair: Any, template: Any, eta: float = 1.0, normalize: str = "column") -> Any:
    """``|g_hat_acc + eta * g_hat_fair|`` per prunable weight (None elsewhere): conflicting weights score 0."""
    return jax.tree.map(lambda t, a, f: None if t is None else
                        jnp.abs(normalize_columns(a, normalize) + eta * normalize_columns(f, normalize)),
                        template, g_acc, g_fair, is_leaf=_is_none)


def epoch_votes(scores: Any, template: Any, sparsity: float, distribution: str = "uniform") -> Any:
    """One vote (1.0) to each of the top-k weights by score, k from the sparsity and distribution."""
    return masks_lib.masks_from_scores(scores, template, sparsity, distribution)


def final_mask(votes: Any, score_sum: Any, template: Any, sparsity: float, distribution: str = "uniform") -> Any:
    """Keep the most-voted weights at exactly ``sparsity``; ties by summed score, then lower flat index."""
    leaves = [jnp.max(s) for s in jax.tree.leaves(score_sum)]
    top = jnp.max(jnp.stack(leaves)) if leaves else jnp.float32(0.0)
    scale = jnp.where(top > 0, 0.5 / top, 0.0)
    rank = jax.tree.map(lambda t, v, s: None if t is None else v + s * scale * (1.0 - 1e-6),
                        template, votes, score_sum, is_leaf=_is_none)
    return masks_lib.masks_from_scores(rank, template, sparsity, distribution)


def fairness_weights(key_acc: jax.Array, min_acc: float) -> jax.Array:
    """``1 / acc_k`` per class or group, with ``acc_k`` floored at ``min_acc``."""
    return 1.0 / jnp.maximum(key_acc, min_acc)


def final_layer_template(ctx: Context) -> Any:
    """The prunable template restricted to the last prunable layer in forward order."""
    names = {n for n, _ in masks_lib.named_leaves(ctx.template)}
    order = [n for n in ctx.layer_order if n in names]
    if not order:
        raise ValueError("ballot: final_layer_only needs a prunable final layer, but no layer is prunable "
                         "(is --exclude-last set?)")
    last = order[-1]
    return masks_lib.map_named(lambda n, t: True if n == last else None, ctx.template)


# ---------------------------------------------------------------------------
# The voting step
# ---------------------------------------------------------------------------


def _restrict(tree: Any, template: Any) -> Any:
    return jax.tree.map(lambda t, x: None if t is None else x, template, tree, is_leaf=_is_none)


def _zeros_like(tree: Any, template: Any) -> Any:
    return jax.tree.map(lambda t, x: None if t is None else jnp.zeros(x.shape, jnp.float32), template, tree,
                        is_leaf=_is_none)


def init_vote_extra(params: Any, template: Any, key_acc: jax.Array) -> dict:
    """Per-epoch accumulators carried in ``TrainState.extra`` by the voting step."""
    k = key_acc.shape[0]
    return {"g_acc": _zeros_like(params, template), "g_fair": _zeros_like(params, template),
            "n": jnp.zeros((k,), jnp.float32), "correct": jnp.zeros((k,), jnp.float32),
            "key_acc": jnp.asarray(key_acc, jnp.float32)}


def make_vote_step(fm, tx: optax.GradientTransformation, template: Any, *, num_keys: int, fair_by: str,
                   min_acc: float, augment: Callable | None = None) -> Callable:
    """Jitted step: update with the accuracy gradient, accumulate both gradients and per-key counts."""
    if fair_by not in FAIR_BY:
        raise ValueError(f"ballot: fair_by must be one of {FAIR_BY}; got {fair_by!r}")

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        ex = state.extra
        rng, x = step_inputs(state, batch, augment)
        keys = batch["y"] if fair_by == "class" else batch["g"]
        row_w = fairness_weights(ex["key_acc"], min_acc)[keys]

        def losses(params):
            logits, new_ms = masked_forward(fm, params, state.masks, state.model_state, x, train=True)
            per = cross_entropy(logits, batch["y"])
            return (jnp.stack([weighted_mean(per, batch["w"]), weighted_mean(per * row_w, batch["w"])]),
                    (logits, new_ms))

        ls, vjp, (logits, new_ms) = jax.vjp(losses, state.params, has_aux=True)
        (g_acc,) = vjp(jnp.array([1.0, 0.0], ls.dtype))
        (g_fair,) = vjp(jnp.array([0.0, 1.0], ls.dtype))
        counts = fairness.group_counts(logits, batch["y"], keys, num_keys, weights=batch["w"])
        add = lambda acc, g: jax.tree.map(  # noqa: E731
            lambda t, a, b: None if t is None else a + b.astype(jnp.float32), template, acc, g, is_leaf=_is_none)
        extra = {"g_acc": add(ex["g_acc"], g_acc), "g_fair": add(ex["g_fair"], g_fair),
                 "n": ex["n"] + counts.n, "correct": ex["correct"] + counts.correct, "key_acc": ex["key_acc"]}
        new_state = apply_gradients(state, g_acc, tx, model_state=new_ms, loss=ls[0], rng=rng, extra=extra)
        acc = weighted_mean((jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32), batch["w"])
        return new_state, {"loss": ls[0], "fair_loss": ls[1], "accuracy": acc}

    return jax.jit(step, donate_argnums=0)


@jax.jit
def _close_epoch(extra: dict) -> dict:
    """Next epoch's per-key accuracy from this epoch's counts (keys unseen keep theirs); reset accumulators."""
    n, correct = extra["n"], extra["correct"]
    key_acc = jnp.where(n > 0, correct / jnp.where(n > 0, n, 1.0), extra["key_acc"])
    zero = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
    return {"g_acc": zero(extra["g_acc"]), "g_fair": zero(extra["g_fair"]), "n": jnp.zeros_like(n),
            "correct": jnp.zeros_like(correct), "key_acc": key_acc}


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------


def retrain_tx(ctx: Context, epochs: int, warmup_fraction: float) -> optax.GradientTransformation:
    """Fine-tuning optimizer with linear warm-up over ``warmup_fraction`` of the steps, then cosine decay."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"ballot: warmup_fraction must be in [0, 1); got {warmup_fraction}")
    total = max(epochs * ctx.steps_per_epoch, 1)
    warmup = int(round(warmup_fraction * total))
    if warmup == 0:
        return ctx.finetune_tx(epochs=epochs)
    cfg = ctx.config
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.ft_lr, warmup, max(total, warmup + 1))
    return make_optimizer(cfg.optimizer, schedule, cfg.weight_decay)  # a schedule in place of the lr


BALLOT_OPTIONS = {"eta": 1.0, "fair_by": "class", "normalize": "column", "final_layer_only": False,
                  "rewind_step": 0, "vote_from": "init", "vote_epochs": None, "retrain_epochs": None,
                  "warmup_fraction": 0.1, "min_acc": 0.01}


def _options(ctx: Context) -> dict:
    opts = method_options(METHODS["ballot"], ctx.config.method_options)
    if opts["fair_by"] not in FAIR_BY:
        raise ValueError(f"ballot: fair_by must be one of {', '.join(FAIR_BY)}; got {opts['fair_by']!r}")
    if opts["normalize"] not in NORMALIZATIONS:
        raise ValueError(f"ballot: normalize must be one of {', '.join(NORMALIZATIONS)}; "
                         f"got {opts['normalize']!r}")
    if opts["vote_from"] not in VOTE_FROM:
        raise ValueError(f"ballot: vote_from must be one of {', '.join(VOTE_FROM)}; got {opts['vote_from']!r}")
    if not 0.0 < float(opts["min_acc"]) <= 1.0:
        raise ValueError(f"ballot: min_acc must be in (0, 1]; got {opts['min_acc']}")
    for name in ("vote_epochs", "retrain_epochs"):
        if opts[name] is not None and int(opts[name]) < (1 if name == "vote_epochs" else 0):
            raise ValueError(f"ballot: {name} must be >= {1 if name == 'vote_epochs' else 0}; got {opts[name]}")
    return opts


MEMO_BUDGET_BYTES = 512 * 2**20   # per-epoch scores kept for reuse across sparsities up to this size


def voting_run(ctx: Context, dense: TrainState, opts: dict, template: Any, num_keys: int, k: int) -> dict:
    """The voting run: per-epoch conflict scores (no votes yet), per-key accuracies, step-k weights.

    Nothing here depends on the target sparsity (the run trains the dense
    network and only *records* gradients), so one run serves every sparsity:
    the result is kept in ``ctx.memo`` (when its scores fit in
    ``MEMO_BUDGET_BYTES``) and ``fairprune compare`` runs it once per seed.
    """
    cfg = ctx.config
    eta, fair_by, min_acc = float(opts["eta"]), opts["fair_by"], float(opts["min_acc"])
    memo_key = ("ballot.voting_run", eta, fair_by, opts["normalize"], bool(opts["final_layer_only"]), k,
                opts["vote_from"], opts["vote_epochs"], min_acc, cfg.seed, cfg.ft_epochs, cfg.ft_lr)
    hit = ctx.memo.get(memo_key)
    if hit is not None and hit["dense"] is dense:   # the same dense run (vote_from="dense" starts from it)
        return hit
    if opts["vote_from"] == "init":
        vote_epochs = cfg.epochs if opts["vote_epochs"] is None else int(opts["vote_epochs"])
        params, model_state = initial_weights(ctx)
        tx = dense_tx(ctx) if vote_epochs == cfg.epochs else make_optimizer(
            cfg.optimizer, cfg.lr, cfg.weight_decay, total_steps=vote_epochs * ctx.steps_per_epoch)
        seed, state_seed = cfg.seed, cfg.seed
        replay = vote_epochs == cfg.epochs  # same optimizer, seed and batch order as the dense run
    else:
        vote_epochs = cfg.ft_epochs if opts["vote_epochs"] is None else int(opts["vote_epochs"])
        params, model_state = copy_tree(dense.params), copy_tree(dense.model_state)
        tx = ctx.finetune_tx(epochs=vote_epochs)
        seed, state_seed, replay = cfg.seed + 2000, cfg.seed + 2, False
    if vote_epochs < 1:
        raise ValueError(f"ballot: vote_epochs must be >= 1; got {vote_epochs}")
    start = create_state(params, model_state, tx, seed=state_seed)
    gc, cc = evaluate(ctx.eval_step, start, ctx.dataset.train, cfg.eval_batch_size)
    start_counts = cc if fair_by == "class" else gc
    key_acc0 = np.nan_to_num(fairness.group_accuracy(start_counts), nan=1.0)
    start = start.replace(extra=init_vote_extra(params, template, jnp.asarray(key_acc0)))
    step_fn = make_vote_step(ctx.fm, tx, template, num_keys=num_keys, fair_by=fair_by, min_acc=min_acc,
                             augment=ctx.augment)

    spe = ctx.steps_per_epoch
    epoch_scores: list[Any] = []
    key_acc_hist: list[list[float]] = [key_acc0.tolist()]
    captured: dict[str, Checkpoint] = {}

    def close_epoch(state: TrainState) -> TrainState:
        ex = state.extra
        epoch_scores.append(conflict_scores(ex["g_acc"], ex["g_fair"], template, eta, opts["normalize"]))
        new_extra = _close_epoch(ex)
        key_acc_hist.append(np.asarray(new_extra["key_acc"]).tolist())
        return state.replace(extra=new_extra)

    def hook(state: TrainState, step: int) -> TrainState:
        if replay and k > 0 and step == k:
            captured["ckpt"] = Checkpoint(k, copy_tree(state.params), copy_tree(state.model_state))
        if step > 0 and step % spe == 0:
            state = close_epoch(state)
        return state

    state, vote_hist = fit(start, step_fn, ctx.dataset.train, epochs=vote_epochs, batch_size=cfg.batch_size,
                           seed=seed, desc="ballot votes", hook=hook, progress=cfg.progress)
    if replay and k == vote_epochs * spe and k > 0:
        captured["ckpt"] = Checkpoint(k, copy_tree(state.params), copy_tree(state.model_state))
    state = close_epoch(state)
    replay_diff = None
    if replay:
        replay_diff = float(max(jnp.max(jnp.abs(a - b)) for a, b in
                                zip(jax.tree.leaves(state.params), jax.tree.leaves(dense.params))))
    run = {"epoch_scores": epoch_scores, "vote_epochs": vote_epochs, "key_acc_hist": key_acc_hist,
           "replay_diff": replay_diff, "history": vote_hist, "captured": captured, "dense": dense}
    size = sum(int(np.size(x)) * 4 for e in epoch_scores for x in jax.tree.leaves(e))
    if size <= MEMO_BUDGET_BYTES:
        ctx.memo[memo_key] = run
    return run


def tally(epoch_scores: list[Any], template: Any, sparsity: float, distribution: str = "uniform"
          ) -> tuple[Any, Any, list[np.ndarray]]:
    """Votes (one per epoch to each top-k weight), summed scores and the per-epoch top-k as flat booleans."""
    votes = score_sum = None
    epoch_masks = []
    for s in epoch_scores:
        v = epoch_votes(s, template, sparsity, distribution)
        votes = v if votes is None else jax.tree.map(jnp.add, votes, v)
        score_sum = s if score_sum is None else jax.tree.map(jnp.add, score_sum, s)
        epoch_masks.append(np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(v)]) > 0)
    return votes, score_sum, epoch_masks


@register("ballot", "Ballot (Gao et al. 2024): mask from per-epoch votes of accuracy+fairness gradient "
                    "conflict scores, then rewind and retrain", BALLOT_OPTIONS)
def ballot(ctx: Context, dense: TrainState) -> tuple[TrainState, dict]:
    cfg = ctx.config
    opts = _options(ctx)
    fair_by = opts["fair_by"]
    k = check_rewind_step(ctx, opts["rewind_step"])
    template = final_layer_template(ctx) if opts["final_layer_only"] else ctx.template
    num_keys = ctx.dataset.num_classes if fair_by == "class" else ctx.dataset.num_groups
    masks_lib.keep_counts(dense.params, template, cfg.sparsity, cfg.distribution)  # fail fast on bad input

    run = voting_run(ctx, dense, opts, template, num_keys, k)
    votes, score_sum, epoch_masks = tally(run["epoch_scores"], template, cfg.sparsity, cfg.distribution)
    vote_epochs, key_acc_hist, replay_diff = run["vote_epochs"], run["key_acc_hist"], run["replay_diff"]
    vote_hist, captured = run["history"], run["captured"]

    masks = final_mask(votes, score_sum, template, cfg.sparsity, cfg.distribution)

    # --- refinement: rewind and retrain ----------------------------------------------
    ckpt = captured.get("ckpt") or rewind_checkpoint(ctx, k, reference=dense.params)
    retrain_epochs = cfg.ft_epochs if opts["retrain_epochs"] is None else int(opts["retrain_epochs"])
    rtx = retrain_tx(ctx, retrain_epochs, float(opts["warmup_fraction"]))
    pruned = rewind(ctx, ckpt, masks, rtx)
    pruned, retrain_hist = ctx.finetune(pruned, rtx, epochs=retrain_epochs, desc="ballot retrain")

    info = _info(ctx, opts, pruned, masks, votes, score_sum, epoch_masks, key_acc_hist, vote_epochs,
                 retrain_epochs, replay_diff, k)
    info["history"] = {"vote": vote_hist, "retrain": retrain_hist}
    if cfg.out:
        info["votes_file"] = str(save_masks(Path(cfg.out) / "ballot" / "votes.npz", masks,
                                            {k2: v for k2, v in info.items() if k2 != "history"},
                                            votes=votes, score_sum=score_sum))
    return pruned, info


def _info(ctx, opts, pruned, masks, votes, score_sum, epoch_masks, key_acc_hist, vote_epochs, retrain_epochs,
          replay_diff, k) -> dict:
    """Vote statistics: how stable the per-epoch top-k was and how decisive the final vote."""
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)])  # noqa: E731
    m, v = flat(masks), flat(votes)
    agreement = [float((e == (m > 0)).mean()) for e in epoch_masks]
    return {
        "options": {**opts, "vote_epochs": vote_epochs, "retrain_epochs": retrain_epochs, "rewind_step": k},
        **sparsity_report(ctx, pruned, masks, ctx.config.sparsity),
        "votes": {"epochs": len(epoch_masks),
                  "kept_min_votes": float(v[m > 0].min()) if (m > 0).any() else None,
                  "pruned_max_votes": float(v[m == 0].max()) if (m == 0).any() else None,
                  "histogram": np.bincount(v.astype(np.int64), minlength=len(epoch_masks) + 1).tolist()},
        "epoch_mask_agreement_with_final": agreement,
        "fairness_key_accuracy": key_acc_hist,
        "replay_max_abs_diff_to_dense": replay_diff,
        "test": eval_summary(ctx, pruned, "test"),
    }


__all__ = ["BALLOT_OPTIONS", "NORMALIZATIONS", "ballot", "conflict_scores", "epoch_votes", "fairness_weights",
           "final_layer_template", "final_mask", "init_vote_extra", "make_vote_step", "normalize_columns",
           "retrain_tx", "tally", "voting_run"]
