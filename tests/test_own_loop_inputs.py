"""Ninth tester's round (a user's own optax loop and NNX model; docs/HARDENING.md rows 174-): one-logit models in
the metrics and the certificate, templates written with False or by name, masks of another container, the
Pruner's structured scores, the Dual's ceiling and violation shapes, schedule and sparsity arguments."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fairprune_jax.constraints import dual
from fairprune_jax.metrics import certify, fairness
from fairprune_jax.sparsity import masks as masks_lib, pruning, scores


def _mlp():
    return nnx.Sequential(nnx.Linear(8, 32, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(32, 2, rngs=nnx.Rngs(1)))


def _xy(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32)


def test_a_one_logit_model_is_read_as_binary_by_the_metrics_and_the_certificate():
    """(B, 1) sigmoid logits were argmaxed: every row class 0, DP 0.0 (fairlearn: 0.276), and paired_counts saw no
    flipped row where 26 had flipped."""
    rng = np.random.default_rng(1)
    n = 300
    g, y = rng.integers(0, 3, n), rng.integers(0, 2, n)
    logit = (rng.normal(size=(n, 1)) + 0.8 * (g[:, None] == 1)).astype(np.float32)
    pred = (logit[:, 0] > 0).astype(np.int32)
    a, b = fairness.group_counts(jnp.asarray(logit), y, g, 3), fairness.group_counts(jnp.asarray(pred), y, g, 3)
    assert fairness.demographic_parity_difference(a) == fairness.demographic_parity_difference(b) > 0.1
    other = logit.copy()
    other[:30, 0] = -other[:30, 0]
    w = np.ones(n, np.float32)
    p = certify.paired_counts(jnp.asarray(logit), jnp.asarray(other), y, g, w, 3, 2)
    q = certify.paired_counts(jnp.asarray(pred), jnp.asarray((other[:, 0] > 0).astype(np.int32)), y, g, w, 3, 2)
    assert np.array_equal(np.asarray(p["lost"]), np.asarray(q["lost"]))
    assert int(np.sum(p["lost"]) + np.sum(p["gained"])) == 30


def test_a_positive_label_the_logits_do_not_have_is_refused():
    logits = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="positive_label=2 is not a class of 2-class logits"):
        fairness.group_counts(logits, jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32), 1, positive_label=2)


def test_a_template_written_with_false_keeps_those_leaves_dense():
    params = nnx.to_pure_dict(nnx.state(_mlp(), nnx.Param))
    pr = pruning.Pruner(sparsity=0.5, template=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    m = pr.init_masks(params)
    assert m["layers"][0]["bias"] is None and m["layers"][0]["kernel"] is not None
    t = {"layers": {0: {"kernel": True, "bias": False}, 2: {"kernel": False, "bias": False}}}
    state = pruning.Pruner(sparsity=0.5, template=t).wrap_optax(optax.sgd(0.1)).init(params)
    names = [n for n, _ in masks_lib.named_leaves(state.masks)]
    assert names == ["layers/0/kernel"]


def test_the_own_loop_pieces_take_masks_and_templates_of_another_container():
    """Masks of the pure params dict (what prune() returns) in an nnx.Optimizer loop, a template written by name,
    and Pruner.pre_update on an nnx.Optimizer's state: structure errors before."""
    x, y = _xy()
    model = _mlp()
    src = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    t = masks_lib.prunable_template(src)
    m = masks_lib.masks_from_scores(scores.magnitude(src, t), t, sparsity=0.8)
    opt = nnx.Optimizer(model, pruning.keep_pruned(optax.adam(1e-2)), wrt=nnx.Param)
    opt.opt_state = pruning.with_masks(opt.opt_state, m)

    @nnx.jit
    def step(model, opt, xb, yb):
        opt.update(model, nnx.grad(lambda mm: optax.softmax_cross_entropy_with_integer_labels(mm(xb), yb).mean())(model))
    step(model, opt, x, y)
    k = np.asarray(model.layers[0].kernel[...])
    assert np.all(k[np.asarray(m["layers"][0]["kernel"]) == 0] == 0)

    model = _mlp()
    pr = pruning.Pruner(sparsity=0.5, template={"layers": {0: {"kernel": True}}})
    opt = nnx.Optimizer(model, pr.wrap_optax(optax.adam(1e-2)), wrt=nnx.Param)
    assert list(pr.summary(nnx.state(model, nnx.Param), opt.opt_state)["layers"]) == ["layers/0/kernel"]

    model = _mlp()
    pr = pruning.Pruner(sparsity=0.8, schedule=pruning.one_shot(step=0), score="saliency")
    opt = nnx.Optimizer(model, pr.wrap_optax(optax.adam(1e-2)), wrt=nnx.Param)

    @nnx.jit
    def pre(model, opt, xb, yb):
        lf = lambda mm: optax.softmax_cross_entropy_with_integer_labels(mm(xb), yb).mean()  # noqa: E731
        params, opt.opt_state = pr.pre_update(nnx.state(model, nnx.Param), opt.opt_state, grads=nnx.grad(lf)(model))
        nnx.update(model, params)
        opt.update(model, nnx.grad(lf)(model))
    pre(model, opt, x, y)
    assert abs(pr.summary(nnx.state(model, nnx.Param), opt.opt_state)["sparsity_prunable"] - 0.8) < 0.01
    with pytest.raises(ValueError, match="masks name 1 leaves the params do not have .*other/kernel"):
        masks_lib.apply_masks(src, {"other": {"kernel": jnp.ones(3)}})


