"""A fairness phase of the bifp family (bifp's search and retraining, prune_then_fair's and fair_then_prune's
fine-tuning): the structured magnitude masks it starts from (over the model's traced unit groups), its train
state on fixed masks with the fairness objective's estimates and multipliers, the record of its multipliers,
and its end-of-phase report on the training rows (the objective's value, the multipliers, and whether a
two-sided constraint was met there: a note above 1.5 tau, a warning above :data:`UNMET_FACTOR` tau).
``methods/bifp.py`` builds its three methods and structured magnitude from these.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from fairprune_jax.core.notices import warn
from fairprune_jax.sparsity import compact
from fairprune_jax.techniques import bilevel
from fairprune_jax.training.train import Carry, TrainState, create_state

if TYPE_CHECKING:
    from fairprune_jax.methods.base import Context

#: A two-sided constraint ending above this many tau on its training rows was not met: a warning, and with
#: the collapse guard's ``guard_unmet`` an earlier epoch (below it, 1.5 tau: a note).
UNMET_FACTOR = 2.0


def multiplier_recorder(ctx: Context, spec: bilevel.Fairness) -> tuple[Any, list]:
    """``(hook for fit, history list)``: the multipliers at the start of every epoch (constraint mode)."""
    hist: list = []
    if spec.mode != "constraint":
        return None, hist
    spe = max(ctx.steps_per_epoch, 1)

    def hook(state, step):
        if step % spe == 0:
            hist.append(np.round(np.asarray(state.dual.multipliers), 4).tolist())
        return state
    return hook, hist


def structured_setup(ctx: Context, params: Any, model_state: Any = None) -> tuple[list[compact.UnitGroup], Any]:
    """The model's removable unit groups (traced with ``model_state`` for the zoo's residual, depthwise and
    attention models) and the structured template (respecting the run's exclusions)."""
    groups = compact.model_unit_groups(ctx.fm, params, model_state)
    return groups, compact.structured_template(groups, ctx.template)


def l1_structured_masks(ctx: Context, params: Any, groups, template) -> Any:
    """Structured magnitude masks at the target: top units by (per-layer normalised) L1 norm, with companions."""
    counts = bilevel.unit_keep_counts(params, template, ctx.settings.sparsity, ctx.settings.distribution, True,
                                      groups)
    fn = jax.jit(lambda p: bilevel.full_masks(
        bilevel.binarize(bilevel.init_scores(p, template, True, groups), counts), p, groups))
    return fn(params)


def kept_units(masks: Any, groups) -> dict[str, list[int]]:
    """``{kernel: [kept, total]}`` of a structured mask."""
    return {k: [int(v.sum()), int(v.size)] for k, v in compact.unit_masks_of(masks, groups).items()}


def fair_state(ctx: Context, start: TrainState, masks: Any, tx, spec: bilevel.Fairness,
                fair_extra: bilevel.FairState | None = None) -> TrainState:
    fair, dual = bilevel.split_dual(bilevel.fairness_init(spec) if fair_extra is None else fair_extra)
    state = create_state(start.params, start.model_state, tx, masks=masks, seed=ctx.stream_seed("finetune_state"),
                         extra=Carry(fair=fair))
    return state if dual is None else state.with_dual(dual)


def fair_info(ctx: Context, spec: bilevel.Fairness, state: TrainState, what: str = "") -> dict:
    """The fairness objective's value on the training rows at the end of a phase, the multipliers, and, for a
    two-sided constraint (DP / EO: the groups' rates within tau of each other), whether it is met there: a
    ``note`` when the hard gap ends above 1.5 tau, a ``warning`` (also raised) when above twice tau. (The dual step
    reads moving averages of the groups' rates, whose noise lets a run that meets the bound end a little above
    it on the whole training split: 0.0504 against 0.05 for the default bifp on Adult, seed 0.)"""
    if spec.mode == "none":
        return {}
    out = {"train_fairness": bilevel.split_fairness(ctx.fm, spec, state.params, state.masks, state.model_state,
                                                    ctx.dataset.train, ctx.settings.eval_batch_size)}
    if spec.mode == "constraint" and state.dual is not None:
        mult = np.asarray(state.dual.multipliers)
        out["multiplier"] = float(mult.max())
        out["multipliers"] = np.round(mult, 4).tolist()
    if spec.mode == "constraint" and not spec.one_sided and what:
        gap = out["train_fairness"]["metric_gap"]
        if gap > 1.5 * spec.tau:
            msg = (f"{what}: the {spec.surrogate.split('_')[0].upper()} gap on the training rows ends at {gap:.4f} > "
                   f"tau = {spec.tau:g}: the constraint is not met on the data it was trained on (largest "
                   f"multiplier {out.get('multiplier', 0.0):.3g}; a longer run, a larger dual_lr or a looser tau)")
            if gap > UNMET_FACTOR * spec.tau:
                warn(msg)
                out["warnings"] = [msg]
            else:
                out["notes"] = [msg]
    return out
