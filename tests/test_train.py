"""Masked training and evaluation: pruned weights stay zero, padding rows do not count, NaN detection."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairprune_jax.metrics import fairness
from fairprune_jax.sparsity import masks as M
from fairprune_jax.sparsity import scores as S
from fairprune_jax.data.base import Split, train_batches
from fairprune_jax.methods.base import make_optimizer
from fairprune_jax.training.train import (NonFiniteLossError, apply_gradients, create_state, cross_entropy,
                                          evaluate, fit, make_eval_step, make_train_step, masked_forward)

N_FEAT, N_CLS = 10, 3  # the tiny MLP of conftest.TINY_MODELS


def _data(n: int, seed: int = 0, shape=(N_FEAT,)) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + shape).astype(np.float32)
    y = rng.integers(0, N_CLS, n)
    g = rng.integers(0, 3, n)
    return Split(x, y, g)


def _batch(split: Split, w=None) -> dict:
    n = len(split)
    return {"x": jnp.asarray(split.x), "y": jnp.asarray(split.y), "g": jnp.asarray(split.g),
            "w": jnp.ones(n, jnp.float32) if w is None else jnp.asarray(w, jnp.float32)}


@pytest.fixture(scope="module")
def mlp(tiny_models):
    fm, params, state = tiny_models["mlp"]
    tmpl = M.prunable_template(params)
    masks = M.masks_from_scores(S.magnitude(params, tmpl), tmpl, 0.6)
    return fm, params, state, masks


def _state(params, model_state, tx, **kw):
    """create_state on copies: train steps donate their input, and the shared fixture arrays must survive."""
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731
    if kw.get("masks") is not None:
        kw["masks"] = copy(kw["masks"])
    return create_state(copy(params), copy(model_state), tx, **kw)


def _moment_leaves(opt_state, masks):
    """``[(param_name, leaf)]`` for optimizer-state leaves that mirror a masked param."""
    masked = [n for n, _ in M.named_leaves(masks)]
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        name = M.leaf_name(path)
        for n in masked:
            if name.endswith(n) and getattr(leaf, "shape", None) is not None and leaf.ndim >= 2:
                out.append((n, leaf))
    return out


OPTIMIZERS = {
    "adam": lambda: make_optimizer("adam", 3e-2),
    "adamw": lambda: make_optimizer("adam", 3e-2, weight_decay=0.1, total_steps=40),
    "sgd_momentum_wd": lambda: make_optimizer("sgd", 0.1, weight_decay=0.05, total_steps=40),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero(mlp, opt):
    fm, params, model_state, masks = mlp
    tx = OPTIMIZERS[opt]()
    state = _state(params, model_state, tx, masks=masks)
    step = make_train_step(fm, tx)
    batch = _batch(_data(32, seed=1))
    losses = []
    for _ in range(40):
        state, stats = step(state, batch)
        losses.append(float(stats["loss"]))
    assert int(state.step) == 40 and int(state.nan_step) == -1
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(state.masks, masks)
    mask_by = dict(M.named_leaves(masks))
    p_new, p_old = dict(M.named_leaves(state.params)), dict(M.named_leaves(params))
    for n, m in mask_by.items():
        m = np.asarray(m)
        w = np.asarray(p_new[n])
        assert 0 < m.sum() < m.size
        assert np.all(w[m == 0] == 0.0), n                              # exactly zero, not merely small
        assert np.mean(w[m == 1] != np.asarray(p_old[n])[m == 1]) > 0.5   # live weights train (some ReLUs are dead)
    # unmasked leaves (biases) train too
    assert not np.array_equal(np.asarray(state.params["head"]["bias"]), np.asarray(params["head"]["bias"]))
    # no optimizer memory builds up for pruned weights (momentum / Adam moments are exactly zero there)
    moments = _moment_leaves(state.opt_state, masks)
    assert {n for n, _ in moments} == set(mask_by)
    for n, leaf in moments:
        leaf = np.asarray(leaf)
        m = np.asarray(mask_by[n])
        assert np.all(leaf[m == 0] == 0.0), n
        assert np.any(leaf[m == 1] != 0.0), n


def test_apply_gradients_zeroes_pruned_gradients(mlp):
    fm, params, model_state, masks = mlp
    tx = optax.sgd(1.0, momentum=0.9)
    state = _state(params, model_state, tx, masks=masks)
    ones = jax.tree.map(jnp.ones_like, state.params)
    new = apply_gradients(state, ones, tx)
    for (n, m), (_, w), (_, w0) in zip(M.named_leaves(masks), M.named_leaves(_restrict(new.params, masks)),
                                       M.named_leaves(_restrict(state.params, masks))):
        m, w, w0 = np.asarray(m), np.asarray(w), np.asarray(w0)
        assert np.all(w[m == 0] == 0.0)
        np.testing.assert_allclose(w[m == 1], w0[m == 1] - 1.0, rtol=1e-6)
    for n, leaf in _moment_leaves(new.opt_state, masks):
        assert np.all(np.asarray(leaf)[np.asarray(dict(M.named_leaves(masks))[n]) == 0] == 0.0)
    assert int(new.step) == 1


def _restrict(tree, masks):
    return jax.tree.map(lambda m, p: None if m is None else p, masks, tree, is_leaf=lambda x: x is None)


def test_masked_forward_gradient_is_zero_on_pruned(mlp):
    fm, params, model_state, masks = mlp
    b = _batch(_data(8))

    def loss(p):
        logits, _ = masked_forward(fm, p, masks, model_state, b["x"], train=True)
        return cross_entropy(logits, b["y"]).mean()

    g = jax.jit(jax.grad(loss))(params)
    for (n, m), (_, gl) in zip(M.named_leaves(masks), M.named_leaves(_restrict(g, masks))):
        assert np.all(np.asarray(gl)[np.asarray(m) == 0] == 0.0)
        assert np.any(np.asarray(gl)[np.asarray(m) == 1] != 0.0)


def test_padding_rows_do_not_change_the_update(mlp):
    fm, params, model_state, masks = mlp
    tx = optax.adam(1e-2)
    step = make_train_step(fm, tx)
    real = _data(8, seed=2)
    junk = _data(4, seed=3)
    junk.x *= 50.0
    padded = Split(np.concatenate([real.x, junk.x]), np.concatenate([real.y, junk.y]),
                   np.concatenate([real.g, junk.g]))
    s1, st1 = step(_state(params, model_state, tx, masks=masks), _batch(real))
    s2, st2 = step(_state(params, model_state, tx, masks=masks),
                   _batch(padded, w=[1.0] * 8 + [0.0] * 4))
    np.testing.assert_allclose(float(st1["loss"]), float(st2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(st1["accuracy"]), float(st2["accuracy"]), rtol=1e-6)
    chex.assert_trees_all_close(s1.params, s2.params, rtol=1e-5, atol=1e-7)
    # and the weights are used: putting weight on the junk rows changes the loss
    _, st3 = step(_state(params, model_state, tx, masks=masks), _batch(padded))
    assert abs(float(st3["loss"]) - float(st1["loss"])) > 1e-3


def test_evaluate_sums_to_full_split_counts(tiny_models):
    """Padded batches (37 rows in batches of 8) give the same counts as one pass over the split (CNN + BN)."""
    fm, params, model_state = tiny_models["cnn"]
    # non-trivial running statistics
    _, model_state = jax.jit(lambda p, s, x: fm.apply(p, s, x, train=True))(
        params, model_state, jnp.asarray(np.random.default_rng(0).normal(size=(6, 8, 8, 1)) + 1.0, jnp.float32))
    tx = optax.sgd(0.1)
    tmpl = M.prunable_template(params)
    masks = M.masks_from_scores(S.magnitude(params, tmpl), tmpl, 0.5)
    state = _state(params, model_state, tx, masks=masks)
    split = _data(37, seed=4, shape=(8, 8, 1))
    eval_step = make_eval_step(fm, num_groups=3, num_classes=N_CLS)
    by_group, by_class = evaluate(eval_step, state, split, batch_size=8)
    logits, _ = jax.jit(lambda p, s, x: fm.apply(p, s, x, train=False))(M.apply_masks(params, masks), model_state,
                                                                         jnp.asarray(split.x))
    logits = np.asarray(logits)
    pred = logits.argmax(-1)
    np.testing.assert_array_equal(by_group.n, np.bincount(split.g, minlength=3))
    np.testing.assert_array_equal(by_group.correct, np.bincount(split.g, weights=pred == split.y, minlength=3))
    np.testing.assert_array_equal(by_class.n, np.bincount(split.y, minlength=N_CLS))
    np.testing.assert_array_equal(by_class.correct, np.bincount(split.y, weights=pred == split.y, minlength=N_CLS))
    direct = jax.jit(lambda lg, y, g: fairness.group_counts(lg, y, g, 3, loss=cross_entropy(lg, y)))(
        jnp.asarray(logits), jnp.asarray(split.y), jnp.asarray(split.g))
    for a, b in zip(by_group, direct):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-4)
    assert by_group.n.dtype == np.float64
    # one batch bigger than the split gives the same counts
    g2, c2 = evaluate(eval_step, state, split, batch_size=512)
    for a, b in zip(by_group, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _first_nan_step(split: Split, batch_size: int, seed: int, epochs: int) -> int:
    k = 0
    for epoch in range(epochs):
        for b in train_batches(split, batch_size, seed, epoch):
            if not np.isfinite(b["x"]).all():
                return k
            k += 1
    raise AssertionError("no NaN batch")


def test_fit_raises_on_nan_input_naming_the_step(mlp):
    fm, params, model_state, masks = mlp
    split = _data(40, seed=5)
    split.x[17, 3] = np.nan
    tx = optax.adam(1e-3)
    bad = _first_nan_step(split, 8, seed=3, epochs=2)
    with pytest.raises(NonFiniteLossError, match=rf"at step {bad}\b"):
        fit(_state(params, model_state, tx), make_train_step(fm, tx), split, epochs=2, batch_size=8,
            seed=3, progress=False)


def test_fit_raises_on_divergence():
    from fairprune_jax.models import build_model
    # huge learning rate: the weights overflow and the loss becomes NaN/Inf
    fm, params, model_state = build_model("mlp", (N_FEAT,), N_CLS, hidden=(8, 6))
    tx = optax.sgd(1e30)
    with pytest.raises(NonFiniteLossError, match="NaN/Inf at step") as e:
        fit(_state(params, model_state, tx), make_train_step(fm, tx), _data(40, seed=6), epochs=3,
            batch_size=8, seed=0, progress=False, desc="dense")
    assert "dense" in str(e.value) and "--lr" in str(e.value)
    assert isinstance(e.value, FloatingPointError)


def test_nan_step_records_first_bad_step(mlp):
    fm, params, model_state, masks = mlp
    tx = optax.adam(1e-3)
    step = make_train_step(fm, tx)
    good = _batch(_data(8, seed=7))
    bad_split = _data(8, seed=7)
    bad_split.x[0, 0] = np.nan
    bad = _batch(bad_split)
    state = _state(params, model_state, tx, masks=masks)
    for i in range(7):
        state, stats = step(state, bad if i == 3 else good)
        if i < 3:
            assert int(state.nan_step) == -1
    assert int(state.nan_step) == 3          # not overwritten by the later (also non-finite) steps
    assert not np.isfinite(float(stats["loss"]))


def test_fit_history_hook_and_steps(mlp):
    fm, params, model_state, masks = mlp
    tx = optax.adam(1e-2)
    split = _data(40, seed=8)
    seen = []

    def hook(state, k):
        seen.append(k)
        return state

    state, hist = fit(_state(params, model_state, tx, masks=masks), make_train_step(fm, tx), split,
                      epochs=3, batch_size=16, seed=0, hook=hook, progress=False)
    assert seen == list(range(6))                       # 40 // 16 = 2 full batches per epoch
    assert int(state.step) == 6
    assert len(hist["loss"]) == len(hist["accuracy"]) == 3
    assert all(np.isfinite(hist["loss"])) and all(0 <= a <= 1 for a in hist["accuracy"])
    assert hist["seconds"] > 0


def test_create_state_masks_params_and_starts_clean(mlp):
    fm, params, model_state, masks = mlp
    state = _state(params, model_state, optax.adam(1e-3), masks=masks, seed=5)
    chex.assert_trees_all_equal(state.params, M.apply_masks(params, masks))
    assert int(state.step) == 0 and int(state.nan_step) == -1
    dense = _state(params, model_state, optax.adam(1e-3))
    chex.assert_trees_all_equal(dense.params, params)
    assert dense.masks is None


def test_make_step_an_objective_that_updates_its_own_fields(mlp):
    """The ``grads=None`` path of the one step builder (mask-score steps): the objective's fields and extra are
    taken as they are (params untouched: no masked optimizer update), the step and the first NaN step are
    counted, the PRNG key advances, and a ``loss`` in the objective's stats is reported instead of its value."""
    from fairprune_jax.training.train import StepOutput, make_step
    fm, params, model_state, masks = mlp

    def objective(forward, state, batch):
        logits, new_ms = forward(state.params, masks=None)          # the dense model, whatever state.masks says
        value = jnp.where(batch["x"][0, 0] > 100.0, jnp.nan, 1.0)    # NaN on the batch marked below
        return StepOutput(value, logits, new_ms, extra={"calls": state.extra["calls"] + 1},
                          stats={"loss": jnp.float32(7.0)}, fields={"masks": jax.tree.map(jnp.zeros_like, masks)})

    step = make_step(fm, None, objective)
    state = _state(params, model_state, optax.identity(), masks=masks, extra={"calls": jnp.zeros((), jnp.int32)})
    before = jax.tree.map(np.asarray, state.params)
    key0 = np.asarray(jax.random.key_data(state.rng))
    good = _batch(_data(8, seed=1))
    bad_split = _data(8, seed=1)
    bad_split.x[0, 0] = 1e3
    for i in range(3):
        state, stats = step(state, _batch(bad_split) if i == 1 else good)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.params), before)
    assert all(float(m.sum()) == 0 for m in jax.tree.leaves(state.masks))
    assert int(state.extra["calls"]) == 3 and int(state.step) == 3 and int(state.nan_step) == 1
    assert float(stats["loss"]) == 7.0 and 0.0 <= float(stats["accuracy"]) <= 1.0
    assert not np.array_equal(np.asarray(jax.random.key_data(state.rng)), key0)


