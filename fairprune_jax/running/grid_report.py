"""What a grid writes once its cells are collected: ``results.csv`` / ``.json``, the Markdown and LaTeX tables
with their notes (columns chosen for the setting, structured rows marked, constraints and where settings
were chosen, small groups starred with a legend) and the figures (trade-off, metrics vs sparsity, per-group
change). :func:`markdown_table` / :func:`format_cell` are the plain table ``fairprune compare`` prints.
"""
from __future__ import annotations

import csv
import dataclasses
import json

from fairprune_jax.core.config import RunConfig
from fairprune_jax.core.notices import warn
from fairprune_jax.metrics import certify
from fairprune_jax.reporting import figures, paired, tables
from fairprune_jax.reporting.report import json_safe
from fairprune_jax.reporting.tables import md_text
from fairprune_jax.running.grid import FLAG_COLUMNS, CompareConfig, cell_dir, chosen_on_kind


def small_legend(table_rows: list[dict], cols: list[str], limits: set[int] | None = None) -> str | None:
    """The note under a table saying what ``*`` means: None when no shown cell of ``table_rows`` (aggregate
    rows, the dense row) is starred. ``limits``: the runs' ``small_group`` thresholds."""
    if not any(c in (r.get("small") or {}) for r in table_rows for c in cols):
        return None
    lim = " / ".join(str(x) for x in sorted(limits or {RunConfig.small_group}))
    return (f"`*` = in at least one seed the value rests on a small group, one with fewer than {lim} of the rows "
            "that decide the value (the runs' `small_group`): rows of the column's split, except for the EO "
            "difference, whose TPR side counts a group's positives and FPR side its negatives. The group "
            "attaining a maximum (max ψ_g, ψ_g upper bound), either end of a max - min gap (ψ_g spread, group "
            "accuracy gap, DP and EO differences; MCD when the groups are the classes), a violated group "
            "(violated groups), any group (certified share; CWV when the groups are the classes); figures over "
            "so few rows are mostly noise.")


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
        lines.append(f"| {md_text(method_label(a))} | {a['sparsity']:g} | {a['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_label(agg_row: dict) -> str:
    """The method name, marked when some seeds ended with a degenerate (near-constant) model."""
    return tables.degenerate_label(agg_row)


def format_cell(col: str, agg_row: dict) -> str:
    """``mean ± std`` of an aggregate column (``k/n`` seeds for the within-tolerance ones, ``-`` if missing)."""
    v = agg_row.get(col) or {}
    if v.get("mean") is None:
        return "-"
    star = " *" if (agg_row.get("small") or {}).get(col) else ""
    if col.endswith("within_tol") or col in FLAG_COLUMNS:
        return tables.seed_count(agg_row, col) + star
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
        used = sorted({r["certify_eps"] for r in rows if r.get("certify_eps") is not None})
        cert = ("the test certificate of every method uses it" if used in ([], [cc.tolerance]) else
                "the test certificates use ε = " + " / ".join(f"{e:g}" for e in used) + " (`[run] certify_eps`)")
        out.append(f"- Grid tolerance ε = {cc.tolerance:g}: the `max ψ_g ≤ ε (train)` column uses it; {cert}.")
    return out


def certificate_settings(rows: list[dict]) -> tuple[list[float], list[float]]:
    """The distinct bounds eps and confidence levels the cells' test certificates were made at (sorted)."""
    eps = sorted({float(r["certify_eps"]) for r in rows if r.get("certify_eps") is not None})
    levels = sorted({float(r["certify_level"]) for r in rows if r.get("certify_level") is not None})
    return eps, levels


def mixed_certificate_note(rows: list[dict]) -> str | None:
    """A warning when the cells' certificates were made at different eps or levels (the certified share and
    violated-group columns then compare unlike statements), naming which entries used which; else None."""
    eps, levels = certificate_settings(rows)
    if len(eps) < 2 and len(levels) < 2:
        return None
    by: dict[tuple, list[str]] = {}
    for r in rows:
        if r.get("certify_eps") is None:
            continue
        key = (float(r["certify_eps"]), float(r.get("certify_level") or 0.95))
        if r["method"] not in by.setdefault(key, []):
            by[key].append(r["method"])
    parts = "; ".join(f"ε = {e:g} at {certify.level_text(lv)}: {', '.join(ms)}" for (e, lv), ms in sorted(by.items()))
    return (f"**The cells' certificates were made at different bounds or levels ({parts}).** The certified share, "
            "violated-group and no-violated-group columns compare unlike statements across them (the certified "
            "max ψ_g depends on the level only); set one `tolerance` (or `[run] certify_eps` and "
            "`certify_level`) for the whole grid to compare them.")


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


def mixed_dense_note(rows: list[dict]) -> str | None:
    """A note when a seed's cells were pruned from more than one dense model (their dense test accuracies
    differ): the grid's paired comparisons assume one dense model per seed."""
    by_seed: dict = {}
    for r in rows:
        by_seed.setdefault(r["seed"], set()).add(r.get("dense_test_accuracy"))
    mixed = {s: sorted(v) for s, v in by_seed.items() if len({x for x in v if x is not None}) > 1}
    if not mixed:
        return None
    detail = "; ".join(f"seed {s}: {', '.join(f'{x:.5f}' for x in v if x is not None)}" for s, v in sorted(mixed.items()))
    return (f"**Not one dense model per seed**: the cells of {len(mixed)} seed(s) were pruned from different dense "
            f"models (dense test accuracy {detail}), so their paired differences are not paired; rerun those "
            "cells on one dense model per seed.")


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
    (cc.out / "results.json").write_text(json.dumps(json_safe({"name": cc.name, "dataset": cc.dataset, "rows": rows,
                                                               "aggregate": agg, "dense": dense,
                                                               "chosen_on": cc.chosen_on}), indent=2, allow_nan=False))
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
    for mixed in (mixed_certificate_note(rows), mixed_dense_note(rows)):
        if mixed:
            notes.append(mixed)
            warn(mixed.replace("**", ""))
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
    ranked = [c for c in dict.fromkeys(("test_accuracy", "test_psi_upper", cc.fairness_metric, "test_eo_diff",
                                        "test_dp_diff", "test_mcd")) if c in cols and c.startswith("test_")]
    md += paired.paired_section(rows, list(cc.methods), list(cc.sparsities), ranked, tables.label)
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
        eps, levels = certificate_settings(rows)
        lv = " / ".join(certify.level_text(x) for x in levels) or certify.level_text(0.95)
        at = f" ε = {' / '.join(f'{e:g}' for e in eps)}" if eps else " eps"
        md += [f"Certificate columns (test, simultaneous {lv} intervals): "
               f"certified share (`test_certified_share`) = share of groups whose psi_g interval lies below{at}; "
               f"certified max ψ_g (`test_psi_upper`) = the largest of the groups' one-sided {lv} upper bounds of "
               "ψ_g (each at the marginal level: the group with the largest true ψ_g is under its own bound with "
               f"{lv} confidence, so no correction over groups is needed), i.e. with {lv} confidence no group lost "
               "more than this beyond the overall loss (the number to rank methods by; it sits below the "
               "simultaneous intervals' worst upper end; empty for cells whose "
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


def level_label(rows: list[dict]) -> str:
    """The certificates' confidence level(s) in words ("95%", or "95% / 99%" for a grid that mixes them)."""
    return " / ".join(certify.level_text(x) for x in certificate_settings(rows)[1]) or certify.level_text(0.95)


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
                         metric_label=_metric_label("test_psi_upper") + f" ({level_label(rows)} upper bound)",
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
