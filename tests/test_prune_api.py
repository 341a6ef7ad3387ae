"""``fairprune_jax.prune`` on a user's own model: every registered method, the report, exact sparsity."""
import numpy as np
import pytest

flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import fairprune_jax as fp  # noqa: E402
from fairprune_jax.sparsity import compact  # noqa: E402
from fairprune_jax.running.api import REPORT_KEYS, wrap_model  # noqa: E402
from fairprune_jax.methods import METHODS  # noqa: E402


class Net(nnx.Module):
    """A user's model, not from fairprune_jax.models: conv + LayerNorm + Dropout, no train flag."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.hidden = nnx.Linear(4 * 8 * 8, 16, rngs=rngs)
        self.out = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.norm(self.conv(x))))
        return self.out(nnx.relu(self.hidden(h.reshape(len(x), -1))))


class BNNet(nnx.Module):
    """A ``train=`` flag and BatchNorm (running statistics in the model state)."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.out = nnx.Linear(4, 10, rngs=rngs)

    def __call__(self, x, train: bool = False):
        return self.out(nnx.relu(self.bn(self.conv(x), use_running_average=not train)).mean(axis=(1, 2)))


#: Small budgets per method (one epoch everywhere; a few rounds / iterations).
FAST = {"lth": {"max_rounds": 2, "round_epochs": 1}, "ballot": {"vote_epochs": 1, "retrain_epochs": 1},
        "fairgrape": {"keep_per_iter": 0.5}, "fair_then_prune": {"fair_epochs": 1}, "ceag": {"select_points": 2},
        "fair_scratch": {"method_options": {"epochs": 1}},
        "bifp": {"method_options": {"epochs": 1}}}


@pytest.fixture(scope="module")
def data():
    """300 rows of the embedded digits (8x8 images, 10 classes), three groups with a learnable signal."""
    from fairprune_jax.data import load_dataset
    ds = load_dataset("digits")
    x = ds.train.x[:300].reshape(-1, 8, 8, 1)
    y = ds.train.y[:300]
    return x, y, (y % 3).astype(np.int32)


def _kernels(model):
    return {"conv/kernel": model.conv.kernel[...], "hidden/kernel": model.hidden.kernel[...],
            "out/kernel": model.out.kernel[...]}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_prunes_a_custom_model(method, data):
    x, y, g = data
    user_model = Net(nnx.Rngs(0))
    before = np.asarray(user_model.conv.kernel[...]).copy()
    opts = dict(FAST.get(method, {}))
    model, masks, report, state = fp.prune(user_model, (x, y, g), method=method, sparsity=0.8, epochs=1,
                                           finetune_epochs=1, batch_size=50, **opts)
    assert isinstance(model, Net) and model is not user_model
    np.testing.assert_array_equal(np.asarray(user_model.conv.kernel[...]), before)   # the user's module is untouched
    assert set(REPORT_KEYS) <= set(report)
    assert report["method"] == method and report["model"] == "Net" and report["dataset"] == "arrays"
    assert {"train", "test"} <= set(report["pruned"]) and "certificate" in report["pruned"]["test"]
    assert report["sizes"]["train"] + report["sizes"]["test"] == len(x)
    # pruned weights exactly zero in the returned module, and as many as the report says, layer by layer
    layers = report["sparsity"]["layers"]
    kernels = _kernels(model)
    total = kept = 0
    for name, layer in layers.items():
        if name not in kernels:
            continue
        k = np.asarray(kernels[name])
        m = np.asarray(compact.get_leaf(masks, name))
        assert np.all(k[np.broadcast_to(m, k.shape) == 0] == 0), name
        assert np.count_nonzero(k) <= layer["kept"] and layer["size"] == k.size, name
        total, kept = total + k.size, kept + layer["kept"]
    achieved = report["sparsity"]["achieved"]
    structured = METHODS[method].is_structured(METHODS[method].parse({}))
    # exact: the target up to one rounding per layer (a unit of the widest layer for structured masks)
    slack = (max(k.shape[-1] ** -1 for k in kernels.values()) if structured
             else len(layers) / max(report["sparsity"]["params_total"], 1))
    assert abs(achieved - 0.8) <= slack + 1e-9, (achieved, slack)
    if structured:      # whole units: one 0/1 value per unit, on the kernel and its bias; the conv's channels
        unit = np.asarray(masks["hidden"]["kernel"])        # go through a LayerNorm, so they are left whole
        assert unit.shape == (16,) and 0 < unit.sum() < 16
        np.testing.assert_array_equal(np.asarray(masks["hidden"]["bias"]), unit)
        assert masks["conv"]["kernel"] is None and masks["norm"]["scale"] is None
        assert np.all(np.asarray(model.hidden.bias[...])[unit == 0] == 0)
    assert np.isfinite(report["pruned"]["test"]["accuracy"])


