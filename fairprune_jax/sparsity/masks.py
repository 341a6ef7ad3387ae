"""Masks as pytrees that mirror the params.

A mask has the structure of the params; a leaf that is not pruned is
``None``. An unstructured mask leaf has the kernel's shape; a structured mask
leaf is one vector over the kernel's output units (last axis: Linear output
neurons, conv output channels) and broadcasts on use. Masks hold 0/1 in the
params' dtype, so applying one is a multiply that XLA fuses into the step.

Sparsity is always exact: a layer (or, for ``global``, the whole model) keeps
exactly ``round(density * size)`` entries, chosen by score with ties broken
towards the lower flat index, so the same scores always give the same mask.

An N:M distribution (``"2:4"``, ``"4:8"``, ``"1:4"``) keeps the N best of every M consecutive entries along a
kernel's input axis (axis -2: a Linear's inputs, a conv's input channels at each tap), the pattern sparse tensor
cores run natively (NVIDIA Ampere and later, for 2:4); its sparsity is exactly 1 - N/M. Points of a gradual
schedule below that sparsity are unstructured per layer (as ``uniform``); the last one is N:M, with earlier
pruned entries ranked last in their group (a group holding more than M - N of them keeps the best of those,
at their value 0). A kernel whose input axis is not a multiple of M is pruned unstructured at the same density
(:func:`nm_layers` says which are N:M).
"""
from __future__ import annotations

import functools
import json
import os
import math
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.core.config import DISTRIBUTIONS, NM_PATTERNS  # noqa: F401  (re-exported)
from fairprune_jax.core.trees import _is_none, leaf_name, map_named, named_leaves  # noqa: F401  (re-exported)
from fairprune_jax.core.trees import NOT_PRUNED_NAMES as _NOT_PRUNED_NAMES, weight_matrix as _prunable_name  # noqa: F401

Params = Any
Masks = Any



def prunable_template(params: Params, *, layer_order: Iterable[str] | None = None,
                      exclude_first: bool = False, exclude_last: bool = False,
                      exclude: Iterable[str] = ()) -> Masks:
    """Which leaves are pruned: ``True`` for prunable kernels, ``None`` otherwise.

    Kernels (Linear and conv weights, ndim >= 2) are prunable; biases, norm
    scales/offsets, statistics and embeddings are not. ``exclude_first`` /
    ``exclude_last`` keep the first / last layer (in forward order, given by
    ``layer_order``) dense; ``exclude`` lists leaf names kept dense.
    """
    exclude = set(exclude)
    names = [n for n, v in named_leaves(params) if _prunable_name(n, v)]
    if exclude_first or exclude_last:
        full = list(layer_order or [])
        order = [n for n in full if n in names]
        if not order:
            raise ValueError("exclude_first/exclude_last need the forward layer order; "
                             "pass layer_order=models.layer_order(...)")
        # the model's first / last layer, which may already be dense (a ViT's patch embedding, by its name):
        # then there is nothing to exclude, not the next prunable layer (it kept block 0's attention dense)
        if exclude_first and full[0] in names:
            exclude.add(full[0])
        if exclude_last and full[-1] in names:
            exclude.add(full[-1])
    unknown = exclude - set(names)
    if unknown:
        raise ValueError(f"cannot exclude {sorted(unknown)}: not prunable leaves; prunable: {names}")
    return map_named(lambda n, v: True if (_prunable_name(n, v) and n not in exclude) else None, params)


#: a model whose weight matrices kept dense by their *names* (an ``embed`` in the path) hold this share or more
#: of its weight matrices is told so before training (:func:`dense_by_name_note`)
DENSE_BY_NAME_SHARE = 0.1


