"""Per-group weight importance, and a selection that keeps the groups' shares of it (FairGRAPE's machinery).

Importance
----------
For group g and a batch b, let L_{g,b} be the mean cross-entropy over the batch's rows of group g. The
importance of weight w for group g is accumulated over batches as

    I_g(w) = sum_b (w * dL_{g,b}/dw)^2        (``kind="squared"``; ``"abs"``: sum_b |w * dL_{g,b}/dw|)

with w the masked weight (a pruned weight has importance 0). The G gradients of a batch come from **one**
forward pass and a vmapped backward pass: ``jax.vjp`` of the per-example losses, pulled back along G
cotangents (row i of cotangent g is 1/n_{g,b} when row i is in group g, else 0). The backward passes run
``group_chunk`` groups at a time (``jax.lax.map`` with ``batch_size``), so memory holds ``group_chunk``
gradients plus the (G, ...) accumulator; there is no Python loop over groups.

Cost, stated plainly: one importance sweep over R rows is one forward pass and **G backward passes** over
those rows (a backward pass costs about two forward passes), plus the (G x prunable weights) accumulator.
It grows linearly with the number of groups; per-example gradients would cost the same passes and R x more
memory. There is no cheaper exact way: the G gradients are G different vectors.

Selection
---------
:func:`proportional_select` keeps exactly k of the live entries of one layer (or of the whole model) so that
the kept entries' total importance per group stays in the proportions of the live entries' totals, the
target t_g = sum_live I_g / sum_g' sum_live I_g'. It is a greedy: the group whose share of the kept
importance is furthest below its target takes its next most important entries not yet kept; every kept
entry adds its whole importance vector (all groups) to the kept totals. ``picks`` entries are taken per
decision; ``max_decisions`` bounds the number of sequential decisions (the picks per decision are raised to
``ceil(k / max_decisions)`` when needed), which bounds how far a share can stray from its target by the
importance of one decision's picks. A decision is one top-k over the layer's entries (no full sort of the G
rankings), so a selection costs O(decisions x n + G x n) for a layer of n weights.
"""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.data.base import Split
from fairprune_jax.sparsity.masks import _is_none, keep_counts, map_named, named_leaves
from fairprune_jax.models import FunctionalModel
from fairprune_jax.training.evaluation import sum_over_split
from fairprune_jax.training.train import cross_entropy, masked_forward

IMPORTANCE_KINDS = ("squared", "abs")
#: Ranking keys within a group (the authors' ``delta_p`` 0 / 1 / 2): the group's importance, its share of the
#: entry's importance over all groups, or the product of the two.
RANKS = ("importance", "share", "importance_x_share")


def group_cotangents(g: jax.Array, w: jax.Array, num_groups: int) -> jax.Array:
    """(G, B) weights that turn per-example losses into each group's mean loss on the batch (0 for absent groups)."""
    onehot = (g[None, :] == jnp.arange(num_groups)[:, None]).astype(jnp.float32) * w[None, :].astype(jnp.float32)
    n = jnp.sum(onehot, axis=1, keepdims=True)
    return onehot / jnp.maximum(n, 1.0)


def make_importance_step(fm: FunctionalModel, template: Any, num_groups: int, *, kind: str = "squared",
                         group_chunk: int = 64, train: bool = True) -> Callable:
    """Jitted ``(acc, params, masks, model_state, batch) -> acc + this batch's per-group importance``.

    ``acc`` mirrors ``template`` with (G, *kernel shape) leaves (``None`` where not prunable); start it
    with :func:`importance_zeros`. ``train``: BatchNorm in training mode (batch statistics), as the
    authors measure it; the updated statistics are discarded.
    """
    if kind not in IMPORTANCE_KINDS:
        raise ValueError(f"unknown importance kind {kind!r}; valid: {', '.join(IMPORTANCE_KINDS)}")
    chunk = max(1, min(int(group_chunk), num_groups))

    def step(acc, params, masks, model_state, batch):
        def per_example(p):
            logits, _ = masked_forward(fm, p, masks, model_state, batch["x"], train=train)
            return cross_entropy(logits, batch["y"])

        _, pullback = jax.vjp(per_example, params)
        effective = params if masks is None else jax.tree.map(
            lambda m, p: p if m is None else p * m.astype(p.dtype), masks, params, is_leaf=_is_none)

        def one_group(cot):
            (grad,) = pullback(cot)
            return jax.tree.map(lambda t, p, gr: None if t is None else
                                (jnp.square(p * gr) if kind == "squared" else jnp.abs(p * gr)),
                                template, effective, grad, is_leaf=_is_none)

        cots = group_cotangents(batch["g"], batch["w"], num_groups)
        batch_imp = jax.lax.map(one_group, cots, batch_size=chunk)
        return jax.tree.map(lambda a, b: None if a is None else a + b, acc, batch_imp, is_leaf=_is_none)

    return jax.jit(step, donate_argnums=0)


