"""What a pruning method is, the run configuration, and the method registry.

A method takes the trained dense state and a :class:`Context` and returns the
pruned (and fine-tuned) state. Everything shared (optimizers, masked steps,
evaluation, the prunable template) comes from the context, so a method file
holds only what is specific to its paper.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import optax

from fairprune_jax import masks as masks_lib
from fairprune_jax.config import (DEFAULT_CERTIFY_EPS, OPTIMIZERS,  # noqa: F401  (re-exported)
                                  RunConfig)
from fairprune_jax.data.base import Dataset
from fairprune_jax.models import FunctionalModel
from fairprune_jax.rewind import save_masks
from fairprune_jax.train import TrainState, create_state, fit, make_train_step


def make_optimizer(name: str, lr: float, weight_decay: float = 0.0,
                   total_steps: int | None = None) -> optax.GradientTransformation:
    """Adam(W) or SGD with momentum 0.9; a cosine decay when ``total_steps`` is known."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    schedule = optax.cosine_decay_schedule(lr, max(total_steps, 1)) if total_steps else lr
    if name == "adam":
        return optax.adamw(schedule, weight_decay=weight_decay) if weight_decay else optax.adam(schedule)
    tx = optax.sgd(schedule, momentum=0.9, nesterov=True)
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx


@dataclasses.dataclass
class Context:
    """What a method needs from the run: config, data, model, shared steps."""

    config: RunConfig
    dataset: Dataset
    fm: FunctionalModel
    template: Any                  # prunable leaves (True) vs kept dense (None)
    flops: dict[str, float]
    layer_order: list[str]
    eval_step: Callable
    dense_train_counts: Any = None   # GroupCounts of the dense model on the train split
    dense_train_class_counts: Any = None
    augment: Callable | None = None
    # Results that depend only on the dense run and a method's options, not on the sparsity, shared by every
    # run of one prepared dense model (dataclasses.replace keeps the same dict): e.g. Ballot's voting run.
    memo: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def steps_per_epoch(self) -> int:
        return max(len(self.dataset.train) // self.config.batch_size, 1)

    def finetune_tx(self, epochs: int | None = None, lr: float | None = None) -> optax.GradientTransformation:
        epochs = self.config.ft_epochs if epochs is None else epochs
        return make_optimizer(self.config.optimizer, self.config.ft_lr if lr is None else lr,
                              self.config.weight_decay, total_steps=epochs * self.steps_per_epoch)

    def prune_phase(self, dense: TrainState, template: Any, prune_epochs: int
                    ) -> tuple[TrainState, optax.GradientTransformation, int, int]:
        """Start of a masked pruning phase: ``(state, tx, epochs, steps)``, all weights live.

        ``prune_epochs`` -1 means half the fine-tuning epochs, at least 1; the optimizer decays over the phase.
        """
        epochs = int(prune_epochs)
        if epochs < 0:
            epochs = max(self.config.ft_epochs // 2, 1)
        tx = self.finetune_tx(epochs=epochs)
        state = self.masked_state(dense, masks_lib.ones_like_template(dense.params, template), tx)
        return state, tx, epochs, epochs * self.steps_per_epoch

    def masked_state(self, dense: TrainState, masks: Any, tx: optax.GradientTransformation,
                     extra: Any = None) -> TrainState:
        """A fresh fine-tuning state from dense weights under ``masks`` (new optimizer state)."""
        return create_state(dense.params, dense.model_state, tx, masks=masks, seed=self.config.seed + 1,
                            extra=extra)

    def masks_from_scores(self, scores: Any, sparsity: float, prev_masks: Any = None,
                          template: Any = None) -> Any:
        return masks_lib.masks_from_scores(scores, self.template if template is None else template, sparsity,
                                           self.config.distribution, prev_masks=prev_masks)

    def template_for(self, params: Any, *, exclude_first: bool, exclude_last: bool) -> Any:
        """A prunable template with the given first/last-layer exclusions (or the run's own flags)."""
        return masks_lib.prunable_template(params, layer_order=self.layer_order,
                                           exclude_first=exclude_first or self.config.exclude_first,
                                           exclude_last=exclude_last or self.config.exclude_last)

    def first_layer_is_conv(self, params: Any) -> bool:
        leaves = dict(masks_lib.named_leaves(params))
        return bool(self.layer_order) and leaves[self.layer_order[0]].ndim == 4

    def output_location(self, name: str) -> str | None:
        """Where :meth:`save_masks` writes ``name`` (for a report), or None when the run has no output folder."""
        return str(Path(self.config.out) / name) if self.config.out else None

    def save_masks(self, name: str, masks: Any, report: dict | None = None, **arrays: Any) -> str | None:
        """Save ``masks`` (and named array trees, and ``report``) as ``name`` (an ``.npz`` path relative to the run's
        output folder, :func:`rewind.save_masks`); the path written, or None when the run has no output folder.
        A method writes to disk only through here: it never sees the folder."""
        where = self.output_location(name)
        return None if where is None else str(save_masks(Path(where), masks, report, **arrays))

    def finetune(self, state: TrainState, tx: optax.GradientTransformation, *, epochs: int | None = None,
                 step_fn: Callable | None = None, hook: Callable | None = None,
                 desc: str = "fine-tune") -> tuple[TrainState, dict]:
        """Masked training of ``state`` on the train split (plain cross-entropy unless ``step_fn``)."""
        epochs = self.config.ft_epochs if epochs is None else epochs
        step_fn = step_fn or make_train_step(self.fm, tx, augment=self.augment)
        return fit(state, step_fn, self.dataset.train, epochs=epochs, batch_size=self.config.batch_size,
                   seed=self.config.seed + 1000, desc=desc, hook=hook, progress=self.config.progress)


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered pruning method."""

    name: str
    run: Callable[[Context, TrainState], tuple[TrainState, dict]]
    description: str
    options: dict = dataclasses.field(default_factory=dict)   # option name -> default
    # Whether its final masks are structured (whole units, compactable by compact.py): True, or the name
    # of the bool option that decides it (bifp's ``structured``).
    structured: bool | str = False
    # ``check(options)`` raises ValueError on a bad option value; run by :func:`method_options`, so a bad value
    # fails in ``validate_config`` before any data loads.
    check: Callable[[dict], None] | None = None

    def is_structured(self, options: dict) -> bool:
        """True when a run with these (validated) options ends with structured masks."""
        if isinstance(self.structured, str):
            return bool(options[self.structured])
        return bool(self.structured)


METHODS: dict[str, Method] = {}


def register(name: str, description: str, options: dict | None = None, *, structured: bool | str = False,
             check: Callable[[dict], None] | None = None):
    """Decorator: register ``run(ctx, dense_state) -> (pruned_state, info)`` under ``name``.

    ``structured``: the method's masks remove whole units (see :class:`Method`). ``check``: validates the
    option values (see :class:`Method`). After adding a method or changing its description or options, run
    ``python -m fairprune_jax.method_listing``: ``fairprune methods`` prints that snapshot of the registry
    without importing JAX, and ``tests/test_install.py`` fails while it disagrees with the registry.
    """
    def deco(fn):
        METHODS[name] = Method(name, fn, description, dict(options or {}), structured, check)
        return fn
    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid choices: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def structured_methods() -> list[str]:
    """Names of the registered methods that can end with structured masks."""
    return sorted(name for name, m in METHODS.items() if m.structured)


def method_options(method: Method, given: dict) -> dict:
    """The method's defaults overridden by ``given``; unknown keys are an error naming the valid ones."""
    unknown = set(given) - set(method.options)
    if unknown:
        valid = ", ".join(sorted(method.options)) or "(none)"
        raise ValueError(f"method {method.name!r} has no option(s) {sorted(unknown)}; valid options: {valid}")
    out = dict(method.options)
    for k, v in given.items():
        default = method.options[k]
        if isinstance(default, bool) and not isinstance(v, bool):
            words = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                     "off": False}
            if str(v).strip().lower() not in words:
                raise ValueError(f"method {method.name!r}: option {k!r} takes true or false; got {v!r}")
            out[k] = words[str(v).strip().lower()]      # bool("false") would be True
            continue
        out[k] = type(default)(v) if default is not None and not isinstance(v, type(default)) else v
    if method.check is not None:
        method.check(out)
    return out
