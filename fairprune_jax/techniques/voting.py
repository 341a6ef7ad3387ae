"""Ballot's votes (Gao et al. 2024), as pure functions usable on their own: per-weight conflict scores from the
normalized accuracy and fairness gradients (:func:`conflict_scores`), one vote per epoch to the top-k weights
(:func:`epoch_votes`, :func:`tally`), the final mask from the votes with ties broken by summed score
(:func:`final_mask`), the voting step that trains on the accuracy gradient and accumulates both gradients and
per-class (or group) accuracies (:func:`make_vote_step`), and the authors' variant of each (signed scores,
truncated weights, a global signed top-k). ``methods/ballot.py`` runs them.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.metrics import fairness
from fairprune_jax.sparsity import masks as masks_lib
from fairprune_jax.sparsity.masks import _is_none
from fairprune_jax.training.train import (Carry, StepOutput, TrainState, carry_of, cross_entropy, make_step,
                                          weighted_mean)


FAIR_BY = ("class", "group")


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


def conflict_scores(g_acc: Any, g_fair: Any, template: Any, eta: float = 1.0, normalize: str = "column",
                    signed: bool = False) -> Any:
    """``|g_hat_acc + eta * g_hat_fair|`` per prunable weight (None elsewhere): conflicting weights score 0.

    ``signed=True`` keeps the sign of the sum, as the authors' code does (their ``simi``).
    """
    f = (lambda x: x) if signed else jnp.abs
    return jax.tree.map(lambda t, a, g: None if t is None else
                        f(normalize_columns(a, normalize) + eta * normalize_columns(g, normalize)),
                        template, g_acc, g_fair, is_leaf=_is_none)


def epoch_votes(scores: Any, template: Any, sparsity: float, distribution: str = "uniform") -> Any:
    """One vote (1.0) to each of the top-k weights by score, k from the sparsity and distribution."""
    return masks_lib.masks_from_scores(scores, template, sparsity, distribution)


def final_mask(votes: Any, score_sum: Any, template: Any, sparsity: float, distribution: str = "uniform") -> Any:
    """Keep the most-voted weights at exactly ``sparsity``; ties by summed score, then lower flat index."""
    leaves = [jnp.max(s) for s in jax.tree.leaves(score_sum)]
    top = jnp.max(jnp.stack(leaves)) if leaves else jnp.float32(0.0)
    scale = jnp.where(top > 0, 0.5 / top, 0.0)
    rank = jax.tree.map(lambda t, v, s: None if t is None else v + jnp.maximum(s, 0.0) * scale * (1.0 - 1e-6),
                        template, votes, score_sum, is_leaf=_is_none)
    return masks_lib.masks_from_scores(rank, template, sparsity, distribution)


def fairness_weights(key_acc: jax.Array, min_acc: float) -> jax.Array:
    """``1 / acc_k`` per class or group, with ``acc_k`` floored at ``min_acc``."""
    return 1.0 / jnp.maximum(key_acc, min_acc)


def _restrict(tree: Any, template: Any) -> Any:
    return jax.tree.map(lambda t, x: None if t is None else x, template, tree, is_leaf=_is_none)


def _zeros_like(tree: Any, template: Any) -> Any:
    return jax.tree.map(lambda t, x: None if t is None else jnp.zeros(x.shape, jnp.float32), template, tree,
                        is_leaf=_is_none)


class Votes(NamedTuple):
    """Ballot's per-epoch accumulators (``Carry.votes``): the summed accuracy and fairness gradients of the
    pruned layers, the rows and correct rows per key (class or group) this epoch, and each key's accuracy in
    the last epoch (what weights the fairness loss)."""

    g_acc: Any
    g_fair: Any
    n: jax.Array
    correct: jax.Array
    key_acc: jax.Array


def init_vote_extra(params: Any, template: Any, key_acc: jax.Array) -> Carry:
    """A :class:`Carry` with the voting step's zeroed accumulators (``votes``)."""
    k = key_acc.shape[0]
    return Carry(votes=Votes(_zeros_like(params, template), _zeros_like(params, template),
                             jnp.zeros((k,), jnp.float32), jnp.zeros((k,), jnp.float32),
                             jnp.asarray(key_acc, jnp.float32)))


