"""Coupled unit groups traced from the jaxpr of the forward pass (``sparsity/coupling.py``): one test per traced
operation kind, a partly pruned group refused, and on ResNet-18, MobileNet-V2 and a ViT structured magnitude
masks at 50% whose masked model equals the model with the pruned units sliced away."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fairprune_jax.models import count_flops
from fairprune_jax.running.api import wrap_model
from fairprune_jax.sparsity import compact, coupling, units
from fairprune_jax.sparsity.masks import apply_masks, map_named, named_leaves, prunable_template
from fairprune_jax.techniques import bilevel


def groups_of(module, shape, classes=2):
    fm, params, state = wrap_model(module, shape, classes)
    found = coupling.coupled_groups(fm, params, state)
    return fm, params, state, {g.kernel: g for g in found.groups}, found.refused


class Residual(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.conv1 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(6, 4, (3, 3), rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem(x))
        h = h + self.conv2(nnx.relu(self.conv1(h)))
        return self.out(nnx.relu(h).mean(axis=(1, 2)))


def test_a_residual_addition_ties_the_producers_of_both_branches():
    _, _, _, groups, _ = groups_of(Residual(nnx.Rngs(0)), (6, 6, 1))
    assert set(groups) == {"stem/kernel", "conv1/kernel"}
    g = groups["stem/kernel"]
    assert g.producers == ("conv2/kernel",) and set(g.companions) == {"stem/bias", "conv2/bias"}
    assert set(g.consumers) == {"conv1/kernel", "out/kernel"}
    assert groups["conv1/kernel"].consumers == ("conv2/kernel",) and groups["conv1/kernel"].units == 6


class Depthwise(nnx.Module):
    def __init__(self, rngs, impl):
        self.expand = nnx.Conv(1, 6, (1, 1), use_bias=False, rngs=rngs)
        self.dw = nnx.Conv(6, 6, (3, 3), feature_group_count=6, use_bias=False, padding="SAME",
                           conv_general_dilated=impl, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.project = nnx.Conv(6, 3, (1, 1), rngs=rngs)
        self.out = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x, train: bool = False):
        h = nnx.relu(self.bn(self.dw(self.expand(x)), use_running_average=not train))
        return self.out(self.project(h).mean(axis=(1, 2)))


@pytest.mark.parametrize("impl", ["grouped", "shifted"])
def test_a_depthwise_convolution_ties_its_input_and_output_channels(impl):
    from fairprune_jax.models.nets import depthwise_impl
    _, _, _, groups, _ = groups_of(Depthwise(nnx.Rngs(0), depthwise_impl(impl)), (5, 5, 1))
    g = groups["expand/kernel"]
    assert g.companions == ("dw/kernel", "bn/scale", "bn/bias") and g.stats == ("bn/mean", "bn/var")
    assert g.consumers == ("project/kernel",) and g.producers == ()
    assert "dw/kernel" not in groups                          # the depthwise kernel produces no units of its own


class Norms(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)
        self.mid = nnx.Linear(8, 5, rngs=rngs)
        self.out = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x, train: bool = False):
        h = nnx.relu(self.bn(self.conv(x), use_running_average=not train)).mean(axis=(1, 2))
        return self.out(nnx.relu(self.mid(nnx.relu(self.ln(self.hidden(h))))))


def test_norm_parameters_are_companions_and_a_layernorm_refuses_its_channels():
    _, _, _, groups, refused = groups_of(Norms(nnx.Rngs(0)), (4, 4, 1))
    g = groups["conv/kernel"]
    assert g.companions == ("conv/bias", "bn/scale", "bn/bias") and g.stats == ("bn/mean", "bn/var")
    assert g.consumers == ("hidden/kernel",)
    assert "hidden/kernel" not in groups and "mid/kernel" in groups
    assert "channel space of hidden" in refused["hidden"] and "'reduce_sum'" in refused["hidden"]


def test_a_linear_then_layernorm_model_is_not_refused_by_bifp():
    """The LayerNorm's channels are left whole; the other units are pruned, with a consumer for BiFP's default
    ``mask_grad='consumer'``."""
    from fairprune_jax.core.config import RunConfig
    from fairprune_jax.running.api import with_units
    fm, params, state = with_units(wrap_model(Norms(nnx.Rngs(0)), (4, 4, 1), 2), None, RunConfig(method="bifp"),
                                   consumers=True)
    assert {g.kernel for g in fm.unit_groups} == {"conv/kernel", "mid/kernel"}


class Flat(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 3, (3, 3), rngs=rngs)
        self.out = nnx.Linear(3 * 4 * 4, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.conv(x)).reshape(len(x), -1))


def test_a_flatten_makes_the_consumer_rows_r_mod_units():
    _, _, _, groups, _ = groups_of(Flat(nnx.Rngs(0)), (4, 4, 1))
    g = groups["conv/kernel"]
    assert g.consumers == ("out/kernel",) and g.units == 3 and g.inner == 1
    np.testing.assert_array_equal(units.unit_index(g, 48, np.array([1.0, 0.0, 1.0])), np.tile([1.0, 0.0, 1.0], 16))


class Concat(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Conv(1, 3, (3, 3), rngs=rngs)
        self.b = nnx.Conv(1, 2, (3, 3), rngs=rngs)
        self.c = nnx.Conv(5, 4, (3, 3), rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.concatenate([nnx.relu(self.a(x)), nnx.relu(self.b(x))], axis=-1)
        return self.out(nnx.relu(self.c(h)).mean(axis=(1, 2)))


def test_a_concatenation_splits_its_readers_into_segments_of_its_inputs():
    _, _, _, groups, refused = groups_of(Concat(nnx.Rngs(0)), (4, 4, 1))
    assert set(groups) == {"a/kernel", "b/kernel", "c/kernel"} and set(refused) == {"out"}   # out: the logits
    a, b = groups["a/kernel"], groups["b/kernel"]
    assert a.consumers == b.consumers == ("c/kernel",)
    assert a.segments == (("c/kernel", 0, 3),) and b.segments == (("c/kernel", 3, 5),)
    np.testing.assert_array_equal(units.spread(b, "c/kernel", 5, np.array([0.0, 1.0])), [1, 1, 1, 0, 1])


class DenseBlock(nnx.Module):
    """DenseNet's pattern: the block's input and its new features concatenated, a BatchNorm over the
    concatenation, a convolution reading it; the input image concatenated too (never pruned)."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(1, 4, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(4, rngs=rngs)
        self.grow = nnx.Conv(4, 3, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.conv = nnx.Conv(8, 5, (3, 3), rngs=rngs)
        self.out = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x, train: bool = False):
        h = nnx.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        h = jnp.concatenate([h, x, nnx.relu(self.grow(h))], axis=-1)
        h = nnx.relu(self.bn(h, use_running_average=not train))
        return self.out(nnx.relu(self.conv(h)).mean(axis=(1, 2)))


