"""CEAG (Hashemizadeh et al., *Balancing Act*, ICLR 2024): fine-tuning under one constraint per group.

From the same gradually pruned start as nft and el (:mod:`fairprune_jax.techniques.gradual`), one inequality
constraint per group on the excess accuracy gap, psi_g = (dense_acc_g - sparse_acc_g) - (dense_acc -
sparse_acc) <= eps. The primal step uses the loss-based proxy (L_sparse,g - L_dense,g) - (L_sparse - L_dense)
from the batch; the dual step uses the strict psi_g - eps read from replay buffers of the last k per-sample
correctness values of each group (and of all samples for the overall accuracy), from held-out rows when every
group has enough of them, or from every training row's correctness (``constraint_data=auto``,
:func:`choose_constraint_data`). ``aim=certificate`` constrains each group below eps minus the half-width its
test certificate will have (:func:`certificate_targets`). Dense per-group accuracy and loss are computed once
on the train split before fine-tuning; per-group quantities come from ``segment_sum``, so the step costs the
same for 2 or 1000 groups. The shared machinery (the step, trajectories, held-out rows, checkpoint selection)
is :mod:`fairprune_jax.techniques.group_finetune`, re-exported here.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.constraints import constrained
from fairprune_jax.constraints.surrogates import group_means
from fairprune_jax.core.notices import warn
from fairprune_jax.methods.base import Context, register
from fairprune_jax.metrics import certify, fairness
from fairprune_jax.techniques.gradual import GradualOptions, pruned_start
from fairprune_jax.techniques.group_finetune import (  # noqa: F401  (re-exported: the names ceag.py had)
    TRAJECTORY_POINTS, ProblemTerms, Terms, dense_reference, held_out_psi, held_out_rows, make_constrained_step,
    reference_from_counts, row_correct, selection_hook, selection_init, selection_result, trajectory_info,
    trajectory_init, trajectory_record, val_refresh)
from fairprune_jax.techniques.certificate_plan import (  # noqa: F401  (re-exported)
    Plan, certificate_targets, chain_hooks, flip_rates, plan_hook, plan_init, plan_result, plan_rows, plan_sizes,
    plan_targets)
from fairprune_jax.training.train import Carry, TrainState, carry_of, evaluate, teacher_extra, without_teacher

def dual_advice(multipliers: list) -> str:
    """What to change when the constraint ends unmet, read off the recorded multipliers (T x G).

    Only the most constrained group (largest mean multiplier over the second half of fine-tuning) is read:
    the multipliers of groups near their bound fall back to 0 now and then, as they should. If its
    multiplier falls back to 0 more than once in that half, the dual step follows noise, and a faster dual
    step makes it worse (measured: dual_lr 0.1 with 40-row buffers on UTKFace, see docs/IN_DEPTH.md): larger
    buffers or a smaller dual_lr help. If it is still rising at the end, the dual step is too slow for the
    budget.
    """
    if len(multipliers) < 4:     # (checked before the reshape: none at all with --finetune-epochs 0)
        return "more fine-tuning epochs, larger buffers or another dual_lr"
    m = np.nan_to_num(np.asarray(multipliers, dtype=float).reshape(len(multipliers), -1))
    half = m[m.shape[0] // 2:]
    top = half[:, int(np.argmax(half.mean(axis=0)))]
    falls = int(np.sum((top[:-1] > 0) & (top[1:] == 0)))
    if falls >= 2:
        return (f"the largest multiplier oscillates (it fell back to 0 {falls} times in the second half): "
                "larger buffers (buffer_size) or a smaller dual_lr")
    if top[-1] > top[len(top) // 2]:
        return "the largest multiplier was still rising at the end: more fine-tuning epochs or a larger dual_lr"
    return "more fine-tuning epochs, larger buffers or another dual_lr"


BUFFER_OVERALL = ("samples", "groups")
CONSTRAINT_DATA = ("auto", "val", "train", "train_all")
#: constraint_data=auto reads psi_g on held-out rows only when the standard error of every group's held-out
#: psi_g estimate (at the flip rates of the pruned start) is at most this share of eps; else the paper's training
#: buffers (constraint_data=train). train_all (every training row, exact but up to an epoch stale) is an option:
#: better on Adult sex x race, worse on UTKFace race (see choose_constraint_data).
AUTO_SE_SHARE = 0.5
#: constraint_data=auto without held-out rows: every training row's correctness (train_all) instead of the paper's
#: buffers when some group is expected in fewer than this many rows of a training batch. The buffer of such a
#: group fills and refreshes only every few dozen steps, so its psi_g is unobserved or stale for most of the
#: fine-tuning (Adult sex x race, batch 64: Male|Other 0.3 rows a batch, its buffer estimate missing at the end
#: of fine-tuning in 2 of 3 seeds); measured there: training max psi_g 0.0143 / 0.0085 / 0.0113 with train_all
#: against 0.0145 / 0.0153 / 0.0234 with buffers (seeds 0-2). Digits (6.4 rows a batch), Adult sex (21) and
#: UTKFace race (4.5 at batch 64) keep the buffers, on which they do better.
AUTO_RARE_ROWS_PER_BATCH = 1.0
#: dual_lr=auto (the default): the paper's 1e-2 on the buffers and on held-out rows; 2e-2 on every training row
#: (train_all), whose psi_g is exact, so a faster dual step follows no noise, and which auto picks for groups
#: too rare to be in most batches, whose constraints push only in the few batches that hold them. Chosen on
#: the training rows (the constraint's own check), Adult sex x race, CLI defaults, seeds 0-2: the bound met in
#: 3 of 3 seeds at 2e-2 (training max psi_g 0.0083 / 0.0054 / 0.0090, test accuracy 0.852 / 0.850 / 0.850,
#: dense 0.850 / 0.853 / 0.849) against 1 of 3 at 1e-2.
DUAL_LR_AUTO = {"train_all": 2e-2}
DUAL_LR_PAPER = 1e-2
SELECT = ("feasible", "last")
#: What eps bounds. ``point``: the paper's psi_g <= eps. ``certificate``: the certificate's upper end, psi_g + h_g
#: <= eps, where h_g is the half-width the test certificate's interval will have for group g (see
#: :func:`certificate_targets`); CEAG then constrains psi_g <= eps - h_g, leaving small or often-flipped groups
#: a negative target and large ones room. ``bound``: the same with h_g the distance from psi_g to the group's
#: one-sided bound, of which the certified max psi_g (the headline, certificate version 3) is the largest: eps
#: bounds the headline, not every group's verdict, so h_g is narrower (no correction over groups).
AIMS = ("point", "certificate", "bound")


@dataclasses.dataclass(frozen=True)
class CeagOptions(constrained.DualOptions, GradualOptions):
    """ceag's ``--opt`` keys: the gradual start's, the dual step's, and its own."""

    eps: float = 0.01
    dual_lr: float | str = "auto"           # a number, or auto (DUAL_LR_AUTO by constraint data, else 1e-2)
    constraint_data: str = "auto"           # CONSTRAINT_DATA
    val_fraction: float = 0.1
    val_batch_size: int = 0                 # 0: the training batch size
    margin_z: float = 0.0
    select: str = "feasible"                # SELECT
    select_points: int = 8
    buffer_size: int = 40
    overall_buffer_size: int = 1000
    buffer_overall: str = "samples"         # BUFFER_OVERALL
    aim: str = "point"                      # AIMS
    aim_margin: float = 0.01
    aim_refresh: bool = False               # aim=certificate / bound: plan eps_g again at every checkpoint


