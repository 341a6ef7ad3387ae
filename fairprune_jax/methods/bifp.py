"""BiFP (Dai et al. 2023): fairness-aware bi-level pruning, and its structured baselines.

* ``bifp``: mask scores (upper level) and weights (lower level) trained
  jointly with BiP's first-order implicit gradient (:mod:`fairprune_jax.techniques.bilevel`),
  the fairness surrogate as a constraint ``F <= tau`` (default) or a fixed
  penalty ``lam * F`` in both levels; structured (output neurons / conv
  channels, default) or unstructured (``structured=False``). Optional
  ``retrain_epochs`` of fairness-aware fine-tuning with the final mask fixed.
* ``structured_magnitude``: L1 norm of each filter / neuron (Li et al. 2017),
  one shot to the target, then cross-entropy fine-tuning.
* ``prune_then_fair``: the same structured magnitude mask, then fine-tuning
  with the fairness penalty / constraint.
* ``fair_then_prune``: fairness-aware training of the dense model
  (``fair_epochs``), then structured magnitude pruning and cross-entropy
  fine-tuning.

Structured masks remove a unit's kernel column AND its bias / BatchNorm
scale and offset (:mod:`fairprune_jax.sparsity.compact`), so a pruned unit outputs
exactly zero and :func:`fairprune_jax.sparsity.compact.compact` turns the result into
a smaller model with identical outputs. Only layers with removable units are
pruned (never the classifier head; in a ResNet only the inner channels of
each block); ``--exclude-first`` keeps the first layer dense. Scores are the
per-layer-normalised L1 norms, so ``--distribution global`` compares layers
on a common scale; ``uniform`` (default) keeps ``round((1 - s) * units)``
(at least one) units in every pruned layer.

Scores start at the per-layer-normalised magnitude, are not clipped, and
move with SGD + momentum (``mask_lr``, ``mask_momentum``); the structured
mask's gradient is read at the consumer rows (``mask_grad="consumer"``), so
a pruned unit can come back (see :mod:`fairprune_jax.techniques.bilevel`). The mask lr
decays (cosine) to 0 after ``search_fraction`` (0.75) of the bi-level steps,
so the last steps train the weights of the final mask: without it, on Adult
a third of the kept units were still swapping at the last step and were
returned with stale weights (``search_fraction=0``: a constant mask lr).
``info["units_swapped_vs_magnitude"]`` counts the kept units that are not in
the structured-magnitude mask of the same sparsity (``units_kept`` is the
total kept), and in constraint mode ``info["multiplier_history"]`` holds the
multipliers at the start of every epoch and at the end.

The weights are trained with the run's fine-tuning optimizer, learning rate
and schedule (``weight_optimizer="finetune"``, the same as every baseline's
fine-tuning) for ``epochs`` (default: the run's ``finetune_epochs``, the
baselines' budget); ``weight_optimizer="sgd"|"adam"`` with ``weight_lr``
keeps the earlier separate optimizer.

Fairness options shared by all four (where they apply): ``fairness`` (a
surrogate name from :mod:`fairprune_jax.constraints.surrogates`, or ``auto``, the
default: ``eo_hinge`` for a two-class target (``eo`` for fair_then_prune; :data:`BINARY_AUTO_HINGE` says
why), ``ap`` -- accuracy parity, for
multi-class data such as digits where the groups are the classes),
``fairness_mode`` (``constraint`` | ``penalty`` | ``none``), ``constraint``
(``per_group`` | ``max_gap``), ``lam``, ``tau``, ``strict_decay``,
``min_rows``, ``multiplier_max``, ``one_sided``, ``strict`` / ``buffer_size`` / ``reduce``
(``max_gap`` only) and the dual-optimizer options (``dual_lr``,
``dual_optimizer``, ``order``, ``augmented``, ``nupi_kp``, ``nupi_nu``). ``collapse_guard`` (on by default):
a constrained or penalised phase that ends at a constant classifier (one class for 98% or more of the training
rows, which meets any parity bound) returns, of its epochs that were not, the one with the smallest hard parity
gap on training rows, with a warning and
``info["collapse_guard"]`` (:mod:`fairprune_jax.techniques.collapse_guard`); with ``guard_unmet`` (on by
default) so does a phase whose two-sided constraint ends above twice tau there: the most accurate epoch within
twice tau (else the smallest-gap one) is returned, with a warning.
``one_sided`` and ``multiplier_max`` default to ``auto``: for ``dp`` / ``eo``
a two-sided bound ``|r_a - r| <= tau/2`` with multipliers capped at 5; for
``ap`` a one-sided bound ``r_a - r <= tau/2`` (no class's error more than
``tau/2`` above the overall; the better classes are not pushed down) with
multipliers capped at ``1 / groups`` (a class's weight at most doubles; see
:func:`multiplier_cap`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import optax

from fairprune_jax.techniques import bilevel
from fairprune_jax.techniques.collapse_guard import CollapseGuard
from fairprune_jax.techniques.fair_phase import (UNMET_FACTOR, fair_info as _fair_info,  # noqa: F401  (re-exported)
                                                fair_state as _fair_state, kept_units, l1_structured_masks,
                                                multiplier_recorder, structured_setup)
from fairprune_jax.constraints import constrained
from fairprune_jax.sparsity.masks import apply_masks, named_leaves
from fairprune_jax.methods.base import Context, DefaultChange, NoOptions, make_optimizer, register
from fairprune_jax.training.train import Carry, TrainState, carry_of, create_state, fit

@dataclasses.dataclass(frozen=True)
class FairOptions(constrained.DualOptions):
    """The fairness objective's options, shared by bifp, prune_then_fair and fair_then_prune (the dual step's
    with ``dual_lr`` 0.1)."""

    fairness: str = "auto"                  # a surrogates name; auto: BINARY_AUTO for two classes, else ap
    fairness_mode: str = "constraint"       # bilevel.FAIRNESS_MODES
    constraint: str = "per_group"           # per_group | max_gap
    lam: float = 1.0
    tau: float = 0.05
    strict_decay: float = 0.99
    min_rows: float = 200.0
    multiplier_max: float | str = "auto"    # a number, or auto (multiplier_cap)
    one_sided: bool | str = "auto"          # true, false, or auto (one_sided)
    strict: str = "metric"
    buffer_size: int = 40
    reduce: str = "max_gap"
    dual_lr: float | str = "auto"           # a number, or auto (fair_dual_lr: 0.1 for runs of up to 500 steps)
    collapse_guard: bool = True             # never return a constant classifier (techniques.collapse_guard)
    guard_unmet: bool = True                # with the guard: a two-sided constraint ending above 2 tau on the
                                            # training rows returns the most accurate epoch within 2 tau
    proxy: str = "bound"                    # bilevel.PROXIES: the primal term of a two-sided constraint

    #: fairness=auto for a two-class target (a class attribute, not an option): the soft selection rates
    #: (``eo``) for fair_then_prune; the hinge bound of the hard rates (``eo_hinge``) for bifp and prune_then_fair
    #: (:data:`BINARY_AUTO_HINGE`)
    BINARY_AUTO = "eo"


#: Why bifp and prune_then_fair constrain ``eo_hinge`` on a two-class target: with ``eo`` (the soft rates
#: ``|P_a - P|``) their primal step met the surrogate on the training rows (0.03-0.06 <= tau = 0.05) while the hard
#: TPR / FPR gap it stands for stayed at 0.06-0.20 there (Adult sex, CLI defaults); ``eo_hinge`` bounds the hard
#: rates from above and brought that gap to 0.04-0.05, but ended at the constant classifier in 1 of 9 cells each
#: (bifp on validation, prune_then_fair on the full training set) before the collapse guard. Chosen on validation
#: rows with the guard on (``experiments/bifp_adult_eo_select.toml``: lowest mean validation EO among entries with
#: every cell within 3 points of structured magnitude's validation accuracy): bifp 0.0561 (``eo``: 0.0670, 0.6
#: points less accurate), prune_then_fair 0.0636 (``eo``: 0.0736); structured magnitude 0.0838.
BINARY_AUTO_HINGE = "eo_hinge"


def _two_classes(cell: dict) -> bool:
    return (cell.get("positive_class") or {}).get("num_classes", len(cell.get("classes") or ())) == 2


def _phase_gaps(info: dict) -> list[float]:
    """The hard parity gaps on the training rows at the end of a result's constrained phases (fair_then_prune:
    of its dense fair phase), from its ``method_info``."""
    gaps = [((info.get("dense_fair") or {}).get("train_fairness") or {}).get("metric_gap"),
            (info.get("train_fairness") or {}).get("metric_gap")]
    return [g for g in gaps if g is not None]


def _ended_constant(cell: dict) -> bool:
    """Whether a result's constrained phase may have ended at a constant classifier (where the guard acts): the
    model flagged degenerate, or a parity gap of exactly 0 on the training rows (what one class for every row
    gives) at the end of the phase (fair_then_prune: of its dense fair phase)."""
    info = cell.get("method_info") or {}
    gaps = _phase_gaps(info)
    degenerate = ((cell.get("pruned") or {}).get("test") or {}).get("degenerate")
    return bool(degenerate) or any(g == 0.0 for g in gaps)


#: What changed in the sixteenth session, for the results made before it (DefaultChange)
GUARD = DefaultChange(1, "collapse_guard", "new, on by default: a phase that ends at a constant classifier returns "
                      "an earlier epoch", _ended_constant)

def _ended_unmet(cell: dict) -> bool:
    """Whether a result's constrained phase ended with its two-sided constraint's hard training gap above
    ``UNMET_FACTOR`` tau with the collapse guard on (where ``guard_unmet`` acts)."""
    info = cell.get("method_info") or {}
    opts = info.get("options") or {}
    if opts.get("collapse_guard") is False or opts.get("fairness_mode", "constraint") != "constraint":
        return False
    side = opts.get("one_sided", "auto")
    if side is True or (side in ("auto", None) and str(info.get("fairness", opts.get("fairness", ""))).startswith("ap")):
        return False                                 # a one-sided bound (accuracy parity): not guarded
    tau = opts.get("tau")
    return tau is not None and any(g > UNMET_FACTOR * float(tau) for g in _phase_gaps(info))


#: What changed in the seventeenth session (DefaultChange revision 2)
UNMET = DefaultChange(2, "guard_unmet", "new, on by default: a phase whose two-sided constraint ends above twice "
                      "tau on the training rows returns its most accurate epoch within twice tau", _ended_unmet)
HINGE_AND_GUARD = (DefaultChange(1, "fairness", "fairness=auto is eo_hinge, not eo, on a two-class target",
                                 _two_classes), GUARD, UNMET)


@dataclasses.dataclass(frozen=True)
class PruneThenFairOptions(FairOptions):
    """prune_then_fair's options: the family's, with ``fairness=auto`` on two classes = ``eo_hinge``."""

    BINARY_AUTO = BINARY_AUTO_HINGE


@dataclasses.dataclass(frozen=True)
class BifpOptions(FairOptions):
    BINARY_AUTO = BINARY_AUTO_HINGE         # fairness=auto on two classes (see BINARY_AUTO_HINGE)
    structured: bool = True
    gamma: float = 1.0
    mask_lr: float = 0.1
    mask_momentum: float = 0.9
    mask_grad: str = "consumer"             # bilevel.MASK_GRADS
    search_fraction: float = 0.75
    weight_optimizer: str = "finetune"      # finetune | sgd | adam
    weight_lr: float = 0.01
    lower_steps: int = 1
    epochs: int = -1                        # -1: the run's fine-tuning epochs
    retrain_epochs: int = 0
    score_clip: bool = False


@dataclasses.dataclass(frozen=True)
class FairThenPruneOptions(FairOptions):
    fair_epochs: int = -1                   # -1: the run's fine-tuning epochs


def multiplier_cap(opts: FairOptions, surrogate: str, num_groups: int) -> float:
    """``multiplier_max`` with ``auto`` resolved: 5 for ``dp`` / ``eo``, ``1 / num_groups`` for ``ap``.

    An ``ap`` constraint's primal term is ``lam_a * (CE_a - CE)``, a mean over the group's rows, so with G
    groups of about equal size (the classes of a balanced dataset) a multiplier ``lam_a`` weighs each of the
    group's rows ``1 + G * lam_a`` times as much as the cross-entropy does: at ``1 / G`` a group's weight at most
    doubles. With the cap of 5 a class could weigh 51x; on digits at 90% structured sparsity the infeasible
    per-class constraints then drove the multipliers to the cap in turn and cost 6-7 points of accuracy. The
    ``dp`` / ``eo`` terms are differences of rates in [0, 1] and keep the cap of 5 (their multipliers stay
    below 2 on Adult and UTKFace).
    """
    if not isinstance(opts.multiplier_max, str):
        return opts.multiplier_max
    if opts.multiplier_max.strip().lower() == "auto":
        return 1.0 / max(int(num_groups), 1) if surrogate.startswith("ap") else 5.0
    raise ValueError(f"multiplier_max must be a number or auto; got {opts.multiplier_max!r}")


def surrogate_name(ctx: Context, opts: FairOptions) -> str:
    """``fairness`` with ``auto`` resolved: the options' ``BINARY_AUTO`` for a two-class target (``eo_hinge`` for
    bifp and prune_then_fair, ``eo`` for fair_then_prune), else ``ap``."""
    name = opts.fairness
    if name == "auto":
        return opts.BINARY_AUTO if ctx.dataset.num_classes == 2 else "ap"
    return name


def one_sided(opts: FairOptions, surrogate: str) -> bool:
    """``one_sided`` with ``auto`` resolved: true for accuracy parity (``ap``), false for ``dp`` / ``eo``."""
    if isinstance(opts.one_sided, bool):
        return opts.one_sided
    if opts.one_sided.strip().lower() == "auto":
        return surrogate.startswith("ap")
    raise ValueError(f"one_sided must be auto, true or false; got {opts.one_sided!r}")


#: dual_lr=auto of the bifp family: DUAL_LR_FAIR for a constrained phase of up to DUAL_STEPS_REF steps, and
#: DUAL_LR_FAIR * DUAL_STEPS_REF / steps for a longer one, so the multipliers can move as far over a run of any
#: length. 0.1 was chosen (issue 12) on runs of 210-468 steps (batch 256 on Adult, 64 on digits); the CLI
#: default on Adult (batch 64, 10 epochs: 4710 steps) at 0.1 drove the multipliers to their cap of 5 within three
#: epochs and bifp and prune_then_fair to the constant classifier (test accuracy 0.756 / 0.757 against 0.850
#: dense, 99.8% / 99.6% one class). At 0.0106 (auto there): 0.844 / 0.845 with test EO 0.060 / 0.063 against
#: the dense model's 0.083; at 0.021 both still collapsed (measured on seed 0, chosen on that run's training
#: accuracy collapse, which the test split only confirmed).
DUAL_LR_FAIR, DUAL_STEPS_REF = 0.1, 500


def fair_dual_lr(opts: FairOptions, steps: int) -> float:
    """``dual_lr`` with ``auto`` resolved for a constrained phase of ``steps`` steps (a number is kept)."""
    if not isinstance(opts.dual_lr, str):
        return float(opts.dual_lr)
    return DUAL_LR_FAIR * min(1.0, DUAL_STEPS_REF / max(int(steps), 1))


def fairness_spec(ctx: Context, opts: FairOptions, steps: int) -> bilevel.Fairness:
    """The fairness objective from checked method options, for a constrained phase of ``steps`` steps."""
    mode = opts.fairness_mode
    name = surrogate_name(ctx, opts)
    groups = ctx.dataset.num_groups
    k = ((2 if name.startswith("eo") else 1) * groups) if opts.constraint == "per_group" else 1
    dual = None
    if mode == "constraint":   # inequality multipliers capped at multiplier_max (<= 0: no cap)
        resolved = dataclasses.replace(opts, dual_lr=fair_dual_lr(opts, steps))
        dual = constrained.capped(constrained.dual_from_options(resolved, k, equality=False),
                                  multiplier_cap(opts, name, groups))
    return bilevel.Fairness(surrogate=name, mode=mode, num_groups=groups,
                            positive_label=ctx.settings.positive_label, lam=opts.lam, tau=opts.tau,
                            strict=opts.strict, buffer_size=opts.buffer_size, reduce=opts.reduce, dual=dual,
                            dual_order=opts.order, constraint=opts.constraint, strict_decay=opts.strict_decay,
                            min_rows=opts.min_rows, one_sided=one_sided(opts, name),
                            proxy=opts.proxy)


def collapse_guard(ctx: Context, opts: FairOptions, spec: bilevel.Fairness, dense: TrainState,
                   what: str) -> CollapseGuard | None:
    """The constant-classifier guard of a constrained (or penalised) phase (``collapse_guard``, on by default),
    referenced to the dense model: a phase that ends at one class for nearly every training row returns, of its
    epochs that did not, the one with the smallest hard parity gap on the guard's training rows
    (:mod:`techniques.collapse_guard`); with ``guard_unmet`` (on by default), a two-sided constraint that ends
    above ``UNMET_FACTOR`` tau on those rows returns the phase's most accurate epoch within it (else its
    smallest-gap epoch, when below the end's). None without a fairness term or with the option off."""
    if not opts.collapse_guard or spec.mode == "none":
        return None
    unmet = (UNMET_FACTOR * spec.tau if opts.guard_unmet and spec.mode == "constraint" and not spec.one_sided
             else None)
    return CollapseGuard(ctx.fm, ctx.dataset.train, dense, ctx.steps_per_epoch, ctx.settings.eval_batch_size,
                         what=what, gap=lambda logits, rows: bilevel.metric_gap(spec, logits, rows),
                         unmet_above=unmet)