def test_a_norm_over_a_concatenation_is_masked_and_sliced_by_segment():
    fm, params, state, groups, refused = groups_of(DenseBlock(nnx.Rngs(0)), (6, 6, 1))
    assert set(groups) == {"stem/kernel", "grow/kernel", "conv/kernel"}
    stem, grow = groups["stem/kernel"], groups["grow/kernel"]
    assert set(stem.companions) == {"stem_bn/scale", "stem_bn/bias", "bn/scale", "bn/bias"}
    assert set(stem.consumers) == {"grow/kernel", "conv/kernel"}
    assert set(stem.segments) == {("bn/scale", 0, 4), ("bn/bias", 0, 4), ("bn/mean", 0, 4), ("bn/var", 0, 4),
                                  ("conv/kernel", 0, 4)}
    assert set(grow.segments) == {(n, 5, 8) for n in ("bn/scale", "bn/bias", "bn/mean", "bn/var", "conv/kernel")}
    assert set(refused) == {"out"}                      # position 4 of the concatenation is the image: no group
    gl = list(groups.values())
    unit = map_named(lambda n, v: {"stem/kernel": jnp.asarray([1.0, 0.0, 1.0, 0.0]),
                                   "grow/kernel": jnp.asarray([0.0, 1.0, 1.0])}.get(n), params)
    masks = units.expand_unit_masks(unit, gl, params)
    np.testing.assert_array_equal(np.asarray(dict(named_leaves(masks))["bn/scale"]), [1, 0, 1, 0, 1, 0, 1, 1])
    units.check_structured(masks, params, gl)
    broken = map_named(lambda n, m: jnp.ones(8) if n == "bn/bias" else m, masks)
    with pytest.raises(ValueError, match="differs from the mask of its kernels"):
        units.check_structured(broken, params, gl)
    x = jax.random.normal(jax.random.key(3), (4, 6, 6, 1))
    rng = np.random.default_rng(0)
    state = map_named(lambda n, v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape) if n.endswith("var")
                                               else rng.normal(size=v.shape), jnp.float32), state)
    masked = fm.apply(apply_masks(params, masks), state, x)[0]
    small_fm, small_p, small_s = compact.slice_groups(fm, params, state, masks, gl)
    assert dict(named_leaves(small_p))["bn/scale"].shape == (5,)        # 2 + 1 (image) + 2 of 8 kept
    assert dict(named_leaves(small_p))["conv/kernel"].shape[-2] == 5
    np.testing.assert_allclose(np.asarray(small_fm.apply(small_p, small_s, x)[0]), np.asarray(masked),
                               rtol=1e-5, atol=1e-5)