def ceag_terms(num_groups: int, ref: dict, eps: float, overall_from_groups: bool = False) -> ProblemTerms:
    """Proxy (loss-based) and strict (buffer accuracy-based) excess-gap violations.

    The strict overall accuracy comes from a buffer of the last samples of any
    group, or (``overall_from_groups``, the authors' code) from the unweighted
    mean of the full group buffers. ``ref``: the dense model's ``loss_g`` /
    ``acc_g`` (one per group) and ``loss`` / ``acc``. Group ids must be integers
    (a float id is refused, :func:`core.groups.group_ids`); a row whose id lies
    outside ``[0, num_groups)`` counts in the overall terms and in no group's.
    """
    for key in ("loss_g", "acc_g"):
        if np.shape(ref[key]) != (num_groups,):
            raise ValueError(f"ceag_terms: ref[{key!r}] has shape {np.shape(ref[key])}, not ({num_groups},): the "
                             f"reference holds one value per group, and num_groups is {num_groups}")

    def terms(per, loss, correct, batch, extra):
        g, w = batch["g"], batch["w"]
        loss_g, n_g, _ = group_means(per, g, w, num_groups)
        present = n_g > 0
        proxy = jnp.where(present, (loss_g - ref["loss_g"]) - (loss - ref["loss"]), 0.0)
        buf = constrained.buffer_update(extra.buffer, correct, g, w)
        overall = constrained.buffer_update(extra.overall, correct, jnp.zeros_like(g), w)
        acc_g, full_g = constrained.buffer_means(buf)
        acc, full = constrained.buffer_means(overall)
        if overall_from_groups:
            nfull = jnp.sum(full_g)
            acc_all = jnp.sum(jnp.where(full_g, acc_g, 0.0)) / jnp.maximum(nfull, 1)
            all_full = nfull > 0
        else:
            acc_all, all_full = acc[0], full[0]
        target = eps if extra.targets is None else extra.targets.eps_g      # (aim_refresh: planned again)
        strict = (ref["acc_g"] - acc_g) - (ref["acc"] - acc_all) - target
        observed = present & full_g & all_full
        return Terms(proxy, strict, observed, {"buffer": buf, "overall": overall},
                     group_accuracy=jnp.where(full_g, acc_g, jnp.nan))

    return terms


