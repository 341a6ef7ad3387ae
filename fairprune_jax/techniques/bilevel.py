"""Bi-level pruning (BiP, Zhang et al., NeurIPS 2022) with a fairness term (BiFP, Dai et al. 2023).

The problem
-----------
Upper level over the mask ``m`` (binary, exactly ``k`` units kept per layer),
lower level over the weights ``theta``::

    min_m  L(m * theta*(m))        s.t. theta*(m) = argmin_theta L(m * theta) + gamma/2 ||theta||^2

with ``L`` the training objective of the masked model: cross-entropy plus
the fairness term (a fixed penalty ``lam * F``, or a Lagrangian with one
multiplier per group constraint from :mod:`fairprune_jax.constraints.constrained`).

The implicit gradient
---------------------
``dL/dm = grad_m L + (d theta*/dm)^T grad_theta L``. Differentiating the
lower level's stationarity condition ``grad_theta l(m, theta*) = 0`` gives
``d theta*/dm = -[grad^2_theta l]^{-1} grad^2_{theta m} l``. BiP's two
assumptions make this first order:

1. the lower-level Hessian is ``gamma * I`` (``grad^2_z L`` neglected, the
   "Hessian-free" assumption: exact when ``L`` is linear in ``z``);
2. in ``grad^2_{theta m} l = diag(grad_z L) + m * grad^2_z L * theta`` the
   second-order part is dropped, leaving ``diag(grad_z L)``.

So ``d theta*/dm = -(1/gamma) diag(grad_z L)`` and, elementwise (unstructured
masks, one ``m_i`` per weight, ``z_i = m_i theta_i``)::

    grad_m = theta * g  -  (1/gamma) * g * (m * g)         with g = dL/dz.

Where a structured mask is differentiated
-----------------------------------------
The forward pass removes a unit by masking its kernel column *and* its bias
and BatchNorm scale/offset (:mod:`fairprune_jax.sparsity.compact`), so a pruned unit
outputs exactly 0. Differentiated there (``mask_grad="producer"``, the
formula above summed over the unit's weights), a pruned unit's
pre-activation is 0, ReLU'(0) = 0, and every ``g`` of the unit is 0: its
score never moves and it can never come back. Measured on the Adult MLP, the
digits MLP and the UTKFace CNN, 100% of pruned units got an exactly zero
gradient at every step.

``mask_grad="consumer"`` (default) takes the mask's derivative where the
unit's output is *consumed*: the same binary mask written as a scale on the
consuming kernels' input rows (axis -2), with the producing layer unmasked.
This is the same function of the input (the unit's output reaches the rest
of the network only through those rows; a conv's BatchNorm is per channel),
so the loss, the forward pass used for the weights, the final masks and the
compaction are unchanged; only the point at which ``dL/dm`` is read moves.
A pruned unit now sees ``sum_j K[u, j] dL/dK_eff[u, j]``: the first-order
change of the loss if its stored weights came back. With ``z = m_u * K[u, :]``
for the consumer rows ``K``, BiP's formula is::

    grad_{m_u} = sum_j K[u, j] g[u, j]  -  (1/gamma) sum_j g[u, j] (m_u g[u, j])

(``g = dL/dz`` at the consumer rows, summed over spatial taps and over all
consumers); the implicit term vanishes for a pruned unit and lowers a kept
one by ``(1/gamma) ||g_u||^2``. This follows BiP's channel mode, which masks
each conv's *input* channels (OPTML-Group/BiP, ``models/layers.py`` lines
31-47, ``GetSubnetChannel``; used in ``SubnetConvChannel.forward``, lines
148-156).

Scores
------
The mask is the top-k of continuous per-unit scores ``s`` (exact sparsity),
and the gradient above is passed to ``s`` unchanged: the straight-through
estimator ``dm/ds = I`` (BiP ``models/layers.py`` lines 44-47). Scores start
at the per-layer-normalised magnitude (L1 norm of the unit's kernel column;
BiP copies the raw weights into its scores, ``utils/model.py`` lines
169-175, and ranks their norms) and take SGD steps with momentum
(``mask_momentum``, BiP's mask optimizer is SGD with momentum, ``train.py``
lines 95-100). By default they are NOT clipped: BiP's code has no
projection onto ``[0, 1]``, and a clip makes every unit that reaches a bound
tie with the others there, ties then being broken by index.
``score_clip=True`` restores the clip of earlier versions (for ablations).

One jitted step per batch: lower level (``lower_steps`` steps of the weight
optimizer on ``theta`` of the masked model; the dual step, in constraint
mode, with the first of them), then the upper level (one score step with the
implicit gradient at the new ``theta``), then the new top-k mask. Weights of
pruned units keep their values (they receive no loss gradient), so a unit
that comes back resumes from where it was.

Fairness objectives
-------------------
The objective both levels minimise, with the fairness surrogate as a penalty or as constraints, is
``fairness_objective.py`` (:class:`Fairness`, :func:`objective_grads`, the fixed-mask step
:func:`make_fair_step`); its names are re-exported here (``bilevel.Fairness``, ... as before).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fairprune_jax.sparsity.units import UnitGroup, expand_unit_masks, gather_units, spread, unit_index
from fairprune_jax.sparsity.masks import (_global_topk, _is_none, apply_masks, keep_counts, map_named, named_leaves,
                                          topk_mask)
from fairprune_jax.techniques.fairness_objective import (CONSTRAINTS, FAIRNESS_MODES, PROXIES, STRICT,  # noqa: F401
                                                         Ema, FairState, Fairness, Forward, _stats, ema_update, fair_of,
                                                         fairness_init, group_rate_deviations, make_fair_step,
                                                         metric_gap, objective_grads, per_group_proxy,
                                                         per_group_strict, row_values, split_dual, split_fairness,
                                                         strict_violation)
from fairprune_jax.training.train import StepOutput, TrainState, carry_of, make_step, primal_state

MASK_GRADS = ("consumer", "producer")


# ---------------------------------------------------------------------------
# Scores and masks
# ---------------------------------------------------------------------------

def init_scores(params: Any, template: Any, structured: bool, groups: Sequence[UnitGroup] | None = None) -> Any:
    """Magnitude scores normalised to ``[0, 1]`` per layer (max = 1).

    Structured: the L1 norm of each output unit's kernel column (a coupled group with several producing kernels
    or several positions per unit, ``groups``: summed over all of them); unstructured: ``|w|``. Mirrors
    ``template`` (``None`` at leaves that are not pruned).
    """
    coupled = {g.kernel: g for g in groups or () if g.producers or g.units or g.inner != 1 or g.inners}
    named = dict(named_leaves(params))

    def one(name, t, p):
        if t is None:
            return None
        if name in coupled:
            s = sum(_to_units(coupled[name], jnp.abs(named[k]).reshape(-1, named[k].shape[-1]).sum(axis=0), k)
                    for k in (name, *coupled[name].producers))
        else:
            s = jnp.abs(p).reshape(-1, p.shape[-1]).sum(axis=0) if structured else jnp.abs(p)
        return (s / jnp.maximum(jnp.max(s), 1e-12)).astype(jnp.float32)
    return map_named(one, template, params)


def _to_units(g: UnitGroup, per_position: jax.Array, name: str | None = None) -> jax.Array:
    """Sum a vector over the positions of member ``name``'s axis into one value per unit of ``g``
    (``unit_index``'s inverse)."""
    n, inner = g.units or per_position.shape[0], g.inner_of(name)
    if per_position.shape[0] == n and inner == 1:
        return per_position
    return per_position.reshape(-1, n, inner).sum(axis=(0, 2))


def _member_to_units(g: UnitGroup, name: str, per_position: jax.Array) -> jax.Array:
    """:func:`_to_units` for member or consumer ``name``; a leaf reading a concatenation sums only the group's
    segments of its axis."""
    if not g.segments_of(name):
        return _to_units(g, per_position, name)
    return gather_units(g, name, per_position, g.units)


def unit_shapes(params: Any, groups: Sequence[UnitGroup]) -> Any:
    """``params`` with each coupled group's kernel replaced by a vector over its units (what the counts read)."""
    units = {g.kernel: g.units for g in groups if g.units}
    return map_named(lambda n, p: jax.ShapeDtypeStruct((units[n],), p.dtype) if n in units else p, params)


def unit_keep_counts(params: Any, template: Any, sparsity: float, distribution: str,
                     structured: bool, groups: Sequence[UnitGroup] | None = None) -> dict[str, int]:
    """Units (or weights) kept per pruned leaf, host-side and exact.

    As :func:`fairprune_jax.sparsity.masks.keep_counts`; structured layers keep at
    least one unit (a layer without units disconnects the network); a coupled group counts its ``units``.
    ``global`` returns ``{'*': total}``.
    """
    if structured and groups:
        params = unit_shapes(params, groups)
    counts = keep_counts(params, template, sparsity, distribution, structured=structured)
    if structured and "*" not in counts:
        counts = {n: max(int(k), 1) for n, k in counts.items()}
    return counts


def initial_scores_and_masks(params: Any, template: Any, counts: dict[str, int],
                             groups: Sequence[UnitGroup] | None) -> tuple[Any, Any]:
    """``(magnitude scores, full top-k masks)`` in one compiled call (``groups=None``: unstructured)."""
    @jax.jit
    def make(p):
        scores = init_scores(p, template, groups is not None, groups)
        return scores, full_masks(binarize(scores, counts), p, groups)
    return make(params)


def binarize(scores: Any, counts: dict[str, int]) -> Any:
    """Exact top-k 0/1 masks of ``scores`` (jittable; ``counts`` static)."""
    if "*" in counts:
        return _global_topk(scores, jnp.asarray(counts["*"]))
    return map_named(lambda n, s: topk_mask(s, counts[n]), scores)


def full_masks(unit_masks: Any, params: Any, groups: Sequence[UnitGroup] | None) -> Any:
    """The mask tree used in the forward pass: unit masks expanded to their companions (structured)."""
    if groups is None:
        return unit_masks
    return expand_unit_masks(unit_masks, groups, params)


def reduce_to_units(tree: Any, scores: Any, groups: Sequence[UnitGroup] | None) -> Any:
    """Sum ``tree`` over each unit's weights (kernel column + companions), shaped like ``scores``.

    Unstructured (``groups=None``): ``tree`` restricted to the scored leaves.
    """
    named = dict(named_leaves(tree))
    if groups is None:
        return map_named(lambda n, _: named[n], scores)
    by_kernel = {g.kernel: g for g in groups}

    def one(name, s):
        g = by_kernel[name]
        if g.producers or g.units or g.inner != 1 or g.inners or g.segments:   # coupled: summed into units
            return sum(_member_to_units(g, c, named[c].reshape(-1, named[c].shape[-1]).sum(axis=0))
                       for c in g.members).astype(s.dtype)
        k = named[name]
        total = k.reshape(-1, k.shape[-1]).sum(axis=0)
        for c in g.companions:
            total = total + named[c]
        return total.astype(s.dtype)
    return map_named(one, scores)


def unit_vectors(masks: Any, scores: Any, groups: Sequence[UnitGroup] | None) -> Any:
    """The unit masks (shaped like ``scores``) read back from the full mask tree at each group's kernel."""
    named = dict(named_leaves(masks))
    by_kernel = {g.kernel: g for g in groups or ()}

    def one(name, s):
        m, g = named[name], by_kernel.get(name)
        if g is None or m.shape == s.shape:
            return m
        return m[: g.units * g.inner: g.inner]
    return map_named(one, scores)


def implicit_mask_grad(theta: Any, g_upper: Any, masks: Any, scores: Any, gamma: float,
                       groups: Sequence[UnitGroup] | None, g_lower: Any = None) -> Any:
    """BiP's first-order implicit gradient of the upper loss w.r.t. the mask.

    ``grad_m = dL/dm - (1/gamma) * (dL_low/dz * dL/dtheta)`` reduced to units:
    ``theta`` the weights, ``g_upper = dL/dz`` and ``g_lower = dL_low/dz``
    (default: the same loss) at ``z = masks * theta``, ``masks`` the full
    forward-pass mask tree (kernel + companions). ``dL/dm = theta * g_upper``,
    ``dL/dtheta = masks * g_upper``. Returns a tree shaped like ``scores``.
    """
    g_lower = g_upper if g_lower is None else g_lower
    direct = jax.tree.map(lambda t, g: t * g, theta, g_upper)
    g_theta = apply_masks(g_upper, masks)
    implicit = jax.tree.map(lambda gl, gt: gl * gt, g_lower, g_theta)
    d = reduce_to_units(direct, scores, groups)
    i = reduce_to_units(implicit, scores, groups)
    return jax.tree.map(lambda a, b: a - b / gamma, d, i)


def consumer_scaled(theta: Any, unit_masks: Any, groups: Sequence[UnitGroup]) -> Any:
    """``theta`` with each group's consumer kernels' input rows (axis -2) scaled by the group's unit mask.

    Producing kernels and companions stay unmasked. For a 0/1 mask the model
    computes the same function as with the producer-side mask (a unit reaches
    the rest of the network only through its consumers' rows), but a pruned
    unit's output is computed from its stored weights, so the loss has a
    nonzero derivative with respect to its mask.
    """
    units = dict(named_leaves(unit_masks))
    scale: dict[str, list] = {}
    for g in groups:
        if g.kernel in units:
            for c in g.consumers:
                scale.setdefault(c, []).append((g, units[g.kernel]))

    def one(name, p):
        for g, v in scale.get(name, ()):
            if g.segments_of(name):         # rows of a concatenation: the group's segment only
                v = spread(g, name, p.shape[-2], v)
            elif g.inner_of(name) != 1:       # row r is unit (r // inner) % units (an attention head's rows)
                v = unit_index(g, p.shape[-2], v, name)
            elif p.shape[-2] != v.shape[0]:   # a flattened (channel-last) feature map: row r is unit r % units
                v = jnp.tile(v, p.shape[-2] // v.shape[0])
            p = p * v.astype(p.dtype)[:, None]
        return p
    return map_named(one, theta)


def consumer_mask_grad(theta: Any, g_z: Any, unit_masks: Any, scores: Any, gamma: float,
                       groups: Sequence[UnitGroup], g_lower: Any = None) -> Any:
    """BiP's first-order implicit gradient with the mask read at the consumer rows (see the module doc).

    ``g_z = dL/dz`` at ``z = consumer_scaled(theta, unit_masks, groups)``;
    ``g_lower`` the lower loss's (default: the same). Per unit ``u``:
    ``sum K[u] g[u] - (1/gamma) sum g_lower[u] (m_u g[u])`` over every
    consumer kernel ``K`` (all axes but the input axis -2 summed).
    """
    g_lower = g_z if g_lower is None else g_lower
    t, g, gl, units = (dict(named_leaves(x)) for x in (theta, g_z, g_lower, unit_masks))
    by_kernel = {grp.kernel: grp for grp in groups}

    def one(name, s):
        m = units[name]
        direct = jnp.zeros_like(s)
        implicit = jnp.zeros_like(s)
        for c in by_kernel[name].consumers:
            axes = tuple(a for a in range(t[c].ndim) if a != t[c].ndim - 2)
            d, i = jnp.sum(t[c] * g[c], axis=axes), jnp.sum(gl[c] * g[c], axis=axes)
            g_ = by_kernel[name]
            if g_.segments_of(c):           # rows of a concatenation: the group's segment only
                d, i = gather_units(g_, c, d, s.shape[0]), gather_units(g_, c, i, s.shape[0])
            elif g_.inner_of(c) != 1:       # rows of heads: sum each unit's positions
                d, i = _to_units(g_, d, c), _to_units(g_, i, c)
            elif d.shape != s.shape:        # flattened channel-last rows: sum each unit's positions
                d, i = d.reshape(-1, s.shape[0]).sum(0), i.reshape(-1, s.shape[0]).sum(0)
            direct = direct + d.astype(s.dtype)
            implicit = implicit + (m * i).astype(s.dtype)
        return direct - implicit / gamma
    return map_named(one, scores)


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


def make_bilevel_step(fm, spec: Fairness, weight_tx: optax.GradientTransformation,
                      mask_tx: optax.GradientTransformation, counts: dict[str, int], *,
                      groups: Sequence[UnitGroup] | None, gamma: float = 1.0, lower_steps: int = 1,
                      score_clip: bool = False, mask_grad: str = "consumer",
                      augment: Callable | None = None) -> Callable:
    """Jitted BiP/BiFP step ``(state, batch) -> (state, stats)``.

    ``state.params`` are the weights ``theta`` (not masked: pruned units keep
    their values), ``state.opt_state`` the weight optimizer's,
    ``state.masks`` the full mask tree of the current scores (start from
    :func:`initial_scores_and_masks`), ``state.extra`` =
    ``Carry(scores=, mask_opt=, fair=fairness_init(spec))``. ``counts`` from
    :func:`unit_keep_counts`; ``groups`` the unit groups (``None`` for
    unstructured masks). ``mask_grad``: where a structured mask is
    differentiated (``consumer`` or ``producer``, see the module doc; ignored
    for unstructured masks).
    """
    if mask_grad not in MASK_GRADS:
        raise ValueError(f"unknown mask_grad {mask_grad!r}; valid: {', '.join(MASK_GRADS)}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0; got {gamma}")
    if int(lower_steps) < 1:
        raise ValueError(f"lower_steps must be >= 1; got {lower_steps}")

    def objective(forward, state: TrainState, batch: dict) -> StepOutput:
        scores = carry_of(state).scores
        theta = state.params
        masks = state.masks                              # = full_masks(binarize(scores)), kept in sync
        unit = unit_vectors(masks, scores, groups)

        def forward_at(ms):                              # the model on z = the (masked) weights, no mask on top
            return lambda z: forward(z, masks=None, model_state=ms)

        # lower level: SGD on theta of the masked model (dL/dtheta = m * dL/dz)
        opt_state, fair_extra, model_state = primal_state(state.opt_state), fair_of(state), state.model_state
        first_aux = None
        for k in range(int(lower_steps)):
            g_z, fair_extra, aux = objective_grads(spec, forward_at(model_state), apply_masks(theta, masks), batch,
                                                   fair_extra, update_dual=(k == 0))
            g_theta = apply_masks(g_z, masks)
            updates, opt_state = weight_tx.update(g_theta, opt_state, theta)
            theta = optax.apply_updates(theta, updates)
            model_state = aux["model_state"]
            first_aux = aux if first_aux is None else first_aux

        # upper level: implicit gradient at the new theta, one score step (optionally clipped to [0, 1])
        if groups is not None and mask_grad == "consumer":
            g_z, _, _ = objective_grads(spec, forward_at(model_state), consumer_scaled(theta, unit, groups), batch,
                                        fair_extra, update_dual=False)
            g_m = consumer_mask_grad(theta, g_z, unit, scores, gamma, groups)
        else:
            g_z, _, _ = objective_grads(spec, forward_at(model_state), apply_masks(theta, masks), batch, fair_extra,
                                        update_dual=False)
            g_m = implicit_mask_grad(theta, g_z, masks, scores, gamma, groups)
        upd, mask_opt = mask_tx.update(g_m, carry_of(state).mask_opt, scores)
        scores = optax.apply_updates(scores, upd)
        if score_clip:
            scores = jax.tree.map(lambda s: jnp.clip(s, 0.0, 1.0), scores)
        new_unit = binarize(scores, counts)
        new_masks = full_masks(new_unit, theta, groups)
        changed = sum(jnp.sum(jnp.abs(a - b)) for a, b in zip(jax.tree.leaves(new_unit), jax.tree.leaves(unit)))
        # theta is not re-masked: pruned units keep their weights and may come back
        fair_rest, new_dual = split_dual(fair_extra)
        return StepOutput(first_aux["loss"], first_aux["logits"], model_state,
                          extra=carry_of(state).replace(scores=scores, mask_opt=mask_opt, fair=fair_rest),
                          stats={**_stats(first_aux), "mask_changes": changed},
                          fields={"params": theta, "masks": new_masks, "opt_state": opt_state}, dual=new_dual)

    return make_step(fm, None, objective, augment=augment)


__all__ = ["CONSTRAINTS", "FAIRNESS_MODES", "PROXIES", "Fairness", "MASK_GRADS", "STRICT", "binarize", "consumer_mask_grad",
           "Ema", "FairState", "consumer_scaled", "ema_update", "group_rate_deviations", "per_group_proxy", "per_group_strict", "fairness_init", "full_masks", "implicit_mask_grad",
           "init_scores", "initial_scores_and_masks", "fair_of", "split_dual", "make_bilevel_step", "make_fair_step", "objective_grads",
           "reduce_to_units", "row_values", "split_fairness", "metric_gap", "strict_violation", "unit_keep_counts"]
