"""A guard against the constant classifier for fairness-constrained training (the bifp family's constrained phases).

A classifier that predicts one class for every row meets any demographic-parity or equalized-odds bound, so a
fairness constraint pushed hard enough (a tight ``tau``, a fast dual step, a surrogate that bounds the hard rates
from above such as ``eo_hinge``) can end there: on Adult at the command line's defaults, bifp with ``eo_hinge``
ended at it in 1 of 9 validation cells and prune_then_fair with ``eo_hinge`` in 1 of 9 full-data cells
(``experiments/bifp_adult_eo_select.toml``). The guard watches the share of the most frequent prediction on a
fixed sample of up to 32768 training rows (never validation or test rows): at each epoch's end whose model is not
degenerate (that share below ``certify.DEGENERATE_SHARE``) it keeps a host copy of the model (weights, model state
and masks) when it is the best such epoch so far: with a ``gap`` (the phase's hard parity gap on those rows) the
one with the smallest gap (the later on ties), else the latest. If the phase ends degenerate,
:meth:`CollapseGuard.finish` returns the kept model, says so once as a warning and records it in the method's
info. (The last epoch before a collapse is often the one where the push towards it had begun: on Adult, the
guard's first form, which returned it, gave prune_then_fair a model with test EO 0.19.) A model that was degenerate before the phase (a data set whose majority class is that
large) is not guarded. With ``unmet_above`` (bifp's ``guard_unmet``, on by default: twice tau), a phase that ends
*not* degenerate but with its gap above that bound (the constraint missed on the very rows it was trained on;
on Adult at the CLI defaults with fold_in streams prune_then_fair's 80% seed 0 ended at 0.36 against tau 0.05,
its multiplier still climbing) returns its most accurate epoch whose gap was within the bound, else the one
with the smallest gap if that is below the end's, and says so. Training itself is untouched: the guard only reads the state between steps, so a run
that never collapses returns bit for bit what it returned without the guard.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from fairprune_jax.core.notices import warn
from fairprune_jax.data import Split
from fairprune_jax.metrics.certify import DEGENERATE_SHARE
from fairprune_jax.training.evaluation import logits_step, rows_over_split
from fairprune_jax.training.train import TrainState

#: training rows the guard predicts on (evenly spaced over the training split, the same rows at every check):
#: all of Adult's 30162. With 4096 the epoch it picked by its gap was a winner of sampling noise: a gap of
#: 0.026 on those rows, 0.122 on the whole training split (prune_then_fair at the CLI defaults, 90%, seed 0; the
#: smaller group has about 140 positive rows among 4096)
GUARD_ROWS = 32768


class CollapseGuard:
    """Keep the best epoch's model that is not a constant classifier; see the module doc.

    ``guard = CollapseGuard(fm, train, start, steps_per_epoch, eval_batch_size, what="bifp")``; pass
    ``guard.hook(other_hook)`` as ``fit``'s hook; ``state, info = guard.finish(state)`` after the phase.
    """

    def __init__(self, fm: Any, train: Split, start: TrainState, steps_per_epoch: int, eval_batch_size: int = 512,
                 *, what: str = "the constrained phase", rows: int = GUARD_ROWS,
                 gap: Callable[[np.ndarray, Split], float] | None = None, unmet_above: float | None = None):
        n = len(train)
        idx = np.unique(np.linspace(0, n - 1, min(rows, n)).astype(np.int64))
        self.rows = train.take(idx)
        self.fm, self.what = fm, what
        self.spe = max(int(steps_per_epoch), 1)
        self.batch = int(eval_batch_size)
        self.gap = gap
        self.start_share = self.top_share(start)
        self.active = self.start_share < DEGENERATE_SHARE
        self.kept: tuple | None = None
        self.kept_epoch: int | None = None
        self.kept_gap: float | None = None
        # unmet_above (with gap): a phase that ends with its gap above it returns its most accurate epoch whose
        # gap was at most that (the "feasible" one), else the smallest-gap one when that is smaller than the end's
        self.unmet_above = None if gap is None or unmet_above is None else float(unmet_above)
        self.feasible: tuple | None = None
        self.feasible_epoch: int | None = None
        self.feasible_gap: float | None = None
        self.feasible_acc: float | None = None

    def _logits(self, state: TrainState) -> np.ndarray:
        return rows_over_split(logits_step(self.fm), (state.params, state.masks, state.model_state), self.rows,
                               self.batch)

    @staticmethod
    def _share(logits: np.ndarray) -> float:
        counts = np.bincount(np.argmax(logits, axis=-1))
        return float(counts.max() / max(counts.sum(), 1))

    def top_share(self, state: TrainState) -> float:
        """Share of the guard's training rows given the most frequent prediction (evaluation mode)."""
        return self._share(self._logits(state))

    def hook(self, inner: Callable | None = None) -> Callable:
        """A ``fit`` hook: ``inner`` first (if any), then, at every epoch's end whose model is not degenerate, that
        model kept if it is the best so far (the smallest gap, or the latest). Keeps host state, so its phase restarts rather than resumes (as any such hook)."""
        def hook(state: TrainState, step: int) -> TrainState:
            if inner is not None:
                state = inner(state, step)
            if self.active and step > 0 and step % self.spe == 0:
                logits = self._logits(state)
                if self._share(logits) < DEGENERATE_SHARE:
                    gap = None if self.gap is None else float(self.gap(logits, self.rows))
                    epoch = step // self.spe
                    if gap is None or self.kept_gap is None or gap <= self.kept_gap:
                        self.kept = self._copy(state)
                        self.kept_epoch, self.kept_gap = epoch, gap
                    if self.unmet_above is not None and gap <= self.unmet_above:
                        acc = float(np.mean(np.argmax(logits, axis=-1) == self.rows.y))
                        if self.feasible_acc is None or acc >= self.feasible_acc:
                            self.feasible = self._copy(state)
                            self.feasible_epoch, self.feasible_gap, self.feasible_acc = epoch, gap, acc
            return state
        return hook

    @staticmethod
    def _copy(state: TrainState) -> tuple:
        # host copies that no later (donating) step can touch, whatever device_get returns
        return jax.tree.map(lambda a: np.array(a, copy=True),
                            jax.device_get((state.params, state.model_state, state.masks)))

    @staticmethod
    def _restore(state: TrainState, kept: tuple) -> TrainState:
        params, model_state, masks = jax.device_put(kept)
        return state.replace(params=params, model_state=model_state, masks=masks)

    def _finish_unmet(self, state: TrainState, logits: np.ndarray) -> tuple[TrainState, dict | None]:
        """The phase ended with a model that is not degenerate: if its gap is above ``unmet_above``, an earlier
        epoch (see ``__init__``)."""
        if self.unmet_above is None:
            return state, None
        final = float(self.gap(logits, self.rows))
        if final <= self.unmet_above:
            return state, None
        info = {"reason": "unmet", "final_gap": round(final, 4), "unmet_above": self.unmet_above}
        if self.feasible is not None:
            kept, epoch, gap, why = self.feasible, self.feasible_epoch, self.feasible_gap, "the most accurate epoch"
            info["restored_accuracy"] = round(self.feasible_acc, 4)
        elif self.kept is not None and self.kept_gap is not None and self.kept_gap < final:
            kept, epoch, gap, why = self.kept, self.kept_epoch, self.kept_gap, "no epoch was within it; the one"
        else:
            return state, None
        info.update(restored_epoch=epoch, restored_gap=round(gap, 4))
        tail = (f"whose gap there was within it (epoch {epoch}, gap {gap:.4f})" if self.feasible is not None else
                f"with the smallest gap there (epoch {epoch}, gap {gap:.4f})")
        warn(f"{self.what} ended with a parity gap of {final:.4f} on training rows, above twice its bound "
             f"(2 tau = {self.unmet_above:g}); returned {why} {tail}. guard_unmet=false returns the final model")
        return self._restore(state, kept), info

    def finish(self, state: TrainState) -> tuple[TrainState, dict | None]:
        """``(state, info)``: the phase's final state, or the kept one when the final one predicts one class
        for at least ``DEGENERATE_SHARE`` of the guard's rows, or (with ``unmet_above``) ends with its gap above
        that bound; ``info`` says what happened (None when the guard did nothing)."""
        if not self.active:
            return state, None
        logits = self._logits(state)
        share = self._share(logits)
        if share < DEGENERATE_SHARE:
            return self._finish_unmet(state, logits)
        info = {"final_top_share": round(share, 4), "start_top_share": round(self.start_share, 4),
                "restored_epoch": self.kept_epoch}
        if self.kept_gap is not None:
            info["restored_gap"] = round(self.kept_gap, 4)
        if self.kept is None:
            warn(f"{self.what} ended at a constant classifier (one class for {share:.1%} of training rows) and "
                 f"no epoch before it was not one; returned as it is")
            return state, info
        which = "the last" if self.gap is None else "the one with the smallest parity gap on training rows of those"
        warn(f"{self.what} ended at a constant classifier (one class for {share:.1%} of training rows, which "
             f"meets any parity bound); returned the model of epoch {self.kept_epoch}, {which} that were not "
             f"one. A looser tau or a smaller dual_lr make it less likely; collapse_guard=false "
             f"returns the final model")
        return self._restore(state, self.kept), info


__all__ = ["CollapseGuard", "GUARD_ROWS"]
