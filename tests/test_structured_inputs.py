"""Structured pruning given the inputs a user's own model brings (a fifth tester's tour, docs/HARDENING.md rows
121-130): the classifier declared in units=, layers that cannot lose units, a second output, a depthwise
convolution with a channel multiplier, N:M patterns a layer cannot follow, a saved model loaded into a smaller
one."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fairprune_jax
from fairprune_jax.running import runner
from fairprune_jax.sparsity import compact


def _tab(n=300, d=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    g = rng.integers(0, 2, n)
    return x, (x[:, 0] + 0.3 * g > 0.1).astype(np.int32), g


class Mlp(nnx.Module):
    def __init__(self, d=12, rngs=None):
        rngs = rngs or nnx.Rngs(0)
        self.l1 = nnx.Linear(d, 16, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.l1(x)))


def test_the_classifier_in_units_is_refused_before_training(monkeypatch):
    """Its units are the classes: removing one left class 3 impossible to predict, without a word."""
    monkeypatch.setattr(runner, "prepare", lambda *a, **k: pytest.fail("training started"))
    x, y, g = _tab()
    with pytest.raises(ValueError, match="head/kernel, whose outputs are the model's logits"):
        fairprune_jax.prune(Mlp(), train=(x, y, g), method="structured_magnitude", sparsity=0.5,
                            units={"l1/kernel": ["l1/bias"], "head/kernel": ["head/bias"]})


class NormWide(nnx.Module):
    """A wide Linear before a LayerNorm (its units cannot be removed), a narrow plain one."""

    def __init__(self, rngs=None):
        rngs = rngs or nnx.Rngs(0)
        self.l1 = nnx.Linear(12, 128, rngs=rngs)
        self.ln = nnx.LayerNorm(128, rngs=rngs)
        self.l2 = nnx.Linear(128, 8, rngs=rngs)
        self.l3 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.relu(self.ln(self.l1(x))))))


class TwoHeads(nnx.Module):
    def __init__(self, rngs=None):
        rngs = rngs or nnx.Rngs(0)
        self.l1 = nnx.Linear(12, 16, rngs=rngs)
        self.head = nnx.Linear(16, 2, rngs=rngs)
        self.aux = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.l1(x))
        return self.head(h), self.aux(h)


def test_layers_left_dense_and_other_outputs_are_said(monkeypatch):
    """A structured run that cannot prune a layer holding most of the weights (behind a LayerNorm) said
    "achieved 0.875" and nothing else; a module with a second output had that output's units removed."""
    monkeypatch.setattr(runner, "prepare", lambda *a, **k: pytest.fail("training started"))
    x, y, g = _tab()
    with pytest.warns(UserWarning, match=r"1 layer\(s\) holding .* cannot lose whole units and stay dense: "
                                         r"l1/kernel \(channel space of l1 .*'reduce_sum'"):
        with pytest.raises(pytest.fail.Exception):
            fairprune_jax.prune(NormWide(), train=(x, y, g), method="structured_magnitude", sparsity=0.9)
    with pytest.warns(UserWarning, match="TwoHeads returns 2 outputs.*not trained for them"):
        with pytest.raises(pytest.fail.Exception):
            fairprune_jax.prune(TwoHeads(), train=(x, y, g), method="magnitude", sparsity=0.5)


class DWMult(nnx.Module):
    """A depthwise convolution with a channel multiplier of 2 (8 -> 16 channels, 8 groups)."""

    def __init__(self, rngs=None):
        rngs = rngs or nnx.Rngs(0)
        self.pw = nnx.Conv(3, 8, (1, 1), rngs=rngs)
        self.dw = nnx.Conv(8, 16, (3, 3), feature_group_count=8, rngs=rngs)
        self.pw2 = nnx.Conv(16, 8, (1, 1), rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.dw(nnx.relu(self.pw(x))))
        return self.head(nnx.relu(self.pw2(h)).mean((1, 2)))


def test_a_depthwise_multiplier_compacts_and_a_smaller_like_is_refused(tmp_path):
    """The rebuild set feature_group_count to the kernel's outputs (16, not the 8 input channels) for a
    multiplier of 2; load_module into a module with fewer layers dropped the saved ones without a word."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6, 6, 3)).astype(np.float32)
    g = rng.integers(0, 2, 200)
    y = (x[:, :3, :3, 0].mean((1, 2)) > 0).astype(np.int32)
    res = fairprune_jax.prune(DWMult(), train=(x, y, g), method="structured_magnitude", sparsity=0.5, epochs=1,
                              finetune_epochs=1, progress=False)
    small = res.compact(x[:8])
    assert small.dw.feature_group_count == 8
    res.model.eval()
    np.testing.assert_allclose(np.asarray(small(jnp.asarray(x[:32]))), np.asarray(res.model(jnp.asarray(x[:32]))),
                               atol=1e-5)
    compact.save_module(small, tmp_path / "m")

    class Shallow(nnx.Module):
        def __init__(self, rngs=None):
            rngs = rngs or nnx.Rngs(1)
            self.pw = nnx.Conv(3, 8, (1, 1), rngs=rngs)
            self.head = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.pw(x)).mean((1, 2)))

    Shallow.__module__, Shallow.__qualname__ = DWMult.__module__, DWMult.__qualname__   # same class name
    with pytest.raises(ValueError, match="leaves that like= does not have.*params/dw/kernel"):
        compact.load_module(tmp_path / "m", like=Shallow())


def test_nm_patterns_a_layer_cannot_follow_are_said_or_refused():
    """2:4 below its sparsity of 0.5 gave no layer the pattern; a layer reading 6 inputs (not a multiple of 4)
    was pruned without it, silently."""
    x, y, g = _tab(d=6)
    with pytest.raises(ValueError, match="2:4 keeps 2 of every 4 weights.*a target of 0.3 gives no layer"):
        fairprune_jax.prune(Mlp(d=6), train=(x, y, g), method="magnitude", sparsity=0.3, config={"distribution": "2:4"})
    with pytest.warns(UserWarning, match=r"--distribution 2:4: 1 prunable layer\(s\) .*not a multiple of 4 "
                                         r"\(l1/kernel\)"):
        fairprune_jax.prune(Mlp(d=6), train=(x, y, g), method="magnitude", sparsity=0.5, config={"distribution": "2:4"},
                            epochs=1, finetune_epochs=1, progress=False)


def test_compact_uses_the_units_given_to_prune():
    """``Pruned.units`` keeps the ``units=`` of the run (the result still unpacks into four), so ``compact()``
    traces with them without being told again."""
    x, y, g = _tab()
    res = fairprune_jax.prune(Mlp(), train=(x, y, g), method="structured_magnitude", sparsity=0.5, epochs=1,
                              finetune_epochs=1, progress=False, units={"l1/kernel": ["l1/bias"]})
    model, masks, report, state = res
    assert res.units == {"l1/kernel": ["l1/bias"]}
    small = res.compact(x[:8])
    assert small.l1.kernel.value.shape == (12, 8)
    np.testing.assert_allclose(np.asarray(small(jnp.asarray(x))), np.asarray(model(jnp.asarray(x))), atol=1e-5)
