"""Lottery-ticket family: lth, ballot, fair_scratch, and the fairness surrogates they share."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairprune_jax.metrics import fairness
from fairprune_jax.running import runner
from fairprune_jax.sparsity import scores
from fairprune_jax.constraints import surrogates
from fairprune_jax.running.cli import main as cli_main
from fairprune_jax.data import load_dataset
from fairprune_jax.sparsity.masks import keep_counts, named_leaves, prunable_template
from fairprune_jax.methods import METHODS, RunConfig
from fairprune_jax.methods import ballot as B
from fairprune_jax.methods import fair_scratch as FS
from fairprune_jax.methods import lth as L

HIDDEN = (32,)  # MLP 64 -> 32 -> 10: layer sizes 2048 and 320, so 50% sparsity is exact per layer


def tree_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def with_options(ctx, **opts):
    """A context and a method's raw options, for :func:`run_direct` (a method never reads raw options itself)."""
    return ctx, opts


def run_direct(name, ctx, dense):
    """A registered method's run with its raw options (``with_options``) parsed and checked, as the runner does."""
    method = METHODS[name]
    ctx, opts = ctx if isinstance(ctx, tuple) else (ctx, {})
    return method.run(ctx, dense, method.parse(opts))


# ---------------------------------------------------------------------------
# Fixtures: one tiny dense run on digits shared by the direct method tests
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def setup(digits):
    cfg = RunConfig(method="lth", dataset="digits", epochs=1, finetune_epochs=1, sparsity=0.5, batch_size=64,
                    model_options={"hidden": HIDDEN}, progress=False)
    ctx, params, model_state = runner.build_context(cfg, digits)
    init_params = L.copy_tree(params)            # train steps donate their input buffers
    dense, _ = runner.train_dense(ctx, params, model_state)
    return ctx, init_params, dense


# ---------------------------------------------------------------------------
# Surrogates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", surrogates.NAMES)
def test_surrogate_zero_when_groups_identical_and_padding_ignored(name):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 3)).astype(np.float32) * 2
    y = rng.integers(0, 3, 12)
    y[:2] = [1, 0]  # both label sides present (for eo)
    groups = 4
    L4 = np.tile(logits, (groups, 1))
    y4 = np.tile(y, groups)
    g4 = np.repeat(np.arange(groups), 12)
    w4 = np.ones(len(y4), np.float32)
    fn = surrogates.surrogate(name)
    assert abs(float(fn(L4, y4, g4, w4, groups, 1))) < 1e-6
    # A different group 0 makes it positive; padding rows (w = 0, NaN logits) change nothing.
    L_diff = L4.copy()
    L_diff[:12, 1] += 3.0
    base = float(fn(L_diff, y4, g4, w4, groups, 1))
    assert base > 1e-3
    pad_l = np.concatenate([L_diff, np.full((5, 3), np.nan, np.float32)])
    pad = float(fn(pad_l, np.concatenate([y4, np.ones(5, int)]), np.concatenate([g4, np.full(5, 3)]),
                   np.concatenate([w4, np.zeros(5, np.float32)]), groups, 1))
    assert pad == pytest.approx(base, abs=1e-6)


def test_surrogates_with_saturated_logits_equal_fairlearn_metrics():
    """With near-hard predictions the prob surrogates are the exact DP / EO differences."""
    rng = np.random.default_rng(1)
    n, groups = 200, 3
    logits = rng.normal(size=(n, 2)).astype(np.float32) * 1e4
    y = rng.integers(0, 2, n)
    g = rng.integers(0, groups, n)
    w = np.ones(n, np.float32)
    counts = fairness.group_counts(logits, y, g, groups)
    dp = float(surrogates.surrogate("dp")(logits, y, g, w, groups, 1))
    eo = float(surrogates.surrogate("eo")(logits, y, g, w, groups, 1))
    assert dp == pytest.approx(fairness.demographic_parity_difference(counts), abs=1e-4)
    assert eo == pytest.approx(fairness.equalized_odds_difference(counts), abs=1e-4)
    assert dp > 0.05 and eo > 0.05