class NormedConcat(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(3, 4, rngs=rngs)
        self.b = nnx.Linear(3, 2, rngs=rngs)
        self.ln = nnx.LayerNorm(6, rngs=rngs)
        self.out = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.ln(jnp.concatenate([self.a(x), self.b(x)], axis=-1)))


class FlatConcat(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Conv(1, 2, (3, 3), rngs=rngs)
        self.b = nnx.Conv(1, 3, (3, 3), rngs=rngs)
        self.out = nnx.Linear(4 * 4 * 5, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.concatenate([self.a(x), self.b(x)], axis=-1)
        return self.out(h.reshape(h.shape[0], -1))


def test_a_concatenation_that_is_normalised_or_flattened_refuses_every_input_with_its_reason():
    _, _, _, groups, refused = groups_of(NormedConcat(nnx.Rngs(0)), (3,))
    assert groups == {} and "'reduce_sum'" in refused["a"] and "'reduce_sum'" in refused["b"]
    _, _, _, groups, refused = groups_of(FlatConcat(nnx.Rngs(0)), (4, 4, 1))
    assert groups == {} and "concatenation regrouped by a reshape" in refused["a"]
    assert "concatenation regrouped by a reshape" in refused["b"]


class Cumsum(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(3, 4, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.cumsum(self.a(x), axis=-1))


def test_an_operation_the_tracer_does_not_know_is_named():
    _, _, _, groups, refused = groups_of(Cumsum(nnx.Rngs(0)), (3,))
    assert groups == {}
    assert refused["a"] == "channel space of a reaches 'cumsum', which fairprune cannot trace"


class ChannelConstant(nnx.Module):
    """Adds a constant per channel that is 0 at channel 0 only: a removed channel reads nonzero downstream."""

    def __init__(self, rngs):
        self.a = nnx.Linear(3, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.a(x) + jnp.arange(8.0)))


def test_the_numerical_check_removes_more_than_unit_0():
    """It removed unit 0 only, so this model's group passed the check and failed at compaction."""
    _, _, _, groups, refused = groups_of(ChannelConstant(nnx.Rngs(0)), (3,))
    assert "a/kernel" not in groups and "is not zero where its consumers read it" in refused["a"]


def test_attention_heads_and_mlp_units_of_a_vit():
    fm, params, state = zoo_model("vit", (8, 8, 3), dim=16, depth=1, heads=4, mlp=24, patch=4)
    found = coupling.coupled_groups(fm, params, state)
    groups = {g.kernel: g for g in found.groups}
    heads = groups["blocks/0/query/kernel"]
    assert (heads.units, heads.inner) == (4, 4)                 # whole heads of 4 dims
    assert heads.producers == ("blocks/0/key/kernel", "blocks/0/value/kernel")
    assert heads.consumers == ("blocks/0/out/kernel",)
    mlp = groups["blocks/0/fc1/kernel"]
    assert (mlp.units, mlp.inner, mlp.consumers) == (24, 1, ("blocks/0/fc2/kernel",))
    assert set(groups) == {"blocks/0/query/kernel", "blocks/0/fc1/kernel"}
    assert "'reduce_sum'" in found.refused["embed"]             # the residual stream goes through LayerNorms
    np.testing.assert_array_equal(units.unit_index(heads, 16, np.array([1.0, 0.0, 1.0, 1.0])),
                                  np.repeat([1.0, 0.0, 1.0, 1.0], 4))


def test_a_coupled_group_pruned_partly_is_refused():
    fm, params, state, groups, _ = groups_of(Residual(nnx.Rngs(0)), (6, 6, 1))
    g = groups["stem/kernel"]
    unit = map_named(lambda n, v: jnp.asarray([1.0, 0.0, 1.0, 1.0]) if n == g.kernel else None, params)
    masks = units.expand_unit_masks(unit, [g], params)
    units.check_structured(masks, params, [g])                  # the whole group: fine
    out_of_step = map_named(lambda n, m: jnp.asarray([1.0, 1.0, 0.0, 1.0]) if n == "conv2/kernel" else m, masks)
    with pytest.raises(ValueError, match="differs from the mask of its kernel"):
        units.check_structured(out_of_step, params, [g])
    only_stem = map_named(lambda n, m: None if n.startswith("conv2/") else m, masks)
    with pytest.raises(ValueError, match="coupled with conv2/kernel"):
        units.check_structured(only_stem, params, [g])


def zoo_model(name, shape, **kw):
    """A zoo model built abstractly and filled with random values (eager initialisation of MobileNet-V2 takes
    seconds on two cores); norm scales, offsets and statistics random too, so a missing member would show."""
    from fairprune_jax.models import MODELS, FunctionalModel
    module = nnx.eval_shape(lambda: MODELS[name](shape[-1], 3, rngs=nnx.Rngs(0), **kw))
    graphdef, params, state = nnx.split(module, nnx.Param, ...)
    rng = np.random.default_rng(1)

    def one(n, v):
        x = rng.normal(size=v.shape).astype(np.float32)
        if len(v.shape) > 1:
            return jnp.asarray(x / np.sqrt(np.prod(v.shape[:-1])))
        return jnp.asarray(np.abs(x) + 0.5 if n.endswith(("scale", "var")) else x)
    return (FunctionalModel(name, graphdef, shape, 3), map_named(one, nnx.to_pure_dict(params)),
            map_named(one, nnx.to_pure_dict(state)))


@pytest.mark.parametrize("name,shape,kw", [
    ("resnet18", (16, 16, 3), dict(width=8, stem="cifar")),
    ("mobilenet_v2", (16, 16, 3), dict(width=0.25, stem_stride=1)),
    ("vit", (16, 16, 3), dict(dim=32, depth=2, heads=4, mlp=48, patch=4)),
])
def test_structured_magnitude_masks_equal_the_sliced_model(name, shape, kw):
    fm, params, state = zoo_model(name, shape, **kw)
    groups = units.model_unit_groups(fm, params, state)
    assert len(groups) >= 3
    template = units.structured_template(groups, prunable_template(params))
    counts = bilevel.unit_keep_counts(params, template, 0.5, "uniform", True, groups)
    masks = jax.jit(lambda p: bilevel.full_masks(
        bilevel.binarize(bilevel.init_scores(p, template, True, groups), counts), p, groups))(params)
    kept = units.check_structured(masks, params, groups)
    assert all(int(v.sum()) == counts[k] for k, v in kept.items())
    x = jax.random.normal(jax.random.key(3), (4,) + shape)
    masked = jax.jit(lambda p: fm.apply(p, state, x)[0])(apply_masks(params, masks))
    small_fm, small_p, small_s = compact.slice_groups(fm, params, state, masks, groups)
    sliced = jax.jit(lambda p, s: small_fm.apply(p, s, x)[0])(small_p, small_s)
    assert float(jnp.max(jnp.abs(masked - sliced))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(masked))))
    size = lambda t: sum(int(np.size(v)) for _, v in named_leaves(t))  # noqa: E731
    assert size(small_p) < size(params) - sum(counts.values())      # at least one weight per pruned unit
    # the compacted size, counted from the masks and groups without slicing, is the sliced model's
    flops = count_flops(fm, params, state)
    phys = units.physical_counts(params, masks, groups, flops)
    assert phys["params_kept"] == size(small_p) and phys["params_total"] == size(params)
    small_flops = sum(count_flops(small_fm, small_p, small_s).values())
    assert phys["flops_fraction"] == pytest.approx(small_flops / sum(flops.values()), rel=1e-9)


