"""Flax NNX models and their pure functional form.

Models are written with NNX and used through ``nnx.split`` / ``nnx.merge`` so
training steps stay pure ``jax.jit`` functions over plain dict pytrees:
``params`` (the ``nnx.Param`` leaves) and ``model_state`` (BatchNorm
statistics and any other non-parameter state).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from fairprune_jax.core.trees import iter_modules
from fairprune_jax.models.views import from_view
from fairprune_jax.models.nets import CNN, MLP, ImageNetResNet, MobileNetV2, ResNet, ResNet18, ResNet34, ViT

MODELS: dict[str, Callable[..., nnx.Module]] = {"mlp": MLP, "cnn": CNN, "resnet": ResNet,
                                                 "mobilenet_v2": MobileNetV2, "resnet18": ResNet18, "resnet34": ResNet34,
                                                 "vit": ViT}


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
    """A model as pure functions: ``apply(params, model_state, x, train) -> (logits, model_state)``."""

    name: str
    graphdef: Any
    input_shape: tuple[int, ...]
    num_classes: int

    def apply(self, params: dict, model_state: dict, x: jax.Array, train: bool = False
              ) -> tuple[jax.Array, dict]:
        module = nnx.merge(self.graphdef, self.module_params(params), model_state)
        logits = self.call(module, x, train)
        if train and model_state:
            _, _, new_state = nnx.split(module, nnx.Param, ...)
            model_state = nnx.to_pure_dict(new_state)
        return logits, model_state

    def module_params(self, params: Any) -> Any:
        """``params`` (or masks) as the library holds them, in the module's own shapes (identity here; a user's
        module with multi-axis kernels is run through 2-D views, :mod:`models.views`)."""
        return params

    def call(self, module: nnx.Module, x: jax.Array, train: bool) -> jax.Array:
        """The module's forward pass in training or evaluation mode (the built-in models take ``train=``)."""
        return module(x, train=train)


@dataclasses.dataclass(frozen=True)
class CustomModel(FunctionalModel):
    """A user's own ``nnx.Module`` classifier as a :class:`FunctionalModel` (``fairprune_jax.prune``).

    ``mode`` says how the module learns training vs evaluation mode: ``"train"`` (its ``__call__`` takes
    ``train=``), ``"deterministic"`` (takes ``deterministic=``, the flax convention) or ``"attributes"``
    (no flag: ``graphdef`` is the module after ``nnx.Module.train()``, ``eval_graphdef`` after ``eval()``,
    which set Dropout's ``deterministic`` and BatchNorm's ``use_running_average``). ``initial``: the params
    and model state dense training started from (what rewinding to step 0 returns, as ``build_model`` does
    for the built-in models); ``unit_groups``: the removable units for structured pruning (``None``: not
    known); ``views``: the module's multi-axis kernels that the library sees as 2-D matrices
    (:func:`views.linear_general_views`; its params, masks and gradients hold those leaves in the view's shape).
    """

    mode: str = "attributes"
    eval_graphdef: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
    initial: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
    unit_groups: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
    views: tuple = ()

    def module_params(self, params: Any) -> Any:
        return from_view(params, self.views)

    def apply(self, params: dict, model_state: dict, x: jax.Array, train: bool = False
              ) -> tuple[jax.Array, dict]:
        if train or self.eval_graphdef is None:
            return super().apply(params, model_state, x, train)
        return dataclasses.replace(self, graphdef=self.eval_graphdef, eval_graphdef=None).apply(
            params, model_state, x, train)

    def call(self, module: nnx.Module, x: jax.Array, train: bool) -> jax.Array:
        return logits_of(self.outputs(module, x, train), type(module).__name__)

    def outputs(self, module: nnx.Module, x: jax.Array, train: bool) -> Any:
        """What the module returns (the logits, or a tuple / dict holding them), in the mode ``train`` says."""
        if self.mode == "train":
            return module(x, train=train)
        if self.mode == "deterministic":
            return module(x, deterministic=not train)
        return module(x)


