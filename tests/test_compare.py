"""fairprune compare: grid outputs, resumability, config errors."""
import json

import pytest

from fairprune_jax import runner
from fairprune_jax.compare import load_config, run_compare

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

    # Rerun: nothing left to do, so no dense model may be trained.
    def boom(*a, **k):
        raise AssertionError("prepare() called although every cell is finished")
    monkeypatch.setattr(runner, "prepare", boom)
    again = run_compare(load_config(cfg, out=str(tmp_path / "out")), progress=False)
    assert again["aggregate"] == first["aggregate"]

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
