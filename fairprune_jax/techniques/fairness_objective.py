"""The fairness objective of BiFP and its two-stage baselines (prune_then_fair, fair_then_prune): how a fairness
surrogate enters the training objective (:class:`Fairness`, :func:`objective_grads`), the state it carries
(multipliers, per-group EMAs or replay buffers), the step that trains the weights under it on fixed masks
(:func:`make_fair_step`) and its value on a whole split (:func:`split_fairness`). ``bilevel.py`` uses the
same objective in both levels of the mask search.

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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fairprune_jax.constraints import constrained, surrogates
from fairprune_jax.training.train import (StepOutput, TrainState, carry_of, cross_entropy, make_step, split_logits,
                                          weighted_mean)


FAIRNESS_MODES = ("constraint", "penalty", "none")
#: the primal term of a two-sided per-group constraint (``Fairness.proxy``): ``bound`` = Wu, Zhang & Wu's upper
#: bound ``max(U_a - L, U - L_a)``; ``shift`` = ``|U_a - U|``, the same surrogate on both sides (see
#: :func:`per_group_proxy`)
PROXIES = ("bound", "shift")
STRICT = ("metric", "surrogate")
CONSTRAINTS = ("per_group", "max_gap")


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
    dual: constrained.Dual | None = None
    dual_order: str = "dual_primal"          # dual.ORDERS
    constraint: str = "per_group"
    strict_decay: float = 0.99
    min_rows: float = 200.0
    one_sided: bool = False
    proxy: str = "bound"                     # PROXIES

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
            constrained.order_name(self.dual_order)         # a clear error for an unknown order
            if self.constraint not in CONSTRAINTS:
                raise ValueError(f"unknown constraint {self.constraint!r}; valid: {', '.join(CONSTRAINTS)}")
            if not 0.0 <= float(self.strict_decay) < 1.0:
                raise ValueError(f"strict_decay must lie in [0, 1); got {self.strict_decay}")
            if self.proxy not in PROXIES:
                raise ValueError(f"unknown proxy {self.proxy!r}; valid: {', '.join(PROXIES)}")
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


class Ema(NamedTuple):
    """Moving per-(side, group) counts of the per-group constraint: effective rows ``n`` and value sums ``s``."""

    n: jax.Array
    s: jax.Array


class FairState(NamedTuple):
    """The fairness objective's state (``Carry.fair``): the multipliers while a step runs (between steps they
    live in the optimizer state, :func:`split_dual`), and the estimates the dual step reads: the moving counts
    of the per-group constraint or the replay buffer of the max-gap one. All ``None`` without a constraint."""

    dual: Any = None
    ema: Ema | None = None
    buffer: Any = None


def fairness_init(spec: Fairness) -> FairState:
    """The fairness part of a step's state: empty, or the multipliers with their estimates."""
    if spec.mode != "constraint":
        return FairState()
    if spec.constraint == "per_group":
        n = spec.sides * spec.num_groups
        return FairState(dual=spec.dual.init(), ema=Ema(jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32)))
    return FairState(dual=spec.dual.init(),
                     buffer=constrained.buffer_init(spec.sides * spec.num_groups, int(spec.buffer_size)))


def fair_of(state: TrainState) -> FairState:
    """The fairness state :func:`objective_grads` reads: ``state.extra.fair`` (buffers / EMA) with the
    multipliers, which live in the optimizer state (``state.dual``)."""
    fair = carry_of(state).fair
    return fair if state.dual is None else fair._replace(dual=state.dual)


def split_dual(fair: FairState) -> tuple[FairState, Any]:
    """``(fairness state without the multipliers, the multipliers or None)``: the first goes into
    ``state.extra.fair``, the second into the optimizer state (``StepOutput.dual`` / ``with_dual``)."""
    return fair._replace(dual=None), fair.dual


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


def ema_update(spec: Fairness, ema: Ema, values: jax.Array, index: jax.Array, w: jax.Array) -> Ema:
    """Decayed per-(side, group) sums of row weights ``n`` and weighted values ``s``.

    ``n`` is the effective number of rows behind a group's rate ``s / n``;
    with ``k`` rows of a group per step it settles at ``k / (1 - decay)``.
    """
    w = jnp.asarray(w, jnp.float32)
    v = jnp.where(w != 0, jnp.asarray(values, jnp.float32), 0.0) * w
    sums = jax.ops.segment_sum(jnp.stack([w, v], axis=1), jnp.asarray(index, jnp.int32),
                               num_segments=spec.sides * spec.num_groups)
    d = jnp.float32(spec.strict_decay)
    return Ema(d * ema.n + sums[:, 0], d * ema.s + sums[:, 1])


