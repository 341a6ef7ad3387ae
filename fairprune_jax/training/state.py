"""The training state and its optimizer: :class:`TrainState` (params, optimizer state, model state, PRNG key,
step, first non-finite step, a method's ``extra``), where the masks and the constraint multipliers live (in the
optimizer state, around the primal optimizer's own state: :func:`primal_state`, :func:`with_primal`), a fresh
state (:func:`create_state`) and the optimizer of the dense run and of every fine-tuning (:func:`make_optimizer`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fairprune_jax.constraints import constrained
from fairprune_jax.core.config import OPTIMIZERS
from fairprune_jax.sparsity import pruning
from fairprune_jax.sparsity.masks import apply_masks


def make_optimizer(name: str, lr: float, weight_decay: float = 0.0,
                   total_steps: int | None = None) -> optax.GradientTransformation:
    """Adam(W) or SGD with momentum 0.9; a cosine decay when ``total_steps`` is known.

    The optimizer of the dense run and of every method's fine-tuning (``lr`` may also be an optax schedule).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    schedule = optax.cosine_decay_schedule(lr, max(total_steps, 1)) if total_steps else lr
    if name == "adam":
        return optax.adamw(schedule, weight_decay=weight_decay) if weight_decay else optax.adam(schedule)
    tx = optax.sgd(schedule, momentum=0.9, nesterov=True)
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx


class Weights(NamedTuple):
    """A model's weights and its state (BatchNorm statistics): a distillation teacher, a selected checkpoint."""

    params: Any
    model_state: Any


@struct.dataclass
class Carry:
    """What the library's methods carry from step to step beside the weights (``TrainState.extra``): named,
    typed fields, so a misspelt or foreign entry is an error (``Carry.replace`` rejects unknown names) instead
    of a silently new key. A field is ``None`` when a method does not use it (an empty pytree: nothing to jit).

    * ``teacher``: the dense model's :class:`Weights` for distillation (:func:`losses.teacher_extra`);
    * ``buffer``, ``overall``: per-group and overall replay buffers of the constrained fine-tuning (ceag, el);
    * ``val_correct``: the latest correctness of every held-out row (ceag's held-out estimates);
    * ``trajectory``: the recorded multipliers / violations (``group_finetune.Trajectory``);
    * ``selection``: the checkpoint selection's best weights, score and log (``group_finetune.Selection``);
    * ``targets``: ceag's per-group targets eps_g when ``aim_refresh`` plans them again during fine-tuning
      (``certificate_plan.Plan``: the targets in force and their log);
    * ``fair``: the fairness objective's estimates (``fairness_objective.FairState``; bifp family);
    * ``scores``, ``mask_opt``: mask scores trained by the bi-level search and their optimizer's state (bifp);
    * ``votes``: Ballot's per-epoch gradient and accuracy accumulators (``voting.Votes``);
    * ``trained``: fair_scratch's trained mask scores (and output bias).

    A user's own step (:func:`train.make_step`) may carry any pytree of its own in ``extra`` instead.
    """

    teacher: Any = None
    buffer: Any = None
    overall: Any = None
    val_correct: Any = None
    trajectory: Any = None
    selection: Any = None
    targets: Any = None
    fair: Any = None
    scores: Any = None
    mask_opt: Any = None
    votes: Any = None
    trained: Any = None

    def is_empty(self) -> bool:
        """Whether no field is set."""
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))


def carry_of(state: "TrainState") -> Carry:
    """``state.extra`` as a :class:`Carry` (an empty one when the state carries nothing)."""
    extra = state.extra
    if extra is None:
        return Carry()
    if not isinstance(extra, Carry):
        raise TypeError(f"this state's extra is a {type(extra).__name__}, not the library's Carry")
    return extra


def carried(carry: Carry) -> Carry | None:
    """``carry``, or ``None`` when it holds nothing (a finished method's state carries nothing)."""
    return None if carry is None or carry.is_empty() else carry


