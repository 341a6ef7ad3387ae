"""The module paths of the flat layout keep working after the move into sub-packages (issue 27).

``fairprune_jax.MOVED`` maps each old ``fairprune_jax.<name>`` to the module that holds it now; importing the
old path in any spelling gives that very module object. ``flat_layout_names.json`` lists every top-level name
each old module defined before the move (taken from the flat layout's source, private names included): all of
them must still be there under the old path, split modules included (their parts are re-exported).
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import fairprune_jax

ROOT = Path(__file__).resolve().parents[1]
FLAT_NAMES = json.loads((Path(__file__).with_name("flat_layout_names.json")).read_text())


@pytest.mark.parametrize("old", sorted(fairprune_jax.MOVED))
def test_an_old_module_path_is_the_new_module(old):
    new = importlib.import_module(f"fairprune_jax.{fairprune_jax.MOVED[old]}")
    assert importlib.import_module(f"fairprune_jax.{old}") is new
    assert sys.modules[f"fairprune_jax.{old}"] is new
    ns: dict = {}
    exec(f"import fairprune_jax.{old} as a\nfrom fairprune_jax import {old} as b", ns)
    assert ns["a"] is new and ns["b"] is new and getattr(fairprune_jax, old) is new
    # the module keeps its own identity: name, spec and file are the new path's
    assert new.__name__ == new.__spec__.name == f"fairprune_jax.{fairprune_jax.MOVED[old]}"
    assert Path(new.__file__).parent.name == fairprune_jax.MOVED[old].split(".")[0]


def test_every_name_of_the_flat_layout_is_still_there():
    missing = [f"fairprune_jax.{mod}.{name}" for mod, names in FLAT_NAMES.items()
               for name in names if not hasattr(importlib.import_module(f"fairprune_jax.{mod}"), name)]
    assert missing == []
    assert set(fairprune_jax.MOVED) <= set(FLAT_NAMES)


def test_split_modules_hand_out_the_objects_of_their_parts():
    from fairprune_jax.constraints import buffers, dual_ascent, lagrangian
    from fairprune_jax.data import table_reading
    from fairprune_jax.metrics import counts
    from fairprune_jax.running import cli_args, grid, preparation, validation
    from fairprune_jax.sparsity import units
    from fairprune_jax.techniques import fairness_objective, voting
    from fairprune_jax.training import evaluation, state
    import fairprune_jax.bilevel
    import fairprune_jax.cli
    import fairprune_jax.compact
    import fairprune_jax.compare
    import fairprune_jax.constrained
    import fairprune_jax.data.tabular
    import fairprune_jax.methods.ballot
    import fairprune_jax.runner
    import fairprune_jax.train
    from fairprune_jax.fairness import GroupCounts

    pairs = [(fairprune_jax.runner.prepare, preparation.prepare),
             (fairprune_jax.runner.validate_config, validation.validate_config),
             (fairprune_jax.compare.load_config, grid.load_config),
             (fairprune_jax.cli.build_parser, cli_args.build_parser),
             (fairprune_jax.train.TrainState, state.TrainState), (fairprune_jax.train.evaluate, evaluation.evaluate),
             (fairprune_jax.constrained.lagrangian, lagrangian.lagrangian),
             (fairprune_jax.constrained.nupi, dual_ascent.nupi),
             (fairprune_jax.constrained.buffer_update, buffers.buffer_update),
             (GroupCounts, counts.GroupCounts),
             (fairprune_jax.compact.UnitGroup, units.UnitGroup),
             (fairprune_jax.bilevel.Fairness, fairness_objective.Fairness),
             (fairprune_jax.methods.ballot.make_vote_step, voting.make_vote_step),
             (fairprune_jax.data.tabular.read_table, table_reading.read_table)]
    assert all(a is b for a, b in pairs)


def test_python_m_runs_an_old_path_as_the_new_module():
    """``python -m fairprune_jax.cli`` (scripts and notes from before) is ``python -m fairprune_jax.running.cli``."""
    runs = [subprocess.run([sys.executable, "-m", m, "methods", "lth"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120) for m in ("fairprune_jax.cli", "fairprune_jax.running.cli")]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("lth:")


def test_an_old_path_stays_as_light_as_the_new_one():
    """Resolving an old name imports only the new module (the command line's modules import no JAX)."""
    code = "import sys, fairprune_jax.cli, fairprune_jax.config; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_warnings_still_point_at_the_callers_line():
    """``notices.warn`` skips the library's frames (now two folders deep) up to the user's line."""
    import numpy as np

    from fairprune_jax.data import tabular
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tabular.warn_case_variants("city", np.array(["Paris", "paris"]))
    assert caught and all(w.filename == __file__ for w in caught), [(w.filename, str(w.message)) for w in caught]
