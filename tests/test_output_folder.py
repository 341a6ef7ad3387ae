"""A run's output folder holds one run: everything a run writes there (results, plots, ``tensorboard/``,
``compact/``, ``rounds/``, ``ballot/``) is set aside as a whole when a new run starts, put back as a whole if
it fails and dropped if it succeeds; nothing in the folder is touched before its checks and lock have passed."""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest

from fairprune_jax.reporting import report
from fairprune_jax.running import outputs, runner
from fairprune_jax.running.cli import main
from fairprune_jax.training import checkpoint, tracking

TINY = ["--dataset", "digits", "--epochs", "1", "--finetune-epochs", "1", "--no-progress",
        "--model-opt", "hidden=[16]"]


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> content), the lock and the aside folder left out."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != outputs.LOCK_FILE}


def _fail_writing_results(monkeypatch):
    """The run fails as it writes its results (a full disk): after training, tensorboard and the method's files."""
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(report, "write_outputs", full)


# -- the declared entries and the set-aside / restore steps, without training -----------------------------

def test_every_entry_a_run_writes_is_declared():
    """The names methods save under (``ctx.save_masks`` / ``ctx.output_location``), the compacted model and
    the TensorBoard folder are output entries; checkpoints (kept for --resume) and the lock are not."""
    root = Path(runner.__file__).resolve().parents[1]
    written = set()
    for p in root.rglob("*.py"):
        for m in re.finditer(r"(?:save_masks|output_location)\(\s*f?[\"']([^\"'/{]+)", p.read_text()):
            written.add(m.group(1))
    assert {"rounds", "ballot"} <= written
    assert written | {runner.COMPACT_DIR, "tensorboard"} <= set(outputs.OUTPUT_ENTRIES)
    assert set(outputs.OUTPUT_FILES) <= set(outputs.OUTPUT_ENTRIES)
    assert checkpoint.CHECKPOINT_DIR not in outputs.OUTPUT_ENTRIES
    assert outputs.LOCK_FILE not in outputs.OUTPUT_ENTRIES and outputs.ASIDE_DIR not in outputs.OUTPUT_ENTRIES


def _earlier_run(out: Path) -> dict[str, bytes]:
    for name in ("results.json", "results.md"):
        (out / name).write_text(f"earlier {name}")
    for sub, files in (("rounds", [f"round_{r:02d}.npz" for r in range(1, 6)]), ("compact", ["architecture.json"]),
                       ("tensorboard", ["events.out.tfevents.1.old"]), ("ballot", ["votes.npz"])):
        (out / sub).mkdir(parents=True)
        for f in files:
            (out / sub / f).write_text(f"earlier {sub}/{f}")
    (out / checkpoint.CHECKPOINT_DIR).mkdir()
    (out / checkpoint.CHECKPOINT_DIR / "run.json").write_text("kept")
    return _tree(out)


def _new_run_writes(out: Path) -> None:
    (out / "rounds").mkdir()
    for r in (1, 2):
        (out / "rounds" / f"round_{r:02d}.npz").write_text("new")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.2.new").write_text("new")


def test_a_failed_run_puts_back_every_entry_as_a_whole(tmp_path):
    before = _earlier_run(tmp_path)
    with pytest.raises(RuntimeError, match="failed"):
        with outputs.replacing_outputs(tmp_path):
            assert sorted(p.name for p in tmp_path.iterdir()) == [outputs.ASIDE_DIR, checkpoint.CHECKPOINT_DIR]
            _new_run_writes(tmp_path)
            raise RuntimeError("failed")
    assert _tree(tmp_path) == before and not (tmp_path / outputs.ASIDE_DIR).exists()


def test_a_finished_run_drops_every_earlier_entry(tmp_path):
    _earlier_run(tmp_path)
    with outputs.replacing_outputs(tmp_path):
        _new_run_writes(tmp_path)
    assert sorted(_tree(tmp_path)) == [f"{checkpoint.CHECKPOINT_DIR}/run.json", "rounds/round_01.npz",
                                       "rounds/round_02.npz", "tensorboard/events.out.tfevents.2.new"]


def test_a_killed_runs_partial_entries_go_and_the_finished_ones_stay_aside(tmp_path):
    """A run killed with -9 left the run before it in the aside folder and its own partial rounds in the
    folder: a new run keeps the finished one aside (and puts it back when it fails too)."""
    aside = tmp_path / outputs.ASIDE_DIR
    aside.mkdir()
    before = _earlier_run(aside)
    _new_run_writes(tmp_path)               # the killed run's partial outputs
    with pytest.raises(RuntimeError):
        with outputs.replacing_outputs(tmp_path):
            assert not (tmp_path / "rounds").exists() and not (tmp_path / "tensorboard").exists()
            raise RuntimeError
    after = _tree(tmp_path)
    assert after == {k: v for k, v in before.items() if not k.startswith(checkpoint.CHECKPOINT_DIR)}


def test_the_tensorboard_tracker_touches_nothing_until_it_logs(tmp_path):
    logdir = tmp_path / "tensorboard"
    logdir.mkdir()
    (logdir / "events.out.tfevents.1.old").write_text("earlier")
    tb = tracking.TensorBoard(logdir)
    tb.close()
    assert [p.name for p in logdir.iterdir()] == ["events.out.tfevents.1.old"]
    tb = tracking.TensorBoard(tmp_path / "new" / "tensorboard")
    assert not (tmp_path / "new").exists()
    tb.close()


# -- fairprune run end to end -------------------------------------------------------------------------------

def test_tensorboard_with_out_an_existing_file_is_the_clear_out_error(tmp_path, capsys, no_training):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main(["run", *TINY, "--tensorboard", "--out", str(f)]) == 2
    err = capsys.readouterr().err
    assert "is an existing file, not a folder" in err and "Not a directory" not in err
    assert f.read_text() == "x"


