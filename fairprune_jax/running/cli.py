"""The ``fairprune`` command line."""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path

from fairprune_jax.core.config import (BOOL_WORDS, CERTIFY_INTERVALS, DATASET_EPOCHS, DEFAULT_DATASET, DEFAULT_EPOCHS,
                                       DISTRIBUTIONS, OPTIMIZERS, RunConfig)  # no JAX: --help stays instant

# CLI flag -> loader option name; passed to the loader only when given.
DATA_FLAGS = {"target": "target", "protected": "protected", "image_size": "image_size",
              "cache_dir": "cache_dir", "val_fraction": "val_fraction", "test_fraction": "test_fraction",
              "column_types": "column_types", "positive_label": "positive_label"}


#: `--opt k=1` stays the number 1 (an option's own type reads it as true where it is a flag), so the command
#: line takes the boolean words without the digits.
CLI_BOOL_WORDS = {k: v for k, v in BOOL_WORDS.items() if not k.isdigit()}


def _kv(pairs: list[str] | None, flag: str) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (values parsed as Python literals when possible)."""
    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise SystemExit(f"error: {flag} expects KEY=VALUE; got {item!r}")
        k, v = item.split("=", 1)
        key = k.strip().replace("-", "_")
        if v.strip().lower() in CLI_BOOL_WORDS:    # true/false, yes/no, on/off in any case: a bool, never a string
            out[key] = CLI_BOOL_WORDS[v.strip().lower()]
            continue
        try:
            out[key] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[key] = v
    return out


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help=f"dataset name (see `fairprune datasets`; {DEFAULT_DATASET}: the embedded UCI Adult copy "
                        "unless --data-dir is given)")
    p.add_argument("--data-dir", default=None, help="where the dataset lives (a folder, or the CSV file)")
    p.add_argument("--target", help="target attribute / column")
    p.add_argument("--protected", help="protected attribute(s), comma-separated for intersections")
    p.add_argument("--image-size", type=int, help="image side length for image datasets")
    p.add_argument("--cache-dir", help="where decoded images are cached")
    p.add_argument("--val-fraction", type=float, help="carve a validation split from train")
    p.add_argument("--test-fraction", type=float, help="test fraction when the data has no test split")
    p.add_argument("--column-types", help="CSV column type overrides, e.g. age:numeric,zip:categorical")
    p.add_argument("--positive-label", help="CSV: the target value that is the positive class")
    p.add_argument("--data-opt", action="append", metavar="KEY=VALUE", help="any other loader option")


def _add_process_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (one process per host or per accelerator; see README, Scale-out)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run (jax.distributed.initialize) before anything else; run the same "
                        "command in every process. Without the three flags below (or their JAX_* variables) jax "
                        "detects the cluster itself (SLURM, Cloud TPU)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address and a free port (default: $JAX_COORDINATOR_ADDRESS); implies "
                        "--distributed")
    g.add_argument("--num-processes", default=None, metavar="N",
                   help="number of processes (default: $JAX_NUM_PROCESSES); implies --distributed")
    g.add_argument("--process-id", default=None, metavar="I",
                   help="this process's index in [0, N) (default: $JAX_PROCESS_ID); implies --distributed")


def _process_settings(args: argparse.Namespace) -> dict | None:
    """The ``jax.distributed.initialize`` arguments for this command, or None for a single-process run.

    Checked before JAX starts: a wrong or half-given setting is an error here, not a hang at start-up.
    """
    import os
    from fairprune_jax.training import distributed
    flags = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(f is None for f in flags):
        stray = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if os.environ.get(v, "").strip()]
        if stray:
            raise ValueError(f"{' and '.join(stray)} set, but --distributed not given: pass --distributed to join "
                             "the multi-process run (or unset them for a single-process run)")
        return None
    return distributed.process_settings(*flags)


def _start_processes(args: argparse.Namespace, settings: dict | None) -> bool:
    """Join the multi-process run when asked; True on the process that writes and reports (process 0)."""
    if settings is None:
        return True
    from fairprune_jax.training import distributed
    distributed.initialize(**settings)
    return distributed.is_primary()


def _data_options(args: argparse.Namespace) -> dict:
    opts = {name: getattr(args, flag) for flag, name in DATA_FLAGS.items() if getattr(args, flag) is not None}
    opts.update(_kv(args.data_opt, "--data-opt"))
    return opts


class _warnings_once:
    """While active, the library's own warnings are printed once each as ``WARNING: ...`` lines the moment
    they are raised (not as a ``UserWarning`` pointing into the library), and remembered in ``shown`` so the
    summary at the end does not repeat them. Other packages' warnings print as usual."""

    def __init__(self, shown: set[str]):
        import warnings
        self.shown, self._ctx = shown, warnings.catch_warnings()

    def __enter__(self):
        import warnings
        self._ctx.__enter__()
        default = warnings.showwarning

        from fairprune_jax.core.notices import FairpruneWarning

        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            ours = issubclass(category, FairpruneWarning) or (
                issubclass(category, UserWarning) and f"fairprune_jax{Path('/')}" in str(Path(filename)))
            if ours:
                if text not in self.shown:
                    self.shown.add(text)
                    print(f"WARNING: {text}", file=sys.stderr, flush=True)
                return
            default(message, category, filename, lineno, file, line)
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


