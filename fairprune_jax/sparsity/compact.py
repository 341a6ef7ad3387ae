"""Compaction: a model with structured masks turned into a physically smaller dense model that computes the
same function, and its saving and loading.

:func:`compact` drops every removed unit's kernel column, bias entry, BatchNorm scale, offset and running
statistics, and the next layer's input row (the unit groups of ``units.py`` say which parameters a unit owns;
its names are re-exported here, ``compact.UnitGroup``, ``compact.expand_unit_masks``, ... as before).
Compacted models are saved as ``model.npz`` (params and model state, keyed by
leaf name) plus ``architecture.json`` (model family, input shape, classes,
widths) and reloaded without the original code path that trained them. The traced zoo models (ResNet-18 / 34,
MobileNet-V2, the ViT) are sliced by their coupled groups (:func:`slice_groups`); their record keeps the
options they were built with, and loading rebuilds the module from them with the saved shapes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fairprune_jax.models import CNN, MLP, MODELS, FunctionalModel, ResNet
from fairprune_jax.models.views import from_view
from fairprune_jax.core.trees import iter_modules
from fairprune_jax.sparsity.masks import map_named, named_leaves
from fairprune_jax.sparsity.units import (_NORMS, SUPPORTED, TRACED, UnitGroup, _aligned_consumer,  # noqa: F401
                                          _checked_consumers, _forward_calls, _key, check_structured,
                                          expand_unit_masks, get_leaf, has_leaf, model_unit_groups,
                                          kept_positions, physical_counts, replace_leaves, spread,
                                          structured_template, traced_unit_groups, unit_groups, unit_masks_of)

FORMAT = "fairprune_jax.compact/1"


# ---------------------------------------------------------------------------
# Compaction
# ---------------------------------------------------------------------------

def SlimResNet(in_channels: int, num_classes: int, *, depth: int, width: int, mids: Sequence[int],
               rngs: nnx.Rngs) -> ResNet:
    """The CIFAR ResNet with per-block inner widths ``mids`` (what compaction leaves of a ResNet)."""
    return ResNet(in_channels, num_classes, depth=depth, width=width, mids=tuple(int(m) for m in mids), rngs=rngs)


def _module_for(arch: dict) -> nnx.Module:
    """An abstract (shape-only, no initializer run) module for an architecture record."""
    name, shape, nc, opts = arch["model"], tuple(arch["input_shape"]), int(arch["num_classes"]), arch["options"]

    def make():
        rngs = nnx.Rngs(0)
        if arch.get("traced"):      # the zoo model at its built widths; the saved shapes are set in _assemble
            return MODELS[name](shape[-1], nc, rngs=rngs, **opts)
        if name == "mlp":
            return MLP(shape[0], nc, hidden=tuple(opts["hidden"]), rngs=rngs)
        if name == "cnn":
            return CNN(shape[-1], nc, channels=tuple(opts["channels"]), hidden=int(opts["hidden"]), rngs=rngs)
        if name == "resnet":
            return ResNet(shape[-1], nc, depth=int(opts["depth"]), width=int(opts["width"]), rngs=rngs)
        if name == "resnet_slim":
            return SlimResNet(shape[-1], nc, depth=int(opts["depth"]), width=int(opts["width"]),
                              mids=tuple(opts["mids"]), rngs=rngs)
        raise ValueError(f"unknown architecture {name!r}; valid: mlp, cnn, resnet, resnet_slim")

    return nnx.eval_shape(make)


def functional_model(arch: dict) -> tuple[FunctionalModel, Any, Any]:
    """``(FunctionalModel, params shapes, state shapes)`` for an architecture record.

    Built abstractly (``nnx.eval_shape``): no initializer is compiled or run.
    """
    module = _module_for(arch)
    graphdef, params, state = nnx.split(module, nnx.Param, ...)
    fm = FunctionalModel(arch["model"], graphdef, tuple(arch["input_shape"]), int(arch["num_classes"]))
    return fm, nnx.to_pure_dict(params), nnx.to_pure_dict(state)


@dataclasses.dataclass
class Compacted:
    """A physically smaller model: pruned units removed."""

    fm: FunctionalModel
    params: Any
    model_state: Any
    arch: dict

    def apply(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (evaluation mode by default; jitted, one compilation per architecture and input shape)."""
        return _jitted_apply(self.fm)(self.params, self.model_state, x, train=train)

    @property
    def num_params(self) -> int:
        return int(sum(np.size(v) for _, v in named_leaves(self.params)))


