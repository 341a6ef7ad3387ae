"""A tour of bad inputs: each gives a clear error, or a documented behaviour (docs/HARDENING.md), never a silent
wrong number. Cheap checks first (they fail before any training); a few tiny runs on a toy dataset last."""
from __future__ import annotations

import json
import re
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairprune_jax.constraints import constrained
from fairprune_jax.training import distributed
from fairprune_jax.metrics import fairness
from fairprune_jax.training.checkpoint import CheckpointMismatchError, Checkpointer
from fairprune_jax.running.compare import load_config
from fairprune_jax.data import load_dataset
from fairprune_jax.data.base import Dataset, Split
from fairprune_jax.methods.base import RunConfig
from fairprune_jax.methods.ceag import ceag_terms
from fairprune_jax.running.runner import prepare, run, run_method

G = 3


def toy(n: int = 192, *, seed: int = 0, train_without: int | None = None, test_without: int | None = None,
        dim: int = 6) -> Dataset:
    """A small separable binary task with three groups; optionally one group missing from train or test."""
    rng = np.random.default_rng(seed)

    def split(m: int, without: int | None) -> Split:
        x = rng.normal(size=(m, dim)).astype(np.float32)
        g = rng.integers(0, G, m)
        if without is not None:
            g[g == without] = (without + 1) % G
        return Split(x, (x[:, 0] + 0.3 * g > 0.3).astype(np.int32), g)

    return Dataset("toy", split(n, train_without), split(n // 2, test_without), [f"g{i}" for i in range(G)],
                   ["grp"], ["0", "1"])


def cfg(**kw) -> RunConfig:
    base = dict(method="magnitude", dataset="digits", model="mlp", model_options={"hidden": (16,)}, epochs=1,
                finetune_epochs=1, batch_size=32, sparsity=0.5, progress=False)
    return RunConfig(**{**base, **kw})


# ---------------------------------------------------------------------------
# Shapes and values: errors before any training
# ---------------------------------------------------------------------------

def test_labels_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"labels y must have shape \(10,\) to match x \(10, 4\); got \(10, 1\)"):
        Split(np.zeros((10, 4)), np.zeros((10, 1)), np.zeros(10))
    with pytest.raises(ValueError, match=r"group ids g must have shape \(10,\)"):
        Split(np.zeros((10, 4)), np.zeros(10), np.zeros(9))


def test_features_of_different_shapes_across_splits():
    ds = toy()
    ds.test = Split(np.zeros((8, 5), np.float32), np.zeros(8), np.zeros(8))
    with pytest.raises(ValueError, match=r"split 'test' has feature shape \(5,\), train has \(6,\)"):
        run(cfg(), ds)


def test_one_dimensional_features():
    ds = toy()
    ds.train = Split(np.zeros(64, np.float32), np.zeros(64), np.zeros(64))
    ds.test = Split(np.zeros(8, np.float32), np.zeros(8), np.zeros(8))
    with pytest.raises(ValueError, match=r"features must have shape \(n, d\).*got \(64,\).*x\[:, None\]"):
        run(cfg(model=None), ds)


def test_model_that_does_not_fit_the_input():
    with pytest.raises(ValueError, match=r"model 'cnn' needs images of shape \(H, W, C\).*--model mlp"):
        run(cfg(model="cnn", model_options={}), toy())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_features(bad):
    ds = toy()
    ds.train.x[[3, 7], 2] = bad
    with pytest.raises(ValueError, match="split 'train' has 2 rows with NaN or Inf features; clean or impute"):
        run(cfg(), ds)


def test_group_or_label_ids_out_of_range():
    ds = toy()
    ds.test.g[0] = G
    with pytest.raises(ValueError, match=r"split 'test' has group ids in \[0, 3\] but only 3 group names"):
        run(cfg(), ds)
    ds = toy()
    ds.train.y[0] = -1
    with pytest.raises(ValueError, match=r"split 'train' has labels in \[-1, 1\]"):
        run(cfg(), ds)


def test_empty_test_split():
    ds = toy()
    ds.test = Split(np.zeros((0, 6), np.float32), np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="split 'test' is empty"):
        run(cfg(), ds)


@pytest.mark.parametrize("s", [1.0, -0.1, 1.5, "0.9"])
def test_sparsity_out_of_range(s):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        run(cfg(sparsity=s), toy())


def test_batch_size_too_large_or_not_positive():
    with pytest.raises(ValueError, match=r"--batch-size 500 is larger than the training split \(192 rows\)"):
        run(cfg(batch_size=500), toy())
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        run(cfg(batch_size=0), toy())


