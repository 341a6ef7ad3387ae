"""Ballot (Gao et al., "Efficient DNN-Powered Software with Fair Sparse Models", 2024).

A lottery ticket whose mask comes from votes of accuracy- and fairness-gradient
scores. Two variants (``variant=``), both citing the authors' public code
(GitHub ``Antimony5292/Ballot``, files ``ballot.py`` and ``utils.py``; line
numbers of that repository's HEAD):

``variant="authors"``: the paper's code
---------------------------------------
* **Scope**: the vote covers the classifier only; the mask is applied to
  ``nn.Linear`` layers (``ballot.py`` 250-252), which in their ResNet-50 is the
  final ``fc``: the backbone stays dense. ``sparsity`` is the classifier's
  sparsity; the *true* overall sparsity (all prunable weights, hidden layers
  dense) is what the report and ``results.json`` show.
* **Voting run** (:func:`authors_vote_run`, their ``method == 'lth'`` branch,
  ``ballot.py`` 173-226): one-shot global L1 pruning of ``vote_prune`` (0.95)
  of all prunable weights of the trained model, survivors rewound to the
  initialisation, then the mask is *removed* (``remove_parameters``): pruned
  weights restart at 0 but are trained. Trained for the dense budget on 90% of
  the train split; ``holdout`` (10%) is held out (``ballot.py`` 214).
* **Scores** (``utils.py`` 160-182, ``count_conflict``): after every epoch,
  the classifier-weight gradient of plain cross-entropy on the post-epoch
  weights (summed over the 90%), and of a class-weighted cross-entropy on the
  *pre*-epoch weights. The weights are meant to be ``1 / acc_k`` (held-out
  accuracy of class k), but ``.long()`` truncates the accuracy before 1e-6 is
  added (``utils.py`` 168): every class below 100% gets weight ~1e6, a perfect
  class ~1, so with PyTorch's weighted mean it is plain cross-entropy over the
  rows of the imperfect classes (:func:`truncated_weights`).
* **Votes** (``ballot.py`` 234-246): each gradient is L2-normalised over the
  classes for each input feature (``F.normalize(grad, dim=0)`` of the
  ``(classes, features)`` weight; in Flax's ``(in, out)`` kernel that is our
  ``normalize="row"``); the two are added *with their signs* and the
  ``k = int((1 - s) n)`` highest signed sums get a vote (a sum of exactly 0
  none); the final mask keeps the ``k`` most-voted weights (ties: lower flat
  index; ``torch.topk``'s tie order is unspecified).
* **Retraining** (``ballot.py`` 248-265): the masked network rewound to its
  initialisation and trained on the full dense schedule (our ``rewind.dense_tx``:
  ``cfg.epochs`` at ``cfg.lr``; theirs is SGD 0.1 with steps at 100/150/200 of
  250 epochs).
* Not reproduced: their accuracy gradient also holds the last training
  batch's leftover gradient (no ``zero_grad`` before ``count_conflict``), and
  their pre-epoch model runs in train mode (BatchNorm batch statistics); ours
  runs the pre-epoch forward in train mode too and the post-epoch one in eval
  mode, as theirs, but without the leftover.

The paper's "Standard LTH" baseline is this voting run itself: a network
that is dense after training. Our ``lth`` (iterative magnitude pruning with the
mask kept, at the target sparsity of every prunable layer) is a much stronger,
genuinely sparse baseline.

``variant="ours"`` (default): our adaptation to all-layer sparsity
----------------------------------------------------------------
Voting on hidden layers does not work at all-layer sparsity (measured on
digits at 89%: a hidden-layer vote mask retrains to 0.742, a random mask to
0.738, a magnitude mask to 0.929), so:

* ``body="magnitude"``: every prunable layer but the classifier is masked by
  the magnitude of the trained dense weights at the target sparsity
  (``ctx.settings.distribution``); ``body="lth"`` masks them by iterative
  magnitude pruning with rewinding instead (``body_fraction`` 0.2 of the
  remaining weights per round, at most ``body_rounds`` 5 rounds of ``ft_epochs``
  each, classifier dense meanwhile; the issue's "hidden layers by magnitude or
  LTH");
* the classifier alone votes (``scope="classifier"``), during a run from the
  initialisation (``vote_from="init"``, the dense budget) or from the trained
  weights (``vote_from="dense"``, ``vote_epochs`` default ``ft_epochs``)
  **with the body mask applied**, so the votes see the sparse body they will
  be used with;
* scores per step as below, votes per epoch, final mask at exactly the target
  sparsity, so the overall sparsity is the target;
* the ticket is rewound and retrained on the **dense budget**
  (``retrain="dense"``: ``cfg.epochs`` with the dense optimizer), the same
  budget ``lth`` gives its last round. ``retrain="finetune"`` uses
  ``retrain_epochs`` (default ``ft_epochs``) at ``ft_lr`` with a linear
  warm-up over ``warmup_fraction`` of the steps, then cosine decay.

``scope="all"`` votes on every prunable layer (the earlier behaviour, kept for
the measurement above); ``final_layer_only=True`` is the old spelling of the
authors' scope (classifier only, body dense) with our scores.

Our scores (variant ours): during the voting run every step accumulates per
weight the gradient of the accuracy loss (the one the optimizer uses) and of
the fairness loss, the cross-entropy of each row weighted by ``1 / acc_k`` of
its class (``fair_by="class"``) or protected group (``fair_by="group"``),
``acc_k`` from the previous epoch's counts (``segment_sum`` in the jitted step;
for the first epoch the starting model on the train split), floored at
``min_acc`` (``weights="inverse"``; ``"truncated"`` gives the authors'
weights). Per epoch each summed gradient is normalised per kernel column
(``normalize="column"``: the weights feeding one output unit, so every class
gets the same say; ``"row"`` is the authors' axis, ``"layer"``, ``"none"``) and
the score is ``|g_hat_acc + eta * g_hat_fair|`` (``sign="abs"``: where the two
objectives conflict they cancel and the weight loses; ``"signed"`` is the
authors'). The top-k by score get one vote per epoch; the most-voted are kept,
ties broken by the summed score, then the lower flat index.

Rewinding: ``rewind_step`` (0 = initialisation) via
``fairprune_jax.techniques.rewind.rewind_checkpoint``; with ``vote_from="init"``, no
sparse body and the full budget the voting run replays the dense run and the
step-k weights are captured on the way.

With an output folder (``--out``), ``ballot/votes.npz`` there holds the final mask,
the votes (``votes/<leaf>``) and the summed scores (``score_sum/<leaf>``) of
the voted layers.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.metrics import fairness
from fairprune_jax.sparsity import masks as masks_lib
from fairprune_jax.sparsity import scores as scores_lib
from fairprune_jax.sparsity.masks import _is_none, ones_like_template
from fairprune_jax.methods.base import Context, make_optimizer, register
from fairprune_jax.techniques.rewind import (Checkpoint, check_rewind_step, copy_tree, dense_tx, eval_summary,
                                             initial_weights, iterative_magnitude, rewind, rewind_checkpoint,
                                             round_schedule, sparsity_report)
from fairprune_jax.techniques.ballot_authors import authors_vote_run  # noqa: F401  (re-exported)
from fairprune_jax.techniques.voting import (FAIR_BY, NORMALIZATIONS, _close_epoch, _flat,  # noqa: F401
                                            _restrict, _unflat, _zeros_like, authors_keep, conflict_scores,
                                            epoch_votes, fairness_weights, final_mask, init_vote_extra,
                                            make_vote_step, merge_masks, normalize_columns, signed_scores,
                                            signed_topk_votes, tally, truncated_weights)
from fairprune_jax.training.train import TrainState, create_state, evaluate, fit, make_train_step

VOTE_FROM = ("init", "dense")


# ---------------------------------------------------------------------------
# The voted layers (the scores, votes and voting step are techniques/voting.py)
# ---------------------------------------------------------------------------


def final_layer_template(ctx: Context) -> Any:
    """The prunable template restricted to the last prunable layer in forward order."""
    names = {n for n, _ in masks_lib.named_leaves(ctx.template)}
    order = [n for n in ctx.layer_order if n in names]
    if not order:
        raise ValueError("ballot: final_layer_only needs a prunable final layer, but no layer is prunable "
                         "(is --exclude-last set?)")
    last = order[-1]
    return masks_lib.map_named(lambda n, t: True if n == last else None, ctx.template)


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------


def retrain_tx(ctx: Context, epochs: int, warmup_fraction: float) -> optax.GradientTransformation:
    """Fine-tuning optimizer with linear warm-up over ``warmup_fraction`` of the steps, then cosine decay."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"ballot: warmup_fraction must be in [0, 1); got {warmup_fraction}")
    total = max(epochs * ctx.steps_per_epoch, 1)
    warmup = int(round(warmup_fraction * total))
    if warmup == 0:
        return ctx.finetune_tx(epochs=epochs)
    cfg = ctx.settings
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.ft_lr, warmup, max(total, warmup + 1))
    return make_optimizer(cfg.optimizer, schedule, cfg.weight_decay)  # a schedule in place of the lr


