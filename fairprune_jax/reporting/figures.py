"""Figures for a comparison grid, drawn the way the pruning and fairness literature draws them.

* :func:`tradeoff` -- accuracy against a fairness metric, one point per (method, sparsity), mean with error
  bars (std over seeds) in both directions, the Pareto front (no other point is both more accurate and
  fairer) marked, the dense model as a reference point and line.
* :func:`metrics_vs_sparsity` -- accuracy and the fairness metric against sparsity, optionally on a
  log(1 - sparsity) axis (the fraction of weights remaining, the convention of the pruning literature),
  with the dense model and eps as reference lines.
* :func:`group_change` -- per-group accuracy change against the dense model, mean and std over seeds, a zero
  line, the legend outside the data. With many groups: the ``worst`` most-hurt groups as bars next to a
  histogram of *every* group's change, and the figure says how many groups the bars show; nothing is
  dropped silently.

Every figure is written as PNG and, for papers, as PDF (vector). Matplotlib is imported lazily.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

#: vector format written next to every PNG
VECTOR_FORMAT = "pdf"
#: with more groups than this, the per-group figure shows the worst-hit ones plus a histogram of all
MAX_GROUP_BARS = 16

HIGHER_IS_BETTER = {"test_accuracy", "train_accuracy", "dense_test_accuracy", "test_certified_share",
                    "no_violated_group", "train_psi_within_tol", "test_psi_within_tol"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path, formats: Iterable[str] = ("png", VECTOR_FORMAT)) -> list[Path]:
    """Save ``fig`` as ``path`` with each suffix in ``formats`` (PNG at 130 dpi); returns the files."""
    out = []
    for fmt in formats:
        p = Path(path).with_suffix("." + fmt)
        fig.savefig(p, dpi=130, bbox_inches="tight")
        out.append(p)
    _plt().close(fig)
    return out


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (unfairness, accuracy) no other point dominates (at most as unfair and at least
    as accurate, better in one), sorted by unfairness."""
    idx = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            idx.append(i)
    return sorted(idx, key=lambda i: (points[i][0], -points[i][1]))


def _mean_std(a: dict, col: str) -> tuple[float | None, float]:
    v = a.get(col) or {}
    return v.get("mean"), v.get("std") or 0.0