class _Defaults(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help, once: not when the help already names its default, and not
    for flags whose default is nothing (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False or \
                action.default is argparse.SUPPRESS or not text:
            return text
        return f"{text} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairprune", description="Fairness-aware neural-network pruning in JAX.")
    sub = parser.add_subparsers(dest="command")

    d = RunConfig()
    r = sub.add_parser("run", help="train dense, prune with a method, fine-tune, report per-group metrics",
                       formatter_class=_Defaults)
    r.add_argument("--method", default=d.method, help="pruning method (see `fairprune methods`)")
    _add_data_args(r)
    r.add_argument("--model", default=None, help="mlp, cnn or resnet (default: mlp for tabular, cnn for images)")
    r.add_argument("--model-opt", action="append", metavar="KEY=VALUE", help="model option, e.g. depth=20")
    r.add_argument("--sparsity", type=float, default=d.sparsity, help="fraction of prunable weights removed")
    r.add_argument("--distribution", default=d.distribution, choices=DISTRIBUTIONS,
                   help="how sparsity is spread over layers")
    r.add_argument("--exclude-first", action="store_true", help="keep the first layer dense")
    r.add_argument("--exclude-last", action="store_true", help="keep the last layer dense")
    r.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the split, the initial weights, the batches and the method's random choices")
    r.add_argument("--epochs", type=int, default=None,
                   help=f"dense training epochs (default: {DEFAULT_EPOCHS}; "
                        + ", ".join(f"{v} on {k}" for k, v in DATASET_EPOCHS.items()) + ")")
    r.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default: --epochs)")
    r.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="rows per training step (dense training and fine-tuning)")
    r.add_argument("--lr", type=float, default=d.lr, help="learning rate of dense training (cosine decay)")
    r.add_argument("--finetune-lr", type=float, default=None,
                   help="learning rate of the method's pruning and fine-tuning (default: --lr)")
    r.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="the weights' optimizer")
    r.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="weight decay (AdamW with adam; added to the gradient with sgd); 0 = none")
    r.add_argument("--positive-class", type=int, default=None,
                   help="class id treated as positive by the binary metrics (DP, EO); default 1 (for a "
                        "multi-class target: class 1 vs the rest, with a warning)")
    r.add_argument("--augment", action="store_true", help="random crop + flip for images")
    r.add_argument("--certify-eps", type=float, default=None,
                   help="psi_g bound the per-group certificate checks (default: the method's eps, else 0.01)")
    r.add_argument("--certify-level", type=float, default=d.certify_level,
                   help="family-wise confidence level of the certificate's intervals (default 0.95)")
    r.add_argument("--certify-interval", default=d.certify_interval, choices=CERTIFY_INTERVALS,
                   help="psi_g interval: mover (exact per-group pieces combined by MOVER, coverage checked by "
                        "simulation; tighter) or exact (conservative by construction, about 1.3x wider)")
    r.add_argument("--fairness-bound", type=float, default=None,
                   help="also give DP / EO differences a verdict against this bound")
    r.add_argument("--small-group", type=int, default=d.small_group,
                   help="mark groups with fewer test rows than this (default 30)")
    r.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option, e.g. eps=0.05")
    r.add_argument("--out", default=None, help="output folder (default runs/METHOD_DATASET_sSPARSITY_seedSEED-HASH, "
                                                "HASH naming every other setting that changes the run)")
    r.add_argument("--save-compact", action="store_true",
                   help="structured methods (bifp, structured_magnitude, ...): also save the compacted model, "
                        "pruned units physically removed, into OUT/compact (reload with "
                        "fairprune_jax.sparsity.compact.load)")
    r.add_argument("--no-progress", action="store_true",
                   help="hide progress bars (shown by default in a terminal, not when the output is piped or CI "
                        "is set)")
    r.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write the compilation cache (compiled executables kept between runs in the user's "
                        "cache folder, ~/.cache/fairprune_jax/xla; FAIRPRUNE_XLA_CACHE=0 does the same)")
    r.add_argument("--no-dense-cache", action="store_true",
                   help="train the dense model (and parse the data, prune ceag / nft / el's start) even when an "
                        "earlier run saved it for the same data and settings (~/.cache/fairprune_jax/dense; "
                        "FAIRPRUNE_DENSE_CACHE=0 does the same)")
    r.add_argument("--tensorboard", action="store_true",
                   help="log loss, accuracy and, for constrained methods, per-group multipliers, violations and "
                        "accuracies per step into OUT/tensorboard (view: tensorboard --logdir OUT); needs tensorboardX")
    r.add_argument("--devices", default="all",
                   help="data-parallel over N local devices, or 'all' (batch size must be divisible by N)")
    _add_process_args(r)
    r.add_argument("--checkpoint-every", type=int, default=None,
                   help="save the run state into OUT/checkpoints every N steps and after each phase (0 = off). "
                        f"Default: every {CHECKPOINT_EVERY} steps once the run has lasted {CHECKPOINT_AFTER_S} s "
                        "(a shorter run writes none; with several processes, from the start)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoints (same settings required)")

    s = sub.add_parser("data-summary", help="sizes, groups, counts and label balance of a dataset")
    _add_data_args(s)
    s.add_argument("--small-group", type=int, default=30, help="warn about groups smaller than this")

    c = sub.add_parser("compare", help="methods x sparsities x seeds from a TOML config (resumable)")
    c.add_argument("--config", default=None,
                   help="experiments/NAME.toml: one grid, or a suite (suite = [grid TOMLs]) with a combined table; "
                        "or leave it out and give the grid with --methods, --sparsities, --seeds")
    c.add_argument("--out", default=None,
                   help="output folder (default: the config's `out`, else results/NAME next to the TOML; without "
                        "a TOML: runs/compare-DATASET-HASH)")
    g = c.add_argument_group("a grid without a TOML file")
    g.add_argument("--methods", help="comma-separated methods (or a TOML's variants), e.g. nft,ceag")
    g.add_argument("--sparsities", help="comma-separated sparsities, e.g. 0.8,0.9")
    g.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    g.add_argument("--dataset", default=DEFAULT_DATASET, help="dataset name (default: %(default)s)")
    g.add_argument("--data-dir", default=None, help="where the dataset lives")
    g.add_argument("--target", help="target attribute / column")
    g.add_argument("--protected", help="protected attribute(s), comma-separated for intersections")
    g.add_argument("--epochs", type=int, default=None, help="dense training epochs (default: the dataset's)")
    g.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default: --epochs)")
    g.add_argument("--save-config", default=None, metavar="PATH",
                   help="write the grid as a TOML file (rerun or edit it with --config PATH)")
    c.add_argument("--no-progress", action="store_true",
                   help="hide progress bars (shown by default in a terminal, not when piped or in CI)")
    c.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write the compilation cache (compiled executables kept between runs in the user's "
                        "cache folder, ~/.cache/fairprune_jax/xla; FAIRPRUNE_XLA_CACHE=0 does the same)")
    c.add_argument("--devices", default=None,
                   help="data-parallel over N local devices, or 'all' (default: 1 device; all of them with "
                        "--distributed)")
    _add_process_args(c)

    m = sub.add_parser("methods", help="list the pruning methods and their options")
    m.add_argument("names", nargs="*", metavar="METHOD", help="only these methods (e.g. `fairprune methods ceag`)")
    sub.add_parser("datasets", help="list the datasets")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    import dataclasses
    if args.out is not None and not args.out.strip():
        raise ValueError("--out is empty; name the folder for the run's outputs (or leave --out out for the default)")
    out = None if args.out is None else os.path.expanduser(args.out)
    cfg = RunConfig(
        method=args.method, dataset=args.dataset, model=args.model,
        data_dir=None if args.data_dir is None else os.path.expanduser(args.data_dir),
        sparsity=args.sparsity, seed=args.seed, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
        batch_size=args.batch_size, lr=args.lr, finetune_lr=args.finetune_lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, distribution=args.distribution, exclude_first=args.exclude_first,
        exclude_last=args.exclude_last, augment=args.augment, out=out,
        positive_label=1 if args.positive_class is None else args.positive_class,
        save_compact=args.save_compact, progress=not args.no_progress and _watching(), dataset_options=_data_options(args),
        model_options=_kv(args.model_opt, "--model-opt"), method_options=_kv(args.opt, "--opt"),
        certify_eps=args.certify_eps, certify_level=args.certify_level,
        certify_interval=args.certify_interval, fairness_bound=args.fairness_bound,
        small_group=args.small_group)
    return cfg if out is not None else dataclasses.replace(cfg, out=default_out(cfg))


