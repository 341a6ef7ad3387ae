"""The ``fairprune`` command line: ``run``, ``compare``, ``data-summary``, ``methods`` and ``datasets``, each a
``cmd_*`` function over the parsed arguments, and :func:`main`, which starts the compilation cache, checks
that the JAX backend starts, joins a multi-process run when asked, prints the library's warnings once each
and turns errors into exit codes (2: bad input, 3: training diverged, 130: interrupted, with what was saved
and how to continue). The parser and the config it builds are ``cli_args.py`` (re-exported here).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fairprune_jax.core.config import DEFAULT_DATASET
from fairprune_jax.running.cli_args import (CHECKPOINT_AFTER_S, CHECKPOINT_EVERY, CLI_BOOL_WORDS,  # noqa: F401
                                            DATA_FLAGS, _add_data_args, _add_process_args, _data_options,
                                            _Defaults, _kv, _watching, build_parser, checkpoint_plan,
                                            config_from_args, default_out)


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


def cmd_run(args: argparse.Namespace) -> int:
    from fairprune_jax.metrics import certify
    from fairprune_jax.reporting import report
    from fairprune_jax.running.runner import run, validate_config

    cfg = config_from_args(args)
    settings = _process_settings(args)
    import warnings
    with warnings.catch_warnings():   # (its warnings are shown once, when run() checks the config again)
        warnings.simplefilter("ignore")
        validate_config(cfg)          # before JAX starts: every process fails at once, none waits for its peers
    primary = _start_processes(args, settings)
    if not primary:
        import dataclasses
        cfg = dataclasses.replace(cfg, progress=False)
    if primary:
        print(f"fairprune run: method={cfg.method} dataset={cfg.dataset} sparsity={cfg.sparsity} seed={cfg.seed}",
              flush=True)
    from fairprune_jax.training import tracking
    # makes nothing in OUT yet: its folder and event file come with the first phase, after run() has checked
    # and locked OUT and set an earlier run's outputs (its events included) aside
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
    phys = res["sparsity"].get("compacted")
    size = (f"; compacted size {phys['params_fraction']:.4f} of the parameters, "
            f"{phys['flops_fraction']:.4f} of the FLOPs" if phys and phys.get("flops_fraction") is not None else "")
    print(f"achieved sparsity {res['sparsity']['achieved']:.4f} (target {cfg.sparsity}){size}; "
          f"wall time {res['wall_time_s']:.1f} s")
    out = Path(cfg.out)
    from fairprune_jax.running.outputs import OUTPUT_ENTRIES     # everything a run writes, one list
    written = [n for n in OUTPUT_ENTRIES if n != "results.json" and (out / n).is_file()]
    written += [f"{n}/" for n in ("checkpoints", *OUTPUT_ENTRIES) if n != "compact" and (out / n).is_dir()]
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
    out = Path(os.path.expanduser(args.out)) if args.out else Path("runs") / name
    # the output folder goes into the file, so that --config FILE continues this grid where it stopped
    lines = [f"name = {toml(name)}", f"out = {toml(str(out.resolve()))}"]
    lines += [f"{k} = {toml(v)}" for k, v in grid.items()]
    for table, values in (("run", run), ("dataset_options", data)):
        if values:
            lines += ["", f"[{table}]"] + [f"{k} = {toml(v)}" for k, v in values.items()]
    body = "\n".join(lines) + "\n"
    path = Path(args.save_config) if args.save_config else out / "grid.toml"
    if path.exists():
        old = path.read_text(errors="replace") if path.is_file() else None
        if old is None or old.split("\n", 1)[-1] != body:        # (its first line: the command that wrote it)
            raise ValueError(f"--save-config {path}: {'a folder' if old is None else 'a file'} is there already"
                             f"{'' if old is None else ' with another grid'}; choose another path, or delete it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# written by: fairprune compare {' '.join(sys.argv[2:])}\n" + body)
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
    from fairprune_jax.core.notices import interrupts_kept
    try:
        with interrupts_kept():
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
