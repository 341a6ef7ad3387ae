"""What the ``fairprune`` command line accepts and how it becomes a :class:`RunConfig`: the parser of every
subcommand with its defaults shown (:func:`build_parser`), ``KEY=VALUE`` options read as Python literals or
boolean words, the data flags handed to the loader, the default output folder named by a hash of the settings
and the default checkpoint rule. Imports no JAX, so ``fairprune --help`` answers at once.
"""
from __future__ import annotations

import argparse
import ast
import os

from fairprune_jax.core.config import (BOOL_WORDS, CERTIFY_INTERVALS, DATASET_EPOCHS, DEFAULT_DATASET, DEFAULT_EPOCHS,
                                       DISTRIBUTIONS, MODEL_NAMES, OPTIMIZERS, STREAM_MODES, RunConfig)  # no JAX: --help stays instant


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


def _data_options(args: argparse.Namespace) -> dict:
    opts = {name: getattr(args, flag) for flag, name in DATA_FLAGS.items() if getattr(args, flag) is not None}
    opts.update(_kv(args.data_opt, "--data-opt"))
    if "data_dir" in opts:
        raise SystemExit("--data-opt data_dir=... is not a loader option: the data folder is --data-dir")
    return opts


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
    r.add_argument("--model", default=None, help=f"{', '.join(MODEL_NAMES)} (default: mlp for tabular, cnn for "
                                                  "images)")
    r.add_argument("--model-opt", action="append", metavar="KEY=VALUE",
                   help="model option, e.g. hidden=[64,32] for mlp, width=0.35 for mobilenet_v2 (each model's "
                        "options: the README's Datasets section)")
    r.add_argument("--sparsity", type=float, default=d.sparsity, help="fraction of prunable weights removed")
    r.add_argument("--distribution", default=d.distribution, choices=DISTRIBUTIONS,
                   help="how sparsity is spread over layers; 2:4 / 4:8 / 1:4: N of every M consecutive input "
                        "weights kept (accelerators' native pattern; sparsity exactly 1 - N/M)")
    r.add_argument("--exclude-first", action="store_true", help="keep the first layer dense")
    r.add_argument("--exclude-last", action="store_true", help="keep the last layer dense")
    r.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the initial weights, the batches and the method's random choices; not the train / test "
                        "split, which has its own seed (--data-opt seed=N, default 0), so runs of several seeds "
                        "share one split and their spread leaves out the split's")
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
    r.add_argument("--streams", default=d.streams, choices=STREAM_MODES,
                   help="how the method's random streams derive from --seed: fold_in (default: each stream its "
                        "own jax.random.fold_in key) or offset (seed + a fixed offset per stream, what results "
                        "before fold_in became the default used)")
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
        small_group=args.small_group, streams=args.streams)
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


def _watching() -> bool:
    from fairprune_jax.core.notices import human_watching
    return human_watching()