MEMO_BUDGET_BYTES = 512 * 2**20   # per-epoch scores kept for reuse across sparsities up to this size


def voting_run(ctx: Context, dense: TrainState, opts: BallotOptions, template: Any, num_keys: int, k: int,
               body: Any = None) -> dict:
    """The voting run: per-epoch conflict scores (no votes yet), per-key accuracies, step-k weights.

    With ``body`` (the masks of the layers that do not vote, e.g. magnitude at
    the target) the run trains under those masks, so the votes see the sparse
    body they will be combined with. Without a sparse body nothing here depends
    on the target sparsity (the run trains the dense network and only
    *records* gradients), so one run serves every sparsity: the result is kept
    in ``ctx.memo`` (when its scores fit in ``MEMO_BUDGET_BYTES``) and
    ``fairprune compare`` runs it once per seed.
    """
    cfg = ctx.settings
    eta, fair_by, min_acc = opts.eta, opts.fair_by, opts.min_acc
    sparse_body = body is not None and opts.body != "dense"
    memo_key = ("ballot.voting_run", eta, fair_by, opts.normalize, opts.scope, opts.sign, opts.weights, k,
                opts.vote_from, opts.vote_epochs, min_acc, ctx.stream_seed("dense"), cfg.ft_epochs, cfg.ft_lr,
                (opts.body, cfg.sparsity, cfg.distribution, opts.body_fraction, opts.body_rounds)
                if sparse_body else None)
    hit = ctx.memo.get(memo_key)
    if hit is not None and hit["dense"] is dense:   # the same dense run (vote_from="dense" starts from it)
        return hit
    if opts.vote_from == "init":
        vote_epochs = cfg.epochs if opts.vote_epochs is None else opts.vote_epochs
        params, model_state = initial_weights(ctx)
        tx = dense_tx(ctx) if vote_epochs == cfg.epochs else make_optimizer(
            cfg.optimizer, cfg.lr, cfg.weight_decay, total_steps=vote_epochs * ctx.steps_per_epoch)
        seed = state_seed = ctx.stream_seed("dense")
        # same optimizer, seed and batch order as the dense run (and no mask): a replay
        replay = vote_epochs == cfg.epochs and not sparse_body
    else:
        vote_epochs = cfg.ft_epochs if opts.vote_epochs is None else opts.vote_epochs
        params, model_state = copy_tree(dense.params), copy_tree(dense.model_state)
        tx = ctx.finetune_tx(epochs=vote_epochs)   # (a sparse body is applied by the state's masks below)
        seed, state_seed, replay = ctx.stream_seed("ballot_vote_batches"), ctx.stream_seed("ballot_vote_state"), False
    if vote_epochs < 1:
        raise ValueError(f"ballot: vote_epochs must be >= 1; got {vote_epochs}")
    start = create_state(params, model_state, tx, seed=state_seed, masks=body if sparse_body else None)
    gc, cc = evaluate(ctx.eval_step, start, ctx.dataset.train, cfg.eval_batch_size)
    start_counts = cc if fair_by == "class" else gc
    key_acc0 = np.nan_to_num(fairness.group_accuracy(start_counts), nan=1.0)
    start = start.replace(extra=init_vote_extra(params, template, jnp.asarray(key_acc0)))
    step_fn = make_vote_step(ctx.fm, tx, template, num_keys=num_keys, fair_by=fair_by, min_acc=min_acc,
                             augment=ctx.augment, weights=opts.weights)

    spe = ctx.steps_per_epoch
    epoch_scores: list[Any] = []
    key_acc_hist: list[list[float]] = [key_acc0.tolist()]
    captured: dict[str, Checkpoint] = {}

    def close_epoch(state: TrainState) -> TrainState:
        ex = state.extra.votes
        epoch_scores.append(conflict_scores(ex.g_acc, ex.g_fair, template, eta, opts.normalize,
                                            signed=opts.sign == "signed"))
        votes = _close_epoch(ex)
        key_acc_hist.append(np.asarray(votes.key_acc).tolist())
        return state.replace(extra=state.extra.replace(votes=votes))

    def hook(state: TrainState, step: int) -> TrainState:
        if replay and k > 0 and step == k:
            captured["ckpt"] = Checkpoint(k, copy_tree(state.params), copy_tree(state.model_state))
        if step > 0 and step % spe == 0:
            state = close_epoch(state)
        return state

    state, vote_hist = fit(start, step_fn, ctx.dataset.train, epochs=vote_epochs, batch_size=cfg.batch_size,
                           seed=seed, desc="ballot votes", hook=hook, progress=cfg.progress)
    if replay and k == vote_epochs * spe and k > 0:
        captured["ckpt"] = Checkpoint(k, copy_tree(state.params), copy_tree(state.model_state))
    state = close_epoch(state)
    replay_diff = None
    if replay:
        replay_diff = float(max(jnp.max(jnp.abs(a - b)) for a, b in
                                zip(jax.tree.leaves(state.params), jax.tree.leaves(dense.params))))
    run = {"epoch_scores": epoch_scores, "vote_epochs": vote_epochs, "key_acc_hist": key_acc_hist,
           "replay_diff": replay_diff, "history": vote_hist, "captured": captured, "dense": dense}
    size = sum(int(np.size(x)) * 4 for e in epoch_scores for x in jax.tree.leaves(e))
    if size <= MEMO_BUDGET_BYTES:
        ctx.memo[memo_key] = run
    return run


