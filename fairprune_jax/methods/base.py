"""What a pruning method is, the run configuration, and the method registry.

A method takes a :class:`Context`, the trained dense state and its options (a
frozen dataclass, parsed and checked before any data loads) and returns the
pruned (and fine-tuned) state. Everything shared (optimizers, masked steps,
evaluation, the prunable template) comes from the context, so a method file
holds only what is specific to its paper.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairprune_jax.sparsity import masks as masks_lib
from fairprune_jax.sparsity.masks import save_masks
from fairprune_jax.core.config import BOOL_WORDS, DEFAULT_CERTIFY_EPS, OPTIMIZERS, RunConfig  # noqa: F401  (re-exported)
from fairprune_jax.data.base import Dataset, derived_seed
from fairprune_jax.models import FunctionalModel
from fairprune_jax.training.train import (TrainState, create_state, fit, make_optimizer, make_train_step,  # noqa: F401  (re-exported)
                                          teacher_extra, without_teacher)


#: Named random streams of a method, as offsets from the run's seed. The offsets are those the methods used
#: before the streams had names, kept so that every committed result stays the same; a stream added later
#: should take ``data.base.derived_seed(seed, n)`` (a hashed, collision-free seed) under a new name.
SEED_STREAMS = {
    "finetune_state": 1,        # the PRNG key of a masked fine-tuning state (dropout, augmentation)
    "ballot_vote_state": 2,     # Ballot's voting run
    "scores_state": 3,          # Fair Scratch's score-training state
    "random_scores": 7,         # one-shot random pruning's scores
    "popup_scores": 11,         # Fair Scratch's initial scores
    "finetune_batches": 1000,   # the batch order of fine-tuning (and BiFP's bi-level phase)
    "ballot_vote_batches": 2000,
    "scores_batches": 3000,     # Fair Scratch's score training
    "ballot_lth_batches": 7000,  # + epoch: the authors' LTH-style voting run
    "ballot_lth_grads": 7500,   # the batches its per-epoch vote gradients are summed over
    # the run's seed itself: what replays the dense run (its init, batch order and state key)
    "dense": 0,                 # the dense run and its replays (LTH's rewind to init, Ballot's vote run from init)
    "ceag_val_order": 0,        # the order in which CEAG refreshes its held-out estimates
}


def fold_in_seed(seed: int, name: str, offset: int = 0) -> int:
    """A 31-bit seed for stream ``name`` of ``seed``: ``jax.random.fold_in`` of the seed's key with the name's
    CRC-32 (stable across processes and Python versions), then with ``offset`` when it is not 0. ``"dense"``
    gives ``seed + offset``: the dense run's own seed, which LTH and Ballot replay."""
    if name == "dense":
        return int(seed) + int(offset)
    key = jax.random.fold_in(jax.random.key(int(seed)), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    if offset:
        key = jax.random.fold_in(key, int(offset))
    return int(jax.random.bits(key, dtype=jnp.uint32)) & 0x7FFFFFFF


#: Options that were renamed: the old name -> the new one (an old name is refused with the new one in the message).
RENAMED_OPTIONS = {"mode": "order"}

#: Named streams derived otherwise (kept for the committed results): ``"hashed"`` is
#: ``data.base.derived_seed(seed, n)``; ``"sequence"`` is numpy's ``SeedSequence([seed, n])`` (a Generator only).
DERIVED_STREAMS = {
    "ceag_holdout": ("hashed", 7),           # the rows CEAG holds out of its constrained phase
    "fairgrape_rows": ("hashed", 23),        # the training rows FairGRAPE scores importance on
    "ballot_holdout": ("sequence", 7013),    # the rows the authors' Ballot holds out of its vote run
}


@dataclasses.dataclass(frozen=True)
class MethodSettings:
    """The run's settings a method may read, and only those: its target, its budget and the training choices
    it shares with the dense run. A method never sees :class:`RunConfig` (the data source, the model's name,
    the outputs, its own name and raw options are the runner's): its options arrive parsed and checked, its
    random numbers through named streams (:meth:`Context.stream_seed`), its files through
    :meth:`Context.save_masks`."""

    sparsity: float
    distribution: str
    epochs: int                 # the dense run's (what LTH's rewind and Ballot's vote run replay)
    finetune_epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float                   # the dense run's
    finetune_lr: float
    optimizer: str
    weight_decay: float
    exclude_first: bool
    exclude_last: bool
    positive_label: int
    certify_level: float        # the certificate a method may aim at (ceag's aim=certificate)
    certify_interval: str
    model_options: dict         # the dense model's builder options (rebuilding its initialisation)
    progress: bool

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "MethodSettings":
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)
                      if f.name not in ("finetune_epochs", "finetune_lr")},
                   finetune_epochs=cfg.ft_epochs, finetune_lr=cfg.ft_lr)

    @property
    def ft_epochs(self) -> int:
        return self.finetune_epochs

    @property
    def ft_lr(self) -> float:
        return self.finetune_lr