@pytest.mark.parametrize("model", ["residual", "dense_block", "vit"])
def test_bifp_mask_gradients_through_coupled_groups_are_autodiff(model):
    """Consumer side: the consumer-scaled model is the producer-masked one and ``consumer_mask_grad`` is the
    derivative in a continuous unit mask; producer side: ``implicit_mask_grad`` (gamma -> inf) is the derivative
    through every member (both branches of a residual, q / k / v of a head)."""
    if model in ("residual", "dense_block"):
        fm, params, state = wrap_model((Residual if model == "residual" else DenseBlock)(nnx.Rngs(0)), (6, 6, 1), 2)
        shape = (6, 6, 1)
    else:
        shape = (8, 8, 3)
        fm, params, state = zoo_model("vit", shape, dim=16, depth=1, heads=4, mlp=24, patch=4)
    groups = units.traced_unit_groups(fm, params, state) if model != "vit" else \
        units.model_unit_groups(fm, params, state)
    x = jax.random.normal(jax.random.key(0), (8,) + shape)
    y = jnp.arange(8) % 2

    def loss_of(z):
        logits = fm.apply(z, state, x)[0]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), y])
    rng = np.random.default_rng(0)
    unit = {g.kernel: jnp.asarray((rng.random(units.group_units(g, params)) > 0.4).astype(np.float32))
            for g in groups}
    unit_tree = map_named(lambda n, v: unit.get(n), params)
    masks = units.expand_unit_masks(unit_tree, groups, params)
    np.testing.assert_allclose(float(loss_of(bilevel.consumer_scaled(params, unit_tree, groups))),
                               float(loss_of(apply_masks(params, masks))), rtol=1e-5)
    g_c = jax.grad(loss_of)(bilevel.consumer_scaled(params, unit_tree, groups))
    ours = dict(named_leaves(bilevel.consumer_mask_grad(params, g_c, unit_tree, unit_tree, 1e12, groups)))
    auto = dict(named_leaves(jax.grad(lambda u: loss_of(bilevel.consumer_scaled(params, u, groups)))(unit_tree)))
    for k in unit:
        np.testing.assert_allclose(np.asarray(ours[k]), np.asarray(auto[k]), rtol=1e-4, atol=1e-6)
    g_p = jax.grad(loss_of)(apply_masks(params, masks))
    ours = dict(named_leaves(bilevel.implicit_mask_grad(params, g_p, masks, unit_tree, 1e12, groups)))
    auto = dict(named_leaves(jax.grad(lambda u: loss_of(apply_masks(
        params, units.expand_unit_masks(u, groups, params))))(unit_tree)))
    for k in unit:
        np.testing.assert_allclose(np.asarray(ours[k]), np.asarray(auto[k]), rtol=1e-4, atol=1e-6)


