"""Tables a paper can use: readable column names, a dense row, structured vs unstructured marked, the best
value per column in bold, metrics that mean nothing for the setting left out, Markdown and LaTeX.

The machine-readable outputs (``results.csv``, ``results.json``) keep their snake_case columns; this module
only renders them. Which columns are left out, and why, is returned so the caller can say it under the table.
"""
from __future__ import annotations

from typing import Any

#: column -> (Markdown label, LaTeX label)
LABELS: dict[str, tuple[str, str]] = {
    "test_accuracy": ("Accuracy", "Acc."),
    "train_accuracy": ("Train accuracy", "Train acc."),
    "val_accuracy": ("Validation accuracy", "Val. acc."),
    "val_psi_upper": ("Certified max ψ_g (val)", r"Cert. $\max_g \psi_g$ (val)"),
    "val_dp_diff": ("DP difference (val)", "DP diff. (val)"),
    "val_eo_diff": ("EO difference (val)", "EO diff. (val)"),
    "dense_test_accuracy": ("Dense accuracy", "Dense acc."),
    "accuracy_drop": ("Accuracy drop", "Acc. drop"),
    "train_max_psi": ("Max ψ_g (train)", r"$\max_g \psi_g$ (train)"),
    "test_max_psi": ("Max ψ_g (test)", r"$\max_g \psi_g$ (test)"),
    "train_psi_spread": ("ψ_g spread (train)", r"$\psi_g$ spread (train)"),
    "test_psi_spread": ("ψ_g spread (test)", r"$\psi_g$ spread (test)"),
    "test_group_acc_gap": ("Group accuracy gap", "Group acc. gap"),
    "test_cwv": ("CWV", "CWV"),
    "test_mcd": ("MCD", "MCD"),
    "test_dp_diff": ("DP difference", "DP diff."),
    "test_eo_diff": ("EO difference", "EO diff."),
    "test_certified_share": ("Certified share", "Cert. share"),
    "test_violated_groups": ("Violated groups", "Viol. groups"),
    "test_psi_upper": ("Certified max ψ_g", r"Cert. $\max_g \psi_g$"),
    "test_psi_floor": ("Certifiable floor", r"Floor"),
    "test_flip_rate": ("Flip rate", r"Flips"),
    "no_violated_group": ("Seeds w/o violated group", "No viol."),
    "degenerate": ("Degenerate", "Degen."),
    "train_psi_within_tol": ("max ψ_g ≤ ε (train)", r"$\max\psi_g \le \varepsilon$ (train)"),
    "test_psi_within_tol": ("max ψ_g ≤ ε (test)", r"$\max\psi_g \le \varepsilon$ (test)"),
}

HIGHER_IS_BETTER = {"test_accuracy", "train_accuracy", "val_accuracy", "test_certified_share", "no_violated_group",
                    "train_psi_within_tol", "test_psi_within_tol"}
#: never marked best (not a quality) or not comparable across rows
NOT_RANKED = {"degenerate", "dense_test_accuracy", "test_psi_floor"}
#: meaningless when the protected groups are the classes (P(pred = positive class) per class)
BINARY_PARITY = ["test_dp_diff", "test_eo_diff", "val_dp_diff", "val_eo_diff"]
#: columns whose dense value is 0 by definition (psi compares a model with the dense one) or undefined
NOT_FOR_DENSE = {"train_max_psi", "test_max_psi", "train_psi_spread", "test_psi_spread", "test_certified_share",
                 "test_violated_groups", "test_psi_upper", "val_psi_upper", "test_psi_floor", "test_flip_rate", "no_violated_group", "train_psi_within_tol",
                 "test_psi_within_tol", "accuracy_drop"}


