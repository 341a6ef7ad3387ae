"""Models: forward shapes, BatchNorm train/eval semantics through FunctionalModel, FLOPs, errors."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_MODELS
from fairprune_jax.sparsity.masks import named_leaves
from fairprune_jax.models import build_model, count_flops, default_model_for, layer_order
from fairprune_jax.models.nets import ResNet

NAMES = ["mlp", "cnn", "resnet"]


def _x(name: str, n: int, seed: int = 0) -> jnp.ndarray:
    shape = TINY_MODELS[name][0]
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n,) + shape), jnp.float32)


@pytest.fixture(scope="module")
def jitted(tiny_models):
    """One jitted apply per (model, train) pair, shared by the tests of this module."""
    out = {}
    for name in NAMES:
        fm = tiny_models[name][0]
        out[name, True] = jax.jit(lambda p, s, x, fm=fm: fm.apply(p, s, x, train=True))
        out[name, False] = jax.jit(lambda p, s, x, fm=fm: fm.apply(p, s, x, train=False))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_finite(tiny_models, jitted, name):
    fm, params, state = tiny_models[name]
    nc = TINY_MODELS[name][1]
    for n in (1, 5):
        for train in (False, True):
            logits, new_state = jitted[name, train](params, state, _x(name, n))
            chex.assert_shape(logits, (n, nc))
            chex.assert_tree_all_finite(logits)
            chex.assert_trees_all_equal_structs(new_state, state)


@pytest.mark.parametrize("name", ["mlp", "cnn"])  # (eager ResNet is slow to run op by op; its jit path is above)
def test_jit_matches_eager(tiny_models, jitted, name):
    fm, params, state = tiny_models[name]
    x = _x(name, 4, seed=1)
    for train in (False, True):
        eager, eager_state = fm.apply(params, state, x, train=train)
        jit_out, jit_state = jitted[name, train](params, state, x)
        np.testing.assert_allclose(np.asarray(jit_out), np.asarray(eager), rtol=1e-4, atol=1e-5)
        chex.assert_trees_all_close(jit_state, eager_state, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_batchnorm_train_updates_running_stats(tiny_models, jitted, name):
    fm, params, state = tiny_models[name]
    x = _x(name, 6, seed=2) * 3.0 + 1.0
    _, new_state = jitted[name, True](params, state, x)
    old, new = dict(named_leaves(state)), dict(named_leaves(new_state))
    assert set(old) == set(new) and any(n.endswith("/mean") for n in old)
    changed = [n for n in old if not np.allclose(np.asarray(old[n]), np.asarray(new[n]))]
    assert sorted(changed) == sorted(old), "every running mean/var must move in training mode"
    # the params are not touched
    _, _ = jitted[name, True](params, state, x)
    chex.assert_trees_all_equal(params, tiny_models[name][1])


def test_batchnorm_running_average_formula_cnn(tiny_models, jitted):
    """First BatchNorm of the CNN: ra = 0.9 * ra + 0.1 * batch statistic of conv(x)."""
    fm, params, state = tiny_models["cnn"]
    x = _x("cnn", 6, seed=3) + 0.5
    _, new_state = jitted["cnn", True](params, state, x)
    k = params["convs"][0]["kernel"]
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    mean = np.asarray(y).mean(axis=(0, 1, 2))
    var = np.asarray(y).var(axis=(0, 1, 2))
    m0, v0 = np.asarray(state["norms"][0]["mean"]), np.asarray(state["norms"][0]["var"])
    np.testing.assert_allclose(np.asarray(new_state["norms"][0]["mean"]), 0.9 * m0 + 0.1 * mean, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_state["norms"][0]["var"]), 0.9 * v0 + 0.1 * var, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_batchnorm_eval_uses_running_stats(tiny_models, jitted, name):
    fm, params, state = tiny_models[name]
    x = _x(name, 5, seed=4)
    # move the running statistics away from their init so eval mode is non-trivial
    _, trained_state = jitted[name, True](params, state, x * 2.0 + 1.0)
    logits, out_state = jitted[name, False](params, trained_state, x)
    chex.assert_trees_all_equal(out_state, trained_state)          # eval leaves the stats unchanged
    alone, _ = jitted[name, False](params, trained_state, x[:1])
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(logits[0]), rtol=1e-4, atol=1e-5)
    other = x.at[1:].set(100.0)                                    # other rows cannot change row 0
    logits2, _ = jitted[name, False](params, trained_state, other)
    np.testing.assert_allclose(np.asarray(logits2[0]), np.asarray(logits[0]), rtol=1e-4, atol=1e-5)
    # in training mode the batch statistics do couple the rows (so the flag really switches modes)
    t1, _ = jitted[name, True](params, trained_state, x)
    t2, _ = jitted[name, True](params, trained_state, other)
    assert not np.allclose(np.asarray(t1[0]), np.asarray(t2[0]), atol=1e-4)


def test_mlp_has_no_model_state(tiny_models, jitted):
    fm, params, state = tiny_models["mlp"]
    assert state == {}
    _, new_state = jitted["mlp", True](params, state, _x("mlp", 3))
    assert new_state == {}


def test_count_flops_small_cnn_by_hand(tiny_models):
    # 8x8x1 input; 3x3 conv 1->4 (SAME) at 8x8, 2x2 max-pool, 3x3 conv 4->8 at 4x4, fc 8->8, head 8->3
    fm, p, s = tiny_models["cnn"]
    assert count_flops(fm, p, s) == {"convs/0/kernel": 64 * 3 * 3 * 1 * 4, "convs/1/kernel": 16 * 3 * 3 * 4 * 8,
                                     "fc/kernel": 8 * 8, "head/kernel": 8 * 3}
    # same kernels on a 3x3 image: too small to pool, so both convs run at 3x3
    fm, p, s = build_model("cnn", (3, 3, 1), 3, channels=(4, 8), hidden=8)
    assert count_flops(fm, p, s) == {"convs/0/kernel": 9 * 3 * 3 * 1 * 4, "convs/1/kernel": 9 * 3 * 3 * 4 * 8,
                                     "fc/kernel": 8 * 8, "head/kernel": 8 * 3}


def test_count_flops_mlp_and_resnet(tiny_models):
    fm, p, s = tiny_models["mlp"]
    assert count_flops(fm, p, s) == {"layers/0/kernel": 80.0, "layers/1/kernel": 48.0, "head/kernel": 18.0}
    fm, p, s = tiny_models["resnet"]  # 8x8x3 input, width 4, depth 8: stages at 8x8, 4x4, 2x2
    f = count_flops(fm, p, s)
    expected = {
        "stem/kernel": 64 * 9 * 3 * 4,
        "blocks/0/conv1/kernel": 64 * 9 * 4 * 4, "blocks/0/conv2/kernel": 64 * 9 * 4 * 4,
        "blocks/1/conv1/kernel": 16 * 9 * 4 * 8, "blocks/1/conv2/kernel": 16 * 9 * 8 * 8,
        "blocks/1/proj/kernel": 16 * 4 * 8,
        "blocks/2/conv1/kernel": 4 * 9 * 8 * 16, "blocks/2/conv2/kernel": 4 * 9 * 16 * 16,
        "blocks/2/proj/kernel": 4 * 8 * 16,
        "head/kernel": 16 * 3,
    }
    assert f == expected
    assert layer_order(fm, p, s)[0] == "stem/kernel"


def test_resnet_depth_check():
    from flax import nnx
    for bad in (2, 7, 10, 21):
        with pytest.raises(ValueError, match=r"6n\+2"):
            ResNet(3, 2, depth=bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"6n\+2"):
        build_model("resnet", (8, 8, 3), 2, depth=12)


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model 'swin'.*cnn, mlp, mobilenet_v2, resnet, resnet18, resnet34, vit"):
        build_model("swin", (8, 8, 3), 2)
    with pytest.raises(ValueError, match="flat features"):
        build_model("mlp", (8, 8, 1), 2)
    with pytest.raises(ValueError, match=r"images of shape \(H, W, C\)"):
        build_model("cnn", (64,), 2)
    with pytest.raises(ValueError, match=r"images of shape \(H, W, C\)"):
        build_model("resnet", (64,), 2)


def test_default_model_for():
    assert default_model_for((64,)) == "mlp"
    assert default_model_for((8, 8, 1)) == "cnn"


def test_build_model_is_seeded(tiny_models):
    shape, nc, kw = TINY_MODELS["mlp"]
    _, p0, _ = build_model("mlp", shape, nc, seed=0, **kw)
    _, p1, _ = build_model("mlp", shape, nc, seed=1, **kw)
    chex.assert_trees_all_equal(p0, tiny_models["mlp"][1])
    assert not np.array_equal(np.asarray(p0["head"]["kernel"]), np.asarray(p1["head"]["kernel"]))


def test_max_pool_2x2_matches_reduce_window_and_its_gradient():
    import jax
    import numpy as np
    from flax import nnx

    from fairprune_jax.models.nets import max_pool_2x2

    for shape in [(3, 8, 6, 5), (2, 7, 6, 3)]:   # even sizes use reshape+max, odd ones fall back
        x = jax.random.normal(jax.random.key(0), shape)
        np.testing.assert_array_equal(max_pool_2x2(x), nnx.max_pool(x, (2, 2), strides=(2, 2)))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))   # continuous values: no ties
    g1 = jax.grad(lambda v: (max_pool_2x2(v) ** 2).sum())(x)
    g2 = jax.grad(lambda v: (nnx.max_pool(v, (2, 2), strides=(2, 2)) ** 2).sum())(x)
    np.testing.assert_allclose(g1, g2)


def test_vit_prunes_every_projection_and_runs_end_to_end():
    """The small ViT: attention projections, MLP and patch embedding are prunable kernels in forward order
    (layer tracing sees them), the position embedding and LayerNorms are not; magnitude pruning at 80% with the
    first and last layers dense reaches the target exactly on each pruned kernel and trains on images."""
    from fairprune_jax.data import Dataset, Split
    from fairprune_jax.methods import RunConfig
    from fairprune_jax.running.runner import prepare, run_method
    fm, params, state = build_model("vit", (16, 16, 3), 4, patch=4, dim=16, depth=2, heads=2, mlp=32)
    order = layer_order(fm, params, state)
    assert order[0] == "embed/kernel" and order[-1] == "head/kernel" and "blocks/1/query/kernel" in order
    assert "position" not in " ".join(order) and not any("norm" in n for n in order)
    with pytest.raises(ValueError, match="max_tokens"):
        build_model("vit", (64, 64, 3), 4, patch=2, max_tokens=16)
    rng = np.random.default_rng(0)

    def split(n):
        return Split(rng.normal(size=(n, 16, 16, 3)).astype(np.float32), rng.integers(0, 4, n), np.arange(n) % 2)

    ds = Dataset("cifar10", split(64), split(32), ["a", "b"], ["group"], ["c0", "c1", "c2", "c3"])
    cfg = RunConfig(method="magnitude", dataset="cifar10", model="vit", sparsity=0.8, epochs=1, batch_size=16,
                    exclude_first=True, exclude_last=True, progress=False,
                    model_options={"patch": 4, "dim": 16, "depth": 2, "heads": 2, "mlp": 32})
    res = run_method(prepare(cfg, dataset=ds))
    layers = res["sparsity"]["layers"]
    # the patch embedding is dense by its name, so --exclude-first has nothing more to keep dense (it used to
    # keep block 0's query projection dense instead); --exclude-last keeps the head
    assert "embed/kernel" not in layers and "head/kernel" not in layers and len(layers) == 13
    assert "blocks/0/query/kernel" in layers
    assert all(abs(v["sparsity"] - 0.8) < 0.02 for v in layers.values())
    assert np.isfinite(res["pruned"]["test"]["accuracy"])


@pytest.mark.parametrize("stride,padding,size", [(1, "SAME", 9), (2, "SAME", 9), (2, "SAME", 8), (1, "VALID", 7),
                                                 (2, ((1, 0), (0, 2)), 10)])
def test_shifted_depthwise_conv_is_the_grouped_convolution(stride, padding, size):
    from fairprune_jax.models.nets import shifted_depthwise_conv

    x = jax.random.normal(jax.random.key(0), (3, size, size + 1, 6))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, 6))
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    args = (x, k, (stride, stride), padding)
    want = jax.lax.conv_general_dilated(*args, dimension_numbers=dn, feature_group_count=6)
    got = shifted_depthwise_conv(*args, dimension_numbers=dn, feature_group_count=6)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # it really is the shifted sum (no grouped convolution left), and its gradient is the convolution's
    jaxpr = str(jax.make_jaxpr(lambda a, b: shifted_depthwise_conv(a, b, *args[2:], dimension_numbers=dn,
                                                                   feature_group_count=6))(x, k))
    assert "conv_general_dilated" not in jaxpr
    g_want = jax.grad(lambda b: jax.lax.conv_general_dilated(x, b, *args[2:], dimension_numbers=dn,
                                                             feature_group_count=6).sum())(k)
    g_got = jax.grad(lambda b: shifted_depthwise_conv(x, b, *args[2:], dimension_numbers=dn,
                                                      feature_group_count=6).sum())(k)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-4)


def test_mobilenet_v2_depthwise_ways_agree_and_the_cpu_default_is_shifted():
    from flax import nnx
    from fairprune_jax.models.nets import MobileNetV2

    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))

    def logits_and_jaxpr(depthwise):
        graphdef, state = nnx.split(MobileNetV2(3, 4, width=0.25, depthwise=depthwise, rngs=nnx.Rngs(0)))
        fn = lambda st, a: nnx.merge(graphdef, st)(a)  # noqa: E731
        return np.asarray(jax.jit(fn)(state, x)), str(jax.make_jaxpr(fn)(state, x))

    (shifted, _), (grouped, plain), (_, auto) = (logits_and_jaxpr(d) for d in ("shifted", "grouped", "auto"))
    np.testing.assert_allclose(shifted, grouped, atol=1e-5)
    # the default on CPU is the shifted form: fewer grouped convolutions left in the traced program
    assert jax.default_backend() != "cpu" or auto.count("feature_group_count=") < plain.count("feature_group_count=")
    with pytest.raises(ValueError, match="depthwise must be"):
        MobileNetV2(3, 4, width=0.25, depthwise="fast", rngs=nnx.Rngs(0))
