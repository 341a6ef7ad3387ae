"""The README's "Your own model and training loop" examples run as written."""
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example(name: str) -> str:
    """The python block right after ``<!-- readme-example: name -->``."""
    m = re.search(rf"<!-- readme-example: {re.escape(name)} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README example {name!r} not found"
    return m.group(1)


def run(name: str) -> dict:
    ns: dict = {"__name__": f"readme_{name.replace('-', '_')}"}
    exec(compile(example(name), f"README.md[{name}]", "exec"), ns)
    return ns


@pytest.mark.parametrize("name,max_lines", [("pruning-loop", 30), ("ceag-loop", 47), ("prune-api", 24),
                                            ("first-hour", 14)])
def test_examples_stay_short(name, max_lines):
    assert sum(1 for line in example(name).splitlines() if line.strip()) <= max_lines


def test_pruning_in_your_own_loop():
    ns = run("pruning-loop")
    model = ns["model"]
    for kernel in (model.conv.kernel[...], model.out.kernel[...]):     # exactly zero, exact count per layer
        assert np.count_nonzero(np.asarray(kernel)) == round(0.1 * kernel.size)
    assert ns["summary"]["sparsity_prunable"] == pytest.approx(0.9, abs=2e-3)
    assert float(ns["loss"]) < 0.69                                   # it learned something while pruning


def test_ceag_constraints_in_your_own_loop():
    ns = run("ceag-loop")
    lam = np.asarray(ns["dual_state"].multipliers)
    assert lam.shape == (3,) and np.all(np.isfinite(lam)) and np.all(lam >= 0) and lam.max() > 0
    kernels = [np.asarray(v) for k, v in ns["jax"].tree_util.tree_leaves_with_path(ns["params"])
               if "kernel" in str(k[-1])]
    assert all(np.count_nonzero(k) == round(0.2 * k.size) for k in kernels)


def test_prune_your_own_model(recwarn):
    ns = run("prune-api")
    model, report = ns["model"], ns["report"]
    assert type(model).__name__ == "Net" and report["method"] == "ceag" and report["model"] == "Net"
    hidden = np.asarray(model.hidden.kernel[...])                     # CEAG keeps the first conv and the head dense
    assert np.count_nonzero(hidden) == round(0.1 * hidden.size)
    assert np.all(hidden[np.asarray(ns["masks"]["hidden"]["kernel"]) == 0] == 0)
    assert report["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-3)
    assert ns["logits"].shape == (5, 2) and "certificate" in report["pruned"]["test"]
    # the example meets its own constraint and its test split carries a certificate worth printing
    cert = report["pruned"]["test"]["certificate"]
    assert cert["floor_max_psi"] < 0.05 and cert["certified_max_psi"] < 0.1
    missed = [str(w.message) for w in recwarn if "not met" in str(w.message) or "no checkpoint met" in str(w.message)]
    assert not missed, missed
    # the typed report: attributes and one row per group
    assert report.accuracy == report["pruned"]["test"]["accuracy"] and report.certified_max_psi == \
        cert["certified_max_psi"]
    rows = report.by_group(frame=False)
    assert [r["group"] for r in rows] == report.groups and all(isinstance(r["n"], int) for r in rows)
    assert all(r["psi_low"] <= r["psi"] <= r["psi_high"] and r["verdict"] in ("holds", "violated", "undetermined")
               for r in rows)
    assert max(r["psi_upper"] for r in rows) == report.certified_max_psi    # the headline is the largest
    table = report.by_group()                       # pandas is in the test extra
    assert list(table.index) == report.groups and table["n"].sum() == report["pruned"]["test"]["n"]


def test_the_first_hour_example(recwarn):
    """The dozen lines right after the set-up commands: a user's model, pruned with the defaults."""
    ns = run("first-hour")
    report = ns["report"]
    assert report.sparsity == pytest.approx(0.9, abs=2e-3) and report.accuracy > 0.8
    rows = report.by_group(frame=False)
    assert len(rows) == 3 and all(r["verdict"] in ("holds", "violated", "undetermined") for r in rows)
    missed = [str(w.message) for w in recwarn if "no checkpoint met" in str(w.message)]
    assert not missed, missed
