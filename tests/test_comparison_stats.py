"""The statistics around comparisons (an eleventh tester's round): the small-group star where a count other than
rows decides a value (EO's positives and negatives, on the dense row too), seed counts of yes / no columns with
unknown seeds, and the two experiment scripts that make comparative claims (experiments/paired_seeds.py,
experiments/select_on_val.py) pairing cells, naming what they leave out and saying "not distinguishable"."""
from __future__ import annotations

import csv
import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _eo_cell(groups: dict, positives: dict | None) -> dict:
    """group -> (n, positives, tpr, fpr); the pruned report's certificate records positives when given, the
    dense report has no certificate (as in every run)."""
    def rep(cert: bool) -> dict:
        out = {"groups": {g: {"n": n, "accuracy": 0.8, "selection_rate": (tpr * p + fpr * (n - p)) / n, "tpr": tpr,
                              "fpr": fpr} for g, (n, p, tpr, fpr) in groups.items()}}
        tprs, fprs = [v[2] for v in groups.values()], [v[3] for v in groups.values()]
        out["equalized_odds_difference"] = {"between_groups": {"worst_case": max(max(tprs) - min(tprs),
                                                                                  max(fprs) - min(fprs))}}
        if cert:
            out["certificate"] = {"small_group_rows": 30, "groups": {
                g: {"n": n, "small": n < 30, "verdict": "holds", "high": 0.01,
                    **({"positives": positives[g], "negatives": n - positives[g]} if positives else {})}
                for g, (n, p, _, _) in groups.items()}}
        return out
    return {"config": {"small_group": 30}, "pruned": {"test": rep(True)}, "dense": {"test": rep(False)}}


@pytest.mark.parametrize("recorded", [True, False])
def test_the_eo_star_counts_positives_on_the_dense_row_too(recorded):
    """Adult sex x race: EO set by two groups of 39 and 59 rows with 5 and 3 positives. The dense report has no
    certificate; the positives are the test rows', read from the pruned one's, or (older cells) solved from
    the group's selection rate, TPR and FPR."""
    from fairprune_jax.running.summaries import small_marks
    groups = {"big": (900, 300, 0.60, 0.10), "a": (39, 5, 0.20, 0.08), "b": (59, 3, 1.00, 0.09)}
    cell = _eo_cell(groups, {g: v[1] for g, v in groups.items()} if recorded else None)
    for which in ("pruned", "dense"):
        assert small_marks(cell, which).get("test_eo_diff"), which
    groups["a"], groups["b"] = (39, 35, 0.20, 0.08), (59, 40, 1.00, 0.09)    # 35 and 40 positives: not small
    cell = _eo_cell(groups, {g: v[1] for g, v in groups.items()} if recorded else None)
    assert not small_marks(cell, "dense").get("test_eo_diff")


def test_an_eo_set_by_a_group_without_positives_is_starred():
    """A group with no positive row has TPR 0 by convention: EO 0.9 is that artefact, starred (its count of
    positives, 0, is as small as a count gets)."""
    from fairprune_jax.running.summaries import small_marks
    groups = {"A": (500, 250, 0.90, 0.10), "B": (500, 250, 0.85, 0.12), "C": (40, 0, 0.00, 0.10)}
    cell = _eo_cell(groups, {g: v[1] for g, v in groups.items()})
    assert small_marks(cell)["test_eo_diff"] and small_marks(cell, "dense")["test_eo_diff"]


def test_yes_no_columns_count_only_the_seeds_where_they_are_known():
    from fairprune_jax.running.grid_report import format_cell, method_label
    from fairprune_jax.running.summaries import aggregate
    rows = [{"method": "nft", "sparsity": 0.9, "seed": s, "degenerate": d, "no_violated_group": v}
            for s, d, v in ((0, True, True), (1, None, None), (2, False, False))]
    cc = types.SimpleNamespace(sparsities=[0.9], methods=["nft"], tolerance=None)
    [a] = aggregate(rows, cc)
    assert a["degenerate"] == {"mean": 0.5, "std": pytest.approx(np.std([1, 0], ddof=1)), "n": 2}
    assert method_label(a) == "nft (DEGENERATE 1/2 (1 unknown))"
    assert format_cell("no_violated_group", a) == "1/2 (1 unknown)"
    legacy = {"method": "bifp", "n_seeds": 3, "degenerate": {"mean": 2 / 3, "std": 0.5}}   # written before "n"
    assert method_label(legacy) == "bifp (DEGENERATE 2/3)"


