"""Run outputs: ``results.json``, a Markdown table and a per-group accuracy plot."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fairprune_jax.core.notices import warn
from fairprune_jax.metrics import certify
from fairprune_jax.reporting.tables import md_prose, md_text

# (label, getter on a fairness_report dict, format)
ROWS: list[tuple[str, Any, str]] = [
    ("accuracy", lambda r, s: r["accuracy"], "{:.4f}"),
    ("sparsity (prunable weights)", lambda r, s: s, "{:.4f}"),
    ("group accuracy spread (max - min)", lambda r, s: r["accuracy_parity_gap"]["between_groups"], "{:.4f}"),
    ("worst-group accuracy", lambda r, s: _min_group_acc(r), "{:.4f}"),
    ("max psi_g (excess accuracy gap)", lambda r, s: (r.get("excess_accuracy_gap") or {}).get("max"), "{:.4f}"),
    ("certified max psi_g (upper bound)", lambda r, s: _certified(r), "{:.4f}"),
    ("psi_g spread (max - min)", lambda r, s: (r.get("excess_accuracy_gap") or {}).get("spread"), "{:.4f}"),
    ("CWV (class-wise variance)", lambda r, s: r.get("class_wise_variance"), "{:.5f}"),
    ("MCD (max class discrepancy)", lambda r, s: r.get("max_class_discrepancy"), "{:.4f}"),
    ("demographic parity difference", lambda r, s: r["demographic_parity_difference"]["between_groups"], "{:.4f}"),
    ("equalized odds difference", lambda r, s: r["equalized_odds_difference"]["between_groups"]["worst_case"],
     "{:.4f}"),
]


#: ROWS whose value is a reduction over groups (marked when some groups are small).
GROUP_ROWS = {"group accuracy spread (max - min)", "worst-group accuracy", "max psi_g (excess accuracy gap)",
              "certified max psi_g (upper bound)",
              "psi_g spread (max - min)", "demographic parity difference", "equalized odds difference"}
BINARY_ROWS = {"demographic parity difference", "equalized odds difference"}


def small_groups(results: dict, split: str = "test") -> dict[str, int]:
    """``{group: rows}`` of the groups with fewer ``split`` rows than the run's ``small_group`` threshold."""
    p = results["pruned"].get(split, {})
    cert = p.get("certificate") or {}
    names = cert.get("small_groups")
    if names is None:
        limit = int((results.get("config") or {}).get("small_group", certify.SMALL_GROUP_ROWS))
        names = [n for n, g in p.get("groups", {}).items() if g.get("n") and g["n"] < limit]
    return {n: int(p["groups"][n]["n"] or 0) for n in names}


def _threshold(results: dict) -> int:
    return int((results.get("config") or {}).get("small_group", certify.SMALL_GROUP_ROWS))


def _row_label(results: dict, label: str, split: str) -> str:
    pc = results.get("positive_class")
    out = label
    if label in BINARY_ROWS and pc and pc.get("num_classes", 2) > 2:
        out = f"{label} ({pc['name']} vs rest)"
    if label == "equalized odds difference":
        if small_eo_groups(results, split):
            out += " †"
    elif label in GROUP_ROWS and small_groups(results, split):
        out += " *"
    return out


def small_eo_groups(results: dict, split: str = "test") -> dict[str, tuple[int, int]]:
    """``{group: (positives, negatives)}`` of the groups whose TPR or FPR rests on fewer than ``small_group``
    rows: the count that decides an equalized-odds difference (empty for runs made before it was recorded)."""
    cert = results["pruned"].get(split, {}).get("certificate") or {}
    return {n: (cert["groups"][n].get("positives", 0), cert["groups"][n].get("negatives", 0))
            for n in cert.get("small_groups_eo", [])}


def small_groups_note(results: dict, split: str = "test", with_eo: bool = True, name=str) -> str | None:
    """The footnote for ``*`` (and ``†``) rows: which groups are small, with the counts that decide the metric
    (None when none is); ``with_eo=False``: no ``†`` line (a table without the EO row); ``name``: how a group's
    name is written (:func:`md_prose` in Markdown)."""
    small, eo = small_groups(results, split), (small_eo_groups(results, split) if with_eo else {})
    out = []
    if small:
        listed = ", ".join(f"{name(n)} ({k})" for n, k in list(small.items())[:12]) + (
            " ..." if len(small) > 12 else "")
        out.append(f"* over groups of which {len(small)} have fewer than {_threshold(results)} {split} rows "
                   f"(--small-group): {listed}; figures over so few rows are noisy")
    if eo:
        listed = ", ".join(f"{name(n)} ({p} pos, {q} neg)" for n, (p, q) in list(eo.items())[:12]) + (
            " ..." if len(eo) > 12 else "")
        out.append(f"† the EO difference compares true- and false-positive rates, and {len(eo)} group(s) have fewer "
                   f"than {_threshold(results)} positives or negatives in {split}: {listed}")
    return "\n".join(out) or None