def ceag_val_terms(num_groups: int, ref: dict, val_ref: dict, val_g: jax.Array, eps_g: jax.Array) -> ProblemTerms:
    """Proxy violations from the training batch; strict psi_g - eps_g from held-out rows.

    ``extra.val_correct`` holds the latest correctness of every held-out row
    (refreshed ``val_batch_size`` rows per step by :func:`val_refresh`), so the
    strict estimate is the held-out psi_g of the current model up to one sweep
    of lag, observed for every group that has held-out rows from the first step.
    """
    n_val_g = jax.ops.segment_sum(jnp.ones_like(val_g, jnp.float32), val_g, num_segments=num_groups)

    def terms(per, loss, correct, batch, extra):
        g, w = batch["g"], batch["w"]
        loss_g, n_g, _ = group_means(per, g, w, num_groups)
        proxy = jnp.where(n_g > 0, (loss_g - ref["loss_g"]) - (loss - ref["loss"]), 0.0)
        table = extra.val_correct
        acc_g = jax.ops.segment_sum(table, val_g, num_segments=num_groups) / jnp.maximum(n_val_g, 1.0)
        psi = (val_ref["acc_g"] - acc_g) - (val_ref["acc"] - jnp.mean(table))
        target = eps_g if extra.targets is None else extra.targets.eps_g      # (aim_refresh: planned again)
        return Terms(proxy, psi - target, n_val_g > 0, group_accuracy=jnp.where(n_val_g > 0, acc_g, jnp.nan))

    return terms


def with_dual_lr(opts: CeagOptions, constraint_data: str = "train") -> CeagOptions:
    """``opts`` with ``dual_lr=auto`` resolved for the rows the dual step reads (``DUAL_LR_AUTO``, else the
    paper's 1e-2); a number is kept."""
    if not isinstance(opts.dual_lr, str):
        return opts
    return dataclasses.replace(opts, dual_lr=DUAL_LR_AUTO.get(constraint_data, DUAL_LR_PAPER))


