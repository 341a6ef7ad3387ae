"""The light install: the CLI answers without JAX, and the optional TFDS reader is asked for by name."""
from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("jax", "jaxlib", "optax", "flax", "tensorflow", "tensorflow_datasets", "pyarrow")


def _modules_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running ``code``."""
    probe = code + f"\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])


def test_the_help_lists_every_model_of_the_zoo():
    from fairprune_jax.core.config import MODEL_NAMES
    from fairprune_jax.models import MODELS
    assert tuple(sorted(MODELS)) == MODEL_NAMES


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["compare", "--help"]])
def test_help_imports_no_jax(argv):
    code = ("import contextlib, io\nfrom fairprune_jax.running import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try:\n        cli.main({argv!r})\n    except SystemExit:\n        pass\n")
    assert _modules_after(code) == []


def test_a_digits_load_does_not_import_the_tfds_reader():
    code = "from fairprune_jax.data import load_dataset\nload_dataset('digits')\n"
    assert not {"tensorflow", "tensorflow_datasets"} & set(_modules_after(code))   # (pandas may import pyarrow)


def test_tfds_without_the_extra_names_the_install_command(monkeypatch, tmp_path, capsys, no_training):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)     # import now raises ImportError
    from fairprune_jax.data import load_dataset
    from fairprune_jax.data.tfds import MissingExtra

    with pytest.raises(MissingExtra, match=r'pip install "fairprune_jax\[tfds\]"'):
        load_dataset("tfds:cifar10", data_dir=str(tmp_path))
    from fairprune_jax.running.cli import main
    rc = main(["run", "--dataset", "tfds:cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and 'fairprune: error: tfds:cifar10 needs the optional' in err and "[tfds]" in err


def test_methods_listing_imports_no_jax():
    """``fairprune methods`` reads the registry's snapshot (method_catalog.py), so it imports no JAX."""
    code = ("import contextlib, io\nfrom fairprune_jax.running import cli\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    rc = cli.main(['methods'])\n"
            "assert rc == 0 and 'ceag ' in buf.getvalue() and 'options: eps=' in buf.getvalue(), buf.getvalue()\n")
    assert _modules_after(code) == []


def test_methods_snapshot_equals_the_registry(capsys):
    """The snapshot ``fairprune methods`` prints is the live registry's (names, descriptions, options with their
    defaults and types, structured), so it cannot drift from the method files unnoticed."""
    from fairprune_jax.running import method_listing
    from fairprune_jax.running.cli import main
    live, snap = method_listing.from_registry(), method_listing.load()
    stale = ("fairprune_jax/running/method_catalog.py is stale: run `python -m fairprune_jax.running.method_listing` "
             "and commit it")
    assert [e["name"] for e in snap] == [e["name"] for e in live], stale
    for a, b in zip(snap, live):
        assert a == b, f"{stale} ({a['name']})"
        assert [type(v) for v in a["options"].values()] == [type(v) for v in b["options"].values()], stale
    assert main(["methods"]) == 0
    assert capsys.readouterr().out == method_listing.format_listing(live) + "\n"


def test_every_method_option_is_explained():
    """`fairprune methods NAME` prints a line per option with what it does (fairprune_jax/running/option_docs.py):
    an option added to a method without its line fails here."""
    from fairprune_jax.running import method_listing
    from fairprune_jax.running.option_docs import option_doc
    entries = method_listing.from_registry()
    missing = [f"{e['name']}.{k}" for e in entries for k in e["options"] if not option_doc(e["name"], k)]
    assert not missing, f"add a line for each to fairprune_jax/running/option_docs.py: {missing}"
    ceag = method_listing.format_listing([e for e in entries if e["name"] == "ceag"], explain=True)
    assert "  eps=0.01" in ceag and "excess accuracy gap" in ceag.splitlines()[1]