def test_bad_options_fail_before_training(data, monkeypatch):
    from fairprune_jax.running import runner
    monkeypatch.setattr(runner, "prepare", lambda *a, **k: pytest.fail("training started"))
    x, y, g = data
    with pytest.raises(ValueError, match="no_such_option"):
        fp.prune(Net(nnx.Rngs(0)), (x, y, g), method="ceag", no_such_option=1)
    with pytest.raises(ValueError, match="eps"):
        fp.prune(Net(nnx.Rngs(0)), (x, y, g), method="ceag", eps="big")
    with pytest.raises(ValueError, match="bogus_setting"):
        fp.prune(Net(nnx.Rngs(0)), (x, y, g), config={"bogus_setting": 1})
    with pytest.raises(ValueError, match="sparsity"):
        fp.prune(Net(nnx.Rngs(0)), (x, y, g), sparsity=1.5)
    with pytest.raises(ValueError, match="logit"):
        fp.prune(Net(nnx.Rngs(0)), (x, y + 10, g))               # labels beyond the model's 10 outputs
    with pytest.raises(ValueError, match="not a kernel"):
        fp.prune(Net(nnx.Rngs(0)), (x, y, g), method="structured_magnitude", units={"nope/kernel": []})


def test_units_traced_from_the_forward_pass():
    fm, params, state = wrap_model(Net(nnx.Rngs(0)), (8, 8, 1), 10)
    assert fm.mode == "attributes"
    groups = {u.kernel: u for u in compact.traced_unit_groups(fm, params, state)}
    # never the classifier; not the conv: its LayerNorm mixes a channel into the others' statistics, so a removed
    # channel would change the rest (sparsity/coupling.py refuses it, naming the reduction)
    assert set(groups) == {"hidden/kernel"}
    assert groups["hidden/kernel"].consumers == ("out/kernel",)
    assert groups["hidden/kernel"].companions == ("hidden/bias",)
    fm, params, state = wrap_model(BNNet(nnx.Rngs(0)), (8, 8, 1), 10)
    assert fm.mode == "train"
    (bn,) = compact.traced_unit_groups(fm, params, state)
    assert bn.companions == ("conv/bias", "bn/scale", "bn/bias") and bn.stats == ("bn/mean", "bn/var")


def test_batchnorm_model_with_train_flag_and_out_folder(data, tmp_path):
    x, y, g = data
    model, masks, report, _ = fp.prune(BNNet(nnx.Rngs(1)), (x[:200], y[:200], g[:200]), method="magnitude",
                                       sparsity=0.5, test=(x[200:], y[200:], g[200:]), epochs=1, batch_size=50,
                                       out=tmp_path)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()
    assert report["sizes"] == {"train": 200, "test": 100}
    k = np.asarray(model.conv.kernel[...])
    assert np.count_nonzero(k) == round(0.5 * k.size)
    assert not np.allclose(np.asarray(model.bn.mean[...]), 0.0)       # running statistics were trained


class FlatNet(nnx.Module):
    """conv -> relu -> flatten -> linear: the conv's consumer reads its channels flattened channel-last."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 3, (3, 3), rngs=rngs)
        self.out = nnx.Linear(3 * 4 * 4, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.conv(x)).reshape(len(x), -1))


def test_flattened_consumer_rows_are_the_units():
    """BiFP's consumer-side mask on a flattened consumer: the same function as the producer-side mask, and its
    gradient is autodiff's derivative of the loss in a continuous unit mask."""
    import jax
    import jax.numpy as jnp
    from fairprune_jax.techniques import bilevel
    from fairprune_jax.sparsity.masks import apply_masks

    fm, params, state = wrap_model(FlatNet(nnx.Rngs(0)), (4, 4, 1), 2)
    groups = compact.traced_unit_groups(fm, params, state)
    assert [(u.kernel, u.companions, u.consumers) for u in groups] == [("conv/kernel", ("conv/bias",), ("out/kernel",))]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4, 4, 1)), jnp.float32)
    y = jnp.asarray(np.arange(16) % 2)
    unit = {"conv": {"kernel": jnp.asarray([1.0, 0.0, 1.0]), "bias": None}, "out": {"kernel": None, "bias": None}}
    masks = compact.expand_unit_masks(unit, groups, params)

    def loss_of(z):
        logits = fm.apply(z, state, x)[0]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), y])

    np.testing.assert_allclose(float(loss_of(bilevel.consumer_scaled(params, unit, groups))),
                               float(loss_of(apply_masks(params, masks))), rtol=1e-6)
    g_c = jax.grad(loss_of)(bilevel.consumer_scaled(params, unit, groups))
    ours = bilevel.consumer_mask_grad(params, g_c, unit, unit, 1e12, groups)
    auto = jax.grad(lambda u: loss_of(bilevel.consumer_scaled(params, u, groups)))(unit)
    np.testing.assert_allclose(np.asarray(ours["conv"]["kernel"]), np.asarray(auto["conv"]["kernel"]),
                               rtol=1e-4, atol=1e-7)
    assert abs(float(ours["conv"]["kernel"][1])) > 0          # the pruned unit still gets a gradient