def check_ceag_options(opts: CeagOptions) -> None:
    """ceag's value checks (registered: run before any data loads)."""
    if isinstance(opts.dual_lr, str):
        if opts.dual_lr.strip().lower() != "auto":
            raise ValueError(f"ceag: dual_lr must be a number > 0 or auto; got {opts.dual_lr!r}")
        opts = with_dual_lr(opts)
    constrained.check_dual_options(opts, "ceag")
    if opts.constraint_data not in CONSTRAINT_DATA:
        raise ValueError(f"ceag: unknown constraint_data {opts.constraint_data!r}; valid: {', '.join(CONSTRAINT_DATA)}")
    if opts.buffer_overall not in BUFFER_OVERALL:
        raise ValueError(f"ceag: unknown buffer_overall {opts.buffer_overall!r}; valid: {', '.join(BUFFER_OVERALL)}")
    if opts.select not in SELECT:
        raise ValueError(f"ceag: unknown select {opts.select!r}; valid: {', '.join(SELECT)}")
    if opts.augmented and opts.dual_optimizer != "sgd":
        raise ValueError("ceag: augmented=True uses its own dual step; leave dual_optimizer=sgd")
    if opts.aim not in AIMS:
        raise ValueError(f"ceag: unknown aim {opts.aim!r}; valid: {', '.join(AIMS)}")
    if opts.aim_margin < 0:
        raise ValueError(f"ceag: aim_margin must be >= 0; got {opts.aim_margin}")
    if opts.aim_refresh and opts.aim == "point":
        raise ValueError("ceag: aim_refresh=true plans again the targets of aim=certificate or aim=bound; with "
                         "aim=point (the default) eps is the target and there is nothing to plan: add --opt "
                         "aim=bound (or certificate), or drop aim_refresh")
    if opts.margin_z < 0 or opts.select_points < 1 or opts.val_batch_size < 0:
        raise ValueError("ceag: margin_z must be >= 0, select_points >= 1 and val_batch_size >= 0 "
                         f"(0: the training batch size); got {opts.margin_z}, {opts.select_points}, "
                         f"{opts.val_batch_size}")


@register("ceag", "Balancing Act: gradual magnitude pruning, then fine-tuning with one constraint per group "
          "on the excess accuracy gap psi_g <= eps (Lagrange multipliers; the dual step reads psi_g on the "
          "paper's replay buffers of training rows, or on held-out rows when they are large enough to estimate "
          "it: constraint_data=auto, val, train; train_all: every training row's correctness)", CeagOptions,
          check=check_ceag_options, psi_bound="eps")
