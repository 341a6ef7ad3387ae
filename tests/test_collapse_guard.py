"""The bifp family's constant-classifier guard (techniques/collapse_guard.py): it keeps the last epoch's model
that is not degenerate on training rows and returns it when the phase ends at a constant classifier, with a
warning; it leaves a phase that does not collapse untouched and does nothing for a start that is already
degenerate."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairprune_jax.core.notices import FairpruneWarning
from fairprune_jax.data import Split
from fairprune_jax.models import build_model
from fairprune_jax.techniques.collapse_guard import CollapseGuard
from fairprune_jax.training.train import create_state


def _setup():
    fm, params, ms = build_model("mlp", (10,), 3, seed=0, hidden=(8, 6))
    rng = np.random.default_rng(0)
    train = Split(rng.normal(size=(600, 10)) * 3.0, rng.integers(0, 3, 600), rng.integers(0, 2, 600))
    state = create_state(params, ms, optax.sgd(0.1))
    return fm, train, state


def _with_head_bias(state, bias):
    params = jax.tree.map(lambda x: x, state.params)
    params["head"]["bias"] = jnp.asarray(bias, jnp.float32)
    return state.replace(params=params)


def test_guard_returns_the_last_epoch_that_was_not_a_constant_classifier():
    fm, train, state = _setup()
    guard = CollapseGuard(fm, train, state, steps_per_epoch=5, what="the test phase")
    assert guard.active and guard.start_share < 0.98
    hook = guard.hook()
    epoch1 = _with_head_bias(state, [0.1, 0.0, -0.1])
    assert hook(epoch1, 5) is epoch1 and guard.kept_epoch == 1            # epoch 1 ends: kept
    assert hook(epoch1, 7) is epoch1 and guard.kept_epoch == 1            # not an epoch's end: nothing
    collapsed = _with_head_bias(state, [100.0, 0.0, 0.0])                 # class 0 for every row
    assert guard.top_share(collapsed) == 1.0
    hook(collapsed, 10)                                                    # epoch 2 collapsed: not kept
    assert guard.kept_epoch == 1
    with pytest.warns(FairpruneWarning, match="epoch 1, the last that were not"):
        back, info = guard.finish(collapsed)
    assert info == {"final_top_share": 1.0, "start_top_share": round(guard.start_share, 4), "restored_epoch": 1}
    np.testing.assert_array_equal(np.asarray(back.params["head"]["bias"]), np.float32([0.1, 0.0, -0.1]))
    assert int(back.step) == int(collapsed.step)                           # the rest of the state is the phase's


def test_guard_leaves_a_phase_that_did_not_collapse_and_a_degenerate_start_alone():
    fm, train, state = _setup()
    guard = CollapseGuard(fm, train, state, steps_per_epoch=5)
    same, info = guard.finish(state)
    assert same is state and info is None
    start = _with_head_bias(state, [0.0, 100.0, 0.0])                      # degenerate before the phase
    guard = CollapseGuard(fm, train, start, steps_per_epoch=5)
    assert not guard.active
    guard.hook()(start, 5)
    assert guard.kept is None and guard.finish(start) == (start, None)


def test_no_earlier_epoch_to_return_says_so():
    fm, train, state = _setup()
    guard = CollapseGuard(fm, train, state, steps_per_epoch=5, what="the test phase")
    collapsed = _with_head_bias(state, [0.0, 0.0, 100.0])
    guard.hook()(collapsed, 5)
    with pytest.warns(FairpruneWarning, match="no epoch before it"):
        back, info = guard.finish(collapsed)
    assert back is collapsed and info["restored_epoch"] is None


def test_with_a_gap_the_guard_keeps_the_least_violating_epoch_that_was_not_constant():
    """With the phase's parity gap, the kept model is the non-degenerate epoch with the smallest gap on the
    guard's training rows (the later one on ties), not merely the last before the collapse."""
    fm, train, state = _setup()
    gaps = {0.5: 0.30, 0.2: 0.05, 0.3: 0.05, 0.1: 0.20}          # head bias of class 0 -> the gap it is given

    def gap(logits, rows):
        assert len(rows) == len(train) and logits.shape == (len(train), 3)
        return gaps[current[0]]

    guard = CollapseGuard(fm, train, state, steps_per_epoch=5, gap=gap)
    hook = guard.hook()
    current = [None]
    for epoch, b in enumerate([0.5, 0.2, 0.3, 0.1], start=1):
        current[0] = b
        hook(_with_head_bias(state, [b, 0.0, 0.0]), 5 * epoch)
    assert guard.kept_epoch == 3 and guard.kept_gap == 0.05          # epochs 2 and 3 tie: the later
    with pytest.warns(FairpruneWarning, match="smallest parity gap"):
        back, info = guard.finish(_with_head_bias(state, [100.0, 0.0, 0.0]))
    assert info["restored_epoch"] == 3 and info["restored_gap"] == 0.05
    np.testing.assert_array_equal(np.asarray(back.params["head"]["bias"]), np.float32([0.3, 0.0, 0.0]))


