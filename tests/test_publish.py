"""Publication outputs of a comparison: trade-off / per-group figures, readable Markdown and LaTeX tables.

Built from committed cells of experiments/results/headline_digits (no training), so it runs in seconds.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fairprune_jax.reporting import figures, tables
from fairprune_jax.running.compare import collect, load_config

CELLS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "headline_digits" / "cells"


def test_pareto_front_keeps_only_undominated_points():
    pts = [(0.1, 0.90), (0.2, 0.95), (0.15, 0.80), (0.3, 0.95), (0.05, 0.70)]
    assert figures.pareto_front(pts) == [4, 0, 1]     # sorted by unfairness; (0.3, .95) is dominated by (0.2, .95)


def _agg(method, acc, dp, mcd, n=3, degenerate=0.0):
    v = lambda m: {"mean": m, "std": 0.01}  # noqa: E731
    return {"method": method, "sparsity": 0.9, "n_seeds": n, "test_accuracy": v(acc), "test_dp_diff": v(dp),
            "test_eo_diff": v(dp), "test_mcd": v(mcd), "test_group_acc_gap": v(mcd), "degenerate": v(degenerate)}


def test_columns_for_the_setting_and_best_marks():
    agg = [_agg("a", 0.9, 0.5, 0.2), _agg("b", 0.8, 0.4, 0.1), _agg("c", 0.1, 0.0, 1.0, degenerate=1.0)]
    cols = ["test_accuracy", "test_group_acc_gap", "test_mcd", "test_dp_diff", "test_eo_diff"]
    kept, notes = tables.choose_columns(cols, agg, classes_as_groups=True)
    assert kept == ["test_accuracy", "test_mcd"] and len(notes) == 2
    assert tables.choose_columns(cols, agg, classes_as_groups=True, asked=True)[0] == cols
    assert tables.choose_columns(cols, agg, classes_as_groups=False)[0] == ["test_accuracy", "test_mcd",
                                                                             "test_dp_diff", "test_eo_diff"]
    md = tables.render(agg, kept, dense=_agg("dense", 0.95, 0.5, 0.1), structured={"a": False, "b": True, "c": False})
    lines = md.splitlines()
    assert lines[0].startswith("| Method | Sparsity | Pruning | Seeds | Accuracy | MCD |")
    assert lines[2].startswith("| dense |")
    assert "**0.9000 ± 0.0100**" in lines[3] and "**0.1000 ± 0.0100**" in lines[4]   # best accuracy a, best MCD b
    assert "DEGENERATE 3/3" in lines[5] and "**" not in lines[5]     # a degenerate row never wins (DP 0.0 here)
    tex = tables.render(agg, kept, latex=True, structured={"a": False, "b": True, "c": False})
    assert r"\toprule" in tex and r"\textbf{0.9000 $\pm$ 0.0100}" in tex and "unstructured" in tex


@pytest.mark.skipif(not CELLS.is_dir(), reason="committed headline_digits cells not present")
def test_compare_outputs_from_committed_cells(tmp_path):
    methods = ["nft", "ceag", "structured_magnitude"]
    for m in methods:
        for seed in (0, 1):
            shutil.copytree(CELLS / f"{m}_s0.9_seed{seed}", tmp_path / "out" / "cells" / f"{m}_s0.9_seed{seed}")
    cfg = tmp_path / "g.toml"
    cfg.write_text(f'dataset = "digits"\nmethods = {methods}\nsparsities = [0.9]\nseeds = [0, 1]\n'
                   'tolerance = 0.02\nfairness_metric = "test_mcd"\n[method_options.ceag]\neps = 0.02\n')
    cc = load_config(cfg, out=str(tmp_path / "out"))
    summary = collect(cc)
    assert summary["dense"]["n_seeds"] == 2 and summary["dense"]["test_accuracy"]["mean"] > 0.9
    for name in ("tradeoff", "metrics_vs_sparsity", "group_accuracy_change"):
        for ext in ("png", "pdf"):
            assert (cc.out / f"{name}.{ext}").stat().st_size > 1000, (name, ext)
    md = (cc.out / "results.md").read_text()
    assert "| dense | 0 | – | 2 |" in md and "| structured_magnitude | 0.9 | structured |" in md
    assert "DP difference" not in md and "DP and EO differences are left out" in md      # groups are the classes
    assert "ψ_g ≤ 0.02" in md and "## Constraints" in md and "met on train in" in md
    assert "largest multiplier" in md
    # the committed ceag cells (held-out constraints) differ from nft's, so no "agree" note; the note appears
    # when a ceag cell equals its nft cell on every test column (here: nft's cells relabelled as ceag)
    assert "`nft` and `ceag` agree on every test column" not in md
    for seed in (0, 1):
        d = tmp_path / "same" / "cells" / f"ceag_s0.9_seed{seed}"
        shutil.copytree(CELLS / f"nft_s0.9_seed{seed}", d)
        r = json.loads((d / "results.json").read_text())
        r["method"] = "ceag"
        (d / "results.json").write_text(json.dumps(r))
        shutil.copytree(CELLS / f"nft_s0.9_seed{seed}", tmp_path / "same" / "cells" / f"nft_s0.9_seed{seed}")
        shutil.copytree(CELLS / f"structured_magnitude_s0.9_seed{seed}",
                        tmp_path / "same" / "cells" / f"structured_magnitude_s0.9_seed{seed}")
    collect(load_config(cfg, out=str(tmp_path / "same")))
    assert "`nft` and `ceag` agree on every test column" in (tmp_path / "same" / "results.md").read_text()
    assert "`test_mcd`" in md                  # the CSV name of every readable column is given
    tex = (cc.out / "results.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\textbf" in tex and "structured\\_magnitude" in tex
    header = (cc.out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["method", "sparsity", "seed", "achieved_sparsity"] and "test_dp_diff" in header


def test_many_groups_show_the_worst_hit_and_a_histogram_of_all(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    groups = [f"g{i}" for i in range(60)]
    changes = {m: {g: list(rng.normal(-0.05 if g != "g7" else -0.6, 0.02, size=3)) for g in groups}
               for m in ("a", "b")}
    seen = {}

    def capture(fig, path, formats=("png",)):
        seen["titles"] = [ax.get_title() for ax in fig.axes]
        seen["ticks"] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        seen["ylim"] = fig.axes[0].get_ylim()
        return []
    monkeypatch.setattr(figures, "save", capture)
    figures.group_change(changes, tmp_path / "x.png", groups=groups, title="t", ylabel="change", worst=10)
    assert any("10 most-hurt of 60 groups" in t for t in seen["titles"])
    assert any("every group (60)" in t for t in seen["titles"])
    assert seen["ticks"][0] == "g7" and len(seen["ticks"]) == 10
    lo, hi = seen["ylim"]
    assert lo < -0.6 and hi >= 0.0           # zero and the deepest bar with its error bar are inside


def test_one_sparsity_plots_a_row_per_method_not_a_column_of_points(tmp_path, monkeypatch):
    agg = [{"method": m, "sparsity": 0.9, "test_accuracy": {"mean": acc, "std": 0.01},
            "test_mcd": {"mean": mcd, "std": 0.02}}
           for m, acc, mcd in (("magnitude", 0.93, 0.18), ("ceag", 0.95, 0.1), ("bifp", 0.8, 0.38))]
    dense = {"test_accuracy": {"mean": 0.96, "std": 0.0}, "test_mcd": {"mean": 0.1, "std": 0.0}}
    seen = {}

    def capture(fig, path, formats=("png",)):
        seen["yticks"] = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        seen["xlabels"] = [ax.get_xlabel() for ax in fig.axes]
        seen["points"] = [tuple(l.get_xydata()[0]) for l in fig.axes[1].lines if len(l.get_xydata()) == 1]
        return []
    monkeypatch.setattr(figures, "save", capture)
    figures.metrics_vs_sparsity(agg, dense, tmp_path / "m.png", metric="test_mcd", metric_label="MCD", title="t",
                                structured={"bifp": True})
    assert seen["yticks"] == ["magnitude", "ceag", "bifp (structured)"]
    assert seen["xlabels"] == ["test accuracy", "MCD"]
    assert (0.38, 2.0) in seen["points"] and (0.1, 1.0) in seen["points"]   # each method on its own row


ADULT = CELLS.parents[1] / "headline_adult" / "cells"


@pytest.mark.skipif(not (CELLS.is_dir() and ADULT.is_dir()), reason="committed headline cells not present")
def test_suite_headline_one_readable_table_per_dataset(tmp_path):
    from fairprune_jax.running.compare import load_suite, write_headline
    grids = {"d": ("digits", CELLS, ["magnitude", "fair_scratch", "structured_magnitude"], ""),
             "a": ("adult", ADULT, ["magnitude", "bifp"], '[dataset_options]\nprotected = "sex"\n')}
    for name, (dataset, cells, methods, extra) in grids.items():
        for m in methods:
            shutil.copytree(cells / f"{m}_s0.9_seed0", tmp_path / name / "cells" / f"{m}_s0.9_seed0")
        (tmp_path / f"{name}.toml").write_text(f'name = "{name}"\ndataset = "{dataset}"\nmethods = {methods}\n'
                                               f'sparsities = [0.9]\nseeds = [0]\nout = "{name}"\n{extra}')
    # an old cell, written before the degenerate flag existed, of a constant classifier (the groups are the
    # classes: one class entirely right, every other entirely wrong)
    old_cell = tmp_path / "d" / "cells" / "fair_scratch_s0.9_seed0" / "results.json"
    cell = json.loads(old_cell.read_text())
    test = cell["pruned"]["test"]
    for key in ("degenerate", "top_prediction", "top_prediction_share", "degenerate_threshold"):
        test.pop(key, None)
    for i, g in enumerate(test["groups"].values()):
        g["accuracy"] = 1.0 if i == 0 else 0.0
    old_cell.write_text(json.dumps(cell))
    (tmp_path / "s.toml").write_text('name = "s"\nsuite = ["d.toml", "a.toml"]\nout = "s"\n')
    write_headline(load_suite(tmp_path / "s.toml"))
    md = (tmp_path / "s" / "headline.md").read_text()
    digits, adult = md.split("#### adult")
    assert "| digits | dense | 0 |" in digits and "| Pruning |" in digits and "DP difference" not in digits
    assert "fair_scratch (DEGENERATE 1/1)" in digits        # an old cell without the flag: a constant classifier
    assert "DP difference" in adult and "EO difference" in adult and "| adult, protected sex | dense | 0 |" in adult
    assert r"\begin{tabular}" in (tmp_path / "s" / "headline.tex").read_text()
    assert (tmp_path / "s" / "headline.csv").read_text().startswith("comparison,dataset,method,sparsity,n_seeds")


def test_latex_escapes_every_special_character():
    """A variant or group name with #, braces, ~, ^, _, %, & gives LaTeX that compiles: each is escaped once
    (before: #, {, }, ~ and ^ went through raw and broke results.tex)."""
    got = tables._tex("bifp#2 {x} a~b^c_d 50% & ψ_g ≤ ε")
    assert got == (r"bifp\#2 \{x\} a\textasciitilde{}b\textasciicircum{}c\_d 50\% \& $\psi_g$ $\le$ "
                   r"$\varepsilon$")
    assert tables._tex(r"$\max_g$ kept") == r"$\max_g$ kept"          # cells that hold LaTeX pass unchanged
