"""The ``fairprune run`` pipeline: data -> dense model -> method -> evaluation -> report.

Everything that can be wrong with the request (sparsity, method, dataset,
model, options) is checked before any data is loaded or any step is compiled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fairprune_jax.core.notices import warn
from fairprune_jax.reporting.result import SCHEMA_VERSION, Report
from fairprune_jax.training import caches, checkpoint, distributed, tracking
from fairprune_jax.metrics import certify, fairness
from fairprune_jax.sparsity import compact
from fairprune_jax.reporting import report
from fairprune_jax.data import DATASETS, Dataset, load_dataset
from fairprune_jax.sparsity.masks import (check_sparsity, named_leaves, prunable_template, sparsity_summary,
                                          DISTRIBUTIONS)
from fairprune_jax.methods import METHODS, Context, RunConfig, get_method, make_optimizer
from fairprune_jax.methods.base import DEFAULT_CERTIFY_EPS, structured_methods
from fairprune_jax.models import MODELS, build_model, count_flops, default_model_for, layer_order
from fairprune_jax.training.train import (TrainState, create_state, evaluate, evaluate_paired, fit, make_eval_step,
                                          make_paired_eval_step, make_train_step, rows_over_split, split_logits)

#: Where ``--save-compact`` writes the compacted model, inside the run's output folder.
COMPACT_DIR = "compact"
#: Test rows on which the compacted model's logits are compared with the masked model's.
COMPACT_CHECK_ROWS = 1024
#: ``RunConfig.dataset`` of a run on arrays given in memory (``fairprune_jax.prune``): no loader, the
#: :class:`Dataset` is passed to :func:`prepare`.
IN_MEMORY = "arrays"


def validate_config(cfg: RunConfig) -> Any:
    """Fail fast, with the valid choices, before any long work; returns the method's parsed options."""
    check_sparsity(cfg.sparsity)
    method = get_method(cfg.method)
    opts = method.parse(cfg.method_options)
    if cfg.save_compact and not method.is_structured(opts):
        why = (f"method {cfg.method!r} with structured={getattr(opts, method.structured)!r}"
               if isinstance(method.structured, str) else f"method {cfg.method!r}")
        raise ValueError(f"--save-compact needs structured masks (whole neurons / channels removed), but {why} "
                         f"prunes individual weights, which no smaller dense model can hold; structured "
                         f"methods: {', '.join(structured_methods())}")
    if cfg.dataset not in DATASETS and cfg.dataset != IN_MEMORY:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; valid choices: {', '.join(sorted(DATASETS))}")
    if cfg.model is not None and cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; valid choices: {', '.join(sorted(MODELS))}")
    check_model_options(cfg.model, cfg.model_options)
    if cfg.distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown sparsity distribution {cfg.distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")
    for name in ("epochs", "batch_size"):
        if name == "epochs" and cfg.dataset == IN_MEMORY and int(cfg.epochs) == 0:
            continue        # prune(epochs=0): the given module is the trained dense model
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(cfg, name)}")
    if cfg.ft_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0; got {cfg.ft_epochs}")
    # every number of the run config is finite (nan / inf would fail late, or pass silently as a bound)
    for name in ("sparsity", "lr", "finetune_lr", "weight_decay", "certify_eps", "certify_level",
                 "fairness_bound"):
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(float(v))):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number; got {v!r}")
    if float(cfg.weight_decay) < 0:
        raise ValueError(f"--weight-decay must be >= 0; got {cfg.weight_decay}")
    for name in ("certify_eps", "fairness_bound"):
        v = getattr(cfg, name)
        if v is not None and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} is a bound on a difference of rates, in [0, 1]; got {v}")
    if not (cfg.lr > 0 and cfg.ft_lr > 0):
        raise ValueError(f"learning rates must be > 0; got lr={cfg.lr}, finetune_lr={cfg.ft_lr}")
    if not 0.0 < float(cfg.certify_level) < 1.0:
        raise ValueError(f"--certify-level must be in (0, 1), e.g. 0.95; got {cfg.certify_level}")
    if cfg.certify_interval not in certify.PSI_METHODS:
        raise ValueError(f"--certify-interval must be one of {', '.join(certify.PSI_METHODS)}; got "
                         f"{cfg.certify_interval!r}")
    if not 0 <= int(cfg.seed) < 2 ** 32:
        raise ValueError(f"--seed must be an integer in [0, 2**32) (it seeds numpy and JAX); got {cfg.seed}")
    if int(cfg.positive_label) < 0:
        raise ValueError(f"--positive-class must be a class id >= 0; got {cfg.positive_label}")
    if cfg.small_group < 0:
        raise ValueError(f"--small-group must be >= 0; got {cfg.small_group}")
    return opts


def model_option_names(model: str) -> list[str]:
    """The options a model takes (``--model-opt`` / a compare TOML's ``[model_options]``)."""
    import inspect
    skip = {"self", "in_features", "in_channels", "num_classes", "rngs"}
    return [p for p in inspect.signature(MODELS[model].__init__).parameters if p not in skip]