def _run_epochs(guard, state, biases, current):
    hook = guard.hook()
    for epoch, b in enumerate(biases, start=1):
        current[0] = b
        hook(_with_head_bias(state, [b, 0.0, 0.0]), 5 * epoch)


def test_an_unmet_constraint_returns_the_most_accurate_epoch_within_the_bound():
    """guard_unmet: a phase that ends with its gap above unmet_above (not degenerate) returns, of its epochs
    whose gap was within it, the most accurate on the guard's rows; with none within it, the smallest-gap one
    when that is below the end's; a phase that ends within the bound, or a guard without the bound, is left
    alone."""
    fm, train, state = _setup()
    gaps = {0.5: 0.30, 0.2: 0.08, 0.3: 0.09, 0.1: 0.40, 0.05: 0.07}
    current = [None]
    gap = lambda logits, rows: gaps[current[0]]                       # noqa: E731
    guard = CollapseGuard(fm, train, state, steps_per_epoch=5, gap=gap, unmet_above=0.1, what="the test phase")
    _run_epochs(guard, state, [0.5, 0.2, 0.3], current)
    acc = {b: float(np.mean(np.argmax(guard._logits(_with_head_bias(state, [b, 0.0, 0.0])), -1) == guard.rows.y))
           for b in (0.2, 0.3)}
    best = 3 if acc[0.3] >= acc[0.2] else 2
    current[0] = 0.1
    with pytest.warns(FairpruneWarning, match="above twice its bound .*most accurate epoch"):
        back, info = guard.finish(_with_head_bias(state, [0.1, 0.0, 0.0]))
    assert info["reason"] == "unmet" and info["final_gap"] == 0.4 and info["restored_epoch"] == best
    assert info["restored_accuracy"] == round(max(acc.values()), 4)
    np.testing.assert_array_equal(np.asarray(back.params["head"]["bias"]),
                                  np.float32([0.3 if best == 3 else 0.2, 0.0, 0.0]))
    # no epoch within the bound: the smallest gap, if below the end's
    guard = CollapseGuard(fm, train, state, steps_per_epoch=5, gap=gap, unmet_above=0.05)
    _run_epochs(guard, state, [0.5, 0.3], current)
    current[0] = 0.1
    with pytest.warns(FairpruneWarning, match="no epoch was within it; the one with the smallest gap"):
        back, info = guard.finish(_with_head_bias(state, [0.1, 0.0, 0.0]))
    assert info["restored_epoch"] == 2 and info["restored_gap"] == 0.09 and "restored_accuracy" not in info
    # the end within the bound, or no bound: the final model
    for bound, end in ((0.1, 0.05), (None, 0.1)):
        guard = CollapseGuard(fm, train, state, steps_per_epoch=5, gap=gap, unmet_above=bound)
        _run_epochs(guard, state, [0.2], current)
        current[0] = end
        final = _with_head_bias(state, [end, 0.0, 0.0])
        assert guard.finish(final) == (final, None)