def test_batch_size_not_divisible_by_the_devices():
    fake8 = types.SimpleNamespace(devices=np.empty(8))
    with pytest.raises(ValueError, match=r"--batch-size 60 is not divisible by the 8 devices.*\(e\.g\. 56 or 64\)"):
        distributed.check_batch_size(60, fake8)
    distributed.check_batch_size(64, fake8)
    assert distributed.round_up(500, fake8) == 504   # evaluation pads instead (rows with w = 0)


@pytest.mark.parametrize("spec,msg", [(0, "positive integer or 'all'"), ("two", "positive integer or 'all'"),
                                      (10_000, "only 1 cpu device")])
def test_bad_device_count(spec, msg):
    with pytest.raises(ValueError, match=msg):
        run(cfg(), toy(), devices=spec)


def test_unknown_method_option():
    with pytest.raises(ValueError, match=r"method 'ceag' has no option\(s\) \['epsilon'\]; valid options: .*eps"):
        run(cfg(method="ceag", method_options={"epsilon": 0.1}), toy())


def test_renamed_option_names_its_new_name_and_old_order_value_still_reads():
    """The dual step's ``mode`` option is now ``order`` (the names of dual.ORDERS): the old key is refused
    with the new one named, and the old value ``alternating`` still means ``dual_primal``."""
    from fairprune_jax.methods import get_method
    with pytest.raises(ValueError, match=r"\['mode'\] \(mode is now called order\)"):
        get_method("ceag").parse({"mode": "alternating"})
    for m in ("ceag", "el", "bifp"):
        assert get_method(m).parse({}).order == "dual_primal"
        assert get_method(m).parse({"order": "alternating"}).order == "alternating"   # read as dual_primal
    from fairprune_jax.constraints import dual
    assert dual.order_name("alternating") == "dual_primal" and dual.order_name("simultaneous") == "simultaneous"
    with pytest.raises(ValueError, match="dual_primal"):
        dual.order_name("backwards")


# ---------------------------------------------------------------------------
# Checkpoints and configs
# ---------------------------------------------------------------------------

def test_checkpoint_options(tmp_path):
    with pytest.raises(ValueError, match="--checkpoint-every must be >= 0"):
        run(cfg(out=str(tmp_path)), toy(), checkpoint_every=-1)
    with pytest.raises(ValueError, match="--resume needs checkpoints"):
        run(cfg(out=str(tmp_path)), toy(), resume=True)
    with pytest.raises(ValueError, match="checkpoints need an output folder"):
        run(cfg(), toy(), checkpoint_every=10)
    # --resume without any checkpoints yet is a fresh start (a preemptible job can always pass --resume)
    assert Checkpointer(tmp_path / "none", cfg(), every=5, resume=True).resumed is False
    assert (tmp_path / "none" / "run.json").is_file()


def test_resume_from_a_checkpoint_of_a_different_model(tmp_path):
    Checkpointer(tmp_path / "checkpoints", cfg(model="mlp", out=str(tmp_path)), every=5)  # an unfinished MLP run
    (tmp_path / "checkpoints" / "00-dense").mkdir()                                      # that saved a phase
    with pytest.raises(CheckpointMismatchError, match=r"different run \(model: checkpoint 'mlp' vs now 'cnn'; "
                                                      r"model_options: .*'hidden': \[16\].* vs now .*'hidden': 16"):
        run(cfg(model="cnn", model_options={"hidden": 16}, out=str(tmp_path)), toy(), checkpoint_every=5,
            resume=True)
    with pytest.raises(ValueError, match="unfinished run; pass --resume"):
        run(cfg(model="mlp", out=str(tmp_path)), toy(), checkpoint_every=5)


def test_compare_config_with_an_unknown_key(tmp_path):
    p = tmp_path / "grid.toml"
    p.write_text('dataset = "digits"\nmethods = ["ceag"]\nsparsities = [0.9]\nseeds = [0]\nepochs = 3\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epochs'\]; valid keys: .*run"):
        load_config(p)
    p.write_text('dataset = "digits"\nmethods = ["ceag"]\nsparsities = [0.9]\nseeds = [0]\n[run]\nepoch = 3\n')
    with pytest.raises(ValueError, match=r"unknown \[run\] key\(s\) \['epoch'\]; valid: .*epochs"):
        load_config(p)
    p.write_text('dataset = "digits"\nmethods = ["ceag"]\nsparsities = [0.9]\nseeds = [0]\n'
                 '[method_options.ceag]\nepsilon = 0.1\n')
    with pytest.raises(ValueError, match=r"has no option\(s\) \['epsilon'\]"):
        load_config(p)