def dense_by_name_note(params: Params, target: float) -> str | None:
    """A warning when weight matrices named like embeddings (a path holding ``embed``: a token table, the ViT's
    patch embedding) are kept dense and hold :data:`DENSE_BY_NAME_SHARE` or more of the model's weight matrices
    (ndim >= 2, norms and statistics aside): the target sparsity then applies to the rest only, and the model
    as a whole is far less sparse (a user's input projection named ``embed``, 55% of the weights: 0.40
    overall at a target of 0.9). None otherwise."""
    mats = [(n, int(np.size(v))) for n, v in named_leaves(params)
            if getattr(v, "ndim", 0) >= 2 and n.rsplit("/", 1)[-1] not in _NOT_PRUNED_NAMES]
    dense = [(n, k) for n, k in mats if "embed" in n]
    total = sum(k for _, k in mats)
    kept = sum(k for _, k in dense)
    if target <= 0 or not total or kept < DENSE_BY_NAME_SHARE * total:
        return None
    overall = target * (total - kept) / total
    names = ", ".join(f"{n} ({k:,} weights)" for n, k in dense[:5]) + (" ..." if len(dense) > 5 else "")
    return (f"kept dense as embeddings (their names hold 'embed'): {names}, {kept / total:.0%} of the model's "
            f"weight matrices; the target sparsity {target:g} applies to the rest, so the model as a whole will "
            f"be about {overall:.0%} sparse. Rename the layer if it is not an embedding table")


def dense_leaf(t: Any) -> bool:
    """Whether a template leaf keeps its weight dense: ``None`` or ``False`` (a template written with booleans,
    ``jax.tree.map(lambda p: p.ndim >= 2, params)``, marks its dense leaves ``False``)."""
    return t is None or (isinstance(t, (bool, np.bool_)) and not t)


def aligned(tree: Any, like: Any, what: str = "masks") -> Any:
    """``tree`` (masks, a template) in ``like``'s structure: as it is when the two are the same containers, else
    matched by leaf name (masks of a pure params dict for an ``nnx.Optimizer``'s ``nnx.State``, or the reverse),
    ``None`` where ``tree`` has no leaf of that name. A name that ``like`` lacks is refused: masks of another
    model would otherwise be dropped without a word."""
    if tree is None or jax.tree.structure(tree, is_leaf=_is_none) == jax.tree.structure(like, is_leaf=_is_none):
        return tree
    by_name = dict(named_leaves(tree))
    extra = sorted(set(by_name) - {n for n, _ in named_leaves(like)})
    if extra:
        raise ValueError(f"{what} name {len(extra)} leaves the params do not have ({', '.join(extra[:4])}"
                         f"{' ...' if len(extra) > 4 else ''}): {what} of another model?")
    return map_named(lambda n, _: by_name.get(n), like)


def ones_like_template(params: Params, template: Masks, structured: bool = False) -> Masks:
    """An all-ones (dense) mask for the prunable leaves (template leaves ``True``; ``None`` / ``False`` stay
    dense; matched by name when the template is another container than the params)."""
    return jax.tree.map(lambda t, p: None if dense_leaf(t) else jnp.ones(p.shape[-1:] if structured else p.shape,
                                                                         p.dtype),
                        aligned(template, params, "the template"), params, is_leaf=_is_none)


def apply_masks(params: Params, masks: Masks) -> Params:
    """``params * mask`` on masked leaves (structured masks broadcast over the last axis; matched by name when the
    masks are another container than the params)."""
    return jax.tree.map(lambda m, p: p if m is None else p * m.astype(p.dtype), aligned(masks, params), params,
                        is_leaf=_is_none)


def _prune_like(params: Params, template: Masks) -> Params:
    """params restricted to the template's prunable leaves (others become None)."""
    return jax.tree.map(lambda t, p: None if dense_leaf(t) else p, aligned(template, params, "the template"),
                        params, is_leaf=_is_none)


