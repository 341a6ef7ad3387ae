"""Fairness penalties for training mask scores (Fair Scratch Tickets, Tang et al. 2023): the authors'
one-sided logistic DP / EO regulariser with its per-group direction and priors from the training labels
(:func:`one_sided_penalty`, :func:`label_directions`, :func:`group_priors`), the soft-rate form
(:func:`rate_penalty`) and the class-wise one-sided forms (:func:`class_penalty`). Pure functions of a
batch's logits, labels, groups and weights; ``methods/fair_scratch.py`` chooses and weights them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.constraints import surrogates
from fairprune_jax.core.groups import group_ids


def label_directions(y: np.ndarray, g: np.ndarray, num_groups: int, positive_label: int) -> np.ndarray:
    """+1 for a group whose training positive-label rate is below the overall rate (disadvantaged), else -1.

    The authors hard-code which attribute value is pushed up per dataset
    (``floss_dp`` for CelebA, ``floss_dp_2`` for UTKFace2 in
    ``trainers/default.py`` lines 12-40 and 117-128 of HungerPWAY/Fair-Scratch-Tickets);
    here the direction comes from the training labels, for any number of groups.
    """
    pos = (np.asarray(y) == positive_label).astype(np.float64)
    g = np.asarray(g)
    overall = pos.mean() if pos.size else 0.0
    d = np.full(num_groups, -1.0, np.float32)
    for k in range(num_groups):
        sel = g == k
        if sel.any() and pos[sel].mean() < overall:
            d[k] = 1.0
    return d


def group_priors(y: np.ndarray, g: np.ndarray, num_groups: int, positive_label: int, on_positives: bool
                 ) -> np.ndarray:
    """``P(group)`` (DP) or ``P(group, y = pos)`` (EO) on the training split: the authors' ``Pa``/``Pb``."""
    g = np.asarray(g)
    keep = (np.asarray(y) == positive_label) if on_positives else np.ones(len(g), bool)
    counts = np.bincount(g[keep], minlength=num_groups)[:num_groups].astype(np.float64)
    return (counts / max(len(g), 1)).astype(np.float32)


def one_sided_penalty(logits, y, g, w, *, directions: jax.Array, priors: jax.Array, num_groups: int,
                      positive_label: int = 1, on_positives: bool = False, gated: bool = True) -> jax.Array:
    """The authors' logistic DP/EO regulariser, one-sided: each group's rows pushed toward the overall rate.

    Group ``a`` with direction ``d_a`` (+1: its positive rate should rise) adds
    ``-(1/B) sum_{i in a} log sigmoid(d_a f_i) / P_a`` (``f``: the positive
    class's log-odds, ``P_a``: the group's training frequency, or that of its
    ``y = pos`` rows for EO, ``on_positives``), the form of the authors'
    ``floss_dp`` / ``floss_eoo`` (``trainers/default.py`` lines 12-76, with
    ``lam / B`` scaling). Their term never stops pushing; with ``gated=True``
    (ours) a group's term counts only while its hard positive rate in the
    batch is on the wrong side of the batch's overall rate (``d_a (t - r_a) >
    0``), so the penalty is 0 once the disadvantaged groups reach the overall
    rate and it cannot overshoot into the reverse gap.
    """
    f = surrogates.positive_log_odds(logits, positive_label)
    w = jnp.asarray(w, jnp.float32)
    if on_positives:
        w = w * (jnp.asarray(y) == positive_label).astype(jnp.float32)
    g = group_ids(g)
    d_row = directions[jnp.clip(g, 0, num_groups - 1)]
    per_row = -jax.nn.log_sigmoid(d_row * f) * w
    sums = jax.ops.segment_sum(per_row, g, num_segments=num_groups)
    b = jnp.maximum(jnp.sum((w > 0).astype(jnp.float32)), 1.0)   # their B: the rows the term is taken over
    terms = sums / (b * jnp.maximum(priors, 1e-12))
    if not gated:
        return jnp.sum(terms)
    pred = (f > 0).astype(jnp.float32)
    rates, n, overall = surrogates.group_means(pred, g, w, num_groups)
    open_ = (n > 0) & (directions * (overall - rates) > 0)
    return jnp.sum(jnp.where(open_, terms, 0.0))


def rate_penalty(logits, y, g, w, *, num_groups: int, positive_label: int = 1, on_positives: bool = False
                 ) -> jax.Array:
    """Mean over groups of ``|r_a - r|``: each group's soft positive rate pulled toward the overall rate.

    ``r_a`` is group ``a``'s mean predicted positive probability
    (``sigmoid`` of the positive log-odds) in the batch, ``r`` the batch's
    overall one held fixed (``stop_gradient``), so only the groups move, each
    from whichever side it is on, and every group counts equally (the
    between-group DP difference is decided by the extreme groups, whatever
    their size). With ``on_positives`` only the ``y = pos`` rows enter (equal
    opportunity, as the authors' ``floss_eoo``). Unlike the logistic term the
    value is the size of the violation (at most 1): a model whose groups are
    already close pays little, so the constant classifier is no cheaper than
    a good one unless the gaps are large.
    """
    h = jax.nn.sigmoid(surrogates.positive_log_odds(logits, positive_label))
    w = jnp.asarray(w, jnp.float32)
    if on_positives:
        w = w * (jnp.asarray(y) == positive_label).astype(jnp.float32)
    means, n, overall = surrogates.group_means(h, g, w, num_groups)
    present = n > 0
    dev = jnp.where(present, jnp.abs(means - jax.lax.stop_gradient(overall)), 0.0)
    return jnp.sum(dev) / jnp.maximum(jnp.sum(present.astype(jnp.float32)), 1.0)


def class_penalty(logits, y, g, w, *, num_groups: int, bounded: bool) -> jax.Array:
    """One-sided mean deviation over groups (here: the classes) of the loss or the soft accuracy.

    ``sum_k p_k max(0, L_k - L)`` with ``L_k`` the mean cross-entropy of group
    ``k`` and ``L`` the overall mean held fixed (``stop_gradient``): only the
    groups worse than average are pushed, a good group is never pushed down,
    so the uniform predictor (every gap 0) is no attractor. ``bounded=True``
    uses the soft accuracy (probability of the true class, in [0, 1]) instead:
    ``sum_k p_k max(0, A - A_k)``.
    """
    logits = jnp.asarray(logits, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    if bounded:
        v = -jnp.take_along_axis(jax.nn.softmax(logits, -1), y[:, None], axis=-1)[:, 0]
    else:
        v = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    means, n, overall = surrogates.group_means(v, g, w, num_groups)
    p = n / jnp.maximum(jnp.sum(n), 1e-12)
    return jnp.sum(jnp.where(n > 0, p * jnp.maximum(means - jax.lax.stop_gradient(overall), 0.0), 0.0))