VARIANTS = ("ours", "authors")
SCOPES = ("classifier", "all")
BODIES = ("magnitude", "lth", "dense")
SIGNS = ("abs", "signed")
WEIGHTS = ("inverse", "truncated")
RETRAINS = ("dense", "finetune")

# Options left at None take their value from the variant.
VARIANT_PRESETS = {
    # our adaptation at all-layer sparsity: hidden layers by magnitude, votes on the classifier only
    "ours": {"scope": "classifier", "body": "magnitude", "sign": "abs", "normalize": "column",
             "weights": "inverse", "retrain": "dense"},
    # the paper's code (Antimony5292/Ballot): the classifier alone, the backbone stays dense
    "authors": {"scope": "classifier", "body": "dense", "sign": "signed", "normalize": "row",
                "weights": "truncated", "retrain": "dense"},
}

@dataclasses.dataclass(frozen=True)
class BallotOptions:
    """ballot's ``--opt`` keys; those left at None take the variant's value (``VARIANT_PRESETS``, filled in by
    :func:`resolve_options`, which the method receives)."""

    variant: str = "ours"                   # VARIANTS
    scope: str | None = None                # SCOPES
    body: str | None = None                 # BODIES
    sign: str | None = None                 # SIGNS
    normalize: str | None = None            # NORMALIZATIONS
    weights: str | None = None              # WEIGHTS
    retrain: str | None = None              # RETRAINS
    eta: float = 1.0
    fair_by: str = "class"                  # FAIR_BY
    final_layer_only: bool = False          # the earlier spelling of scope=classifier, body=dense
    rewind_step: int = 0
    vote_from: str = "init"                 # VOTE_FROM
    vote_epochs: int | None = None          # None: the dense (init) or fine-tuning (dense) epochs
    retrain_epochs: int | None = None       # None: the budget of ``retrain``
    warmup_fraction: float = 0.1
    min_acc: float = 0.01
    vote_prune: float = 0.95
    holdout: float = 0.1
    body_fraction: float = 0.2
    body_rounds: int = 5                    # 0: no cap