def keep_counts(params: Params, template: Masks, sparsity: float, distribution: str = "uniform",
                structured: bool = False) -> dict[str, int]:
    """How many entries each prunable leaf keeps at ``sparsity`` (host-side, exact integers).

    ``uniform``: every layer keeps ``round((1 - s) * n_l)``. ``erk``: densities
    proportional to (sum of dims) / (product of dims) (Evci et al. 2020), layers
    that would exceed density 1 are kept dense and the rest re-solved; the
    total kept equals ``round((1 - s) * N)``. ``global`` has no per-layer
    counts (one ranking over all layers); it returns the total under ``'*'``.
    """
    check_sparsity(sparsity)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown sparsity distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")
    nm = nm_pattern(distribution)
    if nm is not None:
        check_nm(sparsity, distribution, structured)
    shapes = {n: p.shape for n, p in named_leaves(_prune_like(params, template))}
    sizes = {n: (int(s[-1]) if structured else int(np.prod(s))) for n, s in shapes.items()}
    total = sum(sizes.values())
    density = 1.0 - sparsity
    if distribution == "global":
        return {"*": int(round(density * total))}
    if distribution == "uniform" or structured or nm is not None:
        return {n: int(round(density * s)) for n, s in sizes.items()}
    # ERK
    raw = {n: sum(shapes[n]) / float(np.prod(shapes[n])) for n in sizes}
    dense: set[str] = set()
    target = density * total
    while True:
        free = [n for n in sizes if n not in dense]
        budget = target - sum(sizes[n] for n in dense)
        if not free or budget <= 0:
            break
        eps = budget / sum(raw[n] * sizes[n] for n in free)
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    counts = {}
    for n in sizes:
        counts[n] = sizes[n] if n in dense else eps * raw[n] * sizes[n]
    # largest-remainder rounding so the total is exact
    floor = {n: int(math.floor(c)) for n, c in counts.items()}
    short = int(round(target)) - sum(floor.values())
    order = sorted(sizes, key=lambda n: (-(counts[n] - floor[n]), n))
    for n in order[:max(short, 0)]:
        floor[n] = min(floor[n] + 1, sizes[n])
    return floor


def check_sparsity(sparsity: float) -> None:
    """A sparsity is a real number in [0, 1): a Python, NumPy or 0-d JAX number (a value read from a config array)."""
    real = (not isinstance(sparsity, (bool, np.bool_, str)) and np.ndim(sparsity) == 0
            and np.issubdtype(np.asarray(sparsity).dtype, np.number)
            and not np.issubdtype(np.asarray(sparsity).dtype, np.complexfloating))
    if not (real and 0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1) (e.g. 0.9 for 90% of weights removed); got {sparsity!r}")


def topk_mask(scores: jax.Array, k: jax.Array | int) -> jax.Array:
    """0/1 mask keeping the ``k`` highest scores; ties go to the lower flat index.

    ``k`` may be traced, so one compiled function serves every sparsity.
    NaN scores rank lowest, below ``-inf``.
    """
    flat = scores.reshape(-1)
    nan = jnp.isnan(flat)
    # Primary key: NaN last; secondary: score descending; lexsort is stable (lower index first).
    order = jnp.lexsort((jnp.where(nan, 0.0, -flat), nan))
    ranks = jnp.empty_like(order).at[order].set(jnp.arange(flat.size, dtype=order.dtype))
    return (ranks < k).astype(jnp.float32).reshape(scores.shape)


def masks_from_scores(scores: Params, template: Masks, sparsity: float, distribution: str = "uniform",
                      *, params: Params | None = None, prev_masks: Masks | None = None,
                      structured: bool = False) -> Masks:
    """Masks at exact ``sparsity`` from per-leaf scores.

    ``scores`` mirrors the params (structured: one score per output unit).
    Entries already pruned in ``prev_masks`` rank below every live entry
    (a live NaN score ranks with ``-inf``, above the pruned entries), so
    gradual schedules never revive a pruned weight.
    """
    shapes_src = params if params is not None else scores
    counts = keep_counts(shapes_src, template, sparsity, distribution, structured=structured)
    return masks_from_counts(_prune_like(scores, template), counts, prev_masks=prev_masks,
                             distribution=distribution)


