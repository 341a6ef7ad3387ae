"""Eighth tester's round (interruption, resumption and reuse of outputs; docs/HARDENING.md rows 161-): a killed run's
set-aside results are named before they are replaced, a comparison holds its folder, a cell run again clears what a
killed attempt left, and a saved pruned start belongs to the dense model it was made from."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest

from fairprune_jax.running.compare import load_config, run_compare


def test_results_set_aside_by_a_killed_run_are_named_before_a_new_run_replaces_them(tmp_path):
    """Run 1 finished; run 2 (killed with -9) had moved its results into .previous-results/; run 3 replaced them
    without the warning that run 2 gave."""
    from fairprune_jax.running.outputs import ASIDE_DIR, set_aside_outputs
    aside = tmp_path / ASIDE_DIR
    aside.mkdir()
    (aside / "results.json").write_text(json.dumps({"method": "magnitude", "sparsity": {"target": 0.5},
                                                    "dataset": "digits"}))
    (tmp_path / "rounds").mkdir()                       # run 2's partial outputs
    with pytest.warns(UserWarning, match=r"earlier run's results \(magnitude at sparsity 0.5 on digits, in "
                                         r"\.previous-results/ since a later run into it stopped"):
        assert set_aside_outputs(tmp_path) == aside
    assert (aside / "results.json").exists() and not (tmp_path / "rounds").exists()
    with pytest.warns(UserWarning, match="stopped before it finished"):       # nothing else in the folder
        set_aside_outputs(tmp_path)


def test_arrays_digest_tells_models_apart():
    from fairprune_jax.training.caches import arrays_digest
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    b = {"w": a["w"].copy(), "b": a["b"].copy()}
    assert arrays_digest(a) == arrays_digest(b)
    b["w"][1, 2] += 1e-6
    assert arrays_digest(a) != arrays_digest(b)
    assert arrays_digest(a) != arrays_digest({"w": a["w"].reshape(3, 2), "b": a["b"]})


def _csv(path, seed):
    rng = np.random.default_rng(seed)
    n = 240
    grp = rng.choice(["a", "b"], n)
    x = rng.normal(size=(n, 3)).round(3)
    y = (x[:, 0] + 0.4 * (grp == "a") + rng.normal(scale=0.5, size=n) > 0).astype(int)
    path.write_text("x0,x1,x2,grp,label\n" + "\n".join(f"{a},{b},{c},{g},{t}" for (a, b, c), g, t in zip(x, grp, y)))


GRID = """
name = "lost"
dataset = "csv"
data_dir = "{data}"
methods = ["nft"]
sparsities = [0.8]
seeds = [0]
[dataset_options]
target = "label"
protected = "grp"
[run]
epochs = 1
finetune_epochs = 2
batch_size = 64
"""


@pytest.mark.slow
def test_a_grid_rerun_on_other_data_prunes_its_new_dense_model_again_and_a_cell_rerun_starts_clean(tmp_path):
    """The grid's dense folder kept the first data's gradually pruned start; after the data changed (and the
    cells were deleted, as the refusal advises) the new dense model was fine-tuned from the old model's start.
    A cell run again also kept the rounds a killed attempt had left in its folder, and a second comparison into a
    folder in use ran every cell beside the first."""
    data = tmp_path / "d.csv"
    _csv(data, 0)
    cfg = tmp_path / "g.toml"
    cfg.write_text(GRID.format(data=data.as_posix()))
    out = str(tmp_path / "out")
    run_compare(load_config(cfg, out=out), progress=False)
    cell = tmp_path / "out" / "cells" / "nft_s0.8_seed0"
    assert json.loads((cell / "results.json").read_text())["runtime"]["pruned_start_from_cache"] is False

    _csv(data, 1)                                              # other data: the cells go, the dense model retrains
    for p in cell.iterdir():
        if p.is_file():
            p.unlink()
    (cell / "rounds").mkdir(exist_ok=True)
    (cell / "rounds" / "round_09.npz").write_bytes(b"left by a killed attempt")
    lock = tmp_path / "out" / ".fairprune-run.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(ValueError, match="is in use by another fairprune run"):
        run_compare(load_config(cfg, out=out), progress=False)
    lock.unlink()
    run_compare(load_config(cfg, out=out), progress=False)
    res = json.loads((cell / "results.json").read_text())
    assert res["runtime"]["pruned_start_from_cache"] is False and res["runtime"]["dense_from_cache"] is False
    assert not (cell / "rounds").exists() and not (cell / ".previous-results").exists()


def test_a_resumed_fairgrape_run_says_its_iteration_log_is_partial():
    """A killed-and-resumed fairgrape run's iteration_log held 27 of 64 iterations, starting at 38, while
    iterations said 64: the record now says which iterations it covers."""
    from fairprune_jax.methods.fairgrape import resumed_log_note
    assert resumed_log_note([{"iteration": i} for i in range(1, 65)], 64) is None
    assert resumed_log_note([], 0) is None
    note = resumed_log_note([{"iteration": i} for i in range(38, 65)], 64)
    assert "resumed after iteration 37 of 64" in note and "38..64 only" in note
    assert "are empty" in resumed_log_note([], 64)


def test_save_compact_added_to_a_grid_names_the_finished_cells_without_a_compacted_model(tmp_path):
    """Adding [run] save_compact = true to a grid whose structured cells had finished wrote no compacted model and
    said nothing."""
    from fairprune_jax.running.compare import cell_dir
    cfg = tmp_path / "g.toml"
    cfg.write_text('name = "c"\ndataset = "digits"\nmethods = ["structured_magnitude", "magnitude"]\n'
                   'sparsities = [0.5]\nseeds = [0]\n[run]\nepochs = 1\nfinetune_epochs = 1\nsave_compact = true\n')
    cc = load_config(cfg, out=str(tmp_path / "out"))
    for m in cc.methods:                                   # finished cells as an earlier run left them
        d = cell_dir(cc, m, 0.5, 0)
        d.mkdir(parents=True)
        (d / "results.json").write_text("{}")
    import fairprune_jax.running.compare as compare
    with pytest.warns(UserWarning, match=r"save_compact = true, but 1 finished structured cell\(s\) ran without it "
                                         r"and are reused without a compacted model \(structured_magnitude_s0.5_seed0\)"):
        with pytest.raises(ValueError, match=r"not a finished cell.s results \(no config, dense, pruned, sparsity\)"):
            compare.run_compare(cc, progress=False)


def test_a_file_where_a_run_keeps_a_folder_is_refused_before_training(tmp_path):
    """A file named checkpoints in --out failed the run a minute in (when the first checkpoint was written) with a
    bare [Errno 17]; a file at a grid's cell folder failed the grid after that cell had been computed."""
    from fairprune_jax.running.outputs import check_out_dir
    (tmp_path / "checkpoints").write_text("my notes")
    with pytest.raises(ValueError, match="holds a file named checkpoints"):
        check_out_dir(tmp_path)
    cfg = tmp_path / "g.toml"
    cfg.write_text('name = "c"\ndataset = "digits"\nmethods = ["magnitude"]\nsparsities = [0.5]\nseeds = [0]\n')
    cc = load_config(cfg, out=str(tmp_path / "out"))
    (tmp_path / "out" / "cells").mkdir(parents=True)
    (tmp_path / "out" / "cells" / "magnitude_s0.5_seed0").write_text("")
    with pytest.raises(ValueError, match="cell folder.* of the grid are files"):
        run_compare(cc, progress=False)


