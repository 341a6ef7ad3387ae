"""Per-group replay buffers: fixed-shape ring buffers of the last ``k`` per-sample values of each group (say,
per-sample correctness), updated from a batch inside the jitted step (:func:`buffer_update`, weights ``w`` = 0
ignored) and read as one mean per group once its buffer is full (:func:`buffer_means`).
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax.numpy as jnp

from fairprune_jax.core.groups import group_ids


class GroupBuffer(NamedTuple):
    """Per-group ring buffers of the last ``k`` per-sample values.

    ``values`` (G, k); ``pos`` (G,) next slot to write; ``count`` (G,) number
    of valid entries (``<= k``). Until a group has wrapped, its entries occupy
    slots ``0 .. count-1``.
    """

    values: chex.Array
    pos: chex.Array
    count: chex.Array


def buffer_init(num_groups: int, size: int = 40, dtype=jnp.float32) -> GroupBuffer:
    if size < 1:
        raise ValueError(f"buffer size must be >= 1, got {size}")
    return GroupBuffer(values=jnp.zeros((num_groups, size), dtype),
                       pos=jnp.zeros((num_groups,), jnp.int32),
                       count=jnp.zeros((num_groups,), jnp.int32))


def _buffer_write_plan(buf: GroupBuffer, g: chex.Array, weights: chex.Array | None):
    """Where each sample of a batch goes: ``(row, slot, n)``.

    ``row`` (B,) is the sample's group, or ``G`` (out of bounds, dropped) for a
    padding row, a bad group id, or a sample that a later one of its group in
    the same batch would overwrite; ``slot`` (B,) is ``(pos[g] + rank) % k``;
    ``n`` (G,) counts the valid samples per group. The kept (row, slot) pairs
    are distinct, so the scatter is deterministic on every backend.
    """
    G, k = buf.values.shape
    g = group_ids(g).reshape(-1)
    B = g.shape[0]
    valid = (g >= 0) & (g < G)
    if weights is not None:
        valid = valid & (jnp.asarray(weights).reshape(-1) != 0)
    key = jnp.where(valid, g, G)                          # invalid rows sort last
    order = jnp.argsort(key, stable=True)
    skey = key[order]
    start = jnp.searchsorted(skey, skey, side="left")     # first index of each key's run
    rank = jnp.zeros((B,), jnp.int32).at[order].set(jnp.arange(B, dtype=jnp.int32) - start.astype(jnp.int32))
    n = jnp.zeros((G,), jnp.int32).at[key].add(1, mode="drop")
    gc = jnp.clip(g, 0, G - 1)
    keep = valid & (rank >= n[gc] - k)                    # only the last k of a group
    slot = (buf.pos[gc] + rank) % k
    return jnp.where(keep, gc, G), slot, n


def buffer_update(buf: GroupBuffer, values: chex.Array, g: chex.Array,
                  weights: chex.Array | None = None) -> GroupBuffer:
    """Append a batch, in batch order, to each sample's group buffer.

    Rows with ``weights == 0`` (padding) or a group id outside ``[0, G)`` are
    ignored. Vectorized: each sample's rank among the valid samples of its
    group in the batch comes from a stable sort; it is written to slot
    ``(pos[g] + rank) % k``. When more than ``k`` samples of a group arrive,
    only the last ``k`` are written (exactly what a sequential ring buffer ends
    with), so no two writes hit the same slot.
    """
    k = buf.values.shape[1]
    values = jnp.asarray(values, buf.values.dtype).reshape(-1)
    row, slot, n = _buffer_write_plan(buf, g, weights)
    new_values = buf.values.at[row, slot].set(values, mode="drop")
    return GroupBuffer(values=new_values, pos=(buf.pos + n) % k,
                       count=jnp.minimum(buf.count + n, k))


def buffer_means(buf: GroupBuffer) -> tuple[chex.Array, chex.Array]:
    """``(means (G,), is_full (G,) bool)``.

    ``means`` averages the valid entries (0 for an empty buffer); use
    ``is_full`` as the ``observed`` mask of a strict violation read from the
    buffers: before its buffer is full a group counts as not observed.
    """
    k = buf.values.shape[1]
    total = jnp.sum(buf.values, axis=1)
    means = total / jnp.maximum(buf.count, 1).astype(total.dtype)
    return means, buf.count >= k