def logits_of(out: Any, name: str = "the model") -> jax.Array:
    """The logits in what a module returns: an array as is; a tuple or list ``(logits, aux, ...)``: its first
    element; a dict: its ``"logits"`` entry. Anything else is a ``TypeError`` saying what came back."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    elif isinstance(out, dict):
        if "logits" not in out:
            raise TypeError(f"{name} returns a dict with keys {sorted(out)[:8]}; fairprune reads the logits from "
                            "its 'logits' entry (or from the first element of a tuple)")
        out = out["logits"]
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"{name} returns {type(out).__name__}; fairprune needs the logits, an array of shape "
                        "(batch, classes) (or a tuple whose first element is that array)")
    return out


def call_mode(module: nnx.Module) -> str:
    """How ``module`` is told training vs evaluation mode (see :class:`CustomModel`), from its signature."""
    import inspect
    try:
        params = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return "attributes"
    for mode in ("train", "deterministic"):
        if mode in params:
            return mode
    return "attributes"


def default_model_for(input_shape: tuple[int, ...]) -> str:
    """``mlp`` for flat features, ``cnn`` for images."""
    return "mlp" if len(input_shape) == 1 else "cnn"


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0,
                **kwargs) -> tuple[FunctionalModel, dict, dict]:
    """Build a model by name; returns ``(functional_model, params, model_state)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(sorted(MODELS))}")
    cls = MODELS[name]
    if name == "mlp":
        if len(input_shape) != 1:
            raise ValueError(f"model 'mlp' needs flat features (shape (d,)); got input shape {input_shape}. "
                             "Use --model cnn or resnet for images.")
        module = cls(input_shape[0], num_classes, rngs=nnx.Rngs(seed), **kwargs)
    else:
        if len(input_shape) != 3:
            raise ValueError(f"model {name!r} needs images of shape (H, W, C); got input shape {input_shape}. "
                             "Use --model mlp for tabular data (digits: --data-opt image=true gives its 8x8 images).")
        module = cls(input_shape[-1], num_classes, rngs=nnx.Rngs(seed), **kwargs)
    graphdef, params, state = nnx.split(module, nnx.Param, ...)
    fm = FunctionalModel(name, graphdef, tuple(input_shape), num_classes)
    params = nnx.to_pure_dict(params)
    state = nnx.to_pure_dict(state)
    # Trace once to catch shape errors early with a readable message.
    try:
        jax.eval_shape(lambda p, s: fm.apply(p, s, jnp.zeros((2,) + tuple(input_shape), jnp.float32)),
                       params, state)
    except Exception as e:  # pragma: no cover - defensive
        raise ValueError(f"model {name!r} cannot take inputs of shape {input_shape}: {e}") from e
    return fm, params, state


def forward_calls(fm: FunctionalModel, params: dict, model_state: dict,
                  kinds: tuple = (nnx.Conv, nnx.Linear)) -> list[tuple[str, Any, tuple[int, ...]]]:
    """``[(module path, module, output shape)]`` for every call of a module of ``kinds``, in the order one
    abstract forward pass (evaluation mode, batch of 1) makes them; shared by the layer order and the traced
    removable units (``compact.traced_unit_groups``)."""
    module = nnx.merge(getattr(fm, "eval_graphdef", None) or fm.graphdef, fm.module_params(params), model_state)
    paths = {id(sub): "/".join(str(p) for p in path) for path, sub in iter_modules(module) if isinstance(sub, kinds)}
    calls: list[tuple[str, Any, tuple[int, ...]]] = []
    originals = {cls: cls.__call__ for cls in kinds}

    def make_spy(cls):
        orig = originals[cls]

        def spy(self, inputs, *a, **k):
            y = orig(self, inputs, *a, **k)
            if id(self) in paths:
                calls.append((paths[id(self)], self, tuple(y.shape)))
            return y
        return spy

    for cls in kinds:
        cls.__call__ = make_spy(cls)
    try:
        jax.eval_shape(lambda xx: fm.call(module, xx, False),
                       jax.ShapeDtypeStruct((1,) + tuple(fm.input_shape), jnp.float32))
    finally:
        for cls, orig in originals.items():
            cls.__call__ = orig
    return calls


def _trace_layers(fm: FunctionalModel, params: dict, model_state: dict) -> list[tuple[str, float]]:
    """``[(kernel_name, output_positions)]`` in forward-call order, from one abstract trace (an
    ``nnx.LinearGeneral``'s output features are its last ``len(out_features)`` axes: the heads of an attention
    projection are not positions)."""
    out = []
    for path, m, shape in forward_calls(fm, params, model_state, kinds=(nnx.Conv, nnx.Linear, nnx.LinearGeneral)):
        features = len(m.out_features) if isinstance(m, nnx.LinearGeneral) else 1
        out.append((path + "/kernel", float(np.prod(shape[1:len(shape) - features]))))
    return out


def layer_order(fm: FunctionalModel, params: dict, model_state: dict) -> list[str]:
    """Kernel leaf names in the order the forward pass first uses them (first layer first; a layer called twice
    is listed once)."""
    return list(dict.fromkeys(n for n, _ in _trace_layers(fm, params, model_state)))


def count_flops(fm: FunctionalModel, params: dict, model_state: dict) -> dict[str, float]:
    """Multiply-accumulates per example of every kernel (dense model).

    A Linear kernel (i, o) costs i*o; a conv kernel (kh, kw, i, o) costs
    kh*kw*i*o per output position. Output sizes come from one abstract trace; a layer called twice (a shared
    layer) costs both calls. In a user's module every weight matrix the library prunes counts, whatever its name
    (an einsum layer's ``w``: one position per example, as the trace does not see its calls); embedding tables
    (lookups, not multiplications) do not. The zoo's multiplied matrices are its kernels (the ViT's learned
    ``position`` table is added, not multiplied).
    """
    from fairprune_jax.core.trees import named_leaves, weight_matrix

    positions: dict[str, float] = {}
    for n, p in _trace_layers(fm, params, model_state):
        positions[n] = positions.get(n, 0.0) + p
    weights = {n for n, v in named_leaves(params) if weight_matrix(n, v)} if isinstance(fm, CustomModel) else set()
    return {n: float(v.size) * positions.get(n, 1.0)
            for n, v in named_leaves(params) if n.endswith("kernel") or n in weights}


__all__ = ["CNN", "CustomModel", "ImageNetResNet", "MLP", "MODELS", "MobileNetV2", "ResNet18", "ResNet34", "ViT", "FunctionalModel", "call_mode", "ResNet", "build_model", "count_flops", "forward_calls", "layer_order",
           "default_model_for"]
