"""Checkpoint and resume (orbax): in-process phase mechanics, and a real ``fairprune run`` killed with SIGKILL.

The subprocess runs share a persistent XLA compilation cache (a per-session
folder), so only the first one pays for compiling; the cached executables are
the same programs, so the numbers do not depend on it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import fast_compile_flags

from fairprune_jax.training import checkpoint
from fairprune_jax.sparsity import masks as masks_lib, scores
from fairprune_jax.running import runner
from fairprune_jax.training.checkpoint import CheckpointMismatchError, Checkpointer
from fairprune_jax.running.cli import main
from fairprune_jax.data.base import Split, train_batches
from fairprune_jax.training.train import create_state, fit, make_train_step

# ---------------------------------------------------------------------------
# In-process: one or two fit phases on a tiny MLP
# ---------------------------------------------------------------------------

CFG = {"method": "toy", "seed": 0}


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def toy(tiny_models):
    fm, params, ms = tiny_models["mlp"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 10)).astype(np.float32)
    split = Split(x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1), rng.integers(0, 3, 96))
    tx = optax.adam(1e-2)
    template = masks_lib.prunable_template(params)
    return fm, params, ms, split, tx, make_train_step(fm, tx), template


def _prune_hook(template, points, stop_at=None):
    """A gmp-like hook (pure in (state, step)); ``stop_at`` simulates a crash before that step."""
    @checkpoint.resumable
    def hook(state, step):
        if stop_at is not None and step == stop_at:
            raise Interrupt(step)
        if step not in points:
            return state
        m = masks_lib.masks_from_scores(scores.magnitude(state.params, template), template, points[step],
                                        prev_masks=state.masks)
        return state.replace(masks=m, params=masks_lib.apply_masks(state.params, m))
    return hook


def _two_phases(toy, hook, counter=None):
    fm, params, ms, split, tx, step, template = toy

    def counted(state, batch):
        if counter is not None:
            counter.append(1)
        return step(state, batch)

    s0 = create_state(params, ms, tx, masks=masks_lib.ones_like_template(params, template), seed=1)
    s1, h1 = fit(s0, counted, split, epochs=2, batch_size=16, seed=5, desc="first", progress=False)
    s2, h2 = fit(s1, counted, split, epochs=3, batch_size=16, seed=6, desc="second (pruning)", hook=hook,
                 progress=False)
    return s2, h1, h2


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_interrupted_phase_resumes_to_the_uninterrupted_result(toy, tmp_path, monkeypatch):
    points = {0: 0.3, 7: 0.6, 12: 0.8}
    template = toy[-1]
    with checkpoint.use(Checkpointer(tmp_path / "a", CFG, every=4)):
        ref, h1_ref, h2_ref = _two_phases(toy, _prune_hook(template, points))

    d = tmp_path / "b"
    with checkpoint.use(Checkpointer(d, CFG, every=4)), pytest.raises(Interrupt):
        _two_phases(toy, _prune_hook(template, points, stop_at=14))   # 18 steps in phase 2
    assert (d / "00-first" / "final").is_dir()
    assert sorted(p.name for p in (d / "01-second-pruning" / "partial").iterdir()) == ["12"]
    assert not (d / "01-second-pruning" / "final").exists()

    # A fresh run into an unfinished checkpoint folder is refused; --resume continues it.
    with pytest.raises(ValueError, match="unfinished run; pass --resume"):
        Checkpointer(d, CFG, every=4)
    # A crash while writing leaves only a temporary folder: it is ignored (and cleaned up).
    junk = d / "01-second-pruning" / "partial" / "16.orbax-checkpoint-tmp-1234"
    junk.mkdir()
    (junk / "garbage").write_bytes(b"\0" * 10)

    steps: list[int] = []
    ck = Checkpointer(d, CFG, every=4, resume=True)
    assert ck.resumed
    with checkpoint.use(ck):
        got, h1, h2 = _two_phases(toy, _prune_hook(template, points), counter=steps)
    assert len(steps) == 18 - 12          # phase 1 skipped, phase 2 continued after step 12
    assert h1["restored"] and h1["loss"] == h1_ref["loss"]
    assert h2["loss"] == h2_ref["loss"] and h2["accuracy"] == h2_ref["accuracy"]
    _same(ref, got)
    assert float(masks_lib.sparsity_summary(got.params, got.masks)["sparsity_prunable"]) > 0.75
    assert not junk.exists()


def test_default_checkpoints_start_only_once_the_run_has_lasted_their_delay(toy, tmp_path, monkeypatch):
    """``after_s``: nothing is written (not even the folder) until the run has lasted that long; from then on the
    usual saves, and a run killed after that resumes to the uninterrupted result."""
    clock = [0.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
    points = {0: 0.3, 7: 0.6, 12: 0.8}
    template = toy[-1]
    short = tmp_path / "short"
    ck = Checkpointer(short, CFG, every=4, after_s=60)
    with checkpoint.use(ck):
        ref, _, _ = _two_phases(toy, _prune_hook(template, points))
    ck.mark_complete()
    assert not short.exists()                      # a short run writes nothing

    def late(state, s):                            # the clock passes 60 s during the second phase, at step 5
        clock[0] = 100.0 if s >= 5 else 0.0
        return _prune_hook(template, points, stop_at=14)(state, s)

    d = tmp_path / "long"
    clock[0] = 0.0
    with checkpoint.use(Checkpointer(d, CFG, every=4, after_s=60)), pytest.raises(Interrupt):
        _two_phases(toy, checkpoint.resumable(late))
    assert not (d / "00-first").exists()           # finished before the delay: not saved
    assert sorted(p.name for p in (d / "01-second-pruning" / "partial").iterdir()) == ["12"]
    assert json.loads((d / checkpoint.RUN_FILE).read_text())["complete"] is False
    with checkpoint.use(Checkpointer(d, CFG, every=4, resume=True)):
        got, _, _ = _two_phases(toy, _prune_hook(template, points))
    _same(ref, got)                                # the first phase trained again, the second continued


def test_cli_default_checkpoint_rule():
    from fairprune_jax.running.cli import CHECKPOINT_AFTER_S, CHECKPOINT_EVERY, checkpoint_plan
    assert checkpoint_plan(None, False) == (CHECKPOINT_EVERY, CHECKPOINT_AFTER_S)
    assert checkpoint_plan(None, True) == (CHECKPOINT_EVERY, 0.0)     # processes' clocks must not decide alone
    assert checkpoint_plan(5, False) == (5, 0.0) and checkpoint_plan(0, False) == (0, 0.0)


def test_hook_with_host_state_is_not_checkpointed(toy, tmp_path):
    fm, params, ms, split, tx, step, template = toy
    seen = []

    def stateful(state, s):   # not marked resumable: keeps host state
        seen.append(s)
        return state

    with checkpoint.use(Checkpointer(tmp_path, CFG, every=2)):
        s0 = create_state(params, ms, tx, seed=1)
        fit(s0, step, split, epochs=1, batch_size=16, seed=5, desc="votes", hook=stateful, progress=False)
    assert seen == list(range(6))
    assert not list(tmp_path.glob("00-*"))


def test_save_is_an_atomic_rename_and_a_crash_mid_write_falls_back(toy, tmp_path, monkeypatch):
    """orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it; without the rename there is no checkpoint."""
    from orbax.checkpoint._src.path import async_path

    fm, params, ms, split, tx, step, template = toy
    renames = []
    real = async_path.rename

    async def spy(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        return await real(src, dst)

    monkeypatch.setattr(async_path, "rename", spy)
    ck = Checkpointer(tmp_path, CFG, every=3)
    phase = ck.phase("p")
    state = create_state(params, ms, tx, seed=1)
    phase.save(state, epoch=0, step_in_epoch=3, global_step=3, history={}, epoch_stats=[], final=False)
    # items are written inside the step's temporary folder, which is renamed last
    assert renames[-1][0].startswith("3.orbax-checkpoint-tmp") and renames[-1][1] == "3"
    assert all(src.endswith("orbax-checkpoint-tmp") for src, _ in renames[:-1])

    async def crash(src, dst):
        if Path(dst).name.isdigit():
            raise OSError("killed before the rename")
        return await real(src, dst)

    monkeypatch.setattr(async_path, "rename", crash)
    state2, _ = step(state, next(iter(train_batches(split, 16, 0))))
    with pytest.raises(Exception):
        phase.save(state2, epoch=0, step_in_epoch=6, global_step=6, history={}, epoch_stats=[], final=False)
    phase.close()
    monkeypatch.setattr(async_path, "rename", real)
    names = sorted(p.name for p in (tmp_path / "00-p" / "partial").iterdir())
    assert "3" in names and "6" not in names and any(n.startswith("6.orbax-checkpoint-tmp") for n in names)
    restored, pos = Checkpointer(tmp_path, CFG, every=3, resume=True).phase("p").restore(state)
    assert pos["global_step"] == 3 and not pos["final"]


def test_resume_without_checkpoints_says_it_starts_afresh(tmp_path):
    with pytest.warns(Warning, match="holds no checkpoints of a run, so this run starts from the beginning"):
        ck = Checkpointer(tmp_path / "none", CFG, every=2, resume=True)
    assert not ck.resumed


def test_resume_with_another_config_or_state_is_refused(toy, tmp_path):
    fm, params, ms, split, tx, step, template = toy
    ck = Checkpointer(tmp_path, {**CFG, "model": "mlp"}, every=2)
    ph = ck.phase("dense")
    ph.save(create_state(params, ms, tx, seed=1), epoch=0, step_in_epoch=2, global_step=2, history={},
            epoch_stats=[], final=False)
    with pytest.raises(CheckpointMismatchError, match=r"different run \(model: checkpoint 'mlp' vs now 'cnn'\)"):
        Checkpointer(tmp_path, {**CFG, "model": "cnn"}, every=2, resume=True)
    # same fingerprint, but the state does not fit (e.g. code changed the model): a clear error, not orbax's
    other = create_state({"w": jnp.zeros((3, 3))}, {}, tx, seed=1)
    with pytest.raises(CheckpointMismatchError, match="cannot be read as the state of phase 'dense'"):
        Checkpointer(tmp_path, {**CFG, "model": "mlp"}, every=2, resume=True).phase("dense").restore(other)
    with pytest.raises(CheckpointMismatchError, match="00-dense is of another phase than this run's phase 00"):
        Checkpointer(tmp_path, {**CFG, "model": "mlp"}, every=2, resume=True).phase("prune").restore(other)


# ---------------------------------------------------------------------------
# A real run, killed with SIGKILL in the CEAG fine-tuning phase, then resumed
# ---------------------------------------------------------------------------

RUN = [sys.executable, "-m", "fairprune_jax.running.cli", "run", "--dataset", "digits", "--method", "ceag",
       "--epochs", "1", "--finetune-epochs", "2", "--checkpoint-every", "5", "--no-progress", "--seed", "1"]
CEAG_PHASE = "02-fine-tune-ceag"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # the test run's own compilation cache when it has one (tests/conftest.py): the runs here compile the programs
    # the in-process digits runs of the suite compiled already
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("xla"))
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONWARNINGS="ignore")
    # the runs compared here share the suite's compile setting (tests/conftest.py); no other XLA flag of the caller
    e["XLA_FLAGS"] = " ".join(fast_compile_flags(e.get("XLA_FLAGS", "")))
    return e


def _run(out: Path, env: dict, *extra: str) -> dict:
    p = subprocess.run([*RUN, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("full")
    return out, _run(out, env)


def _strip(d):
    """Drop wall-clock fields (and the "restored" flag of skipped phases) before comparing results."""
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in ("seconds", "restored")}
    return d


def _finished(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


#: Runs the CLI and kills itself (SIGKILL) inside the n-th write of a mid-phase checkpoint of the CEAG phase:
#: after orbax has written the step's files into its temporary folder, before the rename that commits them.
KILL_IN_WRITE = r"""
import os, signal, sys
from pathlib import Path
from orbax.checkpoint._src.path import async_path
from fairprune_jax.running.cli import main
phase, nth = sys.argv[1], int(sys.argv[2])
real, seen = async_path.rename, []

