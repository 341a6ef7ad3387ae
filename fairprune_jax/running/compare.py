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
"""
from __future__ import annotations

import csv
import os
import dataclasses
import json
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from fairprune_jax.core.notices import tqdm, warn
from fairprune_jax.reporting import figures, tables
from fairprune_jax.methods.base import RunConfig

TOP_KEYS = {"name", "dataset", "data_dir", "methods", "sparsities", "seeds", "out", "tolerance", "run",
            "dataset_options", "model_options", "method_options", "variants", "fairness_metric",
            "parallel_seeds", "columns", "sparsity_axis", "tensorboard", "chosen_on"}
#: Where a grid's tuned setting was chosen (``[chosen_on]``: setting -> one of these, then optional words).
CHOSEN_ON = ("train", "val", "rule", "default", "test")


def chosen_on_kind(value: Any) -> str | None:
    """The first word of a ``[chosen_on]`` value (``"val: lowest ..."`` -> ``"val"``), None if not a string."""
    if not isinstance(value, str):
        return None
    words = value.split(":")[0].split()
    return words[0] if words else None
SUITE_KEYS = {"name", "suite", "out", "columns"}
RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)} - {"method", "dataset", "data_dir", "sparsity", "seed",
                                                               "out", "dataset_options", "model_options",
                                                               "method_options"}

# column -> (split, path into a fairness report)
METRICS: dict[str, tuple[str, tuple]] = {
    "test_accuracy": ("test", ("accuracy",)),
    "train_accuracy": ("train", ("accuracy",)),
    "test_max_psi": ("test", ("excess_accuracy_gap", "max")),
    "train_max_psi": ("train", ("excess_accuracy_gap", "max")),
    "test_psi_spread": ("test", ("excess_accuracy_gap", "spread")),
    "train_psi_spread": ("train", ("excess_accuracy_gap", "spread")),
    "test_group_acc_gap": ("test", ("accuracy_parity_gap", "between_groups")),
    "test_cwv": ("test", ("class_wise_variance",)),
    "test_mcd": ("test", ("max_class_discrepancy",)),
    "test_dp_diff": ("test", ("demographic_parity_difference", "between_groups")),
    "test_eo_diff": ("test", ("equalized_odds_difference", "between_groups", "worst_case")),
    # the per-group certificate on test (certify.py)
    "test_certified_share": ("test", ("certificate", "certified_share")),
    "test_violated_groups": ("test", ("certificate", "violated")),
    # certified max psi_g: the largest upper end of the psi_g intervals (certificates of interval version >= 2
    # only: version 1 under-covered, and its cells show no value until rerun), and the floor the split allows
    "test_psi_upper": ("test", ("certificate", "certified_max_psi")),
    "test_psi_floor": ("test", ("certificate", "floor_max_psi")),
    "test_flip_rate": ("test", ("certificate", "flip_rate")),
    # the same on the validation split (when the grid holds one out): what settings are chosen on
    "val_accuracy": ("val", ("accuracy",)),
    "val_psi_upper": ("val", ("certificate", "certified_max_psi")),
}
#: per-row flags shown as "k/n seeds" in the tables
FLAG_COLUMNS = ["degenerate", "no_violated_group"]
DERIVED_COLUMNS = ["dense_test_accuracy", "accuracy_drop"]   # per row, next to METRICS


@dataclasses.dataclass
class CompareConfig:
    name: str
    dataset: str
    methods: list[str]
    sparsities: list[float]
    seeds: list[int]
    out: Path
    data_dir: str | None = None
    tolerance: float | None = None   # eps for "max psi_g <= eps holds" columns
    fairness_metric: str = "train_max_psi"   # the metric plotted against sparsity
    run: dict = dataclasses.field(default_factory=dict)
    dataset_options: dict = dataclasses.field(default_factory=dict)
    model_options: dict = dataclasses.field(default_factory=dict)
    method_options: dict = dataclasses.field(default_factory=dict)
    variants: dict = dataclasses.field(default_factory=dict)   # name -> {"method": ..., **options}
    parallel_seeds: bool = False     # train the dense models of all unfinished seeds in one vmapped run
    columns: list[str] | None = None  # results.md / results.tex columns (None: chosen for the setting)
    sparsity_axis: str = "auto"       # metrics_vs_sparsity x axis: linear, log (1 - sparsity) or auto
    tensorboard: bool = False         # TensorBoard events per cell (cells/X/tensorboard) and per dense model
    chosen_on: dict = dataclasses.field(default_factory=dict)   # setting -> which split (or rule) chose it

    def resolve(self, name: str) -> tuple[str, dict]:
        """The registered method and its options for a grid entry (a method or a variant name)."""
        return resolve_entry(name, self.variants, self.method_options)


def resolve_entry(name: str, variants: dict, method_options: dict) -> tuple[str, dict]:
    """``(method, options)`` of a grid entry: a variant's own options override ``[method_options.<method>]``."""
    if name in variants:
        v = dict(variants[name])
        base = v.pop("method")
        return base, {**method_options.get(base, {}), **v}
    return name, dict(method_options.get(name, {}))


def _check_variants(path: Path, variants: Any) -> dict:
    from fairprune_jax.methods import METHODS
    if not isinstance(variants, dict):
        raise ValueError(f"{path}: [variants] must be a table of tables, e.g. [variants.bifp_lr03] "
                         'method = "bifp", mask_lr = 0.3')
    out = {}
    for name, v in variants.items():
        if not isinstance(v, dict) or "method" not in v:
            raise ValueError(f"{path}: [variants.{name}] needs method = \"<registered method>\" "
                             "plus the options it overrides")
        if name in METHODS:
            raise ValueError(f"{path}: variant name {name!r} is a method name; pick another name")
        out[name] = dict(v)
    return out


