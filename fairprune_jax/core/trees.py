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


def leaf_name(path: tuple) -> str:
    """``('layers', 0, 'kernel')`` -> ``'layers/0/kernel'`` for any jax key path."""
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