def default_out(cfg: "RunConfig") -> str:
    """``runs/METHOD_DATASET_sSPARSITY_seedSEED-HASH``: HASH (8 hex digits) covers every setting that changes
    what the run computes (data file, target, protected attribute, epochs, options ...), so a run with other
    settings never lands in (and replaces) another run's folder, and the same command always finds its own
    folder again (for --resume)."""
    import dataclasses

    from fairprune_jax.training import checkpoint
    where = None if cfg.data_dir is None else os.path.abspath(cfg.data_dir)   # the file, wherever run from
    digest = checkpoint._digest(checkpoint.fingerprint(dataclasses.replace(cfg, data_dir=where)))[:8]
    return f"runs/{cfg.method}_{cfg.dataset.replace(':', '-')}_s{cfg.sparsity:g}_seed{cfg.seed}-{digest}"


#: ``fairprune run``'s default checkpoints: every CHECKPOINT_EVERY steps, once the run has lasted CHECKPOINT_AFTER_S
#: seconds. A run shorter than that loses little when killed and writes nothing (on the default Adult run, 30 s on
#: 2 cores, the checkpoints cost 8.7 s of its wall time).
CHECKPOINT_EVERY, CHECKPOINT_AFTER_S = 200, 60


def checkpoint_plan(every: int | None, many_processes: bool) -> tuple[int, float]:
    """``(every, after_s)`` for ``runner.run``: the flag's N from the start, or the default rule (from the start
    with several processes, whose clocks must not decide each on their own)."""
    if every is not None:
        return every, 0.0
    return CHECKPOINT_EVERY, 0.0 if many_processes else float(CHECKPOINT_AFTER_S)


