"""``fairprune compare``: a grid of methods x sparsities x seeds on one dataset.

One dense model is trained per seed and reused by every method and sparsity
of that seed. Each finished cell writes its own ``results.json``; a rerun
skips finished cells (and does not even train the dense model of a seed whose
cells are all done), so an interrupted comparison resumes where it stopped.
With ``parallel_seeds = true`` the dense models of all seeds that still have
unfinished cells are trained together in one ``jax.vmap``-ed run
(``runner.prepare_seeds``, ``seeds.fit_seeds``); the methods then run seed by
seed as usual.

Variants. An entry of ``methods`` may name a ``[variants.NAME]`` table instead
of a method: ``method = "bifp"`` plus option overrides (``mask_lr = 0.3``).
Several variants of one method thus sit side by side in one grid (option
sweeps), each with its own cells and rows.

Suites. A TOML with ``suite = ["a.toml", "b.toml", ...]`` (paths relative to
it) runs each comparison in turn and writes one combined table over all of
them (``headline.md``, ``.csv``, ``.json`` in the suite's output folder):
every method of every comparison, one row per (dataset, method, sparsity).

Parts. The grid as its TOML describes it is ``grid.py`` (:func:`load_config`, :class:`CompareConfig`,
:func:`cell_config`); the rows and aggregates of finished cells are ``summaries.py``; the tables, notes and
figures a grid writes are ``grid_report.py``. This module runs the cells (:func:`run_compare`), collects them
(:func:`collect`) and runs suites; every name of the parts is re-exported here, so ``compare.load_config``,
``compare.markdown_table``, ... work as they always have.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fairprune_jax.core.config import LEGACY_RUN_VALUES, RunConfig
from fairprune_jax.core.notices import tqdm, warn
from fairprune_jax.reporting import tables
from fairprune_jax.reporting.report import json_safe
from fairprune_jax.reporting.result import upgrade_certificates
from fairprune_jax.running.outputs import owning_folder, replacing_outputs
from fairprune_jax.running.grid import (CHOSEN_ON, DERIVED_COLUMNS, FLAG_COLUMNS, GRID_LISTS,  # noqa: F401
                                        METRICS, RUN_KEYS, TEXT_KEYS, TOP_KEYS, CompareConfig, _check_variants,
                                        _load_config, cell_config, cell_dir, check_grid_lists, check_run_values,
                                        chosen_on_kind, dense_dir, load_config, read_toml, resolve_entry)
from fairprune_jax.metrics import certify
from fairprune_jax.running.grid_report import (DEFAULT_COLUMNS, _metric_label, certificate_settings,  # noqa: F401
                                               constraint_lines, mixed_certificate_note,
                                               constraint_settings, format_cell, identical_rows, markdown_table,
                                               method_label, plot, small_legend, structured_methods,
                                               table_columns, used_defaults, write_outputs)
from fairprune_jax.running.summaries import (_get, _small_ends, aggregate, aggregate_dense,  # noqa: F401
                                             constant_classifier, constraint_summary, dense_row, small_marks)

SUITE_KEYS = {"name", "suite", "out", "columns"}


#: Settings a finished cell may differ in and still be reused: where files go and how the run is shown.
REUSE_IGNORES = ("out", "progress", "save_compact", "eval_batch_size")


def mismatch_message(cc: CompareConfig, seed: int, why: str) -> str:
    """The refusal when a seed's dense model is not the one its finished cells pruned (:func:`dense_mismatch`)."""
    return (f"{cc.out}: {why}. The grid keeps its dense models in its dense/ folder (not kept with committed "
            "results); this one was trained again, or its cache was replaced, and dense training is not "
            "bit-reproducible across CPUs, XLA versions or device counts. Cells pruned from two dense models would "
            "be compared as if paired. Run the grid into another --out (every cell on new dense models), or delete "
            f"seed {seed}'s cells from {cc.out / 'cells'} to recompute them")