def check_model_options(model: str | None, options: dict) -> None:
    """Unknown model options are an error naming the valid ones (for ``model=None``: valid for some model)."""
    names = sorted(set(model_option_names(model)) if model is not None
                   else {o for m in MODELS for o in model_option_names(m)})
    unknown = sorted(set(options) - set(names))
    if unknown:
        which = f"model {model!r}" if model is not None else "any model (" + ", ".join(sorted(MODELS)) + ")"
        raise ValueError(f"unknown model option(s) {unknown} for {which}; valid: {', '.join(names)}")
    if model is not None:
        check_model_option_values(model, options)


def check_model_option_values(model: str, options: dict) -> None:
    """Each model option's value has the kind of its default: a width a positive integer, a list of widths a
    non-empty list of positive integers (``hidden=(64,)``, not ``hidden=64``), a flag true or false."""
    import inspect
    params = inspect.signature(MODELS[model].__init__).parameters
    for key, value in options.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        if default is inspect.Parameter.empty or default is None:
            continue
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool) and value > 0, "a positive integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            want = "a positive number"
        elif isinstance(default, (tuple, list)) and all(isinstance(d, int) for d in default):
            ok = (isinstance(value, (tuple, list)) and len(value) > 0
                  and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
            want = f"a non-empty list of positive integers, like {tuple(default)!r} (one value: ({default[0]},))"
        else:
            continue
        if not ok:
            raise ValueError(f"model option {key}={value!r} for model {model!r}: {key} takes {want}")


def certify_eps(cfg: RunConfig) -> float:
    """The psi bound the certificate checks: ``certify_eps``, else the bound the method promises (its declared
    ``psi_bound`` option, ceag's ``eps``), else the default."""
    if cfg.certify_eps is not None:
        return float(cfg.certify_eps)
    method = get_method(cfg.method)
    eps = method.promised_bound(method.parse(cfg.method_options))
    return DEFAULT_CERTIFY_EPS if eps is None else float(eps)


def _augment_fn(cfg: RunConfig, ds: Dataset):
    if not cfg.augment:
        return None
    if len(ds.input_shape) != 3:
        raise ValueError("--augment applies to image datasets only (random crop + flip)")
    from fairprune_jax.data.augment import random_crop_flip
    return random_crop_flip


def warn_missing_groups(ds: Dataset) -> dict[str, list[str]]:
    """Warn about groups without rows in a split (returned as ``{split: [group names]}``).

    A group absent from train is never seen in training, so no method can
    protect it; a group absent from an evaluation split has null metrics there
    and is left out of every gap / parity reduction (fairlearn semantics).
    """
    missing = {}
    for name, split in ds.splits().items():
        n = np.bincount(split.g, minlength=ds.num_groups)
        absent = [ds.group_names[i] for i in np.flatnonzero(n == 0)]
        if absent:
            missing[name] = absent
            consequence = ("the model never sees them and no method can protect them" if name == "train" else
                           f"their {name} metrics are null and left out of every gap and parity metric")
            warn(f"dataset {ds.name!r}: {len(absent)} group(s) have no rows in the {name} split "
                 f"({', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}): {consequence}")
    return missing


def dense_start(ctx: Context, params: Any, model_state: Any) -> tuple[TrainState, Any]:
    """The dense run's initial state and train step (optimizer, schedule and PRNG seed from the config)."""
    cfg = ctx.config
    tx = make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, total_steps=cfg.epochs * ctx.steps_per_epoch)
    return create_state(params, model_state, tx, seed=cfg.seed), make_train_step(ctx.fm, tx, augment=ctx.augment)


def train_dense(ctx: Context, params: Any, model_state: Any) -> tuple[TrainState, dict]:
    """Train the dense reference model every method starts from."""
    cfg = ctx.config
    state, step = dense_start(ctx, params, model_state)
    return fit(state, step, ctx.dataset.train, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
               desc="dense", progress=cfg.progress)


def train_dense_seeds(built: list[tuple[Context, Any, Any]]) -> list[tuple[TrainState, dict]]:
    """The dense models of several seeds of one configuration, trained together in one vmapped run.

    ``built``: one ``build_context(cfg, ds)`` result per seed, on the same
    dataset, with configs that differ only in the seed. Each seed keeps its own
    init, PRNG key, batch order and history (:func:`seeds.fit_seeds`), so its
    dense model matches :func:`train_dense` up to float rounding.
    """
    from fairprune_jax.training import seeds as seeds_lib

    starts = [dense_start(ctx, params, model_state) for ctx, params, model_state in built]
    cfg = built[0][0].config
    states, histories = seeds_lib.fit_seeds(
        [state for state, _ in starts], starts[0][1], built[0][0].dataset.train, epochs=cfg.epochs,
        batch_size=cfg.batch_size, seeds=[ctx.config.seed for ctx, _, _ in built], desc="dense",
        progress=cfg.progress)
    return list(zip(states, histories))


