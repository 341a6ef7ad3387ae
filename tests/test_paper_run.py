"""benchmarks/paper_run.py: a paper's setting within a time budget (epochs scaled by one factor, resumable)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import paper_run  # noqa: E402
from fairprune_jax.running.compare import load_config  # noqa: E402

GRID = """name = "tiny"
dataset = "digits"
methods = ["nft", "ceag", "lth"]
sparsities = [0.9]
seeds = [0, 1]
[run]
epochs = 400
finetune_epochs = 200
[method_options.ceag]
prune_epochs = 40
[method_options.lth]
max_rounds = 2
"""


def test_the_schedule_shrinks_by_one_factor_to_fit_the_budget(tmp_path):
    (tmp_path / "g.toml").write_text(GRID)
    cc = load_config(tmp_path / "g.toml", out=str(tmp_path / "out"))
    dense, cells = paper_run.grid_epochs(cc)
    assert dense == 800 and cells == 2 * ((200) + (40 + 200) + 200 * 2)       # nft, ceag, lth (2 trainings)
    p = paper_run.plan(cc, seconds_per_step=0.01, steps_per_epoch=10, budget_s=60)
    assert 0 < p["factor"] < 1 and p["scaled_estimate_s"] <= 0.8 * 60 * 1.05
    g = p["grid"]
    assert g.run["epochs"] == round(400 * p["factor"]) and g.run["finetune_epochs"] == round(200 * p["factor"])
    assert g.method_options["ceag"]["prune_epochs"] == max(1, round(40 * p["factor"]))
    assert g.method_options["lth"]["max_rounds"] == 2                                # not an epoch count
    assert paper_run.plan(cc, 1e-9, 10, 60)["factor"] == 1.0                       # never stretched
    with pytest.raises(ValueError, match="seeds"):
        paper_run.subset(cc, seeds=[5])


def test_a_budgeted_run_writes_the_scaled_grid_and_a_plan_runs_nothing(tmp_path, capsys):
    # 20000 dense epochs: no machine fits them in 24 s, so the run is shortened wherever the suite runs
    (tmp_path / "g.toml").write_text(GRID.replace("epochs = 400", "epochs = 20000"))
    out = tmp_path / "out"
    args = [str(tmp_path / "g.toml"), "--budget-minutes", "0.4", "--seeds", "0", "--methods", "nft",
            "--out", str(out), "--no-progress"]
    assert paper_run.main(args) == 0
    text = capsys.readouterr().out
    assert "a shortened run" in text and "epochs: 20000 (config) -> " in text
    assert (out / "results.md").exists() and (out / "cells" / "nft_s0.9_seed0" / "results.json").exists()
    assert paper_run.main(args + ["--plan", "--seconds-per-step", "0.001", "--steps-per-epoch", "21"]) == 0