def read_toml(path: Path) -> dict:
    """A TOML file's table, or a ``ValueError`` naming the file and the line that does not parse."""
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None


#: Top-level keys whose value is text.
TEXT_KEYS = ("name", "dataset", "data_dir", "out", "fairness_metric", "sparsity_axis")


def load_config(path: str | Path, out: str | None = None) -> CompareConfig:
    """Read and check a comparison TOML; unknown keys are errors naming the valid ones, and every error names
    the file."""
    path = Path(path)
    try:
        return _load_config(path, out)
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {e}") from None


def _load_config(path: Path, out: str | None = None) -> CompareConfig:
    if not path.is_file():
        raise FileNotFoundError(f"comparison config {path} not found (expected a TOML file, "
                                "see experiments/*.toml)")
    raw = read_toml(path)
    wrong = [k for k in TEXT_KEYS if k in raw and not isinstance(raw[k], str)]
    if wrong:
        raise ValueError(f"{path}: {wrong[0]} must be text (in quotes); got {raw[wrong[0]]!r}")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; valid keys: {', '.join(sorted(TOP_KEYS))}")
    bad_run = set(raw.get("run", {})) - RUN_KEYS
    if bad_run:
        raise ValueError(f"{path}: unknown [run] key(s) {sorted(bad_run)}; valid: {', '.join(sorted(RUN_KEYS))}")
    for key in ("dataset", "methods", "sparsities", "seeds"):
        if key not in raw:
            raise ValueError(f"{path}: missing required key {key!r}")
    check_grid_lists(path, raw)
    from fairprune_jax.methods import get_method
    from fairprune_jax.sparsity.masks import check_sparsity
    from fairprune_jax.running.runner import check_model_options
    check_run_values(path, raw.get("run", {}))
    try:
        check_model_options(raw.get("run", {}).get("model"), raw.get("model_options", {}))
    except ValueError as e:
        raise ValueError(f"{path}: [model_options]: {e}") from None
    variants = _check_variants(path, raw.get("variants", {}))
    if len(set(raw["methods"])) != len(raw["methods"]):
        raise ValueError(f"{path}: methods lists an entry twice: {raw['methods']}")
    bases = set()
    for m in raw["methods"]:
        base, opts = resolve_entry(m, variants, raw.get("method_options", {}))
        get_method(base).parse(opts)
        bases.add(base)
    unused = set(variants) - set(raw["methods"])
    if unused:
        raise ValueError(f"{path}: [variants] not in the methods list: {sorted(unused)}")
    for s in raw["sparsities"]:
        check_sparsity(s)
    if not isinstance(raw.get("parallel_seeds", False), bool):
        raise ValueError(f"{path}: parallel_seeds must be true or false; got {raw['parallel_seeds']!r}")
    bad_mo = set(raw.get("method_options", {})) - bases
    if bad_mo:
        raise ValueError(f"{path}: [method_options] for methods not in the grid: {sorted(bad_mo)}")
    fairness_metric = raw.get("fairness_metric", "train_max_psi")
    if fairness_metric not in METRICS:
        raise ValueError(f"{path}: unknown fairness_metric {fairness_metric!r}; valid: {', '.join(METRICS)}")
    columns = raw.get("columns")
    valid_cols = list(METRICS) + DERIVED_COLUMNS + FLAG_COLUMNS + ["train_psi_within_tol", "test_psi_within_tol"]
    if columns is not None and (not isinstance(columns, list) or set(columns) - set(valid_cols)):
        raise ValueError(f"{path}: columns must be a list of column names; unknown: "
                         f"{sorted(set(columns or []) - set(valid_cols)) if isinstance(columns, list) else columns!r}"
                         f"; valid: {', '.join(valid_cols)}")
    if not isinstance(raw.get("tensorboard", False), bool):
        raise ValueError(f"{path}: tensorboard must be true or false; got {raw['tensorboard']!r}")
    if raw.get("sparsity_axis", "auto") not in ("auto", "linear", "log"):
        raise ValueError(f"{path}: sparsity_axis must be \"linear\", \"log\" (log of 1 - sparsity) or \"auto\"; "
                         f"got {raw['sparsity_axis']!r}")
    # every cell's run settings get the checks a `fairprune run` gets (finite numbers, ranges, seeds), here,
    # before any dense model trains
    from fairprune_jax.running.runner import validate_config
    run_vals = {k: v for k, v in raw.get("run", {}).items() if k != "save_compact"}
    for m in raw["methods"]:
        base, opts = resolve_entry(m, variants, raw.get("method_options", {}))
        for s in raw["sparsities"]:
            for seed in raw["seeds"]:
                try:
                    validate_config(RunConfig(method=base, dataset=raw["dataset"], sparsity=float(s), seed=int(seed),
                                              method_options=dict(opts), **run_vals))
                except ValueError as e:
                    raise ValueError(f"{path}: entry {m!r}, sparsity {s}, seed {seed}: {e}") from None
    chosen_on = raw.get("chosen_on", {})
    if not isinstance(chosen_on, dict) or not all(chosen_on_kind(v) in CHOSEN_ON for v in chosen_on.values()):
        raise ValueError(f"{path}: [chosen_on] maps a setting to where it was chosen, one of "
                         f"{', '.join(CHOSEN_ON)} (then any words), e.g. \"ceag.eps\" = \"rule: E / 2\"; "
                         f"got {chosen_on!r}")
    name = raw.get("name", path.stem)
    base = path.parent
    data_dir = raw.get("data_dir")
    if data_dir is not None and not Path(data_dir).is_absolute() and (base / data_dir).exists():
        # relative to the config file; kept relative (to the working directory) so results name no host paths
        data_dir = os.path.relpath((base / data_dir).resolve(), Path.cwd())
    out_dir = Path(out) if out else Path(raw.get("out", base / "results" / name))
    if not out_dir.is_absolute() and not out and "out" in raw:
        out_dir = base / out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{path}: the output folder {out_dir} is an existing file; choose another --out")
    return CompareConfig(name=name, dataset=raw["dataset"], methods=list(raw["methods"]),
                         sparsities=[float(s) for s in raw["sparsities"]], seeds=[int(s) for s in raw["seeds"]],
                         out=out_dir, data_dir=data_dir, tolerance=raw.get("tolerance"), run=raw.get("run", {}),
                         fairness_metric=fairness_metric,
                         dataset_options=raw.get("dataset_options", {}),
                         model_options=raw.get("model_options", {}),
                         method_options=raw.get("method_options", {}), variants=variants,
                         parallel_seeds=raw.get("parallel_seeds", False), columns=columns,
                         sparsity_axis=raw.get("sparsity_axis", "auto"), tensorboard=raw.get("tensorboard", False),
                         chosen_on=dict(chosen_on))