def build_context(cfg: RunConfig, ds: Dataset, model: tuple[Any, Any, Any] | None = None
                  ) -> tuple[Context, Any, Any]:
    """The run's context and initial weights; ``model``: an already built ``(fm, params, model_state)`` (a
    user's own module, see ``fairprune_jax.running.api``) instead of ``build_model(cfg.model, ...)``."""
    if model is not None:
        fm, params, model_state = model
    else:
        model_name = cfg.model or default_model_for(ds.input_shape)
        check_model_options(model_name, cfg.model_options)
        fm, params, model_state = build_model(model_name, ds.input_shape, ds.num_classes, seed=cfg.seed,
                                              **cfg.model_options)
    order = layer_order(fm, params, model_state)
    template = prunable_template(params, layer_order=order, exclude_first=cfg.exclude_first,
                                 exclude_last=cfg.exclude_last)
    ctx = Context(config=cfg, dataset=ds, fm=fm, template=template,
                  flops=count_flops(fm, params, model_state), layer_order=order,
                  eval_step=make_eval_step(fm, ds.num_groups, ds.num_classes, cfg.positive_label),
                  augment=_augment_fn(cfg, ds))
    return ctx, params, model_state


@dataclasses.dataclass
class Prepared:
    """A loaded dataset and a trained dense model, reusable by every method and sparsity of one seed."""

    config: RunConfig
    dataset: Dataset
    ctx: Context
    dense: TrainState
    dense_history: dict
    dense_evals: dict
    timings: dict
    #: the eval step of the final report: ``ctx.eval_step``, plus every class's one-vs-rest counts for a
    #: multi-class target (``evals[split]`` is then ``(group counts, class counts, class-group counts)``)
    report_step: Any = None


def report_eval_step(ctx: Context) -> Any:
    """The eval step for the reported numbers: for a target of more than two classes it also counts what DP
    and EO of every class vs the rest need (same forward pass); otherwise ``ctx.eval_step`` itself."""
    ds, cfg = ctx.dataset, ctx.config
    if ds.num_classes <= 2:
        return ctx.eval_step
    return make_eval_step(ctx.fm, ds.num_groups, ds.num_classes, cfg.positive_label, per_class=True)


def load_checked(cfg: RunConfig, dataset: Dataset | None = None, *, cache: bool = False) -> tuple[Dataset, float]:
    """Validate the config, load (or check) the dataset; returns it and the seconds it took. ``cache``: a table
    parsed by an earlier run from the same bytes is reused (:func:`caches.load_dataset_cached`)."""
    validate_config(cfg)
    t = time.perf_counter()
    if dataset is None and cfg.dataset == IN_MEMORY:
        raise ValueError(f"dataset {IN_MEMORY!r} is given in memory: pass the Dataset (fairprune_jax.prune does)")
    if dataset is not None:
        ds = dataset
    elif cache:
        ds = caches.load_dataset_cached(cfg.dataset, cfg.data_dir, dict(cfg.dataset_options))[0]
    else:
        ds = load_dataset(cfg.dataset, cfg.data_dir, **cfg.dataset_options)
    if dataset is not None:
        ds.validate()
    if cfg.batch_size > len(ds.train):
        val = "" if ds.val is None else (
            f", after the validation fraction (--val-fraction / val_fraction="
            f"{ds.meta.get('val_fraction', cfg.dataset_options.get('val_fraction'))}) took {len(ds.val)} of its rows; "
            "a validation fraction above about 0.5 leaves little to train on")
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training split "
                         f"({len(ds.train)} rows{val}); choose a batch size of at most {len(ds.train)}"
                         + (" or a smaller validation fraction" if val else ""))
    if ds.train.x.ndim < 2:
        raise ValueError(f"dataset {ds.name!r}: features must have shape (n, d) or (n, H, W, C); got "
                         f"{ds.train.x.shape} (one number per row? use x[:, None] for a single feature)")
    check_target_and_groups(cfg, ds)
    warn_missing_groups(ds)
    return ds, time.perf_counter() - t


def check_target_and_groups(cfg: RunConfig, ds: Dataset) -> None:
    """What the loaded data makes meaningless, refused or warned about before any training.

    A positive class the target does not have (DP / EO would silently be 0), a target with one class in
    train (accuracy 1.0 by construction), one protected group only (every gap and parity figure is 0 by
    construction).
    """
    c = ds.num_classes
    classes = ", ".join(f"{i} = {n!r}" for i, n in enumerate(ds.class_names[:12])) + (" ..." if c > 12 else "")
    if not 0 <= int(cfg.positive_label) < c:
        raise ValueError(f"--positive-class {cfg.positive_label}: the target has {c} classes ({classes}); "
                         f"choose a class id in 0..{c - 1}")
    present = np.unique(ds.train.y)
    if present.size < 2:
        raise ValueError(f"dataset {ds.name!r}: the target has one class in the training split "
                         f"({ds.class_names[int(present[0])]!r} for all {len(ds.train)} rows): there is nothing "
                         "to learn and accuracy would be 1.0 by construction; check the target column "
                         "(--target, --positive-label)")
    groups = np.unique(ds.train.g)
    if groups.size < 2:
        warn(f"dataset {ds.name!r}: only one protected group ({ds.group_names[int(groups[0])]!r}) in "
             "the training split: every gap and parity figure (psi_g, DP, EO) is 0 by construction; check "
             "the protected attribute (--protected)")


