"""FairGRAPE (Lin, Kim & Joo, *FairGRAPE: Fairness-aware GRAdient Pruning mEthod for Face Attribute
Classification*, ECCV 2022), read from the paper and the authors' code (GitHub ``Bernardo1998/FairGRAPE``).

What it does
------------
Iterative pruning in small steps. Each iteration

1. measures the importance of every live weight for every group g on the training rows,
   I_g(w) = sum over batches of (w * dL_g/dw)^2, L_g the group's mean loss in the batch
   (:mod:`fairprune_jax.techniques.group_importance`: one forward and G vmapped backward passes per batch);
2. keeps, in every layer, the exact number of weights for this iteration's sparsity, chosen greedily so the
   kept weights' total importance per group stays in the proportions of the layer's live weights (the group
   furthest below its share picks its next most important weights);
3. trains the masked model for a few steps before the next iteration (importance is measured again on the
   changed model).

Iteration i reaches sparsity 1 - keep_per_iter^i (the last one clipped to the target): 91 iterations for
90% at ``keep_per_iter = 0.975``. Then the pruned model is fine-tuned.

Budget (the same as nft / ceag / el)
------------------------------------
The iterations are spread over ``prune_epochs`` of masked training (-1: half the fine-tuning epochs, at least
1; the same phase length as their gradual pruning), one iteration every total_steps / iterations steps, then
``ft_epochs`` of plain fine-tuning with ``ctx.finetune_tx``. The first conv (when the first layer is one) and
the last layer stay dense by default, as in their protocol.

Cost in passes over the data: every iteration reads ``importance_rows`` rows (0: the whole train split, as
the authors do) once forward and G times backward. At 90% with the default schedule that is 91 forward and
91 x G backward passes over the train split on top of the training steps, so it grows linearly with G.
On XLA:CPU the vmapped backward passes of a conv net are about 3x slower than ``group_chunk = 1`` (one group
at a time; measured on the UTKFace CNN, see docs/IN_DEPTH.md, FairGRAPE); on accelerators keep the default.

Where the authors' code differs, and what we do
-----------------------------------------------
Line numbers refer to the authors' ``prune.py`` and ``main_test.py`` at their latest commit.

* Importance is (|w| |g|)^2 per mini-batch, summed over batches (``prune.py`` 662, 670-671), with the
  per-group loss the mean over that group's rows of the batch (639-646), the model in training mode (590),
  masked gradients (657-661). Ours: the same; ``importance = "abs"`` gives |w g| (their ``impt_type 2``,
  873). Their ``impt_type 1`` / ``2`` batch constructions (one class-balanced batch, a per-class sigmoid
  loss) are not offered.
* Not reproduced, because each one makes a group's importance depend on the other groups: their importance
  loop calls ``optimizer.step()`` after every group's backward pass (650; Adam at lr 1e-4, 591-592), so the
  weights change while being measured, and never zeroes the gradients (no ``zero_grad`` in 625-671), so the
  gradient read for a group holds the sum of all earlier groups' and batches' gradients; the division by the
  number of batches is outside the group loop (673-676), so it scales only the last group.
* Selection (``fairness_grad``, 481-573): per layer, the group with the largest deficit of its importance
  share (``argmin(prop - target)``, 556-558) takes its next most important live weight not yet kept; the
  decision is renewed every ``para_batch + 1`` visited weights (559; default ``para_batch = 1``,
  ``main_test.py`` 260). Ours: ``picks_per_decision`` (default 2) weights *taken* per decision, raised to
  ceil(k / ``max_decisions``) when a layer would need more than ``max_decisions`` (default 256; 0 = no cap)
  sequential decisions; the shares then stray from their targets by at most one decision's picks (reported
  as ``max_share_gap`` per iteration). ``rank`` = ``share`` / ``importance_x_share`` are their ``delta_p``
  1 / 2 (515-518); their division is in place on a view, so the totals they add up are the modified values;
  ours ranks by the modified key and adds up the plain importance.
* The keep count per layer is ``int(n (1 - s))`` (543, rounds down); ours is the exact count of
  ``masks.keep_counts`` for the run's ``distribution`` (uniform, erk; ``global`` runs one selection over all
  prunable weights with the model's shares, which the authors do not have).
* Between iterations they retrain ``retrain_iter`` = 3 epochs at lr 1e-5 with a fresh Adam
  (``main_test.py`` 176, 213-214, 253-254) and afterwards 19 epochs (82, 114, 224): 273 epochs of retraining
  for 91 iterations. Ours spreads the same phase length as the other methods over the iterations (one
  optimizer for the phase) so rows of a comparison table train equally long.
* They prune every Linear / Conv layer (``prune.py`` 25); ``keep_first_conv_dense = false`` and
  ``keep_last_dense = false`` do that here.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from fairprune_jax.techniques import group_importance as gi
from fairprune_jax.sparsity import schedules
from fairprune_jax.training.checkpoint import resumable
from fairprune_jax.techniques.gradual import DistillOptions, PrunePhaseOptions, phase_template
from fairprune_jax.sparsity.masks import apply_masks
from fairprune_jax.core.notices import warn
from fairprune_jax.methods.base import Context, register
from fairprune_jax.training.train import TrainState, teacher_extra, without_teacher

@dataclasses.dataclass(frozen=True)
class FairgrapeOptions(DistillOptions, PrunePhaseOptions):
    """fairgrape's ``--opt`` keys: the pruning phase's (first conv and last layer dense by default) and its own."""

    keep_per_iter: float = 0.975            # of the remaining weights, per iteration
    importance: str = "squared"             # group_importance.IMPORTANCE_KINDS
    rank: str = "importance"                # group_importance.RANKS
    picks_per_decision: int = 2
    max_decisions: int = 256                # 0: no cap
    importance_rows: int = 0                # 0: the whole train split
    importance_batch_size: int = 0          # 0: the run's batch size
    group_chunk: int = 64
    bn_train_mode: bool = True


def check_options(opts: FairgrapeOptions) -> None:
    """Value checks, run before any data loads."""
    if not 0.0 < opts.keep_per_iter < 1.0:
        raise ValueError(f"fairgrape: keep_per_iter must be in (0, 1), e.g. 0.975 (keep 97.5% of the remaining "
                         f"weights per iteration); got {opts.keep_per_iter}")
    if opts.importance not in gi.IMPORTANCE_KINDS:
        raise ValueError(f"fairgrape: unknown importance {opts.importance!r}; valid: "
                         f"{', '.join(gi.IMPORTANCE_KINDS)}")
    if opts.rank not in gi.RANKS:
        raise ValueError(f"fairgrape: unknown rank {opts.rank!r}; valid: {', '.join(gi.RANKS)}")
    for name, low in (("picks_per_decision", 1), ("max_decisions", 0), ("importance_rows", 0),
                      ("importance_batch_size", 0), ("group_chunk", 1)):
        if getattr(opts, name) < low:
            raise ValueError(f"fairgrape: {name} must be >= {low}; got {getattr(opts, name)}")


def iteration_steps(n_iters: int, total_steps: int) -> dict[int, list[int]]:
    """Training step -> the iterations done just before it: iteration i at step floor(i * total / n)."""
    out: dict[int, list[int]] = {}
    for i in range(n_iters):
        out.setdefault((i * total_steps) // n_iters if total_steps > 0 else 0, []).append(i)
    return out


def resumed_log_note(log: list[dict], iterations: int) -> str | None:
    """What a run resumed mid-phase (``--resume``) says of its iteration log: its earlier iterations ran in the
    killed process, whose log and clock were not checkpointed (its masks and weights were). None: the log is whole."""
    first = log[0]["iteration"] if log else iterations + 1
    if not iterations or first == 1:
        return None
    if not log:
        return (f"the run was resumed after its {iterations} pruning iterations: iteration_log and the cost seconds "
                "are empty (the masks and weights are the full run's)")
    return (f"the run was resumed after iteration {first - 1} of {iterations}: iteration_log and the cost seconds "
            f"cover iterations {first}..{iterations} only (the masks and weights are the full run's)")


@register("fairgrape", "FairGRAPE (Lin et al., ECCV 2022): iterative pruning in small steps (keep_per_iter), each "
          "keeping per layer the weights whose per-group importance (w * dL_g/dw)^2 keeps every group's share of "
          "the total; importance recomputed each iteration (one forward + G backward passes over the train "
          "split), then the same fine-tuning as nft", FairgrapeOptions, check=check_options,
          no_nm=lambda o: "fairgrape keeps each layer's weights by group-importance shares, not by an N:M pattern")
def fairgrape(ctx: Context, dense: TrainState, opts: FairgrapeOptions) -> tuple[TrainState, dict]:
    cfg, ds = ctx.settings, ctx.dataset
    G = ds.num_groups
    template = phase_template(ctx, dense.params, opts)
    targets = schedules.iterative_rounds(cfg.sparsity, 1.0 - opts.keep_per_iter)
    rows = opts.importance_rows
    imp_split = ds.train
    if 0 < rows < len(ds.train):
        pick = np.sort(ctx.stream_rng("fairgrape_rows").permutation(len(ds.train))[:rows])
        imp_split = ds.train.take(pick)
    imp_bs = opts.importance_batch_size or cfg.batch_size
    imp_step = gi.make_importance_step(ctx.fm, template, G, kind=opts.importance, group_chunk=opts.group_chunk,
                                       train=opts.bn_train_mode)
    log: list[dict] = []
    clock = {"importance": 0.0, "selection": 0.0}

    def prune_iteration(s: TrainState, i: int) -> TrainState:
        t0 = time.perf_counter()
        imp = jax.block_until_ready(gi.group_importance(imp_step, s.params, s.masks, s.model_state, template,
                                                        imp_split, G, imp_bs))   # so the clock splits honestly
        t1 = time.perf_counter()
        masks, rep = gi.proportional_masks(imp, s.masks, template, s.params, targets[i], cfg.distribution,
                                           picks=opts.picks_per_decision, max_decisions=opts.max_decisions,
                                           rank=opts.rank)
        clock["importance"] += t1 - t0
        clock["selection"] += time.perf_counter() - t1
        log.append({"iteration": i + 1, "sparsity": round(float(targets[i]), 6),
                    "max_share_gap": round(rep["max_share_gap"], 6)})
        if i == len(targets) - 1:
            log[-1]["layers"] = rep["layers"]
        return s.replace(masks=masks, params=apply_masks(s.params, masks))

    state, tx, epochs, total = ctx.prune_phase(dense, template, opts.prune_epochs)
    at = iteration_steps(len(targets), total)

    @resumable  # a pure function of (state, step): the importance data and the selection are deterministic
    def hook(s: TrainState, step: int) -> TrainState:
        for i in at.get(step, []):
            s = prune_iteration(s, i)
        return s

    hist: dict = {}
    if epochs > 0 and targets:
        state, hist = ctx.finetune(state, tx, epochs=epochs, hook=hook, desc="prune (fairgrape)")
    else:
        for i in range(len(targets)):
            state = prune_iteration(state, i)
    info: dict[str, Any] = {
        "prune_history": hist, "prune_epochs": epochs, "iterations": len(targets),
        "schedule": [round(float(t), 6) for t in targets], "iteration_log": log,
        "importance_rows": len(imp_split),
        "cost": {"forward_passes": len(targets), "backward_passes": len(targets) * G, "rows_per_pass": len(imp_split),
                 "importance_seconds": round(clock["importance"], 3),
                 "selection_seconds": round(clock["selection"], 3)}}
    note = resumed_log_note(log, len(targets))
    if note:
        info["iteration_log_note"] = note
        warn(f"fairgrape: {note}")
    tx = ctx.finetune_tx()
    state = ctx.masked_state(state, state.masks, tx, extra=teacher_extra(dense) if opts.distill > 0 else None)
    state, ft_hist = ctx.finetune(state, tx, desc="fine-tune (fairgrape)", distill=opts.distill)
    info["history"] = ft_hist
    return without_teacher(state), info

