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


def test_group_ids_beyond_32_bits_are_refused_where_they_are_ids():
    """Ids beyond 32 bits would wrap (2**32 + 1 -> 1) and merge with group 1. Without group_names they are
    names and stay apart (tests/test_certificate_inputs.py); with group_names they are ids, refused."""
    from flax import nnx
    import fairprune_jax as fp
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    g = np.where(rng.random(200) < 0.5, 1, 2**32 + 1)
    with pytest.raises(ValueError, match="beyond 32-bit ids"):
        fp.prune(model, train=(x, (x[:, 0] > 0).astype(int), g), method="magnitude", epochs=1, progress=False,
                 group_names=["a", "b"])


def test_ceag_without_fine_tuning_finishes_and_says_so(tmp_path, capsys):
    rc = main(["run", "--dataset", "digits", "--epochs", "1", "--finetune-epochs", "0", "--no-progress",
               "--checkpoint-every", "0", "--out", str(tmp_path / "run")])
    assert rc == 0 and "no checkpoint was evaluated" in capsys.readouterr().err


def _cells(line: str) -> int:
    """The cells of a Markdown table row, as a renderer splits it (an escaped \\| stays inside its cell)."""
    import re
    return len(re.split(r"(?<!\\)\|", line.strip().strip("|")))


def test_group_names_with_a_bar_keep_results_md_columns_in_place(tmp_path):
    """An intersectional group is named ``A|B``: unescaped, it split its cell and shifted every column after it
    (n under the group's second half, the dense accuracy under "pruned", ...)."""
    from flax import nnx
    import fairprune_jax as fp
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    g = rng.integers(0, 2, 300)
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    fp.prune(model, train=(x, (x[:, 0] > 0).astype(int), g), method="magnitude", epochs=1, progress=False,
             group_names=["Male|White", "<b>Female</b>"], out=str(tmp_path / "run"))
    md = (tmp_path / "run" / "results.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and ("White" in ln or "Female" in ln)]
    assert rows and not any("<b>" in ln for ln in rows)
    for ln in rows:
        header = next(h for h in md.splitlines()[:md.splitlines().index(ln)][::-1] if h.startswith("| group"))
        assert _cells(ln) == _cells(header), (ln, header)


def test_a_model_with_more_outputs_than_classes_is_said(tmp_path, capsys):
    """Three logits on a binary target (or a (features, logits) tuple read by its first element): one class
    the model can never learn, said before training."""
    from flax import nnx
    import fairprune_jax as fp
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    with pytest.warns(Warning, match=r"1 of 3 class\(es\) have no rows in the train split"):
        fp.prune(model, train=(x, (x[:, 0] > 0).astype(int), rng.integers(0, 2, 200)), method="magnitude",
                 epochs=1, progress=False)


@pytest.mark.parametrize("extra, match", [
    ('[variants."../../elsewhere"]\nmethod = "magnitude"\n', "letters, digits"),
    ('[run]\nprogress = false\n', r"unknown \[run\] key\(s\) \['progress'\]"),
])
def test_grid_entries_that_escaped_or_crashed_are_refused(tmp_path, extra, match):
    from fairprune_jax.running import compare
    p = tmp_path / "g.toml"
    p.write_text('dataset = "digits"\nmethods = ["magnitude"]\nsparsities = [0.5]\nseeds = [0]\n' + extra)
    with pytest.raises(ValueError, match=match):
        compare.load_config(p)


def test_a_suite_whose_grids_share_an_output_folder_is_refused(tmp_path):
    from fairprune_jax.running import compare
    for name in ("a", "b"):
        (tmp_path / f"{name}.toml").write_text(f'name = "{name}"\nout = "res/same"\ndataset = "digits"\n'
                                               'methods = ["magnitude"]\nsparsities = [0.5]\nseeds = [0]\n')
    (tmp_path / "s.toml").write_text('suite = ["a.toml", "b.toml"]\n')
    with pytest.raises(ValueError, match="write into one output folder"):
        compare.load_suite(tmp_path / "s.toml")