def prepare(cfg: RunConfig, dataset: Dataset | None = None, *,
            dense: tuple[TrainState, dict] | None = None, dense_cache: Path | None = None,
            model: tuple[Any, Any, Any] | None = None, _loaded: tuple[Dataset, float] | None = None) -> Prepared:
    """Validate, load the data, build the model and train and evaluate the dense reference.

    ``dense``: an already trained ``(state, history)`` for this config (e.g.
    from :func:`train_dense_seeds`) is used instead of training one; it is
    evaluated like a freshly trained one. ``dense_cache``: a folder where the
    trained dense model is saved, and read back by a later call with a config
    that trains the same dense model (:func:`save_dense` / :func:`load_dense`). ``model``: a built
    ``(fm, params, model_state)`` instead of the config's model (see :func:`build_context`).
    """
    ds, load_s = _loaded if _loaded is not None else load_checked(cfg, dataset)
    ctx, params, model_state = build_context(cfg, ds, model)
    if dense_cache is not None and jax.process_count() == 1:
        ctx.cache_dir = Path(dense_cache)      # pruned starts of this dense model are kept beside it
    if dense is None and dense_cache is not None:
        dense = load_dense(dense_cache, cfg, dense_start(ctx, params, model_state)[0], ds.fingerprint())
        cached = dense is not None
        if cached and checkpoint.current() is not None:
            checkpoint.current().skip_phase()      # the phases after it keep their numbers on --resume
    else:
        cached = True
    prep = _prepared(ctx, params, model_state, dense, {"load_data_s": load_s})
    if dense_cache is not None and not cached:      # every process: orbax's save is collective
        try:
            save_dense(dense_cache, cfg, prep.dense, prep.dense_history, ds.fingerprint())
        except OSError as e:          # a full disk or a read-only cache folder: the run goes on without saving it
            warn(f"the dense model could not be saved for later runs in {dense_cache} ({e}); this run is "
                 "unaffected, the next one trains it again")
    return prep


#: RunConfig fields that do not change the dense run (a cached dense model serves any of their values).
NOT_DENSE = {"method", "sparsity", "method_options", "out", "save_compact", "progress", "certify_eps",
             "certify_level", "certify_interval", "fairness_bound", "small_group", "finetune_epochs", "finetune_lr",
             "eval_batch_size", "distribution", "exclude_first", "exclude_last", "positive_label"}


def dense_fingerprint(cfg: RunConfig, data: dict | None = None) -> dict:
    """What the dense run depends on: the config without the per-method fields, the data's fingerprint
    (:meth:`Dataset.fingerprint`) and the JAX version."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_DENSE}
    return _jsonable({"config": d, "data": data, "jax": jax.__version__})


#: The dense-model cache inside its folder: one orbax checkpoint, the state and its fingerprint and history
#: (:func:`caches.save_state`).
DENSE_CACHE = "dense-cache"


def save_dense(folder: Path, cfg: RunConfig, state: TrainState, history: dict, data: dict | None = None) -> None:
    """Write a trained dense state into ``folder`` with its fingerprint and history (one atomic write)."""
    caches.save_state(Path(folder) / DENSE_CACHE, state,
                      {"fingerprint": dense_fingerprint(cfg, data), "history": _jsonable(history)})


def dense_cached(folder: Path, cfg: RunConfig, data: dict | None = None) -> bool:
    """A saved dense model for this dense config and data exists (its fingerprint read, not its arrays)."""
    meta = caches.state_meta(Path(folder) / DENSE_CACHE)
    return meta is not None and meta.get("fingerprint") == dense_fingerprint(cfg, data)


def load_dense(folder: Path, cfg: RunConfig, template: TrainState, data: dict | None = None
               ) -> tuple[TrainState, dict] | None:
    """The dense state saved by :func:`save_dense` for the same dense config and data, every leaf matched to
    ``template`` by its tree path, shape and dtype; None when there is none or it does not fit (then the dense
    model is trained again)."""
    got = caches.load_state(Path(folder) / DENSE_CACHE, template, dense_fingerprint(cfg, data))
    if got is None:
        return None
    state, meta = got
    return state, dict(meta["history"], cached=True)


def prepare_seeds(cfgs: list[RunConfig], dataset: Dataset | None = None) -> list[Prepared]:
    """:func:`prepare` for several seeds of one configuration, their dense models trained in one vmapped run.

    The configs may differ only in ``seed`` (and in what the dense run does not
    use: method, sparsity, method options, output). The dataset is loaded once.
    Image augmentation and BatchNorm statistics are per seed, as in sequential
    runs; device meshes and checkpoints are not supported (train sequentially).
    """
    if not cfgs:
        return []
    per_run = {"seed", "method", "sparsity", "method_options", "out", "save_compact"}
    ref = {k: v for k, v in dataclasses.asdict(cfgs[0]).items() if k not in per_run}
    for c in cfgs[1:]:
        diff = sorted(k for k, v in dataclasses.asdict(c).items() if k not in per_run and ref[k] != v)
        if diff:
            raise ValueError(f"parallel seeds need configs that differ only in the seed; these differ: {diff}")
    seeds = [c.seed for c in cfgs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"parallel seeds need distinct seeds; got {seeds}")
    ds, load_s = load_checked(cfgs[0], dataset)
    for c in cfgs[1:]:
        validate_config(c)
    built = [build_context(c, ds) for c in cfgs]
    t = time.perf_counter()
    trained = train_dense_seeds(built)
    train_s = (time.perf_counter() - t) / len(cfgs)
    return [_prepared(ctx, params, model_state, dense, {"load_data_s": load_s, "dense_train_s": train_s})
            for (ctx, params, model_state), dense in zip(built, trained)]


def _prepared(ctx: Context, params: Any, model_state: Any, dense: tuple[TrainState, dict] | None,
              timings: dict) -> Prepared:
    """Train the dense model unless given, evaluate it on every split: the one path to a :class:`Prepared`."""
    cfg, ds = ctx.config, ctx.dataset
    timings = dict(timings)
    if dense is None:
        t = time.perf_counter()
        dense, dense_hist = train_dense(ctx, params, model_state)
        timings["dense_train_s"] = time.perf_counter() - t
    else:
        dense, dense_hist = dense
        _check_dense(dense, params, model_state)
        # time spent here: none for a dense model read from a cache (its history keeps the training's seconds)
        timings.setdefault("dense_train_s", 0.0 if dense_hist.get("cached") else float(dense_hist.get("seconds", 0.0)))
    t = time.perf_counter()
    step = report_eval_step(ctx)
    evals = {s: evaluate(step, dense, split, cfg.eval_batch_size) for s, split in ds.splits().items()}
    ctx.dense_train_counts, ctx.dense_train_class_counts = evals["train"][:2]
    timings["dense_eval_s"] = time.perf_counter() - t
    return Prepared(cfg, ds, ctx, dense, dense_hist, evals, timings, report_step=step)


def _check_dense(dense: TrainState, params: Any, model_state: Any) -> None:
    """A given dense state must be this config's model (same leaves and shapes), not another one."""
    def shapes(tree):
        return jax.tree.map(lambda x: tuple(np.shape(x)), tree)
    if (jax.tree.structure(dense.params) != jax.tree.structure(params)
            or shapes(dense.params) != shapes(params) or shapes(dense.model_state) != shapes(model_state)):
        raise ValueError("the given dense state does not fit this config's model (different layers or shapes); "
                         "train it with the same dataset, model and model options")