async def rename(src, dst):
    src, dst = Path(src), Path(dst)
    if dst.name.isdigit() and dst.parent.name == "partial" and dst.parent.parent.name == phase:
        seen.append(dst.name)
        if len(seen) == nth:
            print(f"KILLED writing {dst.parent / src.name}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return await real(src, dst)

async_path.rename = rename
sys.exit(main(sys.argv[3:]))
"""


def test_killed_run_resumes_to_the_same_masks_and_metrics(uninterrupted, tmp_path, env, capsys):
    """SIGKILL in the middle of writing the CEAG phase's second mid-phase checkpoint, then ``--resume``."""
    ref_dir, ref = uninterrupted
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, CEAG_PHASE, "2", *RUN[3:], "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "KILLED writing" in proc.stdout
    partial = out / "checkpoints" / CEAG_PHASE / "partial"
    assert not (out / "results.json").exists()
    assert _finished(partial) == ["5"], "the first mid-phase checkpoint is complete"
    assert any(".orbax-checkpoint-tmp" in p.name for p in partial.iterdir()), "the second was cut mid-write"
    assert not (out / "checkpoints" / CEAG_PHASE / "final").exists()
    assert (out / "checkpoints" / "01-prune-gmp" / "final").is_dir()

    # without --resume the unfinished checkpoints are not silently overwritten
    assert main([*RUN[3:], "--out", str(out)]) == 2
    assert "unfinished run; pass --resume" in capsys.readouterr().err
    # resuming with another model is refused before any work
    assert main([*RUN[3:], "--out", str(out), "--resume", "--model-opt", "hidden=(32,)"]) == 2
    assert "different run (model_options: checkpoint {} vs now {'hidden': [32]})" in capsys.readouterr().err

    res = _run(out, env, "--resume")
    assert res["runtime"]["resumed"] is True
    assert not partial.exists()     # the phase finished: its mid-phase folder, half-written one included, is gone
    for key in ("dense", "pruned", "sparsity", "method_info", "history"):
        assert _strip(res[key]) == _strip(ref[key]), key
    a, b = checkpoint.read_final(ref_dir), checkpoint.read_final(out)
    assert a["phase"] == b["phase"] == CEAG_PHASE
    for part in ("masks", "params", "extra"):
        for x, y in zip(jax.tree.leaves(a["state"][part]), jax.tree.leaves(b["state"][part])):
            np.testing.assert_array_equal(x, y)


def test_same_seed_same_results(uninterrupted, tmp_path, env):
    """Determinism: a second run with the same seed gives identical metrics, masks and params."""
    ref_dir, ref = uninterrupted
    res = _run(tmp_path, env)
    for key in ("dense", "pruned", "sparsity", "method_info", "history"):
        assert _strip(res[key]) == _strip(ref[key]), key
    a, b = checkpoint.read_final(ref_dir), checkpoint.read_final(tmp_path)
    for x, y in zip(jax.tree.leaves(a["state"]), jax.tree.leaves(b["state"])):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("phase", ["00-dense", "01-prune-gmp"])
def test_killed_in_any_phase_resumes_to_the_same_results(uninterrupted, tmp_path, env, phase):
    """SIGKILL mid-write in the dense and in the pruning phase too (the CEAG phase: the test above), then
    ``--resume``: the same results as the uninterrupted run; the killed run's folder lock does not block it."""
    ref_dir, ref = uninterrupted
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, phase, "2", *RUN[3:], "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / runner.LOCK_FILE).exists()          # left behind by the killed process
    res = _run(out, env, "--resume")
    assert res["runtime"]["resumed"] is True and not (out / runner.LOCK_FILE).exists()
    for key in ("dense", "pruned", "sparsity", "method_info", "history"):
        assert _strip(res[key]) == _strip(ref[key]), key


def test_a_delayed_run_killed_before_its_first_checkpoint_leaves_the_finished_runs_for_resume(toy, tmp_path):
    """A finished with checkpoints; B (default delayed checkpoints) was killed before its first one, having moved
    A's aside; A's command with --resume then found none, retrained from the start and dropped them. A's
    checkpoints now stay in place until B writes its own, and go when B finishes without writing any."""
    fm, params, ms, split, tx, step, template = toy
    a = Checkpointer(tmp_path, {**CFG, "model": "mlp"}, every=2)
    a.phase("dense").save(create_state(params, ms, tx, seed=1), epoch=0, step_in_epoch=2, global_step=2,
                          history={}, epoch_stats=[], final=True)
    a.mark_complete()
    b = Checkpointer(tmp_path, {**CFG, "model": "cnn"}, every=2, after_s=3600)    # ... killed here
    assert not b.started and (tmp_path / "run.json").exists()
    again = Checkpointer(tmp_path, {**CFG, "model": "mlp"}, every=2, resume=True)
    assert again.resumed and again.resumed_complete
    b = Checkpointer(tmp_path, {**CFG, "model": "cnn"}, every=2, after_s=3600)    # ... finishes before a save
    b.mark_complete()
    assert not tmp_path.exists() or not any(tmp_path.glob("[0-9][0-9]-*"))
    c = Checkpointer(tmp_path, {**CFG, "model": "cnn"}, every=2)                  # an immediate one: moved at once
    assert not any(tmp_path.glob("[0-9][0-9]-*")) and c.started
