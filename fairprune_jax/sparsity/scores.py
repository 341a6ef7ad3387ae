"""Pruning scores: higher means keep.

A scoring function maps the params (and whatever it needs: a PRNG key,
gradients) to a pytree of scores mirroring the masks' template: one score per
weight (unstructured) or per output unit (structured). Method-specific scores
(Ballot's votes, BiFP's learned scores) are pytrees of the same shape and go
through :func:`fairprune_jax.sparsity.masks.masks_from_scores` the same way.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fairprune_jax.sparsity.masks import _is_none, aligned, dense_leaf

Params = Any


def _over_template(fn: Callable, template: Any, *trees: Any) -> Any:
    template = aligned(template, trees[0], "the template")
    return jax.tree.map(lambda t, *xs: None if dense_leaf(t) else fn(*xs), template, *trees, is_leaf=_is_none)


def magnitude(params: Params, template: Any) -> Params:
    """|w| (Han et al. 2015)."""
    return _over_template(jnp.abs, template, params)


def random(key: jax.Array, params: Params, template: Any) -> Params:
    """Uniform random scores: the random-pruning baseline (one independent stream per leaf)."""
    restricted = _restrict(params, template)
    leaves, treedef = jax.tree.flatten(restricted)
    scores = [jax.random.uniform(jax.random.fold_in(key, i), p.shape) for i, p in enumerate(leaves)]
    return jax.tree.unflatten(treedef, scores)


def saliency(params: Params, grads: Params, template: Any) -> Params:
    """|w * dL/dw|: connection sensitivity (SNIP, Lee et al. 2019)."""
    return _over_template(lambda p, g: jnp.abs(p * g), template, params, grads)


def l1_structured(params: Params, template: Any) -> Params:
    """L1 norm of each output unit's incoming weights (Li et al. 2017): structured magnitude."""
    return _over_template(lambda p: jnp.abs(p).reshape(-1, p.shape[-1]).sum(axis=0), template, params)


def _restrict(params: Params, template: Any) -> Params:
    return jax.tree.map(lambda t, p: None if dense_leaf(t) else p, aligned(template, params, "the template"), params,
                        is_leaf=_is_none)


SCORES = {"magnitude": magnitude, "random": random, "saliency": saliency, "l1_structured": l1_structured}