def _check_common(opts: FairOptions) -> None:
    """Value checks shared by bifp, prune_then_fair and fair_then_prune (registered: run before data loads)."""
    if opts.fairness_mode not in bilevel.FAIRNESS_MODES:
        raise ValueError(f"unknown fairness_mode {opts.fairness_mode!r}; valid: "
                         f"{', '.join(bilevel.FAIRNESS_MODES)}")
    if opts.proxy not in bilevel.PROXIES:
        raise ValueError(f"unknown proxy {opts.proxy!r}; valid: {', '.join(bilevel.PROXIES)}")
    if opts.fairness_mode == "penalty" and opts.lam < 0:
        raise ValueError(f"lam must be >= 0; got {opts.lam}")
    if isinstance(opts.dual_lr, str) and opts.dual_lr.strip().lower() != "auto":
        raise ValueError(f"dual_lr must be a number > 0 or auto; got {opts.dual_lr!r}")
    constrained.check_dual_options(dataclasses.replace(opts, dual_lr=fair_dual_lr(opts, 1)))
    if opts.fairness_mode == "constraint" and opts.augmented and opts.dual_optimizer != "sgd":
        raise ValueError("augmented=True uses its own dual step; leave dual_optimizer=sgd")
    one_sided(opts, "ap")                   # clear errors for bad values before any training
    multiplier_cap(opts, "ap", 1)            # (a number <= 0 means no cap: constrained.capped)
    from fairprune_jax.constraints import surrogates
    from fairprune_jax.techniques.fairness_objective import CONSTRAINTS, STRICT
    for key, valid in (("reduce", surrogates.REDUCTIONS), ("strict", STRICT), ("constraint", CONSTRAINTS)):
        if getattr(opts, key) not in valid:
            raise ValueError(f"{key}={getattr(opts, key)!r} is not one of {', '.join(valid)}")
    if opts.fairness != "auto":
        try:
            surrogates.surrogate(opts.fairness, reduce=opts.reduce)
        except (ValueError, KeyError) as e:
            raise ValueError(f"fairness={opts.fairness!r}: {e} (or auto)") from None


