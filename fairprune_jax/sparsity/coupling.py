"""Coupled channel groups traced from the jaxpr of a model's forward pass, not from layer names.

:func:`coupled_groups` traces ``jax.make_jaxpr`` of the evaluation-mode forward pass with the params, the model
state and the input as arguments, gives every axis of every value an optional *channel space* and merges spaces
with union-find: elementwise operations merge the spaces of their operands axis by axis (a residual addition ties
the producers of both branches; a bias, a norm's scale / offset, BatchNorm's running statistics and any other
per-channel parameter become members of the space they combine with); a ``dot_general`` or convolution merges
each contracted axis of its operands (a kernel's input rows, axis -2, join the space of the activation it reads)
and its output axes carry the operands' free axes (a kernel's last axis is a space of its own: a producer); a
depthwise convolution (``feature_group_count`` equal to the channels) ties its input, output and the kernel's
last axis, and our shifted depthwise convolution is slices and per-channel products, which the elementwise rule
covers; unary elementwise operations, broadcasts, transposes, pads / slices / pooling windows over other axes
and reductions over other axes pass spaces through. A reshape that merges axes into one (a channel-last flatten,
an attention output's ``(heads, head_dim)``) makes the new axis a *derived* space: position ``r`` is unit
``(r // inner) % units`` of the outermost channel axis it merged; a reshape that splits a channel axis into
``(heads, head_dim)`` makes the flat space derived from the heads, so q, k, v, their biases and the output
projection's rows of one head form one group (whole heads are pruned; the head_dim part stays whole). A
concatenation on the channel axis (DenseNet's blocks, Inception's branches, a head reading several layers) gives
its output a space of *segments*: whatever reads it (a BatchNorm's scale / offset / statistics, a kernel's rows)
holds each input's units at that input's offset (``UnitGroup.segments``: ``(leaf, start, stop)``), so each input
stays its own group and a norm over the concatenation is masked and sliced piecewise; a reason on the
concatenation (a LayerNorm over it, the logits) refuses every input. Refused,
with a reason that names the operation (``"channel space of blocks/3/conv2 reaches 'cumsum', which fairprune
cannot trace"``): a space that reaches the logits or the model input, one reduced over (a LayerNorm / GroupNorm /
mean over channels: removing a channel would change the others' statistics, so the masked model would not equal
the compacted one), a slice / pad / window over the channel axis, a concatenation that a reshape regroups (a
flatten of it) or that a kernel's output is added to, a grouped convolution that
is not depthwise, a parameter holding the channels on an axis other than its last or (kernel rows) its
second-to-last, and any primitive the tracer does not know. Each accepted space is a :class:`units.UnitGroup`
(lead kernel, further producers, companions, BatchNorm statistics, consumers, units and ``inner``) that passed a
numerical check (:func:`check_groups`): with units removed at the producers, zeroing their consumer rows as well,
or only those rows, gives the same logits, so pruned units output exactly zero where they are read and BiFP's
consumer-side mask computes the same function. ``compact.slice_groups`` removes the pruned units physically (every
member of every group, ``feature_group_count`` of depthwise convolutions) and rebuilds the nnx module: the
masked model and the sliced one compute the same logits.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairprune_jax.models import FunctionalModel
from fairprune_jax.sparsity.masks import leaf_name, map_named
from fairprune_jax.sparsity.units import UnitGroup, group_units, spread

#: primitives whose output has the operand's axes (values change, channels do not move)
UNARY = frozenset("""neg exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh asinh acosh
atanh abs sign sqrt rsqrt cbrt erf erfc erf_inv integer_pow square convert_element_type copy copy_p
reduce_precision stop_gradient is_finite not floor ceil round real imag conj lgamma digamma
optimization_barrier sharding_constraint""".split())
#: elementwise primitives of several operands (equal shapes, or rank-0 scalars)
NARY = frozenset("""add add_any sub mul div rem pow max min atan2 nextafter and or xor eq ne lt le gt ge select_n
clamp""".split())
REDUCE = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split())
WINDOW = frozenset("reduce_window_max reduce_window_min reduce_window_sum reduce_window".split())
CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
CALL_PRIMS = frozenset("jit pjit closed_call core_call custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr "
                       "remat checkpoint".split())


class _Spaces:
    """Union-find over channel spaces: size, members ``(tree, leaf, axis)``, reasons, derived-from links."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.members: dict[int, list[tuple[str, str, int]]] = {}
        self.reasons: dict[int, list[str]] = {}
        self.derived: dict[int, tuple[int, int]] = {}     # root -> (space it is derived from, inner)
        self.inner_of: dict[int, int] = {}                # inner piece of a split -> the outer piece
        self.concat: dict[int, list[tuple[int | None, int, int]]] = {}   # root -> its (input space, offset,
        #                                                   size) segments, for the output of a concatenation

    def new(self, size: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        if reason:
            self.reasons[len(self.parent) - 1] = [reason]
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def block(self, a: int | None, reason: str) -> None:
        if a is not None:
            r = self.reasons.setdefault(self.find(a), [])
            if reason not in r:
                r.append(reason)

    def union(self, a: int | None, b: int | None) -> int | None:
        if a is None or b is None:
            return b if a is None else a
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            self.block(ra, f"is combined with a channel axis of another size ({self.size[ra]} vs {self.size[rb]})")
            self.block(rb, f"is combined with a channel axis of another size ({self.size[rb]} vs {self.size[ra]})")
            return ra
        da, db = self.derived.pop(ra, None), self.derived.pop(rb, None)
        self.parent[rb] = ra
        self.members.setdefault(ra, []).extend(self.members.pop(rb, []))
        for r in self.reasons.pop(rb, []):
            self.block(ra, r)
        if da and db and (self.find(da[0]) != self.find(db[0]) or da[1] != db[1]):
            self.block(ra, "groups its channel positions in two different ways (two reshapes)")
        if da or db:
            self.derived[ra] = da or db
        ca, cb = self.concat.pop(ra, None), self.concat.pop(rb, None)
        if ca and cb and [(None if a is None else self.find(a), o, n) for a, o, n in ca] != \
                [(None if a is None else self.find(a), o, n) for a, o, n in cb]:
            self.block(ra, "is combined with a concatenation of other inputs")
        if (ca or cb) and (da or db):
            self.block(ra, "is a concatenation whose positions a reshape regroups")
        if ca or cb:
            self.concat[ra] = ca or cb
        if rb in self.inner_of:
            self.inner_of.setdefault(ra, self.inner_of.pop(rb))
        return ra

    def resolve(self, a: int) -> tuple[int, int]:
        """``(root of the space that owns a's units, inner)``: follows derived-from links."""
        r, inner, seen = self.find(a), 1, set()
        while r in self.derived and r not in seen:
            seen.add(r)
            t, k = self.derived[r]
            r, inner = self.find(t), inner * k
        if r in seen:
            self.block(r, "is derived from itself through reshapes")
        return r, inner


def _is_literal(v) -> bool:
    return type(v).__name__ == "Literal"


class _Tracer:
    """Walks a jaxpr; ``env`` maps each variable to the space of each of its axes (``None``: no channel)."""

    def __init__(self):
        self.s = _Spaces()
        self.leaf_of: dict[Any, str] = {}       # variables that are a parameter leaf (through casts and calls)
        self.kernels: dict[str, int] = {}       # dense dot / conv operands -> first use (forward order)
        self.first_use: dict[str, int] = {}
        self.count = 0

    def axes(self, env, v) -> tuple:
        if _is_literal(v):
            return (None,) * len(getattr(v.aval, "shape", ()))
        return env.get(v, (None,) * len(v.aval.shape))

    def run(self, jaxpr, env: dict) -> None:
        for eqn in jaxpr.eqns:
            self.count += 1
            for v in eqn.invars:
                if not _is_literal(v) and v in self.leaf_of:
                    self.first_use.setdefault(self.leaf_of[v], self.count)
            outs = self.eqn(eqn, env)
            for v, a in zip(eqn.outvars, outs):
                if type(v).__name__ != "DropVar":
                    env[v] = tuple(a)

    def eqn(self, eqn, env) -> list[tuple]:
        name, p, s = eqn.primitive.name, eqn.params, self.s
        ins = [self.axes(env, v) for v in eqn.invars]
        shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
        out_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
        sub = next((p[k] for k in CALLS if k in p), None)
        if name in CALL_PRIMS and sub is not None:
            inner = getattr(sub, "jaxpr", sub)
            n = len(inner.invars)
            sub_env = dict(zip(inner.invars, ins[len(ins) - n:]))
            for iv, ov in zip(inner.invars, eqn.invars[len(ins) - n:]):
                if not _is_literal(ov) and ov in self.leaf_of:
                    self.leaf_of[iv] = self.leaf_of[ov]
            self.run(inner, sub_env)
            return [self.axes(sub_env, v) for v in inner.outvars]
        if name in UNARY:
            if name in ("convert_element_type", "copy", "copy_p") and eqn.invars[0] in self.leaf_of:
                self.leaf_of[eqn.outvars[0]] = self.leaf_of[eqn.invars[0]]
            return [ins[0]] * len(out_shapes)
        if name in NARY:
            rank = len(out_shapes[0])
            return [tuple(self._union_all(a[i] for a in ins if len(a) == rank) for i in range(rank))]
        if name == "broadcast_in_dim":
            out = [None] * len(out_shapes[0])
            for i, d in enumerate(p["broadcast_dimensions"]):
                if shapes[0][i] == out_shapes[0][d]:
                    out[d] = ins[0][i]
            return [tuple(out)]
        if name == "transpose":
            return [tuple(ins[0][i] for i in p["permutation"])]
        if name == "squeeze":
            return [tuple(a for i, a in enumerate(ins[0]) if i not in set(d % len(ins[0]) for d in p["dimensions"]))]
        if name == "reshape":
            if eqn.invars[0] in self.leaf_of:      # a kernel used in another shape (a 2-D view's true shape)
                self.leaf_of[eqn.outvars[0]] = self.leaf_of[eqn.invars[0]]
            return [self.reshape(ins[0], shapes[0], out_shapes[0])]
        if name in REDUCE:
            axes = set(p["axes"])
            for i in axes:
                s.block(ins[0][i], f"is reduced over its channels by '{name}' (a LayerNorm / GroupNorm or a mean "
                                   "over channels: removing a channel changes what the others see)")
            return [tuple(a for i, a in enumerate(ins[0]) if i not in axes)] * len(out_shapes)
        if name in ("pad", "slice", "dynamic_slice", "rev") or name in WINDOW:
            return [self.windowed(name, p, ins[0], shapes[0], out_shapes[0])]
        if name == "dot_general":
            return [self.dot(eqn, ins, shapes)]
        if name == "conv_general_dilated":
            return [self.conv(eqn, ins, shapes, out_shapes[0])]
        if name == "concatenate":
            d = p["dimension"]
            rank = len(out_shapes[0])
            out = [self._union_all(a[i] for a in ins) if i != d else None for i in range(rank)]
            if any(a[d] is not None for a in ins):      # a channel concatenation: its readers are split into
                out[d] = s.new(out_shapes[0][d])         # segments, each owned by the input it came from
                offsets = np.cumsum([0] + [sh[d] for sh in shapes])
                s.concat[out[d]] = [(a[d], int(o), int(sh[d])) for a, o, sh in zip(ins, offsets, shapes)]
            return [tuple(out)]
        if name in ("iota", "rng_bit_generator", "random_bits", "random_seed", "random_wrap", "random_unwrap"):
            return [(None,) * len(o) for o in out_shapes]
        return self.unknown(name, ins, out_shapes)

    def _union_all(self, spaces) -> int | None:
        out = None
        for a in spaces:
            out = self.s.union(out, a)
        return out

    def unknown(self, name: str, ins, out_shapes) -> list[tuple]:
        why = f"reaches '{name}', which fairprune cannot trace"
        spaced = False
        for a in ins:
            for x in a:
                if x is not None:
                    spaced = True
                    self.s.block(x, why)
        outs = []
        for o in out_shapes:
            axes = [None] * len(o)
            if spaced and o:
                axes[-1] = self.s.new(o[-1], f"comes out of '{name}', which fairprune cannot trace")
            outs.append(tuple(axes))
        return outs

    def reshape(self, ins: tuple, shape: tuple, out: tuple) -> tuple:
        s = self.s
        src = [i for i, n in enumerate(shape) if n != 1]
        dst = [j for j, n in enumerate(out) if n != 1]
        res: list = [None] * len(out)
        i = j = 0
        while i < len(src) and j < len(dst):
            gi, gj = [src[i]], [dst[j]]
            pi, pj = shape[src[i]], out[dst[j]]
            while pi != pj:
                if pi < pj:
                    i += 1
                    gi.append(src[i])
                    pi *= shape[src[i]]
                else:
                    j += 1
                    gj.append(dst[j])
                    pj *= out[dst[j]]
            i, j = i + 1, j + 1
            spaced = [a for a in gi if ins[a] is not None]
            if len(gi) == 1 and len(gj) == 1:
                res[gj[0]] = ins[gi[0]]
            elif not spaced:
                continue
            elif any(s.find(ins[a]) in s.concat for a in spaced):
                why = f"is a concatenation regrouped by a reshape {shape} -> {out} (fairprune splits a " \
                      "concatenation only where kernels, norms and per-channel parameters read it)"
                for a in spaced:
                    s.block(ins[a], why)
                for b in gj:
                    res[b] = s.new(out[b], why)
            elif len(gj) == 1:                  # merge: the outermost channel axis owns the units
                a = spaced[0]
                inner = int(np.prod([shape[k] for k in gi if k > a]))
                new = s.new(out[gj[0]])
                s.derived[new] = (ins[a], inner)
                for b in spaced[1:]:
                    s.inner_of.setdefault(s.find(ins[b]), ins[a])
                res[gj[0]] = new
            elif len(gi) == 1 and len(gj) == 2:   # split into (outer, inner): the outer piece owns the units
                outer, inner_piece = s.new(out[gj[0]]), s.new(out[gj[1]])
                flat = s.find(ins[gi[0]])
                if flat in s.derived:
                    s.block(flat, "is split by a reshape after being regrouped by another")
                s.derived[flat] = (outer, out[gj[1]])
                s.inner_of[inner_piece] = outer
                res[gj[0]], res[gj[1]] = outer, inner_piece
            else:
                why = f"is regrouped by a reshape {shape} -> {out} that fairprune cannot follow"
                for a in spaced:
                    s.block(ins[a], why)
                for b in gj:
                    res[b] = s.new(out[b], why)
        return tuple(res)

    def windowed(self, name: str, p: dict, ins: tuple, shape: tuple, out: tuple) -> tuple:
        """pad / slice / reverse / pooling windows: an axis passes through where the operation leaves it whole."""
        res = []
        for i, a in enumerate(ins):
            whole = shape[i] == out[i]
            if name == "pad":
                whole = tuple(p["padding_config"][i]) == (0, 0, 0)
            elif name == "slice":
                whole = whole and (p["strides"] is None or p["strides"][i] == 1)
            elif name == "rev":
                whole = i not in p["dimensions"]
            elif name in WINDOW:
                whole = whole and p["window_dimensions"][i] == 1
            if a is not None and not whole:
                self.s.block(a, f"has its channel axis cut or mixed by '{name}'")
                a = None
            res.append(a if whole else None)
        return tuple(res)

    def dot(self, eqn, ins, shapes) -> tuple:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        la, ra = ins
        for x, y in zip(lc, rc):
            self.s.union(la[x], ra[y])
        batch = [self.s.union(la[x], ra[y]) for x, y in zip(lb, rb)]
        lfree = [i for i in range(len(la)) if i not in lc and i not in lb]
        rfree = [i for i in range(len(ra)) if i not in rc and i not in rb]
        for v, free in zip(eqn.invars, (lfree, rfree)):
            if not _is_literal(v) and v in self.leaf_of and free:
                self.kernels.setdefault(self.leaf_of[v], self.count)
        return tuple(batch + [la[i] for i in lfree] + [ra[i] for i in rfree])

    def conv(self, eqn, ins, shapes, out_shape) -> tuple:
        p, s = eqn.params, self.s
        dn = p["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        la, ra = ins
        cin = shapes[0][lhs_spec[1]]
        groups = p["feature_group_count"]
        out = [None] * len(out_shape)
        if p.get("batch_group_count", 1) != 1 or (groups != 1 and not (
                groups == cin and shapes[1][rhs_spec[1]] == 1 and shapes[1][rhs_spec[0]] == cin)):
            why = f"passes through a grouped 'conv_general_dilated' (feature_group_count={groups}) that is not depthwise"
            for a in (la[lhs_spec[1]], ra[rhs_spec[0]], ra[rhs_spec[1]]):
                s.block(a, why)
            out[out_spec[1]] = s.new(out_shape[out_spec[1]], why)
            return tuple(out)
        if groups == 1:
            s.union(la[lhs_spec[1]], ra[rhs_spec[1]])
            out[out_spec[1]] = ra[rhs_spec[0]]
            if eqn.invars[1] in self.leaf_of:
                self.kernels.setdefault(self.leaf_of[eqn.invars[1]], self.count)
        else:                                   # depthwise: input, output and the kernel's last axis are one space
            out[out_spec[1]] = s.union(la[lhs_spec[1]], ra[rhs_spec[0]])
        return tuple(out)


@dataclasses.dataclass
class Coupling:
    """What :func:`coupled_groups` found: the groups and, per refused space with a producer, why."""

    groups: list[UnitGroup]
    refused: dict[str, str]


def _forward(fm: FunctionalModel, model_state: Any):
    return lambda p, s, x: fm.apply(p, s, x, train=False)[0]


def trace(fm: FunctionalModel, params: Any, model_state: Any, batch: int = 2) -> Coupling:
    """The coupled groups of ``fm`` from one ``jax.make_jaxpr`` of its evaluation-mode forward pass (no
    numerical check; :func:`coupled_groups` adds it)."""
    x = jax.ShapeDtypeStruct((batch,) + tuple(fm.input_shape), jnp.float32)
    closed = jax.make_jaxpr(_forward(fm, model_state))(params, model_state, x)
    jaxpr = closed.jaxpr
    t = _Tracer()
    s = t.s
    flat = [("p", leaf_name(path), v) for path, v in jax.tree_util.tree_flatten_with_path(params)[0]]
    flat += [("s", leaf_name(path), v) for path, v in jax.tree_util.tree_flatten_with_path(model_state)[0]]
    env: dict = {}
    n_in = len(jaxpr.invars)
    for (tree, name, _), var in zip(flat, jaxpr.invars[:n_in - 1]):
        shape = tuple(var.aval.shape)
        axes = []
        for ax, size in enumerate(shape):
            sp = s.new(size)
            s.members[sp] = [(tree, name, ax)]
            axes.append(sp)
        env[var] = tuple(axes)
        if tree == "p":
            t.leaf_of[var] = name
    xv = jaxpr.invars[-1]
    env[xv] = (None,) * (len(xv.aval.shape) - 1) + (s.new(xv.aval.shape[-1], "reaches the model input"),)
    t.run(jaxpr, env)
    for v in jaxpr.outvars:
        for a in t.axes(env, v):
            s.block(a, "reaches the network output (the logits)")
    return _groups(t, {n: np.shape(v) for tree, n, v in flat if tree == "p"},
                   {n: np.shape(v) for tree, n, v in flat if tree == "s"})


def _groups(t: _Tracer, pshapes: dict, sshapes: dict) -> Coupling:
    s = t.s
    owned: dict[int, list] = {}
    reasons: dict[int, list[str]] = {}

    def place(target: int, inner: int, members: list, seg: tuple[int, int] | None, why: list[str],
              depth: int = 0) -> None:
        """Members reading ``target`` (at positions seg[0]..seg[1]-1 of their axis; None: the whole axis); a
        concatenation's readers go to each input's space at that input's offset, with the concatenation's
        reasons (a LayerNorm over a concatenation refuses every input)."""
        if target in s.concat and depth < 64:
            why = why + s.reasons.get(target, [])
            base = seg[0] if seg else 0
            for sp, off, n in s.concat[target]:
                if sp is not None:
                    t2, in2 = s.resolve(sp)
                    place(t2, in2, members, (base + off, base + off + n), why, depth + 1)
            return
        owned.setdefault(target, []).extend((tree, leaf, ax, inner, seg) for tree, leaf, ax in members)
        reasons.setdefault(target, []).extend(why)

    for r in {s.find(i) for i in range(len(s.parent))}:
        target, inner = s.resolve(r)
        place(target, inner, s.members.get(r, []), None, s.reasons.get(r, []))
    for piece, outer in s.inner_of.items():     # what stops a head's dims stops the head, but a reduction over
        target, _ = s.resolve(outer)            # them (a LayerNorm of each head's query / key) stays inside the
        reasons.setdefault(target, []).extend(  # head, which is removed whole (check_groups verifies it)
            r for r in s.reasons.get(s.find(piece), []) if not r.startswith("is reduced over its channels"))
    pieces = {s.resolve(p)[0] for p in s.inner_of}
    groups, refused = [], {}
    for root, members in owned.items():
        members = sorted(set(members), key=lambda m: (t.first_use.get(m[1], 1 << 30), m[:4], m[4] or (-1, -1)))
        producing = [m for m in members if m[0] == "p" and m[1] in t.kernels and len(pshapes[m[1]]) >= 2
                     and m[2] == len(pshapes[m[1]]) - 1]
        producers = [m[1] for m in producing if m[4] is None]
        if not producers:
            continue
        lead = producers[0]
        where = lead[:-len("/kernel")] if lead.endswith("/kernel") else lead
        why = list(dict.fromkeys(reasons.get(root, [])))
        why += [f"is added to a concatenation that {m[1]} produces part of (fairprune splits a concatenation only "
                "where kernels, norms and per-channel parameters read it)" for m in producing if m[4] is not None]
        if root in pieces:
            why.append("is the inner part of a split channel axis (an attention head's dims)")
        per_leaf: dict[str, set[int]] = {}      # positions per unit of each member: one number per leaf (a
        for m in members:                        # query kernel under grouped-query attention groups a key /
            per_leaf.setdefault(m[1], set()).add(m[3])   # value head's n_rep heads, the key kernel one head)
        mixed = sorted(n for n, k in per_leaf.items() if len(k) > 1)
        if mixed:
            why.append(f"is read with different groupings of its positions by {', '.join(mixed)}")
        units, inner = s.size[root], min(per_leaf[lead])
        inners = tuple(sorted((n, min(k)) for n, k in per_leaf.items() if min(k) != inner))
        comps, stats, consumers, segments = [], [], [], []
        for tree, leaf, ax, k, seg in members:
            shape = pshapes[leaf] if tree == "p" else sshapes[leaf]
            length = shape[ax] if seg is None else seg[1] - seg[0]
            if length % (units * k):
                why.append(f"has {leaf} axis {ax} of {length} positions"
                           f"{'' if seg is None else ' (its part of a concatenation)'}, not a multiple of "
                           f"{units * k}")
            if seg is not None:
                segments.append((leaf, int(seg[0]), int(seg[1])))
            if ax == len(shape) - 1:
                (stats if tree == "s" else comps).append(leaf)
            elif tree == "p" and ax == len(shape) - 2:
                consumers.append(leaf)
            else:
                why.append(f"lies on axis {ax} of the {len(shape)}-D {'state' if tree == 's' else 'parameter'} "
                           f"{leaf} (fairprune masks a parameter's last axis and slices a kernel's rows)")
        if why:
            refused[where] = f"channel space of {where} " + "; ".join(why)
            continue
        rest = [c for c in dict.fromkeys(comps) if c != lead]
        groups.append((t.first_use.get(lead, 0), UnitGroup(
            lead, tuple(c for c in rest if c not in producers), tuple(dict.fromkeys(stats)),
            tuple(dict.fromkeys(consumers)), producers=tuple(c for c in rest if c in producers),
            units=units, inner=inner, segments=tuple(segments), inners=inners)))
    return Coupling([g for _, g in sorted(groups, key=lambda x: x[0])], refused)


def _masked_at(params: Any, g: UnitGroup, unit: np.ndarray, where: str) -> Any:
    """``params`` (NumPy leaves) with unit vector ``unit`` applied at the producers and companions
    (``"producer"``), at the consumer rows (``"consumer"``) or both; on the host, one small copy per member."""
    def one(name, v):
        if where != "consumer" and name in g.members:
            v = v * spread(g, name, v.shape[-1], unit).astype(v.dtype)
        if where != "producer" and name in g.consumers:
            v = v * spread(g, name, v.shape[-2], unit).astype(v.dtype)[:, None]
        return v
    return map_named(one, params)


def check_groups(fm: FunctionalModel, params: Any, model_state: Any, groups: Sequence[UnitGroup]
                 ) -> tuple[list[UnitGroup], dict[str, str]]:
    """Keep the groups whose removed units, at the producers, at the producers and consumer rows, or at the
    consumer rows only, give the same logits (random inputs, evaluation mode); the others get a reason. The
    units removed are unit 0 and a random half of the others (fixed seeds): an operation that breaks the
    equivalence at some channels only (a per-channel constant that is 0 at channel 0) is caught at once, at the
    cost of the same three forward passes per group."""
    x = jax.random.normal(jax.random.key(0), (4,) + tuple(fm.input_shape), jnp.float32)
    f = jax.jit(lambda p: _forward(fm, model_state)(p, model_state, x))
    keep, refused = [], {}
    host = map_named(lambda n, v: np.asarray(v), params)
    for i, g in enumerate(groups):
        n = group_units(g, params)
        unit = (np.random.default_rng(i).random(n) >= 0.5).astype(np.float32)
        unit[0] = 0.0
        if n > 1 and not unit.any():
            unit[-1] = 1.0                       # keep one unit: a layer without units is another model
        a, b, c = (np.asarray(f(_masked_at(host, g, unit, w))) for w in ("producer", "both", "consumer"))
        tol = 1e-5 * max(float(np.abs(a).max()), 1.0)
        where = g.kernel[:-len("/kernel")] if g.kernel.endswith("/kernel") else g.kernel
        if not np.allclose(a, b, rtol=1e-5, atol=tol):
            refused[where] = (f"channel space of {where}: a removed channel is not zero where its consumers read "
                              "it (an operation between them maps 0 to a nonzero value)")
        elif not np.allclose(a, c, rtol=1e-5, atol=tol):
            refused[where] = (f"channel space of {where}: its channels reach the output other than through the "
                              "rows of its consumer kernels")
        else:
            keep.append(g)
    return keep, refused


def coupled_groups(fm: FunctionalModel, params: Any, model_state: Any, check: bool = True) -> Coupling:
    """The removable coupled unit groups of any model, traced (:func:`trace`) and checked (:func:`check_groups`)."""
    found = trace(fm, params, model_state)
    if not check:
        return found
    groups, refused = check_groups(fm, params, model_state, found.groups)
    return Coupling(groups, {**found.refused, **refused})


__all__ = ["Coupling", "check_groups", "coupled_groups", "trace"]