def md_text(value: Any) -> str:
    """``value`` as the text of one Markdown table cell: a ``|`` (an intersectional group ``Male|White``) would
    split the cell and shift every column after it, and ``<`` / ``>`` (a class ``<=50K``) would be read as HTML."""
    return (str(value).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\r", " ").replace("\n", " "))


def md_prose(value: Any) -> str:
    """``value`` (a group or class name) inside a Markdown sentence: :func:`md_text` with the emphasis and code
    marks escaped too (a group named ``*bold*`` stays a name)."""
    out = md_text(str(value).replace("\\", "\\\\"))
    for ch in "*_`[]":
        out = out.replace(ch, "\\" + ch)
    return out


def label(col: str, latex: bool = False) -> str:
    return LABELS.get(col, (col.replace("_", " "), col.replace("_", r"\_")))[1 if latex else 0]


def groups_are_classes(cell: dict) -> bool:
    """The protected groups of a run are its classes (digits; UTKFace race with race protected)."""
    g = cell.get("groups") or {}
    attrs = g.get("attributes")
    if attrs == ["class"]:
        return True
    if list(g.get("names") or []) != list(cell.get("classes") or [None]):
        return False
    # the same names: the groups are the classes when the protected attribute is the target (UTKFace race with
    # race protected), not when a 0 / 1 protected column meets a 0 / 1 target
    target = (cell.get("dataset_meta") or {}).get("target")
    return attrs is None or (target is not None and attrs == [target])


def choose_columns(cols: list[str], agg: list[dict], *, classes_as_groups: bool, asked: bool = False,
                   ) -> tuple[list[str], list[str]]:
    """``(kept, notes)``: ``cols`` without the ones that say nothing here, and one note per removal.

    Unless ``asked`` (the user listed the columns): DP / EO when the groups are the classes, and the group
    accuracy gap when it equals MCD in every row (it does when the groups are the classes).
    """
    if asked:
        return list(cols), []
    kept, notes = list(cols), []
    if classes_as_groups and any(c in kept for c in BINARY_PARITY):
        kept = [c for c in kept if c not in BINARY_PARITY]
        notes.append("DP and EO differences are left out: the protected groups are the classes, so 'positive "
                      "rate per group' compares one class with the others, not groups of people "
                      "(list them under `columns` to show them anyway).")
    if "test_group_acc_gap" in kept and "test_mcd" in kept:
        same = all(((a.get("test_group_acc_gap") or {}).get("mean") is None)
                   == ((a.get("test_mcd") or {}).get("mean") is None)
                   and abs(((a.get("test_group_acc_gap") or {}).get("mean") or 0.0)
                           - ((a.get("test_mcd") or {}).get("mean") or 0.0)) < 1e-9 for a in agg)
        if same and agg:
            kept.remove("test_group_acc_gap")
            notes.append("The group accuracy gap equals MCD in every row (groups = classes), so only MCD is shown.")
    return kept, notes


def _value(a: dict, col: str) -> tuple[float | None, float | None]:
    v = a.get(col) or {}
    return v.get("mean"), v.get("std")


def seed_count(a: dict, col: str) -> str:
    """``k/n``: the seeds where a yes / no column of aggregate row ``a`` is true, out of those where it is known
    (a seed whose flag is unknown, as in a cell older than it, is neither), with the unknown ones named."""
    v = a.get(col) or {}
    n = int(v.get("n", a.get("n_seeds", 1)))
    unknown = int(a.get("n_seeds", n)) - n
    return f"{round(v['mean'] * n)}/{n}" + (f" ({unknown} unknown)" if unknown > 0 else "")


def degenerate_label(a: dict) -> str:
    """The method's name, marked ``(DEGENERATE k/n)`` when some seeds ended with a degenerate model."""
    d = (a.get("degenerate") or {}).get("mean")
    return a["method"] + (f" (DEGENERATE {seed_count(a, 'degenerate')})" if d else "")


def _is_count(col: str, flags: set[str]) -> bool:
    return col.endswith("within_tol") or col in flags


def best_rows(agg: list[dict], cols: list[str]) -> dict[str, set[int]]:
    """Per column, the indices of the rows with the best mean among the rows of the same sparsity (and
    dataset); ties all marked; degenerate rows never win."""
    out: dict[str, set[int]] = {}
    blocks: dict[tuple, list[int]] = {}
    for i, a in enumerate(agg):
        blocks.setdefault((a.get("dataset"), a.get("sparsity")), []).append(i)
    for c in cols:
        if c in NOT_RANKED:
            continue
        pick = max if c in HIGHER_IS_BETTER else min
        for idx in blocks.values():
            vals = [(i, _value(agg[i], c)[0]) for i in idx
                    if _value(agg[i], c)[0] is not None and not ((agg[i].get("degenerate") or {}).get("mean") or 0)]
            if len(vals) < 2:
                continue
            best = pick(v for _, v in vals)
            out.setdefault(c, set()).update(i for i, v in vals if abs(v - best) <= 1e-12)
    return out


def _fmt(col: str, a: dict, flags: set[str], latex: bool) -> str:
    m, s = _value(a, col)
    if m is None:
        return "--" if latex else "–"
    if _is_count(col, flags):
        return seed_count(a, col)
    f = "{:.5f}" if "cwv" in col else "{:.3f}" if col.endswith("violated_groups") else "{:.4f}"
    pm = r" $\pm$ " if latex else " ± "
    return f.format(m) + ("" if s is None or a.get("n_seeds", 1) < 2 else pm + f.format(s))


def render(agg: list[dict], cols: list[str], *, dense: dict | None = None, structured: dict[str, bool] | None = None,
           constraint: dict[str, str] | None = None, flags: set[str] | None = None, latex: bool = False,
           lead: list[str] = ("method", "sparsity")) -> str:
    """One table (Markdown, or a LaTeX ``tabular`` with booktabs rules) over aggregate rows.

    ``lead``: the leading columns (``dataset`` may come first). ``structured[method]``: marks the pruning
    kind. ``constraint[method]``: the constraint setting shown (``eps``). ``dense``: a dense-model row first.
    Bold: the best mean of each column among the non-degenerate pruned rows of the same sparsity. A row's
    ``small`` (column -> True) stars the cells whose value rests on a small group (the caller's note says so);
    the numbers stay as they are.
    """
    structured, constraint, flags = structured or {}, constraint or {}, set(flags or ())
    show_kind = bool(structured) and len(set(structured.values())) > 1
    show_con = any(constraint.values())
    head = [{"method": "Method", "sparsity": "Sparsity", "dataset": "Dataset"}[k] for k in lead]
    head += (["Pruning"] if show_kind else []) + ["Seeds"] + (["Constraint"] if show_con else [])
    head += [label(c, latex) for c in cols]
    best = best_rows(agg, cols)
    rows = []
    if dense is not None:
        lead_cells = {"method": "dense", "sparsity": "0", "dataset": dense.get("dataset", "")}
        cells = [lead_cells[k] for k in lead] + (["--" if latex else "–"] if show_kind else [])
        cells += [str(dense["n_seeds"])] + (["--" if latex else "–"] if show_con else [])
        cells += [("--" if latex else "–") if c in NOT_FOR_DENSE else _fmt(c, dense, flags, latex)
                  + _star(dense, c, latex) for c in cols]
        rows.append(cells)
    for i, a in enumerate(agg):
        name = degenerate_label(a)
        lead_cells = {"method": name, "sparsity": f"{a['sparsity']:g}", "dataset": a.get("dataset", "")}
        cells = [lead_cells[k] for k in lead]
        if show_kind:
            cells.append("structured" if structured.get(a["method"]) else "unstructured")
        cells.append(str(a["n_seeds"]))
        if show_con:
            cells.append(constraint.get(a["method"]) or ("--" if latex else "–"))
        for c in cols:
            v = _fmt(c, a, flags, latex)
            if i in best.get(c, ()):
                v = rf"\textbf{{{v}}}" if latex else f"**{v}**"
            cells.append(v + _star(a, c, latex))
        rows.append(cells)
    if latex:
        esc = _tex
        spec = "l" * (len(lead) + show_kind) + "r" + "l" * show_con + "r" * len(cols)
        out = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(esc(h) for h in head) + r" \\", r"\midrule"]
        for j, r in enumerate(rows):
            out.append(" & ".join(esc(c) for c in r) + r" \\")
            if j == 0 and dense is not None:
                out.append(r"\midrule")
        return "\n".join(out + [r"\bottomrule", r"\end{tabular}"])
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---" if k in ("method", "dataset") or h in ("Pruning", "Constraint") else "---:"
                          for k, h in zip(list(lead) + [None] * len(head), head)) + "|"]
    out += ["| " + " | ".join(md_text(c) if k < len(lead) else c for k, c in enumerate(r)) + " |" for r in rows]
    return "\n".join(out)