def test_a_trained_model_is_the_dense_reference_with_epochs_0(data):
    x, y, g = data
    model = BNNet(nnx.Rngs(2))
    train, test = (x[:200], y[:200], g[:200]), (x[200:], y[200:], g[200:])
    with pytest.raises(ValueError, match="finetune_epochs"):
        fp.prune(model, train, method="magnitude", epochs=0)
    run = fp.prune(model, train, method="magnitude", sparsity=0.5, test=test, epochs=0, finetune_epochs=1,
                   batch_size=50)
    assert run.report["history"]["dense"]["loss"] == []                 # no dense training
    pred = np.asarray(model(test[0], train=False)).argmax(-1)           # the given weights are the dense model
    assert run.report["dense"]["test"]["accuracy"] == pytest.approx(float(np.mean(pred == test[1])))


class ResNetLike(nnx.Module):
    """A residual block: conv2's channels are added to the input's, so its consumer does not see them alone."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.conv1 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem(x))
        h = h + self.conv2(nnx.relu(self.conv1(h)))
        return self.out(nnx.relu(h).mean(axis=(1, 2)))


def test_a_residual_addition_couples_both_branches():
    """stem and conv2 are added: their channels are one group, read by conv1 and the classifier."""
    fm, params, state = wrap_model(ResNetLike(nnx.Rngs(0)), (4, 4, 1), 2)
    groups = {u.kernel: u for u in compact.traced_unit_groups(fm, params, state)}
    assert {k: u.consumers for k, u in groups.items()} == {"stem/kernel": ("conv1/kernel", "out/kernel"),
                                                          "conv1/kernel": ("conv2/kernel",)}
    assert groups["stem/kernel"].producers == ("conv2/kernel",)


def test_bifp_consumer_grad_refused_where_a_declared_unit_has_no_sole_consumer(data, monkeypatch):
    """Declared units keep the chain reading of consumers; the LayerNorm after the conv leaves it none."""
    from fairprune_jax.running import runner
    monkeypatch.setattr(runner, "prepare", lambda *a, **k: pytest.fail("training started"))
    x, y, g = data
    with pytest.raises(ValueError, match="mask_grad='producer'"):
        fp.prune(Net(nnx.Rngs(0)), (x, y, g), method="bifp",
                 units={"conv/kernel": ["conv/bias", "norm/scale", "norm/bias"]})


class TabNet(nnx.Module):
    """An MLP for tabular features (a DataFrame's columns after standardization and one-hot encoding)."""

    def __init__(self, inputs: int, classes: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(inputs, 16, rngs=rngs)
        self.out = nnx.Linear(16, classes, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def test_a_dataframe_as_a_dataset_is_pruned_end_to_end():
    """`prune(model, train=load_dataframe(df, ...))`: the Dataset's splits, group and class names are the run's;
    test= / val= / other names beside it are refused, val_fraction= carves val from its train split."""
    pd = pytest.importorskip("pandas")
    from fairprune_jax.data import load_dataframe
    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame({"age": rng.integers(18, 70, n), "hours": rng.normal(40, 8, n).round(1),
                       "job": rng.choice(["clerk", "nurse", "pilot"], n), "sex": rng.choice(["F", "M"], n)})
    df["income"] = np.where(df["age"] + 10 * (df["job"] == "pilot") + rng.normal(0, 5, n) > 45, ">50K", "<=50K")
    ds = load_dataframe(df, target="income", protected="sex")
    model = TabNet(ds.train.x.shape[1], ds.num_classes, nnx.Rngs(0))
    _, masks, report, _ = fp.prune(model, train=ds, method="magnitude", sparsity=0.5, epochs=5, lr=0.01,
                                   batch_size=32, progress=False, compile_cache=False)
    assert report["groups"]["names"] == ["F", "M"] and report["groups"]["attributes"] == ["sex"]
    assert report["classes"] == ["<=50K", ">50K"] and report["dataset"] == "csv"
    assert report["sizes"] == {"train": len(ds.train), "test": len(ds.test)}
    assert report["dataset_meta"]["feature_names"] == ds.meta["feature_names"]
    assert report.sparsity == pytest.approx(0.5, abs=0.02) and report.accuracy > 0.7
    with pytest.raises(ValueError, match=r"train= is a Dataset \('csv'\), which has a test split of its own"):
        fp.prune(model, train=ds, test=(ds.test.x, ds.test.y, ds.test.g), epochs=1)
    with pytest.raises(ValueError, match=r"group_names=\['a', 'b'\] differs from the names of the Dataset"):
        fp.prune(model, train=ds, group_names=["a", "b"], epochs=1)
    with pytest.raises(ValueError, match=r"has 2 classes \(<=50K, >50K\) but the model returns 3 logit"):
        fp.prune(TabNet(ds.train.x.shape[1], 3, nnx.Rngs(0)), train=ds, epochs=1)
    from fairprune_jax.running.api import dataset_given
    carved = dataset_given(ds, val_fraction=0.25, group_names=["F", "M"])
    assert len(carved.train) + len(carved.val) == len(ds.train) and carved.test is ds.test
    with pytest.raises(ValueError, match="has a val split already"):
        dataset_given(carved, val_fraction=0.25)