def run_method(prep: Prepared, **overrides: Any) -> dict:
    """Run one method on a prepared dense model; ``overrides`` replace config fields
    (``method``, ``sparsity``, ``method_options``, ``out``, ...) but not the data or the dense training."""
    t_start = time.perf_counter()
    fixed = {"dataset", "data_dir", "model", "epochs", "lr", "batch_size", "dataset_options", "model_options",
             "optimizer", "weight_decay", "exclude_first", "exclude_last", "positive_label"}
    bad = fixed & set(overrides)
    if bad:
        raise ValueError(f"cannot override {sorted(bad)} after the dense model was trained; prepare() again")
    cfg = dataclasses.replace(prep.config, **overrides)
    opts = validate_config(cfg)
    _check_outputs(cfg)
    method = get_method(cfg.method)
    ctx = dataclasses.replace(prep.ctx, config=cfg)
    ds = prep.dataset
    tracker = tracking.current()
    if tracker is not None:
        tracker.group_names = list(ds.group_names)
    pruned, info = method.run(ctx, prep.dense, opts)
    jax.block_until_ready(pruned.params)
    timings = dict(prep.timings)
    timings["method_s"] = time.perf_counter() - t_start
    evals = {"dense": prep.dense_evals,
             "pruned": {s: evaluate(prep.report_step or ctx.eval_step, pruned, split, cfg.eval_batch_size)
                        for s, split in ds.splits().items()}}
    results = _assemble(cfg, ds, ctx, prep.dense, pruned, evals, prep.dense_history, info)
    results["data_fingerprint"] = ds.fingerprint()
    if tracker is not None:         # the logged series, summarised (first / last / min / max per phase and group)
        tracker.flush()
        results["tracking"] = tracker.summary(relative_to=cfg.out)
    add_certificate(results, cfg, ctx, prep.dense, pruned, evals)
    if "val" in evals["pruned"] and "val" in results["pruned"]:
        # the same certificate on the validation rows: what a setting (eps, distill, a checkpoint) may be chosen
        # on, so that the test split is read once
        add_certificate(results, cfg, ctx, prep.dense, pruned, evals, split="val")
    empty = [name for name, layer in results["sparsity"]["layers"].items() if layer["kept"] == 0]
    results["sparsity"]["empty_layers"] = empty
    if empty:
        warn(f"{cfg.method} at sparsity {cfg.sparsity}: layer(s) {', '.join(empty)} keep no weights, so "
             "the pruned model's output no longer depends on its input; use a lower sparsity, "
             "--distribution global or erk, or --exclude-first / --exclude-last")
    if cfg.save_compact and distributed.is_primary():
        t = time.perf_counter()
        try:
            results["compact"] = save_compact(ctx, pruned, Path(cfg.out))
        except ValueError as e:   # e.g. a layer lost every unit: keep the run's results, report why
            results["compact"] = {"error": str(e)}
            warn(f"--save-compact: no compacted model written: {e}")
        timings["compact_s"] = time.perf_counter() - t
    timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
    results["timings"] = timings
    results["wall_time_s"] = timings["total_s"]
    mesh, ckpt = distributed.current_mesh(), checkpoint.current()
    results["runtime"] = {"devices": distributed.num_devices(mesh), "processes": jax.process_count(),
                          "platform": jax.devices()[0].platform,
                          "checkpoints": None if ckpt is None or not ckpt.started else str(ckpt.directory),
                          "resumed": bool(ckpt is not None and ckpt.resumed),
                          "data_from_cache": bool(ds.__dict__.get("_from_cache", False)),
                          "dense_from_cache": bool(prep.dense_history.get("cached", False)),
                          "pruned_start_from_cache": bool(info.get("prune_history", {}).get("cached", False))}
    results["schema_version"] = SCHEMA_VERSION
    results = Report(results)
    if cfg.out and distributed.is_primary():
        report.write_outputs(results, Path(cfg.out))
    results["_state"] = pruned
    return results