def make_vote_step(fm, tx: optax.GradientTransformation, template: Any, *, num_keys: int, fair_by: str,
                   min_acc: float, augment: Callable | None = None, weights: str = "inverse") -> Callable:
    """Jitted step: update with the accuracy gradient, accumulate both gradients and per-key counts."""
    if fair_by not in FAIR_BY:
        raise ValueError(f"ballot: fair_by must be one of {FAIR_BY}; got {fair_by!r}")

    def objective(forward, state: TrainState, batch: dict) -> StepOutput:
        ex = carry_of(state).votes
        keys = batch["y"] if fair_by == "class" else batch["g"]
        key_w = (fairness_weights(ex.key_acc, min_acc) if weights == "inverse"
                 else 1.0 / (jnp.floor(ex.key_acc) + 1e-6))
        row_w = key_w[keys]

        def losses(params):
            logits, new_ms = forward(params)
            per = cross_entropy(logits, batch["y"])
            fair = (weighted_mean(per * row_w, batch["w"]) if weights == "inverse" else   # PyTorch's weighted mean
                    jnp.sum(per * row_w * batch["w"]) / jnp.maximum(jnp.sum(row_w * batch["w"]), 1e-30))
            return (jnp.stack([weighted_mean(per, batch["w"]), fair]),
                    (logits, new_ms))

        ls, vjp, (logits, new_ms) = jax.vjp(losses, state.params, has_aux=True)
        (g_acc,) = vjp(jnp.array([1.0, 0.0], ls.dtype))
        (g_fair,) = vjp(jnp.array([0.0, 1.0], ls.dtype))
        counts = fairness.group_counts(logits, batch["y"], keys, num_keys, weights=batch["w"])
        add = lambda acc, g: jax.tree.map(  # noqa: E731
            lambda t, a, b: None if t is None else a + b.astype(jnp.float32), template, acc, g, is_leaf=_is_none)
        extra = carry_of(state).replace(votes=Votes(add(ex.g_acc, g_acc), add(ex.g_fair, g_fair), ex.n + counts.n,
                                                    ex.correct + counts.correct, ex.key_acc))
        # the optimizer follows the accuracy gradient; the fairness gradient is only recorded
        return StepOutput(ls[0], logits, new_ms, grads=g_acc, extra=extra, stats={"fair_loss": ls[1]})

    return make_step(fm, tx, objective, augment=augment)


@jax.jit
def _close_epoch(votes: Votes) -> Votes:
    """Next epoch's per-key accuracy from this epoch's counts (keys unseen keep theirs); reset accumulators."""
    n, correct = votes.n, votes.correct
    key_acc = jnp.where(n > 0, correct / jnp.where(n > 0, n, 1.0), votes.key_acc)
    zero = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
    return Votes(zero(votes.g_acc), zero(votes.g_fair), jnp.zeros_like(n), jnp.zeros_like(correct), key_acc)


# ---------------------------------------------------------------------------
# The authors' voting run (variant="authors")
# ---------------------------------------------------------------------------


def truncated_weights(key_acc: jax.Array) -> jax.Array:
    """The authors' class weights ``1 / (trunc(acc_k) + 1e-6)``: ~1e6 for every key below 100%, ~1 at 100%.

    Their ``count_conflict`` casts the accuracies to an integer before adding
    1e-6 (``utils.py`` line 168 of Antimony5292/Ballot), so the intended
    ``1 / acc_k`` collapses: PyTorch's weighted mean then is (to 1e-6) plain
    cross-entropy over the rows of the imperfect classes.
    """
    return 1.0 / (jnp.floor(jnp.asarray(key_acc, jnp.float32)) + 1e-6)


def signed_scores(g_acc: Any, g_fair: Any, template: Any, eta: float, normalize: str) -> Any:
    """``g_hat_acc + eta * g_hat_fair`` with signs kept (the authors' ``simi``, ``ballot.py`` lines 236-238)."""
    return jax.tree.map(lambda t, a, f: None if t is None else
                        normalize_columns(a, normalize) + eta * normalize_columns(f, normalize),
                        template, g_acc, g_fair, is_leaf=_is_none)


def authors_keep(template: Any, params: Any, sparsity: float) -> int:
    """The authors' ``k = int((1 - s) * n)`` over the voted weights (truncated, not rounded)."""
    n = sum(int(np.prod(p.shape)) for t, p in zip(jax.tree.leaves(template, is_leaf=_is_none),
                                                   jax.tree.leaves(_restrict(params, template), is_leaf=_is_none))
            if t is not None and p is not None)
    return int((1.0 - sparsity) * n)


def _flat(tree: Any) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _unflat(vec: jax.Array, like: Any) -> Any:
    leaves, treedef = jax.tree.flatten(like)
    out, i = [], 0
    for x in leaves:
        out.append(vec[i:i + x.size].reshape(x.shape))
        i += x.size
    return jax.tree.unflatten(treedef, out)


def signed_topk_votes(score: Any, k: int) -> Any:
    """One vote to each of the ``k`` highest *signed* scores, none to a score of exactly 0 (their line 240)."""
    flat = _flat(score)
    v = masks_lib.topk_mask(flat, k) * (flat != 0)
    return _unflat(v, score)


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


def merge_masks(a: Any, b: Any) -> Any:
    """One mask tree from two with disjoint leaves (None where neither has one)."""
    return jax.tree.map(lambda x, y: x if y is None else y, a, b, is_leaf=_is_none)
