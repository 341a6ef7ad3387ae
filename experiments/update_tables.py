"""Rewrite the "## Tables" section of experiments/README.md from the finished cells of each comparison.

    python experiments/update_tables.py            # every table
    python experiments/update_tables.py NAME ...   # only these comparisons' tables (or "headline"), the others
                                                   # left as they are

Trains nothing: every table is read back from ``experiments/results/NAME/cells`` (what
``fairprune compare --config experiments/NAME.toml`` wrote) and summarized with the same code that
writes each comparison's ``results.md``, restricted to the columns that matter for that experiment.
"""
from __future__ import annotations

import sys
from pathlib import Path

from fairprune_jax.running.compare import collect, load_config, markdown_table

HERE = Path(__file__).resolve().parent
PSI = ["test_accuracy", "train_max_psi", "test_max_psi", "train_psi_spread", "test_psi_spread"]
GROUP = ["test_accuracy", "accuracy_drop", "test_dp_diff", "test_eo_diff", "test_group_acc_gap"]
CLASS = ["test_accuracy", "test_cwv", "test_mcd"]
BIFP = GROUP + ["degenerate"]
CERT = ["test_accuracy", "train_max_psi", "test_max_psi", "test_psi_upper", "test_certified_share",
        "test_violated_groups", "no_violated_group"]
# the certified bound (the column to rank by), the split's floor, the flip rate, and the same
# bound on the validation split (what settings may be chosen on)
CERT2 = ["test_accuracy", "test_psi_upper", "test_psi_floor", "test_max_psi", "train_max_psi", "test_flip_rate",
         "test_certified_share", "val_psi_upper"]