@functools.lru_cache(maxsize=32)
def _jitted_apply(fm: FunctionalModel):
    return jax.jit(lambda p, s, x, train: fm.apply(p, s, x, train=train)[0], static_argnames="train")


def _arch_for(model_name: str, input_shape: tuple, num_classes: int, params: dict) -> dict:
    """Architecture record (family + widths) read off sliced param shapes."""
    if model_name == "mlp":
        opts = {"hidden": [int(params["layers"][i]["kernel"].shape[-1]) for i in range(len(params["layers"]))]}
        name = "mlp"
    elif model_name == "cnn":
        opts = {"channels": [int(params["convs"][i]["kernel"].shape[-1]) for i in range(len(params["convs"]))],
                "hidden": int(params["fc"]["kernel"].shape[-1])}
        name = "cnn"
    elif model_name in ("resnet", "resnet_slim"):
        nb = len(params["blocks"])
        opts = {"depth": 2 * nb + 2, "width": int(params["stem"]["kernel"].shape[-1]),
                "mids": [int(params["blocks"][j]["conv1"]["kernel"].shape[-1]) for j in range(nb)]}
        name = "resnet_slim"
    else:
        raise NotImplementedError(f"compaction supports {', '.join(SUPPORTED)}; got model {model_name!r}")
    return {"format": FORMAT, "model": name, "input_shape": [int(s) for s in input_shape],
            "num_classes": int(num_classes), "options": opts}


def compact(fm: FunctionalModel, params: Any, model_state: Any, masks: Any,
            options: dict | None = None) -> Compacted:
    """The model with every unit pruned in the structured ``masks`` physically removed.

    Equivalent to the masked model ``fm.apply(apply_masks(params, masks'))``
    where ``masks'`` also masks the companions of each pruned unit (see the
    module doc); if ``masks`` lacks the companion masks and a pruned unit's
    companions are not zero, that equivalence would not hold with the given
    masks, so it raises. Unstructured masks raise ``ValueError``. The traced zoo models (``units.TRACED``:
    resnet18 / 34, mobilenet_v2, vit) are sliced group by group (:func:`slice_groups`); ``options``, the
    keyword arguments they were built with, go into the architecture record so :func:`load` rebuilds them.
    """
    if fm.name in TRACED:
        groups = model_unit_groups(fm, params, model_state)
        check_structured(masks, params, groups)
        small_fm, small_p, small_s = slice_groups(fm, params, model_state, masks, groups)
        arch = {"format": FORMAT, "model": fm.name, "input_shape": [int(s) for s in fm.input_shape],
                "num_classes": int(fm.num_classes), "options": dict(options or {}), "traced": True}
        return Compacted(small_fm, small_p, small_s, arch)
    groups = unit_groups(fm.name, params)
    units = check_structured(masks, params, groups)
    named_p = dict(named_leaves(params))
    named_s = dict(named_leaves(model_state))
    comp_masked = {n for n, _ in named_leaves(masks)}
    new_p: dict[str, np.ndarray] = {n: np.asarray(v) for n, v in named_p.items()}
    new_s: dict[str, np.ndarray] = {n: np.asarray(v) for n, v in named_s.items()}
    for g in groups:
        if g.kernel not in units:
            continue
        keep = np.flatnonzero(units[g.kernel] != 0)
        if keep.size == 0:
            raise ValueError(f"compaction: every unit of {g.kernel} is pruned; the network output would not "
                             "depend on its input. Keep at least one unit per layer.")
        dead = np.flatnonzero(units[g.kernel] == 0)
        for c in g.companions:
            if c not in comp_masked and np.any(new_p[c][dead] != 0):
                raise ValueError(f"compaction: {c} is non-zero on pruned units of {g.kernel} and not masked, so "
                                 "pruned units do not output zero; build masks with "
                                 "compact.expand_unit_masks (structured methods do)")
        new_p[g.kernel] = new_p[g.kernel][..., keep]
        for c in g.companions:
            new_p[c] = new_p[c][keep]
        for s in g.stats:
            if s in new_s:
                new_s[s] = new_s[s][keep]
        for k in g.consumers:
            new_p[k] = np.take(new_p[k], keep, axis=-2)
    arch = _arch_for(fm.name, fm.input_shape, fm.num_classes, _nest_shapes(params, new_p))
    return _assemble(arch, new_p, new_s)


def _nest_shapes(template: Any, flat: dict[str, np.ndarray]) -> Any:
    return map_named(lambda n, _: flat[n], template)


