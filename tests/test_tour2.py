"""The second tour of inputs (issue "nothing silent, nothing lost"; docs/HARDENING.md rows 59-): one test per
class of failure. Values written two ways, groups that cannot mean anything, names that collide, files in other
formats, runs that would overwrite or reuse another run's results, and inputs that used to end in a traceback."""
from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from fairprune_jax.running import compare, runner
from fairprune_jax.training.checkpoint import CheckpointMismatchError, Checkpointer
from fairprune_jax.data.base import Dataset, Split, encode_groups, group_label
from fairprune_jax.data.tabular import canonical_numbers, load_csv
from fairprune_jax.methods.base import RunConfig

from test_hardening import cfg, toy


def write_csv(path: Path, header: list[str], rows: list[list], *, sep: str = ",") -> Path:
    path.write_text("\n".join(sep.join(map(str, r)) for r in [header] + rows) + "\n")
    return path


def table(n: int = 240, seed: int = 0):
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n).round(3), rng.normal(size=n).round(3)
    g = rng.integers(0, 2, n)
    y = (x1 + 0.5 * g > 0).astype(int)
    return x1, x2, g, y


# ---------------------------------------------------------------------------
# One value, one spelling
# ---------------------------------------------------------------------------

def test_numbers_that_are_equal_are_one_label_and_one_group(tmp_path):
    x1, x2, g, y = table()
    # the target writes some 1s as 1.0 and the protected column some 1s as 1.0 and 01
    rows = [[a, b, ["1", "1.0", "01"][i % 3] if gg else "2", ("1.0" if yy and i % 2 else yy)]
            for i, (a, b, gg, yy) in enumerate(zip(x1, x2, g, y))]
    ds = load_csv(write_csv(tmp_path / "d.csv", ["x1", "x2", "grp", "y"], rows), target="y", protected="grp")
    assert ds.class_names == ["0", "1"]
    assert ds.group_names == ["1", "2"]
    assert list(canonical_numbers(np.array(["1", "1.0", "01", "2.50", "abc", "", "NaN", "1e0"]))) == \
        ["1", "1", "1", "2.5", "abc", "", "NaN", "1"]


def test_values_differing_only_by_case_or_spacing_are_warned(tmp_path):
    x1, x2, g, y = table()
    rows = [[a, b, ["Male", "male", "MALE", "Female"][i % 4], yy] for i, (a, b, yy) in enumerate(zip(x1, x2, y))]
    with pytest.warns(UserWarning, match=r"protected column 'sex' has values that differ only by case or spacing "
                                         r"\('MALE' / 'Male' / 'male'\)"):
        ds = load_csv(write_csv(tmp_path / "d.csv", ["x1", "x2", "sex", "y"], rows), target="y", protected="sex")
    assert len(ds.group_names) == 4     # kept apart: they may mean different things


# ---------------------------------------------------------------------------
# Groups that cannot mean anything, names that cannot collide or break a table
# ---------------------------------------------------------------------------

def test_a_number_column_as_protected_attribute_is_refused_and_bins_group_it(tmp_path):
    x1, x2, _, y = table(600)
    ages = np.random.default_rng(1).uniform(18, 80, 600).round(2)
    p = write_csv(tmp_path / "d.csv", ["x1", "x2", "age", "y"], [list(r) for r in zip(x1, x2, ages, y)])
    with pytest.raises(ValueError, match=r"makes \d+ groups over 600 rows \(median 1 row\(s\) per group.*bins="):
        load_csv(p, target="y", protected="age")
    ds = load_csv(p, target="y", protected="age", bins="age:30,50")
    assert ds.group_names == ["<30", "30-50", ">=50"]
    assert min(np.bincount(ds.test.g)) >= 10          # the test split has rows of every range
    with pytest.raises(ValueError, match="increasing finite numbers"):
        load_csv(p, target="y", protected="age", bins="age:50,30")
    with pytest.raises(ValueError, match="not a protected column"):
        load_csv(p, target="y", protected="age", bins="x1:0")