def _certified(r: dict) -> float | None:
    """The certificate's headline bound of a split's report (None without a certificate of version 2 or later:
    version 1's intervals under-covered)."""
    cert = r.get("certificate") or {}
    return (cert.get("certified_max_psi") if cert.get("interval_version", 1) >= certify.FIRST_VALID_VERSION
            else None)


def _min_group_acc(r: dict) -> float | None:
    vals = [g["accuracy"] for g in r["groups"].values() if g["accuracy"] is not None]
    return min(vals) if vals else None


def _fmt(v: Any, f: str) -> str:
    return "-" if v is None else f.format(v)


def summary_table(results: dict, split: str = "test") -> str:
    """Markdown table: dense vs pruned on one split."""
    dense, pruned = results["dense"][split], results["pruned"][split]
    sp = results["sparsity"]["achieved"]
    lines = [f"| {split} | dense | pruned ({md_text(results['method'])}) |", "|---|---:|---:|"]
    rows = _rows(results)
    for label, get, f in rows:
        lines.append(f"| {md_text(_row_label(results, label, split))} | {_fmt(get(dense, 0.0), f)} | "
                     f"{_fmt(get(pruned, sp), f)} |")
    note = small_groups_note(results, split, with_eo=len(rows) == len(ROWS), name=md_prose)
    if len(rows) < len(ROWS):
        note = ("DP and EO are left out: the groups are the classes, so a group's rate of one class is 0 or 1 by "
                "construction (per-class DP / EO below)") + (f"\n{note}" if note else "")
    return "\n".join(lines + ([f"\n{note}"] if note else []))


def _rows(results: dict) -> list:
    """The table's rows: without DP / EO when the groups are the classes (digits: a group's rate of "class 1"
    is 1 or 0 by construction, so DP / EO say nothing there; CWV / MCD are the rows to read)."""
    return [r for r in ROWS if not (_classes_are_groups(results) and r[0] in BINARY_ROWS)]


def _classes_are_groups(results: dict) -> bool:
    from fairprune_jax.reporting.tables import groups_are_classes
    return groups_are_classes(results)


def text_table(results: dict, split: str = "test") -> str:
    """The same table for a terminal (without DP / EO when the groups are the classes)."""
    dense, pruned = results["dense"][split], results["pruned"][split]
    sp = results["sparsity"]["achieved"]
    rows = _rows(results)
    labels = [_row_label(results, label, split) for label, _, _ in rows]
    w = max(36, *map(len, labels))
    head = f"{split + ' split':{w}s} {'dense':>10s} {'pruned':>10s}"
    lines = [head, "-" * len(head)]
    for lab, (_, get, f) in zip(labels, rows):
        lines.append(f"{lab:{w}s} {_fmt(get(dense, 0.0), f):>10s} {_fmt(get(pruned, sp), f):>10s}")
    note = small_groups_note(results, split, with_eo=len(rows) == len(ROWS))
    return "\n".join(lines + ([note] if note else []))


def per_class_line(results: dict, split: str = "test") -> str | None:
    """One line for a multi-class target: the pruned model's largest DP / EO over "class k vs the rest" and
    which class the headline DP / EO are of (None for a binary target or a run without per-class counts)."""
    pc = results.get("positive_class") or {}
    per = (results["pruned"].get(split) or {}).get("per_class_parity")
    if not per or pc.get("num_classes", 2) <= 2 or _classes_are_groups(results):
        return None
    dp, eo = "demographic_parity_difference", "equalized_odds_difference"

    def worst(key: str) -> str:
        return f"{_fmt(per[f'{key}_max'], '{:.4f}')} (class {per[f'{key}_max_class']!r})"
    return (f"DP / EO per class, each class vs the rest ({split}, pruned): max DP {worst(dp)}, max EO {worst(eo)}; "
            f"the table's DP / EO are class {pc['id']} ({pc['name']!r}) vs the rest")


