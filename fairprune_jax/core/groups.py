"""Group ids as every jitted helper takes them: integers, checked where JAX traces them.

A float array of ids (a standardised group column, ids read as ``0.5`` / ``2.7``) would be truncated by an
``int32`` cast without a word, merging groups (-0.74 / 0.75 / 2.25 -> 0 / 0 / 2). ``prune()`` refuses such ids
when it reads the data; the functions a user calls from a training step of their own (the group means of the
fairness surrogates, the replay buffers, CEAG's terms, the group counts) refuse them here, from the dtype,
which is known while the step is traced, so the error comes at the first call and costs nothing after it.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def group_ids(g: Any, what: str = "group ids") -> Any:
    """``g`` as ``int32`` (a JAX array); a floating or complex dtype is refused. Ids outside ``[0, G)`` are the
    caller's to drop (every helper drops them)."""
    dtype = getattr(g, "dtype", None)
    if dtype is None:
        dtype = np.asarray(g).dtype
    if jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"{what} must be integers; got dtype {dtype} (a float id such as 2.7 would be truncated to "
                        f"2 and merge groups): pass integer ids, e.g. np.unique(column, return_inverse=True)[1]")
    return jnp.asarray(g, jnp.int32)


def check_rows(rows: int, where: str, **arrays: Any) -> None:
    """Refuse per-row arrays whose length is not the batch's ``rows`` (a label array of one row would be
    broadcast over the batch without a word). Shapes are static, so this costs nothing once traced; ``None``
    entries are skipped."""
    for name, a in arrays.items():
        if a is None:
            continue
        shape = tuple(getattr(a, "shape", np.shape(a)))
        if shape != (rows,):
            raise ValueError(f"{where}: {name} must have one entry per row, shape ({rows},); got {shape}")


__all__ = ["group_ids", "check_rows"]
