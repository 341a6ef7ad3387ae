"""A new user's first hour (seventh tour, docs/HARDENING.md rows 146-160): each input here once gave a wrong
result without a word, a traceback, or a message that did not name the fix."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fairprune_jax.data import load_dataset


@pytest.mark.parametrize("dataset, option, value, want", [
    ("adult", "include_protected", "F", "true or false"),      # was read as true: sex stayed a feature
    ("digits", "image", "maybe", "true or false"),
    ("digits", "seed", "abc", "an integer"),                  # was a numpy traceback
    ("digits", "seed", 0.5, "an integer"),
    ("digits", "test_fraction", "x", "a number"),
    ("csv", "drop_missing", "nope", "true or false"),
    ("digits", "seed", -1, "0 or more"),                      # was numpy's "expected non-negative integer"
    ("utkface", "image_size", 0, "1 or more"),
])
def test_typed_data_options_refuse_values_of_another_kind_by_name(dataset, option, value, want):
    with pytest.raises(ValueError, match=f"option {option} must be {want}; got {value!r}"):
        load_dataset(dataset, None, **{option: value})


def test_typed_data_options_take_their_own_kinds():
    ds = load_dataset("digits", None, image=True, seed=3, test_fraction=0.3)
    assert ds.train.x.ndim == 4


def test_the_selected_checkpoint_line_names_the_rows_it_was_read_on():
    """results.md called a training-row figure "held-out"."""
    from fairprune_jax.reporting.report import constraint_line
    res = {"method_info": {"eps": 0.01, "constraint_data": "train",
                           "selection": {"rows": "train", "max_psi": 0.0001, "feasible": True}},
           "pruned": {"train": {"excess_accuracy_gap": {"max": 0.0001}}}}
    assert "training max psi_g of the selected checkpoint 0.0001: met" in constraint_line(res)
    res["method_info"]["selection"]["rows"] = "held-out"
    assert "held-out max psi_g of the selected checkpoint" in constraint_line(res)


def test_labels_that_are_not_class_ids_name_the_fix():
    from fairprune_jax.running.api import arrays_dataset
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    g = rng.integers(0, 2, 200)
    with pytest.raises(ValueError, match=r"labels y must be class ids 0..C-1; got -1, 1: pass them as names"):
        arrays_dataset((x, np.where(x[:, 0] > 0, 1, -1), g), num_classes=2)
    with pytest.raises(ValueError, match=r"the labels are 0, 2: class ids must be 0..1; pass them as names"):
        arrays_dataset((x, np.where(x[:, 0] > 0, 2, 0), g), num_classes=2)
    ds = arrays_dataset((x, np.where(x[:, 0] > 0, 1, -1).astype(str), g), num_classes=2)
    assert ds.class_names == ["-1", "1"]


def test_a_csv_without_a_header_line_says_so(tmp_path):
    f = tmp_path / "adult.data"
    f.write_text("39, State-gov, 77516, Male, <=50K\n50, Private, 83311, Female, >50K\n" * 20)
    with pytest.raises(ValueError, match="the first line looks like data, not column names"):
        load_dataset("csv", str(f), target="income", protected="sex")


def test_accuracy_loss_advice_names_the_epochs_the_method_reads():
    """ballot's advice was more --finetune-epochs, which its default retraining does not read."""
    from fairprune_jax.methods.base import RunConfig
    from fairprune_jax.running.runner import accuracy_loss_note
    res = {"dense": {"test": {"accuracy": 0.9}}, "pruned": {"test": {"accuracy": 0.2, "degenerate": False}}}
    note = accuracy_loss_note(res, RunConfig(method="ballot", sparsity=0.9))
    assert "ballot's own --opt vote_epochs=N / --opt retrain_epochs=N" in note
    assert "more fine-tuning epochs (--finetune-epochs)" in accuracy_loss_note(res, RunConfig(method="nft"))


def test_a_run_into_a_folder_with_finished_results_says_it_replaces_them(tmp_path):
    from fairprune_jax.running.outputs import restore_outputs, set_aside_outputs
    (tmp_path / "results.json").write_text(json.dumps({"method": "nft", "sparsity": {"target": 0.9},
                                                      "dataset": "digits"}))
    with pytest.warns(UserWarning, match=r"holds an earlier run's results \(nft at sparsity 0.9 on digits\)"):
        aside = set_aside_outputs(tmp_path)
    restore_outputs(tmp_path, aside)                     # a failed run puts them back
    assert json.loads((tmp_path / "results.json").read_text())["method"] == "nft"


def test_aim_certificate_keeps_a_reachable_eps():
    """eps above the reachable bound was raised to bound + aim_margin ("0.01 is out of reach ... aiming at
    0.014", then 0.0042 certified): the user's eps is the target whenever a model could certify it."""
    from flax import nnx
    import fairprune_jax as fp
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 4)).astype(np.float32)
    g = rng.integers(0, 2, 1200)
    model = nnx.Sequential(nnx.Linear(4, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 2, rngs=nnx.Rngs(1)))
    _, _, rep, _ = fp.prune(model, train=(x, (x[:, 0] > 0).astype(int), g), sparsity=0.5, epochs=1,
                            finetune_epochs=1, progress=False, val_fraction=0.2,
                            aim="certificate", eps=0.4, aim_margin=1.0)
    aim = rep["method_info"]["aim"]
    assert aim["reachable"] < 0.4 and aim["target"] == 0.4 and aim["note"] is None


def test_prune_names_where_a_run_setting_or_a_misspelt_argument_goes():
    from flax import nnx
    import fairprune_jax as fp
    x = np.zeros((40, 3), np.float32)
    data = (x, np.arange(40) % 2, np.arange(40) % 2)
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    with pytest.raises(ValueError, match=r"certify_eps is a run setting, not an option of method 'ceag': pass "
                                         r"config=\{'certify_eps': ...\}"):
        fp.prune(model, train=data, certify_eps=0.05)
    with pytest.raises(ValueError, match=r"did you mean prune\(finetune_epochs=...\)"):
        fp.prune(model, train=data, fine_tune_epochs=1)
