"""Seeds trained together with jax.vmap (seeds.py, runner.prepare_seeds) match the sequential runs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairprune_jax.running import preparation, runner
from fairprune_jax.training import seeds as seeds_lib
from fairprune_jax.data import load_dataset
from fairprune_jax.data.base import Split, train_batches
from fairprune_jax.methods.base import RunConfig, make_optimizer
from fairprune_jax.training.train import NonFiniteLossError, create_state, make_train_step


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0)), a, b)
    return max(jax.tree.leaves(diffs), default=0.0)


def _assert_same_dense(par: runner.Prepared, seq: runner.Prepared, tol: float = 1e-4) -> None:
    assert par.config.seed == seq.config.seed
    assert _max_diff(par.dense.params, seq.dense.params) <= tol
    assert _max_diff(par.dense.model_state, seq.dense.model_state) <= tol
    assert int(par.dense.step) == int(seq.dense.step)
    np.testing.assert_allclose(par.dense_history["loss"], seq.dense_history["loss"], rtol=1e-5)
    np.testing.assert_allclose(par.dense_history["accuracy"], seq.dense_history["accuracy"], rtol=1e-5)
    for split in seq.dense_evals:
        for got, want in zip(par.dense_evals[split][:2], seq.dense_evals[split][:2]):
            np.testing.assert_array_equal(got.n, want.n)
            # predictions identical up to at most one borderline row per split
            assert np.abs(got.correct - want.correct).sum() <= 1
            np.testing.assert_allclose(got.loss_sum, want.loss_sum, rtol=1e-4)


def test_stacked_batches_are_each_seeds_own_batches():
    rng = np.random.default_rng(0)
    split = Split(rng.normal(size=(50, 3)).astype(np.float32), rng.integers(0, 2, 50), rng.integers(0, 3, 50))
    seeds = [4, 0, 9]
    for epoch in (0, 3):
        stacked = list(seeds_lib.stacked_batches(split, 16, seeds, epoch))
        singles = [list(train_batches(split, 16, s, epoch)) for s in seeds]
        assert len(stacked) == len(singles[0]) == 3
        for step, batch in enumerate(stacked):
            assert batch["x"].shape == (3, 16, 3)
            for i in range(len(seeds)):
                for k in ("x", "y", "g", "w"):
                    np.testing.assert_array_equal(batch[k][i], singles[i][step][k])


def test_parallel_dense_matches_sequential_mlp():
    ds = load_dataset("digits")
    cfgs = [RunConfig(method="magnitude", dataset="digits", seed=s, epochs=2, progress=False, model_options={"hidden": [32]})
            for s in (0, 3)]
    par = runner.prepare_seeds(cfgs, ds)
    seq = [runner.prepare(c, ds) for c in cfgs]
    assert [p.config.seed for p in par] == [0, 3]
    for p, q in zip(par, seq):
        _assert_same_dense(p, q)
        assert p.dense_history["parallel_seeds"]["seeds"] == [0, 3]
        assert "dense_train_s" in p.timings and "dense_eval_s" in p.timings
    # seeds really differ (own init and batch order), so the comparison above is not vacuous
    assert _max_diff(par[0].dense.params, par[1].dense.params) > 1e-2


@pytest.mark.default_numerics      # BatchNorm + SGD amplify rounding: 3e-3 apart without XLA's LLVM passes
def test_parallel_dense_matches_sequential_with_batchnorm_and_augmentation():
    ds = load_dataset("digits", image=True)
    cfgs = [RunConfig(method="magnitude", dataset="digits", seed=s, epochs=1, batch_size=128, augment=True, progress=False,
                      model="cnn", model_options={"channels": [4, 8], "hidden": 8}) for s in (0, 1)]
    par = runner.prepare_seeds(cfgs, ds)
    seq = [runner.prepare(c, ds) for c in cfgs]
    for p, q in zip(par, seq):
        assert jax.tree.leaves(q.dense.model_state)          # BatchNorm statistics are trained per seed
        _assert_same_dense(p, q)


def test_prepare_uses_a_given_dense_state_and_rejects_a_foreign_one(monkeypatch):
    ds = load_dataset("digits")
    cfg = RunConfig(method="magnitude", dataset="digits", seed=0, epochs=1, progress=False, model_options={"hidden": [16]})
    ref = runner.prepare(cfg, ds)

    def boom(*a, **k):
        raise AssertionError("prepare(dense=...) trained again")
    monkeypatch.setattr(preparation, "train_dense", boom)
    given = runner.prepare(cfg, ds, dense=(ref.dense, ref.dense_history))
    assert given.dense is ref.dense and given.dense_history is ref.dense_history
    for split in ref.dense_evals:
        np.testing.assert_array_equal(given.dense_evals[split][0].correct, ref.dense_evals[split][0].correct)
    other = RunConfig(method="magnitude", dataset="digits", seed=0, epochs=1, progress=False, model_options={"hidden": [8]})
    with pytest.raises(ValueError, match="does not fit"):
        runner.prepare(other, ds, dense=(ref.dense, ref.dense_history))
    with pytest.raises(ValueError, match="differ only in the seed"):
        runner.prepare_seeds([cfg, RunConfig(**{**cfg.__dict__, "seed": 1, "lr": 0.1})], ds)
    with pytest.raises(ValueError, match="distinct seeds"):
        runner.prepare_seeds([cfg, cfg], ds)


def test_fit_seeds_names_the_seed_whose_loss_diverged(tiny_models):
    fm, params, model_state = tiny_models["mlp"]
    tx = make_optimizer("adam", 1e-2)
    x = np.ones((32, 10), np.float32)
    x[5, 0] = np.nan
    split = Split(x, np.zeros(32, np.int64), np.zeros(32, np.int64))
    states = [create_state(params, model_state, tx, seed=s) for s in (7, 8)]
    with pytest.raises(NonFiniteLossError, match=r"seed 7\).*step 0"):
        seeds_lib.fit_seeds(states, make_train_step(fm, tx), split, epochs=1, batch_size=32, seeds=[7, 8],
                            progress=False)


def test_vmap_step_donates_and_is_cached(tiny_models):
    fm, params, model_state = tiny_models["mlp"]
    tx = make_optimizer("adam", 1e-2)
    step = make_train_step(fm, tx)
    assert seeds_lib.vmap_step(step) is seeds_lib.vmap_step(step)
    stacked = seeds_lib.stack_states([create_state(params, model_state, tx, seed=s) for s in (0, 1)])
    batch = {"x": jnp.ones((2, 4, 10)), "y": jnp.zeros((2, 4), jnp.int32), "g": jnp.zeros((2, 4), jnp.int32),
             "w": jnp.ones((2, 4))}
    new, _ = seeds_lib.vmap_step(step)(stacked, batch)
    assert stacked.params["head"]["kernel"].is_deleted()     # the stacked input state was donated
    assert new.step.tolist() == [1, 1]