@dataclasses.dataclass
class Context:
    """What a method needs from the run: its settings (not the run's config), data, model, shared steps."""

    settings: MethodSettings
    seed: int                       # read only through the named streams (stream_seed, stream_rng)
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
    # A folder kept between runs for this dense model (the dense-model cache of ``fairprune run``, a compare
    # grid's dense folder), where results that depend only on it and a method's settings are saved for a later
    # run (the gradually pruned start of ceag / nft / el); None: nothing is kept.
    cache_dir: Path | None = None
    # The run's output folder, written only through save_masks (None: nothing is written).
    output_dir: str | None = None
    # How the named streams derive from the seed (RunConfig.streams: fold_in or offset).
    streams: str = "fold_in"

    @classmethod
    def from_config(cls, cfg: RunConfig, **fields: Any) -> "Context":
        """The context of a run of ``cfg``: its method settings, seed and output folder, and ``fields``."""
        return cls(settings=MethodSettings.from_config(cfg), seed=cfg.seed, output_dir=cfg.out,
                   streams=cfg.streams, **fields)

    def with_config(self, cfg: RunConfig) -> "Context":
        """This context for another run of the same dense model (another method, sparsity or options)."""
        return dataclasses.replace(self, settings=MethodSettings.from_config(cfg), seed=cfg.seed,
                                   output_dir=cfg.out, streams=cfg.streams)

    def with_settings(self, **changes: Any) -> "Context":
        """This context with some settings changed (e.g. a smaller batch for a test)."""
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, **changes))

    def stream_seed(self, name: str, offset: int = 0) -> int:
        """The seed of the named random stream (:data:`SEED_STREAMS` or :data:`DERIVED_STREAMS`) with
        ``offset`` (e.g. an epoch). Methods draw every random number through a named stream
        (``tests/test_layering.py`` checks that no method reads the run's seed itself).

        ``streams="fold_in"`` (the default, :func:`fold_in_seed`): ``jax.random.fold_in(key(seed),
        crc32(name))``, folded with ``offset`` when it is not 0, as a 31-bit seed: every stream of every seed its
        own. ``"offset"``: ``seed + SEED_STREAMS[name] + offset`` (and the derived streams' own seeds), what
        every result before fold_in used; there seed 0's fine-tuning state shares seed 1's dense seed.
        ``"dense"`` is the run's seed itself in both (it replays the dense run)."""
        if name not in SEED_STREAMS and name not in DERIVED_STREAMS:
            raise KeyError(f"no random stream {name!r}; named streams: {', '.join([*SEED_STREAMS, *DERIVED_STREAMS])}")
        if self.streams == "fold_in":
            return fold_in_seed(self.seed, name, offset)
        if name in DERIVED_STREAMS:
            kind, n = DERIVED_STREAMS[name]
            if kind != "hashed":
                raise ValueError(f"stream {name!r} gives a numpy Generator only: use stream_rng")
            return derived_seed(self.seed, n) + offset
        return self.seed + SEED_STREAMS[name] + offset

    def stream_rng(self, name: str) -> "np.random.Generator":
        """A numpy Generator of the named stream (any of :data:`SEED_STREAMS` and :data:`DERIVED_STREAMS`)."""
        kind, n = DERIVED_STREAMS.get(name, ("seed", None))
        if kind == "sequence" and self.streams == "offset":
            return np.random.default_rng([self.seed, n])
        return np.random.default_rng(self.stream_seed(name))

    @property
    def steps_per_epoch(self) -> int:
        return max(len(self.dataset.train) // self.settings.batch_size, 1)

    def finetune_tx(self, epochs: int | None = None, lr: float | None = None) -> optax.GradientTransformation:
        epochs = self.settings.ft_epochs if epochs is None else epochs
        return make_optimizer(self.settings.optimizer, self.settings.ft_lr if lr is None else lr,
                              self.settings.weight_decay, total_steps=epochs * self.steps_per_epoch)

    def prune_phase(self, dense: TrainState, template: Any, prune_epochs: int
                    ) -> tuple[TrainState, optax.GradientTransformation, int, int]:
        """Start of a masked pruning phase: ``(state, tx, epochs, steps)``, all weights live.

        ``prune_epochs`` -1 means half the fine-tuning epochs, at least 1; the optimizer decays over the phase.
        """
        epochs = prune_epochs
        if epochs < 0:
            epochs = max(self.settings.ft_epochs // 2, 1)
        tx = self.finetune_tx(epochs=epochs)
        state = self.masked_state(dense, masks_lib.ones_like_template(dense.params, template), tx)
        return state, tx, epochs, epochs * self.steps_per_epoch

    def masked_state(self, dense: TrainState, masks: Any, tx: optax.GradientTransformation,
                     extra: Any = None) -> TrainState:
        """A fresh fine-tuning state from dense weights under ``masks`` (new optimizer state)."""
        return create_state(dense.params, dense.model_state, tx, masks=masks, seed=self.stream_seed("finetune_state"),
                            extra=extra)

    def masks_from_scores(self, scores: Any, sparsity: float, prev_masks: Any = None,
                          template: Any = None) -> Any:
        return masks_lib.masks_from_scores(scores, self.template if template is None else template, sparsity,
                                           self.settings.distribution, prev_masks=prev_masks)

    def template_for(self, params: Any, *, exclude_first: bool, exclude_last: bool) -> Any:
        """A prunable template with the given first/last-layer exclusions (or the run's own flags)."""
        return masks_lib.prunable_template(params, layer_order=self.layer_order,
                                           exclude_first=exclude_first or self.settings.exclude_first,
                                           exclude_last=exclude_last or self.settings.exclude_last)

    def first_layer_is_conv(self, params: Any) -> bool:
        leaves = dict(masks_lib.named_leaves(params))
        return bool(self.layer_order) and leaves[self.layer_order[0]].ndim == 4

    def output_location(self, name: str) -> str | None:
        """Where :meth:`save_masks` writes ``name`` (for a report), or None when the run has no output folder."""
        return str(Path(self.output_dir) / name) if self.output_dir else None

    def save_masks(self, name: str, masks: Any, report: dict | None = None, **arrays: Any) -> str | None:
        """Save ``masks`` (and named array trees, and ``report``) as ``name`` (an ``.npz`` path relative to the run's
        output folder, :func:`masks.save_masks`); the path written, or None when the run has no output folder.
        A method writes to disk only through here: it never sees the folder. In a multi-process run process 0
        alone writes (the others return the same path): two writers of one file on a shared filesystem could
        leave it torn."""
        where = self.output_location(name)
        if where is None:
            return None
        if jax.process_index() == 0:
            save_masks(Path(where), masks, report, **arrays)
        return str(Path(where))

    def finetune_masks(self, dense: TrainState, masks: Any, *, hook: Callable | None = None,
                       distill: float = 0.0) -> tuple[TrainState, dict]:
        """Fine-tune ``dense`` under ``masks`` with the run's fine-tuning optimizer and budget (``hook`` may change
        the masks on a schedule, e.g. :func:`gradual.score_hook`; ``distill`` times the KL to ``dense``):
        ``(pruned state, history)``. With a score it is a whole one-shot or gradual method."""
        tx = self.finetune_tx()
        extra = teacher_extra(dense) if distill > 0 else None
        state, hist = self.finetune(self.masked_state(dense, masks, tx, extra=extra), tx, hook=hook, distill=distill)
        return without_teacher(state), hist

    def finetune(self, state: TrainState, tx: optax.GradientTransformation, *, epochs: int | None = None,
                 step_fn: Callable | None = None, hook: Callable | None = None,
                 desc: str = "fine-tune", distill: float = 0.0) -> tuple[TrainState, dict]:
        """Masked training of ``state`` on the train split (plain cross-entropy unless ``step_fn``; plus
        ``distill`` times the KL to ``state.extra.teacher`` when > 0, see :func:`train.teacher_extra`)."""
        epochs = self.settings.ft_epochs if epochs is None else epochs
        step_fn = step_fn or make_train_step(self.fm, tx, augment=self.augment, distill=distill)
        return fit(state, step_fn, self.dataset.train, epochs=epochs, batch_size=self.settings.batch_size,
                   seed=self.stream_seed("finetune_batches"), desc=desc, hook=hook, progress=self.settings.progress)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a method that takes none."""


#: The words a bool option reads (any case, surrounding spaces ignored); ``bool("false")`` would be True.


def _as(value: Any, kind: Any) -> Any:
    """``value`` read as the field type ``kind`` (bool, int, float, str, or a union of them, ``None`` included:
    the first member that reads it wins); ValueError or TypeError when none does."""
    if kind is type(None):
        if value is None:
            return None
        raise ValueError
    if kind is bool:
        if isinstance(value, bool):
            return value
        return BOOL_WORDS[str(value).strip().lower()]        # KeyError: not a boolean word
    if kind in (int, float):
        if isinstance(value, bool):
            raise TypeError                                   # yes / no for a number is a mistake
        if kind is float:
            return float(value)
        if isinstance(value, int):
            return value
        number = float(value)                                 # "3", "3.0", 3.0: an integer; 2.5 is not
        if not number.is_integer():
            raise ValueError
        return int(number)
    if kind is str:
        return value if isinstance(value, str) else str(value)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        for member in typing.get_args(kind):
            try:
                return _as(value, member)
            except (ValueError, TypeError, KeyError):
                continue
        raise ValueError
    raise TypeError(f"option type {kind!r} is not supported")


def _supported(kind: Any) -> bool:
    """Whether :func:`_as` reads the field type ``kind``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return all(_supported(m) for m in typing.get_args(kind))
    return kind in (bool, int, float, str, type(None))


def _describe(kind: Any) -> str:
    """What a field of type ``kind`` takes, for an error message."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(names.get(m, str(m)) for m in typing.get_args(kind))
    return names.get(kind, str(kind))


@dataclasses.dataclass(frozen=True)
class DefaultChange:
    """A change of what an option does when left at its default, after which a result computed before it no longer
    matches the method run today with that option unset. ``revision``: the method's defaults revision that made
    the change (1, 2, ...; a result records the revision it ran at as ``method_info.defaults_revision``, 0 when
    it predates them); ``what``: the change in words; ``applies(cell)``: whether a result (its ``results.json``)
    would come out otherwise (e.g. two-class targets only). ``fairprune compare`` refuses to reuse such a finished
    cell unless the grid sets the option (``running/compare.stale_cell``)."""

    revision: int
    option: str
    what: str
    applies: Callable[[dict], bool] | None = None       # None: every result

    def affects(self, cell: dict) -> bool:
        """Whether the finished result ``cell`` would come out otherwise after this change."""
        return self.applies is None or bool(self.applies(cell))


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered pruning method.

    ``run(ctx, dense, opts) -> (pruned_state, info)``; ``opts`` is an instance of ``options_type``, a frozen
    dataclass whose fields are the method's ``--opt`` keys (name, type and default), parsed and value-checked by
    :meth:`parse` before any data loads.
    """

    name: str
    run: Callable[[Context, TrainState, Any], tuple[TrainState, dict]]
    description: str
    options_type: type = NoOptions
    # Whether its final masks are structured (whole units, compactable by compact.py): True, or the name
    # of the bool option that decides it (bifp's ``structured``).
    structured: bool | str = False
    # ``check(opts)`` raises ValueError naming the option on a bad value. It may return a completed copy
    # (``dataclasses.replace``) where an option's value follows from others (ballot's variant presets): the
    # method then receives that copy. Run by :meth:`parse`, so a bad value fails before any data loads.
    check: Callable[[Any], Any] | None = None
    # The option holding the bound on psi_g that the method promises (ceag's ``eps``): the certificate checks
    # that bound unless --certify-eps names another. None: the method promises none.
    psi_bound: str | None = None
    # ``no_nm(opts)``: why these options' masks cannot follow an N:M distribution (2:4 ...), or None. For a
    # method that picks its weights by its own rule rather than through masks.masks_from_scores / a Pruner;
    # checked before any data loads (``running.validation``), so 2:4 is never silently unstructured.
    no_nm: Callable[[Any], str | None] | None = None
    # Changes of what an option does at its default (:class:`DefaultChange`), newest last; a result records the
    # method's :attr:`defaults_revision` so that a grid does not mix results from before and after one.
    default_changes: tuple = ()

    @property
    def defaults_revision(self) -> int:
        """The number of the method's latest :class:`DefaultChange` (0: none)."""
        return max((c.revision for c in self.default_changes), default=0)

    def nm_refusal(self, opts: Any) -> str | None:
        """Why ``opts`` cannot give N:M masks (None: they can)."""
        return None if self.no_nm is None else self.no_nm(opts)

    def promised_bound(self, opts: Any) -> float | None:
        """The psi_g bound these (parsed) options promise, or None."""
        return None if self.psi_bound is None else float(getattr(opts, self.psi_bound))

    @property
    def options(self) -> dict[str, Any]:
        """Option name -> default, what ``fairprune methods`` lists: the method's own options first, then those
        of the shared groups it inherits (each class's fields in declaration order, most specific class first)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self.options_type)}
        order = [n for klass in self.options_type.__mro__ for n in vars(klass).get("__annotations__", {})]
        return {n: defaults[n] for n in dict.fromkeys(order) if n in defaults}

    def parse(self, given: dict) -> Any:
        """The options instance from ``given`` (``--opt`` values, a TOML table, ``prune(**options)``): each value
        read as its field's type, the rest defaults, then :attr:`check`. Unknown keys are an error naming the
        valid ones; a value its field cannot read is an error naming the option and its default."""
        unknown = set(given) - set(self.options)
        if unknown:
            valid = ", ".join(sorted(self.options)) or "(none)"
            renamed = [f"{k} is now called {RENAMED_OPTIONS[k]}" for k in sorted(unknown)
                       if RENAMED_OPTIONS.get(k) in self.options]
            raise ValueError(f"method {self.name!r} has no option(s) {sorted(unknown)}"
                             f"{' (' + '; '.join(renamed) + ')' if renamed else ''}; valid options: {valid}")
        types_ = typing.get_type_hints(self.options_type)
        values = {}
        for k, v in given.items():
            try:
                values[k] = _as(v, types_[k])
            except (ValueError, TypeError, KeyError):
                kind = types_[k]
                if kind is bool:
                    raise ValueError(f"method {self.name!r}: option {k!r} takes true or false; got {v!r}") from None
                raise ValueError(f"method {self.name!r}: option {k!r} takes {_describe(kind)} "
                                 f"(default {self.options[k]!r}); got {v!r}") from None
        opts = self.options_type(**values)
        for k, v in dataclasses.asdict(opts).items():    # nan / inf pass every range check below: refuse them
            if isinstance(v, float) and not math.isfinite(v) and not (v == float("inf") and k in INF_OPTIONS):
                raise ValueError(f"method {self.name!r}: option {k!r} must be a finite number; got {v!r}")
            # no float option of any method is signed (bounds, rates, weights, fractions): a negative one is a typo
            if isinstance(v, float) and v < 0:
                raise ValueError(f"method {self.name!r}: option {k!r} must be >= 0; got {v!r}"
                                 + (" (0: off)" if k == "distill" else ""))
        for k, v in dataclasses.asdict(opts).items():
            bad = out_of_range(k, v)
            if bad:
                raise ValueError(f"method {self.name!r}: option {k!r} {bad}; got {v!r}")
        if self.check is not None:
            checked = self.check(opts)
            opts = opts if checked is None else checked
        return opts

    def is_structured(self, opts: Any) -> bool:
        """True when a run with these (parsed) options ends with structured masks."""
        if isinstance(self.structured, str):
            return bool(getattr(opts, self.structured))
        return bool(self.structured)


METHODS: dict[str, Method] = {}
#: Options for which ``inf`` means "no limit" (every other float option must be finite).
INF_OPTIONS = {"multiplier_max"}

#: The valid range of every numeric method option, by name (one declaration for every method that has it),
#: checked when the options are parsed, before any data loads: ``(low, high, high_open)``, ``None`` for no
#: bound. Counts of rows, steps or picks are at least 1; epoch counts -1 (the method's default) or more;
#: shares of rows or steps fractions; bounds on a rate or a gap of rates at most 1 (a larger one never binds).
OPTION_RANGES: dict[str, tuple] = {
    **{k: (1, None, False) for k in ("buffer_size", "overall_buffer_size", "group_chunk",
                                      "picks_per_decision", "lower_steps", "prune_updates", "updates",
                                      "select_points")},
    **{k: (0, None, False) for k in ("max_decisions", "body_rounds", "max_rounds")},   # 0: no cap
    **{k: (-1, None, False) for k in ("epochs", "fair_epochs", "prune_epochs")},
    **{k: (0, None, False) for k in ("retrain_epochs", "rewind_step", "importance_batch_size", "importance_rows",
                                      "val_batch_size")},
    **{k: (0.0, 1.0, True) for k in ("body_fraction", "fraction", "holdout", "val_fraction", "warmup_fraction",
                                      "vote_prune", "keep_per_iter", "strict_decay", "mask_momentum")},
    **{k: (0.0, 1.0, False) for k in ("prune_fraction", "search_fraction", "min_acc", "tau", "aim_margin")},
    # psi_g is a difference of two accuracy changes, in [-2, 2]; with aim=certificate eps bounds psi_g plus the
    # interval's half-width, which a tiny split can make large
    "eps": (0.0, 2.0, False),
}


def out_of_range(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the option ``name`` (:data:`OPTION_RANGES`), or None."""
    if name not in OPTION_RANGES or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high, open_ = OPTION_RANGES[name]
    if (low is not None and value < low) or (high is not None and (value >= high if open_ else value > high)):
        if high is None:
            return f"must be >= {low}" + (" (-1: the method's default)" if low == -1 else "")
        return f"must be in [{low:g}, {high:g}{')' if open_ else ']'}"
    return None


def register(name: str, description: str, options: type = NoOptions, *, structured: bool | str = False,
             check: Callable[[Any], Any] | None = None, psi_bound: str | None = None,
             no_nm: Callable[[Any], str | None] | None = None, default_changes: tuple = ()):
    """Decorator: register ``run(ctx, dense_state, opts) -> (pruned_state, info)`` under ``name``.

    ``options``: the method's options, a frozen dataclass with a default for every field (its fields are the
    ``--opt`` keys; types bool, int, float, str, or unions such as ``int | None``). ``structured``: the
    method's masks remove whole units (see :class:`Method`). ``check``: validates (and may complete) the
    option values (see :class:`Method`). ``no_nm``: why the method's masks cannot follow an N:M pattern (see
    :class:`Method`). ``default_changes``: the :class:`DefaultChange` list of its options' defaults. After adding a method or changing its description or options, run
    ``python -m fairprune_jax.running.method_listing``: ``fairprune methods`` prints that snapshot of the registry
    without importing JAX, and ``tests/test_install.py`` fails while it disagrees with the registry.
    """
    params = getattr(options, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"method {name!r}: options must be a frozen dataclass; got {options!r}")
    missing = [f.name for f in dataclasses.fields(options) if f.default is dataclasses.MISSING]
    if missing:
        raise TypeError(f"method {name!r}: option(s) {missing} have no default")
    bad = {k: v for k, v in typing.get_type_hints(options).items() if not _supported(v)}   # fails at import
    if bad:
        raise TypeError(f"method {name!r}: option type(s) {bad} not supported (bool, int, float, str, unions of "
                        "them with None)")

    def deco(fn):
        fields = {f.name for f in dataclasses.fields(options)}
        if psi_bound is not None and psi_bound not in fields:
            raise TypeError(f"method {name!r}: psi_bound {psi_bound!r} is not one of its options")
        unknown = [c.option for c in default_changes if c.option not in fields]
        if unknown:
            raise TypeError(f"method {name!r}: default_changes name options it does not have: {unknown}")
        METHODS[name] = Method(name, fn, description, options, structured, check, psi_bound, no_nm,
                               tuple(default_changes))
        return fn
    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid choices: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def structured_methods() -> list[str]:
    """Names of the registered methods that can end with structured masks."""
    return sorted(name for name, m in METHODS.items() if m.structured)

