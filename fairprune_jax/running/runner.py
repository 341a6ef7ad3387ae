"""The ``fairprune run`` pipeline: data -> dense model -> method -> evaluation -> report.

:func:`run` is one run end to end; :func:`run_method` is its second half on a :class:`Prepared` dense model
(several methods and sparsities share one): the method, the evaluation of both models on every split, the
per-group certificate (:func:`add_certificate`), the compacted model of a structured run and the report
(``results.json``, ``results.md`` and plots). The first half lives beside it: the request's checks in
``validation.py`` (before any data loads), the data and the dense model in ``preparation.py``, the output
folder in ``outputs.py``; their names are re-exported here, so ``runner.prepare``, ``runner.validate_config``,
... work as they always have.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fairprune_jax.core.notices import raise_if_interrupted, warn
from fairprune_jax.core.numerics import numerics_key
from fairprune_jax.data import Dataset
from fairprune_jax.methods import Context, RunConfig, get_method
from fairprune_jax.metrics import certify, fairness
from fairprune_jax.reporting import report
from fairprune_jax.reporting.result import SCHEMA_VERSION, Report
from fairprune_jax.running.outputs import (ASIDE_DIR, LOCK_FILE, OUTPUT_FILES, _check_outputs,  # noqa: F401
                                           _jsonable, _process_alive, check_out_dir, owning_folder,
                                           replacing_outputs, restore_outputs, set_aside_outputs)
from fairprune_jax.running.preparation import (DENSE_CACHE, NOT_DENSE, Prepared, _augment_fn,  # noqa: F401
                                               _check_dense, _prepared, build_context, check_target_and_groups,
                                               dense_cached, dense_fingerprint, dense_start, load_checked,
                                               load_dense, prepare, prepare_seeds, report_eval_step, save_dense,
                                               train_dense, train_dense_seeds, warn_missing_groups)
from fairprune_jax.running.validation import (IN_MEMORY, certify_eps, check_model_option_values,  # noqa: F401
                                              check_model_options, model_option_names, validate_config)
from fairprune_jax.sparsity import compact
from fairprune_jax.sparsity.masks import named_leaves, sparsity_summary
from fairprune_jax.training import caches, checkpoint, distributed, tracking
from fairprune_jax.training.train import (TrainState, evaluate, evaluate_paired, make_paired_eval_step,
                                          rows_over_split, split_logits)

#: Where ``--save-compact`` writes the compacted model, inside the run's output folder.
COMPACT_DIR = "compact"
#: Test rows on which the compacted model's logits are compared with the masked model's.
COMPACT_CHECK_ROWS = 1024


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
    ctx = prep.ctx.with_config(cfg)
    ds = prep.dataset
    tracker = tracking.current()
    if tracker is not None:
        tracker.group_names = list(ds.group_names)
    pruned, info = method.run(ctx, prep.dense, opts)
    unit_groups = info.pop("_unit_groups", None)      # a structured run's removable units (not a result)
    jax.block_until_ready(pruned.params)
    timings = dict(prep.timings)
    timings["method_s"] = time.perf_counter() - t_start
    evals = {"dense": prep.dense_evals,
             "pruned": {s: evaluate(prep.report_step or ctx.eval_step, pruned, split, cfg.eval_batch_size)
                        for s, split in ds.splits().items()}}
    results = _assemble(cfg, ds, ctx, prep.dense, pruned, evals, prep.dense_history, info)
    if unit_groups is not None:
        # what compaction keeps (a removed unit takes its readers' rows too), besides the masks' own count
        results["sparsity"]["compacted"] = compact.physical_counts(pruned.params, pruned.masks, unit_groups,
                                                                   ctx.flops)
    results["method_info"]["defaults_revision"] = method.defaults_revision   # compare's stale-cell check reads it
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
    short = sparsity_shortfall_note(cfg, float(results["sparsity"]["achieved"]))
    if short:
        results["sparsity"]["shortfall_note"] = short
        if distributed.is_primary():
            warn(short)
    if cfg.save_compact and distributed.is_primary():
        t = time.perf_counter()
        try:
            results["compact"] = save_compact(ctx, pruned, Path(cfg.out), cfg.model_options)
        except ValueError as e:   # e.g. a layer lost every unit: keep the run's results, report why
            results["compact"] = {"error": str(e)}
            warn(f"--save-compact: no compacted model written: {e}")
        timings["compact_s"] = time.perf_counter() - t
    timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
    results["timings"] = timings
    results["wall_time_s"] = timings["total_s"]
    mesh, ckpt = distributed.current_mesh(), checkpoint.current()
    results["runtime"] = {"devices": distributed.num_devices(mesh), "processes": jax.process_count(),
                          "platform": jax.devices()[0].platform, "numerics": numerics_key(),
                          "checkpoints": None if ckpt is None or not ckpt.started else str(ckpt.directory),
                          "resumed": bool(ckpt is not None and ckpt.resumed),
                          # the device count of each start when a resumed run changed it (None: not recorded)
                          "devices_by_start": (list(ckpt.devices) if ckpt is not None and ckpt.resumed
                                               and len(set(ckpt.devices)) > 1 else None),
                          "data_from_cache": bool(ds.__dict__.get("_from_cache", False)),
                          "dense_from_cache": bool(prep.dense_history.get("cached", False)),
                          "pruned_start_from_cache": bool(info.get("prune_history", {}).get("cached", False))}
    results["schema_version"] = SCHEMA_VERSION
    results = Report(results)
    if cfg.out and distributed.is_primary():
        raise_if_interrupted()          # stopped during the last evaluation: the earlier run's results stay
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
    note = accuracy_loss_note(results, cfg, split)
    if note:
        p["accuracy_loss_note"] = note
    if not distributed.is_primary():        # process 0 reports (every process holds the same results)
        return
    cert = p["certificate"]
    short = [n for n, g in cert["groups"].items() if g.get("floor") is not None and g["floor"] > cert["eps"]]
    if short:
        worst = max(cert["groups"][n]["floor"] for n in short)
        warn(f"the {split} split cannot certify psi_g <= {cert['eps']:g} for {len(short)} of "
             f"{cert['groups_tested']} groups ({', '.join(short[:6])}{' ...' if len(short) > 6 else ''}) "
             f"unless they lose less accuracy than the average (psi_g < 0): a pruned model identical to the "
             f"dense one would get a bound above eps for them (their floor reaches {worst:.4f}), as these "
             "groups have too few test rows; read the certified max psi_g instead, certify a larger bound "
             "(--certify-eps; certify_eps in a grid's [run] or in prune(config=)), or give the test split more rows")
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
    if note:
        warn(note)


#: A run whose prunable weights end this far (or more) below the target sparsity says so: its numbers describe a
#: denser model than its label.
SPARSITY_SHORTFALL = 0.05


def sparsity_shortfall_note(cfg: RunConfig, achieved: float) -> str | None:
    """A warning when the achieved sparsity of the prunable weights falls :data:`SPARSITY_SHORTFALL` or more
    below the target (a method that keeps layers dense, at least one unit per layer, few prunable weights)."""
    if cfg.sparsity <= 0 or achieved > cfg.sparsity - SPARSITY_SHORTFALL:
        return None
    return (f"{cfg.method} pruned {achieved:.1%} of the prunable weights against the target {cfg.sparsity:g}: the "
            "results describe that model, not one at the target. The method keeps some layers dense (its "
            "keep_first_conv_dense / keep_last_dense options), structured pruning keeps at least one unit per "
            "layer, or --exclude-first / --exclude-last left few weights to prune")


#: A run whose pruned model's test accuracy is this far (or more) below the dense model's says so.
ACCURACY_LOSS_WARN = 0.05


def accuracy_loss_note(results: dict, cfg: RunConfig, split: str = "test") -> str | None:
    """A warning when the pruned model lost at least :data:`ACCURACY_LOSS_WARN` of accuracy on ``split``
    (not for a degenerate model, which has its own), in words for a structured run; else None."""
    d, p = results["dense"].get(split, {}), results["pruned"].get(split, {})
    if d.get("accuracy") is None or p.get("accuracy") is None or p.get("degenerate"):
        return None
    drop = float(d["accuracy"]) - float(p["accuracy"])
    if drop < ACCURACY_LOSS_WARN:
        return None
    method = get_method(cfg.method)
    opts = method.parse(cfg.method_options)
    structured = method.is_structured(opts)
    # a method with epoch options of its own after pruning (ballot's retrain_epochs, lth's round_epochs) may not
    # read --finetune-epochs at all: name them
    own = [k for k in dataclasses.asdict(opts) if k.endswith("epochs") and k not in ("prune_epochs", "fair_epochs")]
    epochs = ("more fine-tuning epochs (--finetune-epochs)" if not own else
              f"more epochs after pruning ({cfg.method}'s own {' / '.join(f'--opt {k}=N' for k in own)}; "
              "--finetune-epochs where it reads it)")
    advice = (f"structured pruning removes whole neurons / channels: a lower sparsity, {epochs} or an "
              "unstructured method keep more" if structured else f"a lower sparsity or {epochs} keep more")
    return (f"{cfg.method} at sparsity {cfg.sparsity}{' (structured)' if structured else ''} lost "
            f"{100 * drop:.1f} points of {split} accuracy ({float(d['accuracy']):.4f} dense -> {float(p['accuracy']):.4f} "
            f"pruned; this library flags {100 * ACCURACY_LOSS_WARN:.0f} points or more): {advice}")


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
                                           after_s=checkpoint_after_s, devices=distributed.num_devices(mesh))
        cache = None
        if dense_cache and jax.process_count() == 1:
            key = {"dense": dense_fingerprint(cfg, loaded[0].fingerprint()), "platform": jax.devices()[0].platform,
                   "devices": distributed.num_devices(mesh)}
            cache = caches.dense_cache_folder(key)
        try:
            with replacing_outputs(cfg.out, resumed=ckpt is not None and ckpt.resumed,
                                   own_results=ckpt is not None and ckpt.resumed_complete), \
                    distributed.use_mesh(mesh), checkpoint.use(ckpt):
                res = run_method(prepare(cfg, loaded[0], _loaded=loaded, dense_cache=cache))
        except BaseException:
            if ckpt is not None:
                ckpt.restore_previous()
            raise
    if ckpt is not None:
        ckpt.mark_complete()
    distributed.barrier("run-end")     # process 0 has written the outputs
    res.pop("_state", None)
    return res


def _host(x: Any) -> np.ndarray:
    """A host copy of a (replicated) array; over several processes, this process's own copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def save_compact(ctx: Context, state: TrainState, out: Path, model_options: dict | None = None) -> dict:
    """Compact the structured ``state`` (:func:`compact.compact`), save it into ``out/compact`` and check it.

    Returns what ``results.json`` records: the folder (relative to ``out``),
    parameters and FLOPs dense vs compact, and the largest absolute difference
    between the masked and the compacted model's logits on the first
    ``COMPACT_CHECK_ROWS`` test rows (evaluation mode, in batches).
    """
    params, masks, model_state = jax.tree.map(_host, (state.params, state.masks, state.model_state))
    small = compact.compact(ctx.fm, params, model_state, masks, options=model_options)
    compact.save(small, out / COMPACT_DIR)
    test = ctx.dataset.test
    rows = min(len(test), COMPACT_CHECK_ROWS)
    bs = max(min(ctx.settings.eval_batch_size, rows), 1)
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