def cmd_run(args: argparse.Namespace) -> int:
    from fairprune_jax.metrics import certify
    from fairprune_jax.reporting import report
    from fairprune_jax.running.runner import run, validate_config

    cfg = config_from_args(args)
    settings = _process_settings(args)
    validate_config(cfg)              # before JAX starts: every process fails at once, none waits for its peers
    primary = _start_processes(args, settings)
    if not primary:
        import dataclasses
        cfg = dataclasses.replace(cfg, progress=False)
    if primary:
        print(f"fairprune run: method={cfg.method} dataset={cfg.dataset} sparsity={cfg.sparsity} seed={cfg.seed}",
              flush=True)
    from fairprune_jax.training import tracking
    tracker = tracking.TensorBoard(Path(cfg.out) / "tensorboard") if args.tensorboard and primary else None
    shown: set[str] = set()
    with tracking.use(tracker), _warnings_once(shown):
        every, after_s = checkpoint_plan(args.checkpoint_every, settings is not None)
        res = run(cfg, devices=args.devices, checkpoint_every=every, checkpoint_after_s=after_s, resume=args.resume,
                  dense_cache=not args.no_dense_cache)
    if not primary:
        import jax
        print(f"fairprune run: process {jax.process_index()} of {jax.process_count()} finished; process 0 "
              f"writes and reports the results in {cfg.out}", flush=True)
        return 0
    rt = res.get("runtime", {})
    if rt.get("devices", 1) > 1 or rt.get("resumed"):
        print(f"{rt['devices']} device(s), {rt['processes']} process(es)" + (", resumed" if rt.get("resumed") else ""))
    if rt.get("data_from_cache"):
        print("data: the table an earlier run parsed from the same file(s) with the same options (from the cache; "
              "--no-dense-cache parses it again)")
    if rt.get("dense_from_cache"):
        print("dense model: the one an earlier run trained on the same data with the same dense settings (from the "
              "cache; --no-dense-cache trains it again)")
    if rt.get("pruned_start_from_cache"):
        print("pruned start: the gradually pruned model an earlier run made from that dense model with the same "
              "pruning settings (from the cache; --no-dense-cache prunes it again)")
    print()
    print(report.text_table(res, "test"))
    print()
    cert = res["pruned"]["test"].get("certificate")
    if cert:
        print(certify.headline(cert))
        print(certify.summary_line(cert))
    note = report.degenerate_note(res)
    if note:
        print(f"WARNING: {note}")
    line = report.per_class_line(res)
    if line:
        print(line)
    pc = res.get("positive_class") or {}
    from fairprune_jax.reporting.tables import groups_are_classes
    if pc.get("num_classes", 2) > 2 and args.positive_class is None and not groups_are_classes(res):
        print(f"WARNING: the target has {pc['num_classes']} classes: DP and EO compare class {pc['id']} "
              f"({pc['name']!r}) vs the rest across groups; choose the class with --positive-class")
    for line in res.get("method_info", {}).get("warnings", []):
        if line not in shown:
            print(f"WARNING: {line}")
    for line in res.get("method_info", {}).get("notes", []):
        print(f"note: {line}")
    print(f"achieved sparsity {res['sparsity']['achieved']:.4f} (target {cfg.sparsity}); "
          f"wall time {res['wall_time_s']:.1f} s")
    out = Path(cfg.out)
    written = [n for n in ("results.md", "group_accuracy.png", "constraints.png") if (out / n).is_file()]
    written += [f"{n}/" for n in ("checkpoints", "tensorboard") if (out / n).is_dir()]
    print(f"wrote {out / 'results.json'}" + "".join(f", {n}" for n in written))
    comp = res.get("compact")
    if comp is not None:
        if "error" in comp:
            print(f"fairprune: error: --save-compact: no compacted model written: {comp['error']}", file=sys.stderr)
            return 2
        fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
        print(f"wrote {Path(cfg.out) / comp['path']}: {comp['params_compact']} of {comp['params_dense']} "
              f"parameters, {fmt(comp['flops_fraction'], '{:.4f}')} of the FLOPs; max |logit difference| to "
              f"the masked model {fmt(comp['max_abs_logit_diff'], '{:.2g}')}")
    return 0


