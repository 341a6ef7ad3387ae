"""Differentiable multi-group fairness surrogates for training objectives.

Every surrogate has one signature, so methods (Fair Scratch Tickets, BiFP) can
take any of them by name::

    fn = surrogate("dp_logistic")
    value = fn(logits, y, g, w, num_groups, positive_label=1)   # scalar, differentiable

``logits`` are (B, C) class logits (or (B,) / (B, 1) single binary logits),
``y`` integer labels, ``g`` integer group ids in ``[0, num_groups)`` (others are
dropped), ``w`` row weights with 0 marking padding (a padding row never
contributes, even with NaN logits). ``num_groups`` (and ``positive_label``)
must be static under ``jax.jit``. Per-group means come from one
``jax.ops.segment_sum``; there is no Python loop over groups.

How a row's prediction enters
-----------------------------
The binary metrics (DP, EO) look at the event "predicted positive". Its
per-row score is the positive class's log-odds
``f = logit[pos] - logsumexp(logit[others])`` (for a single logit, the logit),
so ``f > 0`` iff ``P(pos) > 1/2`` (for two classes: iff the argmax is ``pos``).
The indicator ``1[f > 0]`` is replaced by a smooth or convex surrogate
``h(f)`` chosen by the name's suffix:

* no suffix (``dp``, ``eo``): ``h = sigmoid(f) = P(pos)``, the predicted
  positive probability (the soft selection rate);
* ``_logistic``: ``h = log2(1 + e^f)``, a convex upper bound of the indicator
  (``h(0) = 1``), Wu, Zhang & Wu (WWW 2019) and Fair Scratch Tickets;
* ``_hinge``: ``h = max(0, 1 + f)``, the convex hinge upper bound.
* ``_clipped``: ``h = min(2, max(0, 1 + f))``, the hinge capped at 2: still
  an upper bound of the indicator (and ``1 - h(-f) = max(-1, min(1, f))`` a
  lower bound), but flat outside ``|f| < 1``, so only rows near the decision
  boundary move it. A group's hinge mean also grows with how *confident* its
  positive predictions are, so a constraint on it can be met by shrinking
  every logit, which ends at a constant classifier; the capped form cannot
  be lowered that way (not convex; :data:`KINDS`).

Importance weighting and the multi-group gap
--------------------------------------------
Group ``a``'s term is the importance-weighted mean
``m_a = sum_i w_i 1[g_i = a] h(f_i) / sum_i w_i 1[g_i = a]``, i.e.
``E[h(f) 1[s = a] / p_a]`` with ``p_a`` the group's frequency, exactly the
per-group weighting of Wu et al. Their convex risk bound is one-sided and
binary (it needs to know which group is favoured, as the public FST code
does); here the groups' terms are compared directly, which covers any number
of groups and is 0 when every group's rows look alike:

* ``reduce="max_gap"`` (default): ``max_a m_a - min_a m_a`` over the groups
  present in the batch (fairlearn's ``between_groups`` difference; with the
  indicator as ``h`` it *is* the demographic parity difference);
* ``reduce="mean_abs"``: ``sum_a p_a |m_a - m|`` with ``m`` the overall mean
  (smooth in every group; the ``to_overall`` idea averaged over groups).

The gap of convex terms is not itself convex; it is a differentiable
surrogate whose minimiser equalises the groups.

The surrogates
--------------
* ``dp*`` demographic parity: the gap of ``h(f)`` over groups.
* ``eo*`` equalized odds: the same gap computed separately on the rows with
  ``y == positive_label`` (TPR side) and ``y != positive_label`` (FPR side),
  combined by ``agg="worst_case"`` (max, as fairlearn's default) or ``"mean"``.
* ``ap`` accuracy parity: the gap of the per-group mean cross-entropy (the
  loss is the differentiable stand-in for the error rate; multi-class, no
  positive label).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fairprune_jax.core.groups import group_ids

Surrogate = Callable[..., jax.Array]

_LOG2 = 0.6931471805599453
KINDS = ("prob", "logistic", "hinge", "clipped")
REDUCTIONS = ("max_gap", "mean_abs")
AGGS = ("worst_case", "mean")


def positive_log_odds(logits: jax.Array, positive_label: int = 1) -> jax.Array:
    """Per-row log-odds of the positive class, ``log P(pos) - log(1 - P(pos))``."""
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim == 1 or logits.shape[-1] == 1:
        return logits.reshape(logits.shape[0])
    c = logits.shape[-1]
    if not 0 <= positive_label < c:
        raise ValueError(f"positive_label={positive_label} is not a class of {c}-class logits; "
                         f"choose one of 0..{c - 1}")
    is_pos = jnp.arange(c) == positive_label
    others = jnp.where(is_pos, -jnp.inf, logits)
    return logits[:, positive_label] - jax.nn.logsumexp(others, axis=-1)


def indicator_surrogate(f: jax.Array, kind: str) -> jax.Array:
    """``h(f)`` standing in for ``1[f > 0]``: ``prob`` (sigmoid), ``logistic`` or ``hinge``."""
    if kind == "prob":
        return jax.nn.sigmoid(f)
    if kind == "logistic":
        return jax.nn.softplus(f) / _LOG2
    if kind == "hinge":
        return jnp.maximum(0.0, 1.0 + f)
    if kind == "clipped":
        return jnp.clip(1.0 + f, 0.0, 2.0)
    raise ValueError(f"unknown indicator surrogate {kind!r}; valid: {', '.join(KINDS)}")


def group_means(values: jax.Array, g: jax.Array, w: jax.Array, num_groups: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted per-group means of ``values``: ``(means (G,), group weight (G,), overall mean)``.

    Rows with ``w == 0`` are ignored even if their value is NaN. A group
    without weight has mean 0 and weight 0.
    """
    w = jnp.asarray(w, jnp.float32)
    v = jnp.where(w != 0, jnp.asarray(values, jnp.float32), 0.0) * w
    sums = jax.ops.segment_sum(jnp.stack([w, v], axis=1), group_ids(g), num_segments=num_groups)
    n, s = sums[:, 0], sums[:, 1]
    means = jnp.where(n > 0, s / jnp.where(n > 0, n, 1.0), 0.0)
    total = jnp.sum(n)
    overall = jnp.sum(s) / jnp.where(total > 0, total, 1.0)
    return means, n, overall


