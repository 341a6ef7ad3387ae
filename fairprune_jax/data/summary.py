"""A readable summary of a :class:`Dataset`: split sizes, groups, label balance, small-group warnings.

``summarize`` returns plain JSON-friendly data; ``format_summary`` renders it
as a text table (used by ``fairprune data-summary``).
"""
from __future__ import annotations

import numpy as np

from fairprune_jax.data.base import Dataset

_SPLIT_ORDER = ("train", "val", "test")


def summarize(ds: Dataset, small_group_threshold: int = 30) -> dict:
    """Sizes per split, group counts per split, label balance per group, and warnings.

    Returns a dict with ``name``, ``input_shape``, ``class_names``,
    ``group_names``, ``group_attrs``, ``splits`` (``{split: {"size", "label_counts"}}``),
    ``groups`` (one entry per group id: ``id``, ``name``, ``counts`` per split,
    ``label_counts`` per split, ``label_balance`` = class fractions in train),
    ``small_group_threshold`` and ``warnings`` (groups with fewer than
    ``small_group_threshold`` rows in some split, groups or classes absent
    from a split).
    """
    present = ds.splits()
    splits = {k: present[k] for k in _SPLIT_ORDER if k in present}
    k_cls, k_grp = ds.num_classes, ds.num_groups
    out: dict = {
        "name": ds.name,
        "input_shape": list(ds.input_shape),
        "num_classes": k_cls,
        "num_groups": k_grp,
        "class_names": list(ds.class_names),
        "group_names": list(ds.group_names),
        "group_attrs": list(ds.group_attrs),
        "small_group_threshold": int(small_group_threshold),
        "splits": {},
        "groups": [],
        "warnings": [],
    }
    table = {}  # split -> (k_grp, k_cls) counts
    for name, s in splits.items():
        cell = np.zeros((k_grp, k_cls), np.int64)
        np.add.at(cell, (s.g.astype(np.int64), s.y.astype(np.int64)), 1)
        table[name] = cell
        out["splits"][name] = {"size": len(s), "label_counts": {c: int(v) for c, v in
                                                                zip(ds.class_names, cell.sum(0))}}
    for gi, gname in enumerate(ds.group_names):
        counts = {name: int(table[name][gi].sum()) for name in splits}
        label_counts = {name: {c: int(v) for c, v in zip(ds.class_names, table[name][gi])} for name in splits}
        train_row = table["train"][gi]
        total = train_row.sum()
        balance = {c: (float(v / total) if total else 0.0) for c, v in zip(ds.class_names, train_row)}
        out["groups"].append({"id": gi, "name": gname, "counts": counts, "label_counts": label_counts,
                              "label_balance": balance})
        for name, n in counts.items():
            if n == 0:
                out["warnings"].append(f"group {gname!r} has no rows in the {name} split")
            elif n < small_group_threshold:
                out["warnings"].append(f"group {gname!r} has only {n} rows in the {name} split "
                                       f"(< {small_group_threshold}); its metrics will be noisy")
    for name, cell in table.items():
        absent = [c for c, v in zip(ds.class_names, cell.sum(0)) if v == 0]
        if absent:
            shown = ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else "")
            out["warnings"].append(f"{len(absent)} class(es) have no rows in the {name} split: {shown}")
    return out


def _fmt_balance(balance: dict[str, float], class_names: list[str]) -> str:
    if len(class_names) == 2:
        return f"{100 * balance[class_names[1]]:.1f}% {class_names[1]}"
    if len(class_names) <= 5:
        return " ".join(f"{100 * balance[c]:.0f}" for c in class_names)
    top = max(class_names, key=lambda c: balance[c])
    return f"top {top} {100 * balance[top]:.0f}%"


def format_summary(d: dict, max_groups: int | None = 200, max_warnings: int = 30) -> str:
    """Render :func:`summarize`'s dict as a text report with a per-group table."""
    split_names = list(d["splits"])
    lines = [f"dataset: {d['name']}   input shape: {tuple(d['input_shape'])}   "
             f"classes: {d['num_classes']}   groups: {d['num_groups']} (by {', '.join(d['group_attrs'])})"]
    sizes = "   ".join(f"{s}: {d['splits'][s]['size']:,}" for s in split_names)
    lines.append(f"split sizes: {sizes}")
    cls = d["class_names"]
    shown_cls = cls if len(cls) <= 10 else cls[:10]
    lines.append("labels per split: " + "; ".join(
        f"{s} " + ", ".join(f"{c}={d['splits'][s]['label_counts'][c]:,}" for c in shown_cls)
        + (" ..." if len(cls) > len(shown_cls) else "") for s in split_names))
    if 2 < len(cls) <= 5:
        bal_head = "train label % (" + " ".join(cls) + ")"
    elif len(cls) == 2:
        bal_head = f"train % {cls[1]}"
    else:
        bal_head = "train label balance"
    groups = d["groups"]
    rows = groups if max_groups is None else groups[:max_groups]
    name_w = max([len("group")] + [len(g["name"]) for g in rows])
    num_w = {s: max(len(s), *(len(f"{g['counts'][s]:,}") for g in rows)) if rows else len(s) for s in split_names}
    small = d["small_group_threshold"]
    header = f"{'id':>4}  {'group':<{name_w}}  " + "  ".join(f"{s:>{num_w[s]}}" for s in split_names) \
        + f"  {bal_head}"
    lines += ["", header, "-" * len(header)]
    for g in rows:
        flag = " *" if any(g["counts"][s] < small for s in split_names) else ""
        lines.append(f"{g['id']:>4}  {g['name']:<{name_w}}  "
                     + "  ".join(f"{g['counts'][s]:>{num_w[s]},}" for s in split_names)
                     + f"  {_fmt_balance(g['label_balance'], cls)}{flag}")
    if len(rows) < len(groups):
        lines.append(f"... {len(groups) - len(rows)} more groups")
    warns = d["warnings"]
    if warns:
        lines += ["", f"warnings ({len(warns)}; * marks groups with fewer than {small} rows in some split):"]
        lines += [f"  - {w}" for w in warns[:max_warnings]]
        if len(warns) > max_warnings:
            lines.append(f"  ... and {len(warns) - max_warnings} more")
    return "\n".join(lines)
