"""Inputs that used to give wrong numbers without a word, found by trying a user's odd inputs: each is now
refused before any training, with what to do, or said in the run's warnings and results.json."""
from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest

from fairprune_jax.data import load_dataset
from fairprune_jax.data.table_reading import canonical_numbers
from fairprune_jax.methods.base import METHODS, OPTION_RANGES, out_of_range
from fairprune_jax.running.cli import main


def _bad_value(name: str):
    low, high, open_ = OPTION_RANGES[name]
    return (low - 1) if high is None else (high if open_ else high + 1)


def test_every_declared_option_range_is_checked_for_every_method():
    """One declaration per option name: a value out of its range is refused when the options are parsed (before
    any data loads) by every method that has the option; every default is in range."""
    checked = 0
    for name, method in METHODS.items():
        hints = typing.get_type_hints(method.options_type)
        for f in dataclasses.fields(method.options_type):
            if f.name not in OPTION_RANGES or hints[f.name] not in (int, float):
                continue
            assert out_of_range(f.name, f.default) is None, (name, f.name, f.default)
            with pytest.raises(ValueError, match=rf"option '{f.name}' must be"):
                method.parse({f.name: str(_bad_value(f.name))})
            checked += 1
    assert checked > 40
    # those a user tried, which used to run (or fail only after the dense training)
    for method, opts in (("ceag", {"buffer_size": "-5"}), ("ceag", {"val_fraction": "1.5"}),
                         ("gmp", {"prune_fraction": "3.0"}), ("gmp", {"updates": "-3"}), ("bifp", {"tau": "3.0"}),
                         ("bifp", {"epochs": "-5"}), ("el", {"buffer_size": "0"}), ("ceag", {"prune_updates": "0"})):
        with pytest.raises(ValueError, match="must be"):
            METHODS[method].parse(opts)


def test_nothing_to_prune_is_refused_before_training(capsys):
    rc = main(["run", "--model-opt", "hidden=(16,)", "--exclude-first", "--exclude-last", "--epochs", "1",
               "--finetune-epochs", "1", "--no-progress", "--checkpoint-every", "0"])
    assert rc == 2 and "nothing to prune" in capsys.readouterr().err


def test_a_sparsity_short_of_the_target_is_said(tmp_path, capsys):
    """Structured pruning keeps one unit per layer: 1 of 2 hidden units is 50%, not the 90% asked for."""
    import json
    out = tmp_path / "run"
    assert main(["run", "--method", "structured_magnitude", "--model-opt", "hidden=(2,)", "--epochs", "1",
                 "--finetune-epochs", "1", "--no-progress", "--checkpoint-every", "0", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["sparsity"]["achieved"] < 0.6 and "against the target 0.9" in res["sparsity"]["shortfall_note"]
    assert "WARNING: structured_magnitude pruned 50.0% of the prunable weights" in capsys.readouterr().err


def test_a_number_column_as_the_target_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "data.csv"
    rows = ["a,b,sex,price"] + [f"{rng.normal():.4f},{rng.normal():.4f},{'MF'[i % 2]},{rng.uniform(0, 100):.3f}"
                                for i in range(400)]
    p.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"the target makes \d+ classes over \d+ rows .*Bin it"):
        load_dataset("csv", str(p), target="price", protected="sex")


def test_large_integer_ids_stay_distinct():
    """Ids beyond a float's exact integers (2**53) were rounded through floats and merged."""
    out = canonical_numbers(np.array(["12345678901234567", "12345678901234568", "1.0", "01", "1e20"]))
    assert out.tolist() == ["12345678901234567", "12345678901234568", "1", "1", "1e20"]


def test_group_ids_beyond_32_bits_are_refused():
    from flax import nnx
    import fairprune_jax as fp
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    g = np.where(rng.random(200) < 0.5, 1, 2**32 + 1)          # would wrap to 1 and merge with group 1
    with pytest.raises(ValueError, match="beyond 32-bit ids"):
        fp.prune(model, train=(x, (x[:, 0] > 0).astype(int), g), method="magnitude", epochs=1, progress=False)


def test_ceag_without_fine_tuning_finishes_and_says_so(tmp_path, capsys):
    rc = main(["run", "--dataset", "digits", "--epochs", "1", "--finetune-epochs", "0", "--no-progress",
               "--checkpoint-every", "0", "--out", str(tmp_path / "run")])
    assert rc == 0 and "no checkpoint was evaluated" in capsys.readouterr().err
