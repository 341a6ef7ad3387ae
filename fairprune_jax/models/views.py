"""Two-dimensional views of multi-axis kernels (``nnx.LinearGeneral``, the projections of ``nnx.MultiHeadAttention``).

The library works on kernels whose input rows are axis -2 and whose output units are the last axis (a Linear's
``(in, out)``, a conv's ``(kh, kw, in, out)``). ``nnx.LinearGeneral`` keeps several axes on either side: the
query / key / value projections of ``nnx.MultiHeadAttention`` hold ``(in, heads, head_dim)`` kernels and
``(heads, head_dim)`` biases, the output projection ``(heads, head_dim, out)``. :func:`linear_general_views` lists
them; a user's module is then run by the library with each such kernel viewed as the 2-D matrix it applies
(``(in, heads * head_dim)``; ``(heads * head_dim, out)``) and each such bias flat, and its forward pass reshapes
them back (:func:`from_view`, a free reshape under ``jit``). Seen that way, a head is what a reshape of a flat
channel axis makes it in any hand-written attention: the tracer (``sparsity/coupling.py``) groups the query,
key and value columns of one head with the output projection's rows of that head, and every mask, score and
slice of the structured methods applies unchanged. Masks and params leave the library in the module's own
shapes (:func:`from_view`); a compacted one gets the new head count (:func:`from_view` with ``resized=True``,
``compact.rebuild``).

A view is ``(leaf name, true shape, split)``: the true axes ``[:split]`` become the view's rows, ``[split:]`` its
columns (``split = 0``: a bias, one flat axis).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from fairprune_jax.core.trees import iter_modules, map_named

View = tuple[str, tuple[int, ...], int]


def view_shape(true: tuple[int, ...], split: int) -> tuple[int, ...]:
    """The 2-D (or, for a bias, flat) shape the library sees for a leaf of shape ``true``."""
    cols = int(np.prod(true[split:], dtype=np.int64))
    return (cols,) if split == 0 else (int(np.prod(true[:split], dtype=np.int64)), cols)


def linear_general_views(module: nnx.Module) -> tuple[View, ...]:
    """The views of every ``nnx.LinearGeneral`` in ``module`` whose kernel has more than two axes or whose bias has
    more than one (one with a ``batch_axis`` keeps its own shape: its batch axes are not rows)."""
    out: list[View] = []
    for path, m in iter_modules(module):
        if not isinstance(m, nnx.LinearGeneral) or m.batch_axis:
            continue
        base = "/".join(str(p) for p in path)
        kernel = tuple(m.kernel.value.shape)
        if len(kernel) > 2:
            out.append((f"{base}/kernel" if base else "kernel", kernel, len(m.in_features)))
        bias = getattr(m, "bias", None)
        if bias is not None and getattr(bias, "value", None) is not None and bias.value.ndim > 1:
            out.append((f"{base}/bias" if base else "bias", tuple(bias.value.shape), 0))
    return tuple(out)


def _map_viewed(tree: Any, views: tuple[View, ...], fn) -> Any:
    """``tree`` with ``fn(name, leaf, true_shape, split)`` applied to every leaf that ``views`` names (an array)."""
    if not views:
        return tree
    by_name = {n: (tuple(t), s) for n, t, s in views}
    return map_named(lambda name, v: fn(name, v, *by_name[name]) if name in by_name and hasattr(v, "shape") else v, tree)


def to_view(tree: Any, views: tuple[View, ...]) -> Any:
    """``tree`` (params, masks, gradients in the module's shapes) with every viewed leaf in its view's shape; a
    unit mask over the trailing axes (a structured method's ``(heads, head_dim)`` vector) becomes flat."""
    def one(name, v, true, split):
        if tuple(v.shape) == true:
            return v.reshape(view_shape(true, split))
        if split and tuple(v.shape) == true[split:]:
            return v.reshape(-1)
        return v
    return _map_viewed(tree, views, one)


def from_view(tree: Any, views: tuple[View, ...], *, resized: bool = False) -> Any:
    """``tree`` with every viewed leaf back in the module's own shape. ``resized``: the leaves were sliced (a
    compacted model): the outermost true axis of each side takes the change (fewer heads, the same head_dim)."""
    def one(name, v, true, split):
        shape = tuple(v.shape)
        if shape == true:
            return v
        if shape == view_shape(true, split):
            return v.reshape(true)
        if split and v.ndim == 1 and v.shape[0] == view_shape(true, split)[-1]:
            return v.reshape(true[split:])          # a unit mask over the columns
        if not resized or len(shape) != len(view_shape(true, split)):
            raise ValueError(f"{name} has shape {shape}; its view of {true} is {view_shape(true, split)}")
        sides = [true] if split == 0 else [true[:split], true[split:]]
        new: list[int] = []
        for n, side in zip(shape, sides):
            rest = int(np.prod(side[1:], dtype=np.int64))
            if n % rest:
                raise ValueError(f"{name}: {n} positions do not split into {side[1:]} (a part of a head was removed)")
            new += [n // rest, *side[1:]]
        return v.reshape(tuple(new))
    return _map_viewed(tree, views, one)


__all__ = ["View", "from_view", "linear_general_views", "to_view", "view_shape"]