def ceag(ctx: Context, dense: TrainState, opts: CeagOptions) -> tuple[TrainState, dict]:
    eps, G, cfg = opts.eps, ctx.dataset.num_groups, ctx.settings
    names = list(ctx.dataset.group_names)
    notes: list[str] = []
    # the same pruned start as nft and el (gradual pruning on the rows they train on)
    start, template, info = pruned_start(ctx, dense, opts)
    held_out, choice = choose_constraint_data(ctx, dense, start, opts)
    info["constraint_data_choice"] = choice
    table = held_out or choice["chosen"] == "train_all"
    if held_out:
        ctx, val, val_source = held_out_rows(ctx, opts.val_fraction)
    elif table:     # every training row's correctness, refreshed in evaluation mode: the exact training psi_g
        val, val_source = ctx.dataset.train, "every training row (train_all)"
    if isinstance(opts.dual_lr, str):       # auto: by the rows the dual step reads
        opts = with_dual_lr(opts, choice["chosen"])
        info["dual_lr_used"] = opts.dual_lr
    dual = constrained.dual_from_options(opts, G, equality=False)
    tx = ctx.finetune_tx()
    total = ctx.settings.ft_epochs * ctx.steps_per_epoch
    extra = (teacher_extra(dense) if opts.distill > 0 else Carry()).replace(trajectory=trajectory_init(G, total))
    ref = dense_reference(ctx)
    pre = None
    eps_aim: float | np.ndarray = eps
    if opts.aim != "point":
        eps_aim, info["aim"] = certificate_targets(ctx, dense, start, eps, opts.aim_margin,
                                                   headline=opts.aim == "bound")
        if info["aim"]["note"]:
            notes.append(info["aim"]["note"])
    refresh = opts.aim != "point" and opts.aim_refresh
    if table:
        dense_val, _ = evaluate(ctx.eval_step, dense, val, cfg.eval_batch_size)
        start_correct = row_correct(ctx, start, val)
        # per-group margin: eps_g = eps - z * SE(psi_g), SE from the held-out rows at the pruned start
        dense_correct = row_correct(ctx, dense, val)
        lost = np.bincount(val.g, (dense_correct > start_correct), G)
        gained = np.bincount(val.g, (dense_correct < start_correct), G)
        n_val_g = np.bincount(val.g, minlength=G).astype(np.float64)
        se = np.nan_to_num(certify.psi_standard_error(n_val_g, lost, gained))
        eps_g = eps_aim - opts.margin_z * se
        extra = extra.replace(val_correct=jnp.asarray(start_correct))
        terms = ceag_val_terms(G, ref, reference_from_counts(dense_val), jnp.asarray(val.g, jnp.int32),
                               jnp.asarray(eps_g, jnp.float32))
        vb = opts.val_batch_size or cfg.batch_size
        pre = val_refresh(ctx, val, vb, seed=ctx.stream_seed("ceag_val_order"))
        info.update(val_source=val_source, val_rows=len(val), val_batch_size=min(vb, len(val)),
                    margin_z=opts.margin_z, eps_per_group=dict(zip(names, np.round(eps_g, 6).tolist())))
        if held_out and np.any((n_val_g > 0) & (n_val_g < 30)):
            small = [names[i] for i in np.flatnonzero((n_val_g > 0) & (n_val_g < 30))]
            notes.append(f"ceag: groups with fewer than 30 held-out rows ({', '.join(small[:8])}): their psi_g "
                         "estimate is noisy; raise ceag's val_fraction option, or hold out a larger validation "
                         "split (--val-fraction; in prune(): val_fraction= or val=)")
    else:
        n_train_g = np.bincount(ctx.dataset.train.g, minlength=G)
        # buffers no larger than the data, so every constraint is observed however small the dataset
        k = int(min(opts.buffer_size, max(int(n_train_g[n_train_g > 0].min()), 1)))
        k_all = int(min(opts.overall_buffer_size, len(ctx.dataset.train)))
        extra = extra.replace(buffer=constrained.buffer_init(G, k), overall=constrained.buffer_init(1, k_all))
        terms = ceag_terms(G, ref, eps if opts.aim == "point" else jnp.asarray(eps_aim, jnp.float32),
                           overall_from_groups=opts.buffer_overall == "groups")
        eps_g = np.broadcast_to(np.asarray(eps_aim, np.float64), (G,)).copy()
        info.update(buffer_size=k, overall_buffer_size=k_all)
    state = ctx.masked_state(start, start.masks, tx, extra=extra).with_dual(dual.init())
    step = make_constrained_step(ctx, tx, dual, terms, opts.order, pre=pre, distill=opts.distill)
    # the returned model: the most accurate checkpoint that meets the bound on the rows the constraint reads
    # (held-out rows, or the whole training split, evaluated exactly), else the least violating (select=last:
    # the last one, the paper's)
    select = opts.select == "feasible"
    points = sorted({max(int(round(total * (k + 1) / opts.select_points)), 1)
                     for k in range(opts.select_points)}) if select or refresh else []
    hooks = []
    if refresh:     # eps_g planned again at every checkpoint, from the current model's flip rates
        state = state.replace(extra=carry_of(state).replace(targets=plan_init(eps_g, len(points))))
        hooks.append(plan_hook(ctx, dense, opts.aim == "bound", eps_g - np.asarray(eps_aim, np.float64), opts.eps,
                               opts.aim_margin, points))
    if select:
        state = state.replace(extra=carry_of(state).replace(selection=selection_init(state, len(points))))
        sel_rows, sel_ref = (val, dense_val) if table else (ctx.dataset.train, ctx.dense_train_counts)
        hooks.append(selection_hook(ctx, sel_rows, sel_ref, eps_g, points))
    hook = chain_hooks(hooks)
    state, hist = ctx.finetune(state, tx, step_fn=step, hook=hook, desc="fine-tune (ceag)")
    if hook is not None:
        state = hook(state, total)   # the last point comes after the last step
    if select:
        state, sel = selection_result(state, points, eps)
        info["selection"] = sel
        sel["rows"] = "held-out" if held_out else "train"
    traj = jax.device_get(carry_of(state).trajectory)
    offset = eps_g
    if refresh:
        info["aim"]["plans"], offset = plan_result(carry_of(state).targets, eps_g, traj, names, total,
                                                   shift=eps_g - np.asarray(eps_aim, np.float64))
        driving = [p for p in info["aim"]["plans"] if p["step"] < total]
        if not driving:
            notes.append(f"ceag: aim_refresh planned the targets again only after the last step (select_points "
                         f"{opts.select_points}), so fine-tuning ran on the pruned start's plan; raise select_points "
                         "(the plans are made at its checkpoints)")
        loose = [p for p in driving if p["target"] > eps]
        if loose and info["aim"]["target"] <= eps:
            worst = max(loose, key=lambda p: p["target"])
            notes.append(f"ceag: during fine-tuning the reachable bound rose above eps = {eps:g} (at step "
                         f"{worst['step']}: {worst['reachable']:.3f}), so the plans from then on aimed at up to "
                         f"{worst['target']:.3f}, looser than eps (the flip rates of the current model); fewer "
                         "flipped rows (the distill option) or a larger test split lower it")
        eps_g = np.asarray(carry_of(state).targets.eps_g, np.float64)   # the plan in force at the end
    info.update(history=hist, multipliers=np.asarray(state.dual.multipliers).tolist(), eps=eps,
                constraint_data="val" if held_out else ("train_all" if table else "train"), trajectory=trajectory_info(traj, names, offset=offset))
    if select and not info["selection"]["feasible"] and info["selection"]["max_psi"] is None:
        notes.append("ceag: no checkpoint was evaluated (no fine-tuning step: --finetune-epochs 0?): the pruned "
                     "start is returned unconstrained")
    elif select and not info["selection"]["feasible"]:
        sel, where = info["selection"], "held-out" if held_out else "training"
        rare = choice.get("rare_groups") or []
        advice = (f"groups expected in fewer than {AUTO_RARE_ROWS_PER_BATCH:g} row of a batch ({', '.join(rare[:4])}) "
                  "are pushed only in the few batches that hold them: a larger dual_lr and more checkpoints help "
                  f"(dual_lr {opts.dual_lr:g} here; on Adult sex x race, batch 64, the default 0.02 met the bound "
                  "in 3 of 3 seeds; --opt dual_lr=0.05 --opt select_points=32 did too, at up to 1 point of "
                  "accuracy)"
                  if rare and table and not held_out else dual_advice(info['trajectory']['multipliers']))
        missed = (f"{where} max psi_g {sel['max_psi']:.4f} vs eps {eps}" if opts.aim == "point" else
                  f"{where} max_g (psi_g - eps_g) {sel['max_violation']:+.4f}, eps_g from aim={opts.aim}")
        notes.append(f"ceag: no checkpoint met psi_g <= eps_g on the {where} rows; returned the least violating "
                     f"one (step {sel['step']}, {missed}): {advice}")
    no_op, info["notes"] = no_op_warnings(traj, names, eps, "held-out" if held_out else "train",
                                          None if opts.aim == "point" else opts.aim)
    notes += no_op
    if not held_out and not select:
        gc, _ = evaluate(ctx.eval_step, state, ctx.dataset.train, cfg.eval_batch_size)
        psi_tr = fairness.excess_accuracy_gap(ctx.dense_train_counts, gc)
        psi_max = float(np.nanmax(psi_tr))
        if float(np.nanmax(psi_tr - eps_g)) > 0:
            bound = (f"eps = {eps}" if opts.aim == "point" else
                     f"its target eps_g (aim={opts.aim}; max_g (psi_g - eps_g) {float(np.nanmax(psi_tr - eps_g)):+.4f})")
            notes.append(f"ceag: train max psi_g ends at {psi_max:.4f} above {bound}: the constraint is not met on "
                         f"the data it was trained on ({dual_advice(info['trajectory']['multipliers'])})")
    for w in notes:
        warn(w)
    info["warnings"] = notes
    if held_out or select or refresh:
        carry = carry_of(state)
        sel_state = None if carry.selection is None else carry.selection._replace(best=None)
        state = state.replace(extra=carry.replace(selection=sel_state, val_correct=None, targets=None))
    return without_teacher(state), info