def tradeoff(agg: list[dict], dense: dict | None, path: Path, *, metric: str, metric_label: str, title: str,
             structured: dict[str, bool] | None = None, eps: float | None = None, zoom: float = 0.08) -> list[Path]:
    """Test accuracy (y) against ``metric`` (x, lower is fairer); see the module docstring.

    One colour and marker per method (hollow: structured); the points of one method at several sparsities
    are joined by a thin line and labelled with their sparsity. When the accuracies span more than
    ``2 * zoom``, a second panel zooms on the points within ``zoom`` of the dense accuracy.
    """
    plt = _plt()
    from matplotlib.lines import Line2D
    structured = structured or {}
    methods = list(dict.fromkeys(a["method"] for a in agg))
    sparsities = sorted({a["sparsity"] for a in agg})
    color = dict(zip(methods, _colors(len(methods))))
    marker = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(methods)}
    pts = []   # (x, xerr, y, yerr, agg row)
    for a in agg:
        x, xe = _mean_std(a, metric)
        y, ye = _mean_std(a, "test_accuracy")
        if x is not None and y is not None:
            pts.append((x, xe, y, ye, a))
    # a degenerate (near-constant) model is never on the front: its low DP / EO say nothing about fairness
    degen = [bool((p[4].get("degenerate") or {}).get("mean")) for p in pts]
    ok = [i for i, d in enumerate(degen) if not d]
    front = [ok[j] for j in pareto_front([(pts[i][0], pts[i][2]) for i in ok])]
    dx, _ = _mean_std(dense, metric) if dense else (None, 0.0)
    dy, dye = _mean_std(dense, "test_accuracy") if dense else (None, 0.0)
    ys = [p[2] for p in pts]
    top = dy if dy is not None else (max(ys) if ys else 1.0)
    zoomed = bool(ys) and max(ys) - min(ys) > 2 * zoom and sum(y >= top - zoom for y in ys) >= 2

    def draw(ax, keep, labels: bool):
        for m in methods:
            mine = sorted((p for p in pts if p[4]["method"] == m and keep(p)), key=lambda p: p[4]["sparsity"])
            if len(mine) > 1:
                ax.plot([p[0] for p in mine], [p[2] for p in mine], color=color[m], lw=0.7, alpha=0.6, zorder=2)
            for x, xe, y, ye, a in mine:
                c = color[m]
                ax.errorbar(x, y, xerr=xe, yerr=ye, fmt=marker[m], color=c, ms=7, capsize=2, lw=0.9,
                            mfc="white" if structured.get(m) else c, mec=c, zorder=3)
                if (a.get("degenerate") or {}).get("mean"):
                    ax.scatter([x], [y], marker="x", s=90, color="black", lw=1.5, zorder=6)
                if labels and len(sparsities) > 1:
                    ax.annotate(f"{a['sparsity']:g}", (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6,
                                color=c)
        fr = [pts[i] for i in front if keep(pts[i])]
        if fr:
            ax.step([p[0] for p in fr], [p[2] for p in fr], where="post", color="black", lw=1, ls=":", zorder=2)
            ax.scatter([p[0] for p in fr], [p[2] for p in fr], s=190, facecolors="none", edgecolors="black",
                       lw=1.2, zorder=4)
        if dy is not None:
            ax.axhline(dy, color="gray", lw=1, ls="--", zorder=1)
            if dx is not None:
                ax.errorbar(dx, dy, yerr=dye, fmt="*", color="black", ms=13, zorder=5)
        if eps is not None and metric.endswith("max_psi"):
            ax.axvline(eps, color="tab:red", lw=1, ls="--", zorder=1)
        ax.set_xlabel(f"{metric_label}  (lower is fairer)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)

    if zoomed:
        fig, (ax, zx) = plt.subplots(1, 2, figsize=(13, 5))
        draw(ax, lambda p: True, labels=False)
        ax.axhspan(top - zoom, ax.get_ylim()[1], color="gold", alpha=0.12, zorder=0)
        ax.set_title("all methods", fontsize=9)
        draw(zx, lambda p: p[2] >= top - zoom, labels=True)
        zx.set_title(f"zoom: within {zoom:g} of the dense accuracy", fontsize=9)
    else:
        fig, ax = plt.subplots(figsize=(7.5, 5))
        draw(ax, lambda p: True, labels=True)
    handles = [Line2D([], [], color=color[m], marker=marker[m], ls="", mfc="white" if structured.get(m) else color[m],
                      label=m + (" (structured)" if structured.get(m) else "")) for m in methods]
    handles += [Line2D([], [], ls="", label=f"sparsity {', '.join(f'{s:g}' for s in sparsities)}")]
    handles += [Line2D([], [], color="black", marker="o", mfc="none", ms=11, ls=":", label="Pareto front")]
    if any(degen):
        handles += [Line2D([], [], color="black", marker="x", ls="", ms=8, label="degenerate (some seeds)")]
    if dense is not None:
        handles += [Line2D([], [], color="black", marker="*", ls="--", ms=11, label="dense model")]
    if eps is not None and metric.endswith("max_psi"):
        handles += [Line2D([], [], color="tab:red", ls="--", label=f"eps = {eps:g}")]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.93), fontsize=8, frameon=False,
               title="mean ± std over seeds\nhollow = structured", title_fontsize=7)
    fig.suptitle(f"{title}: accuracy vs fairness", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def metrics_vs_sparsity(agg: list[dict], dense: dict | None, path: Path, *, metric: str, metric_label: str,
                        title: str, log_axis: bool = False, eps: float | None = None,
                        structured: dict[str, bool] | None = None) -> list[Path]:
    """Test accuracy and ``metric`` against sparsity; ``log_axis``: x = 1 - sparsity on a log scale.

    A grid with one sparsity has no sparsity axis to speak of: each panel then shows one row per method
    (mean and std over seeds) instead of a column of overlapping points.
    """
    plt = _plt()
    structured = structured or {}
    methods = list(dict.fromkeys(a["method"] for a in agg))
    color = dict(zip(methods, _colors(len(methods))))
    if len({a["sparsity"] for a in agg}) == 1:
        return _by_method(agg, dense, path, methods, color, metric=metric, metric_label=metric_label, title=title,
                          eps=eps, structured=structured)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for m in methods:
        pts = sorted((a for a in agg if a["method"] == m), key=lambda a: a["sparsity"])
        for ax, col in ((axes[0], "test_accuracy"), (axes[1], metric)):
            xy = [(a["sparsity"], *_mean_std(a, col)) for a in pts]
            xy = [(s, y, e) for s, y, e in xy if y is not None]
            if not xy:
                continue
            s, y, e = map(np.asarray, zip(*xy))
            x = 1.0 - s if log_axis else s
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=color[m], ls="--" if structured.get(m) else "-",
                        label=m + (" (structured)" if structured.get(m) else ""))
    for ax, col, label in ((axes[0], "test_accuracy", "test accuracy"), (axes[1], metric, metric_label)):
        if dense is not None and _mean_std(dense, col)[0] is not None:
            ax.axhline(_mean_std(dense, col)[0], color="black", lw=1, ls=":", label="dense model")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if log_axis:
            sp = sorted({a["sparsity"] for a in agg})
            ax.set_xscale("log")
            ax.set_xticks([1.0 - s for s in sp], [f"{s:g}" for s in sp])
            ax.minorticks_off()
            ax.invert_xaxis()     # sparsity grows to the right
            ax.set_xlabel("sparsity (axis: log of 1 - sparsity, the fraction of weights kept)")
        else:
            ax.set_xlabel("sparsity")
    if eps is not None and metric.endswith("max_psi"):
        axes[1].axhline(eps, color="tab:red", ls="--", lw=1, label=f"eps = {eps:g}")
    h, lab = axes[1].get_legend_handles_labels()
    h0, lab0 = axes[0].get_legend_handles_labels()
    seen = dict(zip(lab0 + lab, h0 + h))
    fig.legend(seen.values(), seen.keys(), loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8, frameon=False)
    fig.suptitle(f"{title} (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def _by_method(agg: list[dict], dense: dict | None, path: Path, methods: list[str], color: dict, *, metric: str,
               metric_label: str, title: str, eps: float | None, structured: dict[str, bool]) -> list[Path]:
    """One sparsity: test accuracy and ``metric`` per method, one row each, the dense model as a line."""
    plt = _plt()
    sparsity = agg[0]["sparsity"]
    row = {a["method"]: a for a in agg}          # one sparsity: one aggregate row per method
    degenerate = {m for m in methods if (row[m].get("degenerate") or {}).get("mean")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 + 0.32 * len(methods)), sharey=True)
    y = np.arange(len(methods))
    for ax, col, label in ((axes[0], "test_accuracy", "test accuracy"), (axes[1], metric, metric_label)):
        for i, m in enumerate(methods):
            mean, std = _mean_std(row[m], col)
            if mean is None:
                continue
            hollow = structured.get(m)
            ax.errorbar([mean], [i], xerr=[std], marker="s" if hollow else "o", capsize=3, color=color[m],
                        mfc="white" if hollow else color[m])
            if m in degenerate:   # near-constant in some seeds: its fairness says nothing
                ax.plot([mean], [i], marker="x", color="black", ms=9, ls="")
        if dense is not None and _mean_std(dense, col)[0] is not None:
            ax.axvline(_mean_std(dense, col)[0], color="black", lw=1, ls=":", label="dense model")
        if col == metric and eps is not None and metric.endswith("max_psi"):
            ax.axvline(eps, color="tab:red", ls="--", lw=1, label=f"eps = {eps:g}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y, [m + (" (structured)" if structured.get(m) else "") +
                           (" (DEGENERATE)" if m in degenerate else "") for m in methods])
    axes[0].invert_yaxis()      # methods top to bottom in the grid's order
    h, lab = axes[1].get_legend_handles_labels()
    h0, lab0 = axes[0].get_legend_handles_labels()
    seen = dict(zip(lab0 + lab, h0 + h))
    if seen:
        fig.legend(seen.values(), seen.keys(), loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8,
                   frameon=False)
    fig.suptitle(f"{title} at sparsity {sparsity:g} (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def _nanmean(v: list[float]) -> float:
    """Mean of the finite values (NaN when there is none, without numpy's empty-slice warning)."""
    a = np.asarray(v, dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _ylim(lo: float, hi: float) -> tuple[float, float]:
    """Limits that include zero and every bar with its error bar, with a margin: no truncated bars."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    pad = 0.06 * max(hi - lo, 1e-3)
    return lo - pad, hi + pad


def group_change(changes: dict[str, dict[str, list[float | None]]], path: Path, *, groups: list[str],
                 title: str, ylabel: str, worst: int = MAX_GROUP_BARS, group_sizes: dict[str, int] | None = None,
                 structured: dict[str, bool] | None = None, panels_from: int = 6) -> list[Path]:
    """Per-group change bars, mean ± std over seeds (``changes[method][group]`` = values per seed).

    With more than ``worst`` groups: bars for the ``worst`` groups with the lowest mean change averaged over
    the methods, and a histogram of every group's mean change per method. With ``panels_from`` methods or
    more, one small panel per method (shared y axis) instead of grouped bars.
    """
    plt = _plt()
    structured = structured or {}
    methods = list(changes)
    color = dict(zip(methods, _colors(len(methods))))

    def stats(m, g):
        v = np.array([x for x in changes[m].get(g, []) if x is not None], dtype=float)
        return (float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0) if v.size else (np.nan, 0.0)

    means = {m: {g: stats(m, g) for g in groups} for m in methods}
    many = len(groups) > worst
    if many:
        avg = {g: _nanmean([means[m][g][0] for m in methods]) for g in groups}
        shown = sorted((g for g in groups if np.isfinite(avg[g])), key=lambda g: avg[g])[:worst]
    else:
        shown = list(groups)
    names = [f"{g} (n={group_sizes[g]})" if group_sizes and g in group_sizes else g for g in shown]
    rot = len(shown) > 6 or max((len(n) for n in names), default=0) > 10
    x = np.arange(len(shown))
    lo = hi = 0.0
    for m in methods:
        mu = np.array([means[m][g][0] for g in shown])
        sd = np.array([means[m][g][1] for g in shown])
        fin = np.isfinite(mu)
        if fin.any():
            lo, hi = min(lo, float(np.min(mu[fin] - sd[fin]))), max(hi, float(np.max(mu[fin] + sd[fin])))
    what = (f"the {len(shown)} most-hurt of {len(groups)} groups (lowest mean change over methods)" if many
            else f"all {len(groups)} groups")

    def bars(ax, m, offset, width):
        mu = np.array([means[m][g][0] for g in shown])
        sd = np.array([means[m][g][1] for g in shown])
        ax.bar(x + offset, np.nan_to_num(mu), width, yerr=sd, color=color[m],
               error_kw={"lw": 0.7, "capsize": 1.5}, hatch="//" if structured.get(m) else None,
               edgecolor="white" if structured.get(m) else None, linewidth=0,
               label=m + (" (structured)" if structured.get(m) else ""))

    def finish(ax, ticks: bool):
        ax.axhline(0, color="black", lw=0.9)
        ax.set_ylim(*_ylim(lo, hi))
        ax.grid(axis="y", alpha=0.3)
        if ticks:
            ax.set_xticks(x, names, rotation=60 if rot else 0, ha="right" if rot else "center", fontsize=7)
        else:
            ax.set_xticks(x, [""] * len(x))

    def histogram(hx):
        allv = {m: np.array([means[m][g][0] for g in groups]) for m in methods}
        fin = np.concatenate([v[np.isfinite(v)] for v in allv.values()])
        bins = np.histogram_bin_edges(fin, bins=min(40, max(10, len(groups) // 5))) if fin.size else 10
        for m in methods:
            hx.hist(allv[m][np.isfinite(allv[m])], bins=bins, histtype="step", lw=1.3, color=color[m])
        hx.axvline(0, color="black", lw=0.9)
        hx.set_xlabel(ylabel, fontsize=8)
        hx.set_ylabel("groups")
        hx.set_title(f"every group ({len(groups)}), mean over seeds", fontsize=9)

    if len(methods) < panels_from:
        width = 0.8 / max(len(methods), 1)
        bar_w = max(6.0, 0.16 * len(shown) * len(methods) + 2)
        if many:
            fig, (ax, hx) = plt.subplots(1, 2, figsize=(bar_w + 5, 4.6), gridspec_kw={"width_ratios": [bar_w, 5]})
            histogram(hx)
        else:
            fig, ax = plt.subplots(figsize=(bar_w, 4.6))
        for i, m in enumerate(methods):
            bars(ax, m, (i - (len(methods) - 1) / 2) * width, width)
        finish(ax, True)
        ax.set_ylabel(ylabel)
        ax.set_title(what, fontsize=9)
        fig.legend(*ax.get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.0, 0.92), fontsize=8,
                   frameon=False, title="mean ± std over seeds", title_fontsize=7)
    else:
        ncols = 4
        slots = len(methods) + (1 if many else 0)
        nrows = -(-slots // ncols)
        pw = max(3.2, 0.22 * len(shown) + 1.0)
        fig, axes = plt.subplots(nrows, ncols, figsize=(pw * ncols, 2.5 * nrows + 0.8), squeeze=False)
        flat = list(axes.ravel())
        for i, m in enumerate(methods):
            ax = flat[i]
            bars(ax, m, 0.0, 0.7)
            # tick labels on the lowest panel of each column
            finish(ax, ticks=i + ncols >= len(methods))
            ax.set_title(m + (" (structured)" if structured.get(m) else ""), fontsize=9)
            if i % ncols == 0:
                ax.set_ylabel("change", fontsize=8)
        if many:
            histogram(flat[len(methods)])
        for ax in flat[slots:]:
            ax.set_visible(False)
        fig.text(0.5, 1.0, f"{ylabel}; {what}; bars: mean ± std over seeds", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=10, y=1.04 if len(methods) >= panels_from else None)
    fig.tight_layout()
    return save(fig, path)


def run_group_accuracy(results: dict, path: Path, split: str = "test", max_groups: int = 40,
                       formats: Iterable[str] = ("png", VECTOR_FORMAT)) -> list[Path]:
    """One run: per-group accuracy, dense vs pruned as points joined per group (an arrow of the change), the
    axis zoomed to the data (a difference of two points is visible; bars from 0 would flatten it), legend
    outside; with more than ``max_groups`` groups, the ``max_groups`` with the largest drop, and the title
    says so."""
    plt = _plt()
    d, p = results["dense"][split]["groups"], results["pruned"][split]["groups"]
    names = [n for n in p if (p[n]["n"] or 0) > 0]
    total = len(names)
    if total > max_groups:
        drop = {n: (d[n]["accuracy"] or 0.0) - (p[n]["accuracy"] or 0.0) for n in names}
        names = sorted(names, key=lambda n: -drop[n])[:max_groups]
    x = np.arange(len(names))
    da = [d[n]["accuracy"] or 0.0 for n in names]
    pa = [p[n]["accuracy"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(names) + 2), 4))
    ax.vlines(x, np.minimum(da, pa), np.maximum(da, pa), color="tab:gray", lw=1.5, alpha=0.6)
    ax.scatter(x, da, s=36, label="dense", color="tab:gray", zorder=3)
    ax.scatter(x, pa, s=36, marker="D", label=f"pruned ({results['method']}, {results['sparsity']['achieved']:.0%})",
               color="tab:blue", zorder=3)
    ax.axhline(results["dense"][split]["accuracy"], color="black", ls=":", lw=1, label="dense, all rows")
    rot = len(names) > 6 or max((len(n) for n in names), default=0) > 10
    ax.set_xticks(x, names, rotation=60 if rot else 0, ha="right" if rot else "center", fontsize=8)
    ax.set_ylabel(f"{split} accuracy")
    vals = da + pa + [results["dense"][split]["accuracy"] or 0.0]
    pad = 0.08 * max(max(vals) - min(vals), 0.02)
    ax.set_ylim(max(min(vals) - pad, 0.0), min(max(vals) + pad, 1.0))
    shown = "" if len(names) == total else f" ({len(names)} of {total} groups: largest drops)"
    ax.set_title(f"Per-group accuracy: {results['dataset']}{shown}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return save(fig, path, formats)