def stale_cell(cc: CompareConfig, method: str, sparsity: float, seed: int, cell: dict,
               data: dict | None = None) -> str | None:
    """Why a finished cell's results.json does not belong to this grid (None when it does): a setting the TOML
    now gives another value, or (when both are known) other data. Settings the cell does not record (added
    to the library after it ran) are not compared."""
    now = json.loads(json.dumps(dataclasses.asdict(cell_config(cc, method, sparsity, seed)), default=str))
    old = cell.get("config") or {}
    ignore = set(REUSE_IGNORES) | {"method_options", "data_dir"}
    diffs = [f"{k}: cell {old[k]!r} vs TOML {now[k]!r}" for k in sorted(set(old) & set(now))
             if k not in ignore and old[k] != now[k]]
    # a setting the cell predates whose default now computes something else than the cell did
    diffs += [f"{k}: the cell ran before the setting existed, i.e. with {v!r}, and the grid now asks for "
              f"{now[k]!r} (its new default); set [run] {k} = {json.dumps(v)} in the grid to keep the cell"
              for k, v in LEGACY_RUN_VALUES.items() if old and k not in old and now.get(k) != v]
    # the data's place: the content decides where it was recorded; else the same file or folder (paths are
    # written relative to where the grid ran, so they are compared resolved, and only where both exist)
    if not (data is not None and cell.get("data_fingerprint") is not None) and "data_dir" in old:
        a, b = old["data_dir"], now.get("data_dir")
        if a != b and (a is None or b is None or (Path(a).exists() and Path(b).exists()
                                                  and Path(a).resolve() != Path(b).resolve())):
            diffs.append(f"data_dir: cell {a!r} vs TOML {b!r}")
    diffs += _stale_options(now["method"], now["method_options"], old.get("method_options") or {},
                            (cell.get("method_info") or {}).get("options") or {})
    diffs += _changed_defaults(now["method"], now["method_options"], cell)
    old_data = cell.get("data_fingerprint")
    if data is not None and old_data is not None and old_data != data:
        diffs += [f"data {k}: cell {old_data.get(k)!r} vs now {data.get(k)!r}"
                  for k in sorted(set(old_data) | set(data)) if old_data.get(k) != data.get(k)]
    return "; ".join(diffs) or None


def _stale_options(method: str, toml: dict, cell_given: dict, cell_used: dict) -> list[str]:
    """Method options that differ: one the TOML gives against what the cell was given (or, when the cell left it
    at its default then, the value it recorded as used); one the cell was given that the TOML leaves at a
    default that is now another value. A recorded ``"auto"`` (resolved at run time) matches anything."""
    from fairprune_jax.methods import get_method
    same = lambda a, b: json.dumps(a, default=str) == json.dumps(b, default=str)  # noqa: E731
    out = []
    for k, v in toml.items():
        ref = cell_given.get(k, cell_used.get(k, v))
        if ref != "auto" and not same(ref, v):
            out.append(f"option {k}: cell {ref!r} vs TOML {v!r}")
    default = dataclasses.asdict(get_method(method).parse({}))
    for k, v in cell_given.items():
        if k not in toml and k in default and not same(default[k], v):
            out.append(f"option {k}: cell {v!r} vs TOML (default) {default[k]!r}")
    return out


def _changed_defaults(method: str, toml: dict, cell: dict) -> list[str]:
    """Options the grid leaves at their default whose default changed what it does after the cell ran
    (the method's :class:`DefaultChange` list against the cell's recorded ``defaults_revision``), where that
    change would have given this cell another result."""
    from fairprune_jax.methods import get_method
    ran_at = int((cell.get("method_info") or {}).get("defaults_revision", 0))
    return [f"option {c.option}: its default changed after this cell ran ({c.what}); set {c.option} in the "
            f"grid to keep this cell" for c in get_method(method).default_changes
            if c.revision > ran_at and c.option not in toml and c.affects(cell)]


