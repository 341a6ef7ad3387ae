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
:class:`Fairness` holds a surrogate from :mod:`fairprune_jax.constraints.surrogates`
(demographic parity ``dp*``, equalized odds ``eo*``, accuracy parity ``ap``)
and how it enters:

* ``penalty``: ``CE + lam * F`` in both levels (Dai et al.'s relaxation);
* ``constraint`` with ``constraint="per_group"`` (default): one inequality
  per group and side (equalized odds: the ``y = pos`` and ``y != pos``
  rows), ``|r_a - r| <= tau / 2`` with ``r_a`` the group's rate (selection
  rate for DP/EO, error rate for AP) and ``r`` the overall rate of the same
  rows; together they imply a max-min gap ``<= tau``. Each has its own multiplier, capped at ``multiplier_max``
  (:func:`fairprune_jax.constraints.constrained.capped`). The dual step reads the *hard*
  rates from exponential moving averages of per-group counts (decay
  ``strict_decay``; a constraint is observed once its group has
  ``min_rows`` effective rows), whose noise is far below that of the old
  40-row buffers (see the noise table in ``experiments/README.md``; the
  absolute value turns the remaining noise into a small upward bias, of the
  order of its RMS, which only tightens the bound). The primal step uses,
  per constraint, ``max(U_a - L, U - L_a)`` with ``U`` the mean of ``h(f)``
  and ``L`` the mean of ``1 - h(-f)``: for the ``_logistic`` / ``_hinge``
  surrogates ``h >= 1[f > 0]`` and ``1 - h(-f) <= 1[f > 0]``, so the term is
  an upper bound of the hard ``|r_a - r|`` (Wu, Zhang & Wu's convex bound,
  taken per group, both directions); for the default ``prob`` surrogate it
  is ``|P_a - P|`` of the soft rates. The term is V-shaped in the group's
  rate: a signed pair ``+-(r_a - r)`` with two multipliers gives the primal
  a *linear* term that, on a toy problem, pushed a group past the overall
  rate to the opposite violation and made the multipliers oscillate. For
  ``ap`` the per-group mean cross-entropy stands in for the error rate.
  ``one_sided=True`` (the method default for ``ap``) bounds only
  ``r_a - r <= tau / 2``: no group's error may exceed the overall error by
  more than ``tau / 2`` (CEAG's direction), and in the primal term the
  overall rate is held fixed, so the multipliers only reweight the groups
  that are worse off. The two-sided form also pushes the *best* groups'
  loss up towards the overall (levelling down); on digits at 90% structured
  sparsity, where the per-class constraints cannot all be met, that cost
  about 6 points of accuracy against the same search without fairness.
* ``constraint`` with ``constraint="max_gap"``: the earlier single
  constraint on the max-min gap, strict value from per-group replay buffers
  of ``buffer_size`` rows (kept for the ablation; with 40-row buffers its
  noise alone exceeds ``tau`` and only a constant classifier satisfies it).
* ``none``: plain cross-entropy (the BiP baseline).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fairprune_jax.constraints import constrained, surrogates
from fairprune_jax.sparsity.compact import UnitGroup, expand_unit_masks
from fairprune_jax.sparsity.masks import (_global_topk, _is_none, apply_masks, keep_counts, map_named, named_leaves,
                                          topk_mask)
from fairprune_jax.training.train import (StepOutput, TrainState, cross_entropy, make_step, primal_state,
                                          split_logits, weighted_mean)

FAIRNESS_MODES = ("constraint", "penalty", "none")
STRICT = ("metric", "surrogate")
CONSTRAINTS = ("per_group", "max_gap")
MASK_GRADS = ("consumer", "producer")


# ---------------------------------------------------------------------------
# Scores and masks
# ---------------------------------------------------------------------------

def init_scores(params: Any, template: Any, structured: bool) -> Any:
    """Magnitude scores normalised to ``[0, 1]`` per layer (max = 1).

    Structured: the L1 norm of each output unit's kernel column; unstructured:
    ``|w|``. Mirrors ``template`` (``None`` at leaves that are not pruned).
    """
    def one(t, p):
        if t is None:
            return None
        s = jnp.abs(p).reshape(-1, p.shape[-1]).sum(axis=0) if structured else jnp.abs(p)
        return (s / jnp.maximum(jnp.max(s), 1e-12)).astype(jnp.float32)
    return jax.tree.map(one, template, params, is_leaf=_is_none)


def unit_keep_counts(params: Any, template: Any, sparsity: float, distribution: str,
                     structured: bool) -> dict[str, int]:
    """Units (or weights) kept per pruned leaf, host-side and exact.

    As :func:`fairprune_jax.sparsity.masks.keep_counts`; structured layers keep at
    least one unit (a layer without units disconnects the network).
    ``global`` returns ``{'*': total}``.
    """
    counts = keep_counts(params, template, sparsity, distribution, structured=structured)
    if structured and "*" not in counts:
        counts = {n: max(int(k), 1) for n, k in counts.items()}
    return counts


def initial_scores_and_masks(params: Any, template: Any, counts: dict[str, int],
                             groups: Sequence[UnitGroup] | None) -> tuple[Any, Any]:
    """``(magnitude scores, full top-k masks)`` in one compiled call (``groups=None``: unstructured)."""
    @jax.jit
    def make(p):
        scores = init_scores(p, template, groups is not None)
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
        k = named[name]
        total = k.reshape(-1, k.shape[-1]).sum(axis=0)
        for c in g.companions:
            total = total + named[c]
        return total.astype(s.dtype)
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
                scale.setdefault(c, []).append(units[g.kernel])

    def one(name, p):
        for v in scale.get(name, ()):
            if p.shape[-2] != v.shape[0]:   # a flattened (channel-last) feature map: row r is unit r % units
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
            if d.shape != s.shape:          # flattened channel-last rows: sum each unit's positions
                d, i = d.reshape(-1, s.shape[0]).sum(0), i.reshape(-1, s.shape[0]).sum(0)
            direct = direct + d.astype(s.dtype)
            implicit = implicit + (m * i).astype(s.dtype)
        return direct - implicit / gamma
    return map_named(one, scores)


# ---------------------------------------------------------------------------
# Fairness objective
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fairness:
    """How the fairness surrogate enters the objective (see the module doc)."""

    surrogate: str = "ap"
    mode: str = "constraint"
    num_groups: int = 2
    positive_label: int = 1
    lam: float = 1.0
    tau: float = 0.05
    strict: str = "metric"
    buffer_size: int = 40
    reduce: str = "max_gap"
    dual: constrained.DualOptimizer | None = None
    dual_mode: str = "alternating"
    constraint: str = "per_group"
    strict_decay: float = 0.99
    min_rows: float = 200.0
    one_sided: bool = False

    def __post_init__(self):
        if self.mode not in FAIRNESS_MODES:
            raise ValueError(f"unknown fairness_mode {self.mode!r}; valid: {', '.join(FAIRNESS_MODES)}")
        surrogates.surrogate(self.surrogate, reduce=self.reduce)  # clear error on a bad name / reduction
        if self.strict not in STRICT:
            raise ValueError(f"unknown strict {self.strict!r}; valid: {', '.join(STRICT)}")
        if self.mode == "penalty" and self.lam < 0:
            raise ValueError(f"lam must be >= 0; got {self.lam}")
        if self.mode == "constraint":
            if self.dual is None:
                raise ValueError("fairness_mode='constraint' needs a dual optimizer")
            if int(self.buffer_size) < 1:
                raise ValueError(f"buffer_size must be >= 1; got {self.buffer_size}")
            if self.dual_mode not in constrained.MODES:
                raise ValueError(f"unknown mode {self.dual_mode!r}; valid: {', '.join(constrained.MODES)}")
            if self.constraint not in CONSTRAINTS:
                raise ValueError(f"unknown constraint {self.constraint!r}; valid: {', '.join(CONSTRAINTS)}")
            if not 0.0 <= float(self.strict_decay) < 1.0:
                raise ValueError(f"strict_decay must lie in [0, 1); got {self.strict_decay}")
            if self.constraint == "per_group" and self.strict != "metric":
                raise ValueError("constraint='per_group' reads the hard metric (strict='metric')")

    @property
    def num_constraints(self) -> int:
        """Multipliers: one (max_gap) or sides x groups (per_group)."""
        return self.sides * self.num_groups if self.constraint == "per_group" else 1

    @property
    def sides(self) -> int:
        """Row subsets compared across groups: 2 for equalized odds (y = pos / y != pos), else 1."""
        return 2 if self.surrogate.startswith("eo") else 1

    def fn(self) -> Callable:
        return surrogates.surrogate(self.surrogate, reduce=self.reduce)


def fairness_init(spec: Fairness) -> dict:
    """The fairness part of a step's extra state: ``{}`` or ``{dual, buffer}``."""
    if spec.mode != "constraint":
        return {}
    if spec.constraint == "per_group":
        n = spec.sides * spec.num_groups
        return {"dual": spec.dual.init(), "ema": {"n": jnp.zeros((n,), jnp.float32),
                                                  "s": jnp.zeros((n,), jnp.float32)}}
    return {"dual": spec.dual.init(),
            "buffer": constrained.buffer_init(spec.sides * spec.num_groups, int(spec.buffer_size))}


def fair_of(state: TrainState) -> dict:
    """The fairness state :func:`objective_grads` reads: ``state.extra["fair"]`` (buffers / EMA) with the
    multipliers, which live in the optimizer state (``state.dual``), under ``"dual"``."""
    fx = dict(state.extra["fair"])
    if state.dual is not None:
        fx["dual"] = state.dual
    return fx


def split_dual(fair_extra: dict) -> tuple[dict, Any]:
    """``(fairness state without the multipliers, the multipliers or None)``: the first goes into
    ``state.extra["fair"]``, the second into the optimizer state (``StepOutput.dual`` / ``with_dual``)."""
    rest = dict(fair_extra)
    return rest, rest.pop("dual", None)


def row_values(spec: Fairness, logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row values whose per-group means the strict violation compares, and each row's side.

    ``strict="metric"``: predicted positive (argmax == positive label) for
    ``dp``/``eo``, error (argmax != y) for ``ap``. ``"surrogate"``: the
    surrogate's own per-row term (``h(f)`` or the cross-entropy).
    """
    base, _, kind = spec.surrogate.partition("_")
    pred = jnp.argmax(logits, -1)
    if base == "ap":
        v = (pred != y).astype(jnp.float32) if spec.strict == "metric" else cross_entropy(logits, y)
    elif spec.strict == "metric":
        v = (pred == spec.positive_label).astype(jnp.float32)
    else:
        v = surrogates.indicator_surrogate(surrogates.positive_log_odds(logits, spec.positive_label),
                                           kind or "prob")
    side = (y != spec.positive_label).astype(jnp.int32) if spec.sides == 2 else jnp.zeros_like(y)
    return jax.lax.stop_gradient(v), side


def strict_violation(spec: Fairness, buf: constrained.GroupBuffer) -> tuple[jax.Array, jax.Array]:
    """``(gap - tau (1,), observed (1,))`` from the replay buffers.

    Per side, the gap is max - min of the group means over groups whose
    buffer is full (``reduce="mean_abs"``: the weighted mean absolute
    deviation); sides are combined by the worst case. Observed once some side
    has two full groups.
    """
    means, full = constrained.buffer_means(buf)
    means = means.reshape(spec.sides, spec.num_groups)
    full = full.reshape(spec.sides, spec.num_groups)
    gaps = jax.vmap(lambda m, f: surrogates.gap(m, f.astype(jnp.float32), jnp.sum(jnp.where(f, m, 0.0))
                                                / jnp.maximum(jnp.sum(f), 1), spec.reduce))(means, full)
    ok = jnp.sum(full, axis=1) >= 2
    worst = jnp.max(jnp.where(ok, gaps, -jnp.inf))
    observed = jnp.any(ok)
    return jnp.where(observed, worst - spec.tau, 0.0)[None], observed[None]


def ema_update(spec: Fairness, ema: dict, values: jax.Array, index: jax.Array, w: jax.Array) -> dict:
    """Decayed per-(side, group) sums of row weights ``n`` and weighted values ``s``.

    ``n`` is the effective number of rows behind a group's rate ``s / n``;
    with ``k`` rows of a group per step it settles at ``k / (1 - decay)``.
    """
    w = jnp.asarray(w, jnp.float32)
    v = jnp.where(w != 0, jnp.asarray(values, jnp.float32), 0.0) * w
    sums = jax.ops.segment_sum(jnp.stack([w, v], axis=1), jnp.asarray(index, jnp.int32),
                               num_segments=spec.sides * spec.num_groups)
    d = jnp.float32(spec.strict_decay)
    return {"n": d * ema["n"] + sums[:, 0], "s": d * ema["s"] + sums[:, 1]}


def group_rate_deviations(spec: Fairness, ema: dict) -> tuple[jax.Array, jax.Array]:
    """``(r_a - r (sides, G), observed (sides, G))`` from the moving counts.

    ``r`` is the overall rate of the side's rows (the sum of the groups'
    counts). A group is observed once it has ``min_rows`` effective rows.
    """
    n = ema["n"].reshape(spec.sides, spec.num_groups)
    s = ema["s"].reshape(spec.sides, spec.num_groups)
    rate = s / jnp.maximum(n, 1e-12)
    overall = jnp.sum(s, axis=1, keepdims=True) / jnp.maximum(jnp.sum(n, axis=1, keepdims=True), 1e-12)
    observed = n >= spec.min_rows
    return jnp.where(observed, rate - overall, 0.0), observed


def per_group_strict(spec: Fairness, ema: dict) -> tuple[jax.Array, jax.Array]:
    """Strict violations ``|r_a - r| - tau/2`` (``r_a - r - tau/2`` when ``one_sided``), K = sides x groups
    (side-major), and which are observed."""
    dev, observed = group_rate_deviations(spec, ema)
    dev = dev if spec.one_sided else jnp.abs(dev)
    return dev.reshape(-1) - 0.5 * spec.tau, observed.reshape(-1)


def per_group_proxy(spec: Fairness, logits: jax.Array, y: jax.Array, g: jax.Array, w: jax.Array) -> jax.Array:
    """Differentiable per-constraint terms (K,), ordered like :func:`per_group_strict` (see the module doc).

    ``max(U_a - L, U - L_a) - tau / 2`` with ``U`` the mean of ``h(f)`` and
    ``L`` the mean of ``1 - h(-f)`` over the group's (``_a``) or all of the
    side's rows: for an upper-bounding ``h`` it bounds ``|r_a - r| - tau/2``
    from above; for ``prob`` it is ``|P_a - P| - tau/2`` of the soft rates.
    ``ap``: ``|CE_a - CE| - tau/2`` of the mean cross-entropies. A group
    absent from the batch contributes ``-tau/2``. ``one_sided``: ``U_a - L - tau/2``
    (``CE_a - CE - tau/2``) with the overall term held fixed (no gradient), so
    the primal step only lowers the loss of groups above the overall rate.
    """
    base, _, kind = spec.surrogate.partition("_")
    if base == "ap":
        up = lo = cross_entropy(logits, y)
    else:
        f = surrogates.positive_log_odds(logits, spec.positive_label)
        up = surrogates.indicator_surrogate(f, kind or "prob")
        lo = 1.0 - surrogates.indicator_surrogate(-f, kind or "prob")
    side = (y != spec.positive_label).astype(jnp.int32) if spec.sides == 2 else jnp.zeros_like(y)
    out = []
    for sd in range(spec.sides):
        ws = jnp.asarray(w, jnp.float32) * (side == sd)
        up_g, n_g, up_all = surrogates.group_means(up, g, ws, spec.num_groups)
        lo_g, _, lo_all = surrogates.group_means(lo, g, ws, spec.num_groups)
        if spec.one_sided:      # only a group above the (fixed) overall rate is pushed, never the others up
            term = up_g - jax.lax.stop_gradient(lo_all)
        else:
            term = jnp.maximum(up_g - lo_all, up_all - lo_g)
        out.append(jnp.where(n_g > 0, term, 0.0))
    return jnp.concatenate(out) - 0.5 * spec.tau


Forward = Callable[[Any], tuple[jax.Array, Any]]


def objective_grads(spec: Fairness, forward: Forward, z: Any, batch: dict, fair_extra: dict, *,
                    update_dual: bool) -> tuple[Any, dict, dict]:
    """Gradient of the fairness-aware objective w.r.t. ``z`` (the params fed to ``forward``).

    ``forward(z) -> (logits, new_model_state)``. In constraint mode with
    ``update_dual`` the multiplier takes its dual step from this same forward
    pass (:func:`constrained.constrained_grads`) and the replay buffers are
    updated; otherwise the current multiplier weights the surrogate.
    Returns ``(grads, new_fair_extra, aux)`` with ``aux`` = ``{loss, ce, fair,
    logits, model_state}``.
    """
    fair_fn = spec.fn()
    y, g, w = batch["y"], batch["g"], batch["w"]

    def terms(zz):
        logits, new_ms = forward(zz)
        ce = weighted_mean(cross_entropy(logits, y), w)
        fair = (fair_fn(logits, y, g, w, spec.num_groups, spec.positive_label) if spec.mode != "none"
                else jnp.zeros((), jnp.float32))
        return ce, fair, logits, new_ms

    if spec.mode != "constraint":
        lam = spec.lam if spec.mode == "penalty" else 0.0

        def obj(zz):
            ce, fair, logits, new_ms = terms(zz)
            return ce + lam * fair, (ce, fair, logits, new_ms)

        (loss, (ce, fair, logits, new_ms)), grads = jax.value_and_grad(obj, has_aux=True)(z)
        return grads, fair_extra, {"loss": loss, "ce": ce, "fair": fair, "logits": logits, "model_state": new_ms}

    per_group = spec.constraint == "per_group"

    def violation(fair, logits):
        return per_group_proxy(spec, logits, y, g, w) if per_group else (fair - spec.tau)[None]

    if not update_dual:
        def lag(zz):
            ce, fair, logits, new_ms = terms(zz)
            return constrained.lagrangian(ce, violation(fair, logits), fair_extra["dual"]), (ce, fair, logits,
                                                                                              new_ms)
        (loss, (ce, fair, logits, new_ms)), grads = jax.value_and_grad(lag, has_aux=True)(z)
        return grads, fair_extra, {"loss": loss, "ce": ce, "fair": fair, "logits": logits, "model_state": new_ms}

    def problem(zz):
        ce, fair, logits, new_ms = terms(zz)
        v, side = row_values(spec, logits, y)
        if per_group:
            est = ema_update(spec, fair_extra["ema"], v, side * spec.num_groups + g, w)
            strict, observed = per_group_strict(spec, est)
        else:
            est = constrained.buffer_update(fair_extra["buffer"], v, side * spec.num_groups + g, w)
            strict, observed = strict_violation(spec, est)
        return ce, violation(fair, logits), strict, observed, (fair, logits, new_ms, est)

    grads, new_dual, info = constrained.constrained_grads(problem, z, spec.dual, fair_extra["dual"],
                                                          spec.dual_mode)
    fair, logits, new_ms, est = info.aux
    worst = jnp.max(jnp.where(info.observed, info.strict_violation, -jnp.inf))
    return grads, {"dual": new_dual, ("ema" if per_group else "buffer"): est}, {
        "loss": info.lagrangian, "ce": info.loss, "fair": fair, "logits": logits, "model_state": new_ms,
        "strict": jnp.where(jnp.any(info.observed), worst, 0.0), "multiplier": jnp.max(new_dual.multipliers)}


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------

def _stats(aux: dict) -> dict:
    """The statistics of a fairness-objective step beyond :func:`train.make_step`'s accuracy: ``loss`` is the
    cross-entropy, ``objective`` what was minimised."""
    out = {"loss": aux["ce"], "fair": aux["fair"], "objective": aux["loss"]}
    for k in ("strict", "multiplier"):
        if k in aux:
            out[k] = aux[k]
    return out


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
    ``{"scores", "mask_opt", "fair": fairness_init(spec)}``. ``counts`` from
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
        scores = state.extra["scores"]
        theta = state.params
        masks = state.masks                              # = full_masks(binarize(scores)), kept in sync
        named_masks = dict(named_leaves(masks))
        unit = map_named(lambda n, _: named_masks[n], scores)

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
        upd, mask_opt = mask_tx.update(g_m, state.extra["mask_opt"], scores)
        scores = optax.apply_updates(scores, upd)
        if score_clip:
            scores = jax.tree.map(lambda s: jnp.clip(s, 0.0, 1.0), scores)
        new_unit = binarize(scores, counts)
        new_masks = full_masks(new_unit, theta, groups)
        changed = sum(jnp.sum(jnp.abs(a - b)) for a, b in zip(jax.tree.leaves(new_unit), jax.tree.leaves(unit)))
        # theta is not re-masked: pruned units keep their weights and may come back
        fair_rest, new_dual = split_dual(fair_extra)
        return StepOutput(first_aux["loss"], first_aux["logits"], model_state,
                          extra={"scores": scores, "mask_opt": mask_opt, "fair": fair_rest},
                          stats={**_stats(first_aux), "mask_changes": changed},
                          fields={"params": theta, "masks": new_masks, "opt_state": opt_state}, dual=new_dual)

    return make_step(fm, None, objective, augment=augment)


def make_fair_step(fm, spec: Fairness, tx: optax.GradientTransformation, *,
                   augment: Callable | None = None) -> Callable:
    """Jitted masked training step with the fairness objective; the mask is fixed.

    ``state.extra = {"fair": ...}`` and ``state.dual`` from :func:`fairness_init` (:func:`split_dual`);
    ``state.masks`` may be
    ``None`` (dense fair training). Pruned weights stay exactly zero
    (:func:`fairprune_jax.training.train.apply_gradients`).
    """

    def objective(forward, state: TrainState, batch: dict) -> StepOutput:
        grads, fair_extra, aux = objective_grads(spec, forward, state.params, batch, fair_of(state),
                                                 update_dual=True)
        fair_rest, new_dual = split_dual(fair_extra)
        return StepOutput(aux["loss"], aux["logits"], aux["model_state"], grads=grads,
                          extra=dict(state.extra, fair=fair_rest), stats=_stats(aux), dual=new_dual)

    return make_step(fm, tx, objective, augment=augment)


def split_fairness(fm, spec: Fairness, params: Any, masks: Any, model_state: Any, split, batch_size: int = 512
                   ) -> dict[str, float]:
    """The surrogate and the strict metric gap on a whole split (one gap over all rows)."""
    logits = split_logits(fm, params, masks, model_state, split, batch_size)
    logits_j, y, g = jnp.asarray(logits), jnp.asarray(split.y), jnp.asarray(split.g)
    w = jnp.ones(len(split), jnp.float32)
    sur = float(spec.fn()(logits_j, y, g, w, spec.num_groups, spec.positive_label))
    v, side = row_values(dataclasses.replace(spec, strict="metric"), logits_j, y)
    gaps = []
    for s in range(spec.sides):
        means, n, overall = surrogates.group_means(v, g, w * (side == s), spec.num_groups)
        gaps.append(float(surrogates.gap(means, n, overall, spec.reduce)))
    return {"surrogate": sur, "metric_gap": max(gaps)}


__all__ = ["CONSTRAINTS", "FAIRNESS_MODES", "Fairness", "MASK_GRADS", "STRICT", "binarize", "consumer_mask_grad",
           "consumer_scaled", "ema_update", "group_rate_deviations", "per_group_proxy", "per_group_strict", "fairness_init", "full_masks", "implicit_mask_grad",
           "init_scores", "initial_scores_and_masks", "fair_of", "split_dual", "make_bilevel_step", "make_fair_step", "objective_grads",
           "reduce_to_units", "row_values", "split_fairness", "strict_violation", "unit_keep_counts"]