# (config, title, columns)
TABLES = [
    ("certify_v4_utkface_race_gender_ft8", "Certified bound (version 4, the budget chosen on validation): CEAG vs NFT on "
                                           "UTKFace race, protected race x gender, 90%, 8 fine-tuning epochs (chosen), "
                                           "with the distillation measurement", CERT2),
    ("certify_v4_utkface_race_gender_confirm", "Certified bound (version 4): the chosen entry and NFT on three new seeds, "
                                               "UTKFace race x gender, 8 fine-tuning epochs", CERT2),
    ("certify_v4_utkface_race_gender", "Certified bound (version 4): UTKFace race x gender, 6 fine-tuning epochs", CERT2),
    ("certify_v4_utkface_race_gender_ft4", "Certified bound (version 4): UTKFace race x gender, 4 fine-tuning epochs",
     CERT2),
    ("certify_v4_utkface_race_ft8", "Certified bound (version 4): UTKFace race, 8 fine-tuning epochs", CERT2),
    ("certify_v4_utkface_race", "Certified bound (version 4): UTKFace race, 6 fine-tuning epochs", CERT2),
    ("certify_v4_utkface_race_ft4", "Certified bound (version 4): UTKFace race, 4 fine-tuning epochs", CERT2),
    ("certify_v4_utkface_race_confirm", "Certified bound (version 4): the chosen entry and NFT on three new seeds, "
                                        "UTKFace race", CERT2),
    ("certify_v3_utkface_race", "Certified bound (version 3): CEAG aimed at the headline, targets planned again, vs NFT on "
                                "UTKFace race, 90%, E = 0.02 (new dense models)", CERT2),
    ("certify_v3_utkface_race_gender", "Certified bound (version 3): CEAG aimed at the headline, targets planned again, vs "
                                       "NFT on UTKFace race, protected race x gender, 90%, E = 0.02 (new dense models)",
     CERT2),
    ("certify_v2_utkface_race", "Certified bound (version 3): certified max psi_g of CEAG (+ distillation) vs NFT on UTKFace "
                                "race, 90%, E = 0.02", CERT2),
    ("certify_v2_utkface_race_gender", "Certified bound (version 3): CEAG (+ distillation) vs NFT on UTKFace race, protected "
                                       "race x gender, 90%, E = 0.02", CERT2),
    ("certify_v2_digits", "Certified bound (version 3): the default ceag vs nft on digits, 90% (floor 0.076)", CERT2),
    ("certify_v2_digits_seeds", "Certified bound (version 3): the default ceag vs nft on digits, 90%, ten seeds",
     CERT2),
    ("certify_v2_adult_sex_race", "Certified bound (version 3): the default ceag vs nft on Adult, protected sex x race, 90%",
     CERT2),
    ("certify_utkface_race", "Certificate: CEAG (held-out constraints) vs NFT on UTKFace race, eps = 0.02", CERT),
    ("certify_utkface_race_95", "Certificate: CEAG variants vs NFT on UTKFace race at 95%, eps = 0.02", CERT),
    ("certify_utkface_race_ft6", "Certificate with 6 fine-tuning epochs instead of 4: CEAG (train buffers, eps - 1 "
                                 "pt) vs NFT on UTKFace race at 90%, eps = 0.02", CERT),
    ("certify_utkface_race_95_ft6", "Certificate with 6 fine-tuning epochs: CEAG (train buffers, eps - 1 pt) vs NFT "
                                    "on UTKFace race at 95%, eps = 0.02", CERT),
    ("certify_utkface_race_gender_ft6", "Certificate with 6 fine-tuning epochs: CEAG (train buffers, eps - 1 pt) vs "
                                        "NFT on UTKFace race, protected race x gender, eps = 0.02", CERT),
    ("certify_utkface_race_ft10", "Certificate with 10 fine-tuning epochs instead of 4: CEAG (train buffers, eps - 1 "
                                  "pt) vs NFT on UTKFace race at 90%, eps = 0.02", CERT),
    ("certify_utkface_race_gender", "Certificate: CEAG (held-out constraints) vs NFT on UTKFace race, protected "
                                    "race x gender, eps = 0.02", CERT),
    ("ceag_digits_heldout", "ceag's held-out default vs the paper's train buffers on digits (136 held-out rows), 90%, "
                            "eps = 0.02", CERT),
    ("fairgrape_utkface_race", "FairGRAPE vs CEAG vs NFT on UTKFace race, 90%, eps = 0.02 (issue 18)", CERT),
    ("ceag_utkface_race", "CEAG vs NFT vs EL on UTKFace, target race, protected race (issue: CEAG)", PSI),
    ("ceag_utkface_race_gender", "CEAG vs NFT vs EL on UTKFace, target race, protected race x gender", PSI),
    ("ceag_utkface_age_gender", "Hundreds of groups: UTKFace age in years x gender (201 groups)",
     ["test_accuracy", "train_max_psi", "test_max_psi", "test_cwv"]),
    ("bifp_adult_sex", "BiFP on Adult (MLP, structured), protected sex", BIFP),
    ("bifp_adult_ablation", "BiFP ablation on Adult (protected sex), 80% structured", BIFP),
    ("bifp_adult_sex_race", "BiFP on Adult (MLP, structured), protected sex x race (10 groups)", BIFP),
    ("bifp_digits", "BiFP on digits (MLP, structured; classes = groups)", CLASS + ["accuracy_drop", "degenerate"]),
    ("bifp_digits_seeds", "BiFP vs structured magnitude on digits, 10 seeds (issue 12)",
     CLASS + ["accuracy_drop", "degenerate"]),
    ("bifp_adult_sex_race_seeds", "BiFP vs structured magnitude on Adult, protected sex x race, 10 seeds (issue 12)",
     BIFP),
    ("bifp_utkface_gender_race", "BiFP on UTKFace (CNN, structured), target gender, protected race", BIFP),
    ("bifp_utkface_gender_race_mobilenet", "BiFP on UTKFace with MobileNet-V2 (width 0.35, 64 px, structured through "
                                           "its coupled groups), target gender, protected race (issue 29)", BIFP),
    ("bifp_adult_cli_defaults", "BiFP and prune_then_fair at the command line's defaults on Adult (sex), structured "
                                "(issue 29)", BIFP),
    ("bifp_adult_cli_defaults_x2", "The same at twice the default epochs (20 + 20) (issue 29)", BIFP),
    ("bifp_adult_cli_defaults_fold_in", "BiFP and prune_then_fair at the command line's defaults on Adult (sex), "
                                        "fold_in random streams (the default since the seventeenth session; "
                                        "guard_unmet on) (issue 29)", BIFP),
    ("bifp_adult_cli_defaults_fold_in_x2", "The same at twice the default epochs (20 + 20), fold_in streams "
                                           "(issue 29)", BIFP),
    ("bifp_digits_cli_defaults_fold_in", "BiFP and prune_then_fair at the command line's defaults on digits, fold_in "
                                         "random streams (issue 29)", CLASS + ["accuracy_drop", "degenerate"]),
    ("bifp_adult_unmet_select", "guard_unmet on validation rows: Adult (sex), CLI defaults, fold_in streams, 20% "
                                "of training held out (issue 29)", BIFP + ["val_eo_diff", "val_accuracy"]),
    ("ptf_adult_cap_select", "prune_then_fair's multiplier cap and dual step on validation rows: Adult (sex), CLI "
                             "defaults, fold_in streams, 20% of training held out (issue 29)",
     BIFP + ["val_eo_diff", "val_accuracy"]),
    ("ptf_adult_surrogate_select", "prune_then_fair's hinge capped at 2 (eo_clipped) and proxy=shift on validation rows: Adult "
                                   "(sex), CLI defaults, fold_in streams, 20% held out, six seeds (issue 29)",
     BIFP + ["val_eo_diff", "val_accuracy"]),
    ("bifp_digits_cli_defaults", "BiFP and prune_then_fair at the command line's defaults on digits, structured "
                                 "(issue 29)", CLASS + ["accuracy_drop", "degenerate"]),
    ("lottery_digits_v2", "Lottery tickets on digits (classes = groups): Ballot (ours, authors') vs magnitude, "
                          "random, lth, fair_scratch (issue 13)", CLASS + ["degenerate"]),
    ("lottery_digits_sweep", "Digits at 89%: Fair Scratch lambda sweep (output bias frozen) and Ballot's retraining budget (issue 13)",
     CLASS + ["degenerate"]),
    ("lottery_utkface_race_v2", "Lottery tickets on UTKFace race classification (classes = groups; issue 13)",
     CLASS + ["degenerate"]),
    ("lottery_utkface_gender_race_v3", "Lottery tickets on UTKFace gender, protected race, 59-95% (issue 13)",
     ["test_accuracy", "test_dp_diff", "test_eo_diff", "test_group_acc_gap", "degenerate"]),
    ("lottery_utkface_gender_race_v2", "Fair Scratch on UTKFace gender, protected race: the lambda sweep of the group "
                                       "terms, 79%, seed 0, output bias frozen (issue 13)",
     ["test_accuracy", "test_dp_diff", "test_eo_diff", "test_group_acc_gap", "degenerate"]),
    ("lottery_digits", "Lottery tickets on digits (classes = groups), old defaults (superseded by "
                       "lottery_digits_v2)", CLASS),
    ("lottery_utkface_race", "Lottery tickets on UTKFace race classification, old defaults (superseded)", CLASS),
    ("lottery_utkface_gender_race", "Lottery tickets on UTKFace gender, protected race, old defaults (superseded)",
     ["test_accuracy", "test_dp_diff", "test_eo_diff", "test_group_acc_gap", "test_mcd"]),
]