#: The grid's axes: (TOML key, element type, example line).
GRID_LISTS = (("methods", str, 'methods = ["nft", "ceag"]'), ("sparsities", (int, float), "sparsities = [0.8, 0.9]"),
              ("seeds", int, "seeds = [0, 1, 2]"))


def check_grid_lists(path: Path, raw: dict) -> None:
    """``methods``, ``sparsities`` and ``seeds`` are non-empty lists of the right type without repeats: an empty
    list would rewrite the results as empty, a repeat would count one cell twice as two seeds."""
    for key, kind, example in GRID_LISTS:
        v = raw[key]
        if not isinstance(v, list):
            raise ValueError(f"{path}: {key} must be a list, like {example}; got {v!r}")
        if not v:
            raise ValueError(f"{path}: {key} is empty; list at least one, like {example}")
        wrong = [x for x in v if not isinstance(x, kind) or isinstance(x, bool)]
        if wrong:
            raise ValueError(f"{path}: {key} holds {wrong[0]!r} ({type(wrong[0]).__name__}); like {example}")
        seen = [float(x) if key == "sparsities" else x for x in v]
        twice = sorted({x for x in seen if seen.count(x) > 1}, key=str)
        if twice:
            raise ValueError(f"{path}: {key} lists {', '.join(map(repr, twice))} more than once; list each once")


