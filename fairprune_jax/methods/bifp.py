"""BiFP (Dai et al. 2023): fairness-aware bi-level pruning, and its structured baselines.

* ``bifp``: mask scores (upper level) and weights (lower level) trained
  jointly with BiP's first-order implicit gradient (:mod:`fairprune_jax.bilevel`),
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
scale and offset (:mod:`fairprune_jax.compact`), so a pruned unit outputs
exactly zero and :func:`fairprune_jax.compact.compact` turns the result into
a smaller model with identical outputs. Only layers with removable units are
pruned (never the classifier head; in a ResNet only the inner channels of
each block); ``--exclude-first`` keeps the first layer dense. Scores are the
per-layer-normalised L1 norms, so ``--distribution global`` compares layers
on a common scale; ``uniform`` (default) keeps ``round((1 - s) * units)``
(at least one) units in every pruned layer.

Scores live in ``[0, 1]`` (per-layer maximum 1) and ``mask_lr`` sets how
fast units trade places. With BiP's default 0.1 a structured digits MLP
(70%, 10 epochs) swapped no unit -- bifp then amounts to magnitude pruning
with fairness-aware weight training -- while ``mask_lr=10`` swapped 25;
``info["units_swapped_vs_magnitude"]`` reports it for every run.

Fairness options shared by all four (where they apply): ``fairness`` (a
surrogate name from :mod:`fairprune_jax.surrogates`; default ``ap``,
accuracy parity, which is meaningful for multi-class data such as digits
where the groups are the classes; ``dp`` / ``eo`` need a binary-style
``--positive-class``), ``fairness_mode`` (``constraint`` | ``penalty`` |
``none``), ``lam``, ``tau``, ``strict``, ``buffer_size``, ``reduce`` and the
dual-optimizer options of CEAG (``dual_lr``, ``dual_optimizer``, ``mode``,
``augmented``, ``nupi_kp``, ``nupi_nu``).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from fairprune_jax import bilevel, compact
from fairprune_jax.masks import apply_masks, named_leaves
from fairprune_jax.methods.base import METHODS, Context, make_optimizer, method_options, register
from fairprune_jax.methods.ceag import DUAL_OPTIONS, make_dual
from fairprune_jax.train import TrainState, create_state, fit

FAIR_OPTIONS = {"fairness": "ap", "fairness_mode": "constraint", "lam": 1.0, "tau": 0.05, "strict": "metric",
                "buffer_size": 40, "reduce": "max_gap", **DUAL_OPTIONS, "dual_lr": 0.1}

BIFP_OPTIONS = {"structured": True, "gamma": 1.0, "mask_lr": 0.1, "weight_lr": 0.01, "weight_optimizer": "sgd",
                "lower_steps": 1, "epochs": -1, "retrain_epochs": 0, "score_clip": True, **FAIR_OPTIONS}


def fairness_spec(ctx: Context, opts: dict) -> bilevel.Fairness:
    """The fairness objective from method options (clear errors for bad values)."""
    mode = opts["fairness_mode"]
    dual = make_dual(opts, 1, equality=False) if mode == "constraint" else None
    if mode == "constraint" and opts["augmented"] and opts["dual_optimizer"] != "sgd":
        raise ValueError("augmented=True uses its own dual step; leave dual_optimizer=sgd")
    return bilevel.Fairness(surrogate=str(opts["fairness"]), mode=mode, num_groups=ctx.dataset.num_groups,
                            positive_label=ctx.config.positive_label, lam=float(opts["lam"]),
                            tau=float(opts["tau"]), strict=str(opts["strict"]), buffer_size=int(opts["buffer_size"]),
                            reduce=str(opts["reduce"]), dual=dual, dual_mode=str(opts["mode"]))


def structured_setup(ctx: Context, params: Any) -> tuple[list[compact.UnitGroup], Any]:
    """The model's removable unit groups and the structured template (respecting the run's exclusions)."""
    groups = compact.unit_groups(ctx.fm.name, params)
    return groups, compact.structured_template(groups, ctx.template)


def l1_structured_masks(ctx: Context, params: Any, groups, template) -> Any:
    """Structured magnitude masks at the target: top units by (per-layer normalised) L1 norm, with companions."""
    counts = bilevel.unit_keep_counts(params, template, ctx.config.sparsity, ctx.config.distribution, True)
    fn = jax.jit(lambda p: bilevel.full_masks(
        bilevel.binarize(bilevel.init_scores(p, template, True), counts), p, groups))
    return fn(params)


def kept_units(masks: Any, groups) -> dict[str, list[int]]:
    """``{kernel: [kept, total]}`` of a structured mask."""
    return {k: [int(v.sum()), int(v.size)] for k, v in compact.unit_masks_of(masks, groups).items()}


def _fair_state(ctx: Context, start: TrainState, masks: Any, tx, spec: bilevel.Fairness,
                fair_extra: dict | None = None) -> TrainState:
    extra = {"fair": bilevel.fairness_init(spec) if fair_extra is None else fair_extra}
    return create_state(start.params, start.model_state, tx, masks=masks, seed=ctx.config.seed + 1, extra=extra)


def _fair_info(ctx: Context, spec: bilevel.Fairness, state: TrainState) -> dict:
    if spec.mode == "none":
        return {}
    out = {"train_fairness": bilevel.split_fairness(ctx.fm, spec, state.params, state.masks, state.model_state,
                                                    ctx.dataset.train, ctx.config.eval_batch_size)}
    if spec.mode == "constraint" and isinstance(state.extra, dict) and "fair" in state.extra:
        out["multiplier"] = float(np.asarray(state.extra["fair"]["dual"].multipliers)[0])
    return out


def _check_common(opts: dict) -> None:
    if opts["fairness_mode"] == "penalty" and float(opts["lam"]) < 0:
        raise ValueError(f"lam must be >= 0; got {opts['lam']}")


# ---------------------------------------------------------------------------
# BiFP
# ---------------------------------------------------------------------------

def _bifp_options(ctx: Context) -> dict:
    opts = method_options(METHODS["bifp"], ctx.config.method_options)
    _check_common(opts)
    for k in ("gamma", "mask_lr", "weight_lr"):
        if not float(opts[k]) > 0:
            raise ValueError(f"bifp: {k} must be > 0; got {opts[k]}")
    if int(opts["lower_steps"]) < 1:
        raise ValueError(f"bifp: lower_steps must be >= 1; got {opts['lower_steps']}")
    if int(opts["retrain_epochs"]) < 0:
        raise ValueError(f"bifp: retrain_epochs must be >= 0; got {opts['retrain_epochs']}")
    if opts["weight_optimizer"] not in ("sgd", "adam"):
        raise ValueError(f"bifp: weight_optimizer must be sgd or adam; got {opts['weight_optimizer']!r}")
    return opts


@register("bifp", "BiFP (Dai et al. 2023): bi-level pruning, mask scores with BiP's implicit gradient and weights "
          "trained jointly under a fairness constraint or penalty; structured by default", BIFP_OPTIONS,
          structured="structured")
def bifp(ctx: Context, dense: TrainState) -> tuple[TrainState, dict]:
    cfg = ctx.config
    opts = _bifp_options(ctx)
    spec = fairness_spec(ctx, opts)
    structured = bool(opts["structured"])
    if structured:
        groups, template = structured_setup(ctx, dense.params)
    else:
        groups, template = None, ctx.template
    counts = bilevel.unit_keep_counts(dense.params, template, cfg.sparsity, cfg.distribution, structured)
    scores0, masks0 = bilevel.initial_scores_and_masks(dense.params, template, counts, groups)
    named0 = dict(named_leaves(masks0))
    start_units = {n: np.asarray(named0[n]) for n, _ in named_leaves(scores0)}   # host copy: steps donate
    epochs = cfg.ft_epochs if int(opts["epochs"]) < 0 else int(opts["epochs"])
    total = max(epochs * ctx.steps_per_epoch, 1)
    weight_tx = make_optimizer(opts["weight_optimizer"], float(opts["weight_lr"]), cfg.weight_decay,
                               total_steps=total)
    mask_tx = optax.sgd(float(opts["mask_lr"]))
    # theta starts from the dense weights, NOT masked: pruned units keep their values and may come back
    state = create_state(dense.params, dense.model_state, weight_tx, seed=cfg.seed + 1,
                         extra={"scores": scores0, "mask_opt": mask_tx.init(scores0),
                                "fair": bilevel.fairness_init(spec)})
    state = state.replace(masks=masks0)
    step = bilevel.make_bilevel_step(ctx.fm, spec, weight_tx, mask_tx, counts, groups=groups,
                                     gamma=float(opts["gamma"]), lower_steps=int(opts["lower_steps"]),
                                     score_clip=bool(opts["score_clip"]), augment=ctx.augment)
    hist: dict = {}
    if epochs > 0:
        state, hist = fit(state, step, ctx.dataset.train, epochs=epochs, batch_size=cfg.batch_size,
                          seed=cfg.seed + 1000, desc="bifp (bi-level)", progress=cfg.progress)
    final = state.masks                                   # the top-k of the final scores
    named_final = dict(named_leaves(final))
    changed = int(sum(np.abs(np.asarray(named_final[n]) - u).sum() for n, u in start_units.items()) // 2)
    pruned = state.replace(params=apply_masks(state.params, final), masks=final,
                           extra={"fair": state.extra["fair"]})
    info: dict[str, Any] = {"options": opts, "history": hist, "structured": structured, "bilevel_epochs": epochs,
                            "units_swapped_vs_magnitude": changed}
    if int(opts["retrain_epochs"]) > 0:
        r_epochs = int(opts["retrain_epochs"])
        tx = make_optimizer(opts["weight_optimizer"], float(opts["weight_lr"]), cfg.weight_decay,
                            total_steps=r_epochs * ctx.steps_per_epoch)
        st = _fair_state(ctx, pruned, final, tx, spec, fair_extra=state.extra["fair"])
        pruned, info["retrain_history"] = ctx.finetune(st, tx, epochs=r_epochs,
                                                       step_fn=bilevel.make_fair_step(ctx.fm, spec, tx,
                                                                                      augment=ctx.augment),
                                                       desc="bifp (retrain)")
    if structured:
        info["kept_units"] = kept_units(pruned.masks, groups)
    info.update(_fair_info(ctx, spec, pruned))
    return pruned.replace(extra=None), info


# ---------------------------------------------------------------------------
# Structured baselines
# ---------------------------------------------------------------------------

@register("structured_magnitude", "structured magnitude: prune the filters / neurons with the smallest L1 norm "
          "(one shot), then cross-entropy fine-tuning", structured=True)
def structured_magnitude(ctx: Context, dense: TrainState) -> tuple[TrainState, dict]:
    method_options(METHODS["structured_magnitude"], ctx.config.method_options)
    groups, template = structured_setup(ctx, dense.params)
    masks = l1_structured_masks(ctx, dense.params, groups, template)
    tx = ctx.finetune_tx()
    state, hist = ctx.finetune(ctx.masked_state(dense, masks, tx), tx, desc="fine-tune (structured)")
    return state, {"history": hist, "structured": True, "kept_units": kept_units(state.masks, groups)}


def _fair_options(ctx: Context, name: str) -> dict:
    opts = method_options(METHODS[name], ctx.config.method_options)
    _check_common(opts)
    return opts


@register("prune_then_fair", "structured magnitude pruning, then fine-tuning with the fairness surrogate as a "
          "constraint (default) or penalty", FAIR_OPTIONS, structured=True)
def prune_then_fair(ctx: Context, dense: TrainState) -> tuple[TrainState, dict]:
    opts = _fair_options(ctx, "prune_then_fair")
    spec = fairness_spec(ctx, opts)
    groups, template = structured_setup(ctx, dense.params)
    masks = l1_structured_masks(ctx, dense.params, groups, template)
    tx = ctx.finetune_tx()
    state = _fair_state(ctx, dense, masks, tx, spec)
    state, hist = ctx.finetune(state, tx, step_fn=bilevel.make_fair_step(ctx.fm, spec, tx, augment=ctx.augment),
                               desc="fine-tune (fair)")
    info = {"options": opts, "history": hist, "structured": True, "kept_units": kept_units(state.masks, groups),
            **_fair_info(ctx, spec, state)}
    return state.replace(extra=None), info


@register("fair_then_prune", "fairness-aware training of the dense model (constraint or penalty), then structured "
          "magnitude pruning and cross-entropy fine-tuning", {**FAIR_OPTIONS, "fair_epochs": -1},
          structured=True)
def fair_then_prune(ctx: Context, dense: TrainState) -> tuple[TrainState, dict]:
    opts = _fair_options(ctx, "fair_then_prune")
    spec = fairness_spec(ctx, opts)
    groups, template = structured_setup(ctx, dense.params)
    fair_epochs = ctx.config.ft_epochs if int(opts["fair_epochs"]) < 0 else int(opts["fair_epochs"])
    info: dict[str, Any] = {"options": opts, "structured": True, "fair_epochs": fair_epochs}
    start = dense
    if fair_epochs > 0:
        tx = ctx.finetune_tx(epochs=fair_epochs)
        state = _fair_state(ctx, dense, None, tx, spec)
        start, info["fair_history"] = ctx.finetune(
            state, tx, epochs=fair_epochs, step_fn=bilevel.make_fair_step(ctx.fm, spec, tx, augment=ctx.augment),
            desc="fair training (dense)")
        info["dense_fair"] = _fair_info(ctx, spec, start)
    masks = l1_structured_masks(ctx, start.params, groups, template)
    tx = ctx.finetune_tx()
    state, hist = ctx.finetune(ctx.masked_state(start, masks, tx), tx, desc="fine-tune (structured)")
    info.update(history=hist, kept_units=kept_units(state.masks, groups))
    return state, info


__all__ = ["BIFP_OPTIONS", "FAIR_OPTIONS", "bifp", "fair_then_prune", "fairness_spec", "kept_units",
           "l1_structured_masks", "prune_then_fair", "structured_magnitude", "structured_setup"]