def group_rate_deviations(spec: Fairness, ema: Ema) -> tuple[jax.Array, jax.Array]:
    """``(r_a - r (sides, G), observed (sides, G))`` from the moving counts.

    ``r`` is the overall rate of the side's rows (the sum of the groups'
    counts). A group is observed once it has ``min_rows`` effective rows.
    """
    n = ema.n.reshape(spec.sides, spec.num_groups)
    s = ema.s.reshape(spec.sides, spec.num_groups)
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

    ``proxy="shift"`` (two-sided DP / EO): ``|U_a - U| - tau/2``, the same
    ``h`` for the group and the overall rate. Not a bound of the hard
    deviation, but the bound's looseness has a gradient of its own: per row,
    ``h(f) - (1 - h(-f)) = max(1, |f|)`` for the hinge, so whenever a
    multiplier is positive ``U_a - L`` also pulls every logit into
    ``[-1, 1]``, whether the rates differ or not (on Adult at the CLI defaults
    the training cross-entropy of prune_then_fair's fine-tuning rose in every
    epoch, 0.37 -> 0.49, before the model fell to one class). ``|U_a - U|`` only moves the
    group's rows against the others'. For ``prob`` both forms are ``|P_a - P|``.
    Measured there (``experiments/ptf_adult_surrogate_select.toml``, validation rows, 6 seeds x 3
    sparsities): ``shift`` ends at the constant classifier in 16 of 18 runs (``bound``: 1 of 18), since
    ``|U_a - U|`` is 0 when every hinge is 0; the ``L`` term of the bound is what holds a run off it. Kept as
    an option, not a default.
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
        elif spec.proxy == "shift":
            term = jnp.abs(up_g - up_all)
        else:
            term = jnp.maximum(up_g - lo_all, up_all - lo_g)
        out.append(jnp.where(n_g > 0, term, 0.0))
    return jnp.concatenate(out) - 0.5 * spec.tau


Forward = Callable[[Any], tuple[jax.Array, Any]]


def objective_grads(spec: Fairness, forward: Forward, z: Any, batch: dict, fair_extra: FairState, *,
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
            return constrained.lagrangian(ce, violation(fair, logits), fair_extra.dual), (ce, fair, logits,
                                                                                              new_ms)
        (loss, (ce, fair, logits, new_ms)), grads = jax.value_and_grad(lag, has_aux=True)(z)
        return grads, fair_extra, {"loss": loss, "ce": ce, "fair": fair, "logits": logits, "model_state": new_ms}

    def problem(zz):
        ce, fair, logits, new_ms = terms(zz)
        v, side = row_values(spec, logits, y)
        if per_group:
            est = ema_update(spec, fair_extra.ema, v, side * spec.num_groups + g, w)
            strict, observed = per_group_strict(spec, est)
        else:
            est = constrained.buffer_update(fair_extra.buffer, v, side * spec.num_groups + g, w)
            strict, observed = strict_violation(spec, est)
        return ce, violation(fair, logits), strict, observed, (fair, logits, new_ms, est)

    grads, new_dual, info = constrained.constrained_grads(problem, z, spec.dual, fair_extra.dual,
                                                          spec.dual_order)
    fair, logits, new_ms, est = info.aux
    worst = jnp.max(jnp.where(info.observed, info.strict_violation, -jnp.inf))
    new_fair = FairState(dual=new_dual, ema=est) if per_group else FairState(dual=new_dual, buffer=est)
    return grads, new_fair, {
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


def make_fair_step(fm, spec: Fairness, tx: optax.GradientTransformation, *,
                   augment: Callable | None = None) -> Callable:
    """Jitted masked training step with the fairness objective; the mask is fixed.

    ``state.extra.fair`` and ``state.dual`` from :func:`fairness_init` (:func:`split_dual`);
    ``state.masks`` may be
    ``None`` (dense fair training). Pruned weights stay exactly zero
    (:func:`fairprune_jax.training.train.apply_gradients`).
    """

    def objective(forward, state: TrainState, batch: dict) -> StepOutput:
        grads, fair_extra, aux = objective_grads(spec, forward, state.params, batch, fair_of(state),
                                                 update_dual=True)
        fair_rest, new_dual = split_dual(fair_extra)
        return StepOutput(aux["loss"], aux["logits"], aux["model_state"], grads=grads,
                          extra=carry_of(state).replace(fair=fair_rest), stats=_stats(aux), dual=new_dual)

    return make_step(fm, tx, objective, augment=augment)


def split_fairness(fm, spec: Fairness, params: Any, masks: Any, model_state: Any, split, batch_size: int = 512
                   ) -> dict[str, float]:
    """The surrogate and the strict metric gap on a whole split (one gap over all rows)."""
    logits = split_logits(fm, params, masks, model_state, split, batch_size)
    logits_j, y, g = jnp.asarray(logits), jnp.asarray(split.y), jnp.asarray(split.g)
    w = jnp.ones(len(split), jnp.float32)
    sur = float(spec.fn()(logits_j, y, g, w, spec.num_groups, spec.positive_label))
    return {"surrogate": sur, "metric_gap": metric_gap(spec, logits, split)}


def metric_gap(spec: Fairness, logits: Any, split) -> float:
    """The strict (hard) metric gap of ``logits`` on the rows of ``split``: per side (equalized odds: the rows
    with y = positive and the others), the spec's reduction of the groups' rates (predicted positive for DP / EO,
    error for AP); the worst side."""
    logits_j, y, g = jnp.asarray(logits), jnp.asarray(split.y), jnp.asarray(split.g)
    w = jnp.ones(len(split), jnp.float32)
    v, side = row_values(dataclasses.replace(spec, strict="metric"), logits_j, y)
    gaps = []
    for s in range(spec.sides):
        means, n, overall = surrogates.group_means(v, g, w * (side == s), spec.num_groups)
        gaps.append(float(surrogates.gap(means, n, overall, spec.reduce)))
    return max(gaps)