def check_finished_cells(cc: CompareConfig, done: list[tuple[int, str, float]], data: dict | None) -> None:
    """Refuse, before any training, to reuse finished cells that were computed with other settings or data."""
    stale = []
    for seed, m, s in done:
        p = cell_dir(cc, m, s, seed) / "results.json"
        try:
            cell = json.loads(p.read_text())
            lacks = [k for k in ("config", "dense", "pruned", "sparsity") if not isinstance(cell.get(k), dict)]
            # a damaged or hand-made file: reused, it would fail in the tables or pass as a result
            why = (f"it is not a finished cell's results (no {', '.join(lacks)})" if lacks
                   else stale_cell(cc, m, s, seed, cell, data))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:    # damaged, or not a cell's
            why = f"{p} cannot be read ({type(e).__name__}: {e})"
        if why:
            stale.append(f"{p.parent.name} ({why})")
    if stale:
        raise ValueError(
            f"{cc.out}: {len(stale)} finished cell(s) were computed with other settings or data than the grid "
            f"asks for now, so their results would be reported as this grid's: {'; '.join(stale[:3])}"
            f"{' ...' if len(stale) > 3 else ''}. Run the grid into another --out, or delete "
            f"{cc.out / 'cells'} (or just those cells) to recompute them")


def dense_mismatch(cc: CompareConfig, seed: int, prep: Any, done: list[tuple[int, str, float]]) -> str | None:
    """Why the dense model of ``seed`` in ``prep`` is not the one the seed's finished cells pruned (None when it
    is, as far as their stored dense test numbers tell: every group's correct rows and mean loss).

    A grid's dense models are cached in its ``dense/`` folder, which is not kept with committed results; a
    rerun that finds it missing trains the seed's dense model again, and training is not bit-reproducible
    across CPUs, XLA versions or device counts. New cells on the new model beside finished cells on the old
    one would break the one-dense-model-per-seed pairing every comparison of the grid rests on."""
    counts = prep.dense_evals.get("test")
    if counts is None:
        return None
    counts = counts[0] if isinstance(counts, tuple) else counts
    names = list(prep.dataset.group_names)
    n = np.asarray(counts.n, np.float64)
    correct = np.asarray(counts.correct, np.float64)
    loss = np.asarray(counts.loss_sum, np.float64) / np.maximum(n, 1.0)
    for s_, m, s in done:
        if s_ != seed:
            continue
        try:
            groups = json.loads((cell_dir(cc, m, s, seed) / "results.json").read_text())["dense"]["test"]["groups"]
        except (OSError, ValueError, KeyError, TypeError):
            continue                        # (check_finished_cells has refused what cannot be read)
        for i, g in enumerate(names):
            old = groups.get(g) or {}
            if old.get("accuracy") is None or old.get("n") is None or n[i] <= 0:
                continue
            k_old, k_new = int(round(float(old["accuracy"]) * float(old["n"]))), int(round(correct[i]))
            loss_old = old.get("mean_loss")
            if k_old != k_new or (loss_old is not None and not np.isclose(float(loss_old), loss[i], rtol=1e-4)):
                return (f"seed {seed}'s dense model, trained again now, is not the one its finished cells pruned "
                        f"(cell {cell_dir(cc, m, s, seed).name}, group {g}: {k_old} correct test rows, mean loss "
                        f"{float(loss_old or 0):.5f}; now {k_new}, {loss[i]:.5f})")
    return None