def _choice(opts: BallotOptions, name: str, valid: tuple) -> None:
    if getattr(opts, name) not in valid:
        raise ValueError(f"ballot: {name} must be one of {', '.join(valid)}; got {getattr(opts, name)!r}")


def resolve_options(opts: BallotOptions) -> BallotOptions:
    """Checked options with the variant's presets filled in (a copy; registered as the check, so the method
    receives it and a bad value fails before any data loads)."""
    _choice(opts, "variant", VARIANTS)
    given = {k: getattr(opts, k) for k in ("scope", "body") if getattr(opts, k) is not None}
    if opts.final_layer_only and (given.get("scope", "classifier"), given.get("body", "dense")) != \
            ("classifier", "dense"):
        raise ValueError(f"ballot: final_layer_only=true means scope=classifier, body=dense; it contradicts "
                         f"{', '.join(f'{k}={v}' for k, v in given.items())}: give one or the other")
    if given.get("scope") == "all" and given.get("body", "dense") != "dense":
        raise ValueError(f"ballot: scope=all makes every layer vote, so there is no separate body mask; body="
                         f"{given['body']} contradicts it (drop body, or choose scope=classifier)")
    opts = dataclasses.replace(opts, **{name: value for name, value in VARIANT_PRESETS[opts.variant].items()
                                        if getattr(opts, name) is None})
    if opts.final_layer_only:   # the earlier spelling of "classifier only, hidden layers dense"
        opts = dataclasses.replace(opts, scope="classifier", body="dense")
    for name, valid in (("scope", SCOPES), ("body", BODIES), ("sign", SIGNS), ("weights", WEIGHTS),
                        ("retrain", RETRAINS), ("fair_by", FAIR_BY), ("normalize", NORMALIZATIONS),
                        ("vote_from", VOTE_FROM)):
        _choice(opts, name, valid)
    if opts.variant == "authors" and (opts.scope, opts.body) != ("classifier", "dense"):
        raise ValueError("ballot: variant=authors votes on the classifier of an unmasked network "
                         "(scope=classifier, body=dense); use variant=ours for other scopes")
    if opts.scope == "all" and opts.body != "dense":
        opts = dataclasses.replace(opts, body="dense")   # every layer votes: there is no separate body mask
    if not 0.0 < opts.min_acc <= 1.0:
        raise ValueError(f"ballot: min_acc must be in (0, 1]; got {opts.min_acc}")
    if not 0.0 < opts.holdout < 1.0:
        raise ValueError(f"ballot: holdout must be in (0, 1); got {opts.holdout}")
    if not 0.0 < opts.body_fraction < 1.0:
        raise ValueError(f"ballot: body_fraction must be in (0, 1); got {opts.body_fraction}")
    if opts.body_rounds < 0:
        raise ValueError(f"ballot: body_rounds must be >= 0 (0 = no cap); got {opts.body_rounds}")
    if not 0.0 <= opts.vote_prune < 1.0:
        raise ValueError(f"ballot: vote_prune must be in [0, 1); got {opts.vote_prune}")
    for name, low in (("vote_epochs", 1), ("retrain_epochs", 0)):
        if getattr(opts, name) is not None and getattr(opts, name) < low:
            raise ValueError(f"ballot: {name} must be >= {low}; got {getattr(opts, name)}")
    if not 0.0 <= opts.warmup_fraction < 1.0:
        raise ValueError(f"ballot: warmup_fraction must be in [0, 1); got {opts.warmup_fraction}")
    return opts


