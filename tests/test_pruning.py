"""The pruner as an optax transformation (fairprune_jax.sparsity.pruning)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fairprune_jax.sparsity import masks, pruning, schedules, scores


def _params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {"l1": {"kernel": jax.random.normal(k[0], (6, 16)), "bias": jnp.zeros(16)},
            "conv": {"kernel": jax.random.normal(k[1], (3, 3, 2, 8))},
            "l2": {"kernel": jax.random.normal(k[2], (16, 4)), "bias": jnp.zeros(4)}}


def _run(tx, params, steps, seed=1):
    """``steps`` updates with random gradients; returns params and optimizer state after each."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for i in range(steps):
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), p.shape),
                             params)
        upd, state = update(grads, state, params)
        params = optax.apply_updates(params, upd)
        out.append((params, state))
    return out


def _kept(params, template=None):
    template = masks.prunable_template(params) if template is None else template
    return {n: int(np.count_nonzero(np.asarray(p)))
            for n, p in masks.named_leaves(masks._prune_like(params, template))}


def test_one_shot_inside_chain_exact_zeros_and_exact_sparsity():
    params = _params()
    pruner = pruning.Pruner(sparsity=0.8)
    tx = optax.chain(optax.clip_by_global_norm(1.0), pruner.wrap_optax(optax.adamw(1e-2, weight_decay=0.1)))
    hist = _run(tx, params, 6)
    expected = masks.masks_from_scores(scores.magnitude(params, masks.prunable_template(params)),
                                       masks.prunable_template(params), 0.8)
    want = masks.keep_counts(params, masks.prunable_template(params), 0.8)
    for p, st in hist:   # from the first update on: exact count per layer, the same zeros each step
        assert _kept(p) == want
        for m, e, leaf in zip(jax.tree.leaves(pruning.find_state(st).masks), jax.tree.leaves(expected),
                              jax.tree.leaves(masks._prune_like(p, masks.prunable_template(p)))):
            np.testing.assert_array_equal(np.asarray(m), np.asarray(e))
            assert np.all(np.asarray(leaf)[np.asarray(m) == 0] == 0.0)     # exactly zero, not tiny
    # biases were not pruned, and the survivors moved
    assert np.all(np.asarray(hist[-1][0]["l1"]["bias"]) != 0)
    st = pruning.find_state(hist[-1][1])
    assert int(st.count) == 6 and float(st.sparsity) == pytest.approx(0.8)
    np.testing.assert_array_equal(pruner.apply_masks(hist[-1][0], hist[-1][1])["l2"]["kernel"],
                                  hist[-1][0]["l2"]["kernel"])


def test_kept_weights_get_exactly_the_inner_update():
    params = _params()
    inner = optax.sgd(0.1, momentum=0.9)
    p_pruned, _ = _run(pruning.Pruner(sparsity=0.5).wrap_optax(inner), params, 3)[-1]
    p_dense, _ = _run(inner, params, 1)[-1]
    # step 1 (mask from step 0's params) changes survivors by exactly the inner update of the masked grads
    p1, st1 = _run(pruning.Pruner(sparsity=0.5).wrap_optax(inner), params, 1)[-1]
    m = pruning.find_state(st1).masks["l1"]["kernel"]
    live = np.asarray(m) > 0
    np.testing.assert_array_equal(np.asarray(p1["l1"]["kernel"])[live], np.asarray(p_dense["l1"]["kernel"])[live])
    assert np.all(np.asarray(p_pruned["l1"]["kernel"])[~live] == 0)


def test_gradual_follows_the_cubic_schedule():
    params = _params()
    schedule = pruning.cubic(end=12, begin=2, frequency=3)
    pruner = pruning.Pruner(sparsity=0.9, schedule=schedule)
    points = dict(pruner.points())
    assert points == {2 + t: s for t, s in schedules.cubic_steps(0.9, 10, 3)}
    template = masks.prunable_template(params)
    hist = _run(pruner.wrap_optax(optax.adam(1e-2)), params, 16)
    prev_zero = None
    for t, (p, st) in enumerate(hist):         # after update t the masks of the last point <= t hold
        done = [s for step, s in points.items() if step <= t]
        target = done[-1] if done else 0.0
        assert float(pruning.find_state(st).sparsity) == pytest.approx(target)
        assert _kept(p) == (masks.keep_counts(params, template, target) if done else _kept(params))
        if done:  # the schedule's value at that point is the cubic formula
            step = max(s for s in points if s <= t)
            assert target == pytest.approx(schedules.cubic(step, 0.9, 10, begin_step=2))
        zero = np.asarray(p["l2"]["kernel"]) == 0
        if prev_zero is not None:
            assert np.all(zero[prev_zero])      # a pruned weight never comes back
        prev_zero = zero


