"""A user's own module compacted after a structured method: same class, smaller layers, same logits; saved
and loaded."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fairprune_jax
from fairprune_jax.sparsity import compact


class ResidualMLP(nnx.Module):
    """Linear -> ReLU, a residual block (its two Linear layers' outputs added), a head."""

    def __init__(self, din: int, width: int, classes: int, *, rngs: nnx.Rngs):
        self.inp = nnx.Linear(din, width, rngs=rngs)
        self.a = nnx.Linear(width, 2 * width, rngs=rngs)
        self.b = nnx.Linear(2 * width, width, rngs=rngs)
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.inp(x))
        h = h + self.b(nnx.relu(self.a(h)))
        return self.head(h)


def _data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    g = rng.integers(0, 2, n).astype(np.int32)
    y = (x[:, 0] + 0.5 * x[:, 1] * g > 0).astype(np.int32)
    return x, y, g


def test_a_users_residual_module_compacts_saves_and_loads(tmp_path):
    x, y, g = _data()
    model = ResidualMLP(6, 16, 2, rngs=nnx.Rngs(0))
    res = fairprune_jax.prune(model, train=(x, y, g), method="structured_magnitude", sparsity=0.5, epochs=2,
                              finetune_epochs=1, progress=False)
    small = res.compact(x[:8])
    assert type(small) is ResidualMLP
    # the residual pair (inp, b) is one coupled group; a is its own: every width halves
    assert small.inp.kernel.value.shape == (6, 8) and small.b.kernel.value.shape[-1] == 8
    assert small.a.kernel.value.shape == (8, 16) and small.head.kernel.value.shape == (8, 2)
    want = np.asarray(res.model(jnp.asarray(x)))
    got = np.asarray(small(jnp.asarray(x)))
    assert np.abs(got - want).max() <= 1e-5
    compact.save_module(small, tmp_path / "small")
    again = compact.load_module(tmp_path / "small", like=ResidualMLP(6, 16, 2, rngs=nnx.Rngs(1)))
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(x))), got)
    with pytest.raises(ValueError, match="like= is a"):
        compact.load_module(tmp_path / "small", like=nnx.Linear(6, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(FileNotFoundError, match="save_module"):
        compact.load_module(tmp_path / "nothing", like=model)


def test_compacting_unstructured_masks_is_refused():
    x, y, g = _data()
    res = fairprune_jax.prune(ResidualMLP(6, 16, 2, rngs=nnx.Rngs(0)), train=(x, y, g), method="magnitude",
                              sparsity=0.5, epochs=1, finetune_epochs=1, progress=False)
    with pytest.raises(ValueError, match="structured method"):
        res.compact(x[:8])


class NormedMLP(nnx.Module):
    """The README's own-model shape with a LayerNorm: Linear -> LayerNorm -> ReLU -> Linear -> ReLU -> head."""

    def __init__(self, din: int, classes: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.l2 = nnx.Linear(16, 16, rngs=rngs)
        self.head = nnx.Linear(16, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.l2(nnx.relu(self.norm(self.l1(x))))))


class ConcatMLP(nnx.Module):
    """DenseNet's pattern in a user's MLP: the head reads the concatenation of both hidden layers."""

    def __init__(self, din: int, classes: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 8, rngs=rngs)
        self.head = nnx.Linear(24, classes, rngs=rngs)

    def __call__(self, x):
        h1 = nnx.relu(self.l1(x))
        return self.head(jnp.concatenate([h1, nnx.relu(self.l2(h1))], axis=-1))


def _zoo(name):
    from fairprune_jax.models.nets import MobileNetV2, ResNet18, ViT
    rngs = nnx.Rngs(0)
    return {"resnet18": lambda: ResNet18(3, 2, width=4, stem="cifar", rngs=rngs),
            "mobilenet_v2": lambda: MobileNetV2(3, 2, width=0.25, stem_stride=1, rngs=rngs),
            "vit": lambda: ViT(3, 2, patch=4, dim=16, depth=1, heads=2, mlp=32, rngs=rngs)}[name]()


#: every (model, method) pair with FAIRPRUNE_ZOO_ALL=1 (about 10 minutes on 2 CPU cores); by default the
#: Linear -> LayerNorm module with each method (the zoo models' groups and compaction: tests/test_coupling.py)
ZOO_ALL = os.environ.get("FAIRPRUNE_ZOO_ALL") == "1"
CASES = [(n, m) for n in ("normed_mlp", "concat_mlp", "resnet18", "mobilenet_v2", "vit")
         for m in ("structured_magnitude", "prune_then_fair", "bifp")
         if ZOO_ALL or n == "normed_mlp" or (n == "concat_mlp" and m != "prune_then_fair")]


@pytest.mark.parametrize("name,method", CASES)
def test_structured_methods_run_on_coupled_models_without_options_and_compact(name, method):
    """BiFP, structured magnitude and prune_then_fair on ResNet-18, MobileNet-V2, a ViT (narrow, 8 px synthetic
    images) and a Linear -> LayerNorm module, with no options: the compacted module's logits equal the masked
    module's within 1e-5."""
    rng = np.random.default_rng(0)
    if name in ("normed_mlp", "concat_mlp"):
        x = rng.normal(size=(160, 6)).astype(np.float32)
        model = (NormedMLP if name == "normed_mlp" else ConcatMLP)(6, 2, rngs=nnx.Rngs(0))
    else:
        x = rng.normal(size=(160, 8, 8, 3)).astype(np.float32)
        model = _zoo(name)
    g = rng.integers(0, 2, len(x)).astype(np.int32)
    y = (x.reshape(len(x), -1)[:, 0] > 0).astype(np.int32)
    res = fairprune_jax.prune(model, train=(x, y, g), method=method, sparsity=0.5, epochs=1, finetune_epochs=1,
                              batch_size=32, progress=False)
    small = res.compact(x[:4])
    assert type(small) is type(model)
    n_small = sum(v.size for v in jax.tree.leaves(nnx.state(small, nnx.Param)))
    n_full = sum(v.size for v in jax.tree.leaves(nnx.state(res.model, nnx.Param)))
    assert n_small < n_full
    xs = jnp.asarray(x[:32])
    assert float(jnp.abs(small(xs) - res.model(xs)).max()) <= 1e-5


class DropMLP(nnx.Module):
    """Linear -> ReLU -> Dropout (its own rngs: a PRNG key in the module's state) -> head."""

    def __init__(self, rngs: nnx.Rngs):
        self.inp = nnx.Linear(6, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(nnx.relu(self.inp(x))))


def test_a_module_with_a_dropout_stream_compacts_saves_and_loads(tmp_path):
    """A Dropout with its own rngs holds a PRNG key array in the module state: compaction keeps it unsliced and
    save_module / load_module carry it (it crashed both, after the whole run)."""
    x, y, g = _data()
    res = fairprune_jax.prune(DropMLP(nnx.Rngs(0)), train=(x, y, g), method="structured_magnitude", sparsity=0.5,
                              epochs=1, finetune_epochs=1, progress=False)
    small = res.compact(x[:8])
    assert small.inp.kernel.value.shape == (6, 8)
    res.model.eval()
    small.eval()
    want = np.asarray(res.model(jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(small(jnp.asarray(x))), want, atol=1e-5)
    compact.save_module(small, tmp_path / "small")
    again = compact.load_module(tmp_path / "small", like=DropMLP(nnx.Rngs(1)))
    again.eval()
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(x))), want, atol=1e-5)
    key = nnx.state(again, nnx.RngState)
    assert jax.tree.leaves(key)         # the stream came back as a key, not dropped