def body_masks(ctx: Context, dense: TrainState, opts: BallotOptions, vote_template: Any) -> tuple[Any, list]:
    """Masks of the layers that do not vote, at the target sparsity, and the body's LTH rounds (if any).

    ``body="magnitude"``: the magnitudes of the trained dense weights; ``"lth"``: iterative magnitude pruning
    of those layers with rewinding (``rewind.iterative_magnitude``; ``body_fraction`` of the remaining
    weights per round, at most ``body_rounds`` rounds, each retrained for ``ft_epochs`` from the rewind
    checkpoint with the voting layers dense; the last round's masks come from the previous round's weights,
    so that round is not trained); ``"dense"``: all ones.
    """
    body_template = jax.tree.map(lambda t, v: None if (t is None or v is not None) else True,
                                 ctx.template, vote_template, is_leaf=_is_none)
    if opts.body == "dense" or not jax.tree.leaves(body_template):
        return ones_like_template(dense.params, body_template), []
    cfg = ctx.settings
    if opts.body == "magnitude":
        return masks_lib.masks_from_scores(scores_lib.magnitude(dense.params, body_template), body_template,
                                           cfg.sparsity, cfg.distribution), []
    sched, _ = round_schedule(cfg.sparsity, opts.body_fraction, opts.body_rounds)
    if not sched:
        return ones_like_template(dense.params, body_template), []
    ckpt = rewind_checkpoint(ctx, check_rewind_step(ctx, opts.rewind_step), reference=dense.params)
    tx = ctx.finetune_tx()
    step_fn = make_train_step(ctx.fm, tx, augment=ctx.augment)
    rounds: list[dict] = []

    def train_round(r: int, target: float, masks: Any) -> TrainState | None:
        if r == len(sched):
            return None
        state = rewind(ctx, ckpt, masks, tx)
        state, _ = ctx.finetune(state, tx, step_fn=step_fn, desc=f"ballot body lth round {r}/{len(sched)}")
        rounds.append({"round": r, "target": round(float(target), 6),
                       "test_accuracy": eval_summary(ctx, state, "test")["accuracy"]})
        return state

    _, masks = iterative_magnitude(ctx, dense, sched, train_round, template=body_template)
    return masks, rounds