def run_compare(cc: CompareConfig, progress: bool = True) -> dict:
    """Run every missing cell, then write the combined CSV, JSON, Markdown and plots.

    Finished cells (their ``results.json`` exists) are reused only when they were computed with the settings
    the grid now asks for and, where recorded, on the same data (:func:`stale_cell`); otherwise the run stops
    before training and says which cells differ and how."""
    from fairprune_jax.methods import get_method
    from fairprune_jax.training import distributed
    from fairprune_jax.data import load_dataset
    from fairprune_jax.running.runner import dense_cached, prepare, prepare_seeds, run_method, save_dense

    primary = distributed.is_primary()
    cells = [(seed, m, s) for seed in cc.seeds for s in cc.sparsities for m in cc.methods]
    todo = [c for c in cells if not (cell_dir(cc, c[1], c[2], c[0]) / "results.json").exists()]
    finished = [c for c in cells if c not in todo]
    own = cc.out / "results.json"
    if own.is_file() and not (cc.out / "cells").is_dir():
        try:
            single = "rows" not in json.loads(own.read_text())
        except (OSError, ValueError, TypeError):
            single = True
        if single:
            raise ValueError(f"{cc.out} holds the results of a single run (fairprune run --out), not of a "
                             "comparison: the grid would replace them; run it into another --out")
    blocked = [str(cell_dir(cc, m, s, seed)) for seed, m, s in todo
               if cell_dir(cc, m, s, seed).exists() and not cell_dir(cc, m, s, seed).is_dir()]
    if blocked:             # found before any training, not after the cell has been computed
        raise ValueError(f"{len(blocked)} cell folder(s) of the grid are files: {', '.join(blocked[:3])}; move them, "
                         "or run the grid into another --out")
    # the data, loaded once for every seed: finished cells and cached dense models are reused only for it
    c0 = cell_config(cc, cc.methods[0], cc.sparsities[0], cc.seeds[0])
    dataset = load_dataset(c0.dataset, c0.data_dir, **c0.dataset_options)     # the same for every seed
    data = dataset.fingerprint()
    if cc.run.get("save_compact"):          # reused cells are not compacted after the fact: their masks are not kept
        from fairprune_jax.running.runner import COMPACT_DIR
        bare = [cell_dir(cc, m, s, seed).name for seed, m, s in finished if get_method(cc.resolve(m)[0]).is_structured(
            get_method(cc.resolve(m)[0]).parse(cc.resolve(m)[1])) and not (cell_dir(cc, m, s, seed) / COMPACT_DIR).is_dir()]
        if bare:
            warn(f"save_compact = true, but {len(bare)} finished structured cell(s) ran without it and are reused "
                 f"without a compacted model ({', '.join(bare[:3])}{' ...' if len(bare) > 3 else ''}); delete them "
                 f"from {cc.out / 'cells'} to run them again with one")
    check_finished_cells(cc, finished, data)
    # Over several processes: all follow process 0's view of which cells are done (they share the folder),
    # and nobody writes before every process has looked.
    done = distributed.agree(len(cells) - len(todo))
    if done != len(cells) - len(todo):
        import jax
        raise ValueError(f"process {jax.process_index()} sees {len(cells) - len(todo)} finished cells "
                         f"in {cc.out}, process 0 sees {done}: every process must see the same output folder "
                         "(a filesystem they all share)")
    if primary:
        cc.out.mkdir(parents=True, exist_ok=True)
    # one comparison at a time in a folder: a second one is refused, naming the first (as fairprune run is)
    with owning_folder(cc.out):
        distributed.barrier("compare-start")
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"compare {cc.name}", unit="cell",
                   disable=not progress, dynamic_ncols=True)
        t0 = time.perf_counter()

        def dense_config(seed: int) -> RunConfig:
            """The seed's dense run: any cell's settings do (they differ only in what the dense run does not use)."""
            return cell_config(cc, cc.methods[0], cc.sparsities[0], seed)

        todo_seeds = [seed for seed in cc.seeds if any(c[0] == seed for c in todo)]
        prepared = {}
        # a seed whose dense model was saved by an earlier run of this grid (same dense config) is not retrained
        untrained = [s for s in todo_seeds if not dense_cached(dense_dir(cc, s), dense_config(s), data)]
        if cc.parallel_seeds and len(untrained) > 1 and distributed.current_mesh() is not None:
            warn("parallel_seeds = true does not combine with a device mesh (--devices, --distributed): "
                 "the dense models are trained one seed after another, each data-parallel")
        elif cc.parallel_seeds and len(untrained) > 1:
            # parallel_seeds = true: the dense models of every seed with unfinished cells in one vmapped run
            prepared = dict(zip(untrained, prepare_seeds([dense_config(seed) for seed in untrained], dataset)))
            for seed, prep in prepared.items():      # every process: orbax's save is collective
                save_dense(dense_dir(cc, seed), prep.config, prep.dense, prep.dense_history, data)
            for seed, prep in prepared.items():      # every seed checked before any cell runs
                why = dense_mismatch(cc, seed, prep, finished)
                if why:
                    raise ValueError(mismatch_message(cc, seed, why))
        from fairprune_jax.training import tracking

        def tracker(folder: Path):
            """TensorBoard events into ``folder/tensorboard`` with ``tensorboard = true`` (process 0), else None."""
            return tracking.TensorBoard(folder / "tensorboard") if cc.tensorboard and primary else None

        for seed in todo_seeds:
            seed_todo = [c for c in todo if c[0] == seed]
            if seed in prepared:
                prep = prepared.pop(seed)
            else:
                # a cached dense model is not retrained: its events (if any) stay as they are
                cached = dense_cached(dense_dir(cc, seed), dense_config(seed), data)
                with tracking.use(None if cached else tracker(dense_dir(cc, seed))):
                    prep = prepare(dense_config(seed), dataset, dense_cache=dense_dir(cc, seed))
            why = dense_mismatch(cc, seed, prep, finished)
            if why:     # before any cell runs on it: one dense model per seed, or the pairing is gone
                if primary:
                    collect(cc)     # the tables hold the cells this run finished for earlier seeds
                raise ValueError(mismatch_message(cc, seed, why))
            for _, m, s in seed_todo:
                d = cell_dir(cc, m, s, seed)
                base, opts = cc.resolve(m)
                method = get_method(base)
                # [run] save_compact = true: a compacted model for every cell whose masks are structured
                compact = bool(cc.run.get("save_compact")) and method.is_structured(method.parse(opts))
                # one psi bound for every method of the grid: the grid's tolerance unless [run] sets certify_eps
                cell = cell_config(cc, m, s, seed)
                # what a killed attempt at this cell left in its folder (lth's rounds, ballot's masks, TensorBoard
                # events, a compacted model) is set aside while it runs again and dropped when it finishes
                with replacing_outputs(str(d)), tracking.use(tracker(d)):
                    res = run_method(prep, method=base, sparsity=s, method_options=opts, out=str(d),
                                     save_compact=compact, certify_eps=cell.certify_eps)
                res.pop("_state", None)
                bar.update(1)
        bar.close()
        distributed.barrier("compare-end")    # every cell's results.json is written (by process 0)
    summary = collect(cc) if primary else {"rows": [], "aggregate": []}
    summary["elapsed_s"] = time.perf_counter() - t0
    return summary