def masks_from_counts(scores: Params, counts: dict, *, prev_masks: Masks | None = None,
                      distribution: str = "uniform") -> Masks:
    """Masks keeping ``counts[name]`` entries of each scored leaf (``counts['*']`` in all for ``global``).

    ``scores`` has ``None`` on leaves that are not pruned. The counts may be
    traced integers (e.g. one row of a table picked by the step), so this runs
    inside a jitted optimizer update; ``prev_masks`` as in :func:`masks_from_scores`.
    """
    if prev_masks is not None:
        # pruned -> NaN (ranks below everything); live NaN -> -inf (stays above the pruned entries)
        scores = jax.tree.map(lambda m, s: None if m is None else
                              jnp.where(m > 0, jnp.where(jnp.isnan(s), -jnp.inf, s), jnp.nan),
                              prev_masks, scores, is_leaf=_is_none)
    if distribution == "global":
        return _global_topk(scores, jnp.asarray(counts["*"]))
    counts_tree = map_named(lambda n, _: jnp.asarray(counts[n]), scores)
    nm = nm_pattern(distribution)
    if nm is not None:
        return _layer_nm(scores, counts_tree, nm)
    return _layer_topk(scores, counts_tree)


def nm_pattern(distribution: str) -> tuple[int, int] | None:
    """``(N, M)`` of an N:M distribution name such as ``"2:4"``; None for the others."""
    if distribution not in NM_PATTERNS:
        return None
    n, m = (int(v) for v in distribution.split(":"))
    return n, m


def check_nm(sparsity: float, distribution: str, structured: bool = False) -> None:
    """An N:M pattern reaches exactly 1 - N/M; a higher target, or a structured mask, is an error."""
    n, m = nm_pattern(distribution)
    if structured:
        raise ValueError(f"{distribution} is a pattern of single weights; a structured (unit) mask cannot follow it")
    if sparsity > 1.0 - n / m + 1e-9:
        raise ValueError(f"{distribution} keeps {n} of every {m} weights, a sparsity of exactly {1 - n / m:g}; "
                         f"{sparsity:g} is above it (use --sparsity {1 - n / m:g}, or an unstructured distribution)")


def nm_layers(params: Params, template: Masks, distribution: str) -> dict[str, bool]:
    """Per prunable leaf, whether it gets the N:M pattern (its input axis a multiple of M) or stays unstructured."""
    n, m = nm_pattern(distribution)
    return {name: p.ndim >= 2 and p.shape[-2] % m == 0 for name, p in named_leaves(_prune_like(params, template))}


