"""One line per method option: what ``fairprune methods NAME`` prints beside each option and its default
(a top-level module, not in ``methods/``: the listing reads it without importing the registry, hence JAX).

``OPTION_DOCS`` explains an option name wherever it means the same thing; ``METHOD_OPTION_DOCS`` holds the
meaning of a name in one method where it differs (``"bifp.epochs"``). ``tests/test_install.py`` fails when an
option of a registered method has no line here. Plain data: the listing reads it without importing JAX.
"""
from __future__ import annotations

OPTION_DOCS: dict[str, str] = {
    # the gradual start and the pruning phase (ceag, nft, el, gmp, magnitude, fairgrape, ...)
    "prune_epochs": "epochs of the masked pruning phase before fine-tuning (-1: half the fine-tuning epochs, "
                    "at least 1)",
    "prune_updates": "mask updates on the cubic sparsity schedule of the pruning phase",
    "keep_first_conv_dense": "keep the first layer dense when it is a convolution (as the papers do)",
    "keep_last_dense": "keep the classifier layer dense",
    "distill": "weight of KL(dense || pruned) added to the fine-tuning loss: fewer rows flip, tighter "
               "certificates (0: off)",
    # the dual step (ceag, el, bifp family)
    "dual_lr": "step size of the Lagrange multipliers (ceag's auto: the paper's 0.01, or 0.02 when the dual step "
               "reads every training row, constraint_data=train_all; the bifp family's auto: 0.1 for a constrained "
               "phase of up to 500 steps, 0.1 * 500 / steps for a longer one)",
    "dual_optimizer": "how the multipliers move: sgd (gradient ascent), nupi (nuPI controller), adam",
    "order": "dual_primal (the dual step first, the primal gradient with the new multipliers) or simultaneous "
             "(both from the same point); this option was called mode, with dual_primal called alternating",
    "augmented": "add the augmented-Lagrangian quadratic penalty on the violations",
    "nupi_kp": "nuPI's proportional gain (dual_optimizer=nupi)",
    "nupi_nu": "nuPI's momentum on the violation (dual_optimizer=nupi)",
    # ceag
    "eps": "the bound on every group's excess accuracy gap psi_g = (dense_acc_g - acc_g) - (dense_acc - acc)",
    "constraint_data": "which rows the dual step reads psi_g on: auto (held-out rows when they estimate it "
                       "within eps/2; else every training row when a group is expected in fewer than 1 row of "
                       "a batch; else the paper's buffers), val, train_all, or train (the paper's 40-row "
                       "replay buffers)",
    "val_fraction": "share of train carved out as held-out rows when the data has no validation split",
    "val_batch_size": "held-out (or training) rows re-evaluated per step for the dual step (0: the batch size)",
    "margin_z": "held-out mode: constrain psi_g <= eps - z * SE(psi_g), a margin of z standard errors",
    "aim": ("point: eps bounds psi_g (the paper's); certificate: eps bounds the test certificate's upper end, so "
            "psi_g <= eps - h_g with h_g the half-width group g's interval will have (from its share of the "
            "rows and its flip rate at the pruned start), every group's verdict aimed at eps; bound: the same with "
            "h_g the distance to the group's one-sided bound, the certified max psi_g (the headline) aimed at eps; "
            "an eps below what the split can certify is raised"),
    "aim_refresh": ("aim=certificate or bound: plan eps_g again at every checkpoint (select_points) from the current "
                    "model's flip rates on the validation rows, instead of once from the pruned start's, which "
                    "overstate them"),
    "aim_margin": "aim=certificate or bound: when eps is out of reach, aim at the smallest certifiable bound plus this",
    "select": "feasible: return the most accurate of select_points checkpoints meeting eps on the constraint's "
              "rows; last: the last model (the paper's)",
    "early_stop": "nft: return the most accurate of select_points checkpoints on held-out rows (the dataset's "
                  "validation split, else val_fraction of train, which fine-tuning then does not use)",
    "select_points": "checkpoints evaluated for select=feasible, evenly spaced over fine-tuning",
    "buffer_size": "rows per group in the replay buffer of the strict estimate (constraint_data=train; el's "
                   "loss buffers; the bifp family's max_gap buffers)",
    "overall_buffer_size": "rows in the replay buffer of the overall accuracy (constraint_data=train)",
    "buffer_overall": "samples: the overall accuracy from its own buffer; groups: the mean of the group buffers "
                      "(the authors' code)",
    # el
    "buffers": "read the strict loss gaps from replay buffers instead of the batch",
    # gmp
    "prune_fraction": "share of the fine-tuning steps over which sparsity rises (cubic), the rest fine-tunes",
    "updates": "mask updates on the cubic schedule",
    # lth
    "fraction": "share of the remaining weights pruned per round",
    "rewind_step": "the step the surviving weights are rewound to (0: the initialisation)",
    "round_epochs": "training epochs per round (default: the fine-tuning epochs)",
    "max_rounds": "cap on the rounds; the last round jumps to the target sparsity (0: no cap)",
    "last_round": "dense: retrain the final ticket on the dense budget; round: on one round's budget",
    # the bifp family's fairness objective
    "fairness": "the fairness surrogate: auto (two classes: eo_hinge, eo for fair_then_prune; more: ap), dp, eo, "
                "ap, or another surrogate name (eo_hinge / eo_logistic / eo_clipped bound the hard rates from "
                "above; eo_clipped is the hinge capped at 2)",
    "fairness_mode": "constraint (per-group bounds with multipliers), penalty (lam * surrogate, the paper's), "
                     "or none",
    "constraint": "per_group (one bound per group and side) or max_gap (one bound on the max-min gap)",
    "lam": "weight of the fairness penalty (fairness_mode=penalty)",
    "tau": "the fairness bound: every group's rate within tau/2 of the overall rate",
    "strict_decay": "decay of the moving averages of per-group counts the dual step reads",
    "min_rows": "effective rows a group needs in those averages before its constraint is observed",
    "collapse_guard": "if the constrained phase ends at a constant classifier (one class for 98% or more of the "
                      "training rows, which meets any parity bound), return the epoch's model that was not one with the "
                      "smallest parity gap on training rows, "
                      "with a warning (false: the final model)",
    "guard_unmet": "with collapse_guard: if a two-sided constraint ends above twice tau on the training rows, "
                   "return the phase's most accurate epoch that was within twice tau (else the one with the "
                   "smallest gap), with a warning (false: the final model)",
    "proxy": "primal term of a two-sided per-group constraint: bound (Wu et al.'s upper bound of the hard "
             "deviation, max(U_a - L, U - L_a)) or shift (|U_a - U|: no pull of every logit towards the "
             "boundary; not a bound)",
    "multiplier_max": "cap on each multiplier (auto: 5 for dp / eo, 1/groups for ap; inf: no cap)",
    "one_sided": "bound only the rate above the overall (auto: true for ap, false for dp / eo)",
    "strict": "constraint=max_gap: the dual step reads the hard metric (metric) or the surrogate",
    "reduce": "constraint=max_gap: how group rates reduce to one gap",
    # bifp
    "structured": "prune whole units (neurons, channels: a smaller, faster model) rather than single weights",
    "gamma": "the lower level's quadratic term (the implicit gradient is scaled by 1/gamma)",
    "mask_lr": "learning rate of the mask scores (upper level)",
    "mask_momentum": "momentum of the mask scores' SGD",
    "mask_grad": "consumer: read a unit's mask gradient at the rows that consume it (a pruned unit can come "
                 "back); producer: at its own outputs",
    "search_fraction": "share of the bi-level steps before the mask lr decays to 0 (the last steps train the "
                       "final mask's weights)",
    "weight_optimizer": "the weights' optimizer: finetune (the run's fine-tuning optimizer), sgd or adam",
    "weight_lr": "learning rate of weight_optimizer=sgd / adam",
    "lower_steps": "weight (lower-level) steps per mask step",
    "score_clip": "clip the mask scores to [0, 1] (earlier versions; for ablations)",
    "retrain_epochs": "epochs of fairness-aware fine-tuning with the final mask fixed (0: none)",
    # fair_then_prune
    "fair_epochs": "epochs of fairness-aware training of the dense model before pruning (-1: the fine-tuning "
                   "epochs)",
    # fair_scratch
    "penalty": "the fairness penalty's form: auto, dp, eo, their _authors and _rate forms, class_mean_dev, "
               "class_bounded, or surrogate",
    "lam_warmup": "share of the score steps over which lam ramps up from 0 (default: the form's)",
    "surrogate": "a surrogate name for penalty=surrogate (or auto)",
    "score_lr": "learning rate of the edge-popup scores",
    "init": "the frozen weights: signed_constant (the paper's) or model (the initial weights)",
    "optimizer": "the scores' optimizer: run (the run's) or authors (SGD 0.01, momentum 0.9, cosine)",
    "out_bias": "the output layer's bias: train (trained with the scores) or frozen",
    # fairgrape
    "keep_per_iter": "share of the remaining weights kept per iteration",
    "importance": "per-weight importance: squared ((|w| |g|)^2, the authors') or abs",
    "rank": "ranking key within a group: importance, share, or importance_x_share (the authors' delta_p 0/1/2)",
    "picks_per_decision": "weights a group takes per selection decision",
    "max_decisions": "cap on sequential decisions per layer (picks grow to fit; 0: no cap)",
    "importance_rows": "training rows read per importance pass (0: the whole train split)",
    "importance_batch_size": "batch size of the importance passes (0: the run's)",
    "group_chunk": "groups whose backward passes are vmapped together (1: one at a time, faster on CPU)",
    "bn_train_mode": "measure importance with BatchNorm in training mode (the authors')",
    # ballot
    "variant": "ours (all-layer sparsity: magnitude body, classifier votes) or authors (their code: the "
               "classifier alone, backbone dense)",
    "scope": "which layers vote: classifier or all (default: the variant's)",
    "body": "how the non-voting layers are masked: magnitude, lth or dense (default: the variant's)",
    "sign": "score |acc + eta fair| (abs: conflicts cancel) or their signed sum (default: the variant's)",
    "normalize": "gradient normalisation per column, row, layer or none (default: the variant's)",
    "weights": "the fairness loss's class weights: inverse (1/acc_k) or truncated (the authors') (default: the "
               "variant's)",
    "retrain": "retrain the ticket on the dense budget (dense) or the fine-tuning one (finetune)",
    "eta": "weight of the fairness gradient in the vote score",
    "fair_by": "the fairness loss weights rows by class or by protected group",
    "final_layer_only": "the earlier spelling of scope=classifier, body=dense",
    "vote_from": "the voting run starts from the initialisation (init) or the trained weights (dense)",
    "vote_epochs": "epochs of the voting run (default: dense for init, fine-tuning for dense)",
    "warmup_fraction": "retrain=finetune: share of the steps with a linear learning-rate warm-up",
    "min_acc": "floor of the per-class accuracy in the 1/acc_k weights",
    "vote_prune": "variant=authors: the one-shot sparsity of the voting run",
    "holdout": "variant=authors: share of train held out to measure class accuracies",
    "body_fraction": "body=lth: share of the remaining weights pruned per round",
    "body_rounds": "body=lth: cap on the rounds (0: no cap)",
}

#: Where one method gives a shared name another meaning.
METHOD_OPTION_DOCS: dict[str, str] = {
    "bifp.epochs": "bi-level epochs (-1: the run's fine-tuning epochs)",
    "fair_scratch.epochs": "score-training epochs (default: the run's fine-tuning epochs)",
    "fair_scratch.lam": "weight of the fairness penalty (default: the penalty form's)",
    "ballot.rewind_step": "the step the ticket is rewound to before retraining (0: the initialisation)",
    "ballot.retrain_epochs": "retrain=finetune: epochs of retraining (default: the fine-tuning epochs)",
    "gmp.updates": "mask updates on the cubic schedule",
}


def option_doc(method: str, option: str) -> str | None:
    """The line explaining ``option`` of ``method`` (None when there is none)."""
    return METHOD_OPTION_DOCS.get(f"{method}.{option}", OPTION_DOCS.get(option))