def collect(cc: CompareConfig) -> dict:
    """Combine finished cells into rows, aggregates (mean, std over seeds) and output files."""
    rows, dense_rows, setting = [], {}, {}
    for seed in cc.seeds:
        for s in cc.sparsities:
            for m in cc.methods:
                p = cell_dir(cc, m, s, seed) / "results.json"
                if not p.exists():
                    continue
                r = json.loads(p.read_text())
                upgrade_certificates(r)      # a cell of an earlier version: the same headline bound as the rest
                if seed not in dense_rows:
                    dense_rows[seed] = dict(dense_row(r), small=small_marks(r, "dense"))
                    setting.setdefault("groups_are_classes", tables.groups_are_classes(r))
                    setting.setdefault("group_sizes", {g: int(v["n"] or 0)
                                                       for g, v in r["pruned"]["test"]["groups"].items()})
                row: dict[str, Any] = {"method": m, "sparsity": s, "seed": seed,
                                       "achieved_sparsity": r["sparsity"]["achieved"]}
                for col, (split, path) in METRICS.items():
                    row[col] = _get(r["pruned"].get(split, {}), path)
                row["degenerate"] = r["pruned"]["test"].get("degenerate")
                if row["degenerate"] is None:     # a cell written before the degenerate check existed
                    row["degenerate"] = constant_classifier(r)
                row["top_prediction_share"] = r["pruned"]["test"].get("top_prediction_share")
                row["no_violated_group"] = None if row["test_violated_groups"] is None else row["test_violated_groups"] == 0
                cert = r["pruned"]["test"].get("certificate") or {}
                row["small_groups"] = cert.get("small_groups", [])
                # what the cell's certificate states: its bound eps and confidence level (a grid may mix them)
                row["certify_eps"], row["certify_level"] = cert.get("eps"), cert.get("level")
                row["small"] = small_marks(r)
                row["small_limit"] = int((r.get("config") or {}).get("small_group", RunConfig.small_group))
                row["dense_test_accuracy"] = r["dense"]["test"]["accuracy"]
                row["accuracy_drop"] = (None if row["test_accuracy"] is None
                                        else row["dense_test_accuracy"] - row["test_accuracy"])
                if cc.tolerance is not None:
                    for split in ("train", "test"):
                        v = row[f"{split}_max_psi"]
                        row[f"{split}_psi_within_tol"] = None if v is None else bool(v <= cc.tolerance)
                row["group_acc_change"] = {
                    g: (None if v["accuracy"] is None or r["dense"]["test"]["groups"][g]["accuracy"] is None
                        else v["accuracy"] - r["dense"]["test"]["groups"][g]["accuracy"])
                    for g, v in r["pruned"]["test"]["groups"].items()}
                row["wall_time_s"] = r.get("wall_time_s")
                row["constraint"] = constraint_summary(r)
                rows.append(row)
    agg = aggregate(rows, cc)
    dense = aggregate_dense(list(dense_rows.values()))
    setting["small_limits"] = sorted({r["small_limit"] for r in rows})
    write_outputs(cc, rows, agg, dense=dense, setting=setting)
    return {"rows": rows, "aggregate": agg, "dense": dense, "setting": setting}


