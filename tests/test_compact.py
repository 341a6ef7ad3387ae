"""Compaction: structured masks -> a physically smaller model with the same outputs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairprune_jax.techniques import bilevel
from fairprune_jax.sparsity import compact
from fairprune_jax.sparsity.masks import apply_masks, leaf_name, map_named, named_leaves, prunable_template


ARCHS = {
    "mlp": ((10,), {"hidden": [8, 6]}),
    "cnn": ((8, 8, 1), {"channels": [4, 8], "hidden": 8}),
    "resnet": ((8, 8, 3), {"depth": 8, "width": 4}),
}


def random_model(name: str, seed: int = 0):
    """A model with random weights, biases and BatchNorm statistics, built without running initializers.

    Non-trivial BN statistics and offsets matter: a fresh model has mean 0,
    var 1, beta 0, where a pruned channel's BN output is 0 even unmasked.
    jnp (not numpy) leaves: ``FunctionalModel.apply(train=True)`` updates numpy leaves in place.
    """
    shape, opts = ARCHS[name]
    fm, p_shapes, s_shapes = compact.functional_model(
        {"model": name, "input_shape": list(shape), "num_classes": 3, "options": opts})
    rng = np.random.default_rng(seed)

    def param(n, sd):
        scale = 1.0 / np.sqrt(np.prod(sd.shape[:-1])) if len(sd.shape) > 1 else 0.3
        base = 1.0 if n.endswith("scale") else 0.0
        return jnp.asarray(base + scale * rng.normal(size=sd.shape), jnp.float32)

    def stat(n, sd):
        v = rng.uniform(0.5, 1.5, size=sd.shape) if n.endswith("var") else 0.3 * rng.normal(size=sd.shape)
        return jnp.asarray(v, jnp.float32)

    return fm, map_named(param, p_shapes), map_named(stat, s_shapes)


def _structured(fm, params, sparsity):
    """Random structured unit masks (so the kept units are not simply the first ones), with companions."""
    groups = compact.unit_groups(fm.name, params)
    template = compact.structured_template(groups, prunable_template(params))
    counts = bilevel.unit_keep_counts(params, template, sparsity, "uniform", True)
    rng = np.random.default_rng(3)
    unit = {}
    for name, k in counts.items():
        c = compact.get_leaf(params, name).shape[-1]
        v = np.zeros(c, np.float32)
        v[rng.permutation(c)[:k]] = 1.0
        unit[name] = v
    unit_tree = jax.tree_util.tree_map_with_path(lambda path, _: unit.get(leaf_name(path)), params)
    return groups, compact.expand_unit_masks(unit_tree, groups, params), counts


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_compacted_outputs_equal_masked_model(name, tmp_path):
    fm, params, state = random_model(name)
    groups, masks, counts = _structured(fm, params, 0.5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6,) + fm.input_shape), jnp.float32)
    masked = apply_masks(params, masks)
    ref = jax.jit(lambda p, s, xx: fm.apply(p, s, xx, train=False)[0])
    c = compact.compact(fm, params, state, masks)
    out = c.apply(x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref(masked, state, x)), atol=1e-5, rtol=1e-5)
    assert float(jnp.std(out)) > 1e-3      # not a degenerate (constant) network
    if name == "cnn":
        # training mode (batch statistics) is equivalent too: a pruned channel is exactly zero before BN
        ref_train = jax.jit(lambda p, s, xx: fm.apply(p, s, xx, train=True)[0])
        np.testing.assert_allclose(np.asarray(c.apply(x, train=True)), np.asarray(ref_train(masked, state, x)),
                                   atol=1e-5, rtol=1e-5)
    # physically smaller: every pruned kernel lost its units, the consumer its input rows
    for g in groups:
        if g.kernel in counts:
            assert compact.get_leaf(c.params, g.kernel).shape[-1] == counts[g.kernel]
            for k in g.consumers:
                assert compact.get_leaf(c.params, k).shape[-2] == counts[g.kernel]
    assert c.num_params < sum(np.size(v) for _, v in named_leaves(params))
    assert compact.flops(c) < compact.flops(fm, params, state)

    # save / reload
    compact.save(c, tmp_path / "m")
    arch = json.loads((tmp_path / "m" / "architecture.json").read_text())
    assert arch["model"] == ("resnet_slim" if name == "resnet" else name)
    c2 = compact.load(tmp_path / "m")
    np.testing.assert_array_equal(np.asarray(c2.apply(x)), np.asarray(c.apply(x)))
    assert (tmp_path / "m" / compact.ARRAYS).is_dir() and not (tmp_path / "m" / "model.npz").exists()   # orbax


def test_a_compacted_folder_of_an_earlier_version_still_loads(tmp_path):
    """Folders written before the arrays moved to an orbax checkpoint hold ``model.npz``: still read."""
    fm, params, state = random_model("cnn", seed=2)
    _, masks, _ = _structured(fm, params, 0.5)
    c = compact.compact(fm, params, state, masks)
    old = tmp_path / "old"
    old.mkdir()
    arrays = {f"params/{n}": np.asarray(v) for n, v in named_leaves(c.params)}
    arrays.update({f"state/{n}": np.asarray(v) for n, v in named_leaves(c.model_state)})
    np.savez(old / "model.npz", **arrays)
    (old / "architecture.json").write_text(json.dumps(c.arch))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3,) + fm.input_shape), jnp.float32)
    np.testing.assert_array_equal(np.asarray(compact.load(old).apply(x)), np.asarray(c.apply(x)))
    compact.save(compact.load(old), old)                     # saved again: the orbax form replaces the npz
    assert (old / compact.ARRAYS).is_dir() and not (old / "model.npz").exists()
    np.testing.assert_array_equal(np.asarray(compact.load(old).apply(x)), np.asarray(c.apply(x)))
    with pytest.raises(FileNotFoundError, match="compact.save"):
        compact.load(tmp_path / "nothing")


def test_masked_model_zeroes_pruned_units():
    """The design point: with companions masked, a pruned conv channel emits 0 through BatchNorm + ReLU."""
    fm, params, state = random_model("cnn", seed=1)
    groups, masks, _ = _structured(fm, params, 0.5)
    masked = apply_masks(params, masks)
    m = np.asarray(compact.get_leaf(masks, "convs/0/kernel"))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4,) + fm.input_shape), jnp.float32)
    k = jnp.asarray(compact.get_leaf(masked, "convs/0/kernel"))
    h = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    sc, b = compact.get_leaf(masked, "norms/0/scale"), compact.get_leaf(masked, "norms/0/bias")
    mu, var = compact.get_leaf(state, "norms/0/mean"), compact.get_leaf(state, "norms/0/var")
    y = jax.nn.relu((h - mu) / jnp.sqrt(var + 1e-5) * sc + b)
    assert np.all(np.asarray(y)[..., m == 0] == 0.0)
    assert np.any(np.asarray(y)[..., m == 1] != 0.0)
    # unmasked BN would emit relu(beta - mean * gamma / std) != 0 on some pruned channel
    y_leak = jax.nn.relu((h - mu) / jnp.sqrt(var + 1e-5) * compact.get_leaf(params, "norms/0/scale")
                         + compact.get_leaf(params, "norms/0/bias"))
    assert np.any(np.asarray(y_leak)[..., m == 0] != 0.0)
    # without the companion masks a pruned channel would leak relu(beta - mean*gamma/std) into the next layer
    kernel_only = jax.tree.map(lambda x: x, masks)
    kernel_only["norms"][0]["scale"] = None
    kernel_only["norms"][0]["bias"] = None
    with pytest.raises(ValueError, match="expand_unit_masks"):
        compact.compact(fm, params, state, kernel_only)


def test_bad_masks_are_refused():
    fm, params, state = random_model("mlp")
    full = map_named(lambda n, p: np.ones(p.shape, np.float32) if n.startswith("layers") and n.endswith("kernel")
                     else None, params)   # unstructured: kernel-shaped masks
    with pytest.raises(ValueError, match="structured masks"):
        compact.compact(fm, params, state, full)
    head = {"head": {"kernel": np.ones(3, np.float32)}}  # pruning the classifier's outputs = removing classes
    with pytest.raises(ValueError, match="not a removable unit group"):
        compact.compact(fm, params, state, head)
    with pytest.raises(NotImplementedError, match="mlp, cnn, resnet"):
        compact.unit_groups("vit", params)
    with pytest.raises(FileNotFoundError, match="architecture.json"):
        compact.load("/nonexistent/folder")