class FixedHeadsAttention(nnx.Module):
    """A hand-written attention whose head count is an int attribute: the rebuild reads each Linear's width off its
    kernel, but not this number, so its compacted form splits the remaining columns into 4 heads again."""

    def __init__(self, rngs: nnx.Rngs):
        self.heads = 4
        self.inp = nnx.Linear(2, 16, rngs=rngs)
        self.q, self.k, self.v = (nnx.Linear(16, 16, rngs=rngs) for _ in range(3))
        self.o = nnx.Linear(16, 16, rngs=rngs)
        self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        h = self.inp(x)
        b, t, _ = h.shape
        q, k, v = (m(h).reshape(b, t, self.heads, -1) for m in (self.q, self.k, self.v))
        w = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1]), axis=-1)
        h = h + self.o(jnp.einsum("bhts,bshd->bthd", w, v).reshape(b, t, -1))
        return self.out(h.mean(axis=1))


def test_a_compacted_module_that_does_not_reproduce_the_pruned_one_is_refused_by_name():
    """compact() runs the rebuilt module on the example rows: a width held in an attribute the rebuild cannot read
    off a kernel (a hand-written attention's head count) gives a module that computes something else; that is
    refused, naming the failure, instead of returned."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5, 2)).astype(np.float32)
    g = rng.integers(0, 2, 300)
    y = (x[:, :3, 0].mean(1) > 0).astype(np.int32)
    res = fairprune_jax.prune(FixedHeadsAttention(nnx.Rngs(0)), train=(x, y, g), method="structured_magnitude",
                              sparsity=0.5, epochs=1, finetune_epochs=1, progress=False)
    with pytest.raises(ValueError, match="compacted module(?: fails on|'s logits differ from the pruned "
                                         "model's on) the example rows"):
        res.compact(x[:8])