def add_certificate(results: dict, cfg: RunConfig, ctx: Context, dense: TrainState, pruned: TrainState,
                    evals: dict, split: str = "test") -> None:
    """Per-group certificate and degenerate-model check of ``pruned`` vs ``dense`` on ``split`` (in place).

    ``evals``: the run's ``{"dense"|"pruned": {split: (group counts, class counts)}}``.
    Writes ``results[model][split]["degenerate"]`` (+ the most frequent prediction and its share) for the
    dense and the pruned model and ``results["pruned"][split]["certificate"]``; warns about a degenerate
    pruned model.
    """
    ds = ctx.dataset
    data = ds.splits()[split]
    paired = evaluate_paired(make_paired_eval_step(ctx.fm, ds.num_groups, ds.num_classes), dense, pruned, data,
                             cfg.eval_batch_size)
    for which, hist in (("dense", paired["dense_pred_hist"]), ("pruned", paired["pred_hist"])):
        results[which][split].update(certify.prediction_summary(hist, ds.class_names))
    gc, dense_gc = evals["pruned"][split][0], evals["dense"][split][0]
    results["pruned"][split]["certificate"] = certify.certificate(
        gc, dense_gc, paired["lost"], paired["gained"], eps=certify_eps(cfg), level=float(cfg.certify_level),
        group_names=ds.group_names, fairness_bound=cfg.fairness_bound, small_group=int(cfg.small_group),
        interval=cfg.certify_interval)
    p = results["pruned"][split]
    if split != "test":
        return
    cert = p["certificate"]
    short = [n for n, g in cert["groups"].items() if g.get("floor") is not None and g["floor"] > cert["eps"]]
    if short:
        worst = max(cert["groups"][n]["floor"] for n in short)
        warn(f"the {split} split cannot certify psi_g <= {cert['eps']:g} for {len(short)} of "
             f"{cert['groups_tested']} groups ({', '.join(short[:6])}{' ...' if len(short) > 6 else ''}) "
             f"even for a pruned model identical to the dense one (their floor reaches {worst:.4f}): "
             "these groups have too few test rows; read the certified max psi_g instead, certify a "
             "larger bound (--certify-eps), or give the test split more rows")
    one_sided = {n: ("positives" if g.get("positives") == 0 else "negatives")
                 for n, g in cert["groups"].items() if g.get("n") and 0 in (g.get("positives"), g.get("negatives"))}
    if one_sided and len(one_sided) < sum(1 for g in cert["groups"].values() if g.get("n")):
        # (when every group is one-sided the groups are the classes, which has its own warning)
        shown = ", ".join(f"{n} (no {k})" for n, k in list(one_sided.items())[:6])
        warn(f"{len(one_sided)} group(s) have no positives or no negatives in the {split} split ({shown}"
             f"{' ...' if len(one_sided) > 6 else ''}): their true- or false-positive rate is 0 by "
             "convention (fairlearn's too), so the equalized-odds difference may be set by that alone; "
             "read it with care, or give the test split more rows")
    if p["degenerate"]:
        warn(f"{cfg.method} at sparsity {cfg.sparsity}: the pruned model is degenerate: it predicts "
             f"{p['top_prediction']!r} for {p['top_prediction_share']:.1%} of the {split} rows, so its "
             "fairness figures (DP / EO near 0) say nothing about fairness")