@pytest.mark.parametrize("name", ["dp", "dp_logistic", "dp_hinge", "dp_clipped"])
def test_lowering_dp_surrogate_lowers_true_demographic_parity(name):
    rng = np.random.default_rng(0)
    n, groups = 600, 3
    g = rng.integers(0, groups, n)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    x[:, 0] += 1.5 * (g - 1)  # groups differ in the feature the model uses
    x, g = jnp.asarray(x), jnp.asarray(g)
    y = jnp.zeros(n, jnp.int32)
    w = jnp.ones(n, jnp.float32)
    fn = surrogates.surrogate(name)

    def logits(p):  # toy logistic model: class 1 logit = x @ w + b, class 0 logit = 0
        return jnp.stack([jnp.zeros(n), x @ p["w"] + p["b"]], axis=1)

    def true_dp(p):
        return fairness.demographic_parity_difference(fairness.group_counts(logits(p), y, g, groups))

    p = {"w": jnp.array([2.0, 0.5]), "b": jnp.array(0.0)}
    loss = jax.jit(lambda p: fn(logits(p), y, g, w, groups, 1))
    grad = jax.jit(jax.grad(lambda p: fn(logits(p), y, g, w, groups, 1)))
    s0, d0 = float(loss(p)), true_dp(p)
    for _ in range(30):
        p = jax.tree.map(lambda a, b: a - 1.0 * b, p, grad(p))
    s1, d1 = float(loss(p)), true_dp(p)
    assert s1 < 0.5 * s0
    assert d0 > 0.5 and d1 < 0.5 * d0


def test_surrogate_rejects_unknown_name():
    with pytest.raises(ValueError, match="valid choices"):
        surrogates.surrogate("dp_cubic")


# ---------------------------------------------------------------------------
# Ballot scoring and votes
# ---------------------------------------------------------------------------