# ---------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------

def _faces(d, n_per_cell=3):
    from PIL import Image
    d.mkdir(parents=True, exist_ok=True)
    k = 0
    for race in range(2):
        for gender in range(2):
            for _ in range(n_per_cell):
                arr = np.full((12, 12, 3), 20 * k % 256, np.uint8)
                Image.fromarray(arr).save(d / f"{20 + k}_{gender}_{race}_2017011617452{k:04d}.jpg.chip.jpg",
                                          format="PNG")
                k += 1
    return k


@pytest.mark.filterwarnings("ignore:utkface.*no rows after filtering")
def test_corrupt_image_file_is_skipped_counted_and_warned(tmp_path):
    d = tmp_path / "faces"
    n = _faces(d)
    (d / "30_0_1_20170101000000001.jpg.chip.jpg").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match=r"skipped 1 image file\(s\) that could not be decoded"):
        ds = load_dataset("utkface", str(d), image_size=8, cache_dir=str(tmp_path / "cache"), test_fraction=0.25)
    assert ds.meta["skipped_corrupt_images"] == 1
    assert len(ds.train) + len(ds.test) == n
    assert np.isfinite(ds.train.x).all()
    for p in d.iterdir():
        p.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of the .* images .* could be decoded"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dataset("utkface", str(d), image_size=8, cache_dir=str(tmp_path / "cache2"))


def _csv(tmp_path, extra=""):
    rng = np.random.default_rng(0)
    rows = ["age,color,sex,income"]
    for _ in range(80):
        rows.append(f"{int(rng.integers(18, 80))},{rng.choice(['red', 'blue'])},{rng.choice(['F', 'M'])},"
                    f"{rng.choice(['high', 'low'])}")
    p = tmp_path / "t.csv"
    p.write_text("\n".join(rows) + "\n" + extra)
    return p


def test_csv_with_missing_values(tmp_path):
    p = _csv(tmp_path, "30,,F,low\n31,red,?,high\n,blue,M,low\n32,red,M,NA\n")
    ds = load_dataset("csv", str(p), target="income", protected="sex")
    assert ds.meta["rows_dropped_missing_total"] == 4
    assert ds.meta["missing_values_per_column"] == {"age": 1, "color": 1, "sex": 1, "income": 1}
    assert len(ds.train) + len(ds.test) == 80 and np.isfinite(ds.train.x).all()
    kept = load_dataset("csv", str(p), target="income", protected="sex", drop_missing=False)
    assert len(kept.train) + len(kept.test) == 82   # missing features kept (imputed); label/group rows dropped
    assert np.isfinite(kept.train.x).all() and np.isfinite(kept.test.x).all()


def test_csv_with_an_unknown_column(tmp_path):
    p = _csv(tmp_path)
    with pytest.raises(ValueError, match=r"unknown target column 'salary'; valid columns: age, color, sex, income"):
        load_dataset("csv", str(p), target="salary", protected="sex")
    with pytest.raises(ValueError, match=r"unknown protected column 'gender'.*valid choices: age, color, sex"):
        load_dataset("csv", str(p), target="income", protected="gender")


# ---------------------------------------------------------------------------
# Groups missing from a batch or a split
# ---------------------------------------------------------------------------