@register("ballot", "Ballot (Gao et al. 2024): mask from per-epoch votes of accuracy+fairness gradient "
                    "conflict scores, then rewind and retrain (variant=authors: the paper's code, classifier "
                    "only; variant=ours: hidden layers by magnitude, classifier by votes)", BallotOptions,
          check=resolve_options,
          no_nm=lambda o: ("variant=authors keeps the most-voted weights of the classifier by the paper's own count"
                           if o.variant == "authors" else None))
def ballot(ctx: Context, dense: TrainState, opts: BallotOptions) -> tuple[TrainState, dict]:
    cfg = ctx.settings
    fair_by = opts.fair_by
    k = check_rewind_step(ctx, opts.rewind_step)
    template = final_layer_template(ctx) if opts.scope == "classifier" else ctx.template
    num_keys = ctx.dataset.num_classes if fair_by == "class" else ctx.dataset.num_groups
    masks_lib.keep_counts(dense.params, template, cfg.sparsity, cfg.distribution)  # fail fast on bad input
    body, body_rounds = body_masks(ctx, dense, opts, template)

    if opts.variant == "authors":
        run = authors_vote_run(ctx, dense, opts, template, num_keys)
        kk = authors_keep(template, dense.params, cfg.sparsity)
        votes = score_sum = None
        epoch_masks = []
        for s in run["epoch_scores"]:
            v = signed_topk_votes(s, kk)
            votes = v if votes is None else jax.tree.map(jnp.add, votes, v)
            score_sum = s if score_sum is None else jax.tree.map(jnp.add, score_sum, s)
            epoch_masks.append(np.asarray(_flat(v)) > 0)
        vote_masks = _unflat(masks_lib.topk_mask(_flat(votes), kk), votes)   # most-voted k, ties: lower index
    else:
        run = voting_run(ctx, dense, opts, template, num_keys, k, body)
        votes, score_sum, epoch_masks = tally(run["epoch_scores"], template, cfg.sparsity, cfg.distribution)
        vote_masks = final_mask(votes, score_sum, template, cfg.sparsity, cfg.distribution)
    masks = merge_masks(body, vote_masks)

    # --- refinement: rewind and retrain ----------------------------------------------
    ckpt = run["captured"].get("ckpt") or rewind_checkpoint(ctx, k, reference=dense.params)
    if opts.retrain == "dense":
        retrain_epochs = cfg.epochs if opts.retrain_epochs is None else opts.retrain_epochs
        rtx = dense_tx(ctx) if retrain_epochs == cfg.epochs else make_optimizer(
            cfg.optimizer, cfg.lr, cfg.weight_decay, total_steps=retrain_epochs * ctx.steps_per_epoch)
    else:
        retrain_epochs = cfg.ft_epochs if opts.retrain_epochs is None else opts.retrain_epochs
        rtx = retrain_tx(ctx, retrain_epochs, opts.warmup_fraction)
    pruned = rewind(ctx, ckpt, masks, rtx)
    pruned, retrain_hist = ctx.finetune(pruned, rtx, epochs=retrain_epochs, desc="ballot retrain")

    info = _info(ctx, opts, pruned, masks, votes, score_sum, epoch_masks, run["key_acc_hist"], run["vote_epochs"],
                 retrain_epochs, run["replay_diff"], k)
    info["voted_layers"] = [n for n, _ in masks_lib.named_leaves(template)]
    if body_rounds:
        info["body_lth_rounds"] = body_rounds
    info["label"] = ("the authors' algorithm (Antimony5292/Ballot): classifier only, hidden layers dense"
                     if opts.variant == "authors" else
                     "our adaptation to all-layer sparsity: hidden layers by " + opts.body +
                     ", classifier by votes" if opts.scope == "classifier" else "our all-layer vote")
    info["history"] = {"vote": run["history"], "retrain": retrain_hist}
    votes_file = ctx.save_masks("ballot/votes.npz", masks, {k2: v for k2, v in info.items() if k2 != "history"},
                                votes=votes, score_sum=score_sum)
    if votes_file is not None:
        info["votes_file"] = votes_file
    return pruned, info


