"""Fair Scratch Tickets (Tang et al., CVPR 2023): fair sparse subnetworks of frozen random weights.

No weight is ever trained. Every prunable weight gets a learned score; the
forward pass uses the weights whose ``|score|`` is in the top-k (edge-popup,
Ramanujan et al. 2020), with k from the target sparsity and
``ctx.settings.distribution``, so the mask has exactly the target sparsity at
every step. The top-k is not differentiable; the straight-through estimator
passes the gradient of the masked weight to the score as if the mask were
``|score|`` itself (``m + (|s| - stop_gradient(|s|))``: the forward value is
exactly the 0/1 mask, the gradient w.r.t. ``s`` is ``dL/d(w m) * w * sign(s)``).

The objective is ``cross-entropy + lam * fairness term``. The fairness term
(``penalty=``) is our soft-rate term for group fairness (the default there),
the authors' logistic term (GitHub ``HungerPWAY/Fair-Scratch-Tickets``,
``trainers/default.py``) on request, or a class-wise term:

* ``"dp_rate"`` / ``"eo_rate"`` (group fairness; ``dp_rate`` is the default
  for a group attribute): the mean over the groups present in the batch of
  ``|r_a - r|``, group ``a``'s soft positive rate (mean ``sigmoid(f)``, ``f``
  the positive class's log-odds) against the batch's overall rate held fixed
  (EO: on the ``y = pos`` rows only, as the authors' ``floss_eoo``). Each
  group is pulled toward the overall rate from whichever side it is on and
  every group counts equally, as the authors weight each group's term by
  ``1 / P_a``. Its value is the size of the violation (at most 1), so a model
  whose groups are already close pays little; the logistic term below costs
  each pushed group about ``log 2`` whatever its gap, which with five groups
  makes the constant classifier the cheapest ticket.
* ``"dp"`` / ``"eo"``: the authors' logistic regulariser
  (``floss_dp`` / ``floss_eoo``, lines 12-76): each group's rows are pushed
  one way, ``-(lam/B) sum_{i in a} log sigmoid(d_a f_i) / P_a`` with ``P_a``
  the group's training frequency (for EO the frequency of its ``y = pos``
  rows, and only the ``y = pos`` rows enter, lines 136-144). They hard-code
  per dataset which group goes up (``floss_dp`` vs ``floss_dp_2``); here
  ``d_a = +1`` for every group whose training positive-label rate is below
  the overall rate, ``-1`` otherwise, so more than two groups are each pushed
  toward the overall rate. Their term never stops pushing; ours counts a
  group only while its positive rate in the batch is on the wrong side of the
  batch's overall rate, so it is 0 once the disadvantaged groups reach it
  (``"dp_authors"`` / ``"eo_authors"``: ungated, as theirs).
* ``"class_mean_dev"`` / ``"class_bounded"`` (class-wise fairness, groups =
  classes): ``sum_k p_k max(0, L_k - L)`` of the per-class cross-entropy
  (bounded: of the soft accuracy) against the batch mean held fixed. Only
  classes worse than average are pushed; a max-min gap would also push the
  good classes down, and every constant predictor has gap 0 (with the old
  accuracy-parity gap at lam 1 on digits the loss settled at ln 10, the
  uniform predictor).
* ``"auto"`` (default): the class-wise form when every row's group is its
  class, ``"dp_rate"`` otherwise. ``"surrogate"`` (or naming ``surrogate=``)
  uses a max-gap surrogate from :mod:`fairprune_jax.constraints.surrogates` (the earlier
  default).

``lam`` and ``lam_warmup`` (the share of the score steps over which the
fairness weight ramps linearly from 0 to ``lam``) default by form
(:data:`FORM_DEFAULTS`): 0.1 without warm-up for the class-wise and logistic
forms, picked from the sweep {0, 0.01, 0.1, 0.3, 1} on digits (class-wise
term, 89%); 1 with half the steps as warm-up for the soft-rate forms, from
the sweep on UTKFace gender with five races protected (79%; experiments/
README.md): without warm-up lam 2 and 3 end at the constant classifier (the
random ticket's first steps find the constant predictor before they find
the faces), with it they do not. The authors default lam to 0 and sweep it
per dataset, and so should a user. ``optimizer="authors"`` trains the scores
with their settings (SGD, lr 0.01, momentum 0.9, weight decay 1e-4, cosine:
``configs/celeba/ResNet18sparse_celeba_sc.yml``, ``main.py``
``get_optimizer``) instead of the run's optimizer at ``score_lr``.

Weights: the model rebuilt with the run's seed (the initialisation the dense
run started from, ``rewind.initial_weights``). ``init="signed_constant"``
(default, edge-popup's best) replaces every prunable kernel entry by
``sign(w0) * sqrt(2 / (fan_in * density))`` (Kaiming constant, scaled for the
fraction of inputs kept); ``init="model"`` keeps the builder's random weights.
Normalisation parameters and the hidden layers' biases stay at their initial
values; BatchNorm running statistics follow the masked network as usual.

The output layer's bias (``out_bias="train"``, default; our addition) is
trained with the scores by the same optimiser: one number per class, no
weight of the sparse network. With every weight frozen the output offset is
set only by which weights the top-k keeps, a coarse choice at high sparsity
(7 of the 64 head weights of the UTKFace CNN at 89%); on UTKFace gender with
race protected (89%, seed 1) the frozen-bias ticket ranked the faces well
(test AUC 0.83) but put every row on one side of 0: the constant classifier
(0.523), where a threshold fitted on the training split gives 0.770 and the
trained bias 0.772. ``out_bias="frozen"`` is the authors' setting: their
layers have no bias (``utils/builder.py``, ``bias=False`` in every conv;
``utils/bn_type.py``, ``NonAffineBatchNorm``) and ``freeze_model_weights``
(``utils/net_utils.py`` lines 33-50) freezes every weight and bias; our biases
start at 0, so frozen equals bias-free at the output. Scores start uniform
in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (edge-popup) and are trained with
``cfg.optimizer`` at ``score_lr`` with cosine decay for ``epochs`` (default
``ft_epochs``). The dense trained state is not used (only reported against).

The returned state's params are the frozen weights times the final mask
(with the trained output bias); ``info`` holds the fairness term's value on
the train split (``train_surrogate``), the resolved ``penalty_used`` and
``out_bias_trained`` (the leaf and its final value, or None).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.sparsity import masks as masks_lib
from fairprune_jax.constraints import surrogates
from fairprune_jax.constraints.penalties import (class_penalty, group_priors, label_directions,  # noqa: F401
                                                one_sided_penalty, rate_penalty)
from fairprune_jax.data.base import Split
from fairprune_jax.sparsity.masks import _is_none, apply_masks
from fairprune_jax.methods.base import Context, make_optimizer, register
from fairprune_jax.techniques.rewind import eval_summary, initial_weights, sparsity_report
from fairprune_jax.training.train import (Carry, StepOutput, TrainState, carry_of, create_state, cross_entropy, fit,
                                          make_step, primal_state, split_logits, weighted_mean)

INITS = ("signed_constant", "model")


def _fan_in(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1])) if len(shape) > 1 else int(shape[0])


def layer_densities(params: Any, template: Any, sparsity: float, distribution: str) -> dict[str, float]:
    """Fraction of each prunable leaf kept (``global`` has no per-layer count: the overall density)."""
    counts = masks_lib.keep_counts(params, template, sparsity, distribution)
    sizes = {n: int(np.prod(p.shape)) for n, p in masks_lib.named_leaves(params)}
    return {n: (counts[n] / sizes[n] if n in counts else 1.0 - sparsity)
            for n, t in masks_lib.named_leaves(template)}


def frozen_weights(params: Any, template: Any, init: str, densities: dict[str, float]) -> Any:
    """The weights the subnetwork is chosen from (``init``: ``signed_constant`` or ``model``)."""
    if init not in INITS:
        raise ValueError(f"fair_scratch: init must be one of {', '.join(INITS)}; got {init!r}")
    if init == "model":
        return params

    def sc(name, t, w):
        if t is None:
            return w
        std = math.sqrt(2.0 / (_fan_in(w.shape) * max(densities[name], 1e-12)))
        return jnp.where(w >= 0, std, -std).astype(w.dtype)

    return masks_lib.map_named(lambda n, w, t: sc(n, t, w), params, template)


def init_scores(key: jax.Array, params: Any, template: Any) -> Any:
    """Edge-popup initial scores: uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` per prunable weight."""
    restricted = jax.tree.map(lambda t, p: None if t is None else p, template, params, is_leaf=_is_none)
    leaves, treedef = jax.tree.flatten(restricted)
    out = []
    for i, p in enumerate(leaves):
        b = 1.0 / math.sqrt(_fan_in(p.shape))
        out.append(jax.random.uniform(jax.random.fold_in(key, i), p.shape, jnp.float32, -b, b))
    return jax.tree.unflatten(treedef, out)


def score_masks(scores: Any, template: Any, sparsity: float, distribution: str) -> Any:
    """The exact top-k mask of ``|scores|`` (jittable: counts depend on shapes only)."""
    mags = jax.tree.map(jnp.abs, scores)
    return masks_lib.masks_from_scores(mags, template, sparsity, distribution)


def ste_masks(scores: Any, template: Any, sparsity: float, distribution: str) -> tuple[Any, Any]:
    """``(straight-through masks, hard masks)``: forward value = hard 0/1 mask, gradient = d|s|."""
    hard = score_masks(jax.lax.stop_gradient(scores), template, sparsity, distribution)
    ste = jax.tree.map(lambda m, s: None if m is None else m + (jnp.abs(s) - jax.lax.stop_gradient(jnp.abs(s))),
                       hard, scores, is_leaf=_is_none)
    return ste, hard


def output_bias_name(params: Any, layer_order: list[str]) -> str | None:
    """The bias leaf of the layer that produces the logits (the last kernel in forward order), or None."""
    if not layer_order:
        return None
    last = layer_order[-1]
    if not last.endswith("kernel"):
        return None
    name = last[: -len("kernel")] + "bias"
    return name if name in dict(masks_lib.named_leaves(params)) else None


def with_leaf(params: Any, name: str, value: jax.Array) -> Any:
    """``params`` with the leaf called ``name`` replaced by ``value`` (jittable; the others untouched)."""
    return masks_lib.map_named(lambda n, w: value if n == name else w, params)


class Trained(NamedTuple):
    """What fair_scratch trains (``Carry.trained``): a score per prunable weight, and the output layer's bias
    (``out_bias="train"``; None when frozen)."""

    scores: Any
    bias: Any = None


def make_score_step(fm, tx: optax.GradientTransformation, template: Any, *, sparsity: float, distribution: str,
                    fair_fn: Callable, lam: float, num_groups: int, positive_label: int,
                    augment: Callable | None = None, warmup_steps: int = 0, bias_name: str | None = None
                    ) -> Callable:
    """Jitted step training ``state.extra.trained.scores``; ``state.params`` (the frozen weights) never change.

    With ``warmup_steps > 0`` the fairness weight ramps linearly from 0 at
    step 0 to ``lam`` at ``warmup_steps`` (``state.step`` counts the steps).
    With ``bias_name`` (``out_bias="train"``) ``state.extra.trained.bias`` is that
    leaf's value, trained with the scores by the same optimiser, and used in
    place of the frozen one. A model whose output layer has no bias leaf
    trains the scores only (``info['out_bias_trained']`` is then None).
    """

    def objective(forward, state: TrainState, batch: dict) -> StepOutput:
        trained = carry_of(state).trained       # Trained(scores, bias) (bias None without bias_name)
        lam_t = (lam * jnp.minimum(1.0, state.step.astype(jnp.float32) / warmup_steps) if warmup_steps > 0
                 else lam)

        def loss_fn(t):
            ste, hard = ste_masks(t.scores, template, sparsity, distribution)
            params = state.params if bias_name is None else with_leaf(state.params, bias_name, t.bias)
            logits, new_ms = forward(params, masks=ste)
            ce = weighted_mean(cross_entropy(logits, batch["y"]), batch["w"])
            fair = fair_fn(logits, batch["y"], batch["g"], batch["w"], num_groups, positive_label)
            return ce + lam_t * fair, (ce, fair, logits, new_ms, hard)

        (loss, (ce, fair, logits, new_ms, hard)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        updates, opt_state = tx.update(grads, primal_state(state.opt_state), trained)   # the scores' optimizer
        trained = optax.apply_updates(trained, updates)
        return StepOutput(loss, logits, new_ms, extra=Carry(trained=trained), stats={"ce": ce, "fair": fair},
                          fields={"masks": hard, "opt_state": opt_state})

    return make_step(fm, None, objective, augment=augment)


# ---------------------------------------------------------------------------
# The authors' one-sided regulariser and the class-wise forms
# ---------------------------------------------------------------------------

PENALTIES = ("auto", "dp", "eo", "dp_authors", "eo_authors", "dp_rate", "eo_rate", "class_mean_dev", "class_bounded",
             "surrogate")


def groups_are_classes(ctx: Context) -> bool:
    """True when every training row's group id is its label (digits, UTKFace race with race protected)."""
    tr = ctx.dataset.train
    return ctx.dataset.num_groups == ctx.dataset.num_classes and bool(np.array_equal(tr.y, tr.g))


def penalty_name(ctx: Context, opts: FairScratchOptions) -> str:
    """``opts.penalty`` with ``auto`` resolved for the data (``surrogate:<name>`` for a named surrogate)."""
    name = opts.penalty
    if name == "auto" and opts.surrogate is not None:
        name = "surrogate"           # a surrogate named explicitly is used
    if name == "auto":
        name = "class_mean_dev" if groups_are_classes(ctx) else "dp_rate"
    return f"surrogate:{opts.surrogate}" if name == "surrogate" else name


def fairness_term(ctx: Context, opts: FairScratchOptions) -> tuple[Callable, str]:
    """``fn(logits, y, g, w, num_groups, positive_label)`` for ``opts.penalty`` and the resolved name."""
    name = penalty_name(ctx, opts)
    if name.startswith("surrogate:"):
        return surrogates.surrogate(opts.surrogate), name
    if name.startswith("class_"):
        bounded = name == "class_bounded"
        return (lambda logits, y, g, w, num_groups, positive_label=1:
                class_penalty(logits, y, g, w, num_groups=num_groups, bounded=bounded)), name
    tr, k, pos = ctx.dataset.train, ctx.dataset.num_groups, ctx.settings.positive_label
    on_pos = name.startswith("eo")
    if name.endswith("_rate"):
        return (lambda logits, y, g, w, num_groups, positive_label=1:
                rate_penalty(logits, y, g, w, num_groups=num_groups, positive_label=positive_label,
                             on_positives=on_pos)), name
    directions = jnp.asarray(label_directions(tr.y, tr.g, k, pos))
    priors = jnp.asarray(group_priors(tr.y, tr.g, k, pos, on_pos))
    gated = not name.endswith("_authors")
    return (lambda logits, y, g, w, num_groups, positive_label=1:
            one_sided_penalty(logits, y, g, w, directions=directions, priors=priors, num_groups=num_groups,
                              positive_label=positive_label, on_positives=on_pos, gated=gated)), name



def split_surrogate(ctx: Context, state: TrainState, fair_fn: Callable, split: Split,
                    masks: Any = None) -> float:
    """The surrogate on a whole split (one gap over all rows, not an average of batch gaps)."""
    masks = state.masks if masks is None else masks
    n = len(split)
    logits_all = jnp.asarray(split_logits(ctx.fm, state.params, masks, state.model_state, split,
                                          ctx.settings.eval_batch_size))
    return float(fair_fn(logits_all, jnp.asarray(split.y), jnp.asarray(split.g), jnp.ones(n, jnp.float32),
                         ctx.dataset.num_groups, ctx.settings.positive_label))


# (lam, lam_warmup) when the options leave them None, by the resolved penalty form. The class-wise and the
# authors' logistic forms: lam 0.1 from the digits sweep (lottery_digits_sweep), no warm-up. The soft-rate
# forms (dp_rate / eo_rate, the default for group fairness): lam 1 with the first half of the score steps
# as a linear warm-up, from the sweep on UTKFace gender with race protected (experiments/README.md).
FORM_DEFAULTS = {"rate": (1.0, 0.5), "other": (0.1, 0.0)}


def form_defaults(name: str, opts: "FairScratchOptions") -> tuple[float, float]:
    """``(lam, lam_warmup)`` used for the resolved penalty ``name``: the options', or the form's defaults."""
    lam, warmup = FORM_DEFAULTS["rate" if name.endswith("_rate") else "other"]
    return (lam if opts.lam is None else opts.lam), (warmup if opts.lam_warmup is None else opts.lam_warmup)


OPTIMIZERS = ("run", "authors")
OUT_BIASES = ("train", "frozen")
# The authors' score optimiser (configs/celeba/ResNet18sparse_celeba_sc.yml of HungerPWAY/Fair-Scratch-Tickets:
# SGD, lr 0.01, momentum 0.9, weight decay 1e-4, cosine schedule; main.py get_optimizer, no Nesterov).
AUTHORS_OPT = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}

@dataclasses.dataclass(frozen=True)
class FairScratchOptions:
    lam: float | None = None                # None: the penalty form's default (FORM_DEFAULTS)
    penalty: str = "auto"                   # PENALTIES
    lam_warmup: float | None = None         # share of the score steps over which lam ramps up from 0; None: form's
    surrogate: str | None = None            # a surrogates name (then penalty=auto means surrogate)
    epochs: int | None = None               # None: the run's fine-tuning epochs
    score_lr: float = 0.01
    init: str = "signed_constant"           # INITS
    optimizer: str = "run"                  # OPTIMIZERS
    out_bias: str = "train"                 # OUT_BIASES: the output layer's bias trained with the scores, or frozen


def resolve_options(opts: FairScratchOptions) -> FairScratchOptions:
    """Checked options with ``penalty=auto`` resolved when a surrogate is named (a copy; registered as the
    check, so the method receives it and a bad value fails before any data loads)."""
    if opts.penalty not in PENALTIES:
        raise ValueError(f"fair_scratch: penalty must be one of {', '.join(PENALTIES)}; got {opts.penalty!r}")
    if opts.surrogate is not None:
        surrogates.surrogate(opts.surrogate)  # clear error on a bad name
        if opts.penalty == "auto":
            opts = dataclasses.replace(opts, penalty="surrogate")   # a surrogate named explicitly is used
    elif opts.penalty == "surrogate":
        raise ValueError("fair_scratch: penalty=surrogate needs surrogate=<name> "
                         f"({', '.join(surrogates.NAMES)})")
    if opts.optimizer not in OPTIMIZERS:
        raise ValueError(f"fair_scratch: optimizer must be one of {', '.join(OPTIMIZERS)}; got {opts.optimizer!r}")
    if opts.init not in INITS:
        raise ValueError(f"fair_scratch: init must be one of {', '.join(INITS)}; got {opts.init!r}")
    if opts.out_bias not in OUT_BIASES:
        raise ValueError(f"fair_scratch: out_bias must be one of {', '.join(OUT_BIASES)}; got {opts.out_bias!r}")
    if opts.lam is not None and opts.lam < 0:
        raise ValueError(f"fair_scratch: lam must be >= 0; got {opts.lam}")
    if opts.lam_warmup is not None and not 0 <= opts.lam_warmup <= 1:
        raise ValueError(f"fair_scratch: lam_warmup must be in [0, 1] (a share of the score steps); "
                         f"got {opts.lam_warmup}")
    if not opts.score_lr > 0:
        raise ValueError(f"fair_scratch: score_lr must be > 0; got {opts.score_lr}")
    if opts.epochs is not None and opts.epochs < 1:
        raise ValueError(f"fair_scratch: epochs must be >= 1; got {opts.epochs}")
    return opts


def train_scores(ctx: Context, opts: FairScratchOptions) -> tuple[TrainState, dict, Callable]:
    """Train the scores on frozen weights; the returned state still holds the full frozen weights."""
    cfg = ctx.settings
    epochs = cfg.ft_epochs if opts.epochs is None else opts.epochs
    params, model_state = initial_weights(ctx)
    dens = layer_densities(params, ctx.template, cfg.sparsity, cfg.distribution)
    weights = frozen_weights(params, ctx.template, opts.init, dens)
    scores = init_scores(jax.random.key(ctx.stream_seed("popup_scores")), weights, ctx.template)
    total = max(epochs, 1) * ctx.steps_per_epoch
    if opts.optimizer == "authors":
        a = AUTHORS_OPT
        tx = optax.chain(optax.add_decayed_weights(a["weight_decay"]),
                         optax.sgd(optax.cosine_decay_schedule(a["lr"], total), momentum=a["momentum"]))
    else:
        tx = make_optimizer(cfg.optimizer, opts.score_lr, cfg.weight_decay, total_steps=total)
    fair_fn, name = fairness_term(ctx, opts)
    lam, warmup = form_defaults(name, opts)
    masks0 = score_masks(scores, ctx.template, cfg.sparsity, cfg.distribution)
    bias_name = output_bias_name(weights, ctx.layer_order) if opts.out_bias == "train" else None
    trained = Trained(scores, None if bias_name is None else dict(masks_lib.named_leaves(weights))[bias_name])
    state = create_state(weights, model_state, optax.identity(), seed=ctx.stream_seed("scores_state"),
                         extra=Carry(trained=trained))
    state = state.replace(masks=masks0, opt_state=tx.init(trained))
    step = make_score_step(ctx.fm, tx, ctx.template, sparsity=cfg.sparsity, distribution=cfg.distribution,
                           fair_fn=fair_fn, lam=lam, num_groups=ctx.dataset.num_groups,
                           positive_label=cfg.positive_label, augment=ctx.augment,
                           warmup_steps=int(round(warmup * total)), bias_name=bias_name)
    state, hist = fit(state, step, ctx.dataset.train, epochs=epochs, batch_size=cfg.batch_size,
                      seed=ctx.stream_seed("scores_batches"), desc="fair scratch scores", progress=cfg.progress)
    final = score_masks(state.extra.trained.scores, ctx.template, cfg.sparsity, cfg.distribution)
    params = state.params if bias_name is None else with_leaf(state.params, bias_name, state.extra.trained.bias)
    return state.replace(masks=final, params=params), hist, fair_fn


def finalize(ctx: Context, state: TrainState, fair_fn: Callable, opts: FairScratchOptions,
             hist: dict | None = None) -> tuple[TrainState, dict]:
    """The pruned state (frozen weights times the final mask) and the method's info."""
    train_sur = split_surrogate(ctx, state, fair_fn, ctx.dataset.train)
    pruned = state.replace(params=apply_masks(state.params, state.masks), extra=None)
    name = penalty_name(ctx, opts)
    lam, warmup = form_defaults(name, opts)
    bias_name = output_bias_name(state.params, ctx.layer_order) if opts.out_bias == "train" else None
    bias = None if bias_name is None else {
        "leaf": bias_name, "value": np.asarray(dict(masks_lib.named_leaves(state.params))[bias_name]).tolist()}
    info = {"options": {**dataclasses.asdict(opts), "penalty_used": name, "lam_used": lam, "lam_warmup_used": warmup},
            "out_bias_trained": bias,
            "history": hist or {},
            **sparsity_report(ctx, pruned, pruned.masks, ctx.settings.sparsity),
            "train_surrogate": train_sur if math.isfinite(train_sur) else None,
            "test": eval_summary(ctx, pruned, "test")}
    return pruned, info


@register("fair_scratch", "Fair Scratch Tickets (Tang et al. 2023): edge-popup scores on frozen random weights "
                          "with a fairness-surrogate regulariser", FairScratchOptions, check=resolve_options)
def fair_scratch(ctx: Context, dense: TrainState, opts: FairScratchOptions) -> tuple[TrainState, dict]:
    del dense  # a scratch ticket never looks at trained weights
    state, hist, fair_fn = train_scores(ctx, opts)
    return finalize(ctx, state, fair_fn, opts, hist)


__all__ = ["FairScratchOptions", "INITS", "OUT_BIASES", "fair_scratch", "finalize", "frozen_weights", "init_scores",
           "layer_densities", "make_score_step", "output_bias_name", "score_masks", "split_surrogate", "ste_masks",
           "train_scores", "with_leaf"]