# ---------------------------------------------------------------------------
# BiFP
# ---------------------------------------------------------------------------

def check_bifp_options(opts: BifpOptions) -> None:
    """bifp's value checks (registered: run before any data loads)."""
    _check_common(opts)
    for k in ("gamma", "mask_lr", "weight_lr"):
        if not getattr(opts, k) > 0:
            raise ValueError(f"bifp: {k} must be > 0; got {getattr(opts, k)}")
    if opts.lower_steps < 1:
        raise ValueError(f"bifp: lower_steps must be >= 1; got {opts.lower_steps}")
    if opts.retrain_epochs < 0:
        raise ValueError(f"bifp: retrain_epochs must be >= 0; got {opts.retrain_epochs}")
    if opts.weight_optimizer not in ("finetune", "sgd", "adam"):
        raise ValueError(f"bifp: weight_optimizer must be finetune, sgd or adam; got {opts.weight_optimizer!r}")
    if opts.mask_grad not in bilevel.MASK_GRADS:
        raise ValueError(f"bifp: mask_grad must be one of {', '.join(bilevel.MASK_GRADS)}; got {opts.mask_grad!r}")
    if not 0.0 <= opts.search_fraction <= 1.0:
        raise ValueError(f"bifp: search_fraction must lie in [0, 1]; got {opts.search_fraction}")
    if not 0.0 <= opts.mask_momentum < 1.0:
        raise ValueError(f"bifp: mask_momentum must lie in [0, 1); got {opts.mask_momentum}")


