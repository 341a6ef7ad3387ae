"""Pruning as an optax transformation: drop it into any training loop.

::

    pruner = pruning.Pruner(sparsity=0.9, schedule=pruning.cubic(end=1000, frequency=100))
    tx = pruner.wrap_optax(optax.adam(1e-3))         # any optax optimizer, or a whole chain
    # ... the usual loop: updates, opt_state = tx.update(grads, opt_state, params); apply_updates

The masks, the step count and the current target sparsity live in the
optimizer state (:class:`PrunerState`), so the loop needs no other change and
everything stays one jittable pytree. The schedule is a static list of
``(step, sparsity)`` points; on the update whose count is one of them the
masks are recomputed inside ``lax.cond`` (no host round-trip, static shapes):
scores are ranked with :func:`masks.topk_mask` against keep counts taken from
a table built on the host with :func:`masks.keep_counts` (exact integers for
every point, whatever the distribution: uniform, global, ERK). A weight pruned
once never returns (gradual schedules rank the pruned entries last).

Pruned weights stay exactly zero without any extra call: the wrapped update
zeroes the incoming gradient of pruned weights (optimizer moments never build
up for them), runs the inner optimizer and returns ``-params`` where the mask
is 0, so ``optax.apply_updates`` gives exactly ``0`` there and exactly
``params + update`` elsewhere. That holds when the wrapper's output is what is
added to the params: put it last in a chain (``optax.chain(clip, pruner.wrap_optax(adam))``).

Scores: ``magnitude`` |w|, ``random``, ``saliency`` |w * g| (``g``: the
update the wrapper receives, i.e. the gradient after whatever precedes it in
the chain) and ``structured`` (L1 norm of each output unit: one mask entry per
unit, broadcast over the kernel's last axis; the unit's bias is not masked).
Everything here reuses :mod:`masks`, :mod:`scores` and :mod:`schedules`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.sparsity import masks as masks_lib
from fairprune_jax.sparsity import schedules
from fairprune_jax.sparsity import scores as scores_lib
from fairprune_jax.core.config import DISTRIBUTIONS
from fairprune_jax.core.notices import warn
from fairprune_jax.sparsity.masks import _is_none

__all__ = ["PrunerState", "Pruner", "one_shot", "cubic", "iterative", "rounds", "find_state", "SCORES", "MaskState",
           "masked_update", "keep_pruned", "find_masks", "with_masks", "masked_step"]

Params = Any
# score(params, grads, key, template) -> scores mirroring the template (None where not pruned)
ScoreFn = Callable[[Params, Params, jax.Array, Any], Params]


class PrunerState(NamedTuple):
    """What the pruner keeps in the optimizer state.

    ``masks``: 0/1 pytree mirroring the params (``None`` on leaves that are
    not pruned; one vector per output unit when structured). ``count``: updates
    done so far (the schedule position). ``sparsity``: the target reached at
    the last mask update (0 before the first). ``key``: PRNG key of the
    ``random`` score. ``inner``: the wrapped optimizer's state.
    """

    masks: Any
    count: jax.Array
    sparsity: jax.Array
    key: jax.Array
    inner: optax.OptState


# ---------------------------------------------------------------------------
# Schedules: static lists of (step, sparsity)
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Schedule:
    """When the masks change: ``points(final_sparsity) -> [(step, sparsity)]`` (steps ascending)."""

    fn: Callable[[float], list[tuple[int, float]]]
    name: str

    def points(self, final_sparsity: float) -> list[tuple[int, float]]:
        masks_lib.check_sparsity(final_sparsity)
        if final_sparsity == 0.0:
            return []
        pts = [(int(t), float(s)) for t, s in self.fn(float(final_sparsity))]
        steps = [t for t, _ in pts]
        if steps != sorted(set(steps)) or (steps and steps[0] < 0):
            raise ValueError(f"{self.name} schedule: steps must be distinct, ascending and >= 0; got {steps}")
        return pts


def one_shot(step: int = 0) -> Schedule:
    """Prune straight to the target on update ``step`` (default: the first)."""
    return Schedule(lambda s: [(int(step), s) for s in schedules.one_shot(s)], "one_shot")


def cubic(end: int, *, begin: int = 0, frequency: int = 100, initial_sparsity: float = 0.0) -> Schedule:
    """Gradual pruning on the cubic schedule of Zhu & Gupta (:func:`schedules.cubic_steps`).

    The masks change every ``frequency`` updates from ``begin + frequency``
    and reach the target on update ``end``.
    """
    if end <= begin:
        raise ValueError(f"cubic schedule: end ({end}) must be after begin ({begin})")
    if isinstance(frequency, bool) or not isinstance(frequency, (int, np.integer)) or frequency < 1:
        raise ValueError(f"cubic schedule: frequency (updates between mask changes) must be an integer >= 1; "
                         f"got {frequency!r}")
    if not 0.0 <= float(initial_sparsity) < 1.0:
        raise ValueError(f"cubic schedule: initial_sparsity must be in [0, 1); got {initial_sparsity!r}")
    return Schedule(lambda s: [(begin + t, v) for t, v in
                               schedules.cubic_steps(s, end - begin, frequency, initial_sparsity=initial_sparsity)],
                    "cubic")


def iterative(every: int, *, fraction: float = 0.2, begin: int | None = None, max_rounds: int = 0) -> Schedule:
    """Iterative rounds (lottery-ticket style): every ``every`` updates from ``begin`` (default ``every``)
    remove ``fraction`` of the remaining weights, the last round landing on the target
    (:func:`schedules.iterative_rounds`); ``max_rounds`` > 0 caps the rounds, raising the fraction
    (:func:`schedules.capped_rounds`). Rewinding the weights between rounds is the caller's business (the
    library's lth and ballot train each round from a rewound checkpoint and read the next round's masks from
    this schedule with :meth:`Pruner.masks_at`)."""
    if every < 1:
        raise ValueError(f"iterative schedule: every must be >= 1, got {every}")
    start = every if begin is None else int(begin)
    return Schedule(lambda s: [(start + i * every, v) for i, v in
                               enumerate(schedules.capped_rounds(s, fraction, max_rounds)[0])], "iterative")


def rounds(sparsities: Sequence[float], every: int = 1) -> Schedule:
    """Given per-round sparsities (ascending, the last the target), one round every ``every`` updates."""
    sparsities = [float(s) for s in sparsities]
    if not sparsities or any(b < a for a, b in zip(sparsities, sparsities[1:])):
        raise ValueError(f"rounds schedule: sparsities must be ascending and non-empty; got {sparsities}")

    def fn(final):
        if abs(final - sparsities[-1]) > 1e-12:
            raise ValueError(f"rounds schedule ends at {sparsities[-1]}, not at the pruner's sparsity {final}")
        return [(every * (i + 1), s) for i, s in enumerate(sparsities)]
    return Schedule(fn, "rounds")


# ---------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------

def _magnitude(params, grads, key, template):
    return scores_lib.magnitude(params, template)


def _random(params, grads, key, template):
    return scores_lib.random(key, params, template)


def _saliency(params, grads, key, template):
    return scores_lib.saliency(params, grads, template)


def _structured(params, grads, key, template):
    return scores_lib.l1_structured(params, template)


SCORES: dict[str, ScoreFn] = {"magnitude": _magnitude, "random": _random, "saliency": _saliency,
                              "structured": _structured}
STRUCTURED_SCORES = ("structured",)


class MaskState(NamedTuple):
    """Masks held in an optimizer state without a schedule: the library's methods set them between steps
    (a host-side hook, a score step) and :func:`keep_pruned` keeps the pruned weights at zero with them, by
    the same update as :meth:`Pruner.wrap_optax`. ``inner``: the wrapped optimizer's state."""

    masks: Any
    inner: optax.OptState