# ---------------------------------------------------------------- suites (headline tables)

HEADLINE_COLUMNS = ["test_accuracy", "accuracy_drop", "test_max_psi", "test_group_acc_gap", "test_dp_diff",
                    "test_eo_diff", "test_mcd"]


@dataclasses.dataclass
class Suite:
    name: str
    configs: list[CompareConfig]
    out: Path
    columns: list[str]
    columns_asked: bool = False      # the suite lists its columns: shown even where they mean nothing


def is_suite(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and "suite" in read_toml(path)


def load_suite(path: str | Path, out: str | None = None) -> Suite:
    """A suite TOML: ``suite = [comparison TOMLs]`` (relative to it), optional ``name``, ``out``, ``columns``."""
    path = Path(path)
    raw = read_toml(path)
    unknown = set(raw) - SUITE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)} in a suite; valid keys: "
                         f"{', '.join(sorted(SUITE_KEYS))} (a suite lists comparison TOMLs, each with its own grid)")
    files = raw["suite"]
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{path}: suite must be a non-empty list of comparison TOML paths")
    configs = [load_config(path.parent / f) for f in files]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: two comparisons share a name (their results would collide): {names}")
    outs = [c.out.resolve() for c in configs]
    if len(set(outs)) != len(outs):
        same = sorted({str(o) for o in outs if outs.count(o) > 1})
        raise ValueError(f"{path}: two comparisons write into one output folder ({', '.join(same)}): each "
                         "would overwrite the other's tables; give each its own out")
    columns = list(raw.get("columns", HEADLINE_COLUMNS))
    valid = list(METRICS) + DERIVED_COLUMNS
    bad = set(columns) - set(valid)
    if bad:
        raise ValueError(f"{path}: unknown column(s) {sorted(bad)}; valid: {', '.join(valid)}")
    name = raw.get("name", path.stem)
    out_dir = Path(out) if out else (path.parent / raw["out"] if "out" in raw else path.parent / "results" / name)
    return Suite(name=name, configs=configs, out=out_dir, columns=columns, columns_asked="columns" in raw)


def run_suite(suite: Suite, progress: bool = True) -> dict:
    """Run (or resume) every comparison of the suite, then write the combined headline table."""
    from fairprune_jax.training import distributed
    mesh = distributed.current_mesh()
    for cc in suite.configs:        # every comparison's batch against the devices, before the first one trains
        bs = cell_config(cc, cc.methods[0], cc.sparsities[0], cc.seeds[0]).batch_size
        try:
            distributed.check_batch_size(bs, mesh, what=f"batch_size = {bs} of comparison {cc.name!r} ([run] in its "
                                                        "TOML):")
        except ValueError as e:
            raise ValueError(f"suite {suite.out}: {e}; nothing was trained") from None
    for cc in suite.configs:
        run_compare(cc, progress=progress)
    return write_headline(suite) if distributed.is_primary() else {"rows": [], "markdown": ""}


def headline_rows(suite: Suite, per_comparison: dict | None = None) -> list[dict]:
    """One row per (comparison, method, sparsity); ``per_comparison`` (if given) receives each comparison's
    dense row and setting, keyed by its name."""
    rows = []
    for cc in suite.configs:
        res = collect(cc)
        if per_comparison is not None:
            eps, levels = certificate_settings(res.get("rows") or [])
            per_comparison[cc.name] = {"dense": res.get("dense"), "setting": res.get("setting") or {},
                                       "certificate": (eps, levels),
                                       "mixed_certificates": mixed_certificate_note(res.get("rows") or [])}
        for a in res["aggregate"]:
            rows.append({"comparison": cc.name, "dataset": _dataset_label(cc), **a})
    return rows