def run(cfg: RunConfig, dataset: Dataset | None = None, *, devices: int | str | None = None,
        checkpoint_every: int = 0, checkpoint_after_s: float = 0.0, resume: bool = False,
        dense_cache: bool = False) -> dict:
    """Run one experiment end to end; writes results into ``cfg.out`` when set and returns them.

    ``devices``: data-parallel over that many devices (``"all"``: every device;
    ``None``: the default device, no mesh). ``checkpoint_every`` > 0: the run
    state is saved into ``OUT/checkpoints`` every that many steps and at the
    end of each phase, from the start or, with ``checkpoint_after_s`` > 0, once
    the run has lasted that long (a shorter run writes none); ``resume``
    continues from those checkpoints (a fresh start when there are none).
    ``dense_cache``: start from the dense model an earlier run saved in the user's cache folder for the same
    dense settings, data, platform and device count, or save this run's there (:mod:`caches`; one process only).
    """
    validate_config(cfg)
    _check_outputs(cfg)
    if cfg.out:
        check_out_dir(cfg.out)
    mesh = None if devices is None else distributed.make_mesh(devices)
    if mesh is not None:
        distributed.check_batch_size(cfg.batch_size, mesh)
    if int(checkpoint_every) < 0:
        raise ValueError(f"--checkpoint-every must be >= 0 (0 = off); got {checkpoint_every}")
    if (checkpoint_every or resume) and not cfg.out:
        raise ValueError("checkpoints need an output folder (--out)")
    if resume and not checkpoint_every:
        raise ValueError("--resume needs checkpoints: use --checkpoint-every N with N > 0")
    with owning_folder(cfg.out):
        loaded = load_checked(cfg, dataset, cache=dense_cache and jax.process_count() == 1)
        ckpt = None
        if checkpoint_every or resume:
            ckpt = checkpoint.Checkpointer(Path(cfg.out) / checkpoint.CHECKPOINT_DIR, cfg,
                                           every=checkpoint_every, resume=resume, data=loaded[0].fingerprint(),
                                           after_s=checkpoint_after_s)
        cache = None
        if dense_cache and jax.process_count() == 1:
            key = {"dense": dense_fingerprint(cfg, loaded[0].fingerprint()), "platform": jax.devices()[0].platform,
                   "devices": distributed.num_devices(mesh)}
            cache = caches.dense_cache_folder(key)
        with replacing_outputs(cfg.out), distributed.use_mesh(mesh), checkpoint.use(ckpt):
            res = run_method(prepare(cfg, loaded[0], _loaded=loaded, dense_cache=cache))
    if ckpt is not None:
        ckpt.mark_complete()
    distributed.barrier("run-end")     # process 0 has written the outputs
    res.pop("_state", None)
    return res


#: The file that marks an output folder as in use by a run (removed when the run ends, however it ends).
LOCK_FILE = ".fairprune-run.lock"


@contextlib.contextmanager
def owning_folder(out: str | os.PathLike | None):
    """The run holds ``out`` for as long as the block runs: a second run into the same folder (with or without
    checkpoints) is refused at once, naming the first (its process id, host and start time). A lock left by a
    killed run on this host (its process is gone) is taken over; one from another host is not guessed at."""
    if not out or not distributed.is_primary():
        yield
        return
    import json
    import socket
    lock = Path(out) / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                other = json.loads(lock.read_text())
            except (OSError, ValueError):
                other = {}
            if other.get("host") == me["host"] and not _process_alive(other.get("pid")):
                lock.unlink(missing_ok=True)          # left by a run that was killed: take it over
                continue
            raise ValueError(f"--out {out} is in use by another fairprune run (process {other.get('pid', '?')} on "
                             f"{other.get('host', '?')}, started {other.get('started', '?')}); wait for it to end or "
                             f"choose another --out. If no such run is going, delete {lock}") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _process_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


#: What a run writes into its output folder (set aside when a new run starts there, so none is ever stale).
OUTPUT_FILES = ("results.json", "results.md", "group_accuracy.png", "constraints.png")
#: Where an earlier run's outputs wait while a new run works in the same folder.
ASIDE_DIR = ".previous-results"


def check_out_dir(out: str | Path) -> None:
    """``out`` must be a folder this process can create and write into: checked before any data is loaded."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder; choose a folder for the run's outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".fairprune-write-test-{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out} is not a folder fairprune can write into ({e.strerror or e}); choose "
                         "another --out") from None


def set_aside_outputs(out: Path) -> Path | None:
    """Move an earlier run's results out of ``out`` into ``out/.previous-results`` as this run starts (process
    0), so that a ``results.json`` beside this run's checkpoints is never an older run's, yet nothing is lost
    until this run's own results are written: :func:`restore_outputs` puts them back if it fails. Returns
    the folder (None when there was nothing to set aside). A folder left by a run killed with -9 holds the
    results of the run before it: they are kept, not overwritten, until a run finishes."""
    if not distributed.is_primary():
        return None
    aside = out / ASIDE_DIR
    found = [name for name in OUTPUT_FILES if (out / name).is_file()]
    if aside.is_dir() and not any((aside / n).is_file() for n in OUTPUT_FILES):
        shutil.rmtree(aside, ignore_errors=True)
    if not found:
        return aside if aside.is_dir() else None
    if aside.is_dir():       # a killed run's aside folder holds the last finished results: keep those
        for name in found:
            (out / name).unlink()
        return aside
    aside.mkdir()
    for name in found:
        os.replace(out / name, aside / name)
    return aside


@contextlib.contextmanager
def replacing_outputs(out: str | os.PathLike | None):
    """The earlier results in ``out`` are set aside while the block runs, dropped when it finishes, and put
    back when it fails or is interrupted: a run never costs the results of the one before it."""
    if not out:
        yield
        return
    aside = set_aside_outputs(Path(out))
    try:
        yield
    except BaseException:
        if aside is not None:
            restore_outputs(Path(out), aside)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def restore_outputs(out: Path, aside: Path) -> None:
    """Put an earlier run's results back into ``out`` after this run failed (its own partial outputs go)."""
    if not aside.is_dir():
        return
    for name in OUTPUT_FILES:
        if (aside / name).is_file():
            os.replace(aside / name, out / name)
        elif (out / name).is_file():
            (out / name).unlink()
    shutil.rmtree(aside, ignore_errors=True)