def masked_update(inner: optax.GradientTransformation, masks: Any, updates: Params, inner_state: Any,
                  params: Params, **extra_args) -> tuple[Params, Any]:
    """The one masked update (of :meth:`Pruner.wrap_optax` and :func:`keep_pruned`): the gradient of pruned
    weights zeroed (optimizer moments never build up for them), ``inner`` run, and ``-params`` returned where
    the mask is 0, so ``optax.apply_updates`` gives exactly 0 there and ``params + update`` elsewhere.
    Returns ``(updates, new inner state)``."""
    masks = masks_lib.aligned(masks, params)          # (masks of a pure dict in an nnx.Optimizer loop: by name)
    grads = masks_lib.apply_masks(updates, masks)
    inner_updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
    out = jax.tree.map(lambda m, u, p: u if m is None else jnp.where(m > 0, u, -p).astype(u.dtype),
                       masks, inner_updates, params, is_leaf=_is_none)
    return out, inner_state


def masked_step(tx: optax.GradientTransformation, masks: Any, inner: Any, grads: Params, params: Params
                ) -> tuple[Params, Any]:
    """One optimizer step of ``params`` under ``masks``: ``(new params, new state of tx)``. The gradient of
    pruned weights is zeroed, ``tx`` runs on its state ``inner``, and the updated params are multiplied by the
    masks (exactly 0 where pruned, exactly ``params + update`` elsewhere). The library's training steps take
    this form (:func:`fairprune_jax.training.train.apply_gradients`); an optax chain cannot multiply the params after
    ``apply_updates``, so :func:`keep_pruned` and :meth:`Pruner.wrap_optax` return ``-params`` where pruned
    instead: the same zeros, the same kept weights up to how the compiler fuses ``params + update``."""
    if masks is None:
        updates, inner = tx.update(grads, inner, params)
        return optax.apply_updates(params, updates), inner
    updates, inner = tx.update(masks_lib.apply_masks(grads, masks), inner, params)
    return masks_lib.apply_masks(optax.apply_updates(params, updates), masks), inner