def _toy_template():
    params = {"fc": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
    return params, prunable_template(params)


def test_ballot_conflicting_gradients_cancel_and_are_pruned():
    params, template = _toy_template()
    # column 0 (output unit 0): acc (3, 4)/5 = (.6, .8), fair (-6, 8)/10 = (-.6, .8): weight [0, 0] conflicts
    # column 1: both -(1, 1)/sqrt2: aligned (negative, so a signed score would wrongly prune them)
    g_acc = {"fc": {"kernel": jnp.array([[3.0, -1.0], [4.0, -1.0]]), "bias": jnp.zeros(2)}}
    g_fair = {"fc": {"kernel": jnp.array([[-6.0, -1.0], [8.0, -1.0]]), "bias": jnp.zeros(2)}}
    s = B.conflict_scores(g_acc, g_fair, template, eta=1.0)
    assert s["fc"]["bias"] is None
    k = np.asarray(s["fc"]["kernel"])
    assert k[0, 0] == 0.0  # exact cancellation
    np.testing.assert_allclose(k, [[0.0, np.sqrt(2)], [1.6, np.sqrt(2)]], rtol=1e-6)
    votes = B.epoch_votes(s, template, 0.25)  # keep 3 of 4
    np.testing.assert_array_equal(np.asarray(votes["fc"]["kernel"]), [[0, 1], [1, 1]])
    # normalisation is per kernel column: rescaling one output unit's gradients changes nothing
    g_acc_scaled = {"fc": {"kernel": g_acc["fc"]["kernel"] * jnp.array([10.0, 0.1]), "bias": jnp.zeros(2)}}
    s2 = B.conflict_scores(g_acc_scaled, g_fair, template, eta=1.0)
    np.testing.assert_allclose(np.asarray(s2["fc"]["kernel"]), k, rtol=1e-6, atol=1e-7)
    # eta weighs the fairness gradient: with eta = 2 the weight no longer cancels
    assert float(B.conflict_scores(g_acc, g_fair, template, eta=2.0)["fc"]["kernel"][0, 0]) > 0.5


def test_ballot_final_mask_keeps_most_voted_with_deterministic_ties():
    params, template = _toy_template()
    votes = {"fc": {"kernel": jnp.array([[3.0, 1.0], [2.0, 2.0]]), "bias": None}}
    ssum = {"fc": {"kernel": jnp.array([[0.1, 9.0], [0.5, 0.7]]), "bias": None}}
    m = B.final_mask(votes, ssum, template, 0.5)  # keep 2: the 3-vote weight, then the 2-vote tie by score
    np.testing.assert_array_equal(np.asarray(m["fc"]["kernel"]), [[1, 0], [0, 1]])
    # the summed score never outranks a whole vote
    ssum2 = {"fc": {"kernel": jnp.array([[0.0, 1e6], [0.0, 0.0]]), "bias": None}}
    m2 = B.final_mask(votes, ssum2, template, 0.5)
    np.testing.assert_array_equal(np.asarray(m2["fc"]["kernel"]), [[1, 0], [1, 0]])  # exact tie -> lower index


def test_ballot_fairness_weights_are_inverse_accuracy():
    w = B.fairness_weights(jnp.array([0.5, 0.25, 0.0, 1.0]), 0.01)
    np.testing.assert_allclose(np.asarray(w), [2.0, 4.0, 100.0, 1.0], rtol=1e-6)


# ---------------------------------------------------------------------------
# Rewinding
# ---------------------------------------------------------------------------


def test_rewind_checkpoints_are_the_dense_runs_weights(setup):
    ctx, init_params, dense = setup
    ck0 = L.rewind_checkpoint(ctx, 0)
    assert tree_equal(ck0.params, init_params)
    spe = ctx.steps_per_epoch
    ck = L.rewind_checkpoint(ctx, spe)  # the dense run is exactly one epoch long
    assert tree_equal(ck.params, dense.params)
    with pytest.raises(ValueError, match="rewind_step"):
        L.rewind_checkpoint(ctx, spe + 1)
    # rewinding: survivors = checkpoint exactly, pruned = 0, non-prunable leaves = checkpoint
    masks = ctx.masks_from_scores(scores.magnitude(dense.params, ctx.template), 0.5)
    st = L.rewind(ctx, ck, masks, optax.sgd(0.1))
    _check_survivors(st, ck.params)
    assert tree_equal(st.model_state, ck.model_state)


def _check_survivors(state, ckpt_params):
    flat_c = dict(named_leaves(ckpt_params))
    flat_m = dict(named_leaves(state.masks))
    assert flat_m
    for n, p in named_leaves(state.params):
        p, c = np.asarray(p), np.asarray(flat_c[n])
        if n in flat_m:
            m = np.broadcast_to(np.asarray(flat_m[n]), p.shape).astype(bool)
            np.testing.assert_array_equal(p[m], c[m])
            assert np.all(p[~m] == 0)
        else:
            np.testing.assert_array_equal(p, c)


def test_lth_and_ballot_rewind_survivors_to_checkpoint(setup):
    ctx, init_params, dense = setup
    spe = ctx.steps_per_epoch
    # lth, rewind to init, no retraining: the ticket is the init under the mask
    st, info = run_direct("lth", with_options(ctx, round_epochs=0, fraction=0.5, last_round="round"), dense)
    assert len(info["rounds"]) == 1
    _check_survivors(st, init_params)
    # ballot voting on every layer, late rewinding to step k (captured during the voting replay of the
    # dense run), no retraining
    k = spe // 2
    st, info = run_direct("ballot", with_options(ctx, scope="all", rewind_step=k, retrain_epochs=0), dense)
    _check_survivors(st, L.rewind_checkpoint(ctx, k).params)
    assert info["replay_max_abs_diff_to_dense"] == 0.0  # the voting run replays the dense run
    assert info["votes"]["epochs"] == 1
    kept = {n: int(np.asarray(m).sum()) for n, m in named_leaves(st.masks)}
    assert kept == keep_counts(dense.params, ctx.template, 0.5)
    # final_layer_only: only the head is pruned, at the target sparsity; the hidden layer stays dense
    st, info = run_direct("ballot", with_options(ctx, final_layer_only=True, retrain_epochs=0), dense)
    masked = dict(named_leaves(st.masks))
    assert int(np.asarray(masked["head/kernel"]).sum()) == 160
    assert np.all(np.asarray(masked["layers/0/kernel"]) == 1)


# ---------------------------------------------------------------------------
# LTH schedule
# ---------------------------------------------------------------------------


def test_lth_round_schedule_and_cap():
    sched, f = L.round_schedule(0.5, 0.2, 5)
    np.testing.assert_allclose(sched, [0.2, 0.36, 0.488, 0.5])
    assert f == 0.2
    sched, f = L.round_schedule(0.9, 0.2, 5)  # 11 rounds needed: capped, fraction raised
    assert len(sched) == 5 and sched[-1] == 0.9
    np.testing.assert_allclose(sched[:-1], [1 - (1 - f) ** r for r in range(1, 5)])
    assert f == pytest.approx(1 - 0.1 ** 0.2)
    assert len(L.round_schedule(0.9, 0.2, 0)[0]) == 11


# ---------------------------------------------------------------------------
# Fair Scratch Tickets
# ---------------------------------------------------------------------------


def test_fair_scratch_frozen_weights_exact_sparsity_and_regulariser(setup):
    ctx, init_params, dense = setup
    base = dict(epochs=2, surrogate="dp", score_lr=0.05)
    dens = FS.layer_densities(init_params, ctx.template, 0.5, "uniform")
    frozen = FS.frozen_weights(init_params, ctx.template, "signed_constant", dens)
    results = {}
    for lam in (0.0, 3.0):
        st, hist, fn = FS.train_scores(ctx, FS.FairScratchOptions(**base, lam=lam, out_bias="frozen"))
        assert tree_equal(st.params, frozen)  # the weights never move
        s0 = FS.init_scores(jax.random.key(ctx.seed + 11), frozen, ctx.template)
        assert not tree_equal(st.extra.trained.scores, s0)  # the scores do
        kept = {n: int(np.asarray(m).sum()) for n, m in named_leaves(st.masks)}
        assert kept == keep_counts(init_params, ctx.template, 0.5)
        results[lam] = FS.split_surrogate(ctx, st, fn, ctx.dataset.train)
        last = (st, fn, lam)
    assert results[3.0] < 0.5 * results[0.0]
    # the method returns the frozen weights times the final mask
    st, fn, lam = last
    pruned, info = FS.finalize(ctx, st, fn, FS.FairScratchOptions(**base, lam=lam, out_bias="frozen"))
    masks = dict(named_leaves(pruned.masks))
    for (n, p), (_, w) in zip(named_leaves(pruned.params), named_leaves(frozen)):
        m = np.asarray(masks[n]) if n in masks else 1.0
        np.testing.assert_array_equal(np.asarray(p), np.asarray(w) * m)
    assert info["sparsity"] == 0.5 and info["train_surrogate"] == pytest.approx(results[3.0])


def test_fair_scratch_out_bias_trains_only_the_output_bias_and_frees_a_stuck_threshold(setup, monkeypatch):
    """With frozen weights the output offset is set by which weights the top-k keeps; a ticket whose logits are
    shifted to one class stays the constant classifier unless the output bias is trained with the scores."""
    ctx, init_params, _ = setup
    assert FS.output_bias_name(init_params, ctx.layer_order) == "head/bias"
    real = FS.initial_weights
    shift = np.zeros(ctx.dataset.num_classes, np.float32)
    shift[3] = 15.0                                 # most rows start predicted as class 3

    def shifted(c):
        params, ms = real(c)
        return FS.with_leaf(params, "head/bias", jnp.asarray(shift)), ms

    monkeypatch.setattr(FS, "initial_weights", shifted)
    base = dict(epochs=2, lam=0.0, score_lr=0.05)
    out = {}
    for mode in FS.OUT_BIASES:
        st, hist, fn = FS.train_scores(ctx, FS.FairScratchOptions(**base, out_bias=mode))
        start = dict(named_leaves(FS.frozen_weights(
            shifted(ctx)[0], ctx.template, "signed_constant",
            FS.layer_densities(init_params, ctx.template, 0.5, "uniform"))))
        moved = [n for n, p in named_leaves(st.params) if not np.array_equal(np.asarray(p), np.asarray(start[n]))]
        pruned, info = FS.finalize(ctx, st, fn, FS.FairScratchOptions(**base, out_bias=mode))
        out[mode] = (moved, info)
    assert out["frozen"][0] == [] and out["frozen"][1]["out_bias_trained"] is None
    assert out["train"][0] == ["head/bias"]                     # only the output bias moves
    assert out["train"][1]["out_bias_trained"]["leaf"] == "head/bias"
    assert out["train"][1]["out_bias_trained"]["value"][3] < 15.0 - 0.3   # the offset is walked back
    # same scores' start, batches and steps: the frozen offset keeps more rows on class 3 (test accuracy 0.38 vs
    # 0.49 measured with seed + offset streams, 0.478 vs 0.509 with the fold_in streams of the default)
    assert out["train"][1]["test"]["accuracy"] > out["frozen"][1]["test"]["accuracy"] + 0.02


def test_fair_scratch_lam_warmup_ramps_the_fairness_weight_from_zero(setup):
    ctx, init_params, _ = setup
    from fairprune_jax.data.base import eval_batches
    from fairprune_jax.training.train import Carry, create_state
    _, model_state = FS.initial_weights(ctx)
    dens = FS.layer_densities(init_params, ctx.template, 0.5, "uniform")
    frozen = FS.frozen_weights(init_params, ctx.template, "signed_constant", dens)
    scores = FS.init_scores(jax.random.key(0), frozen, ctx.template)
    tx = optax.sgd(0.1)
    fair = FS.fairness_term(ctx, FS.FairScratchOptions(penalty="dp_rate"))[0]
    batch = next(iter(eval_batches(ctx.dataset.train, 64)))

    def scores_after_step(lam, warmup_steps, step):
        sc = jax.tree.map(jnp.copy, scores)          # the step donates its input state
        st = create_state(frozen, model_state, optax.identity(), extra=Carry(trained=FS.Trained(sc)))
        st = st.replace(masks=FS.score_masks(sc, ctx.template, 0.5, "uniform"), opt_state=tx.init(FS.Trained(sc)),
                        step=jnp.asarray(step, st.step.dtype))
        fn = FS.make_score_step(ctx.fm, tx, ctx.template, sparsity=0.5, distribution="uniform", fair_fn=fair,
                                lam=lam, num_groups=ctx.dataset.num_groups, positive_label=1,
                                warmup_steps=warmup_steps)
        new_state, _ = fn(st, batch)
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(new_state.extra.trained.scores)])

    plain = scores_after_step(0.0, 0, 0)
    full = scores_after_step(50.0, 0, 0)
    assert not np.allclose(plain, full)                                        # the term acts at lam 50
    np.testing.assert_allclose(scores_after_step(50.0, 10, 0), plain, atol=1e-7)   # step 0: weight 0
    np.testing.assert_allclose(scores_after_step(50.0, 10, 10), full, atol=1e-6)   # ramp done: full weight
    np.testing.assert_allclose(scores_after_step(50.0, 10, 5), scores_after_step(25.0, 0, 5), atol=1e-6)
    # defaults by form: the soft-rate forms get lam 1 with a half warm-up, the others lam 0.1 without
    assert FS.form_defaults("dp_rate", FS.FairScratchOptions()) == (1.0, 0.5)
    assert FS.form_defaults("class_mean_dev", FS.FairScratchOptions()) == (0.1, 0.0)
    assert FS.form_defaults("dp_rate", FS.FairScratchOptions(lam=0.3, lam_warmup=0.0)) == (0.3, 0.0)