def _weight_tx(ctx: Context, opts: BifpOptions, epochs: int) -> optax.GradientTransformation:
    """The baselines' fine-tuning optimizer (``finetune``) or the separate ``sgd`` / ``adam`` at ``weight_lr``."""
    if opts.weight_optimizer == "finetune":
        return ctx.finetune_tx(epochs=epochs)
    return make_optimizer(opts.weight_optimizer, opts.weight_lr, ctx.settings.weight_decay,
                          total_steps=max(epochs * ctx.steps_per_epoch, 1))


@register("bifp", "BiFP (Dai et al. 2023): bi-level pruning, mask scores with BiP's implicit gradient and weights "
          "trained jointly under a fairness constraint or penalty; structured by default", BifpOptions,
          structured="structured", check=check_bifp_options, default_changes=HINGE_AND_GUARD)
def bifp(ctx: Context, dense: TrainState, opts: BifpOptions) -> tuple[TrainState, dict]:
    cfg = ctx.settings
    epochs = cfg.ft_epochs if opts.epochs < 0 else opts.epochs
    spec = fairness_spec(ctx, opts, epochs * ctx.steps_per_epoch)
    structured = opts.structured
    if structured:
        groups, template = structured_setup(ctx, dense.params, dense.model_state)
    else:
        groups, template = None, ctx.template
    counts = bilevel.unit_keep_counts(dense.params, template, cfg.sparsity, cfg.distribution, structured, groups)
    scores0, masks0 = bilevel.initial_scores_and_masks(dense.params, template, counts, groups)
    # host copy (steps donate); one value per unit (a coupled group's kernel mask may spread it, e.g. over heads)
    start_units = {n: np.asarray(v) for n, v in named_leaves(bilevel.unit_vectors(masks0, scores0, groups))}
    weight_tx = _weight_tx(ctx, opts, epochs)
    momentum = opts.mask_momentum
    # the search settles: the mask lr decays (cosine) to 0 after search_fraction of the steps, so the last steps
    # train the weights of the final mask (a unit swapped in at the very end would keep stale weights)
    # (search_fraction = 0: a constant mask lr, as before issue 12)
    frac = opts.search_fraction
    search_steps = max(int(round(frac * epochs * ctx.steps_per_epoch)), 1)
    mask_lr = optax.cosine_decay_schedule(opts.mask_lr, search_steps) if frac > 0 else opts.mask_lr
    mask_tx = optax.sgd(mask_lr, momentum=momentum if momentum > 0 else None)
    # theta starts from the dense weights, NOT masked: pruned units keep their values and may come back
    fair0, dual0 = bilevel.split_dual(bilevel.fairness_init(spec))
    state = create_state(dense.params, dense.model_state, weight_tx, seed=ctx.stream_seed("finetune_state"),
                         extra=Carry(scores=scores0, mask_opt=mask_tx.init(scores0), fair=fair0))
    state = state.replace(masks=masks0, dual=dual0) if dual0 is not None else state.replace(masks=masks0)
    step = bilevel.make_bilevel_step(ctx.fm, spec, weight_tx, mask_tx, counts, groups=groups,
                                     gamma=opts.gamma, lower_steps=opts.lower_steps,
                                     score_clip=opts.score_clip, mask_grad=opts.mask_grad,
                                     augment=ctx.augment)
    hist: dict = {}
    hook, mult_hist = multiplier_recorder(ctx, spec)
    guard = collapse_guard(ctx, opts, spec, dense, "bifp's bi-level search")
    guarded = None
    if epochs > 0:
        state, hist = fit(state, step, ctx.dataset.train, epochs=epochs, batch_size=cfg.batch_size,
                          seed=ctx.stream_seed("finetune_batches"), desc="bifp (bi-level)", progress=cfg.progress,
                          hook=guard.hook(hook) if guard else hook)
        if guard:
            state, guarded = guard.finish(state)
    final = state.masks                                   # the top-k of the final scores (or the guard's epoch)
    named_final = dict(named_leaves(bilevel.unit_vectors(final, start_units, groups)))
    changed = int(sum(np.abs(np.asarray(named_final[n]) - u).sum() for n, u in start_units.items()) // 2)
    pruned = state.replace(params=apply_masks(state.params, final), masks=final,
                           extra=Carry(fair=carry_of(state).fair))
    kept = int(sum(np.asarray(named_final[n]).sum() for n in start_units))
    info: dict[str, Any] = {"options": dataclasses.asdict(opts), "fairness": spec.surrogate, "history": hist,
                            "structured": structured,
                            "bilevel_epochs": epochs, "units_swapped_vs_magnitude": changed, "units_kept": kept,
                            "dual_lr_used": fair_dual_lr(opts, epochs * ctx.steps_per_epoch)}
    if spec.mode == "constraint":
        mult_hist.append(np.round(np.asarray(state.dual.multipliers), 4).tolist())
        info["multiplier_history"] = mult_hist
    if guarded is not None:
        info["collapse_guard"] = guarded
    if opts.retrain_epochs > 0:
        r_epochs = opts.retrain_epochs
        tx = _weight_tx(ctx, opts, r_epochs)
        st = _fair_state(ctx, pruned, final, tx, spec, fair_extra=bilevel.fair_of(state))
        pruned, info["retrain_history"] = ctx.finetune(st, tx, epochs=r_epochs,
                                                       step_fn=bilevel.make_fair_step(ctx.fm, spec, tx,
                                                                                      augment=ctx.augment),
                                                       desc="bifp (retrain)")
    if structured:
        info.update(kept_units=kept_units(pruned.masks, groups), _unit_groups=groups)
    info.update(_fair_info(ctx, spec, pruned, "bifp"))
    return pruned.replace(extra=None), info


# ---------------------------------------------------------------------------
# Structured baselines
# ---------------------------------------------------------------------------

@register("structured_magnitude", "structured magnitude: prune the filters / neurons with the smallest L1 norm "
          "(one shot), then cross-entropy fine-tuning", structured=True)
def structured_magnitude(ctx: Context, dense: TrainState, opts: NoOptions) -> tuple[TrainState, dict]:
    groups, template = structured_setup(ctx, dense.params, dense.model_state)
    masks = l1_structured_masks(ctx, dense.params, groups, template)
    tx = ctx.finetune_tx()
    state, hist = ctx.finetune(ctx.masked_state(dense, masks, tx), tx, desc="fine-tune (structured)")
    return state, {"history": hist, "structured": True, "kept_units": kept_units(state.masks, groups),
                   "_unit_groups": groups}


@register("prune_then_fair", "structured magnitude pruning, then fine-tuning with the fairness surrogate as a "
          "constraint (default) or penalty", PruneThenFairOptions, structured=True, check=_check_common,
          default_changes=HINGE_AND_GUARD)
def prune_then_fair(ctx: Context, dense: TrainState, opts: PruneThenFairOptions) -> tuple[TrainState, dict]:
    steps = ctx.settings.ft_epochs * ctx.steps_per_epoch
    spec = fairness_spec(ctx, opts, steps)
    groups, template = structured_setup(ctx, dense.params, dense.model_state)
    masks = l1_structured_masks(ctx, dense.params, groups, template)
    tx = ctx.finetune_tx()
    state = _fair_state(ctx, dense, masks, tx, spec)
    hook, mult_hist = multiplier_recorder(ctx, spec)
    guard = collapse_guard(ctx, opts, spec, dense, "prune_then_fair's fine-tuning")
    state, hist = ctx.finetune(state, tx, step_fn=bilevel.make_fair_step(ctx.fm, spec, tx, augment=ctx.augment),
                               desc="fine-tune (fair)", hook=guard.hook(hook) if guard else hook)
    guarded = None
    if guard:
        state, guarded = guard.finish(state)
    info = {"options": dataclasses.asdict(opts), "fairness": spec.surrogate, "history": hist, "structured": True,
            "dual_lr_used": fair_dual_lr(opts, steps), "kept_units": kept_units(state.masks, groups),
            "_unit_groups": groups,
            **_fair_info(ctx, spec, state, "prune_then_fair")}
    if spec.mode == "constraint":
        info["multiplier_history"] = mult_hist + [info["multipliers"]]
    if guarded is not None:
        info["collapse_guard"] = guarded
    return state.replace(extra=None), info


@register("fair_then_prune", "fairness-aware training of the dense model (constraint or penalty), then structured "
          "magnitude pruning and cross-entropy fine-tuning", FairThenPruneOptions,
          structured=True, check=_check_common, default_changes=(GUARD, UNMET))
def fair_then_prune(ctx: Context, dense: TrainState, opts: FairThenPruneOptions) -> tuple[TrainState, dict]:
    fair_epochs = ctx.settings.ft_epochs if opts.fair_epochs < 0 else opts.fair_epochs
    spec = fairness_spec(ctx, opts, fair_epochs * ctx.steps_per_epoch)
    groups, template = structured_setup(ctx, dense.params, dense.model_state)
    info: dict[str, Any] = {"options": dataclasses.asdict(opts), "structured": True, "fair_epochs": fair_epochs,
                            "dual_lr_used": fair_dual_lr(opts, fair_epochs * ctx.steps_per_epoch)}
    start = dense
    if fair_epochs > 0:
        tx = ctx.finetune_tx(epochs=fair_epochs)
        state = _fair_state(ctx, dense, None, tx, spec)
        guard = collapse_guard(ctx, opts, spec, dense, "fair_then_prune's fair training")
        start, info["fair_history"] = ctx.finetune(
            state, tx, epochs=fair_epochs, step_fn=bilevel.make_fair_step(ctx.fm, spec, tx, augment=ctx.augment),
            desc="fair training (dense)", hook=guard.hook() if guard else None)
        if guard:
            start, guarded = guard.finish(start)
            if guarded is not None:
                info["collapse_guard"] = guarded
        info["dense_fair"] = _fair_info(ctx, spec, start)
    masks = l1_structured_masks(ctx, start.params, groups, template)
    tx = ctx.finetune_tx()
    state, hist = ctx.finetune(ctx.masked_state(start, masks, tx), tx, desc="fine-tune (structured)")
    info.update(history=hist, kept_units=kept_units(state.masks, groups), _unit_groups=groups)
    return state, info


__all__ = ["BifpOptions", "FairOptions", "FairThenPruneOptions", "PruneThenFairOptions", "bifp", "multiplier_cap", "multiplier_recorder",
           "one_sided", "surrogate_name", "fair_then_prune", "fairness_spec", "kept_units",
           "l1_structured_masks", "prune_then_fair", "structured_magnitude", "structured_setup"]