def section(name: str, title: str, cols: list[str]) -> str | None:
    cfg = HERE / f"{name}.toml"
    cc = load_config(cfg)
    if not (cc.out / "cells").is_dir():
        return None
    summary = collect(cc)
    n_cells = len(cc.methods) * len(cc.sparsities) * len(cc.seeds)
    dense = sorted({round(r["dense_test_accuracy"], 4) for r in summary["rows"]})
    return "\n".join([
        f"### {title}", "",
        f"`fairprune compare --config experiments/{name}.toml` ({len(summary['rows'])}/{n_cells} cells; "
        f"dense test accuracy per seed: {dense})", "",
        markdown_table(cc, summary["aggregate"], cols), "",
        f"Full table, CSV and plots: `experiments/results/{cc.out.name}/`.", ""])


def headline() -> str | None:
    path = HERE / "results" / "headline" / "headline.md"
    if not path.exists():
        return None
    body = path.read_text().split("\n", 2)[2].strip()
    return "\n".join(["### Headline: every method at 90% sparsity on every dataset", "",
                      "`fairprune compare --config experiments/headline.toml` (the suite of "
                      "`headline_digits.toml`, `headline_adult.toml`, `headline_utkface.toml`)", "",
                      body, ""])


def _replace(text: str, head: str, new: str) -> str | None:
    """``text`` with the section starting at the line ``head`` replaced by ``new``; None if it has none."""
    if head not in text:
        return None
    start = text.index(head)
    end = text.find("\n### ", start + len(head))
    return text[:start] + new + (text[end:] if end >= 0 else "")


def splice(text: str, names: list[str]) -> str:
    """``text`` with the sections of ``names`` rewritten in place (or inserted in ``TABLES`` order)."""
    order = [t[0] for t in TABLES]
    for name in names:
        if name == "headline":
            new = headline()
            if new is not None:
                text = _replace(text, "### Headline: every method at 90% sparsity on every dataset\n", new) or text
            continue
        entry = TABLES[order.index(name)]
        new = section(*entry)
        if new is None:
            continue
        replaced = _replace(text, f"### {entry[1]}\n", new)
        if replaced is not None:
            text = replaced
            continue
        # not there yet: before the first later table that is, else at the end
        later = [f"### {t[1]}\n" for t in TABLES[order.index(name) + 1:]]
        at = min((text.index(h) for h in later if h in text), default=len(text))
        text = text[:at] + new + "\n" + text[at:]
    return text


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv)
    unknown = [n for n in names if n not in {t[0] for t in TABLES} | {"headline"}]
    if unknown:
        print(f"unknown comparison(s) {', '.join(unknown)}; known: {', '.join(t[0] for t in TABLES)}",
              file=sys.stderr)
        return 2
    readme = HERE / "README.md"
    text = readme.read_text()
    marker = "## Tables"
    if marker not in text:
        print(f"{readme} has no '{marker}' section", file=sys.stderr)
        return 1
    if names:
        readme.write_text(splice(text, names))
        print(f"rewrote {len(names)} table(s) in {readme}")
        return 0
    parts = [p for p in [headline()] + [section(*t) for t in TABLES] if p]
    readme.write_text(text[:text.index(marker)] + marker + "\n\n" + "\n".join(parts))
    print(f"wrote {len(parts)} tables into {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