def choose_constraint_data(ctx: Context, dense: TrainState, start: TrainState, opts: CeagOptions
                           ) -> tuple[bool, dict]:
    """``(held_out, why)``: whether the dual step reads psi_g on held-out rows or on training buffers.

    ``constraint_data=val`` / ``train`` decide. ``auto`` (the default) estimates, before fine-tuning, how
    noisy a held-out psi_g would be: the held-out rows per group (the validation split's, or ``val_fraction``
    of train's), with the lost / gained rates of the pruned start vs the dense model on the training rows,
    give each group's standard error (:func:`certify.psi_standard_error`). Held-out rows are used only when
    every group's is at most ``AUTO_SE_SHARE`` of eps: a held-out estimate noisier than that makes the dual
    step and the checkpoint choice follow noise (measured on digits, 13-14 held-out rows per class: test max
    psi_g 0.080 against 0.027 with training buffers, 3 seeds). Otherwise the paper's training buffers, unless a
    group is expected in fewer than ``AUTO_RARE_ROWS_PER_BATCH`` rows of a training batch: then ``train_all``
    (every training row's correctness, refreshed a batch per step: exact, up to an epoch stale). Where groups
    are not that rare the buffers do better: on UTKFace race (6 fine-tuning epochs, seeds 0-2) train_all ended
    at a training max psi_g of 0.036 / 0.029 / 0.063 against 0.012 / 0.012 / 0.025: the buffers are noisy but
    current, the table exact but stale. On Adult sex x race, where they are, see ``AUTO_RARE_ROWS_PER_BATCH``.
    """
    if opts.constraint_data != "auto":
        return opts.constraint_data == "val", {"rule": f"constraint_data={opts.constraint_data}",
                                               "chosen": opts.constraint_data}
    ds, G = ctx.dataset, ctx.dataset.num_groups
    if ds.val is not None and len(ds.val):
        n_val = np.bincount(ds.val.g, minlength=G).astype(np.float64)
    else:
        n_val = np.floor(opts.val_fraction * np.bincount(ds.train.g, minlength=G)).astype(np.float64)
    d, s = row_correct(ctx, dense, ds.train), row_correct(ctx, start, ds.train)
    n_tr = np.maximum(np.bincount(ds.train.g, minlength=G), 1)
    lost = np.bincount(ds.train.g, (d > s), G) / n_tr
    gained = np.bincount(ds.train.g, (d < s), G) / n_tr
    se = certify.psi_standard_error(n_val, n_val * lost, n_val * gained)     # NaN for a group with no rows
    worst = float(se.max()) if np.all(n_val > 0) else None       # None: a group without held-out rows
    held_out = worst is not None and worst <= AUTO_SE_SHARE * opts.eps
    per_batch = ctx.settings.batch_size * np.bincount(ds.train.g, minlength=G) / len(ds.train)
    present = per_batch > 0
    rare = [ds.group_names[i] for i in np.flatnonzero(present & (per_batch < AUTO_RARE_ROWS_PER_BATCH))]
    chosen = "val" if held_out else ("train_all" if rare else "train")
    return held_out, {"rule": f"auto: held-out rows when every group's held-out psi_g standard error <= "
                              f"{AUTO_SE_SHARE:g} * eps; else every training row (train_all) when a group is "
                              f"expected in fewer than {AUTO_RARE_ROWS_PER_BATCH:g} row of a batch, else the "
                              "training buffers", "max_standard_error": None if worst is None else round(worst, 6),
                      "held_out_rows_min": int(n_val.min()),
                      "fewest_rows_per_batch": round(float(per_batch[present].min()), 4), "rare_groups": rare,
                      "chosen": chosen}


def no_op_warnings(traj: dict, names: list[str], eps: float, where: str, aim: str | None = None
                   ) -> tuple[list[str], list[str]]:
    """``(warnings, notes)``: a warning when a constraint could not act (never observed: nothing protected its
    group); a note, not a warning, when none was ever violated (the bound held without a push, so ceag ran as
    nft: nothing went wrong)."""
    out, notes = [], []
    observed, violated = np.asarray(traj.observed), np.asarray(traj.violated)
    if not observed.any():
        out.append(f"ceag: no constraint was ever observed on the {where} rows, so the multipliers stayed 0 and "
                   "this run is plain fine-tuning (nft)")
    elif not violated.any():
        bound = f"eps = {eps}" if aim is None else f"its target eps_g from aim={aim}"
        notes.append(f"ceag: no constraint was violated on the {where} rows (every psi_g <= {bound} throughout): "
                   "the multipliers stayed 0, so this run is the same as nft on the same rows")
    elif not observed.all():
        missing = [names[i] for i in np.flatnonzero(~observed)]
        out.append(f"ceag: the constraints of {len(missing)} group(s) were never observed on the {where} rows "
                   f"({', '.join(missing[:8])}): nothing protected them")
    return out, notes