def test_group_missing_from_a_batch_and_an_all_padding_batch():
    """A group absent from a batch has n = 0, keeps its buffer, and its constraint is not observed."""
    B = 8
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(B, 2)), jnp.float32)
    y = jnp.asarray([0, 1, 0, 1, 1, 0, 1, 0])
    g = jnp.asarray([0, 0, 1, 1, 0, 1, 0, 1])          # group 2 absent
    w = jnp.ones(B)
    c = fairness.group_counts(logits, y, g, G, weights=w)
    assert np.asarray(c.n).tolist() == [4, 4, 0]
    rep = fairness.fairness_report(c)
    assert rep["groups"]["2"]["accuracy"] is None and rep["accuracy_parity_gap"]["between_groups"] is not None

    ref = {"acc_g": jnp.full(G, 0.9), "loss_g": jnp.full(G, 0.3), "acc": jnp.asarray(0.9), "loss": jnp.asarray(0.3)}
    terms = ceag_terms(G, ref, eps=0.01)
    from fairprune_jax.training.train import Carry
    buf = constrained.buffer_init(G, 2)
    extra = Carry(buffer=buf._replace(values=buf.values.at[2].set(7.0)), overall=constrained.buffer_init(1, 4))
    per = jnp.linspace(0.1, 0.8, B)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    proxy, strict, observed, new = terms(per, jnp.mean(per), correct, {"g": g, "w": w}, extra)[:4]
    assert not bool(observed[2]) and float(proxy[2]) == 0.0
    np.testing.assert_array_equal(np.asarray(new["buffer"].values[2]), [7.0, 7.0])
    assert int(new["buffer"].count[2]) == 0

    # a batch of padding only (w = 0): nothing counted, nothing written, no NaN
    z = jnp.zeros(B)
    c0 = fairness.group_counts(logits, y, g, G, loss=per, weights=z)
    assert float(sum(np.asarray(v).sum() for v in c0)) == 0.0
    proxy0, _, observed0, new0 = terms(per, jnp.float32(0.0), correct, {"g": g, "w": z}, extra)[:4]
    assert not bool(observed0.any()) and np.isfinite(np.asarray(proxy0)).all()
    np.testing.assert_array_equal(np.asarray(new0["buffer"].count), [0, 0, 0])
    from fairprune_jax.training.train import weighted_mean
    assert float(weighted_mean(per, z)) == 0.0


def test_group_absent_from_train_or_test():
    """Warned; a group never seen in training keeps multiplier 0; a group without test rows has null test
    metrics and is left out of the gaps (fairlearn semantics) instead of counting as accuracy 0."""
    with pytest.warns(UserWarning) as rec:
        res = run(cfg(method="ceag", finetune_epochs=2), toy(train_without=2, test_without=1))
    msgs = [str(w.message) for w in rec]
    assert any("1 group(s) have no rows in the train split (g2): the model never sees them" in m for m in msgs)
    assert any("no rows in the test split (g1): their test metrics are null" in m for m in msgs)
    assert res["method_info"]["multipliers"][2] == 0.0
    test = res["pruned"]["test"]
    assert test["groups"]["g1"]["n"] == 0 and test["groups"]["g1"]["accuracy"] is None
    assert test["excess_accuracy_gap"]["per_group"]["g1"] is None
    present = [test["groups"][k]["accuracy"] for k in ("g0", "g2")]
    assert test["accuracy_parity_gap"]["between_groups"] == pytest.approx(max(present) - min(present))
    assert test["groups"]["g2"]["n"] > 0 and test["groups"]["g2"]["accuracy"] is not None


def test_sparsity_zero_and_ninety_nine_percent():
    prep = prepare(cfg(), toy())
    dense = run_method(prep, sparsity=0.0)
    assert dense["sparsity"]["achieved"] == 0.0 and dense["sparsity"]["empty_layers"] == []
    assert all(bool(np.all(np.asarray(m) == 1)) for m in jax.tree.leaves(dense["_state"].masks))
    with pytest.warns(UserWarning, match=r"layer\(s\) head/kernel keep no weights"):
        tiny = run_method(prep, sparsity=0.99)
    layers = tiny["sparsity"]["layers"]
    assert tiny["sparsity"]["empty_layers"] == ["head/kernel"]           # 1% of 32 weights rounds to 0
    assert layers["layers/0/kernel"]["kept"] == round(0.01 * 6 * 16)    # exact per-layer rounding
    assert tiny["pruned"]["test"]["accuracy"] is not None


# ---------------------------------------------------------------------------
# Silent wrong settings (issue 16): each refused or marked before it can print a wrong number
# ---------------------------------------------------------------------------

def _relabel(ds: Dataset, *, y=None, g=None, classes=None) -> Dataset:
    def split(s: Split) -> Split:
        return Split(s.x, s.y if y is None else y(s), s.g if g is None else g(s))
    return Dataset(ds.name, split(ds.train), split(ds.test), ds.group_names, ds.group_attrs,
                   classes or ds.class_names, meta=ds.meta)


def test_positive_class_the_target_does_not_have(no_training):
    with pytest.raises(ValueError, match=r"--positive-class 2: the target has 2 classes \(0 = '0', 1 = '1'\); "
                                         r"choose a class id in 0\.\.1"):
        run(cfg(positive_label=2), toy())
    with pytest.raises(ValueError, match="--positive-class must be a class id >= 0"):
        run(cfg(positive_label=-1), toy())