def _grid(tmp_path: Path, rows: list[tuple], columns: list[str], out: str = "res") -> str:
    (tmp_path / "g.toml").write_text('name = "g"\ndataset = "adult"\nmethods = ["sm", "a", "b"]\n'
                                     'sparsities = [0.7, 0.9]\nseeds = [0, 1, 2]\nout = "res"\n'
                                     '[variants.sm]\nmethod = "structured_magnitude"\n[variants.a]\nmethod = "bifp"\n'
                                     '[variants.b]\nmethod = "bifp"\n')
    (tmp_path / out).mkdir()
    with (tmp_path / out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "sparsity", "seed"] + columns)
        w.writerows(rows)
    return str(tmp_path / "g.toml")


def test_paired_seeds_says_not_distinguishable_and_names_what_it_leaves_out(tmp_path, capsys):
    ps = _script("paired_seeds")
    rows = [("sm", 0.7, s, eo, "False") for s, eo in ((0, 0.10), (1, 0.12), (2, 0.11))]
    rows += [("a", 0.7, s, eo, "False") for s, eo in ((0, 0.05), (1, 0.16), (2, 0.09))]
    rows += [("sm", 0.9, 0, 0.2, "False"), ("a", 0.9, 0, 0.1, "True"), ("a", 0.9, 1, 0.1, "False")]
    cfg = _grid(tmp_path, rows, ["test_eo_diff", "degenerate"], out="elsewhere")
    ps.main([cfg, "--base", "sm", "--method", "a", "--metric", "test_eo_diff", "--metric", "degenerate",
             "--out", str(tmp_path / "elsewhere")])
    out = capsys.readouterr().out
    assert f"reading {tmp_path / 'elsewhere' / 'results.csv'}" in out
    d = np.array([-0.05, 0.04, -0.02])
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)
    assert f"| 0.7 | 3 | 0.1100 | 0.1000 | -0.0100 | [{-0.01 - half:+.4f}, {-0.01 + half:+.4f}] | not " \
           "distinguishable | 2/3 | 0 |" in out, out
    assert "| 0.9 | 1 | 0.2000 | 0.1000 | -0.1000 | – | no interval (fewer than 2 paired seeds) | 1/1 | 0 |" in out
    assert "at 0.9, seed(s) 1 left out" in out and "at 0.9, seed(s) 0: a degenerate model" in out
    assert "degenerate: a - sm" in out and "| 0.9 | 1 | 0.0000 | 1.0000 | +1.0000 |" in out     # True / False
    same = [{"method": m, "sparsity": "0.7", "seed": "0", "m": "1"} for m in ("sm", "a")]
    from fairprune_jax.reporting.paired import paired
    assert paired(same, "sm", "a", "m", 0.7)["ties"] == 1