@pytest.mark.parametrize("score", ["magnitude", "random", "saliency"])
def test_a_structured_pruner_takes_every_built_in_score_per_unit(score):
    """structured=True with a per-weight score died in the first update with a lax.cond type error."""
    params = nnx.to_pure_dict(nnx.state(_mlp(), nnx.Param))
    pr = pruning.Pruner(sparsity=0.5, structured=True, score=score, schedule=pruning.one_shot(step=0))
    tx = pr.wrap_optax(optax.sgd(0.1))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params)
    m = np.asarray(pruning.find_state(state).masks["layers"][0]["kernel"])
    assert m.shape == (32,) and int(m.sum()) == 16


def test_a_structured_pruner_refuses_per_weight_custom_scores_and_attention_head_dims():
    params = nnx.to_pure_dict(nnx.state(_mlp(), nnx.Param))
    pr = pruning.Pruner(sparsity=0.5, structured=True, schedule=pruning.one_shot(step=0),
                        score=lambda p, g, k, t: scores.magnitude(p, t))
    tx = pr.wrap_optax(optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"the score of layers/0/kernel has shape \(8, 32\), its mask \(32,\)"):
        tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    att = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
    p = nnx.to_pure_dict(nnx.state(att, nnx.Param))
    with pytest.raises(ValueError, match="an attention projection .in, heads, head_dim."):
        pruning.Pruner(sparsity=0.5, score="structured").init_masks(p)


def test_the_duals_ceiling_and_violation_shapes_are_checked():
    with pytest.raises(ValueError, match="max_multiplier must be a ceiling above 0"):
        dual.Dual(2, max_multiplier=0.0)
    d = dual.Dual(3, tx=dual.ascent(learning_rate=1.0), max_multiplier=float("inf"))
    st = d.update(d.init(), jnp.asarray([5.0, 3.0, 1.0]))
    assert np.allclose(np.asarray(st.multipliers), [5.0, 3.0, 1.0])          # inf: no ceiling
    for bad in (jnp.ones((3, 1)), jnp.ones(1), jnp.asarray(0.5)):
        with pytest.raises(ValueError, match=r"the Dual has 3 constraint\(s\), so it needs shape \(3,\)"):
            d.lagrangian(1.0, bad, st)
        with pytest.raises(ValueError, match="needs shape"):
            d.update(st, bad)
        with pytest.raises(ValueError, match="needs shape"):
            d.weights(bad, st)


def test_schedule_and_sparsity_arguments():
    with pytest.raises(ValueError, match="frequency .* must be an integer >= 1; got 0"):
        pruning.cubic(end=10, frequency=0)
    with pytest.raises(ValueError, match="frequency"):
        pruning.cubic(end=10, frequency=-5)
    for s in (np.float32(0.9), jnp.float32(0.9), np.int64(0)):
        assert pruning.Pruner(sparsity=s).sparsity == pytest.approx(float(s))
    for s in (True, "0.9", 1.0, np.float32(np.nan)):
        with pytest.raises(ValueError, match="sparsity must be in"):
            pruning.Pruner(sparsity=s)
