"""fairprune compare: grid outputs, resumability, config errors."""
import json
import re

import pytest

from fairprune_jax.running import preparation, runner
from fairprune_jax.running.compare import collect, load_config, run_compare

CONFIG = """
name = "tiny"
dataset = "digits"
methods = ["magnitude", "ceag"]
sparsities = [0.8]
seeds = [0]
tolerance = 0.05
[run]
epochs = 2
[model_options]
hidden = [32]
[method_options.ceag]
eps = 0.05
"""


@pytest.mark.slow
def test_grid_writes_outputs_and_a_rerun_skips_finished_cells(tmp_path, monkeypatch):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG)
    cc = load_config(cfg, out=str(tmp_path / "out"))
    summary = run_compare(cc, progress=False)
    assert {(r["method"], r["sparsity"], r["seed"]) for r in summary["rows"]} == {("magnitude", 0.8, 0), ("ceag", 0.8, 0)}
    for f in ["results.csv", "results.json", "results.md", "metrics_vs_sparsity.png", "group_accuracy_change.png"]:
        assert (cc.out / f).exists(), f
    first = json.loads((cc.out / "results.json").read_text())
    # every cell carries the certificate, checked against the grid's tolerance whatever the method's own eps
    for method in ("magnitude", "ceag"):
        cell = json.loads((cc.out / "cells" / f"{method}_s0.8_seed0" / "results.json").read_text())
        assert cell["pruned"]["test"]["certificate"]["eps"] == 0.05
        assert cell["pruned"]["test"]["degenerate"] is False
    for r in summary["rows"]:
        assert 0.0 <= r["test_certified_share"] <= 1.0 and r["test_psi_upper"] is not None
        assert r["degenerate"] is False and isinstance(r["no_violated_group"], bool)
    md = (cc.out / "results.md").read_text()
    assert "test_certified_share" in md and "no_violated_group" in md and "DEGENERATE" not in md
    # the certified bound is a column (the one to rank by) and has its own trade-off plot
    assert "Certified max ψ_g" in md and "test_psi_floor" in md and (cc.out / "tradeoff_certified.png").exists()
    assert all(r["test_psi_floor"] is not None and r["test_psi_upper"] >= r["test_psi_floor"] - 1e-12
               for r in summary["rows"] if r["method"] == "magnitude")
    # the certificates' bound and level are the grid's, in the rows, results.csv and the notes
    assert {(r["certify_eps"], r["certify_level"]) for r in summary["rows"]} == {(0.05, 0.95)}
    assert "certify_level" in (cc.out / "results.csv").read_text().splitlines()[0]
    assert "simultaneous 95% intervals" in md and "below ε = 0.05" in md and "different bounds" not in md

    # Rerun: nothing left to do, so no dense model may be trained.
    def boom(*a, **k):
        raise AssertionError("prepare() called although every cell is finished")
    monkeypatch.setattr(runner, "prepare", boom)
    again = run_compare(load_config(cfg, out=str(tmp_path / "out")), progress=False)
    assert again["aggregate"] == first["aggregate"]

    # a cell certified at another bound and level (a method's own eps, [run] certify_level): the tables say
    # that the certified share and verdict columns then compare unlike statements, naming who used which
    p = cc.out / "cells" / "ceag_s0.8_seed0" / "results.json"
    cell = json.loads(p.read_text())
    cell["pruned"]["test"]["certificate"].update(eps=0.1, level=0.99)
    p.write_text(json.dumps(cell))
    with pytest.warns(UserWarning, match="different bounds or levels"):
        collect(load_config(cfg, out=str(tmp_path / "out")))
    md = (cc.out / "results.md").read_text()
    assert "ε = 0.05 at 95%: magnitude; ε = 0.1 at 99%: ceag" in md and "simultaneous 95% / 99% intervals" in md

    # Remove one cell: only that one is recomputed (prepare is needed again for its seed).
    import shutil
    shutil.rmtree(cc.out / "cells" / "ceag_s0.8_seed0")
    monkeypatch.undo()
    third = run_compare(load_config(cfg, out=str(tmp_path / "out")), progress=False)
    assert len(third["rows"]) == 2
    row = {r["method"]: r for r in third["rows"]}["ceag"]
    old = {r["method"]: r for r in first["rows"]}["ceag"]
    assert row["test_accuracy"] == pytest.approx(old["test_accuracy"])   # deterministic recomputation


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("bogus = 1\n" + CONFIG)
    with pytest.raises(ValueError, match="unknown key"):
        load_config(bad)
    bad.write_text(CONFIG.replace('methods = ["magnitude", "ceag"]', 'methods = ["magnitude", "nope"]'))
    with pytest.raises(ValueError, match="valid choices"):
        load_config(bad)
    bad.write_text(CONFIG.replace("sparsities = [0.8]", "sparsities = [1.2]"))
    with pytest.raises(ValueError, match="sparsity"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")
    bad.write_text(CONFIG.replace("seeds = [0]", 'seeds = [0]\nfairness_metric = "test_bogus"'))
    with pytest.raises(ValueError, match="fairness_metric"):
        load_config(bad)
    bad.write_text(CONFIG.replace("seeds = [0]", 'seeds = [0]\nfairness_metric = "test_eo_diff"'))
    assert load_config(bad).fairness_metric == "test_eo_diff"


VARIANTS = """
name = "variants"
dataset = "digits"
methods = ["gmp", "gmp_fast"]
sparsities = [0.8]
seeds = [0]
[run]
epochs = 1
[model_options]
hidden = [16]
[method_options.gmp]
updates = 4
[variants.gmp_fast]
method = "gmp"
prune_fraction = 0.25
"""


@pytest.mark.slow
def test_variants_run_side_by_side_with_their_own_options(tmp_path):
    cfg = tmp_path / "v.toml"
    cfg.write_text(VARIANTS)
    cc = load_config(cfg, out=str(tmp_path / "out"))
    assert cc.resolve("gmp_fast") == ("gmp", {"updates": 4, "prune_fraction": 0.25})
    assert cc.resolve("gmp") == ("gmp", {"updates": 4})
    summary = run_compare(cc, progress=False)
    assert sorted(r["method"] for r in summary["rows"]) == ["gmp", "gmp_fast"]
    got = {m: json.loads((cc.out / "cells" / f"{m}_s0.8_seed0" / "results.json").read_text())
           for m in ("gmp", "gmp_fast")}
    assert got["gmp_fast"]["method"] == "gmp"
    assert got["gmp_fast"]["config"]["method_options"] == {"updates": 4, "prune_fraction": 0.25}
    assert got["gmp"]["config"]["method_options"] == {"updates": 4}
    # different options really change the run (the same dense model is shared)
    assert got["gmp"]["dense"]["test"]["accuracy"] == got["gmp_fast"]["dense"]["test"]["accuracy"]
    assert got["gmp"]["history"] != got["gmp_fast"]["history"]


def test_variant_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(VARIANTS.replace("prune_fraction = 0.25", "nope = 1"))
    with pytest.raises(ValueError, match="no option"):
        load_config(bad)
    bad.write_text(VARIANTS.replace('method = "gmp"\n', ""))
    with pytest.raises(ValueError, match="needs method"):
        load_config(bad)
    bad.write_text(VARIANTS.replace('methods = ["gmp", "gmp_fast"]', 'methods = ["gmp"]'))
    with pytest.raises(ValueError, match="not in the methods list"):
        load_config(bad)
    bad.write_text(VARIANTS.replace("[variants.gmp_fast]", "[variants.random]")
                   .replace('"gmp_fast"]', '"random"]'))
    with pytest.raises(ValueError, match="is a method name"):
        load_config(bad)


@pytest.mark.slow
def test_suite_writes_one_headline_over_its_comparisons(tmp_path, monkeypatch):
    from fairprune_jax.running.compare import is_suite, load_suite, run_suite, small_marks
    for name, methods in (("a", '["magnitude", "random"]'), ("b", '["magnitude"]')):
        (tmp_path / f"{name}.toml").write_text(
            f'name = "{name}"\ndataset = "digits"\nmethods = {methods}\nsparsities = [0.7]\nseeds = [0]\n'
            f'out = "res/{name}"\n[run]\nepochs = 1\nlr = {0.01 if name == "a" else 0.003}\n'
            + ("small_group = 45\n" if name == "a" else "")        # digits test classes 0, 2, 8 have 44 rows
            + '[model_options]\nhidden = [16]\n')
    suite_file = tmp_path / "all.toml"
    suite_file.write_text('name = "all"\nsuite = ["a.toml", "b.toml"]\nout = "res/all"\n')
    assert is_suite(suite_file) and not is_suite(tmp_path / "a.toml")
    suite = load_suite(suite_file)
    out = run_suite(suite, progress=False)
    assert [(r["comparison"], r["method"]) for r in out["rows"]] == [("a", "magnitude"), ("a", "random"),
                                                                       ("b", "magnitude")]
    md = (tmp_path / "res" / "all" / "headline.md").read_text()
    assert md.count("| digits | magnitude | 0.7 | 1 |") == 2 and "accuracy_drop" in md
    for r in out["rows"]:
        assert r["accuracy_drop"]["mean"] == pytest.approx(r["dense_test_accuracy"]["mean"]
                                                           - r["test_accuracy"]["mean"])
    assert (tmp_path / "res" / "a" / "results.md").exists()   # each comparison keeps its own outputs
    # small groups (comparison a only): starred in the cells they decide, with the legend under the table
    a_md = (tmp_path / "res" / "a" / "results.md").read_text()
    for r in out["rows"]:
        cell = json.loads((tmp_path / "res" / r["comparison"] / "cells" / f"{r['method']}_s0.7_seed0"
                           / "results.json").read_text())
        # (the EO difference may be starred in either: with the classes as groups every group lacks positives
        # or negatives; it is not a column of these tables)
        assert r["small"] == small_marks(cell)
        assert bool(set(r["small"]) - {"test_eo_diff"}) == (r["comparison"] == "a")
        assert bool(r["small"].get("test_certified_share")) == (r["comparison"] == "a")   # 3 of 10 classes small
    assert "0 *" in a_md and "`*` = in at least one seed the value rests on a small group, one with fewer than 45" \
        in a_md, a_md
    sections = md.split("#### ")
    assert " *" in sections[1] and "fewer than 45 of the rows" in sections[1]
    assert "`*`" not in sections[2] and " * |" not in sections[2]

    def boom(*a, **k):
        raise AssertionError("a finished suite trained again")
    monkeypatch.setattr(runner, "prepare", boom)
    assert run_suite(load_suite(suite_file), progress=False)["rows"] == out["rows"]

    suite_file.write_text('suite = ["a.toml", "a.toml"]\n')
    with pytest.raises(ValueError, match="share a name"):
        load_suite(suite_file)
    suite_file.write_text('suite = ["a.toml"]\ncolumns = ["bogus"]\n')
    with pytest.raises(ValueError, match="unknown column"):
        load_suite(suite_file)


@pytest.mark.slow
def test_save_compact_in_a_grid_applies_to_structured_cells_only(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "c"\ndataset = "digits"\nmethods = ["magnitude", "structured_magnitude"]\n'
                   'sparsities = [0.5]\nseeds = [0]\n[run]\nepochs = 1\nsave_compact = true\n'
                   '[model_options]\nhidden = [16]\n')
    cc = load_config(cfg, out=str(tmp_path / "out"))
    run_compare(cc, progress=False)
    cells = cc.out / "cells"
    assert not (cells / "magnitude_s0.5_seed0" / "compact").exists()
    r = json.loads((cells / "structured_magnitude_s0.5_seed0" / "results.json").read_text())
    assert r["compact"]["max_abs_logit_diff"] <= 1e-5
    assert (cells / "structured_magnitude_s0.5_seed0" / "compact").is_dir()


PARALLEL = """
name = "par"
dataset = "digits"
methods = ["magnitude"]
sparsities = [0.5]
seeds = [0, 1]
parallel_seeds = true
[run]
epochs = 1
[model_options]
hidden = [16]
"""


@pytest.mark.slow
def test_parallel_seeds_grid_runs_and_resumes(tmp_path, monkeypatch):
    cfg = tmp_path / "par.toml"
    cfg.write_text(PARALLEL)
    cc = load_config(cfg, out=str(tmp_path / "out"))
    assert cc.parallel_seeds
    calls = []
    real_prepare, real_seeds = runner.prepare, runner.prepare_seeds
    monkeypatch.setattr(runner, "prepare", lambda *a, **k: calls.append("prepare") or real_prepare(*a, **k))
    monkeypatch.setattr(runner, "prepare_seeds",
                        lambda cfgs, *a, **k: calls.append(("seeds", [c.seed for c in cfgs])) or real_seeds(cfgs, *a, **k))
    first = run_compare(cc, progress=False)
    assert calls == [("seeds", [0, 1])]          # both dense models in one vmapped run, no sequential training
    assert {(r["method"], r["seed"]) for r in first["rows"]} == {("magnitude", 0), ("magnitude", 1)}
    res = json.loads((cc.out / "cells" / "magnitude_s0.5_seed1" / "results.json").read_text())
    assert res["seed"] == 1 and res["history"]["dense"]["parallel_seeds"]["seeds"] == [0, 1]

    # Rerun: every cell is finished, nothing is trained.
    calls.clear()
    run_compare(load_config(cfg, out=str(tmp_path / "out")), progress=False)
    assert calls == []

    # One seed left: its dense model is trained alone (sequentially) and matches the vmapped one.
    import shutil
    shutil.rmtree(cc.out / "cells" / "magnitude_s0.5_seed1")
    third = run_compare(load_config(cfg, out=str(tmp_path / "out")), progress=False)
    assert calls == ["prepare"]
    row = {r["seed"]: r for r in third["rows"]}[1]
    old = {r["seed"]: r for r in first["rows"]}[1]
    assert row["dense_test_accuracy"] == pytest.approx(old["dense_test_accuracy"], abs=1e-3)
    assert row["test_accuracy"] == pytest.approx(old["test_accuracy"], abs=1e-2)

    cfg.write_text(PARALLEL.replace("parallel_seeds = true", 'parallel_seeds = "yes"'))
    with pytest.raises(ValueError, match="parallel_seeds must be true or false"):
        load_config(cfg)


def test_degenerate_rows_are_marked_in_tables():
    from fairprune_jax.running.compare import format_cell, method_label
    row = {"method": "bifp", "n_seeds": 3, "degenerate": {"mean": 2 / 3, "std": 0.5},
           "no_violated_group": {"mean": 1.0, "std": 0.0}}
    assert method_label(row) == "bifp (DEGENERATE 2/3)"
    assert format_cell("no_violated_group", row) == "3/3"
    assert method_label({"method": "nft", "n_seeds": 3, "degenerate": {"mean": 0.0, "std": 0.0}}) == "nft"
    assert method_label({"method": "nft", "n_seeds": 3}) == "nft"      # cells from before the flag existed


def test_a_grid_reuses_its_saved_dense_models(tmp_path, monkeypatch):
    """Adding a method to a finished grid trains no dense model again: the saved one is read back exactly,
    and only while it matches the dense config (a changed dense setting retrains)."""
    cfg = tmp_path / "g.toml"
    base = CONFIG.replace('methods = ["magnitude", "ceag"]', 'methods = ["magnitude"]').replace(
        "[method_options.ceag]\neps = 0.05\n", "")
    cfg.write_text(base)
    first = run_compare(load_config(cfg, out=str(tmp_path / "out")), progress=False)
    assert (tmp_path / "out" / "dense" / "seed0" / "dense-cache").is_dir()

    def boom(*a, **k):
        raise AssertionError("the dense model was trained again")
    monkeypatch.setattr(preparation, "train_dense", boom)
    cfg.write_text(base.replace('methods = ["magnitude"]', 'methods = ["magnitude", "random"]'))
    second = run_compare(load_config(cfg, out=str(tmp_path / "out")), progress=False)
    rows = {r["method"]: r for r in second["rows"]}
    assert set(rows) == {"magnitude", "random"}
    assert rows["random"]["dense_test_accuracy"] == first["rows"][0]["dense_test_accuracy"]
    cell = json.loads((tmp_path / "out" / "cells" / "random_s0.8_seed0" / "results.json").read_text())
    assert cell["history"]["dense"]["cached"] is True

    # another dense setting (3 epochs instead of 2): the saved model does not fit, so it must be retrained
    cfg.write_text(base.replace("epochs = 2", "epochs = 3").replace('methods = ["magnitude"]', 'methods = ["random"]'))
    with pytest.raises(AssertionError, match="trained again"):
        run_compare(load_config(cfg, out=str(tmp_path / "out2")), progress=False)
    import shutil
    shutil.copytree(tmp_path / "out" / "dense", tmp_path / "out2" / "dense")
    with pytest.raises(AssertionError, match="trained again"):
        run_compare(load_config(cfg, out=str(tmp_path / "out2")), progress=False)


def _from_another_dense_model(out, cell_name: str) -> None:
    """Make a finished cell record another dense model (one more correct test row in a group) and drop the
    grid's dense cache, so the next run trains the dense model again and meets the difference."""
    import shutil
    p = out / "cells" / cell_name / "results.json"
    cell = json.loads(p.read_text())
    grp = next(iter(cell["dense"]["test"]["groups"].values()))
    grp["accuracy"] += 1.0 / grp["n"]
    p.write_text(json.dumps(cell))
    shutil.rmtree(out / "dense")


def test_a_dense_model_trained_again_must_be_the_one_the_finished_cells_pruned(tmp_path):
    """The dense/ cache is not kept with committed results; a rerun that trains a seed's dense model again and
    gets another one (another CPU or XLA version) refuses to put new cells beside the old ones, which would be
    compared as if paired (UTKFace: 0.67096 against the cells' 0.67222). The same model trained again passes."""
    import shutil
    cfg = tmp_path / "g.toml"
    base = CONFIG.replace('methods = ["magnitude", "ceag"]', 'methods = ["magnitude"]').replace(
        "[method_options.ceag]\neps = 0.05\n", "")
    cfg.write_text(base)
    out = tmp_path / "out"
    run_compare(load_config(cfg, out=str(out)), progress=False)
    shutil.rmtree(out / "dense")                    # the cache lost: trained again, bit for bit the same model
    cfg.write_text(base.replace('methods = ["magnitude"]', 'methods = ["magnitude", "random"]'))
    run_compare(load_config(cfg, out=str(out)), progress=False)
    assert (out / "cells" / "random_s0.8_seed0" / "results.json").is_file()
    _from_another_dense_model(out, "magnitude_s0.8_seed0")
    cfg.write_text(base.replace('methods = ["magnitude"]', 'methods = ["magnitude", "random", "gmp"]'))
    with pytest.raises(ValueError, match=r"seed 0's dense model, trained again now, is not the one its finished "
                                         r"cells pruned .*not bit-reproducible.*another --out"):
        run_compare(load_config(cfg, out=str(out)), progress=False)
    assert not (out / "cells" / "gmp_s0.8_seed0").exists()


def test_parallel_seeds_check_every_dense_model_before_any_cell_runs(tmp_path):
    """With parallel_seeds every seed's dense model is trained before any cell, so a later seed's mismatch is
    found before an earlier seed's new cells run (they would be orphans of a refused run)."""
    cfg = tmp_path / "g.toml"
    base = CONFIG.replace('methods = ["magnitude", "ceag"]', 'methods = ["magnitude"]').replace(
        "[method_options.ceag]\neps = 0.05\n", "").replace("seeds = [0]", "seeds = [0, 1]\nparallel_seeds = true")
    cfg.write_text(base)
    out = tmp_path / "out"
    run_compare(load_config(cfg, out=str(out)), progress=False)
    _from_another_dense_model(out, "magnitude_s0.8_seed1")     # seed 1's cells pruned another dense model
    cfg.write_text(base.replace('methods = ["magnitude"]', 'methods = ["magnitude", "random"]'))
    with pytest.raises(ValueError, match=r"seed 1's dense model, trained again now"):
        run_compare(load_config(cfg, out=str(out)), progress=False)
    assert not (out / "cells" / "random_s0.8_seed0").exists()


def _cell(groups: dict, psi: dict, verdicts: dict, small_group: int = 30) -> dict:
    """A hand-made cell: group -> (n, accuracy, selection rate, tpr, fpr) on test; psi per group; verdicts."""
    rep = {"groups": {g: dict(zip(("n", "accuracy", "selection_rate", "tpr", "fpr"), v)) for g, v in groups.items()},
           "excess_accuracy_gap": {"per_group": psi},
           "certificate": {"small_group_rows": small_group, "groups": {
               g: {"n": groups[g][0], "small": groups[g][0] < small_group, "verdict": verdicts[g],
                   "high": psi[g] + 0.1} for g in groups}}}
    tpr = [v[3] for v in groups.values()]
    fpr = [v[4] for v in groups.values()]
    rep["equalized_odds_difference"] = {"between_groups": {"worst_case": max(max(tpr) - min(tpr),
                                                                                max(fpr) - min(fpr))}}
    return {"config": {"small_group": small_group}, "pruned": {"test": rep, "train": {
        "groups": {g: {"n": 4 * v[0]} for g, v in groups.items()}, "excess_accuracy_gap": {"per_group": psi}}},
        "dense": {"test": rep}}


def test_small_groups_are_starred_in_the_table_cells_they_decide():
    """A per-group-derived cell is starred when the group that attains it (either end of a gap) is small: a tie
    with a large group does not count; train columns use train rows; the numbers themselves do not change."""
    from fairprune_jax.reporting import tables
    from fairprune_jax.running.compare import small_legend, small_marks
    #               n    acc   sel   tpr   fpr
    cell = _cell({"big": (200, 0.90, 0.50, 0.80, 0.20), "mid": (100, 0.80, 0.40, 0.70, 0.25),
                  "tiny": (12, 0.50, 0.40, 0.40, 0.22)},
                 psi={"big": -0.01, "mid": 0.02, "tiny": 0.30},
                 verdicts={"big": "holds", "mid": "undetermined", "tiny": "undetermined"})
    marks = small_marks(cell)
    # tiny has the max psi, the lowest accuracy and the lowest TPR (EO's worst side); its selection rate ties
    # with mid's, so DP's low end does not rest on it alone; no group is violated; train rows are 4x (48 >= 30)
    assert marks == {"test_max_psi": True, "test_psi_within_tol": True, "test_psi_spread": True,
                     "test_group_acc_gap": True, "test_eo_diff": True, "test_certified_share": True,
                     "test_psi_upper": True}, marks
    assert small_marks(cell, "dense")["test_group_acc_gap"]
    as_classes = dict(cell, groups={"attributes": ["class"], "names": list(cell["pruned"]["test"]["groups"])})
    assert small_marks(as_classes)["test_mcd"] and small_marks(as_classes)["test_cwv"]
    cell["config"]["small_group"] = cell["pruned"]["test"]["certificate"]["small_group_rows"] = 50
    for g in cell["pruned"]["test"]["certificate"]["groups"].values():
        g["small"] = g["n"] < 50
    assert small_marks(cell)["train_max_psi"]          # 48 train rows < 50
    cell["pruned"]["test"]["certificate"]["groups"]["tiny"]["verdict"] = "violated"
    assert small_marks(cell)["test_violated_groups"] and small_marks(cell)["no_violated_group"]

    agg = [{"method": "ceag", "sparsity": 0.9, "n_seeds": 2, "test_max_psi": {"mean": 0.3, "std": 0.01},
            "test_accuracy": {"mean": 0.8, "std": 0.0}, "small": {"test_max_psi": True}},
           {"method": "nft", "sparsity": 0.9, "n_seeds": 2, "test_max_psi": {"mean": 0.2, "std": 0.02},
            "test_accuracy": {"mean": 0.7, "std": 0.0}, "small": {}}]
    cols = ["test_accuracy", "test_max_psi"]
    md = tables.render(agg, cols)
    assert "| ceag | 0.9 | 2 | **0.8000 ± 0.0000** | 0.3000 ± 0.0100 * |" in md, md
    assert "| nft | 0.9 | 2 | 0.7000 ± 0.0000 | **0.2000 ± 0.0200** |" in md, md
    assert re.sub(r" \*(?= \|)", "", md) == tables.render([dict(a, small={}) for a in agg], cols)
    assert r"0.3000 $\pm$ 0.0100$^*$" in tables.render(agg, cols, latex=True)
    legend = small_legend(agg, cols, {30})
    assert legend.startswith("`*` = in at least one seed the value rests on a small group, one with fewer than 30 "
                             "of the rows that decide the value (the runs' `small_group`): rows of the column's "
                             "split, except for the EO difference, whose TPR side counts a group's positives")
    assert small_legend(agg, ["test_accuracy"], {30}) is None


def test_constraint_label_reads_data_dependent_defaults_from_a_finished_cell(tmp_path):
    # fair_scratch's lam / lam_warmup stay None in the config and are resolved by the penalty form at run time
    from fairprune_jax.running.compare import cell_dir, constraint_settings
    cfg = tmp_path / "grid.toml"
    cfg.write_text('name = "g"\ndataset = "digits"\nmethods = ["fair_scratch", "fs_fixed"]\nsparsities = [0.5]\n'
                   'seeds = [0]\n[variants.fs_fixed]\nmethod = "fair_scratch"\nlam = 0.3\n')
    cc = load_config(cfg, out=str(tmp_path / "out"))
    assert constraint_settings(cc)["fair_scratch"] == "penalty, default λ"       # no cell yet
    assert constraint_settings(cc)["fs_fixed"] == "penalty λ=0.3"
    cell = cell_dir(cc, "fair_scratch", 0.5, 0)
    cell.mkdir(parents=True)
    options = {"lam": None, "lam_warmup": None, "lam_used": 1.0, "lam_warmup_used": 0.5}
    (cell / "results.json").write_text(json.dumps({"method_info": {"options": options}}))
    assert constraint_settings(cc)["fair_scratch"] == "penalty λ=1, warm-up 0.5"
    # a cell from before lam was data-dependent recorded the value under its own name
    (cell / "results.json").write_text(json.dumps({"method_info": {"options": {"lam": 0.1}}}))
    assert constraint_settings(cc)["fair_scratch"] == "penalty λ=0.1"


def test_constraint_label_follows_the_fairness_mode_not_the_constraint_option():
    """bifp's `constraint` and `tau` keep their defaults when `fairness_mode` turns the term off or makes it a
    penalty: the table must say what ran (it said 'per_group, τ=0.05' for a cross-entropy-only variant)."""
    from fairprune_jax.reporting.tables import constraint_label
    base = {"constraint": "per_group", "tau": 0.05, "lam": 1.0}
    assert constraint_label("bifp", {**base, "fairness_mode": "constraint"}) == "per_group, τ=0.05"
    assert constraint_label("bifp", {**base, "fairness_mode": "none"}) is None
    assert constraint_label("prune_then_fair", {**base, "fairness_mode": "penalty"}) == "penalty λ=1"
    assert constraint_label("bifp", base) == "per_group, τ=0.05"          # cells from before the option


def test_chosen_on_records_where_settings_were_chosen(tmp_path):
    """[chosen_on] names, per setting, the split (or rule) that chose it; anything else is refused up front."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG + '[chosen_on]\n"ceag.eps" = "val: lowest validation certified bound"\n'
                   '"epochs" = "test: picked after an earlier grid missed on test"\n')
    cc = load_config(cfg, out=str(tmp_path / "out"))
    assert cc.chosen_on == {"ceag.eps": "val: lowest validation certified bound",
                            "epochs": "test: picked after an earlier grid missed on test"}
    cfg.write_text(CONFIG + '[chosen_on]\n"ceag.eps" = "my intuition"\n')
    with pytest.raises(ValueError, match=r"\[chosen_on\].*train, val, rule, default, test"):
        load_config(cfg)


def test_eo_is_starred_by_positives_not_rows():
    """EO's worst side is a TPR gap: a group of 60 rows with 5 positives decides it, so the EO cell is starred
    although the group has more than 30 rows (the Adult sex x race case); DP, decided by rows, is not."""
    from fairprune_jax.running.compare import small_marks
    cell = _cell({"big": (2000, 0.85, 0.20, 0.60, 0.08), "few_pos": (60, 0.90, 0.05, 0.20, 0.04)},
                 psi={"big": 0.0, "few_pos": 0.01}, verdicts={"big": "holds", "few_pos": "undetermined"})
    # a cell older than the certificate's record of positives: solved from the rates, 60 x (0.05 - 0.04) /
    # (0.20 - 0.04) = 4 positives (not the 60 rows)
    assert small_marks(cell).get("test_eo_diff") and small_marks(cell, "dense").get("test_eo_diff")
    cell["pruned"]["test"]["groups"]["few_pos"]["tpr"] = cell["dense"]["test"]["groups"]["few_pos"]["tpr"] = 0.04
    assert not small_marks(cell).get("test_eo_diff")       # TPR = FPR: not solvable, counted in rows (60 >= 30)
    cell["pruned"]["test"]["groups"]["few_pos"]["tpr"] = 0.20
    cg = cell["pruned"]["test"]["certificate"]["groups"]
    cg["big"].update(positives=500, negatives=1500)
    cg["few_pos"].update(positives=5, negatives=55)
    marks = small_marks(cell)
    assert marks.get("test_eo_diff") is True and not marks.get("test_dp_diff")


def test_grid_values_are_checked_like_a_run_before_training(tmp_path):
    """nan, inf and out-of-range values in a grid are refused when the TOML is read, naming the entry."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(CONFIG.replace("eps = 0.05", "eps = nan"))
    with pytest.raises(ValueError, match=r"option 'eps' must be a finite number"):
        load_config(cfg)
    cfg.write_text(CONFIG.replace("[run]\nepochs = 2", "[run]\nepochs = 2\nweight_decay = -1.0"))
    with pytest.raises(ValueError, match=r"entry 'magnitude', sparsity 0.8, seed 0: --weight-decay must be >= 0"):
        load_config(cfg)
    cfg.write_text(CONFIG.replace("seeds = [0]", "seeds = [5000000000]"))
    with pytest.raises(ValueError, match=r"--seed must be an integer in \[0, 2\*\*32\)"):
        load_config(cfg)


def test_a_cell_from_before_a_default_changed_is_not_reused_unless_the_grid_sets_the_option():
    """A method's DefaultChange list against the cell's recorded defaults_revision: a finished cell whose result
    the change would alter (here bifp's fairness=auto on a two-class target, and the collapse guard on a cell
    that ended at a constant classifier) is stale unless the grid sets that option; cells the change cannot
    alter, and cells recorded at the current revision, are reused."""
    from fairprune_jax.methods import get_method
    from fairprune_jax.running.compare import _changed_defaults
    two = {"positive_class": {"num_classes": 2}, "method_info": {"train_fairness": {"metric_gap": 0.04}},
           "pruned": {"test": {"degenerate": False}}}
    why = _changed_defaults("bifp", {}, two)
    assert len(why) == 1 and "option fairness" in why[0] and "set fairness in the grid" in why[0]
    assert _changed_defaults("bifp", {"fairness": "eo"}, two) == []
    ten = {**two, "positive_class": {"num_classes": 10}}
    assert _changed_defaults("bifp", {}, ten) == []                         # ap there: unchanged
    collapsed = {**ten, "method_info": {"train_fairness": {"metric_gap": 0.0}}}
    assert [w.split(":")[0] for w in _changed_defaults("prune_then_fair", {}, collapsed)] == ["option collapse_guard"]
    assert _changed_defaults("prune_then_fair", {"collapse_guard": False}, collapsed) == []
    ftp = {**ten, "method_info": {"dense_fair": {"train_fairness": {"metric_gap": 0.0}}}}
    assert len(_changed_defaults("fair_then_prune", {}, ftp)) == 1           # its dense fair phase collapsed
    now = {**two, "method_info": {"defaults_revision": get_method("bifp").defaults_revision}}
    assert _changed_defaults("bifp", {}, now) == []
    assert _changed_defaults("magnitude", {}, two) == []                   # no changes registered


def test_a_grid_whose_seed_holds_two_dense_models_says_so():
    """Cells of one seed pruned from two dense models (copied in, or made before the check above) are named in
    results.md and a warning: their paired differences are not paired."""
    from fairprune_jax.running.grid_report import mixed_dense_note
    rows = [{"seed": 0, "dense_test_accuracy": 0.67222}, {"seed": 0, "dense_test_accuracy": 0.67096},
            {"seed": 1, "dense_test_accuracy": 0.66927}, {"seed": 1, "dense_test_accuracy": 0.66927}]
    note = mixed_dense_note(rows)
    assert "seed 0: 0.67096, 0.67222" in note and "seed 1" not in note and "not paired" in note
    assert mixed_dense_note(rows[2:]) is None