@pytest.mark.parametrize("distribution", ["global", "erk"])
def test_distributions_match_keep_counts(distribution):
    params = _params()
    template = masks.prunable_template(params)
    tx = pruning.Pruner(sparsity=0.7, distribution=distribution).wrap_optax(optax.sgd(1e-2))
    p, st = _run(tx, params, 2)[-1]
    want = masks.keep_counts(params, template, 0.7, distribution)
    kept = _kept(p)
    if distribution == "global":
        assert sum(kept.values()) == want["*"]
        # one ranking over all layers: the kept weights are the globally largest at step 0
        thr = np.sort(np.concatenate([np.abs(np.asarray(x)).ravel() for _, x in
                                      masks.named_leaves(masks._prune_like(params, template))]))[::-1][want["*"] - 1]
        m0 = pruning.find_state(st).masks
        for n, m in masks.named_leaves(m0):
            src = np.abs(np.asarray(dict(masks.named_leaves(params))[n]))
            assert np.all(src[np.asarray(m) > 0] >= thr)
    else:
        assert kept == want and len(set(kept.values())) > 1


def test_structured_scores_prune_whole_output_units():
    params = _params()
    pruner = pruning.Pruner(sparsity=0.5, score="structured")
    p, st = _run(pruner.wrap_optax(optax.adam(1e-2)), params, 3)[-1]
    m = pruning.find_state(st).masks
    assert m["l1"]["kernel"].shape == (16,) and m["conv"]["kernel"].shape == (8,)
    l1 = scores.l1_structured(params, masks.prunable_template(params))
    for name in ("l1", "conv", "l2"):
        k = np.asarray(p[name]["kernel"]).reshape(-1, p[name]["kernel"].shape[-1])
        dead = np.all(k == 0, axis=0)
        units = k.shape[1]
        assert dead.sum() == units - round(0.5 * units)
        np.testing.assert_array_equal(dead, np.asarray(m[name]["kernel"]) == 0)
        # the units kept are the largest by L1 norm of the starting weights
        order = np.argsort(-np.asarray(l1[name]["kernel"]), kind="stable")
        assert not dead[order[: round(0.5 * units)]].any()