def importance_zeros(params: Any, template: Any, num_groups: int) -> Any:
    """The (G, *shape) zero accumulator for :func:`make_importance_step`."""
    return jax.tree.map(lambda t, p: None if t is None else jnp.zeros((num_groups,) + p.shape, jnp.float32),
                        template, params, is_leaf=_is_none)


def group_importance(step: Callable, params: Any, masks: Any, model_state: Any, template: Any, split: Split,
                     num_groups: int, batch_size: int) -> Any:
    """Per-group importance of every prunable weight over ``split`` (one forward + G backward passes).

    The last batch is padded with the split's first rows (``w = 0``: they weigh in no group), not with zero
    rows: the step may run BatchNorm in training mode, where every row of the batch enters the statistics."""
    return sum_over_split(step, (params, masks, model_state), split, batch_size,
                          init=importance_zeros(params, template, num_groups), host=False, pad="wrap")


def shares(imp: jax.Array, live: jax.Array) -> jax.Array:
    """Each group's share of the total importance of the live entries of ``imp`` (G, n); uniform if all 0."""
    tot = jnp.sum(jnp.where(live[None, :], imp, 0.0), axis=1)
    s = jnp.sum(tot)
    return jnp.where(s > 0, tot / jnp.where(s > 0, s, 1.0), 1.0 / imp.shape[0])


def _rank_key(imp: jax.Array, rank: str) -> jax.Array:
    if rank == "importance":
        return imp
    total = jnp.sum(imp, axis=0, keepdims=True)
    share = imp / jnp.where(total > 0, total, 1.0)
    return share if rank == "share" else imp * share


