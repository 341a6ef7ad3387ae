"""A comparison grid as its TOML file describes it: methods (or ``[variants]`` of one method with other options)
x sparsities x seeds on one dataset, with shared ``[run]`` settings and per-method options. :func:`load_config`
reads and checks the file (unknown keys, types, every cell's run settings, ``[chosen_on]``) before anything
runs and returns a :class:`CompareConfig`; :func:`cell_config` is the exact :class:`RunConfig` of one cell
and :func:`cell_dir` / :func:`dense_dir` where it and its seed's dense model live. :data:`METRICS` names the
columns a grid can report and where each is read in a cell's ``results.json``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from fairprune_jax.core.config import RunConfig


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


#: (``progress`` is the command line's: a grid's cells never draw bars, ``fairprune compare`` draws its own)
RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)} - {"method", "dataset", "data_dir", "sparsity", "seed",
                                                               "out", "dataset_options", "model_options",
                                                               "method_options", "progress"}

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
    "val_dp_diff": ("val", ("demographic_parity_difference", "between_groups")),
    "val_eo_diff": ("val", ("equalized_odds_difference", "between_groups", "worst_case")),
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


#: A variant's name (it is part of its cells' folder names: no path separators, no "..").
VARIANT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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
        if not VARIANT_NAME.fullmatch(name):
            raise ValueError(f"{path}: variant name {name!r}: use letters, digits, _, - and . only (it names "
                             "the cells' folders)")
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
    tol = raw.get("tolerance")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol <= 1):
        raise ValueError(f"{path}: tolerance (the bound eps the certificate checks, like --certify-eps) must be a "
                         f"number in (0, 1], like tolerance = 0.02; got {tol!r}")
    from fairprune_jax.methods import get_method
    from fairprune_jax.sparsity.masks import check_sparsity
    from fairprune_jax.running.validation import check_model_options
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
    from fairprune_jax.running.validation import validate_config
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
    if "data_dir" in (raw.get("dataset_options") or {}):
        raise ValueError(f"{path}: data_dir goes at the top level of the config (data_dir = \"...\", next to "
                         "dataset), not in [dataset_options], which holds the loader's options")
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
    # Distinct values can still share a cell's folder (its name keeps 6 significant digits of the sparsity):
    # the second cell would overwrite the first and the table show one result twice.
    folders: dict[str, tuple] = {}
    for m in raw["methods"]:
        for s in raw["sparsities"]:
            for seed in raw["seeds"]:
                name = cell_name(m, float(s), seed)
                if name in folders:
                    raise ValueError(f"{path}: the cells {folders[name]} and {(m, s, seed)} would share the folder "
                                     f"cells/{name} (a cell's folder name keeps 6 significant digits of its "
                                     "sparsity); list sparsities that differ in those digits")
                folders[name] = (m, s, seed)


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


def cell_name(method: str, sparsity: float, seed: int) -> str:
    """The name of a cell's folder (``check_grid_lists`` refuses a grid in which two cells share one)."""
    return f"{method}_s{sparsity:g}_seed{seed}"


def cell_dir(cc: CompareConfig, method: str, sparsity: float, seed: int) -> Path:
    return cc.out / "cells" / cell_name(method, sparsity, seed)


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