def per_class_markdown(results: dict, split: str = "test") -> list[str]:
    """DP and EO of every class vs the rest, dense and pruned, with the maxima (empty for a binary target)."""
    pc = results.get("positive_class") or {}
    d = (results["dense"].get(split) or {}).get("per_class_parity")
    p = (results["pruned"].get(split) or {}).get("per_class_parity")
    if not d or not p or pc.get("num_classes", 2) <= 2:
        return []
    dp, eo = "demographic_parity_difference", "equalized_odds_difference"
    star = " *" if small_groups(results, split) else ""
    out = [f"## DP and EO of every class vs the rest ({split})", "",
           f"Demographic parity and equalized odds differences (between groups, worst case) with class k as the "
           f"positive class, for every k; the summary table's DP / EO are class {pc['id']} ({pc['name']!r}), "
           "marked `<-`.", "",
           f"| class | DP dense | DP pruned{star} | EO dense | EO pruned{star} |", "|---|---:|---:|---:|---:|"]
    for name in p[dp]:
        mark = " <-" if name == pc.get("name") else ""
        out.append(f"| {md_prose(name)}{mark} | {_fmt(d[dp].get(name), '{:.4f}')} | {_fmt(p[dp][name], '{:.4f}')} | "
                   f"{_fmt(d[eo].get(name), '{:.4f}')} | {_fmt(p[eo][name], '{:.4f}')} |")

    def mx(r: dict, key: str) -> str:
        return f"{_fmt(r[f'{key}_max'], '{:.4f}')} ({r[f'{key}_max_class']})"
    out.append(f"| **max over classes** | {mx(d, dp)} | {mx(p, dp)} | {mx(d, eo)} | {mx(p, eo)} |")
    note = small_groups_note(results, split)
    return out + ([f"\n{note}"] if star and note else []) + [""]


def degenerate_note(results: dict, split: str = "test") -> str | None:
    """A warning line when the pruned model predicts (nearly) one class for every row, else None."""
    p = results["pruned"].get(split, {})
    if not p.get("degenerate"):
        return None
    return (f"DEGENERATE MODEL: the pruned model predicts {p['top_prediction']!r} for "
            f"{p['top_prediction_share']:.1%} of the {split} rows; its fairness figures (DP / EO near 0) "
            "describe a constant classifier, not a fair one")


