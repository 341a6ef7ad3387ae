"""``fairprune run`` end to end on digits, its outputs, and the errors it gives before any training."""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fairprune_jax.running import preparation, runner
from fairprune_jax.running.cli import main
from fairprune_jax.data.base import Dataset, Split
from fairprune_jax.methods.base import RunConfig

TARGET = 0.75   # 0.25 * every digits-MLP layer size is an integer, so per-layer rounding is exact
TINY = ["--dataset", "digits", "--epochs", "3", "--finetune-epochs", "2", "--no-progress", "--sparsity", str(TARGET)]
RUNS = {
    "magnitude": ["--method", "magnitude"],
    "gmp": ["--method", "gmp"],
    "random": ["--method", "random", "--distribution", "global", "--exclude-first"],
}
GROUPS = [f"digit {i}" for i in range(10)]


def _strict_json(path: Path) -> dict:
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(path.read_text(), parse_constant=bad)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each method run once through the CLI (in-process); ``{method: (out_dir, rc, stdout)}``."""
    out = {}
    for method, args in RUNS.items():
        d = tmp_path_factory.mktemp(method)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["run", *args, *TINY, "--out", str(d)])
        out[method] = (d, rc, buf.getvalue())
    return out


@pytest.mark.parametrize("method", list(RUNS))
def test_run_writes_outputs(runs, method):
    d, rc, stdout = runs[method]
    assert rc == 0
    assert {p.name for p in d.iterdir()} >= {"results.json", "results.md", "group_accuracy.png"}
    assert not list(d.glob("*.tmp"))
    png = (d / "group_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    md = (d / "results.md").read_text()
    assert md.startswith(f"# fairprune run: {method} on digits (mlp)")
    assert "achieved 0.7500" in md and all(f"| {g} |" in md for g in GROUPS)
    assert f"achieved sparsity 0.7500 (target {TARGET})" in stdout


@pytest.mark.parametrize("method", list(RUNS))
def test_results_json_contents(runs, method):
    d, _, _ = runs[method]
    r = _strict_json(d / "results.json")
    assert r["method"] == method and r["dataset"] == "digits" and r["model"] == "mlp" and r["seed"] == 0
    assert r["wall_time_s"] > 0
    assert r["config"]["epochs"] == 3 and r["config"]["finetune_epochs"] == 2
    sp = r["sparsity"]
    assert sp["target"] == TARGET
    assert abs(sp["achieved"] - TARGET) <= 1e-6
    assert 0 < sp["overall"] < TARGET          # biases are never pruned
    assert r["groups"]["names"] == GROUPS and r["groups"]["num_groups"] == 10
    assert len(r["history"]["dense"]["loss"]) == 3
    assert len(r["history"]["method"]["loss"]) == 2
    for which in ("dense", "pruned"):
        for split in ("train", "test"):
            rep = r[which][split]
            assert 0.0 <= rep["accuracy"] <= 1.0
            assert set(rep["groups"]) == set(GROUPS)
            n = np.array([rep["groups"][g]["n"] for g in GROUPS])
            acc = np.array([rep["groups"][g]["accuracy"] for g in GROUPS])
            assert n.sum() == r["sizes"][split] == rep["n"]
            assert np.all((acc >= 0) & (acc <= 1))
            # group accuracies are consistent with the overall accuracy (counts, not averaged rates)
            assert float((n * acc).sum() / n.sum()) == pytest.approx(rep["accuracy"], abs=1e-9)
            assert rep["accuracy_parity_gap"]["between_groups"] == pytest.approx(acc.max() - acc.min(), abs=1e-9)
            for key in ("demographic_parity_difference", "equalized_odds_difference", "accuracy_parity_gap",
                        "class_wise_variance", "max_class_discrepancy", "mean_loss"):
                assert key in rep, key
    psi = r["pruned"]["test"]["excess_accuracy_gap"]
    assert set(psi["per_group"]) == set(GROUPS)
    assert psi["max"] == pytest.approx(max(psi["per_group"].values()))
    assert "excess_accuracy_gap" not in r["dense"]["test"]
    assert r["dense"]["test"]["accuracy"] > 0.6       # 3 epochs of Adam learn digits


def test_layer_sparsity_per_distribution(runs):
    r = _strict_json(runs["magnitude"][0] / "results.json")
    layers = r["sparsity"]["layers"]
    assert set(layers) == {"layers/0/kernel", "layers/1/kernel", "head/kernel"}
    assert all(v["sparsity"] == TARGET for v in layers.values())      # uniform: every layer exactly
    assert r["sparsity"]["flops_fraction"] == pytest.approx(1 - TARGET)
    r = _strict_json(runs["random"][0] / "results.json")               # global, first layer kept dense
    assert set(r["sparsity"]["layers"]) == {"layers/1/kernel", "head/kernel"}
    kept = sum(v["kept"] for v in r["sparsity"]["layers"].values())
    assert kept == round((1 - TARGET) * (256 * 128 + 128 * 10))
    r = _strict_json(runs["gmp"][0] / "results.json")
    sched = r["method_info"]["schedule"]
    assert sched[-1][1] == pytest.approx(TARGET) and sched[0] == [0, 0.0]
    assert [s for _, s in sched] == sorted(s for _, s in sched)


def test_dense_model_is_the_same_for_every_method(runs):
    accs = {m: _strict_json(d / "results.json")["dense"]["test"]["accuracy"] for m, (d, _, _) in runs.items()}
    assert len(set(accs.values())) == 1, accs


def test_methods_differ_after_pruning(runs):
    accs = {m: _strict_json(d / "results.json")["pruned"]["test"]["groups"] for m, (d, _, _) in runs.items()}
    assert accs["magnitude"] != accs["random"]


# ---------------------------------------------------------------------------
# bad input: exit code 2 and a clear message, before any model is built or trained
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.0"], r"sparsity must be in \[0, 1\)"),
    (["--sparsity=-0.1"], r"sparsity must be in \[0, 1\)"),
    (["--sparsity", "1.5"], r"sparsity must be in \[0, 1\)"),
    (["--method", "prune_everything"], r"unknown method 'prune_everything'; valid choices: .*gmp.*magnitude.*random"),
    (["--dataset", "imagenet9000"], r"unknown dataset 'imagenet9000'; valid choices: .*digits"),
    (["--model", "transformer"], r"unknown model 'transformer'; valid choices: cnn, mlp, mobilenet_v2, resnet"),
    (["--method", "magnitude", "--opt", "eps=0.1"], r"has no option\(s\) \['eps'\]; valid options: distill"),
    (["--method", "gmp", "--opt", "prune_fractoin=0.5"], r"valid options: distill, prune_fraction, updates"),
    (["--batch-size", "5000"], r"--batch-size 5000 is larger than the training split \(\d+ rows\)"),
    (["--epochs", "0"], r"--epochs must be >= 1"),
    # non-finite and out-of-range numbers, wherever they enter (they used to fail after training, or never)
    (["--opt", "eps=nan"], r"option 'eps' must be a finite number; got nan"),
    (["--opt", "eps=inf"], r"option 'eps' must be a finite number; got inf"),
    (["--method", "nft", "--opt", "distill=nan"], r"option 'distill' must be a finite number"),
    (["--certify-eps", "nan"], r"--certify-eps must be a finite number"),
    (["--fairness-bound", "inf"], r"--fairness-bound must be a finite number"),
    (["--certify-eps", "2"], r"--certify-eps is a bound on a difference of rates, in \[0, 1\]"),
    (["--weight-decay", "-5"], r"--weight-decay must be >= 0"),
    (["--lr", "inf"], r"--lr must be a finite number"),
    (["--seed", "99999999999999999999"], r"--seed must be an integer in \[0, 2\*\*32\)"),
    (["--lr", "0"], r"learning rates must be > 0"),
])
def test_bad_input_exit_code_2(no_training, capsys, tmp_path, args, message):
    rc = main(["run", "--dataset", "digits", "--no-progress", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("fairprune: error: ")
    assert re.search(message, err), err
    if "--batch-size" not in args:  # config errors come before anything is written (the batch size needs the data)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--optimizer", "lbfgs"], ["--distribution", "exotic"]])
def test_argparse_choices_exit_code_2(capsys, args):
    with pytest.raises(SystemExit) as e:
        main(["run", *args])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_opt_without_equals_is_an_error():
    with pytest.raises(SystemExit, match="--opt expects KEY=VALUE"):
        main(["run", "--opt", "eps", "--no-progress"])


def test_model_that_cannot_take_the_data_fails_before_training(monkeypatch, capsys, tmp_path):
    def boom(*a, **k):
        raise RuntimeError("training started")
    monkeypatch.setattr(preparation, "train_dense", boom)
    rc = main(["run", "--dataset", "digits", "--model", "cnn", "--no-progress", "--out", str(tmp_path)])
    assert rc == 2
    assert "needs images of shape (H, W, C)" in capsys.readouterr().err


def test_divergence_exit_code_3(capsys, tmp_path):
    rc = main(["run", "--dataset", "digits", "--method", "magnitude", "--optimizer", "sgd", "--lr", "1e30", "--epochs", "1",
               "--finetune-epochs", "0", "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 3
    assert "training diverged" in err and "NaN/Inf at step" in err


# ---------------------------------------------------------------------------
# datasets handed to runner.run directly
# ---------------------------------------------------------------------------

def _ds(n_train=24, n_test=12, feat=10, n_cls=3, n_groups=2, seed=0, **overrides) -> Dataset:
    rng = np.random.default_rng(seed)

    def split(n):
        return Split(rng.normal(size=(n, feat)).astype(np.float32), rng.integers(0, n_cls, n),
                     rng.integers(0, n_groups, n))

    kw = dict(name="toy", train=split(n_train), test=split(n_test), group_names=[f"g{i}" for i in range(n_groups)],
              group_attrs=["attr"], class_names=[f"c{i}" for i in range(n_cls)])
    kw.update(overrides)
    return Dataset(**kw)


def _cfg(**kw) -> RunConfig:
    base = dict(method="magnitude", dataset="digits", epochs=2, finetune_epochs=1, batch_size=8, sparsity=0.5, progress=False,
                model_options={"hidden": (8, 6)})
    base.update(kw)
    return RunConfig(**base)


def _broken(kind: str) -> Dataset:
    ds = _ds()
    if kind == "label_too_big":
        ds.train.y[3] = 3
    elif kind == "label_negative":
        ds.test.y[0] = -1
    elif kind == "group_too_big":
        ds.test.g[5] = 2
    elif kind == "group_negative":
        ds.train.g[0] = -1
    elif kind == "nan_feature":
        ds.train.x[2, 1] = np.nan
    elif kind == "feature_shape":
        ds.test = Split(np.zeros((12, 11), np.float32), ds.test.y, ds.test.g)
    elif kind == "empty_split":
        ds.test = Split(np.zeros((0, 10), np.float32), np.zeros(0), np.zeros(0))
    return ds


@pytest.mark.parametrize("kind, message", [
    ("label_too_big", r"split 'train' has labels in \[0, 3\] but only 3 class names"),
    ("label_negative", r"split 'test' has labels in \[-1, \d\]"),
    ("group_too_big", r"split 'test' has group ids in \[0, 2\] but only 2 group names"),
    ("group_negative", r"split 'train' has group ids in \[-1, \d\]"),
    ("nan_feature", r"1 rows with NaN or Inf features"),
    ("feature_shape", r"split 'test' has feature shape \(11,\), train has \(10,\)"),
    ("empty_split", r"split 'test' is empty"),
])
def test_runner_validates_dataset(no_training, kind, message):
    with pytest.raises(ValueError, match=message):
        runner.run(_cfg(), dataset=_broken(kind))


def test_split_rejects_wrong_shapes():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"labels y must have shape \(5,\)"):
        Split(x, np.zeros(4), np.zeros(5))
    with pytest.raises(ValueError, match=r"group ids g must have shape \(5,\)"):
        Split(x, np.zeros(5), np.zeros((5, 1)))
    s = Split(x.astype(np.float64), np.zeros(5, np.int64), np.zeros(5, np.int64))
    assert s.x.dtype == np.float32 and s.y.dtype == np.int32 and s.g.dtype == np.int32


def test_runner_batch_size_larger_than_given_dataset(no_training):
    with pytest.raises(ValueError, match=r"--batch-size 64 is larger than the training split \(24 rows\)"):
        runner.run(_cfg(batch_size=64), dataset=_ds())


@pytest.fixture(scope="module")
def prepared_toy():
    """The toy dataset with its dense model trained once, for several method runs."""
    return runner.prepare(_cfg(), _ds())


@pytest.mark.parametrize("ft_epochs, opts", [(0, {}), (1, {"prune_fraction": 1.0}), (1, {"updates": 1})])
def test_gmp_reaches_target_when_schedule_ends_at_the_last_step(prepared_toy, ft_epochs, opts):
    """Regression: the cubic schedule's last point fell on a step that never ran, so GMP stopped short of
    the target (sparsity 0 with --finetune-epochs 0, 0.7499 instead of 0.75 with prune_fraction=1)."""
    res = runner.run_method(prepared_toy, method="gmp", sparsity=0.5, finetune_epochs=ft_epochs,
                            method_options=opts)
    assert abs(res["sparsity"]["achieved"] - 0.5) <= 1e-9
    assert res["method_info"]["schedule"][-1][1] == 0.5


def test_runner_on_a_given_dataset():
    res = runner.run(_cfg(), dataset=_ds())
    assert res["dataset"] == "toy" and res["model"] == "mlp"
    assert res["sizes"] == {"train": 24, "test": 12}
    assert set(res["pruned"]["test"]["groups"]) == {"g0", "g1"}
    assert abs(res["sparsity"]["achieved"] - 0.5) <= 1e-9      # 80, 48 and 18 weights: halves are exact
    json.dumps(res, allow_nan=False)      # results are plain JSON


# ---------------------------------------------------------------------------
# other commands
# ---------------------------------------------------------------------------

def test_console_script_methods():
    exe = Path(sys.executable).parent / "fairprune"
    assert exe.exists(), exe
    p = subprocess.run([str(exe), "methods"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for name in ("magnitude", "gmp", "random"):
        assert any(line.startswith(name) for line in p.stdout.splitlines()), p.stdout
    assert "prune_fraction=0.75" in p.stdout


def test_methods_of_one_method(capsys):
    """`fairprune methods ceag` lists that method only, each option on its own line with what it does; a
    misspelt name lists the valid ones (exit 2)."""
    assert main(["methods", "ceag", "nft"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ceag: ") and "\n  constraint_data=auto " in out and "\nnft: " in out and "\ngmp" not in out
    assert main(["methods", "cea"]) == 2
    assert "unknown method(s) ['cea']; valid: ballot," in capsys.readouterr().err


def test_main_help_and_datasets(capsys):
    assert main([]) == 0
    assert "usage: fairprune" in capsys.readouterr().out
    assert main(["datasets"]) == 0
    assert any(line.startswith("digits") for line in capsys.readouterr().out.splitlines())


def test_boolean_options_read_false_as_false():
    """`--opt augmented=false` must not become bool('false') == True (any method, --data-opt too)."""
    from fairprune_jax.running.cli import _kv
    from fairprune_jax.methods import get_method
    assert _kv(["a=false", "b=Off", "c=NO", "d=True", "e=3", "f=x"], "--opt") == {
        "a": False, "b": False, "c": False, "d": True, "e": 3, "f": "x"}
    ceag = get_method("ceag")
    for word, want in [("false", False), ("0", False), ("no", False), ("true", True), ("1", True)]:
        assert ceag.parse({"augmented": word}).augmented is want
    with pytest.raises(ValueError, match="takes true or false"):
        ceag.parse({"augmented": "maybe"})


def test_options_are_typed_frozen_dataclasses_parsed_once():
    """Every method's options are a frozen dataclass; values are read as the field types, and what a type
    cannot read is refused naming the option."""
    import dataclasses
    from fairprune_jax.methods import METHODS
    for name, method in METHODS.items():
        opts = method.parse({})
        assert dataclasses.is_dataclass(opts) and type(opts).__dataclass_params__.frozen, name
        assert sorted(method.options) == sorted(f.name for f in dataclasses.fields(opts)), name
    lth, ballot, bifp, ceag = (METHODS[m] for m in ("lth", "ballot", "bifp", "ceag"))
    assert lth.parse({"round_epochs": "3", "fraction": "0.5"}) == lth.options_type(round_epochs=3, fraction=0.5)
    assert lth.parse({"max_rounds": 4.0}).max_rounds == 4 and lth.parse({"round_epochs": None}).round_epochs is None
    with pytest.raises(ValueError, match=r"option 'max_rounds' takes an integer \(default 5\); got 2.5"):
        lth.parse({"max_rounds": 2.5})
    with pytest.raises(ValueError, match=r"option 'eps' takes a number"):
        ceag.parse({"eps": True})
    assert ballot.parse({}).scope == "classifier"                  # the check completes the variant's presets
    assert ballot.parse({"variant": "authors"}).normalize == "row"
    assert bifp.parse({"multiplier_max": 2}).multiplier_max == 2.0 and bifp.parse({}).multiplier_max == "auto"
    assert bifp.parse({"one_sided": "no"}).one_sided is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        ceag.parse({}).eps = 0.5


@pytest.mark.parametrize("method, option, value", [
    ("lth", "last_round", "foo"), ("lth", "fraction", "1.5"), ("lth", "max_rounds", "-1"),
    ("ballot", "variant", "paper"), ("ballot", "body", "foo"), ("ballot", "body_fraction", "0"),
    ("fair_scratch", "penalty", "foo"), ("fair_scratch", "lam", "-1"), ("fair_scratch", "surrogate", "foo"),
    ("fair_scratch", "lam_warmup", "1.5"),
    ("fair_scratch", "out_bias", "learn"),
    ("ceag", "dual_optimizer", "foo"), ("ceag", "order", "foo"), ("ceag", "select", "foo"),
    ("el", "dual_optimizer", "foo"), ("fairgrape", "keep_per_iter", "1.5"),
    ("bifp", "mask_grad", "foo"), ("bifp", "fairness_mode", "foo"), ("bifp", "one_sided", "maybe"),
    ("prune_then_fair", "dual_optimizer", "foo"), ("fair_then_prune", "multiplier_max", "lots"),
])
def test_bad_option_values_fail_before_any_data_loads(method, option, value, capsys, monkeypatch):
    import fairprune_jax.data as data_pkg

    def no_loading(*a, **k):
        raise AssertionError("data was loaded before the bad option value was refused")
    monkeypatch.setattr(data_pkg, "load_dataset", no_loading)
    monkeypatch.setattr("fairprune_jax.running.preparation.load_dataset", no_loading)
    code = main(["run", "--method", method, "--opt", f"{option}={value}", "--dataset", "adult",
                 "--data-dir", "no-such-folder", "--no-progress", "--checkpoint-every", "0"])
    err = capsys.readouterr().err
    assert code == 2 and option in err and "no-such-folder" not in err, err


def test_runs_keep_a_persistent_compilation_cache(tmp_path, monkeypatch):
    """`fairprune run` / `compare` turn on JAX's persistent compilation cache (a second run skips compiling:
    measured 33 -> 27 s for the main job, 20 -> 15.5 s on digits); FAIRPRUNE_XLA_CACHE=0 turns it off and a
    JAX_COMPILATION_CACHE_DIR already set wins."""
    import subprocess
    import sys
    from fairprune_jax.training.caches import use_compilation_cache
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "given"))
    assert use_compilation_cache() == str(tmp_path / "given")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    code = ("import os, sys; from fairprune_jax.training.caches import use_compilation_cache; "
            "f = use_compilation_cache(); "
            "print(f, os.environ['JAX_COMPILATION_CACHE_DIR'], 'jax' in sys.modules)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["FAIRPRUNE_XLA_CACHE"] = str(tmp_path / "mine")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(tmp_path / "mine"), str(tmp_path / "mine"), "False"]
    env["FAIRPRUNE_XLA_CACHE"] = "0"
    off = subprocess.run([sys.executable, "-c", code.replace(", os.environ['JAX_COMPILATION_CACHE_DIR']", "")],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert off.split() == ["None", "False"]
    assert (tmp_path / "mine").is_dir()


def test_compare_without_a_toml_file(tmp_path, capsys):
    """`fairprune compare --methods ... --sparsities ... --seeds ...`: the grid from flags, written as a TOML
    (--save-config) and run through the same checks; each library warning printed once; the terminal table
    has results.md's columns and no `± 0` for a single seed; grid flags beside --config are an error."""
    toml = tmp_path / "grid.toml"
    rc = main(["compare", "--dataset", "digits", "--methods", "magnitude,random", "--sparsities", "0.5",
               "--seeds", "0", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "out"),
               "--save-config", str(toml)])
    out, err = capsys.readouterr()
    assert rc == 0 and toml.is_file() and 'methods = ["magnitude", "random"]' in toml.read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert err.count("WARNING: the test split cannot certify") == 1 and "FairpruneWarning" not in err
    table = [ln for ln in out.splitlines() if ln.startswith("| method")][0]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "test_dp_diff" not in table and "±" not in out           # class groups: no DP / EO; one seed
    assert all(c.strip() in md for c in table.split("|")[4:-1])     # every terminal column is in results.md
    assert main(["compare", "--config", str(toml), "--methods", "nft"]) == 2
    assert "describe a grid without a TOML file" in capsys.readouterr().err
    # the file names its output folder: --config continues the same grid there (every cell reused)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "cells").glob("*/results.json")}
    assert main(["compare", "--config", str(toml), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "cells").glob("*/results.json")} == before
    capsys.readouterr()
    # another grid is not written over an existing file (the user's own grid, say), and the file stays
    kept = toml.read_text()
    assert main(["compare", "--dataset", "digits", "--methods", "bogus", "--sparsities", "0.5", "--no-progress",
                 "--save-config", str(toml)]) == 2
    assert "is there already with another grid" in capsys.readouterr().err and toml.read_text() == kept
    assert main(["compare", "--sparsities", "0.5"]) == 2
    assert "needs --config FILE, or the grid as flags" in capsys.readouterr().err


