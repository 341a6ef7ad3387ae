"""``nnx.MultiHeadAttention`` in a user's module: whole heads are one unit group (query, key and value columns of
a head with the output projection's rows of it), pruned and compacted to a module with fewer heads; masks come
back in the module's own shapes; what cannot lose whole heads is refused by name."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fairprune_jax
from fairprune_jax.models.views import from_view, linear_general_views, to_view
from fairprune_jax.running.api import wrap_model
from fairprune_jax.sparsity import compact, coupling
from fairprune_jax.sparsity.masks import named_leaves


class Block(nnx.Module):
    """A projection, a pre-norm attention block with a residual (4 heads of 8 dims, qkv wider than the stream)."""

    def __init__(self, rngs: nnx.Rngs, num_kv_heads: int | None = None, normalize_qk: bool = False):
        self.inp = nnx.Linear(3, 24, rngs=rngs)
        self.ln = nnx.LayerNorm(24, rngs=rngs)
        self.att = nnx.MultiHeadAttention(num_heads=4, num_kv_heads=num_kv_heads, in_features=24, qkv_features=32,
                                          out_features=24, decode=False, normalize_qk=normalize_qk, rngs=rngs)
        self.head = nnx.Linear(24, 3, rngs=rngs)

    def __call__(self, x):
        h = self.inp(x)
        h = h + self.att(self.ln(h))
        return self.head(h.mean(axis=1))


def _data(n=240, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 3)).astype(np.float32)
    g = rng.integers(0, 2, n)
    y = np.digitize(x[:, :, 0].mean(1) + 0.3 * x[:, :, 1].max(1), [-0.2, 0.4]).astype(np.int32)
    return x, y, g


def test_the_heads_of_multi_head_attention_are_one_traced_group():
    fm, p, s = wrap_model(Block(nnx.Rngs(0)), (6, 3), 3)
    heads = [g for g in coupling.coupled_groups(fm, p, s).groups if "att/query/kernel" in (g.kernel, *g.producers)]
    assert len(heads) == 1
    g = heads[0]
    assert (g.units, g.inner) == (4, 8)
    assert {g.kernel, *g.producers} == {"att/query/kernel", "att/key/kernel", "att/value/kernel"}
    assert set(g.companions) == {"att/query/bias", "att/key/bias", "att/value/bias"}
    assert g.consumers == ("att/out/kernel",)


def test_views_round_trip_and_unit_masks_take_the_trailing_shape():
    m = Block(nnx.Rngs(0))
    views = dict((n, (t, s)) for n, t, s in linear_general_views(m))
    assert views["att/query/kernel"] == ((24, 4, 8), 1) and views["att/out/kernel"] == ((4, 8, 24), 2)
    assert views["att/query/bias"] == ((4, 8), 0)
    fm, p, _ = wrap_model(m, (6, 3), 3)
    assert p["att"]["query"]["kernel"].shape == (24, 32) and p["att"]["out"]["kernel"].shape == (32, 24)
    back = from_view(p, fm.views)
    np.testing.assert_array_equal(back["att"]["query"]["kernel"], m.att.query.kernel[...])
    unit = {"att": {"query": {"kernel": np.ones(32)}}}
    assert from_view(unit, fm.views)["att"]["query"]["kernel"].shape == (4, 8)
    assert to_view(from_view(unit, fm.views), fm.views)["att"]["query"]["kernel"].shape == (32,)


@pytest.mark.parametrize("method, kw", [("structured_magnitude", {}), ("bifp", {}),
                                        ("structured_magnitude", {"normalize_qk": True})])
def test_pruned_heads_compact_to_fewer_heads_with_the_same_logits(method, kw, tmp_path):
    """normalize_qk: a LayerNorm over each head's query / key dims stays inside the head, which goes whole (it was
    refused as 'reduced over its channels')."""
    x, y, g = _data()
    res = fairprune_jax.prune(Block(nnx.Rngs(0), **kw), train=(x, y, g), method=method, sparsity=0.5, epochs=1,
                              finetune_epochs=1, progress=False)
    params = nnx.to_pure_dict(nnx.state(res.model, nnx.Param))
    for name, m in named_leaves(res.masks):          # the module's own shapes: masks broadcast on their params
        p = np.asarray(compact.get_leaf(params, name))
        assert np.broadcast_shapes(np.shape(m), p.shape) == p.shape, name
        assert np.all(p * np.asarray(m) == p), name   # pruned entries are exactly 0
    qmask = np.asarray(res.masks["att"]["query"]["kernel"])
    assert qmask.shape == (4, 8) and np.all(qmask == qmask[:, :1])      # whole heads
    kept = int(qmask[:, 0].sum())
    assert 0 < kept < 4
    small = res.compact(x[:16])
    assert small.att.num_heads == kept and small.att.head_dim == 8
    assert small.att.query.kernel[...].shape == (24, kept, 8) and small.att.out.kernel[...].shape == (kept, 8, 24)
    res.model.eval()
    small.eval()
    want = np.asarray(res.model(jnp.asarray(x[:64])))
    np.testing.assert_allclose(np.asarray(small(jnp.asarray(x[:64]))), want, atol=1e-5)
    compact.save_module(small, tmp_path / "small")
    again = compact.load_module(tmp_path / "small", like=Block(nnx.Rngs(1), **kw))
    again.eval()
    assert again.att.num_heads == kept
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(x[:64]))), want, atol=1e-5)


def test_unstructured_masks_of_an_attention_model_have_its_shapes():
    x, y, g = _data()
    res = fairprune_jax.prune(Block(nnx.Rngs(0)), train=(x, y, g), method="magnitude", sparsity=0.7, epochs=1,
                              finetune_epochs=1, progress=False)
    k = np.asarray(res.model.att.query.kernel[...])
    m = np.asarray(res.masks["att"]["query"]["kernel"])
    assert m.shape == k.shape == (24, 4, 8)
    assert np.all(k[m == 0] == 0)


def test_grouped_query_attention_loses_a_key_value_head_with_the_query_heads_it_serves():
    """Under grouped-query attention (4 query heads, 2 key / value heads) a unit is a key / value head: its key
    and value columns (8 positions each) go with the 2 query heads it serves (16 query columns) and their 16
    rows of the output projection; the compacted module has num_kv_heads and num_heads halved."""
    fm, p, s = wrap_model(Block(nnx.Rngs(0), num_kv_heads=2), (6, 3), 3)
    [g] = [g for g in coupling.coupled_groups(fm, p, s).groups if "att/query/kernel" in (g.kernel, *g.producers)]
    assert g.units == 2 and {g.kernel, *g.producers} == {"att/query/kernel", "att/key/kernel", "att/value/kernel"}
    assert {n: g.inner_of(n) for n in ("att/key/kernel", "att/value/kernel", "att/query/kernel",
                                       "att/query/bias", "att/out/kernel")} == {
        "att/key/kernel": 8, "att/value/kernel": 8, "att/query/kernel": 16, "att/query/bias": 16,
        "att/out/kernel": 16}
    x, y, gr = _data()      # bifp: the units' scores (init_scores) and its consumer-side mask gradient
    res = fairprune_jax.prune(Block(nnx.Rngs(0), num_kv_heads=2), train=(x, y, gr), method="bifp",
                              sparsity=0.5, epochs=1, finetune_epochs=1, progress=False)
    qm, km = (np.asarray(res.masks["att"][k]["kernel"]) for k in ("query", "key"))
    assert qm.shape == (4, 8) and km.shape == (2, 8)
    assert np.array_equal(qm[:, 0], np.repeat(km[:, 0], 2))    # a query head goes with its key / value head
    assert km[:, 0].sum() == 1
    small = res.compact(x[:16])
    assert (small.att.num_heads, small.att.num_kv_heads, small.att.head_dim) == (2, 1, 8)
    assert small.att.key.kernel[...].shape == (24, 1, 8) and small.att.out.kernel[...].shape == (2, 8, 24)
    res.model.eval()
    small.eval()
    np.testing.assert_allclose(np.asarray(small(jnp.asarray(x[:64]))), np.asarray(res.model(jnp.asarray(x[:64]))),
                               atol=1e-5)


def test_attention_projections_cost_their_positions_in_the_flop_count():
    """Each projection runs at every sequence position: 24 x 32 multiply-accumulates at each of 6 positions (the
    heads are output features of the LinearGeneral, not positions)."""
    from fairprune_jax.models import count_flops, layer_order
    fm, p, s = wrap_model(Block(nnx.Rngs(0)), (6, 3), 3)
    flops = count_flops(fm, p, s)
    assert flops["att/query/kernel"] == flops["att/out/kernel"] == 24 * 32 * 6
    assert flops["inp/kernel"] == 3 * 24 * 6 and flops["head/kernel"] == 24 * 3
    assert layer_order(fm, p, s)[0] == "inp/kernel" and layer_order(fm, p, s)[-1] == "head/kernel"
