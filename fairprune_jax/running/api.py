"""One entry point for a user's own model: ``prune(model, train=(x, y, g), method=..., sparsity=...)``.

``prune`` is ``fairprune run`` on a module and arrays instead of a model name and a dataset name: it wraps
the module as a :class:`models.CustomModel`, the arrays as a :class:`data.Dataset`, and calls the runner
(:func:`runner.prepare`, then :func:`runner.run_method`), so the dense training, the method, the evaluation,
the certificate and the report are the ones every ``fairprune run`` goes through. Everything that can be
wrong with the request (method, sparsity, option names and values, run settings, array shapes, the model's
output size, structured units) is checked before any training.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fairprune_jax.core.notices import human_watching, warn
from fairprune_jax.reporting.result import Report
from fairprune_jax.training import caches
from fairprune_jax.sparsity import compact
from fairprune_jax.running import runner
from fairprune_jax.core.config import RunConfig
from fairprune_jax.data.base import Dataset, Split, carve_validation, check_class_sizes, stratified_split
from fairprune_jax.sparsity.masks import DENSE_BY_NAME_SHARE, apply_masks, named_leaves, prunable_template
from fairprune_jax.methods import get_method
from fairprune_jax.models import CustomModel, call_mode, layer_order
from fairprune_jax.models.views import linear_general_views, to_view
from fairprune_jax.training.train import TrainState

#: Fraction of ``train`` held out as the test split when ``test`` is not given (stratified by group and label).
TEST_FRACTION = 0.2
#: Top-level keys of the report (``results.json`` of ``fairprune run``), see :func:`prune`.
REPORT_KEYS = ("method", "dataset", "model", "seed", "config", "groups", "classes", "sizes", "sparsity", "dense",
               "pruned", "history", "method_info", "timings")
#: RunConfig fields ``prune`` sets itself (its own arguments, or fixed for arrays in memory).
_OWN = {"method", "dataset", "data_dir", "model", "sparsity", "seed", "epochs", "finetune_epochs", "batch_size",
        "lr", "finetune_lr", "out", "progress", "dataset_options", "model_options", "method_options",
        "save_compact"}


class _PrunedFields(NamedTuple):
    model: nnx.Module   # the user's module class with the pruned weights (pruned entries exactly 0)
    masks: Any          # 0/1 arrays mirroring the params dict (None on leaves never pruned)
    report: Report      # the results ``fairprune run`` writes to results.json (a dict), with by_group()
    state: TrainState   # params (masked), masks and model state as the runner's pytrees (a multi-axis kernel,
                        # such as nnx.MultiHeadAttention's, in its 2-D view: models.views)


class Pruned(_PrunedFields):
    """What :func:`prune` returns (unpacks as ``model, masks, report, state``); ``units``: the ``units=`` it was
    given (an attribute, not a field, so the four-way unpacking stays), which :meth:`compact` uses by default."""

    units: dict[str, Sequence[str]] | None = None

    def compact(self, example: np.ndarray, units: dict[str, Sequence[str]] | None = None) -> nnx.Module:
        """After a structured method: the pruned module with its removed units physically dropped, an
        instance of the same class with smaller layers and the same logits (:func:`compact.compact_module`;
        save it with :func:`compact.save_module`). ``example``: a few input rows (for the trace); ``units``:
        the units to trace with (default: the ``units=`` given to :func:`prune`)."""
        x = np.asarray(example, np.float32)
        units = self.units if units is None else units
        fm, params, rest = wrap_model(self.model, x.shape[1:], _num_outputs(self.model, x[:2], note=False))
        groups = compact.traced_unit_groups(fm, params, rest, companions=units)
        masks = to_view(self.masks, fm.views)
        try:
            compact.check_structured(masks, params, groups)
        except ValueError as e:
            unit_masks = all(np.ndim(m) == 1 for _, m in named_leaves(self.masks))
            hint = ("the masks are a structured method's, but their unit groups are not the ones traced now: pass "
                    "the units= you gave prune()" if unit_masks and units is None else
                    "compaction needs the masks of a structured method" if not unit_masks else
                    "the units= given here are not the ones the masks were made with")
            raise ValueError(f"compact(): {e} ({hint})") from None
        try:
            small = compact.compact_module(fm, params, rest, masks, self.model, groups)
        except ValueError as e:
            raise ValueError(f"compact(): {e}") from None
        check_compacted(small, fm, params, rest, x)
        return small


#: the compacted module must give the pruned model's logits on the example rows within this (times the logits'
#: scale, at least 1): float32 summation order alone moves them by about 1e-6
COMPACT_TOLERANCE = 1e-4


def check_compacted(small: nnx.Module, fm: CustomModel, params: Any, rest: Any, example: np.ndarray) -> None:
    """Run the compacted module on the example rows (evaluation mode) and refuse it, naming what failed, unless it
    gives the pruned model's logits: a layer whose width the rebuild cannot read off its kernel (a hand-written
    attention's head count kept in an int attribute; a LayerNorm declared in ``units=`` whose reader was not sliced) would
    otherwise come back as a module that fails at its first call, or one that computes something else."""
    x = jnp.asarray(example[:64])
    ref = np.asarray(fm.apply(params, rest, x, train=False)[0])
    what = ("the rebuild reads each Conv / Linear / LinearGeneral width and nnx.MultiHeadAttention's head count "
            "off the sliced kernels; a width held elsewhere (a head count kept in an attribute of a hand-written "
            "attention, a norm or reader declared in units= that was not sliced with it) cannot be compacted. The masked model (Pruned.model) computes the same thing")
    try:
        sfm, sp, sr = wrap_model(small, fm.input_shape, fm.num_classes)
        got = np.asarray(sfm.apply(sp, sr, x, train=False)[0])
    except Exception as e:      # noqa: BLE001 (any failure of the rebuilt module is the user's to see, named)
        raise ValueError(f"compact(): the compacted module fails on the example rows ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); {what}") from None
    diff = float(np.max(np.abs(got - ref))) if got.shape == ref.shape else float("inf")
    if not diff <= COMPACT_TOLERANCE * max(1.0, float(np.max(np.abs(ref)))):
        raise ValueError(f"compact(): the compacted module's logits differ from the pruned model's on the example "
                         f"rows (max |difference| {diff:.3g}); {what}")


def prune(model: nnx.Module, train: Sequence[np.ndarray] | Dataset, method: str = "ceag", sparsity: float = 0.9,
          *, test: Sequence[np.ndarray] | None = None, val: Sequence[np.ndarray] | None = None,
          val_fraction: float | None = None, epochs: int = 10, finetune_epochs: int | None = None, lr: float = 1e-3,
          finetune_lr: float | None = None, batch_size: int = 64, seed: int = 0,
          group_names: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
          units: dict[str, Sequence[str]] | None = None, method_options: dict | None = None,
          config: dict | None = None, out: str | Path | None = None, progress: bool | None = None,
          compile_cache: bool = True, **options: Any) -> Pruned:
    """Train ``model`` densely on ``train``, prune it with ``method`` to ``sparsity`` and report, per group.

    ``model``: any ``flax.nnx.Module`` classifier (logits of shape ``(batch, classes)``); its ``__call__``
    may take ``train=`` or ``deterministic=``, else Dropout / BatchNorm are switched with
    ``model.train()`` / ``model.eval()``. Its weights are the start of the dense training (and what lottery
    methods rewind to); the module itself is not changed. ``train`` / ``test`` / ``val``: numpy tuples
    ``(x, y, g)`` (features, integer labels, integer group ids; ``(x, y)`` is one group); without ``test``
    a stratified 20% of ``train`` is held out; ``val_fraction``: a stratified share of ``train`` held out as
    the validation split (the certificate is also computed on it; ceag may constrain on it). ``train`` may
    also be a :class:`data.Dataset`, such as ``data.load_dataframe(df, target="income", protected="sex")``
    returns for a pandas DataFrame (or ``data.load_csv`` for a file): its splits, group and class names are
    used as they are (build the model for ``ds.train.x.shape[1]`` inputs and ``ds.num_classes`` outputs);
    ``test=`` / ``val=`` and group or class names other than its own are refused; ``val_fraction`` carves
    val from its train split when it has none (:func:`dataset_given`). ``epochs``: dense training epochs
    (``finetune_epochs``, default the same, for the method); ``epochs=0``: the module comes trained and is the dense reference
    as given (lottery methods then rewind to these trained weights). ``**options`` (or ``method_options=``, for names that clash with
    these arguments): the method's options, as ``--opt`` of ``fairprune run`` (``fairprune methods`` lists
    them). ``config``: any other ``RunConfig`` setting (``optimizer``, ``weight_decay``, ``distribution``,
    ``exclude_first``, ``certify_eps``, ...). ``units``: for structured methods, ``{kernel: [leaves indexed
    by its output units]}`` (e.g. ``{"conv/kernel": ["conv/bias", "norm/scale", "norm/bias"]}``) when the
    units traced from the forward pass (:func:`compact.traced_unit_groups`) are not what you want.
    ``out``: also write ``results.json`` and ``results.md`` there. ``progress``: progress bars (default: shown
    in a terminal or a notebook, not in CI or when output is piped). ``compile_cache``: keep compiled executables
    in the user's cache folder, so the next call with the same shapes skips compiling (:mod:`caches`; a cache you
    configured for JAX yourself is used as it is; ``FAIRPRUNE_XLA_CACHE=0`` turns it off everywhere).

    Returns :class:`Pruned` ``(model, masks, report, state)``. The report holds at least
    :data:`REPORT_KEYS`: ``sparsity`` (``target``, ``achieved``, per-layer ``layers``), ``dense`` /
    ``pruned`` (per split: accuracy, per-group accuracy, psi_g, DP / EO; ``pruned["test"]["certificate"]``).
    """
    method_obj = get_method(method)
    if compile_cache:
        caches.use_compilation_cache()
    opts = dict(method_options or {})
    both = sorted(set(opts) & set(options))
    if both:
        raise ValueError(f"method option(s) {both} given twice (as keywords and in method_options=)")
    opts.update(options)
    extra = dict(config or {})
    allowed = sorted({f.name for f in dataclasses.fields(RunConfig)} - _OWN)
    known = set(dataclasses.asdict(method_obj.parse({})))
    run_settings = sorted(k for k in options if k not in known and k in allowed)
    if run_settings:         # a run setting given as a keyword (the CLI's --certify-eps is certify_eps here)
        raise ValueError(f"{', '.join(run_settings)} {'is a run setting' if len(run_settings) == 1 else 'are run settings'}"
                         f", not an option of method {method!r}: pass config={{{', '.join(repr(k) + ': ...' for k in run_settings)}}}")
    own_args = ("epochs", "finetune_epochs", "lr", "finetune_lr", "batch_size", "seed", "val_fraction", "sparsity")
    for k in options:
        close = difflib.get_close_matches(k, own_args, n=1, cutoff=0.8)
        if k not in known and close:
            raise ValueError(f"{k!r} is neither a prune() argument nor an option of method {method!r}: did you mean "
                             f"prune({close[0]}=...)?")
    bad = sorted(set(extra) - set(allowed))
    if bad:
        own = sorted(set(bad) & _OWN)
        hint = f" ({', '.join(own)}: a prune() argument or fixed)" if own else ""
        raise ValueError(f"config= has unknown or reserved setting(s) {bad}{hint}; valid: {', '.join(allowed)}")
    label_name = extra.pop("positive_label") if isinstance(extra.get("positive_label"), str) else None
    if int(epochs) == 0 and finetune_epochs is None:
        raise ValueError("epochs=0 (the model comes trained, no dense training) needs finetune_epochs=N, the "
                         "method's fine-tuning budget (default: the same as epochs)")
    cfg = RunConfig(method=method, dataset=runner.IN_MEMORY, sparsity=sparsity, seed=seed, epochs=epochs,
                    finetune_epochs=finetune_epochs, batch_size=batch_size, lr=lr, finetune_lr=finetune_lr,
                    out=None if out is None else str(out),
                    progress=human_watching() if progress is None else bool(progress), method_options=opts, **extra)
    parsed = runner.validate_config(cfg)    # method, sparsity, option names and values, run settings
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module; got {type(model).__name__}")
    if isinstance(train, Dataset):
        ds = dataset_given(train, test, val, seed=seed, group_names=group_names, class_names=class_names,
                           val_fraction=val_fraction, num_classes=_num_outputs(model, train.train.x[:2]))
    else:
        ds = arrays_dataset(train, test, val, seed=seed, group_names=group_names, class_names=class_names,
                            val_fraction=val_fraction,
                            num_classes=_num_outputs(model, _arrays(train, "train")[0][:2]))
    cfg = _positive_class(cfg, ds, label_name, train, "positive_label" in extra)
    built = wrap_model(model, ds.input_shape, ds.num_classes)
    if method_obj.is_structured(parsed) or units is not None:
        built = with_units(built, units, cfg, consumers=getattr(parsed, "mask_grad", None) == "consumer")
    if cfg.out:
        runner.check_out_dir(cfg.out)
    with runner.owning_folder(cfg.out), runner.replacing_outputs(cfg.out):
        prep = runner.prepare(cfg, ds, model=built)
        report = runner.run_method(prep)
    state = report.pop("_state")
    state = state.replace(params=apply_masks(state.params, state.masks))
    graphdef = nnx.split(model, nnx.Param, ...)[0]     # the module as given (its own train / eval mode)
    fm = built[0]
    pruned = nnx.merge(graphdef, fm.module_params(state.params), state.model_state)
    out = Pruned(pruned, fm.module_params(state.masks), report, state)
    out.units = units
    return out


def _positive_class(cfg: RunConfig, ds: Dataset, name: str | None, train: Any, given: bool) -> RunConfig:
    """``cfg`` with ``positive_label`` (the class whose rates DP and EO compare) given by name resolved to its
    id; with labels given as names and no choice, a warning saying which class that is."""
    if name is not None:
        if name in ds.class_names:
            return dataclasses.replace(cfg, positive_label=ds.class_names.index(name))
        if name.strip().isdigit():
            return dataclasses.replace(cfg, positive_label=int(name))
        raise ValueError(f"config={{'positive_label': {name!r}}}: not a class; the classes are "
                         f"{', '.join(repr(c) for c in ds.class_names)} (a name or its id 0..{ds.num_classes - 1})")
    y = train.train.y if isinstance(train, Dataset) else np.asarray(_arrays(train, "train")[1])
    if not given and ds.num_classes == 2 and not np.issubdtype(y.dtype, np.number):
        pos = ds.class_names[int(cfg.positive_label)]
        warn(f"the labels are names: DP and EO compare the rates of {pos!r} (class {int(cfg.positive_label)} of "
             f"the names in sorted order); config={{'positive_label': {ds.class_names[0]!r}}} compares the other")
    return cfg


def _num_outputs(model: nnx.Module, x: np.ndarray, *, note: bool = True) -> int:
    """The number of logits the module returns (one abstract trace, evaluation mode)."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    graphdef, eval_graphdef = _graphdefs(model)
    fm = CustomModel(type(model).__name__, graphdef, tuple(x.shape[1:]), 0, mode=call_mode(model),
                     eval_graphdef=eval_graphdef)
    try:
        out = jax.eval_shape(lambda p, s: fm.apply(p, s, jnp.asarray(x, jnp.float32))[0],
                             nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
    except Exception as e:
        hint = ""
        if np.issubdtype(np.asarray(x).dtype, np.integer):     # token ids for an nnx.Embed, say
            hint = ("; prune() gives the model its features as float32 (the batches, the certificate and the traced "
                    "unit groups read float features), so a model that takes integer ids (nnx.Embed) must cast "
                    "them in its __call__: self.embed(x.astype(jnp.int32))")
        elif "conv" in str(e).lower() and x.ndim == 4 and x.shape[1] in (1, 3, 4) and x.shape[-1] > 4:
            hint = (f"; images of shape {x.shape[1:]} look channel-first: Flax convolutions read (n, H, W, C), so "
                    "pass x.transpose(0, 2, 3, 1)")
        elif "conv" in str(e).lower() and x.ndim == 3:
            hint = (f"; images of shape {x.shape[1:]} have no channel axis: Flax convolutions read (n, H, W, C), so "
                    "pass x[..., None] for grayscale")
        raise ValueError(f"the model cannot take inputs of shape {x.shape[1:]} (mode {fm.mode!r}): {e}{hint}") from e
    if out.ndim != 2:
        raise ValueError(f"the model must return logits of shape (batch, classes); got {out.shape}")
    if note:
        _warn_other_outputs(fm, params, rest, x)
    return int(out.shape[-1])


def _warn_other_outputs(fm: CustomModel, params: Any, rest: Any, x: np.ndarray) -> None:
    """A module returning several outputs (a tuple, a dict) is trained, pruned and certified for its logits alone;
    the layers that feed only the others are pruned too (a structured method removes their units: an auxiliary
    head of 5 outputs came back with 2) and never trained for them. Say so once."""
    def raw(p, s):
        return fm.outputs(nnx.merge(fm.eval_graphdef or fm.graphdef, p, s), jnp.asarray(x, jnp.float32), False)
    try:
        out = jax.eval_shape(raw, nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
    except Exception:       # noqa: BLE001 (the logits probe above already succeeded; this is only a note)
        return
    if isinstance(out, (tuple, list, dict)) and len(out) > 1:
        what = f"a dict with keys {sorted(out)[:6]}" if isinstance(out, dict) else f"{len(out)} outputs"
        warn(f"{fm.name} returns {what}; fairprune trains, prunes and certifies it for its logits "
             f"({'the logits entry' if isinstance(out, dict) else 'the first'}) alone: the layers that feed only the "
             f"other outputs are pruned as well and not trained for them. Prune a module that returns the logits "
             f"only, and put the other heads back afterwards")


def _arrays(arrays: Any, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(x, y, g)`` from a tuple ``(x, y, g)`` / ``(x, y)`` or a dict with keys ``x``, ``y`` and optionally
    ``g`` (labels and group ids may be integers or names)."""
    if arrays is None:
        return None
    if isinstance(arrays, dict):
        unknown = sorted(set(arrays) - {"x", "y", "g"})
        if unknown or not {"x", "y"} <= set(arrays):
            raise ValueError(f"{name}= as a dict takes the keys 'x', 'y' and optionally 'g'; got {sorted(arrays)}")
        arrays = (arrays["x"], arrays["y"]) + ((arrays["g"],) if "g" in arrays else ())
    arrays = tuple(arrays)
    if len(arrays) == 2:
        arrays = (*arrays, np.zeros(len(arrays[0]), np.int32))
    if len(arrays) != 3:
        raise ValueError(f"{name}= takes (x, y, g) or (x, y); got a tuple of {len(arrays)}")
    return tuple(np.asarray(a) for a in arrays)


def _named(values: list[np.ndarray], names: Sequence[str] | None, what: str, keyword: str
           ) -> tuple[list[np.ndarray], list[str] | None]:
    """Labels or group ids given as names (strings, booleans): mapped to ids 0..k-1 over every split
    together, in sorted order (numbers numerically), and the names kept. Integer ids 0..k-1 pass through; group
    ids with gaps (census codes 1000 and 2000), when no names are given, are names too: numbered 0..k-1 over
    the ids present and named by their values, rather than read as 2001 groups of which 1999 are empty."""
    if all(np.issubdtype(v.dtype, np.number) for v in values if v.size):
        if names is not None or keyword != "group_names":
            return values, None if names is None else list(names)
        present = np.unique(np.concatenate([np.asarray(v).reshape(-1) for v in values]))
        if not present.size or present.min() < 0 or present.max() == present.size - 1:
            return values, None                 # 0..k-1, or negative ids (refused with their range later)
        if not np.all(np.equal(np.mod(present, 1), 0)):
            return values, None                 # fractional ids: refused, with their values, by _split
        index = {float(s): i for i, s in enumerate(present.tolist())}
        return ([np.asarray([index[float(s)] for s in np.asarray(v).reshape(-1).tolist()], np.int32) for v in values],
                [str(int(s)) for s in present.tolist()])
    if names is not None:
        raise ValueError(f"{what} are given as names ({', '.join(map(repr, values[0][:3].tolist()))} ...): they "
                         f"name themselves, so leave out {keyword}= (or pass integer ids with {keyword}=)")
    from fairprune_jax.data.tabular import sorted_values
    text = [np.asarray(v).astype(str) for v in values]
    uniq = sorted_values(sorted({s for t in text for s in t.tolist()}))
    index = {s: i for i, s in enumerate(uniq)}
    return [np.asarray([index[s] for s in t.tolist()], np.int32) for t in text], uniq


def _split(arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None, name: str) -> Split | None:
    if arrays is None:
        return None
    x, y, g = arrays
    for what, a in (("labels y", y), ("group ids g", g)):
        if a.size and np.issubdtype(a.dtype, np.number) and np.nanmax(np.abs(a)) >= 2**31:
            raise ValueError(f"{name}: {what} go up to {np.nanmax(np.abs(a)):.0f}, beyond 32-bit ids (larger ids would "
                             "wrap around and merge distinct values): number them 0..k-1, or pass them as names "
                             "(strings)")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            bad = int((~np.isfinite(a)).sum()) if np.issubdtype(a.dtype, np.floating) else 0
            if bad:
                raise ValueError(f"{name}: {what} has {bad} missing (NaN / inf) value(s); drop those rows or give "
                                 "them a value")
            if not np.all(np.equal(np.mod(a, 1), 0)):
                raise ValueError(f"{name}: {what} must be integers (or names); got dtype {a.dtype} with fractions "
                                 f"such as {a[np.mod(a, 1) != 0][:3].tolist()}")
    if x.ndim < 2:
        raise ValueError(f"{name}: x must have shape (n, features...); got {x.shape}")
    try:
        return Split(x, y, g)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def arrays_dataset(train: Sequence[np.ndarray], test: Sequence[np.ndarray] | None = None,
                   val: Sequence[np.ndarray] | None = None, *, seed: int = 0,
                   group_names: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
                   num_classes: int | None = None,
                   val_fraction: float | None = None) -> Dataset:
    """A :class:`Dataset` from numpy tuples (or dicts ``{"x", "y", "g"}``); labels and group ids may be names
    (strings), mapped to ids in sorted order with the names kept; without ``test``, a stratified share of
    ``train`` becomes it."""
    raw = {k: _arrays(v, k) for k, v in (("train", train), ("test", test), ("val", val))}
    given = [k for k, v in raw.items() if v is not None]
    ys, class_names = _named([raw[k][1] for k in given], class_names, "labels y", "class_names")
    gs, group_names = _named([raw[k][2] for k in given], group_names, "group ids g", "group_names")
    for k, y, g in zip(given, ys, gs):
        raw[k] = (raw[k][0], y, g)
    tr, te, va = _split(raw["train"], "train"), _split(raw["test"], "test"), _split(raw["val"], "val")
    labels = np.unique(np.concatenate([s.y for s in (tr, te, va) if s is not None]))
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels y must be class ids 0..C-1; got {', '.join(str(v) for v in labels[:6].tolist())}"
                         f"{' ...' if labels.size > 6 else ''}: pass them as names (y.astype(str)) to have them "
                         "numbered in sorted order, or number them yourself (np.unique(y, return_inverse=True)[1])")
    check_class_sizes(tr.y, class_names if class_names is not None else [str(int(c)) for c in np.unique(tr.y)],
                      dataset="train")
    meta: dict[str, Any] = {"source": "arrays in memory (fairprune_jax.prune)"}
    if te is None:
        rest, held = stratified_split(tr.y, tr.g, TEST_FRACTION, seed)
        tr, te = tr.take(rest), tr.take(held)
        meta["test"] = f"stratified {TEST_FRACTION:.0%} of train (seed {seed})"
    if val_fraction is not None:
        if va is not None:
            raise ValueError("give either val= (your own validation rows) or val_fraction= (a share of train), "
                             "not both")
        tr, va = carve_validation(tr, val_fraction, seed)
        meta["val"] = f"stratified {float(val_fraction):.0%} of train (seed {seed})"
    splits = [s for s in (tr, te, va) if s is not None]
    n_cls = max(int(max(s.y.max() for s in splits)) + 1, 2)
    if num_classes is not None:
        if n_cls > num_classes:
            seen = np.unique(tr.y)
            hint = (" (a single output with a sigmoid, as for logistic regression? fairprune needs one logit per "
                    "class: 2 for a binary target, trained with softmax cross-entropy)" if num_classes == 1 else
                    f" (the labels are {', '.join(str(v) for v in labels[:6].tolist())}: class ids must be 0.."
                    f"{num_classes - 1}; pass them as names, y.astype(str), to have them numbered)"
                    if labels.size <= num_classes and not np.array_equal(labels, np.arange(labels.size)) else
                    " (a class in test or val that the model has no output for?)" if seen.max() < num_classes else
                    "")
            raise ValueError(f"labels go up to {n_cls - 1} but the model returns {num_classes} logit(s){hint}")
        n_cls = num_classes
    n_grp = int(max(s.g.max() for s in splits)) + 1
    if min(int(s.g.min()) for s in splits) < 0 or min(int(s.y.min()) for s in splits) < 0:
        raise ValueError("labels y and group ids g must be >= 0")
    groups = [str(i) for i in range(n_grp)] if group_names is None else [str(n) for n in group_names]
    classes = [str(i) for i in range(n_cls)] if class_names is None else [str(n) for n in class_names]
    if len(groups) < n_grp:
        raise ValueError(f"group_names has {len(groups)} names but group ids go up to {n_grp - 1}")
    if len(classes) != n_cls:
        raise ValueError(f"class_names has {len(classes)} names but the model returns {n_cls} logits")
    ds = Dataset("arrays", tr, te, groups, ["group"], classes, val=va, meta=meta)
    ds.validate()
    return ds


def dataset_given(ds: Dataset, test: Any = None, val: Any = None, *, seed: int = 0,
                  group_names: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
                  num_classes: int | None = None, val_fraction: float | None = None) -> Dataset:
    """``train=`` given as a :class:`Dataset` (a loader's, ``data.load_dataframe``'s): its splits, names and
    meta as they are. ``test`` / ``val`` arrays beside it, names other than its own, ``val_fraction`` when it
    has a val split already or a model whose number of logits is not its number of classes are refused;
    ``val_fraction`` otherwise carves a stratified val split from its train split."""
    if test is not None or val is not None:
        has = "a test split" + (" and a val split" if ds.val is not None else "")
        raise ValueError(f"train= is a Dataset ({ds.name!r}), which has {has} of its own: leave out test= and "
                         "val= (or pass arrays: train=(ds.train.x, ds.train.y, ds.train.g), test=(...))")
    for given, own, keyword in ((group_names, ds.group_names, "group_names"),
                                (class_names, ds.class_names, "class_names")):
        if given is not None and [str(n) for n in given] != list(own):
            raise ValueError(f"{keyword}={list(given)} differs from the names of the Dataset given as train= "
                             f"({list(own)}); leave {keyword}= out")
    if val_fraction is not None:
        if ds.val is not None:
            raise ValueError(f"the Dataset given as train= has a val split already ({len(ds.val)} rows, from its "
                             "loader's val_fraction): leave out val_fraction=")
        tr, va = carve_validation(ds.train, val_fraction, seed)
        ds = dataclasses.replace(ds, train=tr, val=va, meta={
            **ds.meta, "val_fraction": float(val_fraction),
            "val": f"stratified {float(val_fraction):.0%} of train (seed {seed}, fairprune_jax.prune)"})
    if num_classes is not None and num_classes != ds.num_classes:
        raise ValueError(f"the Dataset given as train= has {ds.num_classes} classes ({', '.join(ds.class_names)}) "
                         f"but the model returns {num_classes} logit(s); build it with {ds.num_classes} outputs "
                         "(ds.num_classes), one logit per class")
    ds.validate()
    return ds


def _copy(tree: Any) -> Any:
    """Fresh buffers (training steps donate their state; the user's module keeps its own arrays)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def wrap_model(model: nnx.Module, input_shape: tuple[int, ...], num_classes: int
               ) -> tuple[CustomModel, dict, dict]:
    """``(fm, params, model_state)`` of a user's module, as ``models.build_model`` returns for a built-in one."""
    graphdef, eval_graphdef = _graphdefs(model)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = _copy(nnx.to_pure_dict(params)), _copy(nnx.to_pure_dict(rest))
    views = linear_general_views(model)
    params = to_view(params, views)
    fm = CustomModel(type(model).__name__, graphdef, tuple(input_shape), int(num_classes), mode=call_mode(model),
                     eval_graphdef=eval_graphdef, initial=(_copy(params), _copy(rest)), views=views)
    return fm, params, rest


def _graphdefs(model: nnx.Module) -> tuple[Any, Any]:
    """The module's graphdef for training and for evaluation (``None``: its ``__call__`` takes the flag)."""
    graphdef, state = nnx.split(model)
    if call_mode(model) != "attributes":
        return nnx.split(model, nnx.Param, ...)[0], None
    out = []
    for mode in ("train", "eval"):
        twin = nnx.merge(graphdef, state)       # a copy: the user's module keeps its own mode
        getattr(twin, mode)()
        out.append(nnx.split(twin, nnx.Param, ...)[0])
    return out[0], out[1]


def refused_note(fm, params, model_state, template, pruned: set, order: list, cfg: RunConfig, *,
                 traced: bool) -> str | None:
    """Warn (and return the text) when prunable kernels that a structured method cannot prune (their units are not
    removable: behind a LayerNorm / GroupNorm, a spatial gate, a channel shuffle) hold
    :data:`masks.DENSE_BY_NAME_SHARE` or more of the model's weight matrices: they stay dense, so the model as a
    whole is far less sparse than the target (a Linear of 53% of the weights before a LayerNorm: 0.30 overall at
    a target of 0.9), with the tracer's reason for each. The classifier (its units are the classes) is not
    counted."""
    sizes = {n: int(np.size(v)) for n, v in named_leaves(params) if getattr(v, "ndim", 0) >= 2}
    prunable = {n for n, t in named_leaves(template) if t is True}
    left = [n for n in prunable if n not in pruned and (not order or n != order[-1])]
    total = sum(sizes.values())
    kept = sum(sizes.get(n, 0) for n in left)
    if cfg.sparsity <= 0 or not total or kept < DENSE_BY_NAME_SHARE * total:
        return None
    reasons = {}
    if traced:
        from fairprune_jax.sparsity.coupling import coupled_groups
        reasons = coupled_groups(fm, params, model_state).refused
    def why(n):
        r = reasons.get(n.rsplit("/", 1)[0]) or reasons.get(n)
        return f" ({r})" if r else ""
    names = "; ".join(f"{n}{why(n)}" for n in sorted(left)[:4]) + (" ..." if len(left) > 4 else "")
    text = (f"{cfg.method}: {len(left)} layer(s) holding {kept / total:.0%} of the weight matrices cannot lose "
            f"whole units and stay dense: {names}. The target {cfg.sparsity:g} applies to the other layers, so the "
            f"model as a whole will be about {cfg.sparsity * (total - kept) / total:.0%} sparse")
    warn(text)
    return text


def with_units(built: tuple[CustomModel, dict, dict], units: dict | None, cfg: RunConfig, *,
               consumers: bool = False) -> tuple[CustomModel, dict, dict]:
    """The model with its removable units (declared, else traced); refuses a model with none to prune.

    ``consumers``: the method reads each unit at its consumer's input rows (BiFP's ``mask_grad=consumer``),
    so every pruned unit group needs one.
    """
    fm, params, model_state = built
    order = layer_order(fm, params, model_state)
    if units and order and order[-1] in units:
        raise ValueError(f"{cfg.method}: units= declares {order[-1]}, whose outputs are the model's logits: its "
                         "units are the classes, and removing one makes that class impossible to predict. Leave "
                         "the classifier out of units=")
    groups = compact.traced_unit_groups(fm, params, model_state, companions=units)
    template = prunable_template(params, layer_order=order, exclude_first=cfg.exclude_first,
                                 exclude_last=cfg.exclude_last)
    try:
        pruned = {n for n, _ in named_leaves(compact.structured_template(groups, template))}
    except ValueError as e:
        why = ""
        if units is None:
            from fairprune_jax.sparsity.coupling import coupled_groups
            why = " Not removable: " + "; ".join(coupled_groups(fm, params, model_state).refused.values()) + "."
        raise ValueError(f"{cfg.method}: {e}. Units found: {[g.kernel for g in groups] or 'none'}.{why} Declare "
                         "them with units={'layer/kernel': ['layer/bias', 'bn/scale', 'bn/bias'], ...} (a per-channel norm such as "
                         "BatchNorm; a LayerNorm over the channels ties them all together)") from None
    # a group's further producers (a residual branch's kernels, an attention head's query / key / value) lose their
    # units with its lead kernel: they are pruned too, not dense
    pruned |= {p for g in groups if g.kernel in pruned for p in g.producers}
    refused_note(fm, params, model_state, template, pruned, order, cfg, traced=units is None)
    lost = [g.kernel for g in groups if g.kernel in pruned and not g.consumers]
    if consumers and lost:
        raise ValueError(f"{cfg.method}: mask_grad='consumer' reads each unit at the next layer's input rows, but "
                         f"the units of {', '.join(lost)} reach the output another way too (a residual addition, "
                         "a LayerNorm over the channels, a second reader); pass mask_grad='producer'")
    return dataclasses.replace(fm, unit_groups=tuple(groups)), params, model_state


__all__ = ["Pruned", "REPORT_KEYS", "arrays_dataset", "prune", "with_units", "wrap_model"]