def test_no_compile_cache_flag_and_prune_keep_the_callers_cache(tmp_path):
    """`--no-compile-cache` writes nothing into the user's cache folder; without it the executables land there.
    In a process whose JAX already has a cache folder (the caller's own), prune() leaves it as it is."""
    import os
    import subprocess
    import sys
    import jax
    from fairprune_jax.training import caches
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "FAIRPRUNE_XLA_CACHE")}
    run = [sys.executable, "-m", "fairprune_jax.running.cli", "run", "--dataset", "digits", "--method", "magnitude",
           "--epochs", "1", "--finetune-epochs", "1", "--no-progress", "--checkpoint-every", "0"]
    for flag, home in (("--no-compile-cache", tmp_path / "off"), (None, tmp_path / "on")):
        p = subprocess.run([*run, "--out", str(home / "run"), *([flag] if flag else [])],
                           env=dict(env, XDG_CACHE_HOME=str(home)), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
    assert not (tmp_path / "off" / "fairprune_jax" / "xla").exists()
    assert any((tmp_path / "on" / "fairprune_jax" / "xla").iterdir())
    assert caches.use_compilation_cache() == jax.config.jax_compilation_cache_dir      # the test run's own


def test_second_run_reuses_the_dense_model(tmp_path, monkeypatch, capsys):
    """`fairprune run` saves its dense model in the user's cache; a later run with the same data and dense
    settings (another method or sparsity) starts from it and gets the numbers it would have got training it;
    other dense settings, `--no-dense-cache` or checkpoints numbered as if it had trained are honoured."""
    import json
    monkeypatch.setenv("FAIRPRUNE_DENSE_CACHE", str(tmp_path / "dense"))
    base = ["run", "--dataset", "digits", "--epochs", "1", "--finetune-epochs", "1", "--no-progress"]

    def go(name, *extra):
        assert main([*base, "--out", str(tmp_path / name), *extra]) == 0
        return json.loads((tmp_path / name / "results.json").read_text())

    first = go("a", "--method", "nft", "--checkpoint-every", "0")
    assert first["runtime"]["dense_from_cache"] is False and len(list((tmp_path / "dense").iterdir())) == 1
    fresh = go("b", "--method", "magnitude", "--no-dense-cache", "--checkpoint-every", "0")
    again = go("c", "--method", "magnitude", "--checkpoint-every", "5")
    assert "dense model: the one an earlier run trained" in capsys.readouterr().out
    assert fresh["runtime"]["dense_from_cache"] is False and again["runtime"]["dense_from_cache"] is True
    assert again["pruned"] == fresh["pruned"] and again["dense"] == fresh["dense"]
    assert again["timings"]["dense_train_s"] == 0.0
    ck = tmp_path / "c" / "checkpoints"
    assert not (ck / "00-dense").exists() and sorted(p.name[:2] for p in ck.glob("0*")) == ["01"]
    other = go("d", "--method", "magnitude", "--lr", "0.002", "--checkpoint-every", "0")
    assert other["runtime"]["dense_from_cache"] is False and len(list((tmp_path / "dense").iterdir())) == 2


def test_a_later_run_reuses_the_pruned_start(tmp_path, monkeypatch, capsys):
    """ceag, nft and el fine-tune the same gradually pruned model: a run saves it beside its cached dense model,
    and a later run of another of them (same sparsity and pruning settings) starts from it, with the numbers it
    would have got pruning again; another sparsity prunes again, and checkpoints keep their phase numbers."""
    import json
    monkeypatch.setenv("FAIRPRUNE_DENSE_CACHE", str(tmp_path / "dense"))
    base = ["run", "--dataset", "digits", "--epochs", "1", "--finetune-epochs", "2", "--no-progress"]

    def go(name, *extra):
        assert main([*base, "--out", str(tmp_path / name), *extra]) == 0
        return json.loads((tmp_path / name / "results.json").read_text())

    first = go("a", "--method", "nft", "--checkpoint-every", "0")
    assert first["runtime"]["pruned_start_from_cache"] is False
    assert len(list((tmp_path / "dense").glob("*/pruned-start-*"))) == 1
    fresh = go("b", "--method", "ceag", "--no-dense-cache", "--checkpoint-every", "0")
    again = go("c", "--method", "ceag", "--checkpoint-every", "5")
    assert "pruned start: the gradually pruned model an earlier run made" in capsys.readouterr().out
    assert fresh["runtime"]["pruned_start_from_cache"] is False and again["runtime"]["pruned_start_from_cache"]
    assert again["pruned"] == fresh["pruned"] and again["dense"] == fresh["dense"]
    assert again["method_info"]["prune_history"]["cached"] is True
    ck = tmp_path / "c" / "checkpoints"          # dense and pruning phases read, the fine-tuning numbered 02
    assert sorted(p.name[:2] for p in ck.glob("0*")) == ["02"]
    other = go("d", "--method", "ceag", "--sparsity", "0.8", "--checkpoint-every", "0")
    assert other["runtime"]["pruned_start_from_cache"] is False
    assert len(list((tmp_path / "dense").glob("*/pruned-start-*"))) == 2


def test_a_later_run_reuses_the_parsed_table_only_for_the_same_bytes(tmp_path, monkeypatch, capsys):
    """A CSV parsed by one run is reused by the next with the same file bytes and options (the same numbers, the
    same warnings given again); changed bytes, other options or a damaged cache entry parse the file again."""
    import json
    import numpy as np
    monkeypatch.setenv("FAIRPRUNE_DENSE_CACHE", str(tmp_path / "dense"))
    rng = np.random.default_rng(0)
    n = 240
    g = rng.choice(["a", "b", "c"], n)
    x1 = rng.normal(size=n).round(3)
    y = (x1 + (g == "a") + rng.normal(scale=0.5, size=n) > 0.5).astype(int)
    csv = tmp_path / "d.csv"
    rows = "\n".join(f"{a},{b},{c},café{i % 2}" for i, (a, b, c) in enumerate(zip(x1, g, y)))
    csv.write_bytes(("x1,grp,y,note\n" + rows + "\n").encode("cp1252"))      # not UTF-8: a warning each time
    base = ["run", "--dataset", "csv", "--data-dir", str(csv), "--target", "y", "--protected", "grp",
            "--method", "magnitude", "--epochs", "1", "--no-progress", "--checkpoint-every", "0"]

    def go(name, *extra):
        assert main([*base, "--out", str(tmp_path / name), *extra]) == 0
        cap = capsys.readouterr()
        return json.loads((tmp_path / name / "results.json").read_text()), cap.out + cap.err

    first, out1 = go("a")
    again, out2 = go("b")
    assert first["runtime"]["data_from_cache"] is False and again["runtime"]["data_from_cache"] is True
    assert "data: the table an earlier run parsed" in out2
    assert "is not valid UTF-8" in out1 and "is not valid UTF-8" in out2
    assert again["pruned"] == first["pruned"] and again["dataset_meta"] == first["dataset_meta"]
    assert again["data_fingerprint"] == first["data_fingerprint"]
    other, _ = go("c", "--data-opt", "test_fraction=0.3")
    assert other["runtime"]["data_from_cache"] is False
    csv.write_bytes(csv.read_bytes().replace(b"\n0.", b"\n1.", 5))             # other bytes, same size
    changed, _ = go("d")
    assert changed["runtime"]["data_from_cache"] is False and changed["data_fingerprint"] != first["data_fingerprint"]
    for f in (tmp_path / "dense" / "tables").glob("*.npz"):                      # damage every entry
        f.write_bytes(f.read_bytes()[:100])
    damaged, _ = go("e")
    assert damaged["runtime"]["data_from_cache"] is False and damaged["pruned"] == changed["pruned"]


def test_a_dense_cache_that_cannot_be_written_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    """Saving the dense model for later runs is a convenience: a full disk or read-only folder is a warning."""
    from fairprune_jax.running import preparation

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("FAIRPRUNE_DENSE_CACHE", str(tmp_path / "dense"))
    monkeypatch.setattr(preparation, "save_dense", boom)
    assert main(["run", "--dataset", "digits", "--epochs", "1", "--finetune-epochs", "1", "--method", "magnitude",
                 "--no-progress", "--checkpoint-every", "0", "--out", str(tmp_path / "o")]) == 0
    cap = capsys.readouterr()
    assert "could not be saved for later runs" in cap.out + cap.err
    assert (tmp_path / "o" / "results.json").is_file()
