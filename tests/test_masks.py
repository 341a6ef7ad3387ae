"""Masks: exact sparsity per distribution, deterministic top-k, templates, structured masks, summaries."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import optax
from fairprune_jax.sparsity import masks as M

#: the distributions that reach any sparsity (N:M patterns reach exactly 1 - N/M: their own tests below)
FREE_DISTRIBUTIONS = tuple(d for d in M.DISTRIBUTIONS if d not in M.NM_PATTERNS)
from fairprune_jax.sparsity import scores as S
from fairprune_jax.models import count_flops, layer_order

# A small menu of kernel shapes keeps the number of distinct compilations low
# (the top-k functions are jitted per tree structure/shape; k is traced).
SHAPES = [(3, 4), (8, 8), (3, 3, 2, 4), (16, 10)]
SETTINGS = settings(deadline=None, max_examples=20, derandomize=True)


def _params(shapes: list[tuple[int, ...]], seed: int = 0) -> dict:
    """A fake params tree: one layer per shape with a kernel and a (never pruned) bias."""
    rng = np.random.default_rng(seed)
    return {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=s[-1:]), jnp.float32)}
            for i, s in enumerate(shapes)}


def _kept(mask_tree) -> dict[str, int]:
    return {n: int(np.asarray(m).sum()) for n, m in M.named_leaves(mask_tree)}


shape_lists = st.lists(st.sampled_from(SHAPES), min_size=1, max_size=2)
sparsities = st.one_of(st.just(0.0), st.just(0.99), st.floats(0.0, 0.99, allow_nan=False))


# ---------------------------------------------------------------------------
# exact sparsity
# ---------------------------------------------------------------------------

@SETTINGS
@given(shapes=shape_lists, s=sparsities, seed=st.integers(0, 3))
@example(shapes=[(8, 8)], s=0.0, seed=0)
@example(shapes=[(8, 8), (3, 3, 2, 4)], s=0.99, seed=1)
def test_uniform_exact_per_layer(shapes, s, seed):
    params = _params(shapes, seed)
    tmpl = M.prunable_template(params)
    masks = M.masks_from_scores(S.magnitude(params, tmpl), tmpl, s, "uniform")
    for i, shape in enumerate(shapes):
        n = int(np.prod(shape))
        m = np.asarray(masks[f"l{i}"]["kernel"])
        assert m.shape == shape
        assert set(np.unique(m)) <= {0.0, 1.0}
        assert int(m.sum()) == int(round((1 - s) * n)), (shape, s)
        assert masks[f"l{i}"]["bias"] is None
        # within the layer, every kept weight has |w| >= every pruned one
        w = np.abs(np.asarray(params[f"l{i}"]["kernel"]))
        if 0 < m.sum() < n:
            assert w[m == 1].min() >= w[m == 0].max()


@SETTINGS
@given(shapes=shape_lists, s=sparsities, seed=st.integers(0, 3))
@example(shapes=[(16, 10), (3, 4)], s=0.0, seed=0)
@example(shapes=[(16, 10), (3, 4)], s=0.99, seed=0)
def test_global_exact_total_and_ranking(shapes, s, seed):
    params = _params(shapes, seed)
    tmpl = M.prunable_template(params)
    masks = M.masks_from_scores(S.magnitude(params, tmpl), tmpl, s, "global")
    n_total = sum(int(np.prod(sh)) for sh in shapes)
    assert sum(_kept(masks).values()) == int(round((1 - s) * n_total))
    kept_scores = np.concatenate([np.abs(np.asarray(params[f"l{i}"]["kernel"]))[np.asarray(masks[f"l{i}"]["kernel"]) == 1]
                                  for i in range(len(shapes))])
    pruned_scores = np.concatenate([np.abs(np.asarray(params[f"l{i}"]["kernel"]))[np.asarray(masks[f"l{i}"]["kernel"]) == 0]
                                    for i in range(len(shapes))])
    if kept_scores.size and pruned_scores.size:
        assert kept_scores.min() >= pruned_scores.max()


def _erk_reference(shapes: list[tuple[int, ...]], s: float) -> dict[int, float]:
    """Independent ERK: density_l = min(1, eps * sum(dims)/prod(dims)), eps solving the total budget."""
    sizes = [int(np.prod(sh)) for sh in shapes]
    raw = [sum(sh) / np.prod(sh) for sh in shapes]
    target = (1 - s) * sum(sizes)
    # bisection on eps: kept(eps) = sum min(n, eps*raw*n) is monotone
    lo, hi = 0.0, 1e9
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(n, mid * r * n) for n, r in zip(sizes, raw)) < target:
            lo = mid
        else:
            hi = mid
    return {i: min(n, hi * r * n) for i, (n, r) in enumerate(zip(sizes, raw))}


@SETTINGS
@given(shapes=shape_lists, s=sparsities, seed=st.integers(0, 3))
@example(shapes=[(16, 10), (3, 4)], s=0.5, seed=0)  # the small layer saturates to dense
@example(shapes=[(16, 10), (3, 3, 2, 4)], s=0.99, seed=0)
def test_erk_exact_total_and_shape_of_distribution(shapes, s, seed):
    params = _params(shapes, seed)
    tmpl = M.prunable_template(params)
    masks = M.masks_from_scores(S.magnitude(params, tmpl), tmpl, s, "erk")
    kept = _kept(masks)
    sizes = [int(np.prod(sh)) for sh in shapes]
    assert sum(kept.values()) == int(round((1 - s) * sum(sizes)))
    ref = _erk_reference(shapes, s)
    for i, n in enumerate(sizes):
        k = kept[f"l{i}/kernel"]
        assert 0 <= k <= n
        # largest-remainder rounding moves each layer by less than one entry (plus float slack)
        assert abs(k - ref[i]) < 1.0 + 1e-6, (shapes, s, i, k, ref[i])
    counts = M.keep_counts(params, tmpl, s, "erk")
    assert counts == kept


def test_erk_gives_small_layers_higher_density():
    params = _params([(16, 10), (3, 4)])
    tmpl = M.prunable_template(params)
    c = M.keep_counts(params, tmpl, 0.8, "erk")
    assert c["l1/kernel"] / 12 > c["l0/kernel"] / 160
    assert sum(c.values()) == round(0.2 * 172)


def test_keep_counts_global_returns_total_only():
    params = _params([(8, 8), (3, 4)])
    tmpl = M.prunable_template(params)
    assert M.keep_counts(params, tmpl, 0.3, "global") == {"*": round(0.7 * 76)}
    assert M.keep_counts(params, tmpl, 0.3, "uniform") == {"l0/kernel": round(0.7 * 64),
                                                          "l1/kernel": round(0.7 * 12)}


def test_unknown_distribution_is_an_error():
    params = _params([(3, 4)])
    with pytest.raises(ValueError, match="uniform, global, erk"):
        M.keep_counts(params, M.prunable_template(params), 0.5, "layerwise")


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", None])
def test_check_sparsity_rejects(bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        M.check_sparsity(bad)


@pytest.mark.parametrize("ok", [0, 0.0, 0.5, 0.999])
def test_check_sparsity_accepts(ok):
    M.check_sparsity(ok)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_masks_from_scores_rejects_bad_sparsity(bad):
    params = _params([(3, 4)])
    tmpl = M.prunable_template(params)
    with pytest.raises(ValueError, match="sparsity"):
        M.masks_from_scores(S.magnitude(params, tmpl), tmpl, bad)


# ---------------------------------------------------------------------------
# determinism, ties, NaN
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 5, 11, 12])
def test_topk_ties_keep_lowest_flat_indices(k):
    m = np.asarray(M.topk_mask(jnp.ones((3, 4)), k))
    expected = np.zeros(12)
    expected[:k] = 1
    np.testing.assert_array_equal(m.reshape(-1), expected)


def test_uniform_all_equal_scores_keep_first_entries():
    params = _params([(4, 5)])
    tmpl = M.prunable_template(params)
    scores = jax.tree.map(lambda t, p: None if t is None else jnp.full(p.shape, 0.5), tmpl, params,
                          is_leaf=lambda x: x is None)
    m = np.asarray(M.masks_from_scores(scores, tmpl, 0.35)["l0"]["kernel"]).reshape(-1)
    np.testing.assert_array_equal(m, (np.arange(20) < 13).astype(np.float32))


def test_global_all_equal_scores_keep_first_entries_in_leaf_order():
    params = _params([(2, 3), (2, 2)])
    tmpl = M.prunable_template(params)
    scores = jax.tree.map(lambda t, p: None if t is None else jnp.zeros(p.shape), tmpl, params,
                          is_leaf=lambda x: x is None)
    m = M.masks_from_scores(scores, tmpl, 0.5, "global")   # keeps 5 of 10: the first 5 of l0
    np.testing.assert_array_equal(np.asarray(m["l0"]["kernel"]).reshape(-1), [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(m["l1"]["kernel"]).reshape(-1), [0, 0, 0, 0])
    m = M.masks_from_scores(scores, tmpl, 0.2, "global")   # keeps 8 of 10: all of l0, first 2 of l1
    np.testing.assert_array_equal(np.asarray(m["l0"]["kernel"]), np.ones((2, 3)))
    np.testing.assert_array_equal(np.asarray(m["l1"]["kernel"]).reshape(-1), [1, 1, 0, 0])


@SETTINGS
@given(seed=st.integers(0, 2**16), s=st.floats(0.0, 0.99), dist=st.sampled_from(FREE_DISTRIBUTIONS))
def test_same_scores_same_mask(seed, s, dist):
    rng = np.random.default_rng(seed)
    # few distinct values: lots of ties
    params = {"a": {"kernel": jnp.asarray(rng.integers(0, 3, (8, 8)), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.integers(0, 3, (3, 4)), jnp.float32)}}
    tmpl = M.prunable_template(params)
    m1 = M.masks_from_scores(S.magnitude(params, tmpl), tmpl, s, dist)
    m2 = M.masks_from_scores(jax.tree.map(jnp.array, S.magnitude(params, tmpl)), tmpl, s, dist)
    chex.assert_trees_all_equal(m1, m2)


def test_topk_matches_numpy_stable_reference():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, 50).astype(np.float32)
    for k in (0, 7, 25, 50):
        order = np.argsort(-scores, kind="stable")
        expected = np.zeros(50, np.float32)
        expected[order[:k]] = 1
        np.testing.assert_array_equal(np.asarray(M.topk_mask(jnp.asarray(scores), k)), expected)


def test_topk_k_can_be_traced():
    f = jax.jit(M.topk_mask)
    x = jnp.arange(10.0)
    for k in (0, 3, 10):
        np.testing.assert_array_equal(np.asarray(f(x, jnp.asarray(k))), (np.arange(10) >= 10 - k).astype(float))


def test_nan_scores_rank_lowest():
    scores = jnp.asarray([np.nan, 1.0, -5.0, np.nan, 0.0, -np.inf])
    np.testing.assert_array_equal(np.asarray(M.topk_mask(scores, 3)), [0, 1, 1, 0, 1, 0])
    # every non-NaN entry, even -inf, outranks the NaNs; NaNs among themselves by index
    np.testing.assert_array_equal(np.asarray(M.topk_mask(scores, 4)), [0, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(M.topk_mask(scores, 5)), [1, 1, 1, 0, 1, 1])
    params = {"a": {"kernel": jnp.asarray([[np.nan, 2.0], [3.0, np.nan]])}}
    tmpl = M.prunable_template(params)
    for dist in ("uniform", "global", "erk"):
        m = M.masks_from_scores(params, tmpl, 0.5, dist)
        np.testing.assert_array_equal(np.asarray(m["a"]["kernel"]), [[0, 1], [1, 0]])


@pytest.mark.parametrize("dist", FREE_DISTRIBUTIONS)
def test_prev_masks_never_revive_even_when_live_scores_are_nan(dist):
    prev = {"a": {"kernel": jnp.asarray([[0.0, 1.0], [1.0, 1.0]])}}
    scores = {"a": {"kernel": jnp.asarray([[5.0, np.nan], [np.nan, -np.inf]])}}
    tmpl = M.prunable_template(scores)
    m = M.masks_from_scores(scores, tmpl, 0.25, dist, prev_masks=prev)
    np.testing.assert_array_equal(np.asarray(m["a"]["kernel"]), [[0, 1], [1, 1]])
    m = M.masks_from_scores(scores, tmpl, 0.5, dist, prev_masks=prev)
    # live NaN ties live -inf: the lower indices win; the pruned entry (score 5) stays pruned
    np.testing.assert_array_equal(np.asarray(m["a"]["kernel"]), [[0, 1], [1, 0]])


@SETTINGS
@given(seed=st.integers(0, 2**16), s1=st.floats(0.0, 0.9), ds=st.floats(0.0, 0.09),
       dist=st.sampled_from(FREE_DISTRIBUTIONS))
def test_prev_masks_never_revive(seed, s1, ds, dist):
    s2 = s1 + ds
    rng = np.random.default_rng(seed)
    params = _params([(8, 8), (3, 3, 2, 4)], seed)
    tmpl = M.prunable_template(params)
    prev = M.masks_from_scores(S.magnitude(params, tmpl), tmpl, s1, dist)
    # adversarial new scores: pruned entries get the highest scores
    new_scores = jax.tree.map(lambda m: None if m is None else
                              jnp.asarray(rng.uniform(size=m.shape), jnp.float32) + 10.0 * (1 - m),
                              prev, is_leaf=lambda x: x is None)
    new = M.masks_from_scores(new_scores, tmpl, s2, dist, prev_masks=prev)
    for (n, a), (_, b) in zip(M.named_leaves(prev), M.named_leaves(new)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(b <= a), n
    sizes = {"l0/kernel": 64, "l1/kernel": 72}
    counts = M.keep_counts(params, tmpl, s2, dist)
    kept = _kept(new)
    if dist == "global":
        assert sum(kept.values()) == counts["*"]
    else:
        assert kept == counts
    assert all(kept[n] <= sizes[n] for n in sizes)


# ---------------------------------------------------------------------------
# templates on real models
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


FIRST_LAST = {"mlp": ("layers/0/kernel", "head/kernel"),
              "cnn": ("convs/0/kernel", "head/kernel"),
              "resnet": ("stem/kernel", "head/kernel")}


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_template_prunes_only_kernels(models, name):
    fm, params, state = models[name]
    tmpl = M.prunable_template(params)
    names = dict(M.named_leaves(tmpl))
    all_names = [n for n, _ in M.named_leaves(params)]
    kernels = [n for n in all_names if n.endswith("/kernel")]
    assert sorted(names) == sorted(kernels)
    assert all(v is True for v in names.values())
    # biases, BatchNorm scale / bias are not prunable
    non_kernel = [n for n in all_names if not n.endswith("/kernel")]
    assert any(n.endswith("/bias") for n in non_kernel)
    if name != "mlp":
        assert any(n.endswith("/scale") for n in non_kernel)
    # BatchNorm running statistics are not prunable either
    assert M.named_leaves(M.prunable_template(state)) == []
    if name != "mlp":
        assert len(M.named_leaves(state)) > 0


def test_template_excludes_norm_and_embedding_names_even_when_2d():
    params = {"bn": {"scale": jnp.ones((4, 4)), "bias": jnp.ones((4, 4)), "mean": jnp.ones((4, 4)),
                     "var": jnp.ones((4, 4))},
              "tok_embed": {"kernel": jnp.ones((5, 4))},
              "emb": {"embedding": jnp.ones((5, 4))},
              "dense": {"kernel": jnp.ones((4, 4))}}
    assert [n for n, _ in M.named_leaves(M.prunable_template(params))] == ["dense/kernel"]


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_exclude_first_last_use_forward_order(models, name):
    fm, params, state = models[name]
    order = layer_order(fm, params, state)
    first, last = FIRST_LAST[name]
    assert order[0] == first and order[-1] == last
    if name != "cnn":  # here the forward order differs from the alphabetical (pytree) order
        assert sorted(order) != order
    all_k = {n for n, _ in M.named_leaves(M.prunable_template(params))}
    t_first = {n for n, _ in M.named_leaves(M.prunable_template(params, layer_order=order, exclude_first=True))}
    t_last = {n for n, _ in M.named_leaves(M.prunable_template(params, layer_order=order, exclude_last=True))}
    t_both = {n for n, _ in M.named_leaves(M.prunable_template(params, layer_order=order, exclude_first=True,
                                                                exclude_last=True))}
    assert t_first == all_k - {first}
    assert t_last == all_k - {last}
    assert t_both == all_k - {first, last}
    # excluded layers stay dense after pruning
    tmpl = M.prunable_template(params, layer_order=order, exclude_first=True, exclude_last=True)
    masks = M.masks_from_scores(S.magnitude(params, tmpl), tmpl, 0.9)
    pruned = dict(M.named_leaves(M.apply_masks(params, masks)))
    orig = dict(M.named_leaves(params))
    np.testing.assert_array_equal(np.asarray(pruned[first]), np.asarray(orig[first]))
    np.testing.assert_array_equal(np.asarray(pruned[last]), np.asarray(orig[last]))


def test_exclude_needs_layer_order_and_known_names(models):
    fm, params, state = models["mlp"]
    with pytest.raises(ValueError, match="layer order"):
        M.prunable_template(params, exclude_first=True)
    with pytest.raises(ValueError, match="not prunable"):
        M.prunable_template(params, exclude=["head/bias"])
    t = M.prunable_template(params, exclude=["layers/1/kernel"])
    assert "layers/1/kernel" not in dict(M.named_leaves(t))


def test_ones_like_template(models):
    fm, params, state = models["cnn"]
    tmpl = M.prunable_template(params)
    ones = M.ones_like_template(params, tmpl)
    for n, m in M.named_leaves(ones):
        assert np.all(np.asarray(m) == 1)
        assert m.shape == dict(M.named_leaves(params))[n].shape
    s_ones = M.ones_like_template(params, tmpl, structured=True)
    for n, m in M.named_leaves(s_ones):
        assert m.shape == dict(M.named_leaves(params))[n].shape[-1:]


# ---------------------------------------------------------------------------
# structured masks
# ---------------------------------------------------------------------------

def test_structured_masks_broadcast_over_output_units():
    params = _params([(3, 3, 2, 8), (5, 10)], seed=3)
    tmpl = M.prunable_template(params)
    sc = S.l1_structured(params, tmpl)
    masks = M.masks_from_scores(sc, tmpl, 0.5, params=params, structured=True)
    m0, m1 = np.asarray(masks["l0"]["kernel"]), np.asarray(masks["l1"]["kernel"])
    assert m0.shape == (8,) and m1.shape == (10,)
    assert m0.sum() == 4 and m1.sum() == 5
    # the units with the largest L1 norms are kept
    l1 = np.abs(np.asarray(params["l0"]["kernel"])).reshape(-1, 8).sum(0)
    assert set(np.flatnonzero(m0)) == set(np.argsort(-l1)[:4])
    out = M.apply_masks(params, masks)
    k0 = np.asarray(out["l0"]["kernel"])
    assert np.all(k0[..., m0 == 0] == 0)
    np.testing.assert_array_equal(k0[..., m0 == 1], np.asarray(params["l0"]["kernel"])[..., m0 == 1])
    k1 = np.asarray(out["l1"]["kernel"])
    assert np.all(k1[:, m1 == 0] == 0) and np.all(k1[:, m1 == 1] != 0)
    # biases untouched
    np.testing.assert_array_equal(np.asarray(out["l0"]["bias"]), np.asarray(params["l0"]["bias"]))
    # the summary counts every weight of a removed unit
    summ = M.sparsity_summary(params, masks)
    assert summ["layers"]["l0/kernel"]["kept"] == 3 * 3 * 2 * 4
    assert summ["layers"]["l0/kernel"]["structured"] is True
    assert summ["layers"]["l1/kernel"]["kept"] == 5 * 5
    assert summ["sparsity_prunable"] == pytest.approx(0.5)


def test_structured_keep_counts_use_output_units():
    params = _params([(3, 3, 2, 8), (5, 10)])
    tmpl = M.prunable_template(params)
    assert M.keep_counts(params, tmpl, 0.75, structured=True) == {"l0/kernel": 2, "l1/kernel": round(2.5)}
    # ERK for structured falls back to per-layer counts over units
    assert M.keep_counts(params, tmpl, 0.75, "erk", structured=True) == {"l0/kernel": 2, "l1/kernel": 2}


# ---------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------

def test_sparsity_summary_counts_and_flops():
    params = {"a": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones((5,))},
              "b": {"kernel": jnp.ones((5, 2)), "bias": jnp.ones((2,))}}
    ma = np.zeros((4, 5), np.float32)
    ma[0, :] = 1                 # 5 of 20 kept
    mb = np.ones((5, 2), np.float32)
    mb[0, 0] = 0                 # 9 of 10 kept
    masks = {"a": {"kernel": jnp.asarray(ma), "bias": None}, "b": {"kernel": jnp.asarray(mb), "bias": None}}
    flops = {"a/kernel": 100.0, "b/kernel": 50.0}
    s = M.sparsity_summary(params, masks, flops)
    assert s["params_total"] == 20 + 5 + 10 + 2
    assert s["params_kept"] == 5 + 5 + 9 + 2
    assert s["prunable_total"] == 30 and s["prunable_kept"] == 14
    assert s["sparsity_prunable"] == pytest.approx(16 / 30)
    assert s["sparsity_overall"] == pytest.approx(1 - 21 / 37)
    assert s["layers"]["a/kernel"] == {"size": 20, "kept": 5, "sparsity": 0.75, "structured": False,
                                       "flops": 100.0, "flops_kept": 25.0}
    assert s["layers"]["b/kernel"]["sparsity"] == pytest.approx(0.1)
    assert set(s["layers"]) == {"a/kernel", "b/kernel"}
    assert s["flops_total"] == 150.0
    assert s["flops_kept"] == pytest.approx(25.0 + 45.0)
    assert s["flops_fraction"] == pytest.approx(70.0 / 150.0)
    text = M.format_sparsity(s)
    assert "a/kernel" in text and "FLOPs remaining: 0.4667" in text


def test_sparsity_summary_on_model_flops(models):
    fm, params, state = models["cnn"]
    flops = count_flops(fm, params, state)
    tmpl = M.prunable_template(params)
    masks = M.masks_from_scores(S.magnitude(params, tmpl), tmpl, 0.75)
    s = M.sparsity_summary(params, masks, flops)
    kept_frac = {n: d["kept"] / d["size"] for n, d in s["layers"].items()}
    expected = sum(flops[n] * kept_frac[n] for n in flops) / sum(flops.values())
    assert s["flops_fraction"] == pytest.approx(expected)
    # a dense mask keeps all FLOPs and all params
    dense = M.sparsity_summary(params, M.ones_like_template(params, tmpl), flops)
    assert dense["flops_fraction"] == pytest.approx(1.0)
    assert dense["sparsity_overall"] == 0.0 and dense["sparsity_prunable"] == 0.0


def test_apply_masks_zeroes_exactly_and_keeps_dtype():
    params = {"a": {"kernel": jnp.arange(1.0, 7.0, dtype=jnp.bfloat16).reshape(2, 3), "bias": jnp.ones((3,))}}
    masks = {"a": {"kernel": jnp.asarray([[1, 0, 1], [0, 1, 0]], jnp.float32), "bias": None}}
    out = M.apply_masks(params, masks)
    assert out["a"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"], np.float32), [[1, 0, 3], [0, 5, 0]])
    assert out["a"]["bias"] is params["a"]["bias"]


def test_leaf_name_and_map_named():
    tree = {"layers": [{"kernel": jnp.ones((2, 2))}], "x": None}
    assert [n for n, _ in M.named_leaves(tree)] == ["layers/0/kernel"]
    out = M.map_named(lambda n, v: n, tree)
    assert out == {"layers": [{"kernel": "layers/0/kernel"}], "x": None}


def test_nm_masks_keep_the_best_n_of_every_m_inputs():
    """2:4 / 4:8 / 1:4: every group of M consecutive entries along a kernel's input axis keeps exactly its N
    highest scores (ties to the lower index, NaN last), so the sparsity is exactly 1 - N/M; a kernel whose
    input axis is not a multiple of M is pruned unstructured at the same density."""
    from fairprune_jax.sparsity.masks import keep_counts, masks_from_scores, nm_layers, nm_mask

    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 3, 8, 5)).astype(np.float32)
    s[0, 0, :4, 0] = [1.0, 1.0, 1.0, 0.5]                       # a tie: the lower index wins
    s[0, 1, :4, 1] = [np.nan, 2.0, np.nan, np.nan]              # NaN ranks last
    for dist, n, m in (("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)):
        got = np.asarray(nm_mask(jnp.asarray(s), n, m))
        groups = np.moveaxis(s, -2, -1).reshape(3, 3, 5, 8 // m, m)
        want = np.zeros_like(groups)
        for idx in np.ndindex(groups.shape[:-1]):
            key = [(np.isnan(v), -(0.0 if np.isnan(v) else v), j) for j, v in enumerate(groups[idx])]
            for _, _, j in sorted(key)[:n]:
                want[idx + (j,)] = 1.0
        np.testing.assert_array_equal(got, np.moveaxis(want.reshape(3, 3, 5, 8), -1, -2))
    assert np.asarray(nm_mask(jnp.asarray(s), 2, 4))[0, 0, :4, 0].tolist() == [1, 1, 0, 0]
    assert np.asarray(nm_mask(jnp.asarray(s), 2, 4))[0, 1, :4, 1].tolist() == [1, 1, 0, 0]
    params = {"a": {"kernel": jnp.asarray(s)}, "b": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}}
    template = {"a": {"kernel": True}, "b": {"kernel": True}}
    mk = masks_from_scores(jax.tree.map(jnp.abs, params), template, 0.5, "2:4")
    assert nm_layers(params, template, "2:4") == {"a/kernel": True, "b/kernel": False}
    assert float(np.mean(mk["a"]["kernel"])) == 0.5 and float(np.mean(mk["b"]["kernel"])) == 0.5
    # a gradual schedule: unstructured below 1 - N/M, N:M at the end; earlier pruned entries rank last
    early = masks_from_scores(jax.tree.map(jnp.abs, params), template, 0.3, "2:4")
    final = masks_from_scores(jax.tree.map(jnp.abs, params), template, 0.5, "2:4", prev_masks=early)
    grouped = np.moveaxis(np.asarray(final["a"]["kernel"]), -2, -1).reshape(3, 3, 5, 2, 4).sum(-1)
    assert np.all(grouped == 2)
    alive = np.asarray(early["a"]["kernel"]) > 0
    g_alive = np.moveaxis(alive, -2, -1).reshape(3, 3, 5, 2, 4).sum(-1)
    revived = (np.asarray(final["a"]["kernel"]) > 0) & ~alive
    assert np.all(np.moveaxis(revived, -2, -1).reshape(3, 3, 5, 2, 4).sum(-1) == np.maximum(2 - g_alive, 0))
    with pytest.raises(ValueError, match="sparsity of exactly 0.5"):
        keep_counts(params, template, 0.9, "2:4")
    with pytest.raises(ValueError, match="structured"):
        keep_counts(params, template, 0.5, "2:4", structured=True)


def test_nm_distribution_in_a_pruner_and_a_run_config():
    from fairprune_jax.core.config import RunConfig
    from fairprune_jax.running.validation import validate_config
    from fairprune_jax.sparsity import pruning

    params = {"l": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}}
    tx = pruning.Pruner(sparsity=0.5, distribution="2:4",
                        schedule=pruning.cubic(4, frequency=1)).wrap_optax(optax.sgd(0.1))
    st = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(5):
        _, st = update(jax.tree.map(jnp.ones_like, params), st, params)
    m = np.asarray(pruning.find_state(st).masks["l"]["kernel"])
    assert np.all(m.T.reshape(8, 4, 4).sum(-1) == 2)
    with pytest.raises(ValueError, match="2:4 keeps 2 of every 4 weights"):          # when the pruner is made
        pruning.Pruner(sparsity=0.75, distribution="2:4")
    with pytest.raises(ValueError, match="magnitude: 2:4 keeps 2 of every 4 weights"):
        validate_config(RunConfig(dataset="digits", method="magnitude", sparsity=0.9, distribution="2:4"))
    with pytest.raises(ValueError, match="structured"):
        validate_config(RunConfig(dataset="digits", method="structured_magnitude", sparsity=0.5, distribution="2:4"))


def test_methods_that_pick_weights_by_their_own_rule_refuse_nm_before_any_work():
    """fairgrape (group-importance shares per layer) and ballot's authors variant (the paper's own count) cannot
    follow 2:4: refused when the run is validated, not silently unstructured; ballot's own variant can."""
    from fairprune_jax.core.config import RunConfig
    from fairprune_jax.running.validation import validate_config

    for method, opts, word in (("fairgrape", {}, "group-importance"), ("ballot", {"variant": "authors"}, "authors")):
        with pytest.raises(ValueError, match=f"needs masks chosen by an N:M pattern, but .*{word}"):
            validate_config(RunConfig(dataset="digits", method=method, sparsity=0.5, distribution="2:4",
                                      method_options=opts))
    validate_config(RunConfig(dataset="digits", method="ballot", sparsity=0.5, distribution="2:4"))
    validate_config(RunConfig(dataset="digits", method="nft", sparsity=0.5, distribution="2:4"))


