"""Shared fixtures for the core tests: tiny models built once per session.

Building a model compiles one initializer per distinct kernel shape (seconds
each on a loaded 2-core CPU), so the core tests share these few configurations.
"""
from __future__ import annotations

import pytest

# name -> (input_shape, num_classes, model kwargs)
TINY_MODELS = {
    "mlp": ((10,), 3, {"hidden": (8, 6)}),
    "cnn": ((8, 8, 1), 3, {"channels": (4, 8), "hidden": 8}),
    "resnet": ((8, 8, 3), 3, {"depth": 8, "width": 4}),
}


@pytest.fixture(scope="session")
def tiny_models():
    """``{name: (functional_model, params, model_state)}`` for mlp, cnn and resnet (built lazily)."""
    from fairprune_jax.models import build_model

    cache: dict = {}

    class _Lazy(dict):
        def __missing__(self, name):
            shape, nc, kw = TINY_MODELS[name]
            self[name] = build_model(name, shape, nc, seed=0, **kw)
            return self[name]

    return _Lazy(cache)


@pytest.fixture
def no_training(monkeypatch):
    """Fail if a run starts building or training a model: bad input must be refused before that."""
    from fairprune_jax import runner

    def boom(*a, **k):
        raise RuntimeError("work started before the input was validated")
    monkeypatch.setattr(runner, "build_context", boom)
    monkeypatch.setattr(runner, "train_dense", boom)