@struct.dataclass
class TrainState:
    """Everything a training run carries from step to step.

    The masks live in the optimizer state (a :class:`pruning.MaskState`, or the :class:`pruning.PrunerState`
    of a :class:`pruning.Pruner`): ``state.masks`` reads them there (None: a dense model), and
    ``state.replace(masks=m)`` / ``state.with_masks(m)`` put new ones there. So do a constrained method's
    multipliers (:class:`constrained.Multipliers`): ``state.dual``, ``state.with_dual(d)``. The optimizer's own
    state inside those holders is :func:`primal_state`.
    """

    params: Any
    opt_state: Any
    model_state: Any
    rng: jax.Array
    step: jax.Array
    nan_step: jax.Array  # first step with a non-finite loss, -1 while all are finite
    extra: Any = None

    @property
    def masks(self) -> Any:
        """The masks held in the optimizer state (None when nothing is pruned)."""
        return pruning.find_masks(self.opt_state)

    def with_masks(self, masks: Any) -> "TrainState":
        """This state with ``masks`` in its optimizer state (the params are not touched)."""
        return dataclasses.replace(self, opt_state=pruning.with_masks(self.opt_state, masks))

    @property
    def dual(self) -> Any:
        """The constraint multipliers held in the optimizer state (a :class:`constrained.DualState`; None when
        the run has no constraints)."""
        s = self.opt_state
        while isinstance(s, _HOLDERS):
            if isinstance(s, constrained.Multipliers):
                return s.dual
            s = s.inner
        return None

    def with_dual(self, dual: Any) -> "TrainState":
        """This state with the multipliers ``dual`` in its optimizer state (``None`` removes them)."""
        if dual is None:
            return dataclasses.replace(self, opt_state=_drop_multipliers(self.opt_state))
        if self.dual is not None:
            return dataclasses.replace(self, opt_state=_set_dual(self.opt_state, dual))
        primal = constrained.Multipliers(dual, primal_state(self.opt_state))
        return dataclasses.replace(self, opt_state=with_primal(self.opt_state, primal))


#: What the library keeps in a training state's optimizer state around the primal optimizer's own state: the
#: masks (:class:`pruning.MaskState`) and the constraint multipliers (:class:`constrained.Multipliers`).
_HOLDERS = (pruning.MaskState, constrained.Multipliers)


def primal_state(opt_state: Any) -> Any:
    """The state of the optimizer of the params (or of a method's scores) inside the library's holders."""
    while isinstance(opt_state, _HOLDERS):
        opt_state = opt_state.inner
    return opt_state


def with_primal(opt_state: Any, primal: Any) -> Any:
    """``opt_state`` with the state inside its holders replaced by ``primal`` (masks and multipliers kept)."""
    if isinstance(opt_state, _HOLDERS):
        return opt_state._replace(inner=with_primal(opt_state.inner, primal))
    return primal


def _set_dual(opt_state: Any, dual: Any) -> Any:
    if isinstance(opt_state, constrained.Multipliers):
        return opt_state._replace(dual=dual)
    return opt_state._replace(inner=_set_dual(opt_state.inner, dual))


def _drop_multipliers(opt_state: Any) -> Any:
    if isinstance(opt_state, constrained.Multipliers):
        return opt_state.inner
    if isinstance(opt_state, _HOLDERS):
        return opt_state._replace(inner=_drop_multipliers(opt_state.inner))
    return opt_state


def _holds_masks(opt_state: Any) -> bool:
    while isinstance(opt_state, _HOLDERS):
        if isinstance(opt_state, pruning.MaskState):
            return True
        opt_state = opt_state.inner
    return False


def _replace(self: TrainState, **updates: Any) -> TrainState:
    """``dataclasses.replace``, where ``masks=`` and ``dual=`` go into the optimizer state (after a new
    ``opt_state``)."""
    masks = updates.pop("masks", _KEEP)
    dual = updates.pop("dual", _KEEP)
    new = dataclasses.replace(self, **updates)
    if masks is not _KEEP:
        new = new.with_masks(masks)
    return new if dual is _KEEP else new.with_dual(dual)


_KEEP = object()
TrainState.replace = _replace      # (flax's struct.dataclass sets its own replace on the class)


def create_state(params: Any, model_state: Any, tx: optax.GradientTransformation, *, masks: Any = None,
                 seed: int = 0, extra: Any = None) -> TrainState:
    """A fresh state; with ``masks`` the params are masked right away.

    Params and model state are copied: train steps donate their input state,
    and the caller's arrays (a dense model reused by several methods) must
    survive that.
    """
    params = jax.tree.map(jnp.copy, params)
    model_state = jax.tree.map(jnp.copy, model_state)
    masks = None if masks is None else jax.tree.map(jnp.copy, masks)
    if masks is not None:
        params = apply_masks(params, masks)
    return TrainState(params=params, opt_state=pruning.with_masks(tx.init(params), masks), model_state=model_state,
                      rng=jax.random.key(seed), step=jnp.zeros((), jnp.int32),
                      nan_step=jnp.full((), -1, jnp.int32), extra=extra)