def cmd_data_summary(args: argparse.Namespace) -> int:
    from fairprune_jax.data import load_dataset
    from fairprune_jax.data.summary import format_summary, summarize

    t = time.perf_counter()
    ds = load_dataset(args.dataset, args.data_dir, **_data_options(args))
    print(format_summary(summarize(ds, small_group_threshold=args.small_group)))
    print(f"(loaded in {time.perf_counter() - t:.1f} s)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fairprune_jax.running.compare import (is_suite, load_config, load_suite, markdown_table, run_compare,
                                               run_suite, small_legend, table_columns)

    from fairprune_jax.training import distributed

    settings = _process_settings(args)
    if args.config is not None:
        given = [f"--{k.replace('_', '-')}" for k in GRID_FLAGS + ("save_config",) if getattr(args, k) is not None]
        given += [f for f, v, d in (("--seeds", args.seeds, "0,1,2"), ("--dataset", args.dataset, DEFAULT_DATASET))
                  if v != d]
        if given:
            raise ValueError(f"{', '.join(given)} describe a grid without a TOML file; with --config the grid is "
                             "the file's (edit it, or leave --config out)")
    args.config = args.config if args.config is not None else grid_file(args)
    suite = load_suite(args.config, args.out) if is_suite(args.config) else None
    cc = load_config(args.config, args.out) if suite is None else None
    distributed.parse_devices(args.devices)
    primary = _start_processes(args, settings)
    devices = args.devices if args.devices is not None else ("all" if settings is not None else None)
    mesh = None if devices is None else distributed.make_mesh(devices)
    shown: set[str] = set()
    with distributed.use_mesh(mesh), _warnings_once(shown):
        if suite is not None:
            summary = run_suite(suite, progress=primary and not args.no_progress and _watching())
        else:
            summary = run_compare(cc, progress=primary and not args.no_progress and _watching())
    if not primary:
        import jax
        print(f"fairprune compare: process {jax.process_index()} of {jax.process_count()} finished; process 0 "
              f"writes and reports the results in {(suite or cc).out}", flush=True)
        return 0
    if suite is not None:
        print(summary["markdown"])
        print(f"wrote {suite.out}/headline.md, headline.csv, headline.json (and each comparison's own outputs)")
        return 0
    cols, _ = table_columns(cc, summary["aggregate"], summary.get("setting") or {})   # the columns of results.md
    print(markdown_table(cc, summary["aggregate"], cols))
    legend = small_legend(summary["aggregate"], cols, set((summary.get("setting") or {}).get("small_limits") or ()))
    if legend:
        print(legend.replace("`", ""))
    print(f"wrote {cc.out}/results.csv, results.json, results.md and plots")
    return 0


