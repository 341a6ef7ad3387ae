"""From a checked config to a trained, evaluated dense model: load (or take) the data and refuse what it makes
meaningless, build the model and the method :class:`Context`, train the dense reference (one seed, or several
in one vmapped run), read or write it in a dense-model cache, and evaluate it on every split. The result, a
:class:`Prepared`, is reused by every method and sparsity of its seed (``runner.run_method``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fairprune_jax.core.notices import warn
from fairprune_jax.data import Dataset, load_dataset
from fairprune_jax.methods import Context, RunConfig, make_optimizer
from fairprune_jax.models import build_model, count_flops, default_model_for, layer_order
from fairprune_jax.running.outputs import _jsonable
from fairprune_jax.running.validation import IN_MEMORY, check_model_options, validate_config
from fairprune_jax.sparsity.masks import dense_by_name_note, nm_layers, nm_pattern, prunable_template
from fairprune_jax.training import caches, checkpoint, distributed
from fairprune_jax.training.train import TrainState, create_state, evaluate, fit, make_eval_step, make_train_step


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


def warn_missing_classes(ds: Dataset) -> list[str]:
    """Warn about classes the model has an output for but the training split has no row of (returned): it
    never learns them, and an evaluation split's rows of such a class are always wrong. Often a model with
    more outputs than the data has classes (a (features, logits) tuple read as logits, a wrong head size)."""
    n = np.bincount(ds.train.y, minlength=ds.num_classes)[:ds.num_classes]
    absent = [ds.class_names[i] for i in np.flatnonzero(n == 0)]
    if absent:
        elsewhere = [s for s, split in ds.splits().items() if s != "train"
                     and np.isin(split.y, np.flatnonzero(n == 0)).any()]
        warn(f"dataset {ds.name!r}: {len(absent)} of {ds.num_classes} class(es) have no rows in the train split "
             f"({', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}): the model never learns them"
             + (f", and their rows in {', '.join(elsewhere)} are always wrong" if elsewhere else "")
             + ". A model with more outputs than the labels' classes? (prune() reads a model that returns a "
             "tuple by its first element as the logits)")
    return absent


def dense_start(ctx: Context, params: Any, model_state: Any) -> tuple[TrainState, Any]:
    """The dense run's initial state and train step (optimizer, schedule and PRNG seed from the config)."""
    cfg = ctx.settings
    tx = make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, total_steps=cfg.epochs * ctx.steps_per_epoch)
    return create_state(params, model_state, tx, seed=ctx.seed), make_train_step(ctx.fm, tx, augment=ctx.augment)


def train_dense(ctx: Context, params: Any, model_state: Any) -> tuple[TrainState, dict]:
    """Train the dense reference model every method starts from."""
    cfg = ctx.settings
    state, step = dense_start(ctx, params, model_state)
    return fit(state, step, ctx.dataset.train, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=ctx.seed,
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
    cfg = built[0][0].settings
    states, histories = seeds_lib.fit_seeds(
        [state for state, _ in starts], starts[0][1], built[0][0].dataset.train, epochs=cfg.epochs,
        batch_size=cfg.batch_size, seeds=[ctx.seed for ctx, _, _ in built], desc="dense",
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
    if cfg.sparsity > 0 and not any(t is True for t in jax.tree.leaves(template, is_leaf=lambda t: t is None)):
        raise ValueError(f"nothing to prune: the model {getattr(fm, 'name', '')!r} has no prunable layer left "
                         f"({len(order)} layer(s) in all"
                         f"{', with --exclude-first and --exclude-last' if cfg.exclude_first and cfg.exclude_last else ''}"
                         "); leave out --exclude-first or --exclude-last, or use a deeper model")
    note = dense_by_name_note(params, cfg.sparsity)
    if note:
        warn(note)
    if cfg.sparsity > 0 and nm_pattern(cfg.distribution) is not None:
        off = [n for n, ok in nm_layers(params, template, cfg.distribution).items() if not ok]
        if off:
            m = nm_pattern(cfg.distribution)[1]
            warn(f"--distribution {cfg.distribution}: {len(off)} prunable layer(s) read a number of inputs that is not "
                 f"a multiple of {m} ({', '.join(off[:6])}{' ...' if len(off) > 6 else ''}); they are pruned to the "
                 f"same sparsity without the pattern, which an accelerator's N:M kernels will not run. Exclude them "
                 f"(--exclude-first, --exclude-last) or widen them to a multiple of {m}")
    ctx = Context.from_config(cfg, dataset=ds, fm=fm, template=template,
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
    ds, cfg = ctx.dataset, ctx.settings
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
    warn_missing_classes(ds)
    # every process of a multi-process run: the same settings and the same data, before any collective uses them
    # (the data by content: each host may keep its copy under another path)
    same = {k: v for k, v in checkpoint.fingerprint(cfg).items() if k != "data_dir"}
    distributed.check_same_everywhere({**same, "data": ds.fingerprint()}, "settings or data")
    return ds, time.perf_counter() - t


def check_target_and_groups(cfg: RunConfig, ds: Dataset) -> None:
    """What the loaded data makes meaningless, refused or warned about before any training.

    A positive class the target does not have (DP / EO would silently be 0), a target with one class in
    train (accuracy 1.0 by construction), one protected group only (every gap and parity figure is 0 by
    construction).
    """
    c = ds.num_classes
    classes = ", ".join(f"{i} = {n!r}" for i, n in enumerate(ds.class_names[:12])) + (" ..." if c > 12 else "")
    present = np.unique(ds.train.y)
    if present.size < 2:          # (first: with one class, the default positive class 1 is not one either)
        raise ValueError(f"dataset {ds.name!r}: the target has one class in the training split "
                         f"({ds.class_names[int(present[0])]!r} for all {len(ds.train)} rows): there is nothing "
                         "to learn and accuracy would be 1.0 by construction; check the target column "
                         "(--target, --positive-label)")
    if not 0 <= int(cfg.positive_label) < c:
        raise ValueError(f"--positive-class {cfg.positive_label}: the target has {c} classes ({classes}); "
                         f"choose a class id in 0..{c - 1}")
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
    prep = _prepared(cfg, ctx, params, model_state, dense, {"load_data_s": load_s})
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
    return [_prepared(c, ctx, params, model_state, dense, {"load_data_s": load_s, "dense_train_s": train_s})
            for c, (ctx, params, model_state), dense in zip(cfgs, built, trained)]


def _prepared(cfg: RunConfig, ctx: Context, params: Any, model_state: Any, dense: tuple[TrainState, dict] | None,
              timings: dict) -> Prepared:
    """Train the dense model unless given, evaluate it on every split: the one path to a :class:`Prepared`."""
    ds = ctx.dataset
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
