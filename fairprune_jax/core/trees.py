"""Names for the leaves of a params pytree, the one addressing scheme of the library: ``'layers/0/kernel'`` for
the key path ``('layers', 0, 'kernel')`` (:func:`leaf_name`), the named leaves of a tree (:func:`named_leaves`)
and a ``tree_map`` that passes each leaf's name (:func:`map_named`). Masks, models, compaction and reports
all use them; they sit here, below ``models`` and ``sparsity``, so that neither has to import the other.
"""
from __future__ import annotations

from typing import Any

import jax


def _is_none(x: Any) -> bool:
    return x is None


#: the attribute holding a ``flax.nnx`` Variable's array: an ``nnx.State`` of params flattens to paths ending in
#: ``.../kernel/value``; the name drops it, so a leaf has one name whether the params are an ``nnx.State`` (an
#: ``nnx.Optimizer`` loop) or a pure dict (``nnx.to_pure_dict``, ``prune()``): the name rules (a bias, a norm
#: scale is not pruned) and saved mask files read the same names either way
VARIABLE_PAYLOADS = ("value", "raw_value")


def iter_modules(module: Any):
    """``(path, submodule)`` of a ``flax.nnx`` module: ``nnx.iter_modules`` where flax has it (the method form is
    deprecated there), else the method."""
    from flax import nnx
    fn = getattr(nnx, "iter_modules", None)
    return fn(module) if fn is not None else module.iter_modules()


def leaf_name(path: tuple) -> str:
    """``('layers', 0, 'kernel')`` -> ``'layers/0/kernel'`` for any jax key path (an ``nnx`` Variable's trailing
    ``.value`` attribute left out, :data:`VARIABLE_PAYLOADS`)."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in VARIABLE_PAYLOADS:
        path = path[:-1]
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``[(name, leaf)]`` for the non-None leaves of a pytree."""
    return [(leaf_name(p), v) for p, v in jax.tree_util.tree_leaves_with_path(tree)]


def map_named(fn, tree: Any, *rest: Any) -> Any:
    """``tree_map`` with the leaf name as first argument; ``None`` leaves of ``tree`` stay ``None``."""
    def f(path, x, *r):
        return None if x is None else fn(leaf_name(path), x, *r)
    return jax.tree_util.tree_map_with_path(f, tree, *rest, is_leaf=_is_none)


#: leaf names that are never pruned (biases, norm scales, embedding tables, BatchNorm statistics)
NOT_PRUNED_NAMES = ("bias", "scale", "embedding", "mean", "var")


def weight_matrix(name: str, leaf: Any) -> bool:
    """Whether a param leaf is a weight matrix the library prunes by default (``masks.prunable_template``) and
    counts in the FLOPs of a user's module (``models.count_flops``): two or more axes, not a bias / scale /
    statistic by its name, not an embedding (``embed`` in its path: a lookup table, not a multiplication)."""
    last = name.rsplit("/", 1)[-1]
    return getattr(leaf, "ndim", 0) >= 2 and last not in NOT_PRUNED_NAMES and "embed" not in name