def gap(means: jax.Array, n: jax.Array, overall: jax.Array, reduce: str = "max_gap") -> jax.Array:
    """Disparity of per-group means over the groups with ``n > 0`` (0 if fewer than two)."""
    present = n > 0
    if reduce == "max_gap":
        hi = jnp.max(jnp.where(present, means, -jnp.inf))
        lo = jnp.min(jnp.where(present, means, jnp.inf))
        return jnp.where(jnp.sum(present) >= 2, hi - lo, 0.0)
    if reduce == "mean_abs":
        p = n / jnp.maximum(jnp.sum(n), 1e-12)
        return jnp.sum(jnp.where(present, p * jnp.abs(means - overall), 0.0))
    raise ValueError(f"unknown reduction {reduce!r}; valid: {', '.join(REDUCTIONS)}")


def demographic_parity(logits, y, g, w, num_groups: int, positive_label: int = 1, *, kind: str = "prob",
                       reduce: str = "max_gap") -> jax.Array:
    """Gap over groups of the mean surrogate selection ``h(f)``."""
    del y
    h = indicator_surrogate(positive_log_odds(logits, positive_label), kind)
    return gap(*group_means(h, g, w, num_groups), reduce=reduce)


def equalized_odds(logits, y, g, w, num_groups: int, positive_label: int = 1, *, kind: str = "prob",
                   reduce: str = "max_gap", agg: str = "worst_case") -> jax.Array:
    """DP gap conditioned on the label: TPR side (``y == pos``) and FPR side, max or mean of the two."""
    if agg not in AGGS:
        raise ValueError(f"unknown equalized-odds aggregation {agg!r}; valid: {', '.join(AGGS)}")
    h = indicator_surrogate(positive_log_odds(logits, positive_label), kind)
    pos = (jnp.asarray(y) == positive_label).astype(jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    d_tpr = gap(*group_means(h, g, w * pos, num_groups), reduce=reduce)
    d_fpr = gap(*group_means(h, g, w * (1.0 - pos), num_groups), reduce=reduce)
    return jnp.maximum(d_tpr, d_fpr) if agg == "worst_case" else 0.5 * (d_tpr + d_fpr)


def accuracy_parity(logits, y, g, w, num_groups: int, positive_label: int = 1, *,
                    reduce: str = "max_gap") -> jax.Array:
    """Gap over groups of the mean per-row loss (cross-entropy; logistic loss for a single logit)."""
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim == 1 or logits.shape[-1] == 1:
        target = (jnp.asarray(y) == positive_label).astype(jnp.float32)
        loss = optax.sigmoid_binary_cross_entropy(logits.reshape(-1), target)
    else:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y, jnp.int32))
    return gap(*group_means(loss, g, w, num_groups), reduce=reduce)


_BASE = {"dp": demographic_parity, "eo": equalized_odds, "ap": accuracy_parity}
NAMES = ("dp", "dp_logistic", "dp_hinge", "dp_clipped", "eo", "eo_logistic", "eo_hinge", "eo_clipped", "ap")


def surrogate(name: str, **options) -> Surrogate:
    """The surrogate called ``name`` (see :data:`NAMES`), with keyword ``options`` bound.

    ``options``: ``reduce`` (``max_gap`` / ``mean_abs``) for all; ``agg``
    (``worst_case`` / ``mean``) for ``eo*``. The result is
    ``fn(logits, y, g, w, num_groups, positive_label=1) -> scalar``.
    """
    if name not in NAMES:
        raise ValueError(f"unknown fairness surrogate {name!r}; valid choices: {', '.join(NAMES)}")
    base, _, kind = name.partition("_")
    fn = _BASE[base]
    allowed = {"reduce"} | ({"agg"} if base == "eo" else set())
    bad = set(options) - allowed
    if bad:
        raise ValueError(f"surrogate {name!r} takes no option(s) {sorted(bad)}; valid: {sorted(allowed)}")
    if options.get("reduce", "max_gap") not in REDUCTIONS:
        raise ValueError(f"unknown reduction {options['reduce']!r}; valid: {', '.join(REDUCTIONS)}")
    if base != "ap":
        options = {"kind": kind or "prob", **options}

    def bound(logits, y, g, w, num_groups: int, positive_label: int = 1) -> jax.Array:
        return fn(logits, y, g, w, num_groups, positive_label, **options)

    bound.__name__ = f"surrogate_{name}"
    bound.__doc__ = fn.__doc__
    return bound


__all__ = ["AGGS", "KINDS", "NAMES", "REDUCTIONS", "accuracy_parity", "demographic_parity", "equalized_odds",
           "gap", "group_means", "indicator_surrogate", "positive_log_odds", "surrogate"]