def test_results_json_is_written_last_and_a_failing_plot_does_not_cost_it(tmp_path, monkeypatch):
    """A grid killed between a cell's results.json (its 'finished' mark) and its plots left a cell that never got
    them."""
    from fairprune_jax.reporting import report
    seen = {}
    real = report.write_json_atomic

    def spy(results, path):
        seen["before_json"] = sorted(p.name for p in path.parent.iterdir())
        return real(results, path)
    monkeypatch.setattr(report, "write_json_atomic", spy)
    monkeypatch.setattr(report, "markdown_report", lambda r: "# report\n")

    def broken(results, path):
        raise RuntimeError("no display")
    monkeypatch.setattr(report, "plot_group_accuracy", broken)
    with pytest.warns(UserWarning, match="group_accuracy.png could not be drawn .RuntimeError: no display."):
        paths = report.write_outputs({"method": "m"}, tmp_path / "run")
    assert seen["before_json"] == ["results.md"] and (tmp_path / "run" / "results.json").exists()
    assert "png" not in paths


def test_a_resumed_run_names_the_earlier_results_an_interrupt_put_back(tmp_path):
    """Run A finished; run B was interrupted (A's results put back beside B's checkpoints); the --resume command
    B printed then replaced A's results without a word. Resuming a finished run (to add --save-compact) keeps
    its own results quietly."""
    import warnings
    from fairprune_jax.running.outputs import RESUMED_ENTRIES, restore_outputs, set_aside_outputs
    (tmp_path / "results.json").write_text(json.dumps({"method": "magnitude", "sparsity": {"target": 0.5},
                                                      "dataset": "digits"}))
    with pytest.warns(UserWarning, match=r"holds an earlier run's results \(magnitude at sparsity 0.5"):
        aside = set_aside_outputs(tmp_path, keep=RESUMED_ENTRIES)
    restore_outputs(tmp_path, aside)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aside = set_aside_outputs(tmp_path, keep=RESUMED_ENTRIES, own_results=True)
    assert (aside / "results.json").exists()


