"""Structured units: which parameters a removed output unit owns, and the masks over them.

A structured mask removes whole output units: Linear output neurons, conv
output channels. For a removed unit to be *exactly* absent (so that the
masked model and the compacted one compute the same function), every
parameter indexed by that unit must be masked, not only the kernel column:

* the layer's own bias (``layers/i/bias``, ``fc/bias``);
* the scale and offset of the BatchNorm right after a conv
  (``norms/i/scale``, ``norms/i/bias``): a zero conv channel still emits
  ``beta - mean * gamma / sqrt(var + eps)`` through BatchNorm otherwise.

With those masked too, a pruned unit outputs exactly 0 in training and in
evaluation mode (BatchNorm of a zero channel with zero scale and offset is
0), ReLU / pooling keep it 0, and the next layer's input row for it is dead.
Compaction then drops the unit's kernel column, bias entry, BatchNorm scale,
offset and running statistics, and the next layer's input row.

A :class:`UnitGroup` records one such set: the producing kernel, its
"companions" (parameters indexed by the same units on axis 0), the BatchNorm
statistics in the model state, and the consuming kernels (input axis -2).
The mask tree of a structured method therefore holds the same 0/1 unit
vector at the kernel *and* its companions (:func:`expand_unit_masks`); this
is the one place where a mask leaf sits on a bias or a norm parameter.

Which units may be removed:

* ``mlp``: every hidden layer's neurons (not the head: its outputs are the classes);
* ``cnn``: every conv's channels and the ``fc`` hidden neurons;
* ``resnet``: only the inner channels of each basic block (``conv1`` output,
  ``bn1``, ``conv2`` input). The stem, ``conv2`` and projection outputs feed
  residual additions whose channels are shared across blocks, so they are
  kept: removing them would couple the masks of a whole stage.

The unit groups of ``mlp`` / ``cnn`` / ``resnet`` are known by name (:func:`unit_groups`); those of
``mobilenet_v2``, ``resnet18`` / ``resnet34``, ``vit`` and a user's own module are coupled groups traced from
the jaxpr of the forward pass (``coupling.py``), or declared (:func:`traced_unit_groups`,
:func:`model_unit_groups`). A coupled group may have several producing kernels (``producers``: the branches of
a residual addition, an attention head's query / key / value), ``units`` other than its kernel's last axis and
``inner`` positions per unit (an attention head of ``inner`` dims; ``inners`` where a member groups them
otherwise: under grouped-query attention a unit is a key / value head, ``head_dim`` positions of the key and
value kernels and ``n_rep * head_dim`` of the query kernel and the output projection's rows): one 0/1 vector over
the units is spread on every member (:func:`unit_index`). Compaction (``compact.py``; ``compact.slice_groups`` for traced models)
removes them physically.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fairprune_jax.models import FunctionalModel, forward_calls
from fairprune_jax.sparsity.masks import leaf_name, map_named, named_leaves


SUPPORTED = ("mlp", "cnn", "resnet")
#: built-in models whose coupled unit groups are traced from the forward pass (``coupling.py``)
TRACED = ("mobilenet_v2", "resnet18", "resnet34", "vit")


@dataclasses.dataclass(frozen=True)
class UnitGroup:
    """Parameters indexed by the output units of one kernel."""

    kernel: str                        # producing kernel, units on its last axis (the unit mask's home)
    companions: tuple[str, ...]        # params with the units on their last axis (bias, BN scale / offset,
                                       # a depthwise kernel)
    stats: tuple[str, ...]             # model-state leaves with the units on their last axis (BN mean / var)
    consumers: tuple[str, ...]         # kernels whose input axis (-2) is indexed by the units
    producers: tuple[str, ...] = ()    # further kernels producing the same units (coupled groups: both branches
                                       # of a residual addition, an attention head's query / key / value)
    units: int = 0                     # how many units (0: the kernel's last axis)
    inner: int = 1                     # consecutive positions per unit: position r of a member axis is unit
                                       # (r // inner) % units (an attention head's dims; a flatten tiles them)
    segments: tuple[tuple[str, int, int], ...] = ()   # (leaf, start, stop): a companion, statistic or consumer
                                       # that reads a concatenation holds this group's units only at positions
                                       # start..stop-1 of its axis (the rest belongs to the other inputs)
    inners: tuple[tuple[str, int], ...] = ()   # (leaf, inner) where a member or consumer groups its positions
                                       # otherwise than ``inner`` (the query heads sharing a key / value head)

    @property
    def members(self) -> tuple[str, ...]:
        """The params that hold the unit mask on their last axis: kernel, further producers, companions."""
        return (self.kernel, *self.producers, *self.companions)

    def inner_of(self, name: str | None) -> int:
        """Positions per unit on the axis of member or consumer ``name`` (``inner`` unless ``inners`` names it)."""
        return next((k for n, k in self.inners if n == name), self.inner)

    def segments_of(self, name: str) -> list[tuple[int, int]]:
        """The ``(start, stop)`` ranges of ``name``'s axis that hold this group's units (empty: the whole axis)."""
        return [(a, b) for n, a, b in self.segments if n == name]


# ---------------------------------------------------------------------------
# Name-addressed access to nested param dicts (nnx lists have int keys)
# ---------------------------------------------------------------------------

def _key(d: dict, part: str):
    if part in d:
        return part
    if part.lstrip("-").isdigit() and int(part) in d:
        return int(part)
    raise KeyError(part)


def get_leaf(tree: dict, name: str) -> Any:
    """The leaf called ``name`` (``'layers/0/kernel'``) of a nested dict."""
    node = tree
    for part in name.split("/"):
        node = node[_key(node, part)]
    return node


def has_leaf(tree: dict, name: str) -> bool:
    try:
        get_leaf(tree, name)
        return True
    except (KeyError, TypeError):
        return False


def group_units(g: UnitGroup, params: Any) -> int:
    """How many units group ``g`` has (its own count, else its kernel's last axis)."""
    return int(g.units) if g.units else int(np.shape(get_leaf(params, g.kernel))[-1])


def unit_index(g: UnitGroup, length: int, unit: Any, name: str | None = None) -> Any:
    """``unit`` (one value per unit of ``g``) spread over the axis of member ``name`` (``length`` positions):
    position ``r`` takes unit ``(r // inner) % len(unit)``, ``inner = g.inner_of(name)``; the vector itself where
    the axis is exactly the units (the plain case, unchanged ops)."""
    n, inner = unit.shape[0], g.inner_of(name)
    if length == n and inner == 1:
        return unit
    idx = (np.arange(length) // inner) % n
    return unit[idx] if isinstance(unit, np.ndarray) else jnp.take(unit, jnp.asarray(idx))


def spread(g: UnitGroup, name: str, length: int, unit: Any) -> Any:
    """``unit`` spread over the axis of member or consumer ``name`` (``length`` positions): :func:`unit_index`
    where the group owns the whole axis; where ``name`` reads a concatenation, the unit values at the group's
    segments and 1 elsewhere (positions of the other inputs, which their own groups mask)."""
    if not g.segments_of(name):
        return unit_index(g, length, unit, name)
    n = unit.shape[0]
    idx = _segment_index(g, name, length, n)
    if isinstance(unit, np.ndarray):
        return np.concatenate([unit, np.ones(1, unit.dtype)])[idx]
    return jnp.take(jnp.concatenate([unit, jnp.ones(1, unit.dtype)]), jnp.asarray(idx))


def gather_units(g: UnitGroup, name: str, per_position: Any, n: int) -> Any:
    """Sum a vector over ``name``'s axis into one value per unit of ``g`` (:func:`spread`'s adjoint for a
    segmented leaf: only the group's segments count)."""
    idx = _segment_index(g, name, per_position.shape[0], n)
    return jax.ops.segment_sum(per_position, jnp.asarray(idx), num_segments=n + 1)[:n]


def _segment_index(g: UnitGroup, name: str, length: int, n: int) -> np.ndarray:
    """Per position of ``name``'s axis, the unit of ``g`` it holds, or ``n`` outside the group's segments."""
    idx = np.full(length, n)
    for a, b in g.segments_of(name):
        idx[a:b] = (np.arange(b - a) // g.inner_of(name)) % n
    return idx


def replace_leaves(tree: Any, new: dict[str, Any]) -> Any:
    """A copy of ``tree`` with the leaves named in ``new`` replaced."""
    return map_named(lambda n, x: new.get(n, x), tree)


# ---------------------------------------------------------------------------
# Model structure
# ---------------------------------------------------------------------------

def unit_groups(model_name: str, params: dict) -> list[UnitGroup]:
    """The removable unit groups of a model, in forward order.

    ``model_name`` is the :class:`FunctionalModel` name (``mlp``, ``cnn``,
    ``resnet``). Raises ``NotImplementedError`` for other architectures.
    """
    def existing(names):
        return tuple(n for n in names if has_leaf(params, n))

    groups: list[UnitGroup] = []
    if model_name == "mlp":
        n = len(params["layers"])
        for i in range(n):
            nxt = f"layers/{i + 1}/kernel" if i + 1 < n else "head/kernel"
            groups.append(UnitGroup(f"layers/{i}/kernel", existing([f"layers/{i}/bias"]), (), (nxt,)))
    elif model_name == "cnn":
        n = len(params["convs"])
        for i in range(n):
            nxt = f"convs/{i + 1}/kernel" if i + 1 < n else "fc/kernel"
            groups.append(UnitGroup(f"convs/{i}/kernel",
                                    existing([f"convs/{i}/bias", f"norms/{i}/scale", f"norms/{i}/bias"]),
                                    (f"norms/{i}/mean", f"norms/{i}/var"), (nxt,)))
        groups.append(UnitGroup("fc/kernel", existing(["fc/bias"]), (), ("head/kernel",)))
    elif model_name in ("resnet", "resnet_slim"):
        for j in range(len(params["blocks"])):
            b = f"blocks/{j}"
            groups.append(UnitGroup(f"{b}/conv1/kernel",
                                    existing([f"{b}/conv1/bias", f"{b}/bn1/scale", f"{b}/bn1/bias"]),
                                    (f"{b}/bn1/mean", f"{b}/bn1/var"), (f"{b}/conv2/kernel",)))
    else:
        raise NotImplementedError(f"structured pruning knows the unit structure of {', '.join(SUPPORTED)}; "
                                  f"got model {model_name!r}")
    return groups


def model_unit_groups(fm: FunctionalModel, params: dict, model_state: dict | None = None) -> list[UnitGroup]:
    """The removable unit groups of ``fm``: a user's module carries its own (``CustomModel.unit_groups``, set by
    ``fairprune_jax.prune``), ``mlp`` / ``cnn`` / ``resnet`` are looked up by name (:func:`unit_groups`), the
    other built-in models (:data:`TRACED`) are traced with ``model_state`` (``coupling.coupled_groups``)."""
    own = getattr(fm, "unit_groups", None)
    if own is not None:
        return list(own)
    if getattr(fm, "initial", None) is not None:
        raise NotImplementedError(f"structured pruning needs the removable units of model {fm.name!r}: run it "
                                  "through fairprune_jax.prune (traced, or declared with units=)")
    if fm.name in TRACED and model_state is not None:
        from fairprune_jax.sparsity.coupling import coupled_groups
        return coupled_groups(fm, params, model_state).groups
    return unit_groups(fm.name, params)


_NORMS = (nnx.LayerNorm, nnx.BatchNorm, nnx.GroupNorm, nnx.RMSNorm)


def _forward_calls(fm: FunctionalModel, params: dict, model_state: dict) -> list[tuple[str, str, int]]:
    """``[(module path, "kernel" | "norm", features)]`` in the order one abstract forward pass calls them
    (evaluation mode); features: a kernel's output units, a norm's scale / offset length."""
    return [(path, "norm" if isinstance(m, _NORMS) else "kernel", int(shape[-1]))
            for path, m, shape in forward_calls(fm, params, model_state, (nnx.Conv, nnx.Linear) + _NORMS)]


def _aligned_consumer(params: dict, producer: str, consumer: str) -> bool:
    """Whether ``consumer``'s input rows (axis -2) are ``producer``'s units, directly or flattened channel-last
    (``h.reshape(n, -1)`` of an NHWC map: row ``r`` is unit ``r % units``)."""
    units = get_leaf(params, producer).shape[-1]
    rows = get_leaf(params, consumer).shape[-2]
    return rows == units or (get_leaf(params, consumer).ndim == 2 and rows % units == 0)


def traced_unit_groups(fm: FunctionalModel, params: dict, model_state: dict,
                       companions: dict[str, Sequence[str]] | None = None) -> list[UnitGroup]:
    """The removable units of any module: its coupled channel groups traced from the jaxpr of its forward pass
    (``coupling.coupled_groups``: residual additions, depthwise convolutions, norms, flattening, attention heads).

    With ``companions`` declared, the older chain reading below gives the consumers instead: every Conv or
    Linear called once, except the last one called (the classifier), is a unit group: its
    output units, with its bias and the scale / offset (and BatchNorm statistics) of the norm layers called
    after it and before the next kernel, when they have as many features. Its consumer is the next kernel
    called, when that kernel's input rows are its units (directly, or flattened channel-last) and the unit
    reaches the output through those rows alone (checked numerically, :func:`_checked_consumers`). This
    reads a chain of layers (conv / norm / activation / dropout / pooling / flatten); a kernel shared by two
    calls, or followed by a norm of another width, is left out. ``companions``: ``{kernel: [leaves]}`` declared by
    the user instead of the traced ones (and then only those kernels are unit groups).
    """
    if companions is None:
        from fairprune_jax.sparsity.coupling import coupled_groups
        return coupled_groups(fm, params, model_state).groups
    calls = _forward_calls(fm, params, model_state)
    kernels = [i for i, c in enumerate(calls) if c[1] == "kernel"]
    uses: dict[str, int] = {}
    for i in kernels:
        uses[calls[i][0]] = uses.get(calls[i][0], 0) + 1
    state_names = {n for n, _ in named_leaves(model_state)}
    groups = []
    for j, i in enumerate(kernels[:-1]):
        path, _, units = calls[i]
        kernel = f"{path}/kernel"
        if uses[path] > 1 or not has_leaf(params, kernel):
            continue
        comps = [f"{path}/bias"] if has_leaf(params, f"{path}/bias") else []
        stats: list[str] = []
        norms = [c for c in calls[i + 1:kernels[j + 1]] if c[1] == "norm"]
        if any(c[2] != units for c in norms):
            continue
        for npath, _, _ in norms:
            comps += [f"{npath}/{leaf}" for leaf in ("scale", "bias") if has_leaf(params, f"{npath}/{leaf}")]
            stats += [f"{npath}/{leaf}" for leaf in ("mean", "var") if f"{npath}/{leaf}" in state_names]
        nxt = f"{calls[kernels[j + 1]][0]}/kernel"
        consumers = (nxt,) if has_leaf(params, nxt) and _aligned_consumer(params, kernel, nxt) else ()
        groups.append(UnitGroup(kernel, tuple(comps), tuple(stats), consumers))
    if companions is None:
        return _checked_consumers(fm, params, model_state, groups)
    traced = {g.kernel: g for g in groups}
    out = []
    for kernel, comps in companions.items():
        if not has_leaf(params, kernel) or getattr(get_leaf(params, kernel), "ndim", 0) < 2:
            raise ValueError(f"units: {kernel!r} is not a kernel of the model; kernels: "
                             f"{', '.join(n for n, v in named_leaves(params) if n.endswith('kernel'))}")
        units = get_leaf(params, kernel).shape[-1]
        for c in comps:
            if not has_leaf(params, c):
                raise ValueError(f"units: {c!r} (declared with {kernel!r}) is not a parameter of the model")
            if get_leaf(params, c).shape[:1] != (units,):
                raise ValueError(f"units: {c!r} has shape {get_leaf(params, c).shape}; a companion of {kernel!r} "
                                 f"needs its {units} units on axis 0")
        stats = tuple(f"{c.rsplit('/', 1)[0]}/{leaf}" for c in comps if c.endswith("/scale")
                      for leaf in ("mean", "var") if f"{c.rsplit('/', 1)[0]}/{leaf}" in state_names)
        consumers = traced[kernel].consumers if kernel in traced else ()
        out.append(UnitGroup(kernel, tuple(comps), stats, consumers))
    return _checked_consumers(fm, params, model_state, out)


def _checked_consumers(fm: FunctionalModel, params: dict, model_state: dict, groups: list[UnitGroup]
                       ) -> list[UnitGroup]:
    """Keep a group's consumer only if the unit reaches the output through the consumer's rows alone.

    Per group, two concrete forward passes (evaluation mode, random inputs) with unit 0 removed: once at the
    producer (kernel column and companions zeroed), once at the consumer (its input rows of the unit zeroed).
    They compute the same logits only when the unit's sole path is the consumer; a residual addition, a
    second reader, a companion the trace missed, or a LayerNorm that mixes the unit into the other channels'
    statistics makes them differ. Such a group keeps producer-side masks, without a consumer (BiFP's
    ``mask_grad=consumer`` then refuses it).
    """
    graphdef = getattr(fm, "eval_graphdef", None) or fm.graphdef
    x = jax.random.normal(jax.random.key(0), (4,) + tuple(fm.input_shape), jnp.float32)
    forward = jax.jit(lambda p: fm.call(nnx.merge(graphdef, fm.module_params(p), model_state), x, False))
    out = []
    for g in groups:
        if g.consumers:
            n = get_leaf(params, g.kernel).shape[-1]
            unit = jnp.ones(n).at[0].set(0.0)
            masks = expand_unit_masks(map_named(lambda name, v: unit if name == g.kernel else None, params),
                                      [g], params)
            producer = jax.tree.map(lambda m, v: v if m is None else v * m.astype(v.dtype), masks, params,
                                    is_leaf=lambda t: t is None)

            def at_consumer(name, v):
                if name not in g.consumers:
                    return v
                rows = jnp.tile(unit, v.shape[-2] // n)
                return v * rows.astype(v.dtype)[:, None]
            a, b = np.asarray(forward(producer)), np.asarray(forward(map_named(at_consumer, params)))
            if not np.allclose(a, b, rtol=1e-5, atol=1e-5 * max(float(np.abs(a).max()), 1.0)):
                g = dataclasses.replace(g, consumers=())
        out.append(g)
    return out


def structured_template(groups: Sequence[UnitGroup], template: Any) -> Any:
    """The kernels of ``template`` (``True`` leaves) that produce a removable unit group.

    Kernels the run keeps dense (``exclude_first``...) stay dense; kernels
    without a unit group (the classifier head, residual-path convs) are never
    pruned structurally. Raises if nothing is left to prune.
    """
    producers = {g.kernel for g in groups}
    out = map_named(lambda n, t: True if (t is True and n in producers) else None, template)
    if not named_leaves(out):
        if not producers:
            raise ValueError("structured pruning: the model has no removable units (no layer whose output units "
                             "can be removed with every parameter that reads them); use an unstructured method")
        raise ValueError("structured pruning: no prunable layer left (every layer with removable units is "
                         "excluded: " + ", ".join(sorted(producers)[:4]) + "); drop the first / last layer "
                         "exclusions (--exclude-first / --exclude-last; exclude_first / exclude_last in a grid's "
                         "[run] or prune()'s config=) or use an unstructured method")
    return out


def expand_unit_masks(unit_masks: Any, groups: Sequence[UnitGroup], params: Any) -> Any:
    """A full mask tree from unit masks: the unit vector at each kernel AND its companions.

    ``unit_masks`` mirrors the params with a vector over output units at
    pruned kernels (``None`` elsewhere). Jittable.
    """
    by_kernel = dict(named_leaves(unit_masks))
    shapes = {n: np.shape(v) for n, v in named_leaves(params)}
    leaf_for: dict[str, Any] = {}
    for g in groups:
        if g.kernel in by_kernel:
            v = by_kernel[g.kernel]
            for c in g.members:
                m = spread(g, c, shapes[c][-1], v)
                leaf_for[c] = m if c not in leaf_for else leaf_for[c] * m   # a norm over a concatenation
    return jax.tree_util.tree_map_with_path(lambda path, p: leaf_for.get(leaf_name(path)), params)


def unit_masks_of(masks: Any, groups: Sequence[UnitGroup]) -> dict[str, np.ndarray]:
    """``{kernel name: 0/1 unit vector}`` of the structured kernel masks in ``masks``."""
    named = dict(named_leaves(masks))
    return {g.kernel: _units_of(g, np.asarray(named[g.kernel])) for g in groups if g.kernel in named}


def _units_of(g: UnitGroup, full: np.ndarray) -> np.ndarray:
    """The unit vector of ``g`` read back from its kernel's mask (the first position of every unit)."""
    if not g.units or (g.units == full.shape[-1] and g.inner == 1):
        return full
    return full[..., : g.units * g.inner: g.inner]


def kept_positions(masks: Any, groups: Sequence[UnitGroup], shapes: dict[str, tuple[int, ...]]
                   ) -> dict[tuple[str, str, int], np.ndarray]:
    """``{(tree, leaf, axis): positions kept}`` of a structured mask over every group: tree ``"p"`` (params) or
    ``"s"`` (model state), axis -1 for the members and statistics, -2 for the consumers' rows; a leaf that
    several groups index (a norm over a concatenation) keeps what all of them keep. ``shapes``: every leaf's
    shape, params and model state by name. What compaction slices (``compact.slice_groups``) and what the
    compacted model's size is counted from (:func:`physical_counts`)."""
    units = unit_masks_of(masks, groups)
    keep: dict[tuple[str, str, int], np.ndarray] = {}
    for g in groups:
        if g.kernel not in units:
            continue
        v = np.asarray(units[g.kernel])
        for tree, names, ax in (("p", (g.kernel, *g.producers, *g.companions), -1), ("s", g.stats, -1),
                                ("p", g.consumers, -2)):
            for name in names:
                if name not in shapes:
                    continue
                k = np.asarray(spread(g, name, shapes[name][ax], v)) != 0
                keep[(tree, name, ax)] = k if (tree, name, ax) not in keep else keep[(tree, name, ax)] & k
    return keep


def physical_counts(params: Any, masks: Any, groups: Sequence[UnitGroup],
                    flops: dict[str, float] | None = None) -> dict[str, Any]:
    """The parameters and multiply-accumulates the compacted model keeps, counted from a structured mask
    without building it: a removed unit takes its producers' columns, its companions' entries and its readers'
    rows with it. The mask-level counts of ``masks.sparsity_summary`` see only the producers' columns (a
    ResNet at 97% structured: 0.65 of the FLOPs from the masks, 0.12 compacted)."""
    shapes = {n: tuple(np.shape(v)) for n, v in named_leaves(params)}
    frac = dict.fromkeys(shapes, 1.0)
    for (tree, name, _), k in kept_positions(masks, groups, shapes).items():
        if tree == "p":
            frac[name] *= float(k.mean()) if k.size else 1.0
    total = sum(int(np.prod(s)) for s in shapes.values())
    kept = sum(int(round(np.prod(s) * frac[n])) for n, s in shapes.items())
    out: dict[str, Any] = {"params_kept": kept, "params_total": total, "params_fraction": kept / max(total, 1)}
    if flops:
        dense = float(sum(flops.values()))
        out["flops_fraction"] = float(sum(f * frac.get(n, 1.0) for n, f in flops.items())) / max(dense, 1.0)
    return out


def check_structured(masks: Any, params: Any, groups: Sequence[UnitGroup]) -> dict[str, np.ndarray]:
    """Validate that ``masks`` is a structured mask compaction can honour; returns the unit masks.

    Every mask leaf must be a unit vector on a group kernel or the same vector
    on one of its companions. Raises ``ValueError`` naming the offending leaf.
    """
    named = dict(named_leaves(masks))
    shapes = {n: np.shape(v) for n, v in named_leaves(params)}
    kernels = {g.kernel: g for g in groups}
    companion_of: dict[str, list[str]] = {}
    for g in groups:
        for c in (*g.producers, *g.companions):
            companion_of.setdefault(c, []).append(g.kernel)
    units, full = {}, {}
    for name, m in named.items():
        m = np.asarray(m)
        if name in kernels:
            if m.shape != shapes[name][-1:]:
                raise ValueError(f"compaction needs structured masks (one value per output unit); the mask of "
                                 f"{name} has shape {m.shape}, the kernel {shapes[name]}. Use a structured "
                                 "method (bifp, structured_magnitude, ...).")
            units[name] = _units_of(kernels[name], m)
            full[name] = m
        elif name not in companion_of:
            raise ValueError(f"compaction cannot remove units of {name}: it is not a removable unit group of "
                             f"this model (removable: {', '.join(kernels)})")
    for name, m in named.items():
        if name in companion_of:
            ks = [k for k in companion_of[name] if k in units]   # a norm over a concatenation has several
            if not ks:
                raise ValueError(f"mask of {name} differs from the mask of its kernel {companion_of[name][0]}")
            want = np.ones(shapes[name][-1], np.asarray(m).dtype)
            for k in ks:
                want = want * spread(kernels[k], name, shapes[name][-1], units[k]).astype(want.dtype)
            if not np.array_equal(np.asarray(m), want):
                raise ValueError(f"mask of {name} differs from the mask of its kernel"
                                 f"{'s' if len(ks) > 1 else ''} {', '.join(ks)}")
    for k, g in kernels.items():
        if k not in units:
            continue
        if not np.array_equal(full[k], unit_index(g, shapes[k][-1], units[k], k)):
            raise ValueError(f"the mask of {k} cuts through its units ({g.units} units of {g.inner} positions "
                             "each, e.g. whole attention heads); mask whole units")
        missing = [p for p in g.producers if p not in named]
        if missing:
            raise ValueError(f"the units of {k} are coupled with {', '.join(missing)} (a residual addition, an "
                             "attention head, ...), which the mask leaves whole: prune a coupled group as one "
                             "(units.expand_unit_masks)")
    return units
