"""Planning a per-group bound for the certificate a method will be judged by (CEAG's ``aim=certificate`` /
``aim=bound``, and ``aim_refresh``): eps_g = T - h_g, with h_g the half-width the test certificate's interval
(or one-sided bound) of group g will have at its flip rate, and T the target or, when out of reach, the
smallest certifiable bound plus a margin; planned once from the pruned start, or again at every checkpoint
from the current model (a resumable ``fit`` hook that writes ``Carry.targets``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.metrics import certify
from fairprune_jax.techniques.group_finetune import row_correct
from fairprune_jax.training.checkpoint import resumable
from fairprune_jax.training.train import TrainState, carry_of

if TYPE_CHECKING:
    from fairprune_jax.methods.base import Context


def certificate_targets(ctx: Context, dense: TrainState, start: TrainState, eps: float, margin: float,
                        headline: bool = False) -> tuple[np.ndarray, dict]:
    """Per-group targets eps_g = T - h_g for ``aim=certificate`` and ``aim=bound`` (and what ``results.json``
    records of them).

    ``aim=certificate``: h_g is the half-width the test certificate's simultaneous psi_g interval will have for
    group g (:func:`certify.predicted_halfwidth`), so the target is every group's *verdict* at T; the headline
    bound (the largest one-sided bound, certificate version 3) is then below T too, with room to spare.
    ``aim=bound`` (``headline``): h_g is the distance to group g's one-sided bound, so the target is the
    headline itself, the certified max psi_g at T, and the groups' targets differ less. h_g uses
    the test split's size shared out by the training split's group
    shares (its composition is not read), at the certificate's level and construction, and at the rate at
    which the pruned start's correctness differs from the dense model's on the validation split (on the
    training rows without one; there the model may fit its rows, so the rate is low). psi_g averages to 0, so
    no model certifies below sum_g w_g h_g (:func:`certify.reachable_bound`); T is eps, or that bound plus
    ``margin`` when eps is below it, and then a note says so. The flip rate is the pruned start's, before
    fine-tuning brings it down, so h_g errs on the wide side.
    """
    ds, G = ctx.dataset, ctx.dataset.num_groups
    rows, where = plan_rows(ds)
    share, n_test = plan_sizes(ds, rows)
    flips = flip_rates(row_correct(ctx, dense, rows), row_correct(ctx, start, rows), rows.g, G)
    eps_g, target, reach, h = plan_targets(ctx, share, n_test, flips, eps, margin, headline)
    parts = []
    if target > eps:
        parts.append(f"a certified bound of {eps:g} is out of reach for a test split of {n_test} rows at the pruned "
                     f"start's flip rates ({where} rows): no model certifies below about {reach:.3f} there; aiming "
                     f"at {target:.3f} (that + aim_margin {margin:g}). A larger test split, or fewer flipped rows "
                     "(the distill option), lowers it")
    if where == "training":
        parts.append(f"aim={'bound' if headline else 'certificate'} predicts each group's certificate from flip "
                     "rates on the training rows "
                     "(there is no validation split), which a model that fits its training rows understates "
                     "(digits, seeds 0-2: certified max psi_g 0.26 against 0.20 with aim=point, certificate version 2); hold out a "
                     "validation split (--val-fraction 0.1; prune(val_fraction=0.1))")
    note = "ceag: " + ". ".join(parts) if parts else None
    names = list(ds.group_names)
    return eps_g, {"aimed_at": "certified max psi_g" if headline else "every group's verdict",
                   "target": round(target, 6), "reachable": round(reach, 6), "flip_rows": where,
                   "expected_test_rows": dict(zip(names, np.round(share * n_test, 1).tolist())),
                   "flip_rate": dict(zip(names, np.round(flips, 4).tolist())),
                   "halfwidth": dict(zip(names, np.round(h, 5).tolist())),
                   "eps_g": dict(zip(names, np.round(eps_g, 5).tolist())), "note": note}


def plan_rows(ds) -> tuple:
    """The rows whose flip rates plan the targets, and their name: the validation split, else the training rows."""
    return (ds.val, "validation") if ds.val is not None and len(ds.val) else (ds.train, "training")


def plan_sizes(ds, rows) -> tuple[np.ndarray, int]:
    """The training split's group shares and the test split's size (the planned certificate's rows)."""
    share = np.bincount(ds.train.g, minlength=ds.num_groups) / max(len(ds.train), 1)
    return share, len(ds.test) if ds.test is not None and len(ds.test) else len(rows)


def flip_rates(dense_correct: np.ndarray, correct: np.ndarray, g: np.ndarray, num_groups: int) -> np.ndarray:
    """Per group, the share of rows whose correctness differs between the dense and the pruned model; a group
    without rows here gets the rate of all rows (not 0: that would plan it as never flipping, the narrowest
    half-width and the loosest target)."""
    n_rows = np.bincount(g, minlength=num_groups).astype(np.float64)
    changed = (dense_correct != correct).astype(np.float64)
    pooled = float(changed.mean()) if changed.size else 0.0
    rate = np.bincount(g, changed, num_groups) / np.maximum(n_rows, 1.0)
    return np.where(n_rows > 0, rate, pooled)


def plan_targets(ctx: Context, share: np.ndarray, n_test: int, flips: np.ndarray, eps: float, margin: float,
                 headline: bool) -> tuple[np.ndarray, float, float, np.ndarray]:
    """``(eps_g, T, reachable, h_g)`` for ``aim=certificate`` / ``bound`` at these flip rates (see
    :func:`certificate_targets`): eps itself whenever it is above the reachable bound (a user's eps is never
    loosened while a model could certify it); below it, the bound plus ``margin``."""
    cfg = ctx.settings
    h = certify.predicted_halfwidth(share * n_test, flips, float(cfg.certify_level), cfg.certify_interval,
                                    headline=headline)
    h = np.where(share > 0, h, 0.0)
    reach = certify.reachable_bound(share, h)
    target = eps if eps > reach else reach + margin
    return target - h, float(target), reach, h


class Plan(NamedTuple):
    """``aim_refresh``'s device state (``Carry.targets``): the targets eps_g in force, and per checkpoint the
    step, T, the reachable bound and eps_g."""

    eps_g: jax.Array
    log: jax.Array


def plan_init(eps_g: np.ndarray, points: int) -> Plan:
    g = len(eps_g)
    return Plan(jnp.asarray(eps_g, jnp.float32), jnp.full((points, 3 + g), jnp.nan, jnp.float32))


def plan_hook(ctx: Context, dense: TrainState, headline: bool, shift: np.ndarray, eps: float, margin: float,
              points: list[int]):
    """A ``fit`` hook (pure in ``(state, step)``, so resumable): at each checkpoint, plan eps_g again from the
    current model's flip rates on the planning rows (the validation split, else the training rows).

    The pruned start flips far more rows than the fine-tuned model does (UTKFace race, seed 0: Asian 0.61 at the
    start, 0.16 at the end), so the start's plan overstates the half-widths of hard groups, pushes them below
    what the certificate needs and leaves the large groups less room than they could have. ``headline``: plan for
    the one-sided bounds (aim=bound); ``shift``: what the targets carry beside the plan (held-out mode's margin_z
    standard errors), kept as it is."""
    ds, G = ctx.dataset, ctx.dataset.num_groups
    rows, _ = plan_rows(ds)
    share, n_test = plan_sizes(ds, rows)
    dense_correct = row_correct(ctx, dense, rows)
    where = {p: i for i, p in enumerate(points)}

    def hook(s: TrainState, step: int) -> TrainState:
        if step not in where:
            return s
        flips = flip_rates(dense_correct, row_correct(ctx, s, rows), rows.g, G)
        eps_g, target, reach, _ = plan_targets(ctx, share, n_test, flips, eps, margin, headline)
        eps_g = eps_g + shift
        carry = carry_of(s)
        plan = carry.targets
        row = jnp.asarray(np.concatenate([[step, target, reach], eps_g]), jnp.float32)
        plan = Plan(jnp.asarray(eps_g, jnp.float32), plan.log.at[where[step]].set(row))
        return s.replace(extra=carry.replace(targets=plan))

    return resumable(hook)


def plan_result(plan: Plan, eps_g0: np.ndarray, traj, names: list[str], total: int,
                shift: np.ndarray | None = None) -> tuple[list[dict], np.ndarray]:
    """What ``results.json`` records of the plans (per checkpoint: step, T, reachable bound, eps_g = T - h_g as
    in ``aim.eps_g``, and with a ``shift`` (held-out mode's margin_z) the targets in force, eps_g + shift), and
    the targets in force at each recorded trajectory row (to turn its violations back into psi_g estimates)."""
    log = np.asarray(plan.log, np.float64)
    log = log[np.isfinite(log[:, 0])]
    shift = np.zeros(len(names)) if shift is None else np.asarray(shift, np.float64)
    plans = [{"step": int(r[0]), "target": round(float(r[1]), 6), "reachable": round(float(r[2]), 6),
              "eps_g": dict(zip(names, np.round(r[3:] - shift, 5).tolist())),
              **({"eps_g_in_force": dict(zip(names, np.round(r[3:], 5).tolist()))} if np.any(shift) else {})}
             for r in log]
    stride, rows = int(traj.stride), np.asarray(traj.violation).shape[0]
    offset = np.tile(np.asarray(eps_g0, np.float64), (rows, 1))
    # row i holds the last step of its stride that ran; a plan made at step t (before the step of index t) is in
    # force from that step on
    recorded = np.minimum((np.arange(rows) + 1) * stride - 1, max(int(total) - 1, 0))
    for r in log:
        offset[recorded >= int(r[0])] = r[3:]
    return plans, offset


def chain_hooks(hooks: list):
    """One ``fit`` hook running ``hooks`` in order (resumable, as each of them is); None for none."""
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def hook(s: TrainState, step: int) -> TrainState:
        for h in hooks:
            s = h(s, step)
        return s

    return resumable(hook)
