"""Running on several devices or processes (a fifteenth tester's round, docs/HARDENING.md rows 231-236): what
must not depend on the device count, who writes, and what is checked before long work. The two-process
refusals are in tests/test_multiprocess.py."""
import types

import numpy as np
import pytest

from fairprune_jax.data.base import Split, eval_batches


def test_wrapped_padding_repeats_real_rows_with_zero_weight():
    """pad="wrap" fills the last batch with the split's first rows (w = 0), not zero images: a pass with
    BatchNorm in training mode (FairGRAPE's importance) then normalises real rows with real statistics, where 61
    zero rows beside 3 real ones changed the importance by 20-94% per kernel."""
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3) + 1.0
    split = Split(x, np.arange(10) % 2, np.arange(10) % 3)
    zeros = list(eval_batches(split, 8))
    wrap = list(eval_batches(split, 8, pad="wrap"))
    assert len(wrap) == 2 and np.array_equal(wrap[0]["x"], zeros[0]["x"])
    last = wrap[1]
    np.testing.assert_array_equal(last["x"][:2], x[8:])
    np.testing.assert_array_equal(last["x"][2:], x[:6])                  # real rows, not zeros
    np.testing.assert_array_equal(last["w"], [1, 1, 0, 0, 0, 0, 0, 0])
    assert not np.any(zeros[1]["x"][2:])                                  # (the default for evaluation)
    tiny = list(eval_batches(Split(x[:2], np.zeros(2, int), np.zeros(2, int)), 5, pad="wrap"))[0]
    np.testing.assert_array_equal(tiny["x"], x[[0, 1, 0, 1, 0]])          # cycled when the split is shorter
    with pytest.raises(ValueError, match="padding"):
        list(eval_batches(split, 8, pad="edge"))


def test_fairgrape_importance_reads_no_zero_rows(monkeypatch):
    """FairGRAPE's importance pass asks for wrapped padding (its step may run BatchNorm in training mode)."""
    from fairprune_jax.techniques import group_importance as gi
    seen = {}

    def fake_sum(step, args, split, batch_size, **kw):
        seen.update(kw)
        return None
    monkeypatch.setattr(gi, "sum_over_split", fake_sum)
    gi.group_importance(None, {}, None, {}, {}, Split(np.zeros((3, 2), np.float32), np.zeros(3, int),
                                                      np.zeros(3, int)), 2, 2)
    assert seen["pad"] == "wrap"


def test_only_process_zero_writes_a_methods_mask_files(tmp_path, monkeypatch):
    """lth's rounds/round_NN.npz and ballot's votes.npz were written by every process into the shared folder."""
    import jax
    import jax.numpy as jnp
    from fairprune_jax.methods.base import Context
    ctx = types.SimpleNamespace(output_dir=str(tmp_path), output_location=lambda n: str(tmp_path / n))
    masks = {"w": jnp.ones((2, 2), bool)}
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    path = Context.save_masks(ctx, "rounds/round_01.npz", masks)
    assert path == str(tmp_path / "rounds" / "round_01.npz") and not (tmp_path / "rounds" / "round_01.npz").exists()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert Context.save_masks(ctx, "rounds/round_01.npz", masks) == path
    assert (tmp_path / "rounds" / "round_01.npz").is_file()
    assert not list((tmp_path / "rounds").glob("*.part"))                # written whole, then renamed


def test_a_suite_checks_every_comparisons_batch_against_the_devices_first(tmp_path, monkeypatch):
    """Grid a (batch 64) trained both its cells before grid b's batch 30 was refused on 4 devices, with a
    message naming neither b nor its batch_size; now nothing trains."""
    from fairprune_jax.running import compare
    from fairprune_jax.training import distributed
    for name, bs in (("a", 64), ("b", 30)):
        (tmp_path / f"{name}.toml").write_text(
            f'name = "{name}"\ndataset = "digits"\nmethods = ["magnitude"]\nsparsities = [0.7]\nseeds = [0]\n'
            f'out = "res/{name}"\n[run]\nepochs = 1\nbatch_size = {bs}\n')
    (tmp_path / "all.toml").write_text('name = "all"\nsuite = ["a.toml", "b.toml"]\nout = "res/all"\n')
    monkeypatch.setattr(distributed, "current_mesh", lambda: types.SimpleNamespace(devices=np.empty(4)))

    def boom(*a, **k):
        raise AssertionError("a comparison ran")
    monkeypatch.setattr(compare, "run_compare", boom)
    with pytest.raises(ValueError, match=r"batch_size = 30 of comparison 'b' .* 30 is not divisible by the 4 "
                                         r"devices.*nothing was trained"):
        compare.run_suite(compare.load_suite(tmp_path / "all.toml"), progress=False)