def test_one_class_target_is_refused_and_one_group_warned(no_training):
    one_class = _relabel(toy(), y=lambda s: np.zeros(len(s), np.int32))
    with pytest.raises(ValueError, match=r"the target has one class in the training split \('0' for all 192 "
                                         r"rows\).*accuracy would be 1\.0 by construction"):
        run(cfg(), one_class)
    from fairprune_jax.running.runner import load_checked
    one_group = _relabel(toy(), g=lambda s: np.zeros(len(s), np.int32))
    with pytest.warns(UserWarning) as rec:
        load_checked(cfg(), one_group)
    assert any(re.search(r"only one protected group \('g0'\).*0 by construction", str(w.message)) for w in rec)


def test_messages_name_what_is_wrong(tmp_path, no_training):
    with pytest.raises(ValueError, match="--seed must be an integer in \\[0, 2\\*\\*32\\)"):
        run(cfg(seed=-1), toy())
    with pytest.raises(ValueError, match=r"method 'ceag': option 'eps' takes a number \(default .*\); got 'abc'"):
        run(cfg(method="ceag", method_options={"eps": "abc"}), toy())
    p = _csv(tmp_path)
    with pytest.raises(ValueError, match="protected column 'income' is also the target column"):
        load_dataset("csv", str(p), target="income", protected="income")
    from fairprune_jax.running.runner import load_checked
    ds = load_dataset("csv", str(p), target="income", protected="sex", val_fraction=0.9)
    with pytest.raises(ValueError, match=r"larger than the training split \(\d+ rows, after the validation "
                                         r"fraction .*0\.9\) took \d+ of its rows"):
        load_checked(cfg(batch_size=32), ds)