def check_run_values(path: Path, run: dict) -> None:
    """``[run]`` values of the type ``RunConfig`` expects (a string where a number belongs is named, not a later
    crash), from the field annotations: ``int``, ``float`` (an int is fine), ``bool``, ``str``, ``| None``."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for key, value in run.items():
        kind = str(fields[key].type)
        if value is None and "None" in kind:
            continue
        if "bool" in kind:
            ok, want = isinstance(value, bool), "true or false"
        elif "int" in kind and "float" not in kind:
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif "float" in kind:
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif "str" in kind:
            ok, want = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ValueError(f"{path}: [run] {key} must be {want} (like {getattr(RunConfig(), key)!r}); "
                             f"got {value!r}")


def cell_dir(cc: CompareConfig, method: str, sparsity: float, seed: int) -> Path:
    return cc.out / "cells" / f"{method}_s{sparsity:g}_seed{seed}"


def dense_dir(cc: CompareConfig, seed: int) -> Path:
    """Where a grid keeps the trained dense model of a seed (not committed: large, and rebuilt by a rerun)."""
    return cc.out / "dense" / f"seed{seed}"


def cell_config(cc: CompareConfig, method: str, sparsity: float, seed: int) -> RunConfig:
    """The exact settings a grid cell runs with (what its results.json records as ``config``)."""
    run = {k: v for k, v in cc.run.items() if k != "save_compact"}
    base, opts = cc.resolve(method)
    cert = {"certify_eps": cc.tolerance} if cc.tolerance is not None and "certify_eps" not in run else {}
    return RunConfig(dataset=cc.dataset, data_dir=cc.data_dir, seed=seed, sparsity=sparsity, method=base,
                     dataset_options=dict(cc.dataset_options), model_options=dict(cc.model_options), progress=False,
                     method_options=dict(opts), out=str(cell_dir(cc, method, sparsity, seed)), **{**run, **cert})


#: Settings a finished cell may differ in and still be reused: where files go and how the run is shown.
REUSE_IGNORES = ("out", "progress", "save_compact", "eval_batch_size")


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
    # the data's place: the content decides where it was recorded; else the same file or folder (paths are
    # written relative to where the grid ran, so they are compared resolved, and only where both exist)
    if not (data is not None and cell.get("data_fingerprint") is not None) and "data_dir" in old:
        a, b = old["data_dir"], now.get("data_dir")
        if a != b and (a is None or b is None or (Path(a).exists() and Path(b).exists()
                                                  and Path(a).resolve() != Path(b).resolve())):
            diffs.append(f"data_dir: cell {a!r} vs TOML {b!r}")
    diffs += _stale_options(now["method"], now["method_options"], old.get("method_options") or {},
                            (cell.get("method_info") or {}).get("options") or {})
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


def check_finished_cells(cc: CompareConfig, done: list[tuple[int, str, float]], data: dict | None) -> None:
    """Refuse, before any training, to reuse finished cells that were computed with other settings or data."""
    stale = []
    for seed, m, s in done:
        p = cell_dir(cc, m, s, seed) / "results.json"
        try:
            why = stale_cell(cc, m, s, seed, json.loads(p.read_text()), data)
        except (OSError, ValueError) as e:
            why = f"{p} cannot be read ({e})"
        if why:
            stale.append(f"{p.parent.name} ({why})")
    if stale:
        raise ValueError(
            f"{cc.out}: {len(stale)} finished cell(s) were computed with other settings or data than the grid "
            f"asks for now, so their results would be reported as this grid's: {'; '.join(stale[:3])}"
            f"{' ...' if len(stale) > 3 else ''}. Run the grid into another --out, or delete "
            f"{cc.out / 'cells'} (or just those cells) to recompute them")


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
    # the data, loaded once for every seed: finished cells and cached dense models are reused only for it
    c0 = cell_config(cc, cc.methods[0], cc.sparsities[0], cc.seeds[0])
    dataset = load_dataset(c0.dataset, c0.data_dir, **c0.dataset_options)     # the same for every seed
    data = dataset.fingerprint()
    check_finished_cells(cc, finished, data)
    # Over several processes: all follow process 0's view of which cells are done (they share the folder),
    # and nobody writes before every process has looked.
    done = distributed.agree(len(cells) - len(todo))
    if done != len(cells) - len(todo):
        import jax
        raise ValueError(f"process {jax.process_index()} sees {len(cells) - len(todo)} finished cells "
                         f"in {cc.out}, process 0 sees {done}: every process must see the same output folder "
                         "(a filesystem they all share)")
    distributed.barrier("compare-start")
    if primary:
        cc.out.mkdir(parents=True, exist_ok=True)
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
        for _, m, s in seed_todo:
            d = cell_dir(cc, m, s, seed)
            base, opts = cc.resolve(m)
            method = get_method(base)
            # [run] save_compact = true: a compacted model for every cell whose masks are structured
            compact = bool(cc.run.get("save_compact")) and method.is_structured(method.parse(opts))
            # one psi bound for every method of the grid: the grid's tolerance unless [run] sets certify_eps
            cell = cell_config(cc, m, s, seed)
            with tracking.use(tracker(d)):
                res = run_method(prep, method=base, sparsity=s, method_options=opts, out=str(d),
                                 save_compact=compact, certify_eps=cell.certify_eps)
            res.pop("_state", None)
            bar.update(1)
    bar.close()
    distributed.barrier("compare-end")    # every cell's results.json is written (by process 0)
    summary = collect(cc) if primary else {"rows": [], "aggregate": []}
    summary["elapsed_s"] = time.perf_counter() - t0
    return summary


def _get(d: dict, path: tuple) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


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
                row["small_groups"] = (r["pruned"]["test"].get("certificate") or {}).get("small_groups", [])
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


def _small_ends(values: dict[str, float | None], rows: dict[str, int], limit: int, ends: str) -> bool:
    """Does the maximum (``ends="max"``) or either end of max - min (``"range"``) rest on small groups only?

    ``values``: group -> value (None: absent). An end is small when every group that attains it has fewer than
    ``limit`` rows: a tie with a large group means the value does not depend on the small one.
    """
    vals = {g: v for g, v in values.items() if v is not None and rows.get(g, 0) > 0}
    if not vals:
        return False
    picks = [max(vals.values())] + ([min(vals.values())] if ends == "range" else [])
    return any(all(rows[g] < limit for g, v in vals.items() if abs(v - x) <= 1e-12) for x in picks)


def small_marks(cell: dict, which: str = "pruned") -> dict[str, bool]:
    """Column -> True where the cell's value of a per-group-derived column rests on a small group: a group
    with fewer rows of the column's split than the run's ``small_group`` threshold. The attaining group of a
    maximum (max psi_g, psi_g upper bound), either end of a max - min gap (psi_g spread, group accuracy gap,
    DP and EO differences: EO's worst side, counted in positives for a TPR and negatives for an FPR), any
    group for the certified share, a violated group for the
    violated-group count. The within-tolerance columns follow their max psi_g. When the groups are the
    classes, MCD follows the group accuracy gap and CWV is starred when any class is small."""
    limit = int((cell.get("config") or {}).get("small_group", RunConfig.small_group))
    out: dict[str, bool] = {}
    for split in ("train", "test"):
        rep = (cell.get(which) or {}).get(split)
        if not rep:
            continue
        groups = rep.get("groups") or {}
        rows = {g: int(v.get("n") or 0) for g, v in groups.items()}

        def field(key: str) -> dict[str, float | None]:
            return {g: v.get(key) for g, v in groups.items()}
        psi = (rep.get("excess_accuracy_gap") or {}).get("per_group")
        if psi:
            out[f"{split}_max_psi"] = out[f"{split}_psi_within_tol"] = _small_ends(psi, rows, limit, "max")
            out[f"{split}_psi_spread"] = _small_ends(psi, rows, limit, "range")
        if split != "test":
            continue
        out["test_group_acc_gap"] = _small_ends(field("accuracy"), rows, limit, "range")
        if tables.groups_are_classes(cell):       # MCD is the group accuracy gap; CWV spreads over every class
            out["test_mcd"] = out["test_group_acc_gap"]
            out["test_cwv"] = any(0 < n < limit for n in rows.values())
        out["test_dp_diff"] = _small_ends(field("selection_rate"), rows, limit, "range")
        eo = rep.get("equalized_odds_difference", {}).get("between_groups", {})
        tpr = {g: v for g, v in field("tpr").items() if v is not None and rows[g] > 0}
        fpr = {g: v for g, v in field("fpr").items() if v is not None and rows[g] > 0}
        if tpr and fpr and eo.get("worst_case") is not None:
            tpr_gap, fpr_gap = max(tpr.values()) - min(tpr.values()), max(fpr.values()) - min(fpr.values())
            # a TPR rests on the group's positives, an FPR on its negatives (recorded by certificate v2; older
            # cells: rows)
            cg = (rep.get("certificate") or {}).get("groups") or {}
            pos = {g: int(cg[g]["positives"]) if "positives" in cg.get(g, {}) else rows[g] for g in rows}
            neg = {g: int(cg[g]["negatives"]) if "negatives" in cg.get(g, {}) else rows[g] for g in rows}
            sides = [_small_ends(tpr, pos, limit, "range") if abs(tpr_gap - eo["worst_case"]) <= 1e-12 else None,
                     _small_ends(fpr, neg, limit, "range") if abs(fpr_gap - eo["worst_case"]) <= 1e-12 else None]
            sides = [x for x in sides if x is not None]
            out["test_eo_diff"] = bool(sides) and all(sides)
        cert = rep.get("certificate")
        if cert:
            limit_c = int(cert.get("small_group_rows", limit))
            tested = {g: v for g, v in cert["groups"].items() if v.get("verdict") is not None}
            out["test_certified_share"] = any(v["small"] for v in tested.values())
            out["test_violated_groups"] = out["no_violated_group"] = any(
                v["small"] for v in tested.values() if v["verdict"] == "violated")
            out["test_psi_upper"] = _small_ends({g: v["high"] for g, v in tested.items()},
                                                {g: v["n"] for g, v in tested.items()}, limit_c, "max")
    return {k: v for k, v in out.items() if v}


def small_legend(table_rows: list[dict], cols: list[str], limits: set[int] | None = None) -> str | None:
    """The note under a table saying what ``*`` means: None when no shown cell of ``table_rows`` (aggregate
    rows, the dense row) is starred. ``limits``: the runs' ``small_group`` thresholds."""
    if not any(c in (r.get("small") or {}) for r in table_rows for c in cols):
        return None
    lim = " / ".join(str(x) for x in sorted(limits or {RunConfig.small_group}))
    return (f"`*` = in at least one seed the value rests on a small group, one with fewer than {lim} rows of the "
            "column's split (the runs' `small_group`): the group attaining a maximum (max ψ_g, ψ_g upper bound), "
            "either end of a max - min gap (ψ_g spread, group accuracy gap, DP and EO differences; MCD when the "
            "groups are the classes), a violated group (violated groups), any group (certified share; CWV when the "
            "groups are the classes); figures over so few rows are mostly noise.")


def constant_classifier(cell: dict) -> bool | None:
    """For cells written before the degenerate flag existed: does the pruned model predict one class for every
    test row? Decidable from what such cells hold for a binary target (every group's positive-prediction rate
    is the same 0 or 1) and when the groups are the classes (one class entirely right, every other entirely
    wrong); None otherwise."""
    rep = cell["pruned"]["test"]
    groups = [g for g in (rep.get("groups") or {}).values() if g.get("n")]
    if not groups:
        return None
    if len(cell.get("classes") or []) == 2:
        rates = {g.get("selection_rate") for g in groups}
        return None if None in rates else bool(len(rates) == 1 and rates <= {0.0, 1.0})
    if tables.groups_are_classes(cell):
        accs = [g.get("accuracy") for g in groups]
        return None if None in accs else bool(sum(a == 1.0 for a in accs) == 1 and
                                             all(a in (0.0, 1.0) for a in accs))
    return None


def dense_row(r: dict) -> dict:
    """The dense model's value of every metric column of a cell (psi and certificate columns: None)."""
    row = {col: _get(r["dense"].get(split, {}), path) for col, (split, path) in METRICS.items()}
    row["dense_test_accuracy"] = r["dense"]["test"]["accuracy"]
    return row


def aggregate_dense(rows: list[dict]) -> dict | None:
    """Mean and std over seeds of the dense models (one row per seed), shaped like an aggregate row."""
    if not rows:
        return None
    out: dict[str, Any] = {"method": "dense", "sparsity": 0.0, "n_seeds": len(rows),
                           "small": {c: True for r in rows for c in (r.get("small") or {})}}
    for c in list(METRICS) + ["dense_test_accuracy"]:
        vals = np.array([float(r[c]) for r in rows if r.get(c) is not None], dtype=float)
        out[c] = {"mean": float(vals.mean()) if vals.size else None,
                  "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0 if vals.size else None}
    return out


def constraint_summary(r: dict) -> dict | None:
    """A constrained run's settings and whether its constraints acted: eps, where psi_g was read, the largest
    multiplier over the run (0: the constraints never acted, the run is plain fine-tuning) and its warnings."""
    info = r.get("method_info") or {}
    if "multipliers" not in info and "trajectory" not in info:
        return None
    traj = info.get("trajectory") or {}
    vals = [abs(v) for row in traj.get("multipliers", []) for v in row if v is not None]
    vals += [abs(v) for v in np.ravel(info.get("multipliers") or []) if v is not None]
    return {"eps": info.get("eps"), "constraint_data": info.get("constraint_data"),
            "max_multiplier": max(vals) if vals else None,
            "warnings": [w for w in info.get("warnings", []) if isinstance(w, str)]}


def aggregate(rows: list[dict], cc: CompareConfig) -> list[dict]:
    out = []
    cols = list(METRICS) + DERIVED_COLUMNS + FLAG_COLUMNS
    cols += ["train_psi_within_tol", "test_psi_within_tol"] if cc.tolerance is not None else []
    for s in cc.sparsities:
        for m in cc.methods:
            sel = [r for r in rows if r["method"] == m and r["sparsity"] == s]
            if not sel:
                continue
            a: dict[str, Any] = {"method": m, "sparsity": s, "n_seeds": len(sel),
                                 "small": {c: True for r in sel for c in (r.get("small") or {})}}
            for c in cols:
                vals = np.array([float(r[c]) for r in sel if r.get(c) is not None], dtype=float)
                a[c] = {"mean": float(vals.mean()) if vals.size else None,
                        "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0 if vals.size else None}
            out.append(a)
    return out


DEFAULT_COLUMNS = ["test_accuracy", "test_psi_upper", "test_psi_floor", "train_max_psi", "test_max_psi",
                   "train_psi_spread", "test_psi_spread", "test_group_acc_gap", "test_cwv", "test_mcd", "test_dp_diff",
                   "test_eo_diff", "test_certified_share", "test_flip_rate", "no_violated_group", "degenerate"]


def markdown_table(cc: CompareConfig, agg: list[dict], cols: list[str] | None = None) -> str:
    cols = cols or DEFAULT_COLUMNS
    if cc.tolerance is not None and "train_psi_within_tol" not in cols:
        cols = cols + ["train_psi_within_tol"]
    head = "| method | sparsity | seeds | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(cols))]
    for a in agg:
        cells = [format_cell(c, a) for c in cols]
        lines.append(f"| {method_label(a)} | {a['sparsity']:g} | {a['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_label(agg_row: dict) -> str:
    """The method name, marked when some seeds ended with a degenerate (near-constant) model."""
    d = (agg_row.get("degenerate") or {}).get("mean")
    if not d:
        return agg_row["method"]
    k = round(d * agg_row["n_seeds"])
    return f"{agg_row['method']} (DEGENERATE {k}/{agg_row['n_seeds']})"


def format_cell(col: str, agg_row: dict) -> str:
    """``mean ± std`` of an aggregate column (``k/n`` seeds for the within-tolerance ones, ``-`` if missing)."""
    v = agg_row.get(col) or {}
    if v.get("mean") is None:
        return "-"
    star = " *" if (agg_row.get("small") or {}).get(col) else ""
    if col.endswith("within_tol") or col in FLAG_COLUMNS:
        return f"{v['mean'] * agg_row['n_seeds']:.0f}/{agg_row['n_seeds']}{star}"
    fmt = "{:.5f}" if "cwv" in col else "{:.4f}"
    if agg_row.get("n_seeds", 2) < 2 or v.get("std") is None:     # one seed: no spread to show
        return fmt.format(v["mean"]) + star
    return fmt.format(v["mean"]) + " ± " + fmt.format(v["std"]) + star


def structured_methods(cc: CompareConfig) -> dict[str, bool]:
    """Grid entry -> whether its masks remove whole units (structured) rather than single weights."""
    from fairprune_jax.methods import get_method
    out = {}
    for m in cc.methods:
        base, opts = cc.resolve(m)
        method = get_method(base)
        out[m] = bool(method.is_structured(method.parse(opts)))
    return out


def constraint_settings(cc: CompareConfig) -> dict[str, str | None]:
    """Grid entry -> its constraint with the settings it ran with (e.g. ``psi_g <= 0.02 (train)``), or None."""
    from fairprune_jax.methods import get_method
    out = {}
    for m in cc.methods:
        base, opts = cc.resolve(m)
        parsed = dataclasses.asdict(get_method(base).parse(opts))
        out[m] = tables.constraint_label(base, {**parsed, **used_defaults(cc, m, parsed)})
    return out


def used_defaults(cc: CompareConfig, method: str, parsed: dict) -> dict:
    """Options left ``None`` (resolved from the data at run time) with the value a finished cell of ``method``
    recorded as ``<name>_used`` (or, in an older cell, ``<name>``) in ``method_info.options`` (e.g.
    fair_scratch's ``lam``); {} if no cell has it."""
    missing = [k for k, v in parsed.items() if v is None]
    if not missing:
        return {}
    for seed in cc.seeds:
        for s in cc.sparsities:
            p = cell_dir(cc, method, s, seed) / "results.json"
            if p.exists():
                used = ((json.loads(p.read_text()).get("method_info") or {}).get("options") or {})
                # a cell from before the option was data-dependent recorded the value itself under its name
                vals = {k: used.get(f"{k}_used", used.get(k)) for k in missing}
                return {k: v for k, v in vals.items() if v is not None}
    return {}


def table_columns(cc: CompareConfig, agg: list[dict], setting: dict) -> tuple[list[str], list[str]]:
    """The columns of results.md / results.tex (``columns`` of the config, else chosen for the setting)."""
    if cc.columns:
        return list(cc.columns), []
    cols = ["test_accuracy", "accuracy_drop"] + [c for c in DEFAULT_COLUMNS if c != "test_accuracy"]
    if not any((a.get("test_psi_upper") or {}).get("mean") is not None for a in agg):
        cols = [c for c in cols if c not in ("test_psi_upper", "test_psi_floor", "test_flip_rate")]
    cols = [c for c in cols if c != "degenerate"]    # shown in the method name
    if cc.tolerance is not None:
        cols.append("train_psi_within_tol")
    if not any((a.get("test_certified_share") or {}).get("mean") is not None for a in agg):
        cols = [c for c in cols if c not in ("test_certified_share", "test_psi_upper", "no_violated_group")]
    return tables.choose_columns(cols, agg, classes_as_groups=bool(setting.get("groups_are_classes")))


def constraint_lines(cc: CompareConfig, rows: list[dict], agg: list[dict]) -> list[str]:
    """Per constrained entry: its setting, in how many seeds it was met on the rows it was trained on and on
    test, and whether it acted at all (multipliers that stayed 0 make it plain fine-tuning)."""
    settings = constraint_settings(cc)
    out = []
    for m in cc.methods:
        if not settings.get(m):
            continue
        sel = [r for r in rows if r["method"] == m]
        if not sel:
            continue
        base, opts = cc.resolve(m)
        rec = next((r["constraint"] for r in sel if r.get("constraint") and r["constraint"].get("eps") is not None),
                   None)
        line = f"- `{m}`: " + (f"ψ_g ≤ ε = {rec['eps']:g}" + (f", read on {rec['constraint_data']} rows"
                                                              if rec.get("constraint_data") else "")
                               if rec else settings[m])
        eps = rec["eps"] if rec else None
        if eps is not None:
            for split in ("train", "test"):
                vals = [r[f"{split}_max_psi"] for r in sel if r.get(f"{split}_max_psi") is not None]
                if vals:
                    met = sum(v <= eps for v in vals)
                    line += f"; max ψ_g ≤ ε met on {split} in {met}/{len(vals)} cells"
        idle = [r for r in sel if r.get("constraint") and r["constraint"].get("max_multiplier") == 0]
        mults = [r["constraint"]["max_multiplier"] for r in sel if r.get("constraint")
                 and r["constraint"].get("max_multiplier") is not None]
        if mults:
            line += f"; largest multiplier over the run {min(mults):.3g}-{max(mults):.3g}"
        if idle:
            line += (f"; the multipliers stayed 0 in {len(idle)}/{len(sel)} cells (the constraint was already "
                     "satisfied wherever the dual step read it, so those cells are plain fine-tuning: identical to "
                     "`nft` from the same pruned start)")
        out.append(line + ".")
    if cc.tolerance is not None:
        out.append(f"- Grid tolerance ε = {cc.tolerance:g}: the `max ψ_g ≤ ε (train)` column and the test "
                   "certificate of every method use it.")
    return out


def identical_rows(agg: list[dict], cols: list[str]) -> list[tuple[str, str, float]]:
    """Pairs of entries whose aggregates agree on every shown column at the same sparsity."""
    out = []
    for i, a in enumerate(agg):
        for b in agg[i + 1:]:
            if a["sparsity"] == b["sparsity"] and all(
                    (a.get(c) or {}).get("mean") == (b.get(c) or {}).get("mean") for c in cols
                    if not c.startswith("train_")):
                out.append((a["method"], b["method"], a["sparsity"]))
    return out


def write_outputs(cc: CompareConfig, rows: list[dict], agg: list[dict], dense: dict | None = None,
                  setting: dict | None = None) -> None:
    setting = setting or {}
    flat = [{k: v for k, v in r.items() if k not in ("group_acc_change", "small_groups", "constraint", "small",
                                                     "small_limit")} for r in rows]
    if flat:
        with open(cc.out / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(flat[0]))
            w.writeheader()
            w.writerows(flat)
    (cc.out / "results.json").write_text(json.dumps({"name": cc.name, "dataset": cc.dataset, "rows": rows,
                                                     "aggregate": agg, "dense": dense,
                                                     "chosen_on": cc.chosen_on}, indent=2))
    structured = structured_methods(cc)
    constraint = {m: c for m, c in constraint_settings(cc).items() if c}
    for m in constraint:     # what the cells record beats today's defaults (older cells predate some options)
        rec = [r["constraint"] for r in rows if r["method"] == m and r.get("constraint")]
        if rec and rec[0].get("eps") is not None:
            where = rec[0].get("constraint_data")
            constraint[m] = f"ψ_g ≤ {rec[0]['eps']:g}" + (f" ({where})" if where else "")
    cols, dropped = table_columns(cc, agg, setting)
    table_args = dict(dense=dense, structured=structured, constraint=constraint, flags=set(FLAG_COLUMNS))
    notes = [f"Mean ± std over seeds {cc.seeds}; bold = best pruned value per column at each sparsity (degenerate rows excluded); "
             "ψ_g = excess accuracy gap of group g (Balancing Act); the dense row is the unpruned model of the "
             "same seeds."]
    if len(set(structured.values())) > 1:
        notes.append("Structured pruning removes whole neurons / channels and is not comparable with unstructured "
                     "pruning at the same sparsity.")
    notes += dropped
    legend = small_legend(agg + [dense or {}], cols, set(setting.get("small_limits") or ()))
    if legend:
        notes.append(legend)
    same = identical_rows(agg, cols)
    for a, b, sp in same:
        mult = {m: max((r["constraint"]["max_multiplier"] or 0.0 for r in rows if r["method"] == m
                        and r["sparsity"] == sp and r.get("constraint")), default=None) for m in (a, b)}
        why = "; ".join(f"`{m}`'s largest multiplier over the run was {v:.2g}, so its constraints "
                        + ("never acted" if v == 0 else "barely acted") + " and it fine-tuned like plain fine-tuning"
                        for m, v in mult.items() if v is not None and v < 0.05)
        notes.append(f"`{a}` and `{b}` agree on every test column at sparsity {sp:g}" + (f" ({why})." if why else "."))
    md = [f"# {cc.name}: {', '.join(cc.methods)} on {cc.dataset}", "",
          tables.render(agg, cols, **table_args), "", *[f"- {n}" for n in notes], ""]
    lines = constraint_lines(cc, rows, agg)
    if lines:
        md += ["## Constraints", "", *lines, ""]
    if cc.chosen_on:
        md += ["## Where the settings were chosen", "",
               *[f"- `{k}`: {v}" for k, v in cc.chosen_on.items()], ""]
        on_test = [k for k, v in cc.chosen_on.items() if chosen_on_kind(v) == "test"]
        if on_test:
            md += [f"**Chosen on the test split: {', '.join(on_test)}.** The test numbers of the rows they set are "
                   "optimistic (the test split was read to choose them, then reported on).", ""]
    small = sorted({g for r in rows for g in r.get("small_groups") or []})
    if small:
        md += [f"Small groups (fewer test rows than the runs' `small_group` threshold; their per-group figures "
               f"and certificate verdicts rest on few rows): {', '.join(small)}.", ""]
    if any(r.get("test_certified_share") is not None for r in rows):
        md += ["Certificate columns (test, simultaneous 95% intervals unless the runs set another level): "
               "certified share (`test_certified_share`) = share of groups whose psi_g interval lies below eps; "
               "certified max ψ_g (`test_psi_upper`) = the worst upper end, i.e. with 95% confidence no group lost "
               "more than this beyond the overall loss (the number to rank methods by; empty for cells whose "
               "certificate predates interval version 2, which under-covered small groups: rerun them); "
               "certifiable floor (`test_psi_floor`) = the bound a model that changes no prediction would get on "
               "the same test rows; flip rate (`test_flip_rate`) = share of test rows whose correctness changed; "
               "`test_violated_groups` = groups whose interval lies above eps; seeds w/o violated group "
               "(`no_violated_group`) = seeds with none.", ""]
    md += ["Column names in `results.csv`: " + ", ".join(f"{tables.label(c)} = `{c}`" for c in cols) + ".", "",
           "LaTeX: `results.tex`. Figures: `tradeoff.png`, `metrics_vs_sparsity.png`, "
           "`group_accuracy_change.png` (each also as PDF).", ""]
    (cc.out / "results.md").write_text("\n".join(md))
    (cc.out / "results.tex").write_text(tables.latex_document(
        cc.name, tables.render(agg, cols, latex=True, **table_args), notes))
    if rows:
        plot(cc, rows, agg, dense=dense, setting=setting)


def _metric_label(col: str) -> str:
    return tables.label(col)


def plot(cc: CompareConfig, rows: list[dict], agg: list[dict], dense: dict | None = None,
         setting: dict | None = None) -> None:
    """``tradeoff``, ``metrics_vs_sparsity`` and ``group_accuracy_change`` figures (PNG + PDF)."""
    setting = setting or {}
    structured = structured_methods(cc)
    metric = cc.fairness_metric
    title = f"{cc.name}: {cc.dataset}"
    figures.tradeoff(agg, dense, cc.out / "tradeoff.png", metric=metric, metric_label=_metric_label(metric),
                     title=title, structured=structured, eps=cc.tolerance)
    if any((a.get("test_psi_upper") or {}).get("mean") is not None for a in agg):
        figures.tradeoff(agg, None, cc.out / "tradeoff_certified.png", metric="test_psi_upper",
                         metric_label=_metric_label("test_psi_upper") + " (95% upper bound)",
                         title=f"{title}: accuracy against the certified bound", structured=structured,
                         eps=cc.tolerance)
    log_axis = (cc.sparsity_axis == "log" or (cc.sparsity_axis == "auto" and len(cc.sparsities) > 1
                                              and max(cc.sparsities) >= 0.9))
    figures.metrics_vs_sparsity(agg, dense, cc.out / "metrics_vs_sparsity.png", metric=metric,
                                metric_label=_metric_label(metric), title=title, log_axis=log_axis,
                                eps=cc.tolerance, structured=structured)
    s = max(r["sparsity"] for r in rows)   # the highest sparsity with finished cells
    groups = list(dict.fromkeys(g for r in rows for g in r["group_acc_change"]))
    changes = {m: {g: [r["group_acc_change"].get(g) for r in rows if r["method"] == m and r["sparsity"] == s]
                   for g in groups} for m in cc.methods if any(r["method"] == m and r["sparsity"] == s for r in rows)}
    figures.group_change(changes, cc.out / "group_accuracy_change.png", groups=groups,
                         title=f"{title}: per-group test accuracy change vs the dense model at sparsity {s:g}",
                         ylabel="test accuracy change (pruned - dense)", group_sizes=setting.get("group_sizes"),
                         structured=structured)


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
            per_comparison[cc.name] = {"dense": res.get("dense"), "setting": res.get("setting") or {}}
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
    (suite.out / "headline.json").write_text(json.dumps({"name": suite.name, "rows": rows}, indent=2))
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