def nm_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
    """0/1 mask keeping the ``n`` highest scores of every ``m`` consecutive entries along axis -2 (ties to the
    lower index, NaN lowest); axis -2 must be a multiple of ``m``."""
    x = jnp.moveaxis(scores, -2, -1)
    shape = x.shape
    g = x.reshape(shape[:-1] + (shape[-1] // m, m))
    nan = jnp.isnan(g)
    val = jnp.where(nan, 0.0, g)
    i = jnp.arange(m)
    a_nan, b_nan = nan[..., :, None], nan[..., None, :]          # a: the entry ranked, b: the others
    a, b = val[..., :, None], val[..., None, :]
    before = (i[None, :] < i[:, None])
    beats = (~b_nan & a_nan) | ((b_nan == a_nan) & ((b > a) | ((b == a) & before)))
    rank = jnp.sum(beats, axis=-1)
    keep = (rank < n).astype(jnp.float32).reshape(shape)
    return jnp.moveaxis(keep, -1, -2)


@functools.partial(jax.jit, static_argnums=2)
def _layer_nm(scores: Params, counts: Params, nm: tuple[int, int]) -> Masks:
    n, m = nm

    def leaf(s, k):
        if s is None:
            return None
        top = topk_mask(s, k)
        if s.ndim < 2 or s.shape[-2] % m:
            return top
        return jnp.where(k == s.size * n // m, nm_mask(s, n, m), top)

    return jax.tree.map(leaf, scores, counts, is_leaf=_is_none)


@jax.jit
def _layer_topk(scores: Params, counts: Params) -> Masks:
    return jax.tree.map(lambda s, k: None if s is None else topk_mask(s, k), scores, counts, is_leaf=_is_none)


@jax.jit
def _global_topk(scores: Params, k: jax.Array) -> Masks:
    leaves, treedef = jax.tree.flatten(scores)
    flat = jnp.concatenate([jnp.ravel(l).astype(jnp.float32) for l in leaves])
    m = topk_mask(flat, k)
    out, start = [], 0
    for l in leaves:
        out.append(m[start:start + l.size].reshape(l.shape))
        start += l.size
    return jax.tree.unflatten(treedef, out)


def sparsity_summary(params: Params, masks: Masks, flops: dict[str, float] | None = None) -> dict:
    """Per-layer and overall sparsity; parameters and FLOPs remaining.

    Counts are read from the masks (structured masks count every weight of a
    removed unit). Overall numbers include the leaves that are never pruned.
    FLOPs remaining scale each kernel's dense FLOPs by its density.
    """
    layers = {}
    total_params = kept_params = 0
    prunable_total = prunable_kept = 0
    mask_by_name = dict(named_leaves(masks))
    for name, p in named_leaves(params):
        size = int(np.prod(p.shape))
        m = mask_by_name.get(name)
        if m is None:
            kept = size
        else:
            m = np.asarray(m)
            kept = int(np.broadcast_to(m, p.shape).astype(bool).sum())
            prunable_total += size
            prunable_kept += kept
            layers[name] = {"size": size, "kept": kept, "sparsity": 1.0 - kept / size,
                            "structured": m.shape != tuple(p.shape)}
            if flops is not None and name in flops:
                layers[name]["flops"] = flops[name]
                layers[name]["flops_kept"] = flops[name] * kept / size
        total_params += size
        kept_params += kept
    out = {
        "layers": layers,
        "params_total": total_params,
        "params_kept": kept_params,
        "sparsity_overall": 1.0 - kept_params / max(total_params, 1),
        "prunable_total": prunable_total,
        "prunable_kept": prunable_kept,
        "sparsity_prunable": 1.0 - prunable_kept / prunable_total if prunable_total else 0.0,
    }
    if flops is not None:
        dense_flops = sum(flops.values())
        kept_flops = sum(layers[n].get("flops_kept", flops[n]) if n in layers else flops[n] for n in flops)
        out["flops_total"] = dense_flops
        out["flops_kept"] = kept_flops
        out["flops_fraction"] = kept_flops / max(dense_flops, 1.0)
    return out


def format_sparsity(summary: dict) -> str:
    """A short text table of a :func:`sparsity_summary`."""
    lines = [f"{'layer':40s} {'size':>10s} {'kept':>10s} {'sparsity':>9s}"]
    for n, d in summary["layers"].items():
        lines.append(f"{n:40s} {d['size']:>10d} {d['kept']:>10d} {d['sparsity']:>9.4f}")
    lines.append(f"{'prunable total':40s} {summary['prunable_total']:>10d} {summary['prunable_kept']:>10d} "
                 f"{summary['sparsity_prunable']:>9.4f}")
    lines.append(f"{'all params':40s} {summary['params_total']:>10d} {summary['params_kept']:>10d} "
                 f"{summary['sparsity_overall']:>9.4f}")
    if "flops_fraction" in summary:
        lines.append(f"FLOPs remaining: {summary['flops_fraction']:.4f} of {summary['flops_total']:.3g} MACs/example")
    return "\n".join(lines)


def save_masks(path: Path, masks: Any, report: dict | None = None, **arrays: Any) -> Path:
    """``.npz`` with one array per mask leaf (named like ``layers/0/kernel``), extra arrays, and the report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {n: np.asarray(m) for n, m in named_leaves(masks)}
    for prefix, tree in arrays.items():
        content.update({f"{prefix}/{n}": np.asarray(v) for n, v in named_leaves(tree)})
    if report is not None:
        content["__report__"] = np.array(json.dumps(report))
    if not path.name.endswith(".npz"):          # (as np.savez names it)
        path = path.with_name(path.name + ".npz")
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:         # whole or not at all: a run killed mid-write leaves no torn file
        np.savez(f, **content)
    os.replace(tmp, path)
    return path


def load_masks(path: str | Path) -> tuple[dict[str, np.ndarray], dict | None]:
    """Inverse of :func:`save_masks`: ``({leaf name: array}, report)``."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "__report__"}
        report = json.loads(str(z["__report__"])) if "__report__" in z.files else None
    return arrays, report