def _dataset_label(cc: CompareConfig) -> str:
    opts = cc.dataset_options
    parts = [cc.dataset]
    if "target" in opts:
        parts.append(f"target {opts['target']}")
    if "protected" in opts:
        parts.append(f"protected {opts['protected']}")
    return ", ".join(parts)


def headline_markdown(suite: Suite, rows: list[dict]) -> str:
    cols = suite.columns
    lines = ["| dataset | method | sparsity | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (4 + len(cols))]
    for r in rows:
        cells = [format_cell(c, r) for c in cols]
        lines.append(f"| {r['dataset']} | {method_label(r)} | {r['sparsity']:g} | {r['n_seeds']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_sections(suite: Suite, rows: list[dict], per: dict, latex: bool = False) -> list[str]:
    """One readable table per comparison (dense row, pruning kind, best in bold, columns for the setting)."""
    out = []
    for cc in suite.configs:
        agg = [r for r in rows if r["comparison"] == cc.name]
        if not agg:
            continue
        info = per.get(cc.name) or {}
        dense = dict(info["dense"], dataset=_dataset_label(cc)) if info.get("dense") else None
        cols, notes = tables.choose_columns(suite.columns, agg, classes_as_groups=bool(
            (info.get("setting") or {}).get("groups_are_classes")), asked=suite.columns_asked)
        structured = structured_methods(cc)
        if len(set(structured.values())) > 1:
            notes.append("Structured (whole units removed) and unstructured sparsity are not comparable at the "
                         "same number.")
        legend = small_legend(agg + [dense or {}], cols, set((info.get("setting") or {}).get("small_limits") or ()))
        if legend:
            notes.append(legend)
        eps, levels = info.get("certificate") or ([], [])
        if levels:
            notes.append(info.get("mixed_certificates") or (
                f"Test certificates: ψ_g ≤ ε = {' / '.join(f'{e:g}' for e in eps)}, simultaneous intervals and "
                f"certified max ψ_g at {' / '.join(certify.level_text(x) for x in levels)} confidence."))
        body = tables.render(agg, cols, dense=dense, structured=structured, flags=set(FLAG_COLUMNS), latex=latex,
                             lead=("dataset", "method", "sparsity"))
        if latex:
            out.append(tables.latex_document(f"{suite.name}: {cc.name}", body, notes))
        else:
            out += [f"#### {_dataset_label(cc)} (`{cc.name}`)", "", body, "", *[f"- {n}" for n in notes], ""]
    return out


def write_headline(suite: Suite) -> dict:
    per: dict = {}
    rows = headline_rows(suite, per)
    suite.out.mkdir(parents=True, exist_ok=True)
    (suite.out / "headline.json").write_text(json.dumps(json_safe({"name": suite.name, "rows": rows}), indent=2,
                                                                allow_nan=False))
    with open(suite.out / "headline.csv", "w", newline="") as f:
        fields = ["comparison", "dataset", "method", "sparsity", "n_seeds"]
        w = csv.writer(f)
        w.writerow(fields + [f"{c}_{k}" for c in suite.columns for k in ("mean", "std")])
        for r in rows:
            w.writerow([r[k] for k in fields] + [(r.get(c) or {}).get(k) for c in suite.columns
                                                for k in ("mean", "std")])
    md = "\n".join(headline_sections(suite, rows, per))
    used = [c for c in suite.columns]
    (suite.out / "headline.md").write_text(
        f"# {suite.name}\n\nMean ± std over seeds; one row per (dataset, method, sparsity), one table per "
        "dataset with its dense model first; bold = best pruned value per column within the table (degenerate "
        "rows excluded). Accuracy drop = dense test accuracy - pruned test accuracy (same seed).\n\n"
        f"{md}\nColumn names in `headline.csv` (each with `_mean` / `_std`): "
        + ", ".join(f"{tables.label(c)} = `{c}`" for c in used) + ".\n")
    (suite.out / "headline.tex").write_text("\n".join(headline_sections(suite, rows, per, latex=True)))
    return {"rows": rows, "markdown": md}