def test_saliency_and_random_scores():
    params = _params()
    template = masks.prunable_template(params)
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)
    tx = pruning.Pruner(sparsity=0.6, score="saliency").wrap_optax(optax.sgd(0.0))
    _, st = jax.jit(tx.update)(grads, tx.init(params), params)
    want = masks.masks_from_scores(scores.saliency(params, grads, template), template, 0.6)
    for a, b in zip(jax.tree.leaves(st.masks), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    r = [pruning.Pruner(sparsity=0.6, score="random", seed=s).wrap_optax(optax.sgd(0.0)) for s in (0, 1)]
    up = [jax.jit(t.update) for t in r]
    ms = [u(grads, t.init(params), params)[1].masks["l1"]["kernel"] for u, t in zip(up[:1] + up, r[:1] + r)]
    np.testing.assert_array_equal(ms[0], ms[1])
    assert not np.array_equal(ms[0], ms[2])
    assert int(np.sum(ms[2])) == masks.keep_counts(params, template, 0.6)["l1/kernel"]


def test_iterative_rounds():
    params = _params()
    pruner = pruning.Pruner(sparsity=0.6, schedule=pruning.iterative(every=2, fraction=0.3))
    assert [s for _, s in pruner.points()] == schedules.iterative_rounds(0.6, 0.3)
    assert [t for t, _ in pruner.points()] == [2, 4, 6]
    hist = _run(pruner.wrap_optax(optax.sgd(1e-2)), params, 7)
    assert [round(float(pruning.find_state(st).sparsity), 4) for _, st in hist] == \
        [0, 0, 0.3, 0.3, 0.51, 0.51, 0.6]


def test_rounds_stepped_by_the_caller_are_the_pruners_own_masks():
    """Iterative rounds with rewinding (lth, ballot's body) read each round's masks from the pruner
    (masks_at): the masks its wrapped optimizer computes at those points, pruned entries never revived."""
    params = _params()
    capped, frac = schedules.capped_rounds(0.9, 0.2, 3)
    assert len(capped) == 3 and capped[-1] == 0.9 and frac == pytest.approx(1 - 0.1 ** (1 / 3))
    assert [s for _, s in pruning.iterative(1, fraction=0.2, max_rounds=3).points(0.9)] == capped
    pruner = pruning.Pruner(sparsity=0.9, schedule=pruning.rounds(capped), score="magnitude")
    tx = pruner.wrap_optax(optax.sgd(0.0))                     # lr 0: every point scores the same params
    hist = _run(tx, params, 4)                                 # points at updates 1, 2, 3
    prev = None
    for i in range(3):
        prev = pruner.masks_at(params, i, prev_masks=prev)
        mine = dict(masks.named_leaves(prev))
        theirs = dict(masks.named_leaves(pruning.find_state(hist[i + 1][1]).masks))
        assert mine.keys() == theirs.keys()
        assert all(np.array_equal(np.asarray(mine[n]), np.asarray(theirs[n])) for n in mine)
    moved = jax.tree.map(lambda p: -p, params)                   # new magnitudes cannot revive pruned entries
    again = pruner.masks_at(moved, 2, prev_masks=prev)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(again), jax.tree.leaves(prev)))
    with pytest.raises(ValueError, match="ascending"):
        pruning.rounds([0.5, 0.3])
    with pytest.raises(ValueError, match="not at the pruner's sparsity"):
        pruning.Pruner(sparsity=0.8, schedule=pruning.rounds(capped))


