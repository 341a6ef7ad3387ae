"""Wall time to prune and fine-tune one model to 90% with ceag, fairgrape, el and nft, for G = 2 .. 1000 groups.

The claim under test (Balancing Act's argument against FairGRAPE): CEAG's cost is flat in the number of
protected groups G, FairGRAPE's grows with G (its importance needs G backward passes per batch).

Setup: one dataset (default: scikit-learn digits, 1,347 training rows, an MLP 64 -> 64 -> 32 -> 10 on a
2-core CPU), the real labels, and **synthetic group ids** drawn uniformly from G groups (train and test),
so every G sees the same rows and the same model. One dense model per G (trained once, not timed; the
dense run does not depend on the groups). Timed: the method's ``run`` (pruning + fine-tuning, with every
jit compilation it triggers, as a user pays it), ended by ``jax.block_until_ready``; evaluation and the
certificate are not timed. Every method gets the same budget (``--finetune-epochs``, pruning phase
``prune_epochs`` = half of it) and its default options.

Interleaving: one untimed warm-up run per method (smallest G), then ``--rounds`` rounds; each round runs every (method, G) cell once, in an order rotated from
round to round, so machine load hits all cells alike; we report the median and the spread over rounds,
and the slope of log(median time) against log(G) per method (least squares over the G values).

    python benchmarks/group_scaling.py                      # ~25-40 min on 2 busy cores
    python benchmarks/group_scaling.py --quick              # G = 2, 10; 1 round (a smoke run)

Writes ``results/group_scaling.{json,md,png}`` (``--out`` prefix).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from fairprune_jax.data import load_dataset  # noqa: E402
from fairprune_jax.data.base import Split  # noqa: E402
from fairprune_jax.methods import RunConfig, get_method  # noqa: E402
from fairprune_jax.running.runner import prepare  # noqa: E402

METHODS = ("ceag", "fairgrape", "el", "nft")


def with_groups(ds, G: int, seed: int = 0):
    """The dataset with group ids drawn uniformly from G synthetic groups (same rows, same labels)."""
    rng = np.random.default_rng(seed)

    def regroup(s: Split | None) -> Split | None:
        if s is None:
            return None
        return dataclasses.replace(s, g=rng.integers(0, G, len(s)).astype(s.g.dtype))

    return dataclasses.replace(ds, train=regroup(ds.train), test=regroup(ds.test), val=regroup(ds.val),
                               group_names=[f"g{i}" for i in range(G)], group_attrs=["synthetic"])


def time_one(prep, method: str, sparsity: float) -> tuple[float, dict]:
    cfg = dataclasses.replace(prep.config, method=method, sparsity=sparsity, method_options={})
    ctx = prep.ctx.with_config(cfg)
    t = time.perf_counter()
    state, info = get_method(method).run(ctx, prep.dense, get_method(method).parse({}))
    jax.block_until_ready(state.params)
    return time.perf_counter() - t, info


def slope(gs: list[int], ts: list[float]) -> float:
    x, y = np.log(np.asarray(gs, float)), np.log(np.asarray(ts, float))
    return float(np.polyfit(x, y, 1)[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--hidden", default="64,32", help="MLP hidden widths")
    ap.add_argument("--groups", default="2,10,100,1000")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=10, help="dense training (not timed)")
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="G = 2, 10 and one round")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "group_scaling"))
    args = ap.parse_args(argv)
    groups = [2, 10] if args.quick else [int(v) for v in args.groups.split(",")]
    rounds = 1 if args.quick else args.rounds
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        get_method(m)
    hidden = [int(v) for v in args.hidden.split(",")]
    base = load_dataset(args.dataset, args.data_dir)
    preps = {}
    for G in groups:
        ds = with_groups(base, G)
        cfg = RunConfig(dataset=ds.name, model="mlp", model_options={"hidden": hidden}, epochs=args.epochs,
                        finetune_epochs=args.finetune_epochs, batch_size=args.batch_size, sparsity=args.sparsity,
                        progress=False)
        preps[G] = prepare(cfg, dataset=ds)
        print(f"dense model for G={G}: test acc "
              f"{preps[G].dense_evals['test'][0].correct.sum() / preps[G].dense_evals['test'][0].n.sum():.3f}",
              flush=True)
    cells = [(m, G) for G in groups for m in methods]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    extra: dict[tuple[str, int], dict] = {}
    loads = []
    t_all = time.perf_counter()
    for m in methods:   # warm-up, not timed: one-time costs (module-level jits, caches) hit no cell
        time_one(preps[groups[0]], m, args.sparsity)
    for r in range(rounds):
        order = cells[r % len(cells):] + cells[:r % len(cells)]
        if r % 2:
            order = order[::-1]
        for m, G in order:
            sec, info = time_one(preps[G], m, args.sparsity)
            times[(m, G)].append(sec)
            if m == "fairgrape":
                extra[(m, G)] = info.get("cost", {})
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}/{rounds} {m:9s} G={G:5d} {sec:8.2f} s  (load {loads[-1]:.1f})", flush=True)
    rows = []
    for m, G in cells:
        ts = times[(m, G)]
        rows.append({"method": m, "groups": G, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     "runs": ts, **({"fairgrape_cost": extra[(m, G)]} if (m, G) in extra else {})})
    slopes = {m: slope(groups, [r["median_s"] for r in rows if r["method"] == m]) for m in methods} \
        if len(groups) > 1 else {}
    ds0 = preps[groups[0]].dataset
    meta = {"dataset": args.dataset, "train_rows": len(ds0.train), "model": f"mlp {hidden}",
            "sparsity": args.sparsity, "dense_epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
            "prune_epochs": max(args.finetune_epochs // 2, 1), "batch_size": args.batch_size, "rounds": rounds,
            "groups": groups, "methods": methods, "load_avg_min_max": [min(loads), max(loads)],
            "cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
            "backend": jax.default_backend(), "total_s": time.perf_counter() - t_all,
            "command": "python benchmarks/group_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = {"meta": meta, "rows": rows, "slope_log_time_vs_log_G": slopes}
    print(json.dumps(slopes, indent=1))
    if args.out:
        p = Path(args.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
        p.with_suffix(".md").write_text(markdown(out) + "\n")
        plot(out, p.with_suffix(".png"))
        print(f"wrote {p.with_suffix('.json')}, .md, .png")
    return 0


def markdown(out: dict) -> str:
    meta, rows, slopes = out["meta"], out["rows"], out["slope_log_time_vs_log_G"]
    groups, methods = meta["groups"], meta["methods"]
    by = {(r["method"], r["groups"]): r for r in rows}
    lines = [f"Wall time (s) to prune to {meta['sparsity']:.0%} and fine-tune, median of {meta['rounds']} interleaved "
             f"rounds (min-max); {meta['dataset']} ({meta['train_rows']} train rows, synthetic group ids), "
             f"{meta['model']}, {meta['prune_epochs']} + {meta['finetune_epochs']} epochs, batch "
             f"{meta['batch_size']}; {meta['backend']} x {meta['cpus']} cores, load average "
             f"{meta['load_avg_min_max'][0]:.1f}-{meta['load_avg_min_max'][1]:.1f}.", "",
             "| method | " + " | ".join(f"G = {G}" for G in groups) + " | slope d log t / d log G |",
             "|---|" + "---:|" * (len(groups) + 1)]
    for m in methods:
        cells = [f"{by[(m, G)]['median_s']:.1f} ({by[(m, G)]['min_s']:.1f}-{by[(m, G)]['max_s']:.1f})" for G in groups]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {slopes.get(m, float('nan')):.2f} |")
    if any("fairgrape_cost" in r for r in rows):
        lines += ["", "fairgrape, last round: seconds in importance / selection, backward passes over the train split",
                  "", "| G | importance s | selection s | backward passes |", "|---:|---:|---:|---:|"]
        for G in groups:
            c = by.get(("fairgrape", G), {}).get("fairgrape_cost")
            if c:
                lines.append(f"| {G} | {c['importance_seconds']:.1f} | {c['selection_seconds']:.1f} | "
                             f"{c['backward_passes']} |")
    lines += ["", f"Command: `{meta['command'].strip()}`"]
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    meta, rows, slopes = out["meta"], out["rows"], out["slope_log_time_vs_log_G"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m in meta["methods"]:
        rs = [r for r in rows if r["method"] == m]
        g = [r["groups"] for r in rs]
        med = np.array([r["median_s"] for r in rs])
        lo, hi = med - np.array([r["min_s"] for r in rs]), np.array([r["max_s"] for r in rs]) - med
        ax.errorbar(g, med, yerr=[lo, hi], marker="o", capsize=3,
                    label=f"{m} (slope {slopes.get(m, float('nan')):.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of groups G")
    ax.set_ylabel("prune + fine-tune wall time (s)")
    ax.set_title(f"{meta['dataset']} {meta['model']}, {meta['sparsity']:.0%}, {meta['backend']} "
                 f"({meta['rounds']} rounds, median)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