def _check_outputs(cfg: RunConfig) -> None:
    """Settings that write into the output folder need one (``prepare`` alone writes nothing)."""
    if cfg.save_compact and not cfg.out:
        raise ValueError("--save-compact writes the compacted model into the output folder; set --out")


def _host(x: Any) -> np.ndarray:
    """A host copy of a (replicated) array; over several processes, this process's own copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def save_compact(ctx: Context, state: TrainState, out: Path) -> dict:
    """Compact the structured ``state`` (:func:`compact.compact`), save it into ``out/compact`` and check it.

    Returns what ``results.json`` records: the folder (relative to ``out``),
    parameters and FLOPs dense vs compact, and the largest absolute difference
    between the masked and the compacted model's logits on the first
    ``COMPACT_CHECK_ROWS`` test rows (evaluation mode, in batches).
    """
    params, masks, model_state = jax.tree.map(_host, (state.params, state.masks, state.model_state))
    small = compact.compact(ctx.fm, params, model_state, masks)
    compact.save(small, out / COMPACT_DIR)
    test = ctx.dataset.test
    rows = min(len(test), COMPACT_CHECK_ROWS)
    bs = max(min(ctx.config.eval_batch_size, rows), 1)
    head = test.take(np.arange(rows))
    ref = split_logits(ctx.fm, params, masks, model_state, head, bs)
    got = rows_over_split(lambda b: small.apply(b["x"]), (), head, bs)
    diff = float(np.max(np.abs(ref - got)))     # NaN propagates
    if not diff <= 1e-3:
        warn(f"--save-compact: the compacted model's logits differ from the masked model's by up to "
             f"{diff:.3g} on the test split")
    dense_params = int(sum(np.size(v) for _, v in named_leaves(params)))
    dense_flops, small_flops = float(sum(ctx.flops.values())), compact.flops(small)
    return {"path": COMPACT_DIR, "architecture": small.arch,
            "params_dense": dense_params, "params_compact": small.num_params,
            "params_fraction": small.num_params / dense_params,
            "flops_dense": dense_flops, "flops_compact": small_flops,
            "flops_fraction": small_flops / dense_flops if dense_flops else None,
            "check_rows": rows, "max_abs_logit_diff": diff if np.isfinite(diff) else None}


def _assemble(cfg: RunConfig, ds: Dataset, ctx: Context, dense: TrainState, pruned: TrainState,
              evals: dict, dense_hist: dict, info: dict) -> dict:
    model_name = ctx.fm.name      # cfg.model, or the default for the input shape, or a user's own module
    summary = sparsity_summary(pruned.params, pruned.masks, ctx.flops)
    out: dict[str, Any] = {
        "method": cfg.method,
        "dataset": ds.name,
        "model": model_name,
        "seed": cfg.seed,
        "config": _jsonable(dataclasses.asdict(cfg)),
        "groups": {"names": ds.group_names, "attributes": ds.group_attrs, "num_groups": ds.num_groups},
        "classes": ds.class_names,
        "sizes": {s: len(split) for s, split in ds.splits().items()},
        "sparsity": {
            "target": cfg.sparsity,
            "achieved": summary["sparsity_prunable"],
            "overall": summary["sparsity_overall"],
            "flops_fraction": summary.get("flops_fraction"),
            "params_kept": summary["params_kept"],
            "params_total": summary["params_total"],
            "layers": summary["layers"],
        },
        "dataset_meta": _jsonable(ds.meta),
        # DP and EO compare P(pred == this class) across groups: for a multi-class target, this class vs the rest
        "positive_class": {"id": int(cfg.positive_label), "name": ds.class_names[int(cfg.positive_label)],
                           "num_classes": ds.num_classes},
    }
    for which in ("dense", "pruned"):
        out[which] = {}
        for split_name, (gc, cc, *per_class) in evals[which].items():
            dense_ref = evals["dense"][split_name][0] if which == "pruned" else None
            out[which][split_name] = fairness.fairness_report(
                gc, class_counts=cc, dense_counts=dense_ref, group_names=ds.group_names,
                class_group=per_class[0] if per_class else None, class_names=ds.class_names)
    out["history"] = {"dense": dense_hist, "method": _jsonable(info.get("history", {}))}
    out["method_info"] = _jsonable({k: v for k, v in info.items() if k != "history"})
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