def _star(row: dict, col: str, latex: bool) -> str:
    """`` *`` (LaTeX ``$^*$``) after a value that rests on a small group, else nothing."""
    if not (row.get("small") or {}).get(col) or (row.get(col) or {}).get("mean") is None:
        return ""
    return r"$^*$" if latex else " *"


_UNICODE_TEX = {"ψ_g": r"$\psi_g$", "≤": r"$\le$", "λ": r"$\lambda$", "τ": r"$\tau$", "ε": r"$\varepsilon$",
                "±": r"$\pm$", "–": "--"}


#: LaTeX's special characters in plain text (braces first: the later replacements write braces of their own).
_TEX_SPECIAL = [("{", r"\{"), ("}", r"\}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")]


def _tex(s: str) -> str:
    """Plain text for LaTeX (every special character escaped: a variant named ``bifp#2`` or ``a~b`` compiles;
    a few symbols as math); cells that already hold LaTeX (a ``$`` or a backslash) pass unchanged."""
    if "$" in s or "\\" in s:
        return s
    for k, v in _TEX_SPECIAL:
        s = s.replace(k, v)
    for k, v in _UNICODE_TEX.items():
        s = s.replace(k.replace("_", r"\_"), v)
    return s


def latex_document(title: str, table: str, notes: list[str]) -> str:
    """A LaTeX ``table`` float (needs ``\\usepackage{booktabs}``) with the notes as its caption."""
    import re
    caption = re.sub(r"`([^`]*)`", r"\1", " ".join(notes))
    caption = _tex(caption.replace("$", ""))
    return "\n".join([f"% {title}", "% needs \\usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
                      r"\small", table, rf"\caption{{{caption}}}", r"\end{table}", ""])


def constraint_label(method: str, opts: dict[str, Any]) -> str | None:
    """What a method constrains, with its settings, for the table (None: no constraint)."""
    if method == "ceag":
        where = opts.get("constraint_data", "train")
        return f"ψ_g ≤ {opts['eps']:g} ({where})"
    if method == "el":
        return "L_g = L"
    if method in ("bifp", "prune_then_fair", "fair_then_prune") and "constraint" in opts:
        mode = opts.get("fairness_mode", "constraint")
        if mode == "none":                  # cross-entropy only: no constraint, whatever tau says
            return None
        if mode == "penalty" or opts["constraint"] in (None, "none", "penalty"):
            return f"penalty λ={opts.get('lam'):g}" if opts.get("lam") is not None else None
        return f"{opts['constraint']}, τ={opts.get('tau'):g}"
    if method == "fair_scratch" and opts.get("lam"):
        warm = f", warm-up {opts['lam_warmup']:g}" if opts.get("lam_warmup") else ""
        return f"penalty λ={opts['lam']:g}{warm}"
    if method == "fair_scratch" and "lam" in opts and opts["lam"] is None:
        return "penalty, default λ"        # no finished cell to read the λ it used from
    return None
