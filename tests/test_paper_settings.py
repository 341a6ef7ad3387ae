"""experiments/paper/*.toml, the papers' own settings: every cell is a valid run, every model builds at the
configured input shape, and every method of every config takes its first steps here on synthetic data of that
config's classes and groups, so a config that cannot start is caught on a CPU, not on an accelerator."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from fairprune_jax.running.compare import cell_config, load_config
from fairprune_jax.data import Dataset, Split
from fairprune_jax.models import build_model
from fairprune_jax.running.runner import prepare, run_method, validate_config

PAPER = Path(__file__).resolve().parents[1] / "experiments" / "paper"
CONFIGS = sorted(p.stem for p in PAPER.glob("*.toml"))
#: (dataset, target) -> classes; (dataset, protected) -> groups; dataset -> its native image size.
CLASSES = {("utkface", "gender"): 2, ("utkface", "race"): 5, ("fairface", "gender"): 2, ("cifar100", None): 100}
GROUPS = {("utkface", "race"): 5, ("utkface", "gender"): 2, ("fairface", "race"): 7, ("cifar100", "label"): 100}
NATIVE_SIZE = {"utkface": 200, "fairface": 224, "cifar100": 32}
#: The first steps' narrow widths; MobileNet-V2's depthwise convolutions as XLA's grouped convolution, the way
#: they run on the accelerator the paper configs are for (the CPU default, "shifted", unrolls each into nine
#: slices: a graph that takes about three times as long to compile; both ways agree, tests/test_models.py).
NARROW = {"mobilenet_v2": {"width": 0.25, "depthwise": "grouped"}, "resnet": {"width": 4}, "resnet18": {"width": 4},
          "resnet34": {"width": 4}}


#: The configs whose first steps the suite runs by default: one per paper method (ceag on the MobileNet-V2 of
#: Balancing Act's UTKFace table, ballot on ResNet-18). The other configs' cells are validated and their models
#: (CIFAR ResNet-56, ResNet-34) built at their input shapes above, and those architectures train elsewhere in the
#: suite; their ceag first steps (about 110 s of compiling on 2 cores) run with FAIRPRUNE_PAPER_ALL=1, with every
#: method of every config, as before an accelerator run.
DEFAULT_FIRST_STEPS = ("balancing_act_utkface", "ballot_cifar100")


def _first_steps_configs() -> list[str]:
    """The configs whose first steps the suite runs (:data:`DEFAULT_FIRST_STEPS`; all with
    FAIRPRUNE_PAPER_ALL=1)."""
    if os.environ.get("FAIRPRUNE_PAPER_ALL") == "1":
        return CONFIGS
    return [name for name in CONFIGS if name in DEFAULT_FIRST_STEPS]


def _shape(cc) -> tuple[tuple[int, int, int], int, int]:
    opts = cc.dataset_options
    size = int(opts.get("image_size", NATIVE_SIZE[cc.dataset]))
    classes = CLASSES[(cc.dataset, opts.get("target"))]
    groups = GROUPS[(cc.dataset, opts.get("protected"))]
    return (size, size, 3), classes, groups


def test_every_paper_config_is_covered():
    assert {"balancing_act_utkface", "balancing_act_utkface_cpu", "balancing_act_fairface",
            "balancing_act_cifar100", "ballot_cifar100"} <= set(CONFIGS)
    assert set(DEFAULT_FIRST_STEPS) <= set(CONFIGS)
    # one config per paper method takes its first steps by default
    assert {load_config(PAPER / f"{n}.toml").methods[-1] for n in DEFAULT_FIRST_STEPS} == \
        {load_config(PAPER / f"{n}.toml").methods[-1] for n in CONFIGS}


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_config_cells_are_valid_and_its_model_builds_at_its_input_shape(name):
    cc = load_config(PAPER / f"{name}.toml")
    shape, classes, _ = _shape(cc)
    for m in cc.methods:
        for s in cc.sparsities:
            validate_config(cell_config(cc, m, s, cc.seeds[0]))
    fm, params, _ = build_model(cc.run["model"], shape, classes, **cc.model_options)   # traced at that shape
    assert fm.input_shape == shape and sum(np.size(p) for p in jax.tree.leaves(params)) > 0


@pytest.mark.parametrize("name", _first_steps_configs())
def test_paper_config_methods_take_their_first_steps(name):
    """Every method of the config with its own options, model, optimizer and schedule shape, on 48 synthetic
    16 px images (the config's classes and groups; the real size is checked above), one epoch per phase, at a
    narrow width (the architecture, its depth and stem are the config's: compiling them is the test's cost).
    The suite runs the config's own method (ceag, ballot: the last in its list; every cell's options are
    validated above); FAIRPRUNE_PAPER_ALL=1 runs every method (about 8 minutes here), as before an accelerator
    run."""
    cc = load_config(PAPER / f"{name}.toml")
    _, classes, groups = _shape(cc)
    rng = np.random.default_rng(0)

    by_label = cc.dataset_options.get("protected") == "label"          # classes as groups: the group is the label

    def split(n):
        y = np.arange(n) % classes if by_label else rng.integers(0, classes, n)
        return Split(rng.normal(size=(n, 16, 16, 3)).astype(np.float32), y, y if by_label else np.arange(n) % groups)

    tr, te = split(max(48, 2 * groups)), split(max(24, groups))
    names = [f"g{i}" for i in range(groups)]
    ds = Dataset(cc.dataset, tr, te, names, ["group"], [f"c{i}" for i in range(classes)])
    prep = None
    for m in cc.methods if os.environ.get("FAIRPRUNE_PAPER_ALL") == "1" else cc.methods[-1:]:
        cfg = dataclasses.replace(cell_config(cc, m, cc.sparsities[0], 0), epochs=1, finetune_epochs=1,
                                  batch_size=16, eval_batch_size=64, progress=False, out=None,
                                  dataset_options={}, model_options={**cc.model_options, **NARROW[cc.run["model"]]})
        opts = {k: (1 if k in ("prune_epochs", "vote_epochs", "retrain_epochs", "round_epochs") else v)
                for k, v in cfg.method_options.items()}
        if m == "lth" or cfg.method == "lth":
            opts["max_rounds"] = 1
        prep = prepare(cfg, dataset=ds) if prep is None else prep      # one dense model, as in the grid
        res = run_method(prep, method=cfg.method, method_options=opts)
        assert res["sparsity"]["achieved"] > 0.5 and np.isfinite(res["pruned"]["test"]["accuracy"])
