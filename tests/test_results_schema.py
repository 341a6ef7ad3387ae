"""docs/RESULTS.md lists every field of results.json: a binary and a multi-class run (with a validation split)
write no field the page does not list, with the type it states (counts are integers)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import fairprune_jax as fp
from fairprune_jax.reporting.result import SCHEMA_VERSION

DOC = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
FREE_FORM = {"config", "method_info", "history", "dataset_meta", "timings", "runtime", "tracking", "compact"}
TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


def documented() -> dict[str, str]:
    """``{path pattern: type}`` from the tables of docs/RESULTS.md (``<model>`` and ``<ref>`` expanded)."""
    out = {}
    for path, typ in re.findall(r"^\| `([^`]+)` \| (\w+) \|", DOC.read_text(), re.M):
        if path.startswith("certificate."):
            path = "pruned.<split>." + path
        for model in (("dense", "pruned") if path.startswith("<model>") else (None,)):
            p = path.replace("<model>", model) if model else path
            for ref in (("between_groups", "to_overall") if "<ref>" in p else (None,)):
                out[p.replace("<ref>", ref) if ref else p] = typ
    return out


def fields(report: dict) -> dict[str, object]:
    """Every leaf of a report as ``{pattern: value}``, names of groups, classes, layers and splits replaced by
    ``<group>``, ``<class>``, ``<layer>``, ``<split>``; the free-form records kept whole."""
    groups, classes = set(report["groups"]["names"]), set(report["classes"])
    layers = set(report["sparsity"]["layers"])
    out = {}

    def walk(x, parts):
        if parts and parts[0] in FREE_FORM:
            out[parts[0]] = x
            return
        if isinstance(x, dict):
            for k, v in x.items():
                parent = parts[-1] if parts else ""
                if parent in ("dense", "pruned", "sizes", "rows") and k in ("train", "test", "val"):
                    k = "<split>"
                elif parent in ("groups", "per_group") and k in groups:
                    k = "<group>"
                elif parent == "layers" and k in layers:
                    k = "<layer>"
                elif k in classes and parent in ("demographic_parity_difference", "equalized_odds_difference"):
                    k = "<class>"
                walk(v, parts + [k])
        else:
            out[".".join(parts)] = x
    walk(report, [])
    return out


def _run(num_classes: int, tmp_path) -> dict:
    rng = np.random.default_rng(num_classes)
    n = 600
    x = rng.normal(size=(n, 6)).astype(np.float32)
    g = rng.integers(0, 3, n)
    y = ((x[:, 0] + 0.5 * g + x[:, 1]) > 0.5).astype(np.int64) if num_classes == 2 else \
        np.digitize(x[:, 0] + 0.3 * g, [-0.5, 0.5])
    model = nnx.Sequential(nnx.Linear(6, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, num_classes, rngs=nnx.Rngs(1)))
    out = tmp_path / f"run{num_classes}"
    fp.prune(model, train=(x, y, g), method="nft", sparsity=0.5, val_fraction=0.2, out=str(out), epochs=1,
             finetune_epochs=1, progress=False)
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("num_classes", [2, 3])
def test_every_field_is_documented_with_its_type(num_classes, tmp_path):
    report = _run(num_classes, tmp_path)
    assert report["schema_version"] == SCHEMA_VERSION == 2
    assert "val" in report["pruned"] and "certificate" in report["pruned"]["val"]
    docs = documented()
    got = fields(report)
    missing = sorted(p for p in got if p not in docs)
    assert missing == [], f"fields written but not in docs/RESULTS.md: {missing}"
    for path, value in got.items():
        if value is None:
            continue            # a rate of a group without rows in a split
        want = TYPES[docs[path]]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float:
            ok = isinstance(value, (float, int)) and not isinstance(value, bool)
        assert ok, f"{path}: {type(value).__name__} {value!r}, docs/RESULTS.md says {docs[path]}"
    if num_classes == 3:
        assert any(p.startswith("pruned.<split>.per_class_parity.") for p in got)


def test_the_page_lists_no_field_twice_and_parses():
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \|", DOC.read_text(), re.M)
    paths = [p for p, _ in rows]
    assert len(paths) == len(set(paths)) and len(paths) > 100
    assert {t for _, t in rows} <= set(TYPES)