def test_select_on_val_pairs_cells_refuses_degenerate_candidates_and_knows_which_way_is_better(tmp_path, capsys):
    sel = _script("select_on_val")
    cols = ["val_accuracy", "val_eo_diff", "test_accuracy", "test_eo_diff", "degenerate"]
    rows = []
    for s in (0.7, 0.9):
        for seed in (0, 1, 2):
            rows.append(("sm", s, seed, 0.85, 0.08, 0.85, 0.08, "False"))
            rows.append(("a", s, seed, 0.85, 0.06, 0.85, 0.06, "False"))
            # b: the lowest validation EO only because its 0.9 cells are constant classifiers (EO 0)
            rows.append(("b", s, seed, 0.85 if s == 0.7 else 0.84, 0.05 if s == 0.7 else 0.0, 0.84, 0.0,
                         str(s == 0.9)))
    cfg = _grid(tmp_path, rows, cols)
    assert sel.main([cfg, "--base", "sm", "--metric", "val_eo_diff", "--candidates", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "degenerate in 3 cell(s)" in out and "chosen on validation (lowest val_eo_diff): a" in out, out
    assert "per sparsity 0.7: 0.0500, 0.9: 0.0000" in out
    # a missing cell: means over the cells every entry shares, the rest named
    (tmp_path / "m").mkdir()
    cfg = _grid(tmp_path / "m", [r for r in rows if not (r[0] == "a" and r[1] == 0.9 and r[2] == 2)], cols)
    assert sel.main([cfg, "--base", "sm", "--metric", "val_eo_diff", "--candidates", "a"]) == 0
    out = capsys.readouterr().out
    assert "sm's cells s0.9 seed 2 are left out" in out and "over 5 cells" in out, out
    # accuracy is higher-is-better; a tie is said
    assert sel.main([cfg, "--base", "sm", "--metric", "val_accuracy", "--candidates", "sm", "a"]) == 0
    out = capsys.readouterr().out
    assert "tie on validation val_accuracy" in out and "(highest val_accuracy): sm" in out, out


def test_certificate_counts_with_nan_are_refused_by_name():
    from fairprune_jax.metrics import certify
    from fairprune_jax.metrics.counts import GroupCounts
    f = lambda *a: np.array(a, np.float64)                                       # noqa: E731
    n, pos = f(100, 100), f(50, 50)
    c = GroupCounts(n=n, correct=f(80, 80), loss_sum=0 * n, pred_pos=f(50, 50), tp=f(40, 40), fp=f(10, 10), pos=pos,
                    neg=n - pos)
    dc = c._replace(correct=f(90, 80))
    with pytest.raises(ValueError, match="correct holds NaN"):
        certify.certificate(c._replace(correct=f(np.nan, 80)), dc, f(10, 0), f(0, 0), eps=0.05)
    with pytest.raises(ValueError, match="lost holds NaN"):
        certify.certificate(c, dc, f(np.nan, 0), f(0, 0), eps=0.05)


def test_a_data_folder_among_the_loader_options_is_named(tmp_path):
    from fairprune_jax.running.cli_args import _data_options
    from fairprune_jax.running.compare import load_config
    (tmp_path / "g.toml").write_text('dataset = "adult"\nmethods = ["nft"]\nsparsities = [0.9]\nseeds = [0]\n'
                                     '[dataset_options]\ndata_dir = "data/adult"\n')
    with pytest.raises(ValueError, match=r"data_dir goes at the top level of the config"):
        load_config(tmp_path / "g.toml")
    args = types.SimpleNamespace(data_opt=["data_dir=x"], **{k: None for k in
                                 __import__("fairprune_jax.running.cli_args", fromlist=["DATA_FLAGS"]).DATA_FLAGS})
    with pytest.raises(SystemExit, match="--data-dir"):
        _data_options(args)


def test_a_grid_report_pairs_each_entry_with_the_first_over_seeds():
    """results.md's "Paired differences": each entry minus the grid's first entry, per sparsity and ranked
    column, with the t-interval and its verdict; degenerate seeds named; nothing for a single seed."""
    from fairprune_jax.reporting.paired import paired_section
    rows = [{"method": m, "sparsity": 0.9, "seed": s, "test_psi_upper": v, "degenerate": m == "ceag" and s == 2}
            for m, vals in (("nft", (0.15, 0.14, 0.13)), ("ceag", (0.10, 0.09, 0.08))) for s, v in enumerate(vals)]
    md = "\n".join(paired_section(rows, ["nft", "ceag"], [0.9], ["test_psi_upper"]))
    assert "each entry minus `nft`" in md
    assert "| ceag | 0.9 | test_psi_upper | 3 | -0.0500 | [-0.0500, -0.0500] | lower; degenerate in seed(s) 2 | 3/3 |" \
        in md, md
    assert paired_section([r for r in rows if r["seed"] == 0], ["nft", "ceag"], [0.9], ["test_psi_upper"]) == []