def test_unusable_out_folder_is_refused_before_loading_data(tmp_path, monkeypatch, no_training, capsys):
    from fairprune_jax.running.cli import main
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is an existing file, not a folder"):
        run(cfg(out=str(f)), toy())
    assert main(["run", "--dataset", "digits", "--out", str(f), "--checkpoint-every", "0", "--no-progress"]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    import pathlib

    def read_only(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    with pytest.raises(ValueError, match=r"is not a folder fairprune can write into \(Permission denied\)"):
        run(cfg(out=str(tmp_path / "ro")), toy())


def test_a_folder_where_a_csv_file_belongs(tmp_path, capsys):
    from fairprune_jax.running.cli import main
    assert main(["data-summary", "--dataset", "csv", "--data-dir", str(tmp_path), "--target", "y"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fairprune: error: csv:") and "is a directory; pass the CSV FILE path" in err


def test_compare_config_with_a_bad_value(tmp_path):
    p = tmp_path / "grid.toml"
    head = 'dataset = "digits"\nmethods = ["magnitude"]\nsparsities = [0.9]\nseeds = [0]\n'
    p.write_text(head + '[model_options]\nhiden = [16]\n')
    with pytest.raises(ValueError, match=r"\[model_options\]: unknown model option\(s\) \['hiden'\] for any model"):
        load_config(p)
    p.write_text(head + '[run]\nmodel = "mlp"\n[model_options]\ndepth = 20\n')
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['depth'\] for model 'mlp'; valid: hidden"):
        load_config(p)
    p.write_text(head + '[run]\nepochs = "3"\n')
    with pytest.raises(ValueError, match=r"\[run\] epochs must be an integer \(like \d+\); got '3'"):
        load_config(p)
    p.write_text(head + '[run]\nlr = "fast"\n')
    with pytest.raises(ValueError, match=r"\[run\] lr must be a number"):
        load_config(p)
    p.write_text(head + '[method_options.magnitude]\n')
    load_config(p)


def test_ctrl_c_prints_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
    from fairprune_jax.running import runner
    from fairprune_jax.running.cli import main

    def interrupted(*a, **k):
        (tmp_path / "checkpoints" / "00-dense" / "final" / "40").mkdir(parents=True)
        (tmp_path / "checkpoints" / "01-prune-gmp" / "partial" / "60").mkdir(parents=True)
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "run", interrupted)
    argv = ["run", "--method", "gmp", "--dataset", "digits", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("fairprune: interrupted; checkpoints in ")
    assert "00-dense finished, 01-prune-gmp at step 60; continue with: fairprune run --method gmp" in err
    assert err.endswith("--no-progress --resume")


def test_a_new_run_sets_an_older_runs_results_aside_and_restores_them_if_it_fails(tmp_path, monkeypatch):
    """While a new run works in the folder its predecessor's results are out of the way (never read as its
    own); when it fails they come back (before: they were deleted at start and lost)."""
    from fairprune_jax.running import runner
    for name in ("results.json", "results.md", "group_accuracy.png"):
        (tmp_path / name).write_text("an older run")

    def stop(*a, **k):
        assert not (tmp_path / "results.json").exists()
        raise RuntimeError("stopped after start-up")
    monkeypatch.setattr(runner, "prepare", stop)
    with pytest.raises(RuntimeError, match="stopped after start-up"):
        run(cfg(out=str(tmp_path)), toy(), checkpoint_every=5)
    assert (tmp_path / "results.json").read_text() == "an older run"
    assert (tmp_path / "results.md").read_text() == "an older run"
    assert (tmp_path / "checkpoints" / "run.json").is_file()


def test_small_groups_and_the_positive_class_are_marked_in_every_table(tmp_path):
    """A 3-class target (DP / EO name their class) and groups smaller than --small-group (starred, listed)."""
    from fairprune_jax.reporting import report
    three = _relabel(toy(), y=lambda s: (np.digitize(s.x[:, 0], [-0.4, 0.4])).astype(np.int32),
                     classes=["a", "b", "c"])
    config = cfg(small_group=40, out=str(tmp_path))
    res = run_method(prepare(config, three))     # keeps the pruned state ("_state")
    assert res["positive_class"] == {"id": 1, "name": "b", "num_classes": 3}
    # DP / EO of every class vs the rest, against fairlearn on the pruned model's own test predictions
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
    from fairprune_jax.running.runner import build_context
    from fairprune_jax.training.train import masked_forward
    st = res["_state"]
    fm = build_context(config, three)[0].fm
    pred = np.asarray(jnp.argmax(masked_forward(fm, st.params, st.masks, st.model_state, jnp.asarray(three.test.x),
                                                train=False)[0], -1))
    y, g = three.test.y, three.test.g
    for split in ("test", "train"):
        for which in ("dense", "pruned"):
            per = res[which][split]["per_class_parity"]
            head = res[which][split]
            assert per["demographic_parity_difference"]["b"] == head["demographic_parity_difference"]["between_groups"]
            assert per["equalized_odds_difference"]["b"] == \
                head["equalized_odds_difference"]["between_groups"]["worst_case"]
    per = res["pruned"]["test"]["per_class_parity"]
    for k, name in enumerate("abc"):
        assert per["demographic_parity_difference"][name] == pytest.approx(
            demographic_parity_difference(y == k, pred == k, sensitive_features=g), abs=1e-9)
        assert per["equalized_odds_difference"][name] == pytest.approx(
            equalized_odds_difference(y == k, pred == k, sensitive_features=g), abs=1e-9)
    worst = max("abc", key=lambda c: per["demographic_parity_difference"][c])
    assert per["demographic_parity_difference_max_class"] == worst
    assert per["demographic_parity_difference_max"] == per["demographic_parity_difference"][worst]
    line = report.per_class_line(res)
    assert line.startswith("DP / EO per class, each class vs the rest (test, pruned): max DP ")
    assert f"(class {worst!r})" in line and line.endswith("the table's DP / EO are class 1 ('b') vs the rest")
    table = report.text_table(res)
    assert "demographic parity difference (b vs rest) *" in table and "worst-group accuracy *" in table, table
    assert "* over groups of which 2 have fewer than 40 test rows (--small-group): g1 (33), g2 (21)" in table
    md = (tmp_path / "results.md").read_text()
    assert "| demographic parity difference (b vs rest) * |" in md and "fewer than 40 test rows" in md
    assert "DP and EO are of class 1 ('b') vs the rest (3 classes" in md
    assert "## DP and EO of every class vs the rest (test)" in md and "| b <- |" in md
    assert "| **max over classes** |" in md and f"- {line}" in md
    res["config"]["small_group"] = 10
    res["pruned"]["test"]["certificate"]["small_groups"] = []
    assert "*" not in report.text_table(res)


# ---------------------------------------------------------------------------
# Tabular data as people export it (issue 16 items 3 and 5)
# ---------------------------------------------------------------------------

def _export(tmp_path, n=200, *, name="export.csv", sep=",", encoding="utf-8", bom=False, extra_cols=None,
            age_values=None):
    """A database-style export: an id, a name, free text, the features, the protected column and the outcome."""
    rng = np.random.default_rng(1)
    extra_cols = extra_cols or {}
    head = ["case_id", "name", "age", "color", "sex", *extra_cols, "outcome"]
    lines = [sep.join(head)]
    for i in range(n):
        age = int(rng.integers(18, 80)) if age_values is None else age_values(i)
        out = "yes" if (str(age).isdigit() and int(age) > 45) ^ (rng.random() < 0.3) else "no"
        row = [f"C{100000 + i}", f"Person {i}", str(age), str(rng.choice(["red", "blue"])), str(rng.choice(["F", "M"]))]
        row += [fn(i, out) for fn in extra_cols.values()]
        lines.append(sep.join(row + [out]))
    p = tmp_path / name
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode(encoding))
    return p


def _messages(rec) -> str:
    return "\n".join(str(w.message) for w in rec)


def test_csv_non_finite_numbers_are_errors_and_odd_missing_tokens_are_missing(tmp_path):
    p = _csv(tmp_path, "30,red,F,low\ninf,red,M,high\n1e999,blue,F,low\n")
    with pytest.raises(ValueError, match=r"numeric column 'age' has 2 value\(s\) that are not finite numbers "
                                         r"\(1e999, inf; data rows 83, 84\)"):
        load_dataset("csv", str(p), target="income", protected="sex")
    p = _csv(tmp_path, "NAN,red,F,low\nNone,red,M,high\n-,blue,F,low\n-nan,blue,M,low\n")
    ds = load_dataset("csv", str(p), target="income", protected="sex")
    assert ds.meta["column_types"]["age"] == "numeric"                      # not 50 one-hot columns
    assert ds.meta["missing_values_per_column"] == {"age": 4} and ds.meta["rows_dropped_missing_total"] == 4
    assert np.isfinite(ds.train.x).all()


def test_csv_numeric_looking_and_near_unique_columns_are_warned(tmp_path):
    p = _export(tmp_path, age_values=lambda i: "unknown" if i == 7 else str(18 + i % 60))
    with pytest.warns(UserWarning) as rec:
        ds = load_dataset("csv", str(p), target="outcome", protected="sex")
    msg = _messages(rec)
    assert "column 'age' is read as categorical (61 one-hot columns) although 100% of its values are numbers; " \
           "the others: 'unknown'" in msg
    assert "column 'case_id' has 200 distinct values in 200 rows (an id, a name, a date, free text?)" in msg
    assert "column 'name' has 200 distinct values" in msg and 'drop_columns="case_id"' in msg
    assert ds.meta["column_types"]["age"] == "categorical"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = load_dataset("csv", str(_export(tmp_path, name="b.csv")), target="outcome", protected="sex",
                            features="age,color")
    assert kept.meta["features_from"] == ["age", "color"] and kept.input_shape == (3,)
    dropped = load_dataset("csv", str(_export(tmp_path, name="b.csv")), target="outcome", protected="sex",
                           drop_columns="case_id,name")
    assert dropped.meta["features_from"] == ["age", "color", "sex"]
    with pytest.raises(ValueError, match=r"unknown features entry 'agee'"):
        load_dataset("csv", str(p), target="outcome", protected="sex", features="agee")


def test_csv_column_that_leaks_the_target_is_warned(tmp_path):
    leak = {"decision_code": lambda i, out: f"D{out.upper()}" if i % 40 else "DNO"}
    p = _export(tmp_path, extra_cols=leak)
    with pytest.warns(UserWarning) as rec:
        ds = load_dataset("csv", str(p), target="outcome", protected="sex", drop_columns="case_id,name")
    assert "column(s) 'decision_code' (" in _messages(rec) and "leaks the label" in _messages(rec)
    assert list(ds.meta["leak_suspects"]) == ["decision_code"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the honest features alone: no warning
        load_dataset("csv", str(p), target="outcome", protected="sex", features="age,color")


def test_csv_encodings_delimiters_and_headers(tmp_path):
    base = dict(target="outcome", protected="sex", features="age,color")
    ref = load_dataset("csv", str(_export(tmp_path, name="plain.csv")), **base)
    for kw in ({"bom": True}, {"sep": ";"}, {"sep": "\t"}, {"sep": "|"}):
        ds = load_dataset("csv", str(_export(tmp_path, name="x.csv", **kw)), **base)
        np.testing.assert_array_equal(ds.train.x, ref.train.x)
        assert ds.meta["delimiter"] == kw.get("sep", ",") and ds.meta["encoding"] == "utf-8-sig"
    latin = _export(tmp_path, name="latin.csv", encoding="cp1252", extra_cols={"city": lambda i, o: "Zürich"})
    with pytest.warns(UserWarning, match=r"latin\.csv is not valid UTF-8; read it as cp1252"):
        ds = load_dataset("csv", str(latin), target="outcome", protected="sex", features="city,age")
    assert "city=Zürich" in ds.meta["feature_names"]
    dup = tmp_path / "dup.csv"
    dup.write_text("age,sex,age,,y\n1,F,2,3,0\n")
    with pytest.raises(ValueError, match=r"column 4 has no name; 'age' names columns 1 and 3"):
        load_dataset("csv", str(dup), target="y", protected="sex")
    twice = _export(tmp_path, name="twice.csv")
    twice.write_text(twice.read_text() + twice.read_text())
    with pytest.warns(UserWarning, match=r"repeats its header line 1 time\(s\) inside the data \(first at data row 202\)"):
        ds = load_dataset("csv", str(twice), **base)
    assert ds.meta["repeated_header_lines_skipped"] == 1 and len(ds.train) + len(ds.test) == 400


def test_every_documented_case_has_its_test():
    """Each row of docs/HARDENING.md names tests that exist (in this file unless the row names another)."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    rows = [ln for ln in (root / "docs" / "HARDENING.md").read_text().splitlines() if re.match(r"\| \d+ \|", ln)]
    assert len(rows) >= 50
    defined: dict[str, set[str]] = {}
    for path in (root / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        defined[path.name] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test")}
    missing = []
    for row in rows:
        cell = row.rstrip(" |").rsplit("|", 1)[-1]
        current = "test_hardening.py"
        for file, name in re.findall(r"`(?:tests/(test_\w+\.py)::)?(test_\w+)`", cell):
            current = file or current
            if name not in defined.get(current, set()):
                missing.append(f"row {row.split('|')[1].strip()}: {current}::{name}")
    assert not missing, missing


def test_a_failed_run_keeps_the_results_of_the_run_before(tmp_path, monkeypatch):
    """A run into a finished run's folder sets the old results aside and puts them back when it fails or is
    interrupted; a run that finishes replaces them and leaves no aside folder."""
    from fairprune_jax.running import runner as runner_mod
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')
    (out / "results.md").write_text("old")

    def boom(*a, **k):
        raise RuntimeError("failed after the whole run")
    monkeypatch.setattr(runner_mod, "run_method", boom)
    with pytest.raises(RuntimeError, match="failed after"):
        runner_mod.run(cfg(out=str(out)))
    assert (out / "results.json").read_text() == '{"old": true}' and (out / "results.md").read_text() == "old"
    assert not (out / runner_mod.ASIDE_DIR).exists()

    def interrupted(prep):
        assert not (out / "results.json").exists()      # while it runs, no stale result sits in the folder
        assert (out / runner_mod.ASIDE_DIR / "results.json").exists()
        raise KeyboardInterrupt
    monkeypatch.setattr(runner_mod, "run_method", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner_mod.run(cfg(out=str(out)))
    assert (out / "results.json").read_text() == '{"old": true}'
    monkeypatch.undo()
    res = runner_mod.run(cfg(out=str(out)))
    assert json.loads((out / "results.json").read_text())["method"] == res["method"]
    assert not (out / runner_mod.ASIDE_DIR).exists()


def test_a_run_that_loses_much_accuracy_says_so():
    """A pruned model 5 points (or more) below the dense one gets a warning in words (structured runs told that
    whole units went), stored in the results and in results.md; a small loss or a degenerate model gets none."""
    from fairprune_jax.core.config import RunConfig
    from fairprune_jax.running.runner import ACCURACY_LOSS_WARN, accuracy_loss_note

    def res(dense, pruned, degenerate=False):
        return {"dense": {"test": {"accuracy": dense}}, "pruned": {"test": {"accuracy": pruned, "degenerate": degenerate}}}

    cfg = RunConfig(dataset="digits", method="structured_magnitude", sparsity=0.9)
    note = accuracy_loss_note(res(0.90, 0.80), cfg)
    assert ACCURACY_LOSS_WARN == 0.05 and "lost 10.0 points of test accuracy" in note and "(structured)" in note
    assert "whole neurons / channels" in note
    assert accuracy_loss_note(res(0.90, 0.87), cfg) is None
    assert accuracy_loss_note(res(0.90, 0.50, degenerate=True), cfg) is None
    plain = accuracy_loss_note(res(0.90, 0.80), RunConfig(dataset="digits", method="magnitude", sparsity=0.9))
    assert "(structured)" not in plain and "--finetune-epochs" in plain