def test_intersection_names_cannot_collide_and_control_characters_are_escaped():
    # ("p|q", "r") and ("p", "q|r") used to be both named "p|q|r"
    g, names, _ = encode_groups([np.array([0, 1, 0, 1]), np.array([0, 1, 1, 0])], [["p|q", "p"], ["r", "q|r"]])
    assert len(set(names)) == len(names) == 4
    assert '"p|q"|r' in names and 'p|"q|r"' in names
    assert group_label("a\nb") == "a\\nb" and group_label('x"y', quote=True) == '"x""y"'
    assert group_label("plain", quote=True) == "plain"


def test_a_group_without_positives_is_said_to_set_the_eo_difference():
    ds = toy()
    test = ds.test
    y = test.y.copy()
    y[test.g == 2] = 0                                       # group g2 has no positives in test
    ds = Dataset(ds.name, ds.train, Split(test.x, y, test.g), ds.group_names, ds.group_attrs, ds.class_names)
    with pytest.warns(UserWarning, match=r"g2 \(no positives\).*equalized-odds difference may be set by that"):
        run_cfg = cfg(out=None)
        runner.run_method(runner.prepare(run_cfg, ds))


# ---------------------------------------------------------------------------
# Files in other formats
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gzip", "bz2", "excel-sep"])
def test_compressed_files_and_a_spreadsheet_sep_line_are_read(tmp_path, kind):
    x1, x2, g, y = table()
    text = "\n".join(",".join(map(str, r)) for r in [["x1", "x2", "grp", "y"]] + [list(r) for r in zip(x1, x2, g, y)])
    if kind == "gzip":
        p = tmp_path / "d.csv.gz"
        p.write_bytes(gzip.compress(text.encode()))
    elif kind == "bz2":
        p = tmp_path / "d.data"                              # recognised by content, not by name
        p.write_bytes(bz2.compress(text.encode()))
    else:
        p = tmp_path / "d.csv"
        p.write_text("sep=;\n" + text.replace(",", ";"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no "not UTF-8" or other warning
        ds = load_csv(p, target="y", protected="grp")
    assert ds.group_names == ["0", "1"] and len(ds.train) + len(ds.test) == 240


def test_a_zip_archive_or_a_truncated_gzip_is_a_clear_error(tmp_path):
    p = tmp_path / "d.zip"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(ValueError, match="zip archive; unzip it"):
        load_csv(p, target="y", protected="g")
    p = tmp_path / "d.csv.gz"
    p.write_bytes(gzip.compress(b"a,b\n1,2\n" * 100)[:30])
    with pytest.raises(ValueError, match="gzip-compressed but cannot be decompressed"):
        load_csv(p, target="a", protected="b")


# ---------------------------------------------------------------------------
# A run's folder belongs to one run
# ---------------------------------------------------------------------------

def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    with runner.owning_folder(tmp_path):
        assert (tmp_path / runner.LOCK_FILE).is_file()
        with pytest.raises(ValueError, match=rf"in use by another fairprune run \(process {os.getpid()} on"):
            with runner.owning_folder(tmp_path):
                pass
    assert not (tmp_path / runner.LOCK_FILE).exists()       # released
    import socket
    (tmp_path / runner.LOCK_FILE).write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    with runner.owning_folder(tmp_path):                    # that process is gone: the lock is taken over
        pass
    (tmp_path / runner.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(ValueError, match="another-host"):  # another host's run is not guessed at
        with runner.owning_folder(tmp_path):
            pass


def test_the_default_output_folder_names_every_setting_that_changes_the_run(tmp_path, monkeypatch):
    from fairprune_jax.running.cli import build_parser, config_from_args

    def out(*argv):
        return config_from_args(build_parser().parse_args(["run", *argv])).out

    base = out("--dataset", "csv", "--data-dir", "a.csv", "--target", "y", "--protected", "s")
    assert base.startswith("runs/ceag_csv_s0.9_seed0-") and base == out(
        "--dataset", "csv", "--data-dir", "a.csv", "--target", "y", "--protected", "s")
    others = {out("--dataset", "csv", "--data-dir", "b.csv", "--target", "y", "--protected", "s"),
              out("--dataset", "csv", "--data-dir", "a.csv", "--target", "z", "--protected", "s"),
              out("--dataset", "csv", "--data-dir", "a.csv", "--target", "y", "--protected", "t"),
              out("--dataset", "csv", "--data-dir", "a.csv", "--target", "y", "--protected", "s", "--epochs", "3")}
    assert len(others) == 4 and base not in others
    monkeypatch.setenv("HOME", str(tmp_path))
    assert out("--out", "~/x") == str(tmp_path / "x")      # not a folder named "~"


def test_resume_after_the_data_changed_is_refused(tmp_path):
    a, b = toy(seed=0), toy(seed=1)
    assert a.fingerprint() == toy(seed=0).fingerprint() and a.fingerprint() != b.fingerprint()
    config = cfg(out=str(tmp_path))
    Checkpointer(tmp_path / "ck", config, every=5, data=a.fingerprint())
    (tmp_path / "ck" / "00-dense").mkdir()
    Checkpointer(tmp_path / "ck", config, every=5, resume=True, data=a.fingerprint())      # same data: fine
    with pytest.raises(CheckpointMismatchError, match=r"the data changed since the checkpoints .* \(content: checkpoint "):
        Checkpointer(tmp_path / "ck", config, every=5, resume=True, data=b.fingerprint())


def test_an_unreadable_run_file_names_itself_and_a_failed_start_does_not_block_the_next_run(tmp_path):
    config = cfg(out=str(tmp_path))
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "run.json").write_text('{"format": 1, "finger')             # truncated
    with pytest.raises(CheckpointMismatchError, match=r"run\.json cannot be read .*without --resume"):
        Checkpointer(tmp_path / "ck", config, every=5, resume=True)
    Checkpointer(tmp_path / "ck", config, every=5)   # nothing was saved: a fresh start, not "unfinished"


# ---------------------------------------------------------------------------
# Grids: validated lists, and finished cells reused only when they are this grid's
# ---------------------------------------------------------------------------

GRID = ('dataset = "digits"\nmethods = {methods}\nsparsities = {sparsities}\nseeds = {seeds}\n'
        '[run]\nepochs = {epochs}\nfinetune_epochs = 1\nbatch_size = 128\nmodel_options = {{}}\n')


def grid(tmp_path, methods='["magnitude"]', sparsities="[0.5]", seeds="[0]", epochs=1):
    p = tmp_path / "grid.toml"
    p.write_text(GRID.format(methods=methods, sparsities=sparsities, seeds=seeds, epochs=epochs)
                 .replace("model_options = {}\n", ""))
    return p


@pytest.mark.parametrize("field, value, match", [
    ("methods", '"magnitude"', r"methods must be a list, like"),
    ("methods", "[]", r"methods is empty"),
    ("seeds", "[]", r"seeds is empty"),
    ("seeds", "[0, 0]", r"seeds lists 0 more than once"),
    ("sparsities", "[0.5, 0.50]", r"sparsities lists 0.5 more than once"),
    ("sparsities", "[0.5, 0.5000001]", r"would share the folder cells/magnitude_s0.5_seed0"),   # not silently one
    ("seeds", '["0"]', r"seeds holds '0' \(str\)"),
])
def test_grid_lists_are_validated(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        compare.load_config(grid(tmp_path, **{field: value}))


def test_finished_cells_of_other_settings_are_not_reused(tmp_path):
    cc = compare.load_config(grid(tmp_path), out=str(tmp_path / "out"))
    compare.run_compare(cc, progress=False)
    cell = json.loads((compare.cell_dir(cc, "magnitude", 0.5, 0) / "results.json").read_text())
    assert cell["data_fingerprint"]["rows"]["train"] > 0
    compare.run_compare(cc, progress=False)                   # same grid: reused
    changed = compare.load_config(grid(tmp_path, epochs=2), out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"1 finished cell\(s\) were computed with other settings .*"
                                         r"epochs: cell 1 vs TOML 2.*another --out"):
        compare.run_compare(changed, progress=False)
    # other data under the same settings: a cell recorded on other rows
    cell["data_fingerprint"] = dict(cell["data_fingerprint"], content="0" * 24)
    assert "data content" in compare.stale_cell(cc, "magnitude", 0.5, 0, cell, data=toy().fingerprint())


def test_every_committed_cell_belongs_to_its_grid():
    """The reuse check accepts every committed experiment cell with its TOML as committed (a rerun of a grid
    resumes instead of refusing)."""
    root = Path(__file__).resolve().parents[1] / "experiments"
    n = 0
    for toml in sorted(root.glob("*.toml")):
        if compare.is_suite(toml):
            continue
        cc = compare.load_config(toml)
        for seed in cc.seeds:
            for s in cc.sparsities:
                for m in cc.methods:
                    p = compare.cell_dir(cc, m, s, seed) / "results.json"
                    if p.exists():
                        n += 1
                        assert compare.stale_cell(cc, m, s, seed, json.loads(p.read_text())) is None, (toml, p)
    assert n > 500


# ---------------------------------------------------------------------------
# Inputs that used to end in a traceback
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [({"hidden": 64}, r"hidden=64 .* non-empty list of positive integers"),
                                            ({"hidden": (0,)}, r"hidden=\(0,\)"),
                                            ({"hidden": ()}, r"hidden=\(\)")])
def test_model_option_values_of_the_wrong_kind(options, match):
    with pytest.raises(ValueError, match=match):
        runner.validate_config(cfg(model_options=options))
    with pytest.raises(ValueError, match=match):           # model chosen from the data: checked when built
        runner.prepare(cfg(model=None, model_options=options), toy())


def test_a_backend_that_is_not_there_is_said_in_words(monkeypatch):
    import jax
    from fairprune_jax.running.cli import check_backend

    def broken():
        raise RuntimeError("Unable to initialize backend 'cuda'")
    monkeypatch.setattr(jax, "devices", broken)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    with pytest.raises(ValueError, match=r"JAX_PLATFORMS=cuda.*pip install -U \"jax\[cuda12\]\".*unset JAX_PLATFORMS"):
        check_backend()


def test_prune_takes_names_a_dict_and_a_model_returning_a_tuple():
    from flax import nnx
    import fairprune_jax as fp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = np.where(x[:, 0] > 0, "yes", "no")
    g = np.array(["north", "south", "east"])[rng.integers(0, 3, 300)]

    class WithAux(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.a(x))
            return self.b(h), {"hidden": h}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fp.prune(WithAux(nnx.Rngs(0)), {"x": x, "y": y, "g": g}, method="magnitude", sparsity=0.5, epochs=1)
    assert r.report["pruned"]["test"]["groups"].keys() == {"east", "north", "south"}
    assert r.report["classes"] == ["no", "yes"] or r.report.get("class_names") == ["no", "yes"]
    with pytest.raises(ValueError, match="leave out group_names="):
        fp.prune(WithAux(nnx.Rngs(0)), (x, y, g), method="magnitude", group_names=["a", "b", "c"], epochs=1)
    with pytest.raises(ValueError, match=r"as a dict takes the keys 'x', 'y' and optionally 'g'"):
        fp.prune(WithAux(nnx.Rngs(0)), {"features": x, "y": y}, method="magnitude", epochs=1)


def test_the_dense_cache_is_one_write_keyed_by_the_data(tmp_path):
    """The cached dense model and its fingerprint are one orbax checkpoint; other data (same settings) misses."""
    a = toy()
    prep = runner.prepare(cfg(), a, dense_cache=tmp_path)
    assert runner.dense_cached(tmp_path, cfg(), a.fingerprint())
    assert not runner.dense_cached(tmp_path, cfg(), toy(seed=1).fingerprint())
    assert not runner.dense_cached(tmp_path, cfg(epochs=2), a.fingerprint())
    again = runner.prepare(cfg(), a, dense_cache=tmp_path)
    assert again.dense_history.get("cached") is True
    import jax
    same = jax.tree.map(lambda u, v: bool(np.array_equal(np.asarray(u), np.asarray(v))),
                        jax.tree.leaves(prep.dense.params), jax.tree.leaves(again.dense.params))
    assert all(same)


def test_a_cached_state_that_does_not_fit_or_is_damaged_is_a_miss(tmp_path):
    """caches.load_state restores by name, shape and dtype, casting nothing: another dtype, another structure,
    another fingerprint or a damaged checkpoint folder is a miss (the caller trains again), never an error."""
    import jax
    import jax.numpy as jnp
    from fairprune_jax.training import caches
    state = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.ones((), jnp.int32), "key": jax.random.key(3)}
    caches.save_state(tmp_path / "s", state, {"fingerprint": {"v": 1}, "history": {"loss": np.float32(0.5)}})
    got, meta = caches.load_state(tmp_path / "s", state, {"v": 1})
    assert np.array_equal(got["w"], state["w"]) and got["n"].dtype == jnp.int32 and meta["history"]["loss"] == 0.5
    assert np.array_equal(jax.random.key_data(got["key"]), jax.random.key_data(state["key"]))
    assert caches.load_state(tmp_path / "s", state, {"v": 2}) is None                       # fingerprint
    import os
    here = os.getcwd()
    os.chdir(tmp_path)
    try:                                         # a relative folder (a compare grid's runs/NAME/dense/seed0)
        caches.save_state(Path("rel") / "s", state, {"fingerprint": {"v": 1}})
        assert caches.load_state(Path("rel") / "s", state, {"v": 1}) is not None
    finally:
        os.chdir(here)
    assert caches.load_state(tmp_path / "s", dict(state, w=state["w"].astype(jnp.float16)), {"v": 1}) is None
    assert caches.load_state(tmp_path / "s", dict(state, extra=jnp.zeros(2)), {"v": 1}) is None
    assert caches.load_state(tmp_path / "s", {"w": state["w"], "n": state["n"]}, {"v": 1}) is None
    for f in sorted((tmp_path / "s").rglob("*")):                                            # damage every file
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    assert caches.load_state(tmp_path / "s", state, {"v": 1}) is None
    assert caches.state_meta(tmp_path / "nothing") is None


def test_comma_numbers_are_warned_and_read_with_decimal_or_thousands(tmp_path):
    x1, x2, g, y = table()
    rows = [[str(a).replace(".", ","), f"{int(abs(b) * 3000):,}", gg, yy] for a, b, gg, yy in zip(x1, x2, g, y)]
    p = tmp_path / "d.csv"
    with open(p, "w") as f:
        f.write("x1;inc;grp;y\n" + "\n".join(";".join(map(str, r)) for r in rows) + "\n")
    with pytest.warns(UserWarning, match=r"column 'x1' holds numbers written with a comma .* decimal=\",\""):
        load_csv(p, target="y", protected="grp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_csv(p, target="y", protected="grp", decimal=",")
    assert ds.meta["column_types"]["x1"] == "numeric"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_csv(p, target="y", protected="grp", thousands=",")
    assert ds.meta["column_types"]["inc"] == "numeric"
    with pytest.raises(ValueError, match="thousands must be one of"):
        load_csv(p, target="y", protected="grp", thousands=",", decimal=",")


def test_a_trailing_delimiter_on_every_line_is_dropped(tmp_path):
    x1, x2, g, y = table()
    p = tmp_path / "d.csv"
    p.write_text("x1,x2,grp,y,\n" + "\n".join(f"{a},{b},{c},{d}," for a, b, c, d in zip(x1, x2, g, y)) + "\n")
    ds = load_csv(p, target="y", protected="grp")
    assert ds.meta["columns"] == ["x1", "x2", "grp", "y"]


def test_a_parquet_or_binary_file_is_named_as_such(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1" + bytes(range(256)) + b"PAR1")
    with pytest.raises(ValueError, match="is a Parquet file, not a CSV"):
        load_csv(p, target="y", protected="g")
    p = tmp_path / "d.csv"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="is not a text file"):
        load_csv(p, target="y", protected="g")


def test_no_float_method_option_is_negative():
    from fairprune_jax.methods import get_method
    for method, option in (("ceag", "eps"), ("ceag", "dual_lr"), ("bifp", "tau"), ("nft", "distill"),
                           ("ballot", "eta")):
        with pytest.raises(ValueError, match=rf"option '{option}' must be >= 0"):
            get_method(method).parse({option: -0.1})


def test_compare_toml_errors_name_the_file(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text('dataset = "digits"\nmethods = ["magnitude"\n')
    with pytest.raises(ValueError, match=r"g\.toml is not valid TOML"):
        compare.load_config(p)
    p.write_text('dataset = "digits"\ndata_dir = 5\nmethods = ["magnitude"]\nsparsities = [0.5]\nseeds = [0]\n')
    with pytest.raises(ValueError, match=r"g\.toml: data_dir must be text"):
        compare.load_config(p)
    p.write_text('dataset = "digits"\nmethods = ["foo"]\nsparsities = [0.5]\nseeds = [0]\n')
    with pytest.raises(ValueError, match=r"g\.toml: unknown method 'foo'"):
        compare.load_config(p)
    p.write_text('dataset = "digits"\nmethods = ["magnitude"]\nsparsities = [0.5]\nseeds = [0]\n')
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is an existing file; choose another --out"):
        compare.load_config(p, out=str(tmp_path / "file"))


def test_prune_messages_for_missing_group_ids_and_a_one_output_model():
    from fairprune_jax.running.api import arrays_dataset
    x = np.zeros((40, 3), np.float32)
    y = np.arange(40) % 2
    g = (np.arange(40) % 2).astype(float)
    g[0] = np.nan
    with pytest.raises(ValueError, match=r"group ids g has 1 missing \(NaN / inf\) value"):
        arrays_dataset((x, y, g))
    with pytest.raises(ValueError, match="one logit per class"):
        arrays_dataset((x, y, np.zeros(40)), num_classes=1)
    with pytest.raises(ValueError, match=r"must be integers \(or names\); got dtype float64 with fractions"):
        arrays_dataset((x, y + 0.5, np.zeros(40)))


def test_progress_bars_only_where_a_person_watches(monkeypatch):
    import sys
    from fairprune_jax.core.notices import human_watching
    monkeypatch.setenv("CI", "true")
    assert not human_watching()
    monkeypatch.delenv("CI")
    monkeypatch.setitem(sys.modules, "ipykernel", object())      # a notebook
    assert human_watching()
    monkeypatch.delitem(sys.modules, "ipykernel")
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))   # piped into a file
    assert not human_watching()


def test_a_progress_bar_starts_after_the_first_compiled_step(capsys):
    """The bar is created once the first step (its compilation) has finished, so its rate and ETA are of
    training steps only."""
    runner.prepare(cfg(progress=True), toy())
    err = capsys.readouterr().err
    first = re.findall(r"(\d+)/(\d+) \[", err)
    assert first and int(first[0][0]) >= 1          # the first frame already counts the compiled step


def test_a_pandas_dataframe_is_read_like_the_same_csv(tmp_path):
    """`data.load_dataframe(df, target=..., protected=...)`: the same dataset as the DataFrame saved as CSV and
    read by load_csv (same split, same encoding, same checks); NaN is a missing value."""
    pd = pytest.importorskip("pandas")
    from fairprune_jax.data import load_dataframe
    x1, x2, g, y = table()
    df = pd.DataFrame({"x1": x1, "x2": x2, "grp": np.where(g == 1, "b", "a"), "y": y})
    df.loc[3, "x2"] = np.nan
    df.to_csv(tmp_path / "d.csv", index=False)
    a, b = load_dataframe(df, target="y", protected="grp"), load_csv(tmp_path / "d.csv", target="y", protected="grp")
    assert a.fingerprint()["content"] == b.fingerprint()["content"] and a.meta["rows_dropped_missing_total"] == 1
    with pytest.raises(ValueError, match="unknown target column 'label'"):
        load_dataframe(df, target="label", protected="grp")


def test_prune_takes_a_validation_fraction():
    """The advice "hold out a validation split" is something prune() accepts: val_fraction= carves it."""
    from fairprune_jax.running.api import arrays_dataset
    x = np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32)
    y, g = (x[:, 0] > 0).astype(int), np.arange(500) % 2
    ds = arrays_dataset((x, y, g), val_fraction=0.2)
    assert len(ds.val) == pytest.approx(0.2 * 400, abs=2) and len(ds.train) + len(ds.val) == 400
    with pytest.raises(ValueError, match="either val= .* or val_fraction="):
        arrays_dataset((x, y, g), val=(x[:50], y[:50], g[:50]), val_fraction=0.2)


