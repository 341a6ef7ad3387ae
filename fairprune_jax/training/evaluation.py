"""Evaluation over a whole split, in two loops only: the :class:`Evaluator` for additive counts (reset /
update / compute, flax ``nnx.metrics``' pattern; :func:`sum_over_split` runs it over a split: the group and
class counts behind every metric, :func:`evaluate`; the paired dense-vs-pruned counts behind the
certificate, :func:`evaluate_paired`; FairGRAPE's per-group importance, an accumulating step) and
:func:`rows_over_split` for per-row outputs (the eval-mode logits of :func:`split_logits`). Batches are split
over a device mesh when there is one; padding rows have ``w = 0``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.data.base import Split, eval_batches
from fairprune_jax.metrics import certify, fairness
from fairprune_jax.models import FunctionalModel
from fairprune_jax.training import distributed
from fairprune_jax.training.losses import cross_entropy, masked_forward
from fairprune_jax.training.state import TrainState


def make_eval_step(fm: FunctionalModel, num_groups: int, num_classes: int, positive_label: int = 1, *,
                   per_class: bool = False) -> Callable[..., tuple]:
    """Jitted ``(params, masks, model_state, batch) -> (group counts, class counts)``.

    ``per_class``: a third output, the :class:`fairness.ClassGroupCounts` behind DP / EO of every class vs
    the rest (for a multi-class target's report), from the same forward pass.
    """

    def step(params, masks, model_state, batch):
        logits, _ = masked_forward(fm, params, masks, model_state, batch["x"], train=False)
        per = cross_entropy(logits, batch["y"])
        by_group = fairness.group_counts(logits, batch["y"], batch["g"], num_groups, loss=per,
                                         weights=batch["w"], positive_label=positive_label)
        by_class = fairness.group_counts(logits, batch["y"], batch["y"], num_classes, loss=per,
                                         weights=batch["w"], positive_label=positive_label)
        if per_class:
            return by_group, by_class, fairness.class_group_counts(logits, batch["y"], batch["g"], num_groups,
                                                                   num_classes, weights=batch["w"])
        return by_group, by_class

    return jax.jit(step)


def evaluate(eval_step: Callable, state: TrainState, split: Split, batch_size: int = 512, *,
             mesh: Any = None) -> tuple:
    """Sum group and class counts (and, from a ``per_class`` step, the class-group counts) over a whole
    split (numpy, float64).

    With a ``mesh`` (default: :func:`distributed.current_mesh`) the batches are
    split over its devices (the batch size is rounded up to a multiple of the
    device count; padding rows have ``w = 0``) and the counts are global.
    """
    totals = sum_over_split(eval_step, (state.params, state.masks, state.model_state), split, batch_size,
                            mesh=mesh)
    return tuple(type(t)(*t) for t in totals)


class Evaluator:
    """Additive counts over batches: ``reset()``, ``update(batch)`` per batch, ``compute()`` for the totals
    (flax ``nnx.metrics``' pattern). Every whole-split evaluation of the library is one of these, run by
    :func:`sum_over_split`: the runner's counts, checkpoint selection, the methods that evaluate during
    training, the certificate's paired counts.

    ``step(*args, batch)`` returns a pytree of counts for one batch, which the evaluator adds up (on the
    device, in batch order). With ``init`` the step *accumulates* instead: ``step(total, *args, batch)``
    returns the new total, starting from ``init`` (for a total too large to hold twice, e.g. per-group
    importance: the step may donate it). ``args`` are replicated over the mesh's devices (default:
    :func:`distributed.current_mesh`) and each batch is split over them, so the counts are global.
    """

    def __init__(self, step: Callable, args: Any = (), *, mesh: Any = None, init: Any = None):
        self.mesh = mesh if mesh is not None else distributed.current_mesh()
        self.step, self.init = step, init
        self.args = distributed.replicate(args, self.mesh) if self.mesh is not None else args
        self._sync = distributed.sync_each_step(self.mesh)
        self.reset()

    def batch_size(self, wanted: int, rows: int) -> int:
        """The evaluation batch size for a split of ``rows`` rows (a multiple of the mesh's device count)."""
        bs = min(int(wanted), max(int(rows), 1))
        return distributed.round_up(bs, self.mesh) if self.mesh is not None else bs

    def reset(self) -> None:
        """Start a new total (``init``, or nothing yet)."""
        self.total = self.init

    def update(self, batch: dict) -> None:
        """Add one batch's counts (its padding rows have ``w = 0``)."""
        batch = distributed.shard_batch(batch, self.mesh)
        if self.init is not None:
            out = self.total = self.step(self.total, *self.args, batch)
        else:
            out = self.step(*self.args, batch)
            self.total = out if self.total is None else jax.tree.map(jnp.add, self.total, out)
        if self._sync:
            jax.block_until_ready(out)

    def compute(self, *, host: bool = True) -> Any:
        """The totals: float64 numpy (``host=False``: the device arrays as they are)."""
        if not host:
            return self.total
        return jax.tree.map(lambda v: np.asarray(v, np.float64), self.total)


def sum_over_split(step: Callable, args: Any, split: Split, batch_size: int = 512, *, mesh: Any = None,
                   init: Any = None, host: bool = True, pad: str = "zeros") -> Any:
    """``step(*args, batch)`` summed over every evaluation batch of ``split`` by an :class:`Evaluator` (a
    pytree of additive counts, returned as float64 numpy unless ``host=False``); ``init``: an accumulating
    step (see :class:`Evaluator`); ``pad``: how the last batch is filled (:func:`data.base.eval_batches`)."""
    ev = Evaluator(step, args, mesh=mesh, init=init)
    for batch in eval_batches(split, ev.batch_size(batch_size, len(split)), pad=pad):
        ev.update(batch)
    return ev.compute(host=host)


def logits_step(fm: FunctionalModel) -> Callable:
    """Jitted ``(params, masks, model_state, batch) -> logits`` in evaluation mode: the one forward pass that
    the per-row evaluations share (made once per model and kept on it)."""
    step = fm.__dict__.get("_logits_step")
    if step is None:
        step = jax.jit(lambda p, m, s, batch: masked_forward(fm, p, m, s, batch["x"], train=False)[0])
        fm.__dict__["_logits_step"] = step
    return step


def rows_over_split(step: Callable, args: Any, split: Split, batch_size: int = 512) -> np.ndarray:
    """``step(*args, batch)`` for every evaluation batch of ``split``, the rows concatenated in split order
    (padding dropped): the per-row counterpart of :func:`sum_over_split`, for what does not add up over
    batches (a surrogate over all rows, per-row correctness, logits to compare)."""
    bs = min(batch_size, max(len(split), 1))
    return np.concatenate([np.asarray(step(*args, b))[b["w"] > 0] for b in eval_batches(split, bs)])


def split_logits(fm: FunctionalModel, params: Any, masks: Any, model_state: Any, split: Split,
                 batch_size: int = 512) -> np.ndarray:
    """Evaluation-mode logits of the masked model on every row of ``split`` (split order)."""
    return rows_over_split(logits_step(fm), (params, masks, model_state), split, batch_size)


def make_paired_eval_step(fm: FunctionalModel, num_groups: int, num_classes: int) -> Callable:
    """Jitted ``(dense (params, masks, model_state), pruned (...), batch) -> certify.paired_counts``."""
    def step(dense, pruned, batch):
        d_logits, _ = masked_forward(fm, *dense, batch["x"], train=False)
        p_logits, _ = masked_forward(fm, *pruned, batch["x"], train=False)
        return certify.paired_counts(d_logits, p_logits, batch["y"], batch["g"], batch["w"], num_groups,
                                     num_classes)

    return jax.jit(step)


def evaluate_paired(paired_step: Callable, dense: TrainState, pruned: TrainState, split: Split,
                    batch_size: int = 512, *, mesh: Any = None) -> dict[str, np.ndarray]:
    """Paired dense-vs-pruned counts over a whole split (the input of :func:`certify.certificate`)."""
    args = ((dense.params, dense.masks, dense.model_state), (pruned.params, pruned.masks, pruned.model_state))
    return sum_over_split(paired_step, args, split, batch_size, mesh=mesh)