def test_tensorboard_events_survive_a_failed_or_refused_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tb"
    argv = ["run", "--method", "magnitude", *TINY, "--tensorboard", "--out", str(out)]
    assert main(argv) == 0
    events = sorted((out / "tensorboard").glob(tracking.EVENT_GLOB))
    assert len(events) == 1 and tracking.read_scalars(out / "tensorboard")
    logdir = json.loads((out / "results.json").read_text())["tracking"]["logdir"]
    assert logdir == "tensorboard"
    before = _tree(out)
    # fails loading the data, after the folder is taken
    assert main([*argv, "--data-opt", "bogus=1"]) == 2
    assert "does not take option(s) 'bogus'" in capsys.readouterr().err
    assert _tree(out) == before
    # refused: another run holds the folder
    (out / outputs.LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                     "started": "now"}))
    assert main(argv) == 2
    assert "is in use by another fairprune run" in capsys.readouterr().err
    assert _tree(out) == before
    (out / outputs.LOCK_FILE).unlink()
    # fails after training, its own events written: they go, the earlier ones come back
    _fail_writing_results(monkeypatch)
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert _tree(out) == before and not (out / outputs.ASIDE_DIR).exists()


def test_a_compacted_model_belongs_to_its_run_only(tmp_path, monkeypatch, capsys):
    """0.9 with --save-compact, then 0.5 without into the same folder: no 0.9 model beside the 0.5 results;
    a failed 0.5 run with --save-compact puts the 0.9 model back with the 0.9 results."""
    base = ["run", "--method", "structured_magnitude", *TINY, "--out", str(tmp_path)]
    assert main([*base, "--sparsity", "0.9", "--save-compact"]) == 0
    assert (tmp_path / "compact" / "architecture.json").is_file()
    before = _tree(tmp_path)
    with monkeypatch.context() as m:
        _fail_writing_results(m)
        assert main([*base, "--sparsity", "0.5", "--save-compact"]) == 2
    assert _tree(tmp_path) == before
    assert main([*base, "--sparsity", "0.5"]) == 0
    assert not (tmp_path / "compact").exists() and not (tmp_path / outputs.ASIDE_DIR).exists()
    assert "compact" not in json.loads((tmp_path / "results.json").read_text())


def test_lottery_rounds_belong_to_their_run_only(tmp_path, monkeypatch):
    """lth at 0.9 (5 rounds), then at 0.3 (2 rounds): the folder holds the 2 rounds of the second run, not
    3 of the first beside them; a failed 0.3 run puts all 5 of the first back."""
    base = ["run", "--method", "lth", *TINY, "--out", str(tmp_path)]
    assert main([*base, "--sparsity", "0.9"]) == 0
    assert sorted(p.name for p in (tmp_path / "rounds").iterdir()) == [f"round_{r:02d}.npz" for r in range(1, 6)]
    before = _tree(tmp_path)
    with monkeypatch.context() as m:
        _fail_writing_results(m)
        assert main([*base, "--sparsity", "0.3"]) == 2
    assert _tree(tmp_path) == before
    assert main([*base, "--sparsity", "0.3"]) == 0
    assert sorted(p.name for p in (tmp_path / "rounds").iterdir()) == ["round_01.npz", "round_02.npz"]


def test_a_resumed_run_keeps_its_own_rounds_and_leaves_the_folder_for_the_next_resume(tmp_path):
    """A run killed with -9 wrote rounds 1-2 (and left the run before it aside); resumed from its checkpoints it
    will not write them again, so they stay in place; if the resumed run stops too, nothing is put back (the
    folder stays as the killed run left it, for the next --resume); when it finishes, the earlier run goes."""
    aside = tmp_path / outputs.ASIDE_DIR
    aside.mkdir()
    _earlier_run(aside)
    _new_run_writes(tmp_path)                           # the killed run's rounds 1-2 and events
    rounds = {k: v for k, v in _tree(tmp_path).items() if k.startswith("rounds/")}
    assert rounds
    with pytest.raises(RuntimeError):
        with outputs.replacing_outputs(tmp_path, resumed=True):
            assert {k: v for k, v in _tree(tmp_path).items() if k.startswith("rounds/")} == rounds
            raise RuntimeError
    assert {k: v for k, v in _tree(tmp_path).items() if k.startswith("rounds/")} == rounds and aside.is_dir()
    with outputs.replacing_outputs(tmp_path, resumed=True):
        (tmp_path / "rounds" / "round_03.npz").write_bytes(b"3")
    assert sorted(k for k in _tree(tmp_path) if k.startswith("rounds/")) == sorted([*rounds, "rounds/round_03.npz"])
    assert not aside.exists()


def test_a_failed_run_leaves_the_finished_runs_checkpoints(tmp_path, capsys):
    """A finished run's checkpoints are its stored weights: a new run in its folder that fails before it has a
    checkpoint of its own (it diverges at its first step) puts them back; one that finishes replaces them."""
    out = str(tmp_path / "run")
    base = [*TINY, "--method", "magnitude", "--checkpoint-every", "1000", "--no-dense-cache", "--out", out]
    assert main(["run", *base]) == 0
    first = checkpoint.read_final(out)
    assert main(["run", *base, "--lr", "1e30", "--optimizer", "sgd"]) != 0
    assert "diverged" in capsys.readouterr().err
    import jax
    import numpy as np
    a, b = jax.tree.leaves(first), jax.tree.leaves(checkpoint.read_final(out))
    assert len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert main(["run", *base, "--sparsity", "0.5"]) == 0
    assert not (tmp_path / "run" / checkpoint.PREVIOUS_DIR).exists()