GRID_FLAGS = ("methods", "sparsities", "target", "protected", "epochs", "finetune_epochs", "data_dir")


def grid_file(args: argparse.Namespace) -> str:
    """``fairprune compare`` without ``--config``: the grid the flags give, written as a TOML file (to
    ``--save-config``, else into the output folder) and read back by the same checks as any grid file."""
    import hashlib
    if not args.methods or not args.sparsities:
        raise ValueError("fairprune compare needs --config FILE, or the grid as flags: --methods nft,ceag "
                         "--sparsities 0.8,0.9 [--seeds 0,1,2] [--dataset NAME ...]")

    def items(text: str, kind, flag: str) -> list:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{flag} takes comma-separated values, e.g. {flag} "
                             f"{'0.8,0.9' if kind is float else '0,1,2' if kind is int else 'nft,ceag'}; "
                             f"got {text!r}") from None

    def toml(v) -> str:
        return "[" + ", ".join(toml(x) for x in v) + "]" if isinstance(v, list) else (
            '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"' if isinstance(v, str) else repr(v))

    grid = {"dataset": args.dataset, "methods": items(args.methods, str, "--methods"),
            "sparsities": items(args.sparsities, float, "--sparsities"), "seeds": items(args.seeds, int, "--seeds")}
    if args.data_dir:
        grid["data_dir"] = os.path.abspath(os.path.expanduser(args.data_dir))
    run = {k: getattr(args, k) for k in ("epochs", "finetune_epochs") if getattr(args, k) is not None}
    data = {k: getattr(args, k) for k in ("target", "protected") if getattr(args, k) is not None}
    digest = hashlib.sha256(repr((grid, run, data)).encode()).hexdigest()[:8]
    name = f"compare-{args.dataset.replace(':', '-')}-{digest}"
    lines = [f"# written by: fairprune compare {' '.join(sys.argv[2:])}", f"name = {toml(name)}"]
    lines += [f"{k} = {toml(v)}" for k, v in grid.items()]
    for table, values in (("run", run), ("dataset_options", data)):
        if values:
            lines += ["", f"[{table}]"] + [f"{k} = {toml(v)}" for k, v in values.items()]
    out = Path(os.path.expanduser(args.out)) if args.out else Path("runs") / name
    path = Path(args.save_config) if args.save_config else out / "grid.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    args.out = str(out)
    print(f"fairprune compare: the grid is in {path} (rerun or edit it with --config {path})", flush=True)
    return str(path)