# ---------------------------------------------------------------------------
# End to end through the CLI
# ---------------------------------------------------------------------------

CLI_BASE = ["--dataset", "digits", "--epochs", "1", "--finetune-epochs", "1", "--sparsity", "0.5", "--model-opt", f"hidden={HIDDEN}",
            "--no-progress"]


@pytest.fixture(scope="module")
def lth_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lth")
    assert cli_main(["run", "--method", "lth", "--out", str(out), *CLI_BASE]) == 0
    return out


def test_cli_lth_exact_sparsity_every_round(lth_run):
    res = json.loads((lth_run / "results.json").read_text())
    assert res["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-12)
    rounds = res["method_info"]["rounds"]
    expected = [1 - 0.8 ** r for r in range(1, 4)] + [0.5]
    assert [r["sparsity_target"] for r in rounds] == pytest.approx(expected)
    prev = None
    for r, target in zip(rounds, expected):
        arrays, report = L.load_masks(r["mask_file"])
        assert report["round"] == r["round"]
        for name, m in arrays.items():
            assert int(m.sum()) == round((1 - target) * m.size)  # exact per layer (uniform)
            if prev is not None:
                assert np.all(prev[name] >= m)  # a pruned weight never comes back
        total = sum(m.size for m in arrays.values())
        assert abs(r["sparsity"] - target) <= len(arrays) / total
        prev = arrays


@pytest.mark.parametrize("method,opts", [("ballot", ["--opt", "rewind_step=3"]),
                                         ("fair_scratch", ["--opt", "lam=0.5"])])
def test_cli_runs_end_to_end(tmp_path, method, opts):
    assert cli_main(["run", "--method", method, "--out", str(tmp_path), *CLI_BASE, *opts]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["method"] == method
    assert res["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-12)
    assert res["method_info"]["sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert res["pruned"]["test"]["accuracy"] is not None
    if method == "ballot":
        votes, report = L.load_masks(tmp_path / "ballot" / "votes.npz")
        assert report["options"]["rewind_step"] == 3 and report["votes"]["epochs"] == 1
        # default: the hidden layer by magnitude, only the classifier votes
        assert set(votes) == {"head/kernel", "layers/0/kernel", "votes/head/kernel", "score_sum/head/kernel"}
    else:
        assert res["method_info"]["options"]["lam"] == 0.5
        assert res["method_info"]["train_surrogate"] is not None


def test_bad_options_name_the_choices(setup):
    ctx, _, dense = setup
    with pytest.raises(ValueError, match="fair_by"):
        run_direct("ballot", with_options(ctx, fair_by="race"), dense)
    with pytest.raises(ValueError, match="surrogate"):
        run_direct("fair_scratch", with_options(ctx, surrogate="xx"), dense)


def test_ballot_voting_run_is_shared_across_sparsities_and_exact(setup, monkeypatch):
    """The voting run does not depend on the sparsity: one run serves every sparsity of a dense model,
    and a memoised run gives bit-identical tickets to a fresh one."""
    ctx, _, dense = setup
    ctx = dataclasses.replace(ctx, memo={})
    at = lambda c, s: with_options(c.with_settings(sparsity=s), retrain_epochs=1, scope="all")  # noqa: E731
    st_a, info_a = run_direct("ballot", at(ctx, 0.5), dense)
    assert len(ctx.memo) == 1

    def no_new_voting_run(*a, **k):
        raise AssertionError("the voting run was repeated although it is memoised")
    with monkeypatch.context() as m:
        m.setattr(B, "make_vote_step", no_new_voting_run)
        st_b, info_b = run_direct("ballot", at(ctx, 0.8), dense)
    fresh_b, fresh_info = run_direct("ballot", at(dataclasses.replace(ctx, memo={}), 0.8), dense)
    assert tree_equal(st_b.masks, fresh_b.masks) and tree_equal(st_b.params, fresh_b.params)
    assert info_b["votes"] == fresh_info["votes"]
    kept = {n: int(np.asarray(x).sum()) for n, x in named_leaves(st_b.masks)}
    assert kept == keep_counts(dense.params, ctx.template, 0.8)
    assert not tree_equal(st_a.masks, st_b.masks)
    # another dense model (same options) is not served from the memo
    other = dense.replace(params=jax.tree.map(lambda x: x * 1.0, dense.params))
    with monkeypatch.context() as m:
        m.setattr(B, "make_vote_step", no_new_voting_run)
        with pytest.raises(AssertionError, match="repeated"):
            run_direct("ballot", at(ctx, 0.8), other)


# ---------------------------------------------------------------------------
# Ballot: the authors' algorithm and our all-layer adaptation (issue 13)
# ---------------------------------------------------------------------------


def test_ballot_authors_variant_leaves_hidden_layers_dense_and_reports_true_sparsity(setup):
    ctx, init_params, dense = setup
    st, info = run_direct("ballot", with_options(ctx, variant="authors"), dense)
    masks = dict(named_leaves(st.masks))
    assert np.all(np.asarray(masks["layers/0/kernel"]) == 1)           # the body stays dense
    head = np.asarray(masks["head/kernel"])
    assert int(head.sum()) == int(0.5 * head.size) == 160                # their k = int((1 - s) * n)
    assert info["voted_layers"] == ["head/kernel"]
    total = sum(int(np.asarray(m).size) for m in masks.values())
    assert info["sparsity"] == pytest.approx(160 / total)                 # the true overall sparsity, not 0.5
    assert info["sparsity"] < 0.1 and info["sparsity_target"] == 0.5
    assert info["options"]["sign"] == "signed" and info["options"]["normalize"] == "row"
    assert info["options"]["weights"] == "truncated" and info["options"]["retrain_epochs"] == ctx.settings.epochs
    assert "authors" in info["label"]


def test_ballot_default_masks_the_body_by_magnitude_and_votes_on_the_classifier(setup):
    ctx, init_params, dense = setup
    st, info = run_direct("ballot", with_options(ctx, retrain_epochs=0), dense)
    masks = dict(named_leaves(st.masks))
    body_ref = dict(named_leaves(ctx.masks_from_scores(scores.magnitude(dense.params, ctx.template), 0.5)))
    np.testing.assert_array_equal(np.asarray(masks["layers/0/kernel"]), np.asarray(body_ref["layers/0/kernel"]))
    assert info["voted_layers"] == ["head/kernel"] and info["sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert int(np.asarray(masks["head/kernel"]).sum()) == 160
    assert info["replay_max_abs_diff_to_dense"] is None    # votes were collected under the body mask
    assert "adaptation" in info["label"] and info["options"]["retrain"] == "dense"
    with pytest.raises(ValueError, match="variant"):
        run_direct("ballot", with_options(ctx, variant="paper"), dense)


def test_ballot_body_lth_masks_the_body_by_rewound_rounds_and_votes_on_the_classifier(setup):
    ctx, init_params, dense = setup
    opts = dict(body="lth", body_fraction=0.3, retrain_epochs=0)
    st, info = run_direct("ballot", with_options(ctx, **opts), dense)
    masks = dict(named_leaves(st.masks))
    body = np.asarray(masks["layers/0/kernel"])
    assert int(body.sum()) == int(0.5 * body.size)                      # the body at exactly the target
    assert int(np.asarray(masks["head/kernel"]).sum()) == 160 and info["sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert info["voted_layers"] == ["head/kernel"]
    # 0.3 per round reaches 0.5 in two rounds: one trained round (from the rewound init), then the last masks
    assert [r["round"] for r in info["body_lth_rounds"]] == [1]
    assert info["body_lth_rounds"][0]["target"] == pytest.approx(0.3)
    # the body differs from one-shot magnitude of the dense weights (the round retrained the survivors)
    one_shot = dict(named_leaves(ctx.masks_from_scores(scores.magnitude(dense.params, ctx.template), 0.5)))
    assert not np.array_equal(body, np.asarray(one_shot["layers/0/kernel"]))
    assert "lth" in info["label"]
    with pytest.raises(ValueError, match="body_fraction"):
        run_direct("ballot", with_options(ctx, body="lth", body_fraction=1.5), dense)


def test_iterative_magnitude_never_revives_and_stops_when_asked(setup):
    ctx, _, dense = setup
    from fairprune_jax.techniques.rewind import iterative_magnitude
    seen = []

    def train_round(r, target, masks):
        seen.append(masks)
        if r == 2:
            return None
        # a state whose magnitudes favour exactly the pruned weights: they must stay pruned anyway
        flipped = jax.tree.map(lambda p, m: p if m is None else (1.0 - m) * 10.0 + m * 0.01,
                               dense.params, masks, is_leaf=lambda x: x is None)
        return dense.replace(params=flipped)

    _, masks = iterative_magnitude(ctx, dense, [0.3, 0.5, 0.7], train_round)
    assert len(seen) == 2                                       # stopped after round 2's masks
    a, b = (np.asarray(dict(named_leaves(m))["layers/0/kernel"]) for m in seen)
    assert np.all(b <= a) and b.sum() == int(0.5 * b.size)       # nothing revived, exact count


def test_ballot_truncated_weights_and_signed_votes():
    w = np.asarray(B.truncated_weights(jnp.array([0.0, 0.5, 0.99, 1.0])))
    np.testing.assert_allclose(w[:3], 1e6, rtol=1e-5)      # every imperfect class: the same huge weight
    assert w[3] == pytest.approx(1.0, rel=1e-5)
    s = {"a": jnp.array([[0.5, -2.0], [0.0, 0.1]])}
    v = B.signed_topk_votes(s, 3)
    np.testing.assert_array_equal(np.asarray(v["a"]), [[1, 0], [0, 1]])   # by signed value; 0 gets no vote


def test_lth_last_round_gets_the_dense_budget(setup):
    ctx, _, dense = setup
    ctx2 = ctx.with_settings(epochs=2, finetune_epochs=1)
    _, info = run_direct("lth", with_options(ctx2, fraction=0.3), dense)
    epochs = [len(info["history"][f"round_{r}"]["loss"]) for r in range(1, len(info["rounds"]) + 1)]
    assert info["last_round_epochs"] == 2 and epochs == [1, 2]      # history: one entry per epoch
    _, info = run_direct("lth", with_options(ctx2, fraction=0.3, last_round="round"), dense)
    assert [len(h["loss"]) for h in info["history"].values()] == [1, 1]


# ---------------------------------------------------------------------------
# Fair Scratch: the one-sided regulariser
# ---------------------------------------------------------------------------


def _two_group_batch(rate_a, rate_b, n=40):
    """Logits whose hard positive rate is ``rate_a`` in group 0 and ``rate_b`` in group 1."""
    g = np.repeat([0, 1], n)
    f = np.concatenate([np.where(np.arange(n) < rate_a * n, 2.0, -2.0),
                        np.where(np.arange(n) < rate_b * n, 2.0, -2.0)]).astype(np.float32)
    logits = np.stack([np.zeros_like(f), f], axis=1)    # two classes: log-odds of class 1 = f
    y = np.ones(2 * n, np.int32)
    return logits, y, g, np.ones(2 * n, np.float32)


def test_one_sided_penalty_zero_once_the_disadvantaged_group_meets_the_target():
    # group 0 has the lower training positive rate: it is the disadvantaged one and is pushed up
    y_train = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    g_train = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    d = FS.label_directions(y_train, g_train, 2, 1)
    np.testing.assert_array_equal(d, [1.0, -1.0])
    pri = jnp.asarray(FS.group_priors(y_train, g_train, 2, 1, False))
    pen = lambda *b, **k: float(FS.one_sided_penalty(*b, directions=jnp.asarray(d), priors=pri,  # noqa: E731
                                                     num_groups=2, **k))
    assert pen(*_two_group_batch(0.2, 0.8)) > 0.1          # below the overall rate: pushed
    assert pen(*_two_group_batch(0.5, 0.5)) == 0.0         # meets it: no penalty
    assert pen(*_two_group_batch(0.8, 0.3)) == 0.0         # beyond it: no push into the reverse gap
    assert pen(*_two_group_batch(0.8, 0.3), gated=False) > 0.1   # the authors' ungated form keeps pushing
    # EO: only the y = pos rows count; with no positive row there is nothing to push
    logits, y, g, w = _two_group_batch(0.2, 0.8)
    assert pen(logits, np.zeros_like(y), g, w, on_positives=True) == 0.0
    assert pen(logits, y, g, w, on_positives=True) > 0.1
    # the gradient raises the disadvantaged group's log-odds and lowers the other's
    grad = jax.grad(lambda lg: FS.one_sided_penalty(lg, y, g, w, directions=jnp.asarray(d), priors=pri,
                                                    num_groups=2))(jnp.asarray(logits))
    assert float(jnp.sum(grad[g == 0, 1])) < 0 and float(jnp.sum(grad[g == 1, 1])) > 0


def test_rate_penalty_is_the_mean_group_deviation_and_moves_only_the_groups():
    # soft rates: sigmoid(+-2) = 0.881 / 0.119, so group rates 0.2 / 0.8 of hard positives give soft rates
    logits, y, g, w = _two_group_batch(0.2, 0.8)
    h = np.asarray(jax.nn.sigmoid(logits[:, 1]))
    r0, r1, r = h[g == 0].mean(), h[g == 1].mean(), h.mean()
    val = float(FS.rate_penalty(logits, y, g, w, num_groups=2))
    np.testing.assert_allclose(val, 0.5 * (abs(r0 - r) + abs(r1 - r)), rtol=1e-6)
    assert float(FS.rate_penalty(*_two_group_batch(0.5, 0.5), num_groups=2)) < 1e-7     # equal rates: 0
    # a third group with no rows does not dilute the mean; the value is bounded by 1
    assert float(FS.rate_penalty(logits, y, g, w, num_groups=3)) == pytest.approx(val, rel=1e-6)
    # the overall rate is held fixed: the gradient raises group 0 and lowers group 1, by equal total amounts
    grad = np.asarray(jax.grad(lambda lg: FS.rate_penalty(lg, y, g, w, num_groups=2))(jnp.asarray(logits)))
    assert grad[g == 0, 1].sum() < 0 < grad[g == 1, 1].sum()
    # EO form: only the y = pos rows enter
    assert float(FS.rate_penalty(logits, np.zeros_like(y), g, w, num_groups=2, on_positives=True)) == 0.0
    # a group weighs the same whatever its size: 10 rows of group 1 against 40 of group 0
    keep = (g == 0) | (np.arange(len(g)) < 50)
    small = float(FS.rate_penalty(logits[keep], y[keep], g[keep], w[keep], num_groups=2))
    hk, gk = h[keep], g[keep]
    np.testing.assert_allclose(small, 0.5 * (abs(hk[gk == 0].mean() - hk.mean()) + abs(hk[gk == 1].mean() - hk.mean())),
                               rtol=1e-6)


def test_class_penalty_only_pushes_classes_worse_than_average():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    logits = rng.normal(size=(30, 3)).astype(np.float32)
    logits[np.arange(20), y[:20]] += 4.0              # classes 0 and 1 good, class 2 poor
    w = np.ones(30, np.float32)
    for bounded in (False, True):
        fn = lambda lg: FS.class_penalty(lg, y, y, w, num_groups=3, bounded=bounded)  # noqa: E731
        assert float(fn(jnp.asarray(logits))) > 0
        grad = np.asarray(jax.grad(fn)(jnp.asarray(logits)))
        assert np.all(grad[:20] == 0) and np.any(grad[20:] != 0)
        uniform = np.zeros((30, 3), np.float32)
        assert float(fn(jnp.asarray(uniform))) == 0.0