def test_whole_loop_under_jit_and_scan():
    """Masks change inside lax.scan: no host round-trip; same result as a loop of jitted steps."""
    params = _params()
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     pruning.Pruner(sparsity=0.75, schedule=pruning.cubic(end=8, frequency=2),
                                    distribution="erk").wrap_optax(optax.adam(1e-2)))
    x = jax.random.normal(jax.random.key(3), (32, 6))

    def loss(p):
        return jnp.mean((x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"] ** 2) + \
            jnp.sum(p["conv"]["kernel"] ** 2)

    def step(carry, _):
        p, s = carry
        upd, s = tx.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, upd), s), None

    (p_jit, s_jit), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=10))(params)
    carry, one = (params, tx.init(params)), jax.jit(step)
    for _ in range(10):
        carry, _ = one(carry, None)
    for a, b in zip(jax.tree.leaves(p_jit), jax.tree.leaves(carry[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert _kept(p_jit) == masks.keep_counts(params, masks.prunable_template(params), 0.75, "erk")
    assert pruning.sparsity_of(p_jit, masks.prunable_template(params)) == pytest.approx(0.75, abs=1e-3)


def test_flax_nnx_model_in_a_chain():
    """The done-when: chain(clip_by_global_norm, pruner.wrap_optax(adam)) trains an nnx model."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)
            self.out = nnx.Linear(4 * 6 * 6, 2, rngs=rngs)

        def __call__(self, x):
            h = self.drop(nnx.relu(self.norm(self.conv(x))))
            return self.out(h.reshape(h.shape[0], -1))

    model = Net(nnx.Rngs(0))
    pruner = pruning.Pruner(sparsity=0.9, schedule=pruning.cubic(end=10, frequency=2))
    opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), pruner.wrap_optax(optax.adam(1e-2))),
                        wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (32, 6, 6, 1))
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(jnp.int32)

    @nnx.jit
    def train_step(model, opt):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(train_step(model, opt)) for _ in range(14)]
    assert losses[-1] < losses[0]
    for k in (model.conv.kernel[...], model.out.kernel[...]):
        assert int(np.count_nonzero(np.asarray(k))) == round(0.1 * k.size)
    assert np.count_nonzero(np.asarray(model.out.bias[...])) > 0
    assert float(pruning.find_state(opt.opt_state).sparsity) == pytest.approx(0.9)


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="distribution"):
        pruning.Pruner(sparsity=0.5, distribution="layerwise")
    with pytest.raises(ValueError, match="score"):
        pruning.Pruner(sparsity=0.5, score="taylor")
    with pytest.raises(ValueError, match="sparsity"):
        pruning.Pruner(sparsity=1.0)
    with pytest.raises(ValueError, match="end"):
        pruning.cubic(end=0)
    tx = pruning.Pruner(sparsity=0.5).wrap_optax(optax.sgd(0.1))
    with pytest.raises(ValueError, match="params"):
        tx.update(_params(), tx.init(_params()))


def test_pre_update_reproduces_a_mask_hook_before_each_step():
    """With pre_update the step's gradient is taken on the pruned model, as gradual.py's host hook
    does (masks_from_scores at each point, then train.apply_gradients): the same masks and params."""
    from fairprune_jax.training import train

    params = _params()
    template = masks.prunable_template(params)
    x = jax.random.normal(jax.random.key(4), (16, 6))

    def loss(p):
        return jnp.mean(jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"]) + \
            jnp.mean(p["conv"]["kernel"] ** 3)

    pruner = pruning.Pruner(sparsity=0.8, schedule=pruning.cubic(end=6, frequency=2))
    inner = optax.sgd(0.1, momentum=0.9)
    tx = pruner.wrap_optax(inner)

    @jax.jit
    def ours(p, s):
        p, s = pruner.pre_update(p, s)
        upd, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, upd), s

    points = dict(pruner.points())
    ts = train.TrainState(params=params,
                          opt_state=pruning.MaskState(masks.ones_like_template(params, template), inner.init(params)),
                          model_state={}, rng=jax.random.key(0), step=jnp.zeros((), jnp.int32),
                          nan_step=jnp.zeros((), jnp.int32))
    hook_step = jax.jit(lambda st: train.apply_gradients(st, jax.grad(loss)(st.params), inner))
    p, s = params, tx.init(params)
    for t in range(8):
        if t in points:          # the host hook of fairprune_jax/techniques/gradual.py
            m = masks.masks_from_scores(scores.magnitude(ts.params, template), template, points[t],
                                        prev_masks=ts.masks)
            ts = ts.replace(masks=m, params=masks.apply_masks(ts.params, m))
        ts = hook_step(ts)
        p, s = ours(p, s)
        for a, b in zip(jax.tree.leaves(pruning.find_state(s).masks), jax.tree.leaves(ts.masks)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ts.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
            assert np.array_equal(np.asarray(a) == 0, np.asarray(b) == 0)


def test_masks_live_in_the_optimizer_state_and_both_update_forms_agree():
    """A TrainState's masks are a MaskState in its optimizer state; keep_pruned (an optax transformation, for a
    user's chain) and masked_step (the library's step) give the same zeros and the same kept weights (up to how
    params + update is fused: compared at float tolerance)."""
    from fairprune_jax.training import train
    params = {"a": {"kernel": jnp.arange(1.0, 7.0).reshape(3, 2), "bias": jnp.ones(2)}}
    m = {"a": {"kernel": jnp.asarray([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), "bias": None}}
    st = train.create_state(params, {}, optax.sgd(0.1, momentum=0.9), masks=m)
    assert isinstance(st.opt_state, pruning.MaskState) and st.masks is st.opt_state.masks
    assert st.replace(masks=None).masks is None and not isinstance(st.replace(masks=None).opt_state, pruning.MaskState)
    grads = jax.tree.map(jnp.ones_like, params)
    inner = optax.sgd(0.1, momentum=0.9)
    tx = pruning.keep_pruned(inner)
    opt = pruning.with_masks(tx.init(params), m)
    p_user, p_lib, s_lib = st.params, st.params, st.opt_state.inner
    for _ in range(3):
        upd, opt = tx.update(grads, opt, p_user)
        p_user = optax.apply_updates(p_user, upd)
        p_lib, s_lib = pruning.masked_step(inner, m, s_lib, grads, p_lib)
    for a, b in zip(jax.tree.leaves(p_user), jax.tree.leaves(p_lib)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert np.all(np.asarray(p_user["a"]["kernel"])[np.asarray(m["a"]["kernel"]) == 0] == 0)
    assert np.all(np.asarray(p_lib["a"]["kernel"])[np.asarray(m["a"]["kernel"]) == 0] == 0)
    assert pruning.find_masks(opt) is opt.masks and pruning.find_masks(inner.init(params)) is None