def test_a_gradual_method_ends_on_exact_nm_masks():
    """gmp through prune() with distribution 2:4: every group of 4 inputs of every pruned kernel keeps 2."""
    import warnings
    from flax import nnx
    import fairprune_jax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    g, y = rng.integers(0, 2, 300).astype(np.int32), (x[:, 0] > 0).astype(np.int32)
    model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(32, 2, rngs=nnx.Rngs(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fairprune_jax.prune(model, train=(x, y, g), method="gmp", sparsity=0.5, epochs=1, finetune_epochs=1,
                                  config={"distribution": "2:4"}, progress=False)
    kernels = [np.asarray(m) for _, m in M.named_leaves(res.masks)]
    assert len(kernels) == 2
    for m in kernels:
        assert np.all(np.moveaxis(m, -2, -1).reshape(m.shape[1], -1, 4).sum(-1) == 2)


def test_nnx_state_params_have_the_pure_dict_names_and_keep_biases_dense():
    """An nnx.State of params (an nnx.Optimizer loop) flattens to paths ending in '.value'; the names leave it
    out, so the name rules hold (the attention's 2-D biases stay dense) and masks match prune()'s names."""
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(50, 16, rngs=rngs)
            self.att = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False, rngs=rngs)
            self.out = nnx.Linear(16, 2, rngs=rngs)

    state = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
    as_state = [n for n, _ in M.named_leaves(M.prunable_template(state))]
    as_dict = [n for n, _ in M.named_leaves(M.prunable_template(nnx.to_pure_dict(state)))]
    assert as_state == as_dict and "att/query/kernel" in as_state
    assert not any(n.endswith("/bias") or n.endswith("/value") for n in as_state)


def test_weight_matrices_kept_dense_by_name_are_said_before_training():
    """A layer named like an embedding is kept dense; when it holds a large share of the weight matrices the
    run says so (the model as a whole is far less sparse than the target), and not for a small one."""
    big = {"embed": {"kernel": jnp.ones((20, 256))}, "out": {"kernel": jnp.ones((256, 2))},
           "norm": {"scale": jnp.ones((4, 4))}}
    note = M.dense_by_name_note(big, 0.9)
    assert note and "embed/kernel (5,120 weights)" in note and "91%" in note and "about 8% sparse" in note
    assert M.dense_by_name_note(big, 0.0) is None
    small = {"tok_embed": {"kernel": jnp.ones((5, 4))}, "dense": {"kernel": jnp.ones((64, 64))}}
    assert M.dense_by_name_note(small, 0.9) is None