def test_the_methods_carry_is_typed():
    """``TrainState.extra`` of the library's methods is a Carry: a misspelt field is an error, not a new key."""
    from fairprune_jax.training.train import Carry, carried, carry_of

    c = Carry(buffer=jnp.zeros(3))
    with pytest.raises(TypeError):
        c.replace(bufer=jnp.ones(3))
    assert carried(Carry()) is None and carried(c) is c and not c.is_empty()
    assert jax.tree.leaves(Carry()) == []                      # unused fields cost nothing under jit
    state = create_state({"w": jnp.ones(2)}, {}, optax.sgd(0.1))
    assert carry_of(state).is_empty()
    with pytest.raises(TypeError, match="not the library's Carry"):
        carry_of(state.replace(extra={"buffer": 1}))


def test_the_evaluator_resets_updates_and_computes_like_one_pass(tiny_models):
    """The one evaluator (reset / update / compute): its totals over a split's batches equal
    ``sum_over_split``'s; ``reset`` starts a new total; an accumulating step (``init``) gives the same sums as
    an adding one."""
    from fairprune_jax.data.base import eval_batches
    from fairprune_jax.training.evaluation import Evaluator, sum_over_split
    fm, params, model_state = tiny_models["mlp"]
    split = _data(29, seed=7)
    eval_step = make_eval_step(fm, num_groups=3, num_classes=N_CLS)
    args = (params, None, model_state)
    ev = Evaluator(eval_step, args)
    for batch in eval_batches(split, 8):
        ev.update(batch)
    first = ev.compute()
    np.testing.assert_array_equal(first[0].n, np.bincount(split.g, minlength=3))
    ev.reset()
    assert ev.compute(host=False) is None
    for batch in eval_batches(split, 8):
        ev.update(batch)
    again = ev.compute()
    whole = sum_over_split(eval_step, args, split, batch_size=8)
    for a, b, c in zip(jax.tree.leaves(first), jax.tree.leaves(again), jax.tree.leaves(whole)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    acc_step = jax.jit(lambda tot, p, m, s, batch: jax.tree.map(jnp.add, tot, eval_step(p, m, s, batch)))
    zeros = jax.tree.map(jnp.zeros_like, eval_step(*args, next(iter(eval_batches(split, 8)))))
    accumulated = sum_over_split(acc_step, args, split, batch_size=8, init=zeros)
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