def keep_pruned(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``inner`` whose state is a :class:`MaskState`: the masks it holds keep pruned weights at exactly zero
    (:func:`masked_update`); they change only when the caller puts new ones in the state
    (:func:`with_masks`). ``init`` starts with no masks (nothing pruned) until then."""

    def init_fn(params):
        return MaskState(masks=None, inner=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("keep_pruned needs the params: call tx.update(grads, opt_state, params)")
        if state.masks is None:
            new, inner_state = inner.update(updates, state.inner, params, **extra_args)
        else:
            new, inner_state = masked_update(inner, state.masks, updates, state.inner, params, **extra_args)
        return new, MaskState(masks=state.masks, inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _mask_holders(opt_state: Any) -> list:
    return [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, (PrunerState, MaskState)))
            if isinstance(x, (PrunerState, MaskState))]


def find_masks(opt_state: Any) -> Any:
    """The masks inside an optimizer state (a :class:`PrunerState` or :class:`MaskState`, at any depth);
    None when it holds none (a dense model's optimizer)."""
    found = _mask_holders(opt_state)
    if len(found) > 1:
        raise ValueError(f"expected at most one PrunerState or MaskState in the optimizer state, found {len(found)}")
    return found[0].masks if found else None


def with_masks(opt_state: Any, masks: Any) -> Any:
    """``opt_state`` with its masks replaced by ``masks``; a state that holds none is wrapped in a
    :class:`MaskState` (and ``masks=None`` unwraps a :class:`MaskState` again)."""
    if not _mask_holders(opt_state):
        return opt_state if masks is None else MaskState(masks=masks, inner=opt_state)
    if isinstance(opt_state, MaskState) and masks is None:
        return opt_state.inner
    return jax.tree.map(lambda x: x._replace(masks=masks) if isinstance(x, (PrunerState, MaskState)) else x,
                        opt_state, is_leaf=lambda x: isinstance(x, (PrunerState, MaskState)))


def _check_score_shapes(scores: Any, masks: Any) -> None:
    """A score function's leaves must have their masks' shapes (one per unit for structured masks), named
    otherwise at trace time instead of a ``lax.cond`` type error."""
    sc = dict(masks_lib.named_leaves(scores))
    for name, m in masks_lib.named_leaves(masks):
        if name in sc and tuple(np.shape(sc[name])) != tuple(np.shape(m)):
            raise ValueError(f"the score of {name} has shape {tuple(np.shape(sc[name]))}, its mask "
                             f"{tuple(np.shape(m))}: a structured Pruner needs one score per output unit "
                             "(score='structured'), an unstructured one a score per weight")


def find_state(opt_state: Any) -> PrunerState:
    """The :class:`PrunerState` inside an optimizer state (e.g. in an ``optax.chain``)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PrunerState))
             if isinstance(x, PrunerState)]
    if len(found) != 1:
        raise ValueError(f"expected one PrunerState in the optimizer state, found {len(found)}; "
                         "was the optimizer built with Pruner.wrap_optax?")
    return found[0]


# ---------------------------------------------------------------------------
# The pruner
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pruner:
    """A pruning recipe; :meth:`wrap_optax` turns any optax optimizer into a pruning one.

    Args:
      sparsity: final fraction of prunable weights (units, when structured) removed, in [0, 1).
      schedule: :func:`one_shot` (default), :func:`cubic` or :func:`iterative`.
      score: ``"magnitude"``, ``"random"``, ``"saliency"``, ``"structured"`` or a function
        ``(params, grads, key, template) -> scores``.
      distribution: ``"uniform"`` (every layer at the target), ``"global"`` (one ranking over all
        layers) or ``"erk"`` (Erdos-Renyi-Kernel densities); :func:`masks.keep_counts`.
      template: which leaves are pruned: a pytree of ``True`` / ``None`` mirroring the params, a
        function ``params -> template``, or ``None`` for :func:`masks.prunable_template` (every
        kernel; biases, norms and embeddings stay dense).
      structured: one mask entry per output unit (implied by ``score="structured"``).
      seed: PRNG seed of the ``random`` score.
    """

    sparsity: float
    schedule: Schedule = dataclasses.field(default_factory=one_shot)
    score: str | ScoreFn = "magnitude"
    distribution: str = "uniform"
    template: Any = None
    structured: bool = False
    seed: int = 0

    def __post_init__(self):
        masks_lib.check_sparsity(self.sparsity)
        object.__setattr__(self, "sparsity", float(self.sparsity))      # (a NumPy / JAX scalar read as a float)
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown sparsity distribution {self.distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")
        if isinstance(self.score, str) and self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; valid: {', '.join(SCORES)} or a function")
        if not isinstance(self.schedule, Schedule):
            raise TypeError("schedule must be pruning.one_shot(...), cubic(...) or iterative(...)")
        if masks_lib.nm_pattern(self.distribution) is not None:
            masks_lib.check_nm(self.sparsity, self.distribution, structured=self.is_structured)
        self.schedule.points(self.sparsity)          # bad schedule arguments fail here, not in the loop

    @property
    def is_structured(self) -> bool:
        return self.structured or self.score in STRUCTURED_SCORES

    def points(self) -> list[tuple[int, float]]:
        """The ``(step, sparsity)`` points at which the masks change."""
        return self.schedule.points(self.sparsity)

    def _template(self, params: Params) -> Any:
        """The template in the params' structure (``True`` on pruned leaves, ``None`` elsewhere; a template
        written with ``False`` leaves, or by name for other containers, read as such)."""
        if self.template is None:
            return masks_lib.prunable_template(params)
        t = masks_lib.aligned(self.template(params) if callable(self.template) else self.template, params,
                              "the template")
        return jax.tree.map(lambda x: None if masks_lib.dense_leaf(x) else True, t, is_leaf=_is_none)

    def _score_fn(self) -> ScoreFn:
        """The score function; with ``structured=True`` a built-in per-weight score is summed over each output
        unit's weights (magnitude: the unit's L1 norm, as ``'structured'``; saliency: its sum of ``|w * g|``;
        random: a random order of the units)."""
        if not isinstance(self.score, str):
            return self.score
        fn = SCORES[self.score]
        if not self.is_structured or self.score in STRUCTURED_SCORES:
            return fn

        def per_unit(params, grads, key, template):
            return jax.tree.map(lambda s: None if s is None else s.reshape(-1, s.shape[-1]).sum(axis=0),
                                fn(params, grads, key, template), is_leaf=_is_none)
        return per_unit

    def init_masks(self, params: Params) -> Any:
        """All-ones (dense) masks for the prunable leaves."""
        template = self._template(params)
        if self.is_structured:
            heads = [n for n, p in masks_lib.named_leaves(masks_lib._prune_like(params, template))
                     if np.ndim(p) == 3 and n.rsplit("/", 2)[-2:-1] in (["query"], ["key"], ["value"])]
            if heads:
                raise ValueError(
                    f"structured masks remove each kernel's last axis; {', '.join(heads[:3])} "
                    f"{'are' if len(heads) > 1 else 'is'} an attention projection (in, heads, head_dim) whose last "
                    "axis is a head's dims, chosen apart for query and key: keep them dense (template=) or prune "
                    "whole heads with fairprune_jax.prune(), which traces them")
        return masks_lib.ones_like_template(params, template, structured=self.is_structured)

    def _count_table(self, params: Params, template: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Steps (P,) and, per leaf name (or ``'*'`` for global), the keep count at each point (P,)."""
        pts = self.points()
        steps = np.asarray([t for t, _ in pts], np.int32)
        rows = [masks_lib.keep_counts(params, template, s, self.distribution, structured=self.is_structured)
                for _, s in pts]
        names = rows[0].keys() if rows else []
        return steps, {n: np.asarray([r[n] for r in rows], np.int32) for n in names}

    def wrap_optax(self, inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        """``inner`` with pruning: masks updated on the schedule, pruned weights kept at exactly zero."""
        self._score_fn()

        def init_fn(params):
            return PrunerState(masks=self.init_masks(params), count=jnp.zeros((), jnp.int32),
                               sparsity=jnp.zeros((), jnp.float32), key=jax.random.PRNGKey(self.seed),
                               inner=inner.init(params))

        def update_fn(updates, state, params=None, **extra_args):
            if params is None:
                raise ValueError("the pruner needs the params: call tx.update(grads, opt_state, params)")
            masks, sparsity = self._scheduled_masks(state, params, updates)
            out, inner_state = masked_update(inner, masks, updates, state.inner, params, **extra_args)
            return out, PrunerState(masks=masks, count=optax.safe_increment(state.count), sparsity=sparsity,
                                    key=state.key, inner=inner_state)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    wrap = wrap_optax

    def _scheduled_masks(self, state: PrunerState, params: Params, grads: Params | None) -> tuple[Any, jax.Array]:
        """``(masks, sparsity)`` for update number ``state.count``: recomputed under ``lax.cond`` when the
        count is a schedule point, else the state's own. Idempotent: on masks already updated for this
        count the same masks come back (exactly k live entries, the pruned ones ranked last)."""
        pts = self.points()
        if not pts:
            return state.masks, state.sparsity
        if grads is None and self.score == "saliency":
            raise ValueError("the saliency score needs the gradients: pass grads to pre_update")
        held = masks_lib.aligned(state.masks, params)   # the state's masks in the params' structure (by name when
        #                                                 the optimizer was built on another container)
        template = jax.tree.map(lambda m: None if m is None else True, held, is_leaf=_is_none)
        steps, table = self._count_table(params, template)
        sparsities = jnp.asarray([s for _, s in pts], jnp.float32)
        idx = jnp.clip(jnp.searchsorted(jnp.asarray(steps), state.count), 0, len(steps) - 1)
        hit = jnp.asarray(steps)[idx] == state.count

        def recompute(_):
            sc = self._score_fn()(params, grads, jax.random.fold_in(state.key, state.count), template)
            _check_score_shapes(sc, held)
            counts = {n: jnp.asarray(c)[idx] for n, c in table.items()}
            new = masks_lib.masks_from_counts(sc, counts, prev_masks=held, distribution=self.distribution)
            new = jax.tree.map(lambda n, o: None if o is None else n.astype(o.dtype), new, held, is_leaf=_is_none)
            return masks_lib.aligned(new, state.masks), sparsities[idx]

        return jax.lax.cond(hit, recompute, lambda _: (state.masks, state.sparsity), None)

    def masks_at(self, params: Params, point: int, prev_masks: Any = None, grads: Params | None = None) -> Any:
        """The masks of schedule point ``point`` (an index into :meth:`points`) from ``params`` (and ``grads``
        for the saliency score), entries pruned in ``prev_masks`` staying pruned: what the wrapped optimizer
        computes at that point, for a caller that steps the schedule itself (iterative rounds with rewinding)."""
        step, target = self.points()[point]
        template = self._template(params)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
        scores = masks_lib._prune_like(self._score_fn()(params, grads, key, template), template)
        counts = masks_lib.keep_counts(params, template, target, self.distribution, structured=self.is_structured)
        return masks_lib.masks_from_counts(scores, counts, prev_masks=prev_masks, distribution=self.distribution)

    def pre_update(self, params: Params, opt_state: Any, grads: Params | None = None) -> tuple[Params, Any]:
        """Optional, before the forward pass: apply this step's scheduled mask update now, so the step's
        gradient is taken on the pruned model (what a host-side mask hook before the step does, e.g.
        :func:`fairprune_jax.techniques.gradual.pruned_start`). Returns ``(masked params, opt_state)``; the
        wrapped update of the same step then finds the masks already in place. Jittable."""
        from flax import nnx
        is_var = lambda v: isinstance(v, nnx.Variable)      # noqa: E731

        def fix(x):
            if not isinstance(x, PrunerState):
                return x
            # an nnx.Optimizer's opt_state holds each field as a Variable (OptArray): computed on the values,
            # returned in the same Variables
            pure = jax.tree.map(lambda v: v.get_value() if is_var(v) else v, x, is_leaf=is_var)
            masks, sparsity = self._scheduled_masks(pure, params, grads)
            new = pure._replace(masks=masks, sparsity=sparsity)
            return jax.tree.map(lambda old, n: old.replace(value=n) if is_var(old) else n, x, new, is_leaf=is_var)

        opt_state = jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(x, PrunerState))
        return masks_lib.apply_masks(params, find_state(opt_state).masks), opt_state

    @staticmethod
    def masks(opt_state: Any) -> Any:
        """The current masks inside ``opt_state``."""
        return find_state(opt_state).masks

    @staticmethod
    def apply_masks(params: Params, opt_state: Any) -> Params:
        """``params * mask`` with the masks inside ``opt_state`` (the updates already keep pruned
        weights at zero; this is for params changed outside the optimizer, or for export). Leaves are matched
        by name, so ``params`` may be another container of the same weights than the one the optimizer was
        built on (an ``nnx.State``, an ``nnx.Optimizer``'s, a pure dict; a ``multi_transform`` branch's)."""
        masks = dict(masks_lib.named_leaves(find_state(opt_state).masks))
        return masks_lib.map_named(lambda n, p: p if masks.get(n) is None else p * masks[n].astype(p.dtype),
                                   params)

    @staticmethod
    def summary(params: Params, opt_state: Any) -> dict:
        """Per-layer and overall sparsity of the current masks (:func:`masks.sparsity_summary`), and
        ``pruned_nonzero``: the entries the masks prune whose weight in ``params`` is not zero, with a warning
        when there are any (the wrapper not last in the chain: ``chain(wrap(scale_by_adam()), scale(-lr))``
        rescales the update that zeroes them), since the sparsity above is then the masks', not the model's."""
        masks = find_state(opt_state).masks
        out = masks_lib.sparsity_summary(params, masks)
        by_name = dict(masks_lib.named_leaves(masks))
        bad = 0
        for name, p in masks_lib.named_leaves(params):
            m = by_name.get(name)
            if m is not None:
                bad += int(np.sum((np.broadcast_to(np.asarray(m), np.shape(p)) == 0) & (np.asarray(p) != 0)))
        out["pruned_nonzero"] = bad
        if bad:
            warn(f"{bad} weight(s) that the masks prune are not zero in these params, so the model is less sparse "
                 f"than the summary's {out['sparsity_prunable']:.3f}: put the pruner's wrapper last in the optax "
                 f"chain (wrap_optax(optax.adam(lr)), not chain(wrap_optax(scale_by_adam()), scale(-lr))), or "
                 f"call Pruner.apply_masks(params, opt_state)")
        return out


def sparsity_of(params: Params, template: Any) -> float:
    """Fraction of exact zeros over the template's leaves (a check that pruned weights stay zero)."""
    leaves = [np.asarray(p) for _, p in masks_lib.named_leaves(masks_lib._prune_like(params, template))]
    return float(sum((x == 0).sum() for x in leaves) / max(sum(x.size for x in leaves), 1))


__all__ += ["Schedule", "sparsity_of"]