def test_compact_save_and_load_a_traced_zoo_model(tmp_path):
    """compact.compact slices a traced zoo model (here MobileNet-V2: depthwise convolutions lose groups),
    compact.save / load rebuild it from the architecture record and the saved shapes, same logits."""
    from fairprune_jax.sparsity import compact
    shape, opts = (16, 16, 3), dict(width=0.25, stem_stride=1)
    fm, params, state = zoo_model("mobilenet_v2", shape, **opts)
    groups = units.model_unit_groups(fm, params, state)
    template = units.structured_template(groups, prunable_template(params))
    counts = bilevel.unit_keep_counts(params, template, 0.5, "uniform", True, groups)
    masks = jax.jit(lambda p: bilevel.full_masks(
        bilevel.binarize(bilevel.init_scores(p, template, True, groups), counts), p, groups))(params)
    small = compact.compact(fm, params, state, masks, options=opts)
    assert small.arch["traced"] and small.num_params < sum(int(np.size(v)) for _, v in named_leaves(params))
    x = jax.random.normal(jax.random.key(4), (2,) + shape)
    masked = jax.jit(lambda p: fm.apply(p, state, x)[0])(apply_masks(params, masks))
    back = compact.load(compact.save(small, tmp_path / "c"))
    for model in (small, back):
        np.testing.assert_allclose(np.asarray(model.apply(x)), np.asarray(masked), atol=1e-5, rtol=1e-5)
    dw = back.params["blocks"][1]["depthwise"]["kernel"]
    assert dw.shape[-1] == counts["blocks/1/expand/kernel"] and dw.shape[-2] == 1
