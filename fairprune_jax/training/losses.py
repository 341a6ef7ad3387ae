"""The masked forward pass and the losses a step is made of: per-row cross-entropy, the mean over a batch's real
rows (``w`` > 0), and distillation from the dense model (its weights carried in ``state.extra.teacher``,
the KL of the model's predictions from the teacher's).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fairprune_jax.models import FunctionalModel
from fairprune_jax.sparsity.masks import apply_masks
from fairprune_jax.training.state import Carry, TrainState, Weights, carried, carry_of


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)


def weighted_mean(values: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def masked_forward(fm: FunctionalModel, params: Any, masks: Any, model_state: Any, x: jax.Array,
                   train: bool) -> tuple[jax.Array, Any]:
    """Logits of the masked model (``params * mask``) and the updated model state."""
    if masks is not None:
        params = apply_masks(params, masks)
    return fm.apply(params, model_state, x, train=train)


def teacher_extra(dense: TrainState) -> Carry:
    """A :class:`Carry` whose ``teacher`` lets a step distil from ``dense`` (copied: train steps donate their
    state)."""
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    return Carry(teacher=Weights(copy(dense.params), copy(dense.model_state)))


def without_teacher(state: TrainState) -> TrainState:
    """``state`` with the teacher of :func:`teacher_extra` removed from ``extra`` (a finished method's result)."""
    if not isinstance(state.extra, Carry) or state.extra.teacher is None:
        return state
    return state.replace(extra=carried(carry_of(state).replace(teacher=None)))


def distill_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """``batch["distill"]`` times the mean KL(teacher || model) of the batch's rows; 0 without a teacher.

    :func:`make_step` with ``distill > 0`` puts the dense model's logits (eval mode, no gradient) into
    ``batch["teacher_logits"]``. Matching the dense model's predictions lowers the number of rows whose
    correctness changes, and with it the width of the certificate's psi_g intervals.
    """
    if "teacher_logits" not in batch:
        return jnp.zeros((), jnp.float32)
    t = jax.nn.log_softmax(batch["teacher_logits"].astype(jnp.float32), -1)
    s = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(t) * (t - s), -1)
    return batch["distill"] * weighted_mean(kl, batch["w"])