def certificate_markdown(results: dict, split: str = "test") -> list[str]:
    """The per-group certificate as Markdown lines (empty when the run has none)."""
    cert = results["pruned"].get(split, {}).get("certificate")
    if not cert:
        return []
    out = [f"## Certificate ({split}): psi_g <= eps = {cert['eps']:g} at {certify.level_text(cert['level'])} (simultaneous)", ""]
    if cert.get("interval_version", 1) < certify.FIRST_VALID_VERSION:
        out += ["- **made with interval version 1** (a normal approximation that under-covers small groups): "
                "rerun to get a certificate that keeps its level", ""]
    elif cert.get("certified_max_psi") is not None:
        out += [f"**{certify.headline(cert, md_prose)}.**", ""]
    out += [f"- {certify.summary_line(cert, md_prose)}",
            f"- intervals: {cert['interval']}",
            f"- share of {split} rows whose correctness changed between the dense and the pruned model (flip "
            f"rate): {_fmt(cert.get('flip_rate'), '{:.4f}')}; fewer flips give tighter intervals",
            f"- groups marked * have fewer than {cert['small_group_rows']} {split} rows; for EO, groups marked "
            f"† have fewer than {cert['small_group_rows']} positives or negatives", ""]
    for key, label in (("demographic_parity_difference", "demographic parity difference"),
                       ("equalized_odds_difference", "equalized odds difference")):
        e = cert[key]
        line = f"- {label}: {_fmt(e['value'], '{:.4f}')} [{e['low']:.4f}, {e['high']:.4f}]"
        if "verdict" in e:
            line += f" vs bound {e['bound']:g}: {e['verdict']}"
        out.append(line)
    out += ["", "| group | n | pruned accuracy [CI] | psi_g [CI] | psi_g at most (one-sided) | floor | flip rate | "
            "verdict |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, g in cert["groups"].items():
        if g["verdict"] is None:
            out.append(f"| {md_prose(name)} | 0 | - | - | - | - | - | no rows |")
            continue
        mark = ("*" if g["small"] else "") + ("†" if g.get("small_for_eo") else "")
        out.append(f"| {md_prose(name)}{mark} | {g['n']} | {g['accuracy']:.4f} [{g['accuracy_low']:.3f}, "
                   f"{g['accuracy_high']:.3f}] | {g['psi']:+.4f} [{g['low']:+.3f}, {g['high']:+.3f}] | "
                   f"{g.get('upper', g['high']):+.4f} | {_fmt(g.get('floor'), '{:.4f}')} | "
                   f"{_fmt(g.get('flip_rate'), '{:.4f}')} | "
                   f"{g['verdict']} |")
    out += ["", "[CI]: simultaneous over the groups (the verdicts read them); *at most (one-sided)*: the group's "
            "one-sided bound at the stated level, of which the certified max psi_g is the largest (one statement "
            "about the worst group needs no correction over groups); *floor*: that bound for a pruned model "
            "identical to the dense one on these rows; where a group's bound is close to it, more test rows, not a "
            "better model, would tighten it."]
    return out + [""]


def _compacted_text(sp: dict) -> str:
    """A structured run's physical size (``sparsity.compacted``), for a line that gives the masks' count."""
    c = sp.get("compacted")
    if not c:
        return ""
    return (f"; compacted (removed units' reader rows gone too): {c['params_fraction']:.4f} of the parameters, "
            f"FLOPs {_fmt(c.get('flops_fraction'), '{:.4f}')}")


def markdown_report(results: dict) -> str:
    r = results
    out = [f"# fairprune run: {r['method']} on {r['dataset']} ({r['model']})", "",
           f"- target sparsity {r['sparsity']['target']:.4f}, achieved {r['sparsity']['achieved']:.4f} of "
           f"prunable weights ({r['sparsity']['overall']:.4f} of all parameters); FLOPs remaining "
           f"{_fmt(r['sparsity'].get('flops_fraction'), '{:.4f}')}" + _compacted_text(r['sparsity']),
           f"- seed {r['seed']}; groups: {r['groups']['num_groups']} from {', '.join(r['groups']['attributes'])}; "
           f"sizes {r['sizes']}",
           f"- wall time {r['wall_time_s']:.1f} s", ""]
    if constraint_line(r):
        out.insert(-1, constraint_line(r))
    pc = r.get("positive_class")
    if pc and pc.get("num_classes", 2) > 2:
        out.insert(-1, f"- DP and EO are of class {pc['id']} ({pc['name']!r}) vs the rest ({pc['num_classes']} "
                       "classes; `--positive-class` chooses another)")
        if per_class_line(r):
            out.insert(-1, f"- {per_class_line(r)} (every class: the section below)")
    c = r.get("compact")
    if c and "error" not in c:
        out.insert(-1, f"- compacted model in `{c['path']}/`: {c['params_compact']} of {c['params_dense']} parameters, "
                       f"FLOPs {_fmt(c['flops_fraction'], '{:.4f}')} of dense; max |logit difference| to the masked "
                       f"model {_fmt(c['max_abs_logit_diff'], '{:.2g}')} ({c['check_rows']} test rows)")
    elif c:
        out.insert(-1, f"- compacted model not written: {c['error']}")
    note = degenerate_note(r)
    if note:
        out += [f"**{note}.**", ""]
    loss_note = r["pruned"].get("test", {}).get("accuracy_loss_note")
    if loss_note:
        out += [f"**{loss_note}.**", ""]
    for split in ("test", "val", "train"):
        if split in r["pruned"]:
            out += [summary_table(r, split), ""]
    out += per_class_markdown(r)
    out += certificate_markdown(r)
    if "val" in r["pruned"]:
        out += certificate_markdown(r, "val")
    out += ["## Per-group accuracy (test)", "", "| group | n | dense | pruned | psi_g |", "|---|---:|---:|---:|---:|"]
    d, p = r["dense"]["test"], r["pruned"]["test"]
    psi = (p.get("excess_accuracy_gap") or {}).get("per_group", {})
    small = set((p.get("certificate") or {}).get("small_groups", []))
    for name, g in p["groups"].items():
        out.append(f"| {md_prose(name)}{'*' if name in small else ''} | {int(g['n'] or 0)} | {_fmt(d['groups'][name]['accuracy'], '{:.4f}')} | "
                   f"{_fmt(g['accuracy'], '{:.4f}')} | {_fmt(psi.get(name), '{:+.4f}')} |")
    return "\n".join(out) + "\n"


def plot_group_accuracy(results: dict, path: Path, split: str = "test", max_groups: int = 40) -> None:
    """Bar chart of per-group accuracy, dense vs pruned, from 0 to 1 (the groups with the largest drops when
    there are more than ``max_groups``, and the title says so): :func:`figures.run_group_accuracy`."""
    from fairprune_jax.reporting import figures
    figures.run_group_accuracy(results, path, split=split, max_groups=max_groups, formats=("png",))


def constraint_line(results: dict) -> str | None:
    """A constrained run's setting and whether it was met on the data it was trained on (None otherwise)."""
    info = results.get("method_info") or {}
    eps = info.get("eps")
    if eps is None:
        return None
    where = info.get("constraint_data") or "train"
    line = f"- constraint: psi_g <= eps = {eps:g} for every group, read on {where} rows"
    train = ((results["pruned"].get("train") or {}).get("excess_accuracy_gap") or {}).get("max")
    if train is not None:
        line += f"; train max psi_g at the end {train:.4f}: {'met' if train <= eps else 'NOT met'}"
    sel = info.get("selection")
    if sel and sel.get("max_psi") is not None:
        rows = {"held-out": "held-out", "train": "training"}.get(sel.get("rows"), sel.get("rows"))
        line += (f"; {rows + ' ' if rows else ''}max psi_g of the selected checkpoint {sel['max_psi']:.4f}: "
                 f"{'met' if sel['feasible'] else 'NOT met'}")
    traj = info.get("trajectory") or {}
    mult = [abs(v) for row in traj.get("multipliers", []) for v in row if v is not None]
    if mult:
        line += f"; largest multiplier over the run {max(mult):.3g}"
        if max(mult) == 0:
            line += " (the constraints never acted: this run is plain fine-tuning)"
    return line


def plot_constraints(results: dict, path: Path, max_groups: int = 10) -> bool:
    """Multiplier and psi_g-estimate trajectories of a constrained run (``method_info.trajectory``).

    With many groups, the ``max_groups`` with the largest final multiplier are
    drawn. Returns False (and draws nothing) when the run has no trajectory.
    """
    traj = (results.get("method_info") or {}).get("trajectory")
    if not traj or not traj.get("steps"):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray(traj["steps"])
    mult = np.array([[np.nan if v is None else v for v in row] for row in traj["multipliers"]], dtype=float)
    est = np.array([[np.nan if v is None else v for v in row] for row in traj["estimate"]], dtype=float)
    final = np.nan_to_num(mult[-1], nan=-1.0)
    order = np.argsort(-final, kind="stable")[:max_groups]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i in order:
        axes[0].plot(steps, mult[:, i], lw=1.2, label=traj["groups"][i])
        axes[1].plot(steps, est[:, i], lw=1.2)
    eps = (results.get("method_info") or {}).get("eps")
    if eps is not None:
        axes[1].axhline(eps, color="gray", ls="--", lw=1, label=f"eps = {eps:g}")
        axes[1].legend(loc="upper right", fontsize=8)
    axes[0].set_xlabel("fine-tuning step")
    axes[0].set_ylabel("Lagrange multiplier")
    axes[1].set_xlabel("fine-tuning step")
    where = (results.get("method_info") or {}).get("constraint_data", "train")
    axes[1].set_ylabel(f"psi_g estimate read by the dual step ({where})")
    shown = "" if len(order) == len(traj["groups"]) else f" ({len(order)} of {len(traj['groups'])} groups)"
    axes[0].legend(loc="upper left", fontsize=7, ncol=2, title=f"group{shown}", title_fontsize=7)
    fig.suptitle(f"{results['method']} on {results['dataset']}: constraint trajectories")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float made valid JSON: NaN as ``null``, +-inf as the strings ``"inf"`` /
    ``"-inf"`` (an option such as ``multiplier_max = inf``, "no cap", keeps its meaning). Strict JSON has no
    such numbers, and a run must not be lost at its last step because one free-form record holds one."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
        return None if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file (strict JSON:
    :func:`json_safe`)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False))
    os.replace(tmp, path)


def write_outputs(results: dict, out: Path) -> dict[str, Path]:
    """``results.md``, ``group_accuracy.png``, for constrained runs ``constraints.png``, and ``results.json``
    last: a finished run (a grid's finished cell) is one whose results.json exists, so a process killed while
    writing leaves a run that is done again, not one that stays without its report. A plot that fails is said
    and skipped: it never costs the results."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "group_accuracy.png"}
    paths["md"].write_text(markdown_report(results))
    for key, draw, path in (("png", plot_group_accuracy, paths["png"]), ("constraints", plot_constraints,
                                                                         out / "constraints.png")):
        try:
            drawn = draw(results, path)
            if key == "constraints" and drawn:
                paths["constraints"] = path
        except Exception as e:      # noqa: BLE001 (matplotlib's errors are many; the results are written anyway)
            warn(f"{path.name} could not be drawn ({type(e).__name__}: {e}); the other outputs are written")
            paths.pop(key, None)
    write_json_atomic(results, paths["json"])
    return paths
