"""Lottery tickets: iterative magnitude pruning with rewinding (the rewinding machinery is in ``rewind.py``).

``lth`` (Frankle & Carbin 2019; late rewinding, Frankle et al. 2020): every
round removes ``fraction`` of the *remaining* prunable weights by magnitude
(``ctx.settings.distribution``: ``uniform`` = layerwise, ``global`` = one ranking
over all layers, or ``erk``), rewinds the survivors to the checkpoint and
retrains them for ``round_epochs``. Round r reaches ``1 - (1 - fraction)^r``;
the last round is clipped to the target (``schedules.iterative_rounds``).

Cap on the number of rounds
---------------------------
At 90% sparsity ``fraction = 0.2`` needs 11 rounds, each a full retraining.
``max_rounds`` (default 5; 0 = no cap) bounds that: when the schedule would
need more rounds, the per-round fraction is raised to
``1 - (1 - target)^(1 / max_rounds)`` so the target is still reached exactly,
in ``max_rounds`` rounds (recorded as ``fraction_used`` in the info).

Budgets
-------
Every round but the last retrains with ``ctx.finetune_tx`` (``ft_lr``, cosine
over ``round_epochs``, default ``ft_epochs``). The last round, the ticket that
is returned, is retrained on the dense model's budget by default
(``last_round="dense"``: ``cfg.epochs`` epochs with the dense run's optimizer,
``rewind.dense_tx``), the same budget ``ballot`` retrains its ticket on, so the
two tickets are compared at equal training; ``last_round="round"`` gives the
last round the same budget as the others (the behaviour before this option).

Rewinding (``fairprune_jax/techniques/rewind.py``, shared with Ballot)
----------------------------------------------------------
Survivors go back to the dense run's weights at step ``rewind_step``
(0 = initialisation), recreated by :func:`fairprune_jax.techniques.rewind.rewind_checkpoint`
(rebuilt from the model builder and seed, or the dense run replayed for k steps).

Outputs per round
-----------------
``info["rounds"]`` holds one sparsity report per round (target and achieved
sparsity, kept weights per layer, train loss/accuracy, test accuracy and
group/class disparity); ``info["round_masks"]`` keeps the masks in memory for
Python callers (shown as one line in ``results.json``). With an output
folder (``--out``), ``rounds/round_XX.npz`` there holds each round's mask
(one array per leaf name, e.g. ``layers/0/kernel``) plus the report as JSON
under ``__report__``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from fairprune_jax.core.notices import warn
from fairprune_jax.sparsity import schedules
from fairprune_jax.sparsity.masks import ones_like_template
from fairprune_jax.methods.base import Context, register
from fairprune_jax.techniques.rewind import (Checkpoint, MaskHistory, check_rewind_step, copy_tree, dense_steps,  # noqa: F401
                                             dense_tx, eval_summary, initial_weights, iterative_magnitude,
                                             load_masks, rewind, rewind_checkpoint, round_schedule, save_masks,
                                             sparsity_report)
from fairprune_jax.training.train import TrainState, make_train_step

LAST_ROUND = ("dense", "round")


@dataclasses.dataclass(frozen=True)
class LthOptions:
    fraction: float = 0.2                   # pruned per round, of the remaining weights
    rewind_step: int = 0                    # 0: the initialisation
    round_epochs: int | None = None         # None: the run's fine-tuning epochs
    max_rounds: int = 5                     # 0: no cap
    last_round: str = "dense"               # LAST_ROUND


def check_lth_options(opts: LthOptions) -> None:
    """Value checks that need no data (the rewind step against the dense run's length is checked at run time)."""
    if not 0.0 < opts.fraction < 1.0:
        raise ValueError(f"lth: fraction (pruned per round, of the remaining weights) must be in (0, 1); "
                         f"got {opts.fraction}")
    if opts.round_epochs is not None and opts.round_epochs < 0:
        raise ValueError(f"lth: round_epochs must be >= 0; got {opts.round_epochs}")
    if opts.last_round not in LAST_ROUND:
        raise ValueError(f"lth: last_round must be one of {', '.join(LAST_ROUND)}; got {opts.last_round!r}")
    if opts.max_rounds < 0:
        raise ValueError(f"lth: max_rounds must be >= 0 (0 = no cap); got {opts.max_rounds}")
    if opts.rewind_step < 0:
        raise ValueError(f"lth: rewind_step must be >= 0; got {opts.rewind_step}")


@register("lth", "lottery ticket: iterative magnitude pruning, survivors rewound to init or step k and "
                 "retrained each round", LthOptions, check=check_lth_options)
def lth(ctx: Context, dense: TrainState, opts: LthOptions) -> tuple[TrainState, dict]:
    cfg = ctx.settings
    fraction = opts.fraction
    k = check_rewind_step(ctx, opts.rewind_step)
    round_epochs = cfg.ft_epochs if opts.round_epochs is None else opts.round_epochs
    sched, fraction_used = round_schedule(cfg.sparsity, fraction, opts.max_rounds)
    if fraction_used != fraction:
        warn(f"lth: {len(schedules.iterative_rounds(cfg.sparsity, fraction))} rounds of fraction "
             f"{fraction} exceed max_rounds={opts.max_rounds}; using fraction {fraction_used:.4f} "
             "per round instead (set --opt max_rounds=0 for no cap)")
    info: dict[str, Any] = {"schedule": sched, "fraction": fraction, "fraction_used": fraction_used,
                            "rewind_step": k, "round_epochs": round_epochs, "last_round": opts.last_round,
                            "last_round_epochs": cfg.epochs if opts.last_round == "dense" else round_epochs,
                            "rounds": [],
                            "round_masks": MaskHistory(where=ctx.output_location("rounds")),
                            "history": {}}
    if not sched:  # sparsity 0: the dense model is its own ticket
        return dense.replace(masks=ones_like_template(dense.params, ctx.template)), info

    ckpt = rewind_checkpoint(ctx, k, reference=dense.params)
    tx = ctx.finetune_tx(epochs=round_epochs)  # the same fresh schedule every round: compile the step once
    step_fn = make_train_step(ctx.fm, tx, augment=ctx.augment)
    last = len(sched)

    def train_round(r: int, target: float, masks: Any) -> TrainState:
        if r == last and opts.last_round == "dense":   # the returned ticket: the dense budget
            last_tx = dense_tx(ctx)
            state = rewind(ctx, ckpt, masks, last_tx)
            state, hist = ctx.finetune(state, last_tx, epochs=cfg.epochs,
                                       desc=f"lth round {r}/{last} (dense budget)")
        else:
            state = rewind(ctx, ckpt, masks, tx)
            state, hist = ctx.finetune(state, tx, epochs=round_epochs, step_fn=step_fn,
                                       desc=f"lth round {r}/{last}")
        report = {"round": r, **sparsity_report(ctx, state, masks, target),
                  "train_loss": hist["loss"][-1] if hist["loss"] else None,
                  "train_accuracy": hist["accuracy"][-1] if hist["accuracy"] else None,
                  "test": eval_summary(ctx, state, "test")}
        mask_file = ctx.save_masks(f"rounds/round_{r:02d}.npz", masks, report)
        if mask_file is not None:
            report["mask_file"] = mask_file
        info["rounds"].append(report)
        info["round_masks"].append(masks)
        info["history"][f"round_{r}"] = hist
        return state

    state, _ = iterative_magnitude(ctx, dense, sched, train_round)
    return state, info


__all__ = ["Checkpoint", "LthOptions", "MaskHistory", "copy_tree", "dense_steps", "dense_tx", "eval_summary",
           "initial_weights",
           "load_masks", "lth", "rewind", "rewind_checkpoint", "round_schedule", "save_masks", "sparsity_report"]