def _assemble(arch: dict, flat_params: dict[str, Any], flat_state: dict[str, Any]) -> Compacted:
    fm, p_shapes, s_shapes = functional_model(arch)
    if arch.get("traced"):          # widths differ per layer: the saved shapes are the architecture
        p = map_named(lambda n, sd: jnp.asarray(np.asarray(flat_params[n]), sd.dtype), p_shapes)
        st = map_named(lambda n, sd: jnp.asarray(np.asarray(flat_state[n]), sd.dtype), s_shapes)
        return Compacted(dataclasses.replace(fm, graphdef=rebuild(fm.graphdef, p, st)), p, st, arch)

    def fill(shapes, flat, what):
        def one(name, sd):
            if name not in flat:
                raise ValueError(f"compacted {what} lacks {name}")
            v = np.asarray(flat[name])
            if tuple(v.shape) != tuple(sd.shape):
                raise ValueError(f"compacted {what} {name} has shape {v.shape}, the architecture needs {sd.shape}")
            return jnp.asarray(v, sd.dtype)
        return map_named(one, shapes)

    return Compacted(fm, fill(p_shapes, flat_params, "param"), fill(s_shapes, flat_state, "state"), arch)


#: the orbax checkpoint inside a saved folder (params and model state, flat names as keys); folders written
#: before it hold ``model.npz`` instead, which :func:`load` and :func:`load_module` still read
ARRAYS = "model"


def _write_arrays(path: Path, params: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> None:
    """``{"params": ..., "state": ...}`` (flat names -> arrays) as one orbax checkpoint ``path/model``, over an
    earlier one. Written by this process alone (a multi-process run saves from process 0)."""
    import shutil
    import jax
    import orbax.checkpoint as ocp      # imported lazily, as the run checkpoints do
    target = path.absolute() / ARRAYS
    shutil.rmtree(target, ignore_errors=True)
    (path / "model.npz").unlink(missing_ok=True)             # an earlier version's arrays in the same folder
    only_me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                 active_processes={jax.process_index()})
    ckpt = ocp.StandardCheckpointer(multiprocessing_options=only_me)
    try:
        ckpt.save(target, {"params": params, "state": state})
        ckpt.wait_until_finished()
    finally:
        ckpt.close()


