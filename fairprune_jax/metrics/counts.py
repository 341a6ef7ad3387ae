"""Additive per-group counts, the input of every metric: a batch reduced on the device to per-group sums with one
``jax.ops.segment_sum`` (rows, correct predictions, loss, positive predictions, true and false positives,
positives, negatives; :func:`group_counts`), the same per class and per (class, group) pair for the
multi-class reports, and their sums across batches (:func:`add_counts`) and devices (:func:`psum_counts`).
Metrics are computed from the summed counts on the host (``fairness.py``), never by averaging per-batch rates.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.core.groups import check_rows, group_ids


class GroupCounts(NamedTuple):
    """Additive per-group statistics; every field is a float32 array of shape (G,).

    Fields are weighted sums over rows of the group, so two ``GroupCounts`` over
    disjoint data add to the counts of the union.
    """

    n: Any  # weighted number of rows
    correct: Any  # rows with argmax(logits) == y
    loss_sum: Any  # sum of per-sample loss (0 when no loss is given)
    pred_pos: Any  # rows with pred == positive_label
    tp: Any  # pred == positive_label and y == positive_label
    fp: Any  # pred == positive_label and y != positive_label
    pos: Any  # y == positive_label
    neg: Any  # y != positive_label


# ---------------------------------------------------------------------------
# Accumulation (device side, jittable)
# ---------------------------------------------------------------------------


def predictions(logits_or_preds: Any, what: str = "predictions") -> jax.Array:
    """Predicted labels (B,) int32 from float logits (B, C) (their argmax), from the one logit (B, 1) of a binary
    sigmoid model (class 1 where it is above 0, as the surrogates read it; its argmax would be class 0 everywhere)
    or from integer labels (B,)."""
    x = jnp.asarray(logits_or_preds)
    if x.ndim == 2 and x.shape[-1] == 1:
        return (x[:, 0] > 0).astype(jnp.int32)
    if x.ndim == 2:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    if x.ndim == 1:
        if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
            raise TypeError(f"1-D {what} must be integer labels; pass (B, C) logits otherwise")
        return x.astype(jnp.int32)
    raise ValueError(f"expected logits (B, C) or {what} (B,), got shape {x.shape}")


def group_counts(
    logits_or_preds: jax.Array,
    y: jax.Array,
    g: jax.Array,
    num_groups: int,
    *,
    loss: jax.Array | None = None,
    weights: jax.Array | None = None,
    positive_label: int = 1,
) -> GroupCounts:
    """Reduce one batch to per-group counts with a single ``segment_sum``.

    ``logits_or_preds`` is either float logits of shape (B, C) (predictions are
    their argmax) or integer predicted labels of shape (B,). ``y`` and ``g`` are
    integer labels and group ids of shape (B,); ids outside ``[0, num_groups)``
    are dropped. ``weights`` (B,) are row weights, 0 marking padding rows that
    must not count anywhere (their loss may even be NaN). ``num_groups`` (and,
    under ``jax.jit``, ``positive_label``) must be static.
    """
    shape = jnp.shape(logits_or_preds)
    classes = max(int(shape[-1]), 2) if len(shape) == 2 else None
    if isinstance(positive_label, (int, np.integer)) and classes is not None and not 0 <= positive_label < classes:
        raise ValueError(f"positive_label={positive_label} is not a class of {classes}-class logits (classes 0.."
                         f"{classes - 1}): no row could be predicted positive, and DP / EO would read 0")
    preds = predictions(logits_or_preds)
    check_rows(preds.shape[0], "group_counts", y=y, g=g, weights=weights, loss=loss)
    y = jnp.asarray(y).astype(jnp.int32)
    g = group_ids(g)

    w = jnp.ones(preds.shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if loss is None:
        wloss = jnp.zeros(preds.shape, jnp.float32)
    else:
        # where() rather than a product so NaN/inf losses on padding rows vanish.
        wloss = jnp.where(w != 0, jnp.asarray(loss, jnp.float32) * w, 0.0)

    correct = (preds == y).astype(jnp.float32)
    pred_pos = (preds == positive_label).astype(jnp.float32)
    pos = (y == positive_label).astype(jnp.float32)
    neg = 1.0 - pos
    cols = jnp.stack(
        [w, w * correct, wloss, w * pred_pos, w * pred_pos * pos, w * pred_pos * neg,
         w * pos, w * neg],
        axis=1,
    )  # (B, 8): one scatter-add for all statistics of all groups
    sums = jax.ops.segment_sum(cols, g, num_segments=num_groups)  # (G, 8)
    return GroupCounts(*(sums[:, i] for i in range(len(GroupCounts._fields))))


def per_class_counts(
    logits_or_preds: jax.Array,
    y: jax.Array,
    num_classes: int,
    *,
    loss: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> GroupCounts:
    """Counts where the group id is the true class (input to CWV / MCD)."""
    return group_counts(logits_or_preds, y, y, num_classes, loss=loss, weights=weights)


class ClassGroupCounts(NamedTuple):
    """Additive per-group, per-class statistics: the one-vs-rest counts of every class at once.

    ``n`` has shape (G,); ``pred``, ``label`` and ``hit`` have shape (G, C): rows of the group predicted as
    class k, rows whose label is k, and rows both predicted and labelled k. Every binary metric of "class k
    vs the rest" follows from them (:func:`one_vs_rest`), so DP / EO of every class come from one pass.
    """

    n: Any
    pred: Any
    label: Any
    hit: Any


def class_group_counts(
    logits_or_preds: jax.Array,
    y: jax.Array,
    g: jax.Array,
    num_groups: int,
    num_classes: int,
    *,
    weights: jax.Array | None = None,
) -> ClassGroupCounts:
    """Reduce one batch to per-group one-hot prediction / label / hit counts with one ``segment_sum``.

    Same inputs as :func:`group_counts`; ``num_groups`` and ``num_classes`` must be static. Cost: a
    (B, 1 + 3C) one-hot block scattered into (G, 1 + 3C), no loop over classes.
    """
    preds = predictions(logits_or_preds)
    check_rows(preds.shape[0], "class_group_counts", y=y, g=g, weights=weights)
    y = jnp.asarray(y).astype(jnp.int32)
    w = jnp.ones(preds.shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    p1 = jax.nn.one_hot(preds, num_classes, dtype=jnp.float32)
    y1 = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
    cols = jnp.concatenate([w[:, None], w[:, None] * p1, w[:, None] * y1, w[:, None] * p1 * y1], axis=1)
    sums = jax.ops.segment_sum(cols, group_ids(g), num_segments=num_groups)
    c = num_classes
    return ClassGroupCounts(sums[:, 0], sums[:, 1:1 + c], sums[:, 1 + c:1 + 2 * c], sums[:, 1 + 2 * c:])


def one_vs_rest(counts: ClassGroupCounts, k: int) -> GroupCounts:
    """The :class:`GroupCounts` of "class ``k`` vs the rest" (``correct`` and ``loss_sum`` left at 0)."""
    n = np.asarray(counts.n, np.float64).reshape(-1)
    pred, label, hit = (np.asarray(a, np.float64)[:, k] for a in (counts.pred, counts.label, counts.hit))
    z = np.zeros_like(n)
    return GroupCounts(n=n, correct=z, loss_sum=z, pred_pos=pred, tp=hit, fp=pred - hit, pos=label, neg=n - label)


def add_counts(a: GroupCounts, b: GroupCounts) -> GroupCounts:
    """Field-wise sum: counts of the union of two disjoint sets of rows (jittable)."""
    return GroupCounts(*(x + z for x, z in zip(a, b)))


def zeros_counts(num_groups: int) -> GroupCounts:
    """Identity element of :func:`add_counts` (start of an accumulation loop)."""
    return GroupCounts(*(jnp.zeros((num_groups,), jnp.float32) for _ in GroupCounts._fields))


def psum_counts(counts: GroupCounts, axis_name: str) -> GroupCounts:
    """Sum counts over a mapped device axis (inside ``pmap``/``shard_map``/``vmap``)."""
    return jax.lax.psum(counts, axis_name)


# ---------------------------------------------------------------------------
# Host-side metrics (after accumulation)
# ---------------------------------------------------------------------------


def to_numpy(counts: GroupCounts) -> GroupCounts:
    """Float64 numpy copy of the counts, so rates are computed in double precision."""
    return GroupCounts(*(np.asarray(x, dtype=np.float64).reshape(-1) for x in counts))


#: ``group_counts`` compiled once per shape; ``num_groups``/``positive_label`` are static.
group_counts_jit = jax.jit(group_counts, static_argnames=("num_groups", "positive_label"))