def _info(ctx, opts, pruned, masks, votes, score_sum, epoch_masks, key_acc_hist, vote_epochs, retrain_epochs,
          replay_diff, k) -> dict:
    """Vote statistics (over the voted weights): how stable the per-epoch top-k was and how decisive the vote."""
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)])  # noqa: E731
    voted = _restrict(masks, jax.tree.map(lambda v: True, votes))
    m, v = flat(voted), flat(votes)
    agreement = [float((e == (m > 0)).mean()) for e in epoch_masks]
    return {
        "options": {**dataclasses.asdict(opts), "vote_epochs": vote_epochs, "retrain_epochs": retrain_epochs,
                    "rewind_step": k},
        **sparsity_report(ctx, pruned, masks, ctx.settings.sparsity),
        "votes": {"epochs": len(epoch_masks),
                  "kept_min_votes": float(v[m > 0].min()) if (m > 0).any() else None,
                  "pruned_max_votes": float(v[m == 0].max()) if (m == 0).any() else None,
                  "histogram": np.bincount(v.astype(np.int64), minlength=len(epoch_masks) + 1).tolist()},
        "epoch_mask_agreement_with_final": agreement,
        "fairness_key_accuracy": key_acc_hist,
        "replay_max_abs_diff_to_dense": replay_diff,
        "test": eval_summary(ctx, pruned, "test"),
    }


__all__ = ["BallotOptions", "NORMALIZATIONS", "VARIANT_PRESETS", "authors_keep", "authors_vote_run", "ballot",
           "body_masks", "conflict_scores", "epoch_votes", "fairness_weights", "final_layer_template", "final_mask",
           "init_vote_extra", "make_vote_step", "normalize_columns", "retrain_tx", "signed_scores",
           "signed_topk_votes", "tally", "truncated_weights", "voting_run"]