def _read_arrays(path: Path, writer: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(params, state)`` (flat names) of a folder :func:`_write_arrays` (or an earlier version's
    ``model.npz``) wrote; a folder with neither says which function writes one."""
    if (path / ARRAYS).is_dir():
        import jax
        import orbax.checkpoint as ocp
        only_me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                     active_processes={jax.process_index()})
        ckpt = ocp.StandardCheckpointer(multiprocessing_options=only_me)
        try:
            tree = ckpt.restore((path / ARRAYS).absolute())
        finally:
            ckpt.close()
        return ({k: np.asarray(v) for k, v in tree.get("params", {}).items()},
                {k: np.asarray(v) for k, v in tree.get("state", {}).items()})
    if (path / "model.npz").exists():
        with np.load(path / "model.npz") as z:
            return ({k[len("params/"):]: z[k] for k in z.files if k.startswith("params/")},
                    {k[len("state/"):]: z[k] for k in z.files if k.startswith("state/")})
    raise FileNotFoundError(f"{path / ARRAYS} not found: expected a folder written by {writer}")


def save(compacted: Compacted, path: str | Path) -> Path:
    """Write ``path/model`` (an orbax checkpoint of the params and model state) and ``path/architecture.json``;
    returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_arrays(path, {n: np.asarray(v) for n, v in named_leaves(compacted.params)},
                  {n: np.asarray(v) for n, v in named_leaves(compacted.model_state)})
    (path / "architecture.json").write_text(json.dumps(compacted.arch, indent=2) + "\n")
    return path


def load(path: str | Path) -> Compacted:
    """Reload a model written by :func:`save`."""
    path = Path(path)
    arch_file = path / "architecture.json"
    if not arch_file.exists():
        raise FileNotFoundError(f"{arch_file} not found: expected a folder written by "
                                "fairprune_jax.sparsity.compact.save")
    arch = json.loads(arch_file.read_text())
    if arch.get("format") != FORMAT:
        raise ValueError(f"{arch_file}: unknown format {arch.get('format')!r}; expected {FORMAT!r}")
    params, state = _read_arrays(path, "fairprune_jax.sparsity.compact.save")
    return _assemble(arch, params, state)


# ---------------------------------------------------------------------------
# A user's own module
# ---------------------------------------------------------------------------

MODULE_FORMAT = "fairprune_jax.compact_module/1"


def compact_module(fm: FunctionalModel, params: Any, model_state: Any, masks: Any, module: nnx.Module,
                   groups: Sequence[UnitGroup] | None = None) -> nnx.Module:
    """A user's pruned ``module`` with every unit removed by the structured ``masks`` physically dropped: an
    instance of the same class whose layers are smaller (each Conv / Linear's feature counts, a depthwise
    convolution's group count, read off the sliced kernels), computing the masked model's logits.
    ``fm`` / ``params`` / ``model_state``: the module as the library runs it (``fairprune_jax.prune`` wraps it);
    ``groups``: its unit groups (default: traced from the forward pass, :func:`units.traced_unit_groups`)."""
    groups = traced_unit_groups(fm, params, model_state) if groups is None else list(groups)
    check_structured(masks, params, groups)
    _, p, st = slice_groups(fm, params, model_state, masks, groups)
    p = from_view(p, getattr(fm, "views", ()), resized=True)
    graphdef = nnx.split(module, nnx.Param, ...)[0]
    return nnx.merge(rebuild(graphdef, p, st), p, st)


def save_module(module: nnx.Module, path: str | Path) -> Path:
    """Write a (compacted) module's weights and state as ``path/model`` (an orbax checkpoint) plus
    ``path/architecture.json`` (its class and every leaf's shape); :func:`load_module` rebuilds it from an
    instance of the same class."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _, params, rest = nnx.split(module, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    p = {n: np.asarray(v) for n, v in named_leaves(params)}
    # a PRNG key (a Dropout's stream) is written as its key data; load_module wraps it again
    st = {n: np.asarray(jax.random.key_data(v)) if _is_key(v) else np.asarray(v) for n, v in named_leaves(rest)}
    _write_arrays(path, p, st)
    shapes = {**{f"params/{n}": list(v.shape) for n, v in p.items()}, **{f"state/{n}": list(v.shape)
                                                                          for n, v in st.items()}}
    record = {"format": MODULE_FORMAT, "class": f"{type(module).__module__}.{type(module).__qualname__}",
              "shapes": shapes}
    (path / "architecture.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_module(path: str | Path, like: nnx.Module) -> nnx.Module:
    """The module :func:`save_module` wrote, rebuilt from ``like``: any instance of the same class with the
    same layers (the dense model you pruned, say); its widths are replaced by the saved ones."""
    path = Path(path)
    arch_file = path / "architecture.json"
    if not arch_file.exists():
        raise FileNotFoundError(f"{arch_file} not found: expected a folder written by compact.save_module")
    record = json.loads(arch_file.read_text())
    if record.get("format") != MODULE_FORMAT:
        raise ValueError(f"{arch_file}: unknown format {record.get('format')!r}; expected {MODULE_FORMAT!r}")
    cls = f"{type(like).__module__}.{type(like).__qualname__}"
    if record["class"] != cls:
        raise ValueError(f"{path} holds a {record['class']}; like= is a {cls}")
    graphdef, params, rest = nnx.split(like, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    saved = dict(zip(("params", "state"), _read_arrays(path, "compact.save_module")))

    def fill(prefix):
        def one(name, v):
            if name not in saved[prefix]:
                raise ValueError(f"{path} lacks {prefix}/{name}: like= is not the module that was saved")
            if _is_key(v):
                return jax.random.wrap_key_data(jnp.asarray(saved[prefix][name]), impl=jax.random.key_impl(v))
            return jnp.asarray(saved[prefix][name], jnp.asarray(v).dtype)
        return one
    extra = sorted({f"params/{n}" for n in saved["params"]} - {f"params/{n}" for n, _ in named_leaves(params)}
                   | ({f"state/{n}" for n in saved["state"]} - {f"state/{n}" for n, _ in named_leaves(rest)}))
    if extra:
        raise ValueError(f"{path} holds {len(extra)} leaves that like= does not have ({', '.join(extra[:6])}"
                         f"{' ...' if len(extra) > 6 else ''}): like= is not the module that was saved (fewer layers?)")
    p, st = map_named(fill("params"), params), map_named(fill("state"), rest)
    return nnx.merge(rebuild(graphdef, p, st), p, st)


def flops(compacted_or_fm: Any, params: Any = None, model_state: Any = None) -> float:
    """Multiply-accumulates per example of all kernels (dense count of the given model)."""
    from fairprune_jax.models import count_flops
    if isinstance(compacted_or_fm, Compacted):
        c = compacted_or_fm
        return float(sum(count_flops(c.fm, c.params, c.model_state).values()))
    return float(sum(count_flops(compacted_or_fm, params, model_state).values()))



# ---------------------------------------------------------------------------
# Traced models: every coupled group sliced, the module rebuilt at the new widths
# ---------------------------------------------------------------------------

def _is_key(v: Any) -> bool:
    """A typed PRNG key array (an ``nnx.Dropout(rngs=...)``'s stream state): no numpy form of its own."""
    return jax.dtypes.issubdtype(getattr(v, "dtype", None), jax.dtypes.prng_key)


def _host(v: Any) -> Any:
    """A leaf as a numpy array; a PRNG key array is kept as it is (never sliced)."""
    return v if _is_key(v) else np.asarray(v)


def slice_groups(fm: FunctionalModel, params: Any, model_state: Any, masks: Any, groups: Sequence[UnitGroup]
                 ) -> tuple[FunctionalModel, Any, Any]:
    """``(model, params, model_state)`` with every pruned unit of ``masks`` (structured, from
    :func:`units.expand_unit_masks`) physically removed: every member of every group sliced, depthwise
    convolutions' ``feature_group_count`` and the layers' feature counts set from the new shapes. Computes
    the same logits as the masked model."""
    units = unit_masks_of(masks, groups)
    new_p = {n: np.asarray(v) for n, v in named_leaves(params)}
    new_s = {n: _host(v) for n, v in named_leaves(model_state)}
    for g in groups:
        if g.kernel in units and not np.asarray(units[g.kernel]).any():
            raise ValueError(f"compaction: every unit of {g.kernel} is pruned; keep at least one unit per group")
    shapes = {n: np.shape(v) for d in (new_p, new_s) for n, v in d.items()}
    keep = kept_positions(masks, groups, shapes)     # (tree, leaf, axis) -> positions kept, all groups
    for (tree, name, ax), k in keep.items():     # sliced once, after every group (a concatenation's readers
        d = new_p if tree == "p" else new_s      # hold several groups' positions)
        d[name] = np.compress(k, d[name], axis=ax)
    p = map_named(lambda n, _: jnp.asarray(new_p[n]), params)
    st = map_named(lambda n, _: jnp.asarray(new_s[n]), model_state)
    extra = ({"eval_graphdef": rebuild(fm.eval_graphdef, p, st)}
             if getattr(fm, "eval_graphdef", None) is not None else {})
    return dataclasses.replace(fm, graphdef=rebuild(fm.graphdef, p, st), **extra), p, st


def rebuild(graphdef: Any, params: Any, model_state: Any) -> Any:
    """The graphdef of ``graphdef``'s module holding ``params`` / ``model_state`` of other widths: each Conv's and
    Linear's feature counts, and a depthwise convolution's ``feature_group_count``, read off its new kernel."""
    module = nnx.merge(graphdef, params, model_state)
    for _, m in iter_modules(module):
        if isinstance(m, nnx.Conv):
            k = m.kernel.value.shape
            if m.feature_group_count > 1 and k[-2] == 1:      # depthwise: one group per input channel, each
                mult = max(int(m.out_features) // int(m.feature_group_count), 1)   # with its multiplier's outputs
                m.feature_group_count = k[-1] // mult
            m.in_features, m.out_features, m.kernel_shape = k[-2] * m.feature_group_count, k[-1], k
        elif isinstance(m, nnx.Linear):
            m.in_features, m.out_features = m.kernel.value.shape
        elif isinstance(m, nnx.LinearGeneral):
            k, nb, ni = tuple(m.kernel.value.shape), len(m.batch_axis), len(m.in_features)
            m.in_features, m.out_features = k[nb:nb + ni], k[nb + ni:]
        elif isinstance(m, nnx.GroupNorm) and m.group_size == 1:     # one group per channel (the only GroupNorm
            held = next((v for v in (getattr(m, "scale", None), getattr(m, "bias", None))   # the tracer lets lose
                         if isinstance(v, nnx.Variable)), None)                              # channels)
            if held is not None:
                m.num_groups = int(held.get_value().shape[-1])
    for _, m in iter_modules(module):       # after its projections: the head count is read off them
        if isinstance(m, nnx.MultiHeadAttention):
            q, kv = m.query.kernel.value.shape, m.key.kernel.value.shape
            m.in_features, m.in_kv_features, m.out_features = q[0], kv[0], m.out.kernel.value.shape[-1]
            m.num_heads, m.num_kv_heads, m.head_dim = q[-2], kv[-2], q[-1]
            m.qkv_features = q[-2] * q[-1]
    return nnx.split(module, nnx.Param, ...)[0]


__all__ = ["Compacted", "SlimResNet", "UnitGroup", "check_structured", "compact", "expand_unit_masks", "flops",
           "functional_model", "get_leaf", "load", "save", "structured_template", "unit_groups",
           "rebuild", "slice_groups", "unit_masks_of"]