def test_the_certified_bound_is_the_methods_declared_promise():
    """The certificate checks the bound a method declares (``psi_bound``: ceag's eps), not any option that
    happens to be named eps; a method that promises none is certified at the default."""
    from fairprune_jax.methods import get_method
    from fairprune_jax.methods.base import DEFAULT_CERTIFY_EPS
    assert get_method("ceag").psi_bound == "eps" and get_method("bifp").psi_bound is None
    assert runner.certify_eps(RunConfig(method="ceag", method_options={"eps": 0.03})) == 0.03
    assert runner.certify_eps(RunConfig(method="bifp", method_options={"tau": 0.2})) == DEFAULT_CERTIFY_EPS
    assert runner.certify_eps(RunConfig(method="ceag", certify_eps=0.05)) == 0.05


def test_class_groups_show_cwv_and_mcd_not_dp_and_eo(capsys, tmp_path):
    """digits (the groups are the classes): the terminal table has CWV / MCD and no DP / EO rows (a class's
    rate of "class 1" is 1 or 0 by construction), and no "choose --positive-class" advice."""
    from fairprune_jax.running.cli import main
    assert main(["run", "--dataset", "digits", "--method", "magnitude", "--epochs", "1", "--no-progress",
                 "--checkpoint-every", "0", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "CWV (class-wise variance)" in out and "MCD" in out
    assert "demographic parity" not in out and "equalized odds" not in out and "--positive-class" not in out


def test_a_clone_folder_named_like_the_package_does_not_shadow_it(tmp_path):
    """A script next to a clone named fairprune_jax (the default clone name): `import fairprune_jax` finds the
    repository folder first; its __init__.py hands over to the package inside and says so (before: a namespace
    package without `prune`, AttributeError)."""
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "fairprune_jax").symlink_to(repo, target_is_directory=True)
    code = "import fairprune_jax, fairprune_jax.api as a; print(callable(fairprune_jax.prune), a.__file__)"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=""))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("True") and "fairprune_jax/fairprune_jax/running/api.py" in p.stdout.replace("\\", "/")
    assert "found the repository folder" in p.stderr and "Run your script from another folder" in p.stderr