def test_a_ctrl_c_that_python_drops_still_stops_training(tiny_models):
    """SIGINT landing in a JAX garbage-collector callback was printed as 'Exception ignored in' and the run went
    on to finish, replacing the results the user pressed Ctrl-C to keep (2 of 10 tries)."""
    import signal
    import optax
    from fairprune_jax.core import notices
    from fairprune_jax.data.base import Split
    from fairprune_jax.training.train import create_state, fit, make_train_step

    class Dropper:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)          # the handler's KeyboardInterrupt is ignored in __del__

    fm, params, ms = tiny_models["mlp"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 10)).astype(np.float32)
    split = Split(x, (x[:, 0] > 0).astype(np.int32), rng.integers(0, 2, 64))
    tx = optax.sgd(0.1)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal (the runner may ignore it)
    try:
        with notices.interrupts_kept():
            d = Dropper()
            del d
            with pytest.raises(KeyboardInterrupt):
                fit(create_state(params, ms, tx, seed=0), make_train_step(fm, tx), split, epochs=1, batch_size=16,
                    seed=0, desc="t", progress=False)
        notices.raise_if_interrupted()                       # the request ends with the block
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # a process that ignores SIGINT (a script's background job) keeps ignoring it: Ctrl-C in the script's
        # terminal must not stop the job
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with notices.interrupts_kept():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
        notices.raise_if_interrupted()
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_run_and_a_grid_do_not_share_a_folder(tmp_path):
    """fairprune run --out GRID replaced the grid's results.json / results.md; the grid rerun then replaced the
    run's, leaving its plot among the grid's."""
    from fairprune_jax.running.outputs import check_out_dir
    grid = tmp_path / "grid"
    (grid / "cells").mkdir(parents=True)
    with pytest.raises(ValueError, match="is the folder of a comparison"):
        check_out_dir(grid)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"method": "nft", "pruned": {}}))
    cfg = tmp_path / "g.toml"
    cfg.write_text('name = "c"\ndataset = "digits"\nmethods = ["magnitude"]\nsparsities = [0.5]\nseeds = [0]\n')
    with pytest.raises(ValueError, match="holds the results of a single run"):
        run_compare(load_config(cfg, out=str(run)), progress=False)