@partial(jax.jit, static_argnames=("width", "rank"))
def _select(imp: jax.Array, live: jax.Array, k: jax.Array, per: jax.Array, width: int, rank: str
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    G, n = imp.shape
    imp = jnp.where(live[None, :], imp, 0.0)
    target = shares(imp, live)
    key = _rank_key(imp, rank)
    eligible = target > 0          # a group with no importance here never takes the lead
    imp_t = imp.T                  # (n, G): a kept entry's importance vector is one contiguous row
    k = jnp.minimum(k, jnp.sum(live))

    def cond(c):
        return (c[2] < k) & c[3]

    def body(c):
        kept, sums, count, _ = c
        total = jnp.sum(sums)
        prop = jnp.where(total > 0, sums / jnp.where(total > 0, total, 1.0), 1.0 / G)
        g = jnp.argmin(jnp.where(eligible, prop - target, jnp.inf))
        # the group's most important entries not kept yet (lax.top_k: ties to the lower index)
        vals, idx = jax.lax.top_k(jnp.where(live & ~kept, key[g], -jnp.inf), width)
        take = (jnp.arange(width) < jnp.minimum(per, k - count)) & (vals > -jnp.inf)
        m = jnp.sum(take.astype(jnp.int32))
        kept = kept.at[idx].set(kept[idx] | take)
        sums = sums + take.astype(imp.dtype) @ imp_t[idx]
        return kept, sums, count + m, m > 0

    init = (jnp.zeros((n,), bool), jnp.zeros((G,), imp.dtype), jnp.zeros((), jnp.int32), jnp.ones((), bool))
    kept, sums, _, _ = jax.lax.while_loop(cond, body, init)
    tot = jnp.sum(sums)
    return kept, target, sums / jnp.where(tot > 0, tot, 1.0)


def picks_per_decision(k: int, picks: int, max_decisions: int) -> int:
    """Entries taken per decision: ``picks``, raised so that k entries need at most ``max_decisions`` (0: no cap)."""
    per = max(int(picks), 1)
    if max_decisions > 0:
        per = max(per, math.ceil(int(k) / int(max_decisions)))
    return per


def proportional_select(imp: jax.Array, live: jax.Array | None, k: int, *, picks: int = 2, max_decisions: int = 0,
                        rank: str = "importance") -> tuple[jax.Array, np.ndarray, np.ndarray]:
    """Keep exactly ``k`` live entries of ``imp`` (G, n) so each group keeps its share of the total importance.

    Returns (0/1 float mask of shape (n,), target shares (G,), kept shares (G,)). ``live`` (n,) bool: the
    entries still in the model (``None``: all); only they can be kept, and ``k`` is capped at their number.
    """
    if rank not in RANKS:
        raise ValueError(f"unknown rank {rank!r}; valid: {', '.join(RANKS)}")
    imp = jnp.asarray(imp, jnp.float32)
    n = imp.shape[1]
    live = jnp.ones((n,), bool) if live is None else jnp.asarray(live).astype(bool).reshape(-1)
    per = picks_per_decision(k, picks, max_decisions)
    # top-k width: enough for the largest keep count this layer can have, so one compilation serves every
    # iteration of a schedule (the picks per decision are traced)
    most = picks_per_decision(n if max_decisions > 0 else 1, picks, max_decisions)
    width = min(1 << int(math.ceil(math.log2(max(per, most)))), n)
    kept, target, got = _select(imp, live, jnp.asarray(int(k), jnp.int32), jnp.asarray(per, jnp.int32), width,
                                rank)
    return kept.astype(jnp.float32), np.asarray(target), np.asarray(got)


def proportional_masks(importance: Any, prev_masks: Any, template: Any, params: Any, sparsity: float,
                       distribution: str = "uniform", *, picks: int = 2, max_decisions: int = 0,
                       rank: str = "importance") -> tuple[Any, dict]:
    """Masks at exact ``sparsity`` from per-group importance (leaves (G, *shape)), keeping group shares.

    ``uniform`` / ``erk``: one selection per layer with the layer's own target shares and its exact keep
    count (:func:`masks.keep_counts`); ``global``: one selection over all prunable weights with the model's
    shares. Weights pruned in ``prev_masks`` are never revived. Returns the masks and, per layer (or
    ``'*'``), the target and kept shares.
    """
    counts = keep_counts(params, template, sparsity, distribution)
    imps = dict(named_leaves(importance))
    prev = dict(named_leaves(prev_masks)) if prev_masks is not None else {}
    names = [n for n, _ in named_leaves(template)]
    t0 = time.perf_counter()

    def flat(name):
        a = imps[name]
        live = prev[name].reshape(-1) > 0 if name in prev else None
        return a.reshape(a.shape[0], -1), live

    report: dict[str, dict] = {}
    out: dict[str, jax.Array] = {}
    if distribution == "global":
        parts = [flat(n) for n in names]
        imp = jnp.concatenate([p[0] for p in parts], axis=1)
        live = None if all(p[1] is None for p in parts) else jnp.concatenate(
            [jnp.ones(p[0].shape[1], bool) if p[1] is None else p[1] for p in parts])
        kept, target, got = proportional_select(imp, live, counts["*"], picks=picks, max_decisions=max_decisions,
                                                rank=rank)
        start = 0
        for n in names:
            size = int(np.prod(imps[n].shape[1:]))
            out[n] = kept[start:start + size].reshape(imps[n].shape[1:])
            start += size
        report["*"] = {"target": target.tolist(), "kept": got.tolist()}
    else:
        for n in names:
            imp, live = flat(n)
            kept, target, got = proportional_select(imp, live, counts[n], picks=picks, max_decisions=max_decisions,
                                                    rank=rank)
            out[n] = kept.reshape(imps[n].shape[1:])
            report[n] = {"target": target.tolist(), "kept": got.tolist()}
    masks = map_named(lambda n, t, p: out[n].astype(p.dtype), template, params)
    gap = max((float(np.max(np.abs(np.asarray(r["target"]) - np.asarray(r["kept"])))) for r in report.values()),
              default=0.0)
    return masks, {"layers": report, "max_share_gap": gap, "seconds": time.perf_counter() - t0}