def _interrupted_note(args: argparse.Namespace, argv: list[str]) -> str:
    """What an interrupted command saved and how to continue it (one line)."""
    import shlex
    if args.command == "run":
        from fairprune_jax.training import checkpoint
        out = Path(config_from_args(args).out)
        off = args.checkpoint_every is not None and args.checkpoint_every <= 0
        saved = None if off else checkpoint.describe(out / checkpoint.CHECKPOINT_DIR)
        if not saved:
            why = "--checkpoint-every 0" if off else (
                "no checkpoint yet" if args.checkpoint_every else
                f"no checkpoint yet: by default the first comes once the run has lasted {CHECKPOINT_AFTER_S} s")
            return f"nothing saved ({why}); rerun the command to start over"
        again = argv if "--resume" in argv else [*argv, "--resume"]
        return f"checkpoints in {out / checkpoint.CHECKPOINT_DIR}: {saved}; continue with: fairprune {shlex.join(again)}"
    if args.command == "compare":
        return f"finished cells are kept; rerun to continue: fairprune {shlex.join(argv)}"
    return "nothing saved"


def cmd_methods(args: argparse.Namespace) -> int:
    from fairprune_jax.running import method_listing  # a snapshot of the registry: no JAX, answers at once
    entries = method_listing.load()
    names = list(getattr(args, "names", None) or [])
    unknown = [n for n in names if n not in {e["name"] for e in entries}]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(e['name'] for e in entries)}")
    print(method_listing.format_listing([e for e in entries if not names or e["name"] in names],
                                        explain=bool(names)).rstrip())
    return 0


def cmd_datasets(_: argparse.Namespace) -> int:
    import inspect
    from fairprune_jax.data import DATASETS
    for name, fn in sorted(DATASETS.items()):
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind == p.KEYWORD_ONLY and not p.name.startswith("_")]
        print(f"{name:16s} options: {', '.join(p.name for p in params) or '-'}")
    return 0


def _watching() -> bool:
    from fairprune_jax.core.notices import human_watching
    return human_watching()


def check_backend() -> None:
    """The JAX backend starts, or a ``ValueError`` in words: which platform was asked for (``JAX_PLATFORMS``),
    which jax accelerator packages are installed, and how to install the right one."""
    import importlib.metadata as md
    import jax
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        asked = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME") or "(default)"
        have = sorted({d.metadata["Name"] for d in md.distributions()
                       if d.metadata["Name"] and d.metadata["Name"].lower().startswith(("jax-cuda", "jax_cuda",
                                                                                       "libtpu", "jax-rocm"))})
        raise ValueError(
            f"JAX cannot start the backend asked for (JAX_PLATFORMS={asked}): {str(e) or type(e).__name__}. "
            f"Installed accelerator packages: {', '.join(have) or 'none (CPU only)'}. For an NVIDIA GPU: pip "
            "install -U \"jax[cuda12]\"; for a TPU VM: pip install -U \"jax[tpu]\"; or unset JAX_PLATFORMS (or "
            "set it to cpu) to run on the CPU") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in ("run", "compare"):
        from fairprune_jax.training.caches import use_compilation_cache
        use_compilation_cache(not args.no_compile_cache)
        many = (args.distributed or args.coordinator or args.num_processes or args.process_id
                or os.environ.get("JAX_NUM_PROCESSES"))
        try:
            if not many:        # jax.distributed.initialize must come before the backend starts
                check_backend()
        except ValueError as e:
            print(f"fairprune: error: {e}", file=sys.stderr)
            return 2
    handlers = {"run": cmd_run, "compare": cmd_compare, "data-summary": cmd_data_summary, "methods": cmd_methods,
                "datasets": cmd_datasets}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print(f"fairprune: interrupted; {_interrupted_note(args, sys.argv[1:] if argv is None else argv)}",
              file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:     # bad input, or a file / folder that cannot be read or written
        print(f"fairprune: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"fairprune: training diverged: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
