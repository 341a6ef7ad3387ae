"""Training-step time: plain masked fine-tuning vs our CEAG step vs a PyTorch + cooper CEAG step.

What is timed (one optimizer step on one batch, CPU):

* ``jax_plain``  -- :func:`fairprune_jax.training.train.make_train_step` (masked cross-entropy, Adam).
* ``jax_ceag``   -- :func:`fairprune_jax.methods.ceag.make_constrained_step` with
  :func:`~fairprune_jax.methods.ceag.ceag_terms` and :func:`~fairprune_jax.constraints.constrained.dual_from_options`
  (the very step ``ceag()`` fine-tunes with: one inequality constraint per group, proxy = loss-based
  excess gap, strict = accuracy gap from replay buffers, alternating dual-then-primal, dual SGD 1e-2).
* ``torch_plain`` -- the same masked fine-tuning step in eager PyTorch (reference only).
* ``torch_cooper`` -- the same CEAG step in PyTorch on ``cooper-optim`` (1.0.x):
  a ``cooper.ConstrainedMinimizationProblem`` with one ``cooper.Constraint`` of G inequality
  constraints (``DenseMultiplier``), ``ConstraintState(violation=proxy, strict_violation=buffer gap)``,
  ``cooper.optim.AlternatingDualPrimalOptimizer`` with ``SGD(lr=1e-2, maximize=True)`` for the dual
  and Adam for the primal; weights are multiplied by their mask in the forward pass and re-masked
  after the step; replay buffers are plain vectorized torch.

Both frameworks start from the same weights, masks (90% unstructured sparsity on every kernel) and
batches, and a short equivalence check compares their trajectories before timing.

Inputs are synthetic (random features/images, labels and group ids): step time does not depend on the
values. Settings: ``mlp`` = our MLP (256-128, ReLU) on Adult-sized rows (104 features, 2 classes);
``cnn`` = our CNN (conv3x3-BN-ReLU x [32, 64, 128], 2x2 max pool after the first two, global average
pool, Linear 128, ReLU, Linear head) on UTKFace-sized images (32x32x3, 5 classes).

Timing: after warm-up (compilation), ``--repeats`` rounds; in each round every variant runs
``--steps`` steps back to back (JAX: asynchronous dispatch, one ``jax.block_until_ready`` at the end
of the round) and the round time / steps is one sample. Variants are interleaved round by round so
background load hits them alike; we report the median (and min) ms/step.

Usage::

    python benchmarks/ceag_step.py                       # full run, writes benchmarks/results/
    python benchmarks/ceag_step.py --quick               # fewer rounds
    python benchmarks/ceag_step.py --models cnn --groups 10 --xla-sweep --profile
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SETTINGS = {
    "mlp": {"input_shape": (104,), "num_classes": 2, "what": "MLP 256-128 on Adult-sized rows (104 features, 2 classes)"},
    "cnn": {"input_shape": (32, 32, 3), "num_classes": 5,
            "what": "CNN 32-64-128 on UTKFace-sized images (32x32x3, 5 classes)"},
}
# (steps per round, rounds) per model: full / --quick
SCHEDULE = {"mlp": {"full": (25, 15), "quick": (20, 7)}, "cnn": {"full": (2, 7), "quick": (2, 4)}}

XLA_VARIANTS = [
    ("default (YNNPACK convolutions)", ""),
    ("YNNPACK fusions off (Eigen convolutions)", "--xla_cpu_experimental_ynn_fusion_type="),
    ("single-threaded Eigen", "--xla_cpu_multi_thread_eigen=false"),
    ("fast math", "--xla_cpu_enable_fast_math=true"),
    ("XNNPACK greedy graph fusion", "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
]
# Checked by hand, not swept (no effect on this jaxlib 0.10.2 build): --xla_cpu_use_thunk_runtime=false prints
# '"xla_cpu_use_thunk_runtime" is no longer supported'; --xla_cpu_use_onednn=true and
# --xla_cpu_experimental_onednn_custom_call=true leave the optimized HLO without any oneDNN call.


# ---------------------------------------------------------------------------
# JAX side: the library's own steps
# ---------------------------------------------------------------------------

def jax_setup(model: str, batch_size: int, sparsity: float, seed: int):
    """Context, weights, masks and the plain step through the library's own entry points."""
    import jax
    from fairprune_jax.data.base import Dataset, Split
    from fairprune_jax.methods.base import RunConfig
    from fairprune_jax.running.runner import build_context
    from fairprune_jax.training.train import make_train_step

    st = SETTINGS[model]
    rng = np.random.default_rng(seed)
    n = max(2 * batch_size, 256)
    x = rng.standard_normal((n, *st["input_shape"])).astype(np.float32)
    y = rng.integers(0, st["num_classes"], n)
    split = Split(x, y, np.zeros(n, np.int32))
    ds = Dataset("synthetic", split, split, ["all"], ["none"], [f"c{c}" for c in range(st["num_classes"])])
    cfg = RunConfig(method="ceag", dataset="synthetic", model=model, batch_size=batch_size, seed=seed,
                    progress=False, sparsity=sparsity)
    ctx, params, model_state = build_context(cfg, ds)
    # exact per-layer sparsity, random positions (same as magnitude pruning of random weights)
    def make_mask(t, p):
        if t is None:
            return None
        size = int(np.prod(p.shape))
        keep = int(round((1.0 - sparsity) * size))
        m = np.zeros(size, np.float32)
        m[rng.permutation(size)[:keep]] = 1.0
        return jax.numpy.asarray(m.reshape(p.shape))
    masks = jax.tree.map(make_mask, ctx.template, params, is_leaf=lambda v: v is None)
    tx = ctx.finetune_tx(epochs=1)       # Adam with cosine decay, as every fine-tuning run
    plain_step = make_train_step(ctx.fm, tx, augment=ctx.augment)
    return ctx, params, model_state, masks, tx, plain_step


def jax_fresh_state(ctx, params, model_state, masks, tx, extra=None):
    import jax
    from fairprune_jax.training.train import TrainState
    dense = TrainState(params=params, opt_state=None, model_state=model_state,
                       rng=jax.random.key(0), step=None, nan_step=None)
    # copies: the steps donate their whole state (masks included)
    copy = lambda t: jax.tree.map(lambda a: jax.numpy.array(a, copy=True), t)   # noqa: E731
    from fairprune_jax.training.train import Carry
    extra = dict(extra or {})
    dual = extra.pop("dual", None)              # the multipliers live in the optimizer state
    state = ctx.masked_state(copy(dense), copy(masks), tx, extra=Carry(**extra) if extra else None)
    return state if dual is None else state.with_dual(dual)


def reference_counts(G: int, num_classes: int, seed: int):
    """A plausible dense reference (per-group accuracy/loss); group 0 is clearly better, so its
    constraint becomes active once the buffers fill."""
    from fairprune_jax.metrics.fairness import GroupCounts
    rng = np.random.default_rng(seed + 7)
    n = np.full(G, 100.0, np.float32)
    acc = rng.uniform(0.55, 0.75, G).astype(np.float32)
    acc[0] = 0.97
    loss = rng.uniform(0.4, 0.8, G).astype(np.float32)
    zeros = np.zeros(G, np.float32)
    return GroupCounts(n=n, correct=acc * n, loss_sum=loss * n, pred_pos=zeros, tp=zeros, fp=zeros,
                       pos=zeros, neg=zeros)


def jax_ceag(ctx, G: int, seed: int, opts: dict | None = None):
    """Our CEAG step and its extra state, exactly as ``methods.ceag.ceag`` builds them."""
    import dataclasses as dc
    from fairprune_jax.constraints import constrained
    from fairprune_jax.methods import METHODS
    from fairprune_jax.methods.ceag import ceag_terms, dense_reference, make_constrained_step, with_dual_lr
    parsed = with_dual_lr(METHODS["ceag"].parse(opts or {}))     # the buffers' (paper's) dual step
    o = dc.asdict(parsed)
    c = dc.replace(ctx, dense_train_counts=reference_counts(G, ctx.fm.num_classes, seed))
    dual = constrained.dual_from_options(parsed, G, equality=False)
    extra = {"dual": dual.init(), "buffer": constrained.buffer_init(G, int(o["buffer_size"])),
             "overall": constrained.buffer_init(1, int(o["overall_buffer_size"]))}
    tx = ctx.finetune_tx(epochs=1)
    step = make_constrained_step(c, tx, dual, ceag_terms(G, dense_reference(c), float(o["eps"])), o["order"])
    return step, extra, dense_reference(c), o


def make_batches(model: str, batch_size: int, G: int, nb: int, seed: int) -> list[dict[str, np.ndarray]]:
    st = SETTINGS[model]
    rng = np.random.default_rng([seed, G])
    out = []
    for _ in range(nb):
        out.append({"x": rng.standard_normal((batch_size, *st["input_shape"])).astype(np.float32),
                    "y": rng.integers(0, st["num_classes"], batch_size).astype(np.int32),
                    "g": rng.integers(0, G, batch_size).astype(np.int32),
                    "w": np.ones(batch_size, np.float32)})
    return out


# ---------------------------------------------------------------------------
# PyTorch side
# ---------------------------------------------------------------------------

def torch_modules():
    """Torch models mirroring ``fairprune_jax.models.nets`` and the cooper CMP (import torch lazily)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import cooper

    class MaskedLinear(nn.Linear):
        def __init__(self, i, o):
            super().__init__(i, o)
            self.register_buffer("mask", torch.ones_like(self.weight))

        def forward(self, x):
            return F.linear(x, self.weight * self.mask, self.bias)

    class MaskedConv2d(nn.Conv2d):
        def __init__(self, i, o):
            super().__init__(i, o, 3, padding=1, bias=False)
            self.register_buffer("mask", torch.ones_like(self.weight))

        def forward(self, x):
            return F.conv2d(x, self.weight * self.mask, None, 1, 1)

    class TorchMLP(nn.Module):
        def __init__(self, d, c, hidden=(256, 128)):
            super().__init__()
            dims = [d, *hidden]
            self.layers = nn.ModuleList([MaskedLinear(a, b) for a, b in zip(dims[:-1], dims[1:])])
            self.head = MaskedLinear(dims[-1], c)

        def forward(self, x):
            x = x.reshape(x.shape[0], -1)
            for layer in self.layers:
                x = F.relu(layer(x))
            return self.head(x)

    class TorchCNN(nn.Module):
        def __init__(self, cin, c, channels=(32, 64, 128), hidden=128):
            super().__init__()
            ch = [cin, *channels]
            self.convs = nn.ModuleList([MaskedConv2d(a, b) for a, b in zip(ch[:-1], ch[1:])])
            # flax momentum 0.9 (weight of the old average) == torch momentum 0.1; eps 1e-5 in both
            self.norms = nn.ModuleList([nn.BatchNorm2d(b, eps=1e-5, momentum=0.1) for b in ch[1:]])
            self.fc = MaskedLinear(ch[-1], hidden)
            self.head = MaskedLinear(hidden, c)

        def forward(self, x):                      # x: NCHW
            for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
                x = F.relu(norm(conv(x)))
                if i < len(self.convs) - 1 and min(x.shape[2], x.shape[3]) >= 4:
                    x = F.max_pool2d(x, 2, 2)
            x = x.mean(dim=(2, 3))
            return self.head(F.relu(self.fc(x)))

    class GroupBuffer:
        """Per-group ring buffers of the last k values (vectorized, in batch order)."""

        def __init__(self, G, k):
            self.G, self.k = G, k
            self.values = torch.zeros(G, k)
            self.pos = torch.zeros(G, dtype=torch.long)
            self.count = torch.zeros(G, dtype=torch.long)

        def update(self, v, g, w):
            valid = w != 0
            v, g = v[valid], g[valid]
            order = torch.argsort(g, stable=True)
            gs, vs = g[order], v[order]
            n = torch.bincount(gs, minlength=self.G)
            start = torch.cumsum(n, 0) - n
            rank = torch.arange(gs.shape[0]) - start[gs]
            keep = rank >= n[gs] - self.k              # only the last k of a group survive
            slot = (self.pos[gs] + rank) % self.k
            self.values[gs[keep], slot[keep]] = vs[keep]
            self.pos = (self.pos + n) % self.k
            self.count = (self.count + n).clamp_max(self.k)

        def means(self):
            return self.values.sum(1) / self.count.clamp_min(1), self.count >= self.k

    class CEAGProblem(cooper.ConstrainedMinimizationProblem):
        """One inequality constraint per group on the excess accuracy gap (Balancing Act)."""

        def __init__(self, model, G, ref, eps, buffer_size, overall_buffer_size):
            super().__init__()
            self.model, self.G, self.eps = model, G, eps
            self.ref = {k: torch.as_tensor(np.asarray(v)) for k, v in ref.items()}
            self.buffer = GroupBuffer(G, buffer_size)
            self.overall = GroupBuffer(1, overall_buffer_size)
            self.multiplier = cooper.multipliers.DenseMultiplier(num_constraints=G)
            self.gap = cooper.Constraint(constraint_type=cooper.ConstraintType.INEQUALITY,
                                         formulation_type=cooper.formulations.Lagrangian,
                                         multiplier=self.multiplier)

        def compute_cmp_state(self, x, y, g, w):
            logits = self.model(x)
            per = F.cross_entropy(logits, y, reduction="none")
            loss = (per * w).sum() / w.sum().clamp_min(1.0)
            n_g = torch.zeros(self.G).index_add_(0, g, w)
            loss_g = torch.zeros(self.G).index_add(0, g, per * w) / n_g.clamp_min(1.0)
            present = n_g > 0
            proxy = torch.where(present, (loss_g - self.ref["loss_g"]) - (loss - self.ref["loss"]), 0.0)
            with torch.no_grad():
                correct = (logits.argmax(-1) == y).float()
                self.buffer.update(correct, g, w)
                self.overall.update(correct, torch.zeros_like(g), w)
                acc_g, full_g = self.buffer.means()
                acc, full = self.overall.means()
                strict = (self.ref["acc_g"] - acc_g) - (self.ref["acc"] - acc[0]) - self.eps
                observed = present & full_g & full[0]
                # unobserved constraints must not move: a zero dual gradient under SGD + ReLU projection
                strict = torch.where(observed, strict, 0.0)
                accuracy = (correct * w).sum() / w.sum().clamp_min(1.0)
            state = cooper.ConstraintState(violation=proxy, strict_violation=strict)
            return cooper.CMPState(loss=loss, observed_constraints={self.gap: state},
                                   misc={"accuracy": accuracy})

    return dict(torch=torch, F=F, cooper=cooper, TorchMLP=TorchMLP, TorchCNN=TorchCNN, CEAGProblem=CEAGProblem)


def torch_model_from_jax(T, model: str, params, model_state, masks):
    """A torch model with the JAX weights, BN statistics and masks (NHWC/IO -> NCHW/OI)."""
    torch = T["torch"]
    st = SETTINGS[model]
    np_ = lambda a: np.asarray(a, np.float32)   # noqa: E731
    if model == "mlp":
        m = T["TorchMLP"](st["input_shape"][0], st["num_classes"])
        pairs = [(m.layers[i], params["layers"][i], masks["layers"][i]) for i in range(len(m.layers))]
        pairs.append((m.head, params["head"], masks["head"]))
    else:
        m = T["TorchCNN"](st["input_shape"][-1], st["num_classes"])
        pairs = [(m.fc, params["fc"], masks["fc"]), (m.head, params["head"], masks["head"])]
        with torch.no_grad():
            for i, conv in enumerate(m.convs):
                conv.weight.copy_(torch.from_numpy(np_(params["convs"][i]["kernel"]).transpose(3, 2, 0, 1).copy()))
                conv.mask.copy_(torch.from_numpy(np_(masks["convs"][i]["kernel"]).transpose(3, 2, 0, 1).copy()))
                conv.weight.mul_(conv.mask)
                norm = m.norms[i]
                norm.weight.copy_(torch.from_numpy(np_(params["norms"][i]["scale"])))
                norm.bias.copy_(torch.from_numpy(np_(params["norms"][i]["bias"])))
                norm.running_mean.copy_(torch.from_numpy(np_(model_state["norms"][i]["mean"])))
                norm.running_var.copy_(torch.from_numpy(np_(model_state["norms"][i]["var"])))
    with torch.no_grad():
        for lin, p, mk in pairs:
            lin.weight.copy_(torch.from_numpy(np_(p["kernel"]).T.copy()))
            lin.mask.copy_(torch.from_numpy(np_(mk["kernel"]).T.copy()))
            lin.weight.mul_(lin.mask)
            lin.bias.copy_(torch.from_numpy(np_(p["bias"])))
    m.train()
    return m


def torch_batches(batches: list[dict], model: str, T) -> list[dict]:
    torch = T["torch"]
    out = []
    for b in batches:
        x = b["x"] if model == "mlp" else b["x"].transpose(0, 3, 1, 2)    # NHWC -> NCHW (torch's native)
        out.append({"x": torch.from_numpy(np.ascontiguousarray(x)), "y": torch.from_numpy(b["y"].astype(np.int64)),
                    "g": torch.from_numpy(b["g"].astype(np.int64)), "w": torch.from_numpy(b["w"])})
    return out


def torch_primal(T, model, lr: float, total_steps: int):
    """Adam with the same cosine decay as ``optax.cosine_decay_schedule`` (the library's fine-tuning)."""
    torch = T["torch"]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps)))
    return opt, sched


def _masked_modules(model):
    return [m for m in model.modules() if hasattr(m, "mask")]


def make_torch_plain(T, model, lr, total_steps):
    torch, F = T["torch"], T["F"]
    opt, sched = torch_primal(T, model, lr, total_steps)
    masked = _masked_modules(model)

    def step(b):
        opt.zero_grad(set_to_none=True)
        logits = model(b["x"])
        per = F.cross_entropy(logits, b["y"], reduction="none")
        loss = (per * b["w"]).sum() / b["w"].sum().clamp_min(1.0)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for m in masked:
                m.weight.mul_(m.mask)
            acc = ((logits.argmax(-1) == b["y"]).float() * b["w"]).sum() / b["w"].sum().clamp_min(1.0)
        return loss.detach(), acc

    return step


def make_torch_cooper(T, model, G, ref, opts, lr, total_steps):
    """The CEAG step on cooper: returns ``(step(batch) -> rollout, cmp)``."""
    torch, cooper = T["torch"], T["cooper"]
    cmp = T["CEAGProblem"](model, G, ref, float(opts["eps"]), int(opts["buffer_size"]),
                           int(opts["overall_buffer_size"]))
    opt, sched = torch_primal(T, model, lr, total_steps)
    dual = torch.optim.SGD(cmp.dual_parameters(), lr=float(opts["dual_lr"]), maximize=True)
    cls = {"dual_primal": cooper.optim.AlternatingDualPrimalOptimizer,
           "simultaneous": cooper.optim.SimultaneousOptimizer}[opts["order"]]
    copt = cls(cmp, primal_optimizers=opt, dual_optimizers=dual)
    masked = _masked_modules(model)

    def step(b):
        out = copt.roll(compute_cmp_state_kwargs={"x": b["x"], "y": b["y"], "g": b["g"], "w": b["w"]})
        sched.step()
        with torch.no_grad():
            for m in masked:
                m.weight.mul_(m.mask)
        return out

    return step, cmp


# ---------------------------------------------------------------------------
# Equivalence check
# ---------------------------------------------------------------------------

def equivalence_check(model: str, args, T) -> dict:
    """Same weights, masks and batches; K CEAG steps in JAX and in torch+cooper; compare."""
    import jax
    G, K = 2, 14
    ctx, params, ms, masks, tx, _ = jax_setup(model, args.batch_size, args.sparsity, args.seed)
    step, extra, ref, opts = jax_ceag(ctx, G, args.seed)
    state = jax_fresh_state(ctx, params, ms, masks, tx, extra=extra)
    tmodel = torch_model_from_jax(T, model, params, ms, masks)
    lr = ctx.settings.ft_lr
    tstep, cmp = make_torch_cooper(T, tmodel, G, ref, opts, lr, ctx.steps_per_epoch * 1)
    batches = make_batches(model, args.batch_size, G, K, args.seed + 1)
    tb = torch_batches(batches, model, T)
    jl, tl = [], []
    for b, bt in zip(batches, tb):
        state, stats = step(state, {k: jax.numpy.asarray(v) for k, v in b.items()})
        jl.append(float(stats["loss"]))
        tl.append(float(tstep(bt).loss))
    jm = np.asarray(state.dual.multipliers)
    tm = cmp.multiplier.weight.detach().numpy()
    tparams = dict(tmodel.named_parameters())
    if model == "mlp":
        jk, tk = np.asarray(state.params["layers"][0]["kernel"]).T, tparams["layers.0.weight"].detach().numpy()
    else:
        jk = np.asarray(state.params["convs"][1]["kernel"]).transpose(3, 2, 0, 1)
        tk = tparams["convs.1.weight"].detach().numpy()
    return {"groups": G, "steps": K, "loss_jax": jl, "loss_torch": tl,
            "max_abs_loss_diff": float(np.max(np.abs(np.subtract(jl, tl)))),
            "multipliers_jax": jm.tolist(), "multipliers_torch": tm.tolist(),
            "max_abs_multiplier_diff": float(np.max(np.abs(jm - tm))),
            "max_abs_weight_diff_layer": float(np.max(np.abs(jk - tk))),
            "weight_scale": float(np.max(np.abs(jk)))}


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Runner:
    """One timed variant: ``run(n)`` does n steps and returns when they are done."""
    name: str
    run: Callable[[int], None]
    samples: list = dataclasses.field(default_factory=list)


def jax_runner(name, step, state, batches):
    import jax
    box = {"state": state, "i": 0}
    nb = len(batches)

    def run(n):
        s, i = box["state"], box["i"]
        for _ in range(n):
            s, _stats = step(s, batches[i % nb])
            i += 1
        jax.block_until_ready(s)
        box["state"], box["i"] = s, i

    return Runner(name, run)


def torch_runner(name, step, batches):
    box = {"i": 0}
    nb = len(batches)

    def run(n):
        i = box["i"]
        for _ in range(n):
            step(batches[i % nb])
            i += 1
        box["i"] = i

    return Runner(name, run)


def time_interleaved(runners: list[Runner], steps: int, rounds: int, warmup: int) -> None:
    for r in runners:
        r.run(warmup)
    n = len(runners)
    for rd in range(rounds):
        # rotate the order so that no variant always runs right after another (e.g. after torch's threads)
        for r in runners[rd % n:] + runners[:rd % n]:
            time.sleep(0.005)
            t = time.perf_counter()
            r.run(steps)
            r.samples.append((time.perf_counter() - t) / steps * 1e3)


def summarize(samples: list[float]) -> dict:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "samples_ms": [round(s, 4) for s in samples]}


def bench_model(model: str, groups: list[int], args, T) -> dict:
    import jax
    steps, rounds = SCHEDULE[model]["quick" if args.quick else "full"]
    steps = args.steps or steps
    rounds = args.repeats or rounds
    ctx, params, ms, masks, tx, plain_step = jax_setup(model, args.batch_size, args.sparsity, args.seed)
    lr, total = ctx.settings.ft_lr, 10_000
    out: dict[str, Any] = {"setting": SETTINGS[model]["what"], "steps_per_round": steps, "rounds": rounds,
                           "groups": {}}
    t0 = time.perf_counter()
    nb = 8
    if T is not None:
        tplain = make_torch_plain(T, torch_model_from_jax(T, model, params, ms, masks), lr, total)
    for G in groups:
        batches = make_batches(model, args.batch_size, G, nb, args.seed + 1)
        jb = [{k: jax.device_put(v) for k, v in b.items()} for b in batches]
        step, extra, ref, opts = jax_ceag(ctx, G, args.seed)
        state = jax_fresh_state(ctx, params, ms, masks, tx, extra=extra)
        tc = time.perf_counter()
        state, _ = step(state, jb[0])
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - tc
        plain_state = jax_fresh_state(ctx, params, ms, masks, tx)
        runners = [jax_runner("jax_plain", plain_step, plain_state, jb), jax_runner("jax_ceag", step, state, jb)]
        if T is not None:
            tb = torch_batches(batches, model, T)
            tmodel = torch_model_from_jax(T, model, params, ms, masks)
            tstep, _ = make_torch_cooper(T, tmodel, G, ref, opts, lr, total)
            runners += [torch_runner("torch_plain", tplain, tb), torch_runner("torch_cooper", tstep, tb)]
        time_interleaved(runners, steps, rounds, warmup=max(2, steps))
        res = {r.name: summarize(r.samples) for r in runners}
        res["jax_ceag_compile_s"] = compile_s
        med = {k: v["median_ms"] for k, v in res.items() if isinstance(v, dict)}
        # ratio of medians, and the median of per-round ratios (robust to load drifting between rounds)
        res["ratio_ceag_over_plain"] = med["jax_ceag"] / med["jax_plain"]
        res["ratio_ceag_over_plain_paired"] = statistics.median(
            a / b for a, b in zip(runners[1].samples, runners[0].samples))
        if T is not None:
            res["ratio_torch_cooper_over_jax_ceag"] = med["torch_cooper"] / med["jax_ceag"]
            res["ratio_torch_cooper_over_jax_ceag_paired"] = statistics.median(
                a / b for a, b in zip(runners[3].samples, runners[1].samples))
            res["ratio_torch_cooper_over_torch_plain"] = med["torch_cooper"] / med["torch_plain"]
        out["groups"][str(G)] = res
        print(f"  [{model}] G={G:<5d} " + "  ".join(f"{k}={v:.3f}ms" for k, v in med.items())
              + f"  ceag/plain={res['ratio_ceag_over_plain']:.2f}"
              + (f"  torch/jax={res['ratio_torch_cooper_over_jax_ceag']:.2f}" if T is not None else ""), flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------
# HLO, thunk-level profile and CNN breakdown
# ---------------------------------------------------------------------------

_OP_PRIORITY = ["convolution", "dot", "sort", "while", "select-and-scatter", "scatter", "reduce-window", "gather",
                "iota", "transpose", "concatenate", "reduce", "copy"]


def _entry(text: str) -> str:
    e = text[text.index("\nENTRY"):]
    return e[:e.index("\n}")]


def _computations(text: str) -> dict[str, collections.Counter]:
    """Op multiset of every (fused) computation in an optimized HLO module."""
    comps = {}
    for m in re.finditer(r"\n(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.S):
        comps[m.group(1)] = collections.Counter(re.findall(r"= [^=]*?\s([a-z][\w\-]*)\(", m.group(2)))
    return comps


def entry_instructions(text: str) -> dict[str, dict]:
    """ENTRY instruction name -> {op, shape, category, elements}; a fusion's category is its heaviest op."""
    comps = _computations(text)
    out = {}
    for line in _entry(text).splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$", line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        ops = collections.Counter({op: 1})
        kind = None
        if op == "fusion":
            c = re.search(r"calls=%?([\w.\-]+)", rest)
            ops = comps.get(c.group(1), collections.Counter()) if c else collections.Counter()
            k = re.search(r"kind=(\w+)", rest)
            kind = k.group(1) if k else None
            if '"__ynn_fusion"' in rest:
                kind = "ynn"
        cat = next((p for p in _OP_PRIORITY if ops.get(p)), "elementwise" if op == "fusion" else op)
        dims = re.search(r"\[([\d,]*)\]", shape)
        elems = int(np.prod([int(d) for d in dims.group(1).split(",") if d])) if dims else 0
        out[name] = {"op": op, "kind": kind, "category": cat, "shape": shape.split("{")[0], "elements": elems}
    return out


def hlo_summary(text: str) -> dict:
    """What the optimized step is made of: top-level ops, fusion kinds, categories, and the mask multiplies."""
    ins = entry_instructions(text)
    ops = collections.Counter(v["op"] for v in ins.values())
    kinds = collections.Counter(v["kind"] for v in ins.values() if v["op"] == "fusion")
    cats = collections.Counter(v["category"] for v in ins.values() if v["op"] not in ("parameter", "constant",
                                                                                      "get-tuple-element", "tuple",
                                                                                      "bitcast"))
    # the kernel operand of every forward conv / dot: which instruction makes it, and is it fused with more?
    entry = _entry(text)
    comps = _computations(text)
    masks = []
    for name, v in ins.items():
        if v["category"] not in ("convolution", "dot"):
            continue
        line = next(l for l in entry.splitlines() if re.match(rf"\s*(?:ROOT )?%?{re.escape(name)} = ", l))
        operands = re.findall(r"%([\w.\-]+)", line.split("(", 1)[1].split(")")[0])
        for o in operands:
            if o not in ins or ins[o]["op"] != "fusion" or "multiply" not in o:
                continue
            ol = next(l for l in entry.splitlines() if re.match(rf"\s*%?{re.escape(o)} = ", l))
            c = re.search(r"calls=%?([\w.\-]+)", ol)
            fused = dict(comps.get(c.group(1), {})) if c else {}
            if set(fused) <= {"parameter", "multiply", "bitcast"} and fused.get("multiply") == 1:
                # a lone kernel * mask: a single-op loop fusion ("wrapped") of kernel size
                masks.append({"consumer": name, "consumer_shape": v["shape"], "mask_product": o,
                              "product_shape": ins[o]["shape"], "fused_ops": fused})
    big = sorted(((v["elements"], k, v["category"], v["shape"]) for k, v in ins.items()
                  if v["op"] not in ("parameter", "get-tuple-element", "bitcast")), reverse=True)[:12]
    return {"entry_ops": dict(ops.most_common()), "fusion_kinds": dict(kinds), "categories": dict(cats.most_common()),
            "mask_products_feeding_conv_or_dot": masks, "largest_outputs": [list(b) for b in big]}


def thunk_profile(model: str, which: str, G: int, steps: int, batch_size: int, seed: int,
                  pool: str = "nnx") -> dict:
    """Per-thunk time of the compiled step from a ``jax.profiler`` trace (run with
    ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true``), aggregated by HLO category."""
    import glob
    import shutil
    import jax
    ctx, params, ms, masks, tx, plain = jax_setup(model, batch_size, 0.9, seed)
    with maybe_reshape_pool(pool == "reshape"):
        if which == "ceag":
            step, extra, _, _ = jax_ceag(ctx, G, seed)
            state = jax_fresh_state(ctx, params, ms, masks, tx, extra=extra)
        else:
            step, state = plain, jax_fresh_state(ctx, params, ms, masks, tx)
        b = {k: jax.device_put(v) for k, v in make_batches(model, batch_size, G, 1, seed + 1)[0].items()}
        ins = entry_instructions(step.lower(state, b).compile().as_text())
        for _ in range(3):
            state, _ = step(state, b)
    jax.block_until_ready(state)
    d = tempfile.mkdtemp(prefix="ceag_prof_")
    t0 = time.perf_counter()
    with jax.profiler.trace(d):
        for _ in range(steps):
            state, _ = step(state, b)
            jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / steps * 1e3
    f = glob.glob(d + "/**/*.xplane.pb", recursive=True)[0]
    pd = jax.profiler.ProfileData.from_file(f)
    per = collections.Counter()
    for plane in pd.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in ins:
                    per[ev.name] += ev.duration_ns
    shutil.rmtree(d, ignore_errors=True)
    cats = collections.Counter()
    for n, v in per.items():
        cats[ins[n]["category"]] += v
    total = sum(per.values())
    return {"model": model, "step": which, "groups": G, "pool": pool, "steps": steps,
            "wall_ms_per_step_traced": wall, "thunk_ms_per_step": total / steps / 1e6,
            "by_category_ms": {k: v / steps / 1e6 for k, v in cats.most_common()},
            "top_thunks": [{"name": n, "ms": v / steps / 1e6, **{k: ins[n][k] for k in ("category", "shape")}}
                           for n, v in per.most_common(15)]}


def run_thunk_profiles(args) -> list[dict]:
    """The thunk profiles, each in a subprocess (the traceme flag must be set before jax starts)."""
    jobs = [("mlp", "plain", 10, "nnx"), ("mlp", "ceag", 10, "nnx"), ("cnn", "plain", 10, "nnx"),
            ("cnn", "ceag", 10, "nnx"), ("cnn", "ceag", 10, "reshape")]
    out = []
    for model, which, G, pool in jobs:
        steps = 40 if model == "mlp" else 4
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"))
        code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import ceag_step as c; "
                f"print('JSON' + json.dumps(c.thunk_profile({model!r}, {which!r}, {G}, {steps}, "
                f"{args.batch_size}, {args.seed}, {pool!r})))")
        p = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True)
        js = [l for l in p.stdout.splitlines() if l.startswith("JSON")]
        if not js:
            out.append({"model": model, "step": which, "pool": pool, "error": (p.stderr or p.stdout)[-500:]})
            print(f"  thunk profile {model}/{which}/{pool}: FAILED", flush=True)
            continue
        r = json.loads(js[0][4:])
        out.append(r)
        print(f"  thunk profile {model}/{which} (pool={pool}): {r['thunk_ms_per_step']:.2f} ms of thunks/step; "
              + ", ".join(f"{k} {v:.2f}" for k, v in list(r["by_category_ms"].items())[:7]), flush=True)
    return out


def pool_reshape(x, window_shape=(2, 2), strides=None, padding="VALID"):
    """2x2/2 max pooling as a reshape + max (same values; same gradient after a ReLU, see README)."""
    if tuple(window_shape) != (2, 2) or tuple(strides or window_shape) != (2, 2) or padding != "VALID":
        raise NotImplementedError
    n, h, w, c = x.shape
    return x[:, :h - h % 2, :w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class maybe_reshape_pool:
    """Context manager: trace the model with :func:`pool_reshape` instead of ``nnx.max_pool``."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            from flax import nnx
            self.orig = nnx.max_pool
            nnx.max_pool = pool_reshape
        return self

    def __exit__(self, *exc):
        if self.on:
            from flax import nnx
            nnx.max_pool = self.orig


def profile_cnn(args, T) -> dict:
    """Where the CNN step's time goes: per-conv and per-pool forward/backward, JAX vs torch; whole model;
    the step with a reshape max-pool; HLO of the step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    torch, F = T["torch"], T["F"]
    B = args.batch_size
    rounds = 5 if args.quick else 7
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)

    def j(fn, *a):
        def run(n):
            r = None
            for _ in range(n):
                r = fn(*a)
            jax.block_until_ready(r)
        return run

    def conv(xx, kk):
        return jax.lax.conv_general_dilated(xx, kk, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    layers = []
    for hw, cin, cout in [(32, 3, 32), (16, 32, 64), (8, 64, 128)]:
        x = rng.standard_normal((B, hw, hw, cin)).astype(np.float32)
        k = rng.standard_normal((3, 3, cin, cout)).astype(np.float32)
        ct = rng.standard_normal((B, hw, hw, cout)).astype(np.float32)
        xj, kj, ctj = map(jnp.asarray, (x, k, ct))
        fwd = jax.jit(conv)
        fb = jax.jit(lambda xx, kk, cc: (conv(xx, kk), jax.vjp(conv, xx, kk)[1](cc)))
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
        kt = torch.from_numpy(k.transpose(3, 2, 0, 1).copy()).requires_grad_(True)
        ctt = torch.from_numpy(ct.transpose(0, 3, 1, 2).copy())

        def t_fwd(n):
            with torch.no_grad():
                for _ in range(n):
                    F.conv2d(xt, kt, None, 1, 1)

        def t_fb(n):
            for _ in range(n):
                torch.autograd.grad(F.conv2d(xt, kt, None, 1, 1), (xt, kt), ctt)

        rs = [Runner("jax_fwd", j(fwd, xj, kj)), Runner("torch_fwd", t_fwd),
              Runner("jax_fwd_bwd", j(fb, xj, kj, ctj)), Runner("torch_fwd_bwd", t_fb)]
        time_interleaved(rs, 3, rounds, warmup=2)
        layers.append({"op": f"conv3x3 {B}x{hw}x{hw}x{cin}->{cout}", **{r.name: statistics.median(r.samples) for r in rs}})
    for hw, c in [(32, 32), (16, 64)]:
        x = np.maximum(rng.standard_normal((B, hw, hw, c)), 0).astype(np.float32)     # post-ReLU, as in the model
        ct = rng.standard_normal((B, hw // 2, hw // 2, c)).astype(np.float32)
        xj, ctj = jnp.asarray(x), jnp.asarray(ct)
        nnx_pool = lambda v: nnx.max_pool(v, (2, 2), strides=(2, 2))   # noqa: E731
        fb_nnx = jax.jit(lambda v, cc: jax.vjp(nnx_pool, v)[1](cc))
        fb_rs = jax.jit(lambda v, cc: jax.vjp(pool_reshape, v)[1](cc))
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
        ctt = torch.from_numpy(ct.transpose(0, 3, 1, 2).copy())

        def t_pool(n):
            for _ in range(n):
                torch.autograd.grad(F.max_pool2d(xt, 2, 2), xt, ctt)

        rs = [Runner("jax_fwd_bwd", j(fb_nnx, xj, ctj)), Runner("jax_reshape_fwd_bwd", j(fb_rs, xj, ctj)),
              Runner("torch_fwd_bwd", t_pool)]
        time_interleaved(rs, 3, rounds, warmup=2)
        layers.append({"op": f"maxpool2x2 {B}x{hw}x{hw}x{c}", **{r.name: statistics.median(r.samples) for r in rs}})
    for l in layers:
        print("  " + l["op"] + "  " + "  ".join(f"{k}={v:.2f}ms" for k, v in l.items() if k != "op"), flush=True)
    out["ops"] = layers

    # whole model (train mode, masked), JAX vs torch; and the CEAG step with each pooling
    ctx, params, ms, masks, tx, plain_step = jax_setup("cnn", B, args.sparsity, args.seed)
    from fairprune_jax.training.train import cross_entropy, masked_forward
    batches = make_batches("cnn", B, 10, 4, args.seed + 1)
    jb = [{k: jax.device_put(v) for k, v in b.items()} for b in batches]
    fm = ctx.fm

    def loss(p, x, y):
        return cross_entropy(masked_forward(fm, p, masks, ms, x, train=True)[0], y).mean()

    fwd = jax.jit(lambda p, x: masked_forward(fm, p, masks, ms, x, train=True)[0])
    grad = jax.jit(jax.grad(loss))
    with maybe_reshape_pool(True):
        grad_rs = jax.jit(jax.grad(loss))
        g_rs = grad_rs(params, jb[0]["x"], jb[0]["y"])
        step_rs, extra_rs, _, _ = jax_ceag(ctx, 10, args.seed)
        st_rs = jax_fresh_state(ctx, params, ms, masks, tx, extra=extra_rs)
        st_rs, _ = step_rs(st_rs, jb[0])
    g = grad(params, jb[0]["x"], jb[0]["y"])
    out["reshape_pool_max_abs_grad_diff"] = float(max(jnp.max(jnp.abs(a - b)) for a, b in
                                                      zip(jax.tree.leaves(g), jax.tree.leaves(g_rs))))
    step, extra, _, _ = jax_ceag(ctx, 10, args.seed)
    st = jax_fresh_state(ctx, params, ms, masks, tx, extra=extra)
    tmodel = torch_model_from_jax(T, "cnn", params, ms, masks)
    tb = torch_batches(batches, "cnn", T)

    def t_fwd(n):
        for i in range(n):
            tmodel(tb[i % 4]["x"])

    def t_grad(n):
        for i in range(n):
            tmodel.zero_grad(set_to_none=True)
            F.cross_entropy(tmodel(tb[i % 4]["x"]), tb[i % 4]["y"]).backward()

    def jrun(fn, with_y):
        def run(n):
            r = None
            for i in range(n):
                b = jb[i % 4]
                r = fn(params, b["x"], b["y"]) if with_y else fn(params, b["x"])
            jax.block_until_ready(r)
        return run

    rs = [Runner("jax_forward", jrun(fwd, False)), Runner("torch_forward", t_fwd),
          Runner("jax_forward_backward", jrun(grad, True)), Runner("jax_forward_backward_reshape_pool", jrun(grad_rs, True)),
          Runner("torch_forward_backward", t_grad),
          jax_runner("jax_ceag_step", step, st, jb), jax_runner("jax_ceag_step_reshape_pool", step_rs, st_rs, jb)]
    time_interleaved(rs, 2, rounds, warmup=2)
    out["model"] = {r.name: statistics.median(r.samples) for r in rs}
    print("  model " + "  ".join(f"{k}={v:.2f}ms" for k, v in out["model"].items()), flush=True)
    out["hlo_ceag_step"] = hlo_summary(step.lower(st, jb[0]).compile().as_text())
    out["hlo_plain_step"] = hlo_summary(plain_step.lower(jax_fresh_state(ctx, params, ms, masks, tx), jb[0])
                                        .compile().as_text())
    with maybe_reshape_pool(True):
        out["hlo_ceag_step_reshape_pool"] = hlo_summary(step_rs.lower(st_rs, jb[0]).compile().as_text())
    return out


# ---------------------------------------------------------------------------
# XLA flag sweep (subprocesses)
# ---------------------------------------------------------------------------

def xla_sweep(args) -> list[dict]:
    rows = []
    for label, flags in XLA_VARIANTS:
        with tempfile.TemporaryDirectory() as td:
            js = Path(td) / "r.json"
            env = dict(os.environ, XLA_FLAGS=flags)
            cmd = [sys.executable, __file__, "--child", str(js), "--models", "cnn", "--groups", "10",
                   "--batch-size", str(args.batch_size), "--no-check"]
            if args.quick:
                cmd.append("--quick")
            t = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            row = {"variant": label, "XLA_FLAGS": flags, "returncode": p.returncode,
                   "seconds": time.perf_counter() - t}
            if p.returncode == 0 and js.exists():
                r = json.loads(js.read_text())["models"]["cnn"]["groups"]["10"]
                row.update({k: r[k]["median_ms"] for k in ("jax_plain", "jax_ceag", "torch_cooper")},
                           torch_over_jax=r["ratio_torch_cooper_over_jax_ceag"],
                           torch_over_jax_paired=r["ratio_torch_cooper_over_jax_ceag_paired"],
                           compile_s=r["jax_ceag_compile_s"])
            else:
                row["error"] = (p.stderr or p.stdout)[-600:]
        rows.append(row)
        print(f"  XLA_FLAGS={flags!r:<80} " + (
            f"jax_plain={row['jax_plain']:.1f}ms jax_ceag={row['jax_ceag']:.1f}ms torch_cooper={row['torch_cooper']:.1f}ms"
            f" torch/jax={row['torch_over_jax_paired']:.2f}" if "jax_ceag" in row else "FAILED: "
            + row["error"].strip().splitlines()[-1][:150]), flush=True)
    return rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def environment(torch_threads: int | None) -> dict:
    import jax
    import jaxlib
    env = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "jax_backend": jax.default_backend(), "cpu_count": os.cpu_count(),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
           "loadavg_start": os.getloadavg()}
    try:
        env["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:   # pragma: no cover
        pass
    if torch_threads is not None:          # torch was imported and used
        import torch
        import cooper
        env.update(torch=torch.__version__, cooper=cooper.__version__, torch_threads=torch_threads)
    return env


def markdown(res: dict) -> str:
    env = res["environment"]
    sched = ", ".join(f"{m}: {r['rounds']} rounds x {r['steps_per_round']} steps" for m, r in res["models"].items())
    lines = [f"# CEAG step time (batch {res['batch_size']}, sparsity {res['sparsity']}, CPU)", "",
             f"jax {env['jax']} / jaxlib {env['jaxlib']}; torch {env.get('torch', '-')} "
             f"({env.get('torch_threads', '-')} threads, OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY') or 'default'}), "
             f"cooper {env.get('cooper', '-')}; "
             f"{env.get('cpu', '?')}, {env['cpu_count']} cores, load average {env['loadavg_start'][0]:.1f} at start, {env.get('loadavg_end', [float('nan')])[0]:.1f} at end (other jobs share the 2 cores). "
             f"Median ms/step over {sched}; "
             "synthetic inputs.", "",
             "| model | G | jax plain | jax ceag | ceag/plain | torch plain | torch+cooper | cooper/torch plain | torch+cooper / jax ceag |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in res["models"].items():
        for G, g in r["groups"].items():
            t = "torch_cooper" in g
            lines.append(
                f"| {m} | {G} | {g['jax_plain']['median_ms']:.3f} | {g['jax_ceag']['median_ms']:.3f} | "
                f"{g['ratio_ceag_over_plain_paired']:.2f}x | "
                + (f"{g['torch_plain']['median_ms']:.3f} | {g['torch_cooper']['median_ms']:.3f} | "
                   f"{g['ratio_torch_cooper_over_torch_plain']:.2f}x | "
                   f"**{g['ratio_torch_cooper_over_jax_ceag_paired']:.2f}x** |" if t else "- | - | - | - |"))
    lines += ["", "Ratios are medians of per-round ratios (variants interleaved round by round)."]
    if res.get("equivalence"):
        lines += ["", "Equivalence check (same weights, masks, batches; G=2, 14 CEAG steps):", "",
                  "| model | max abs loss diff | max abs multiplier diff | multipliers jax / torch | max abs weight diff (one layer) |",
                  "|---|---:|---:|---|---:|"]
        for m, e in res["equivalence"].items():
            lines.append(f"| {m} | {e['max_abs_loss_diff']:.2e} | {e['max_abs_multiplier_diff']:.2e} | "
                         f"{[round(v, 5) for v in e['multipliers_jax']]} / {[round(v, 5) for v in e['multipliers_torch']]} | "
                         f"{e['max_abs_weight_diff_layer']:.2e} |")
    if res.get("xla_sweep"):
        lines += ["", "CNN, G=10, XLA_FLAGS sweep (each in its own process, torch re-timed alongside):", "",
                  "| XLA_FLAGS | jax plain | jax ceag | torch+cooper | torch+cooper / jax ceag |", "|---|---:|---:|---:|---:|"]
        for r in res["xla_sweep"]:
            if "jax_ceag" in r:
                lines.append(f"| `{r['XLA_FLAGS'] or '(none)'}` | {r['jax_plain']:.1f} | {r['jax_ceag']:.1f} | "
                             f"{r['torch_cooper']:.1f} | {r['torch_over_jax_paired']:.2f}x |")
            else:
                lines.append(f"| `{r['XLA_FLAGS']}` | failed | | | |")
    if res.get("profile"):
        p = res["profile"]
        lines += ["", f"CNN pieces, ms (batch {res['batch_size']}; medians, interleaved):", "",
                  "| op | jax fwd | torch fwd | jax fwd+bwd | jax fwd+bwd (reshape pool) | torch fwd+bwd |",
                  "|---|---:|---:|---:|---:|---:|"]
        f = lambda d, k: f"{d[k]:.2f}" if k in d else "-"   # noqa: E731
        for o in p["ops"]:
            lines.append(f"| {o['op']} | {f(o, 'jax_fwd')} | {f(o, 'torch_fwd')} | {f(o, 'jax_fwd_bwd')} | "
                         f"{f(o, 'jax_reshape_fwd_bwd')} | {f(o, 'torch_fwd_bwd')} |")
        mm = p["model"]
        lines.append(f"| whole model | {mm['jax_forward']:.2f} | {mm['torch_forward']:.2f} | "
                     f"{mm['jax_forward_backward']:.2f} | {mm['jax_forward_backward_reshape_pool']:.2f} | "
                     f"{mm['torch_forward_backward']:.2f} |")
        lines += ["", f"CEAG step (G=10): {mm['jax_ceag_step']:.2f} ms with nnx.max_pool, "
                      f"{mm['jax_ceag_step_reshape_pool']:.2f} ms with a reshape max pool "
                      f"(max abs grad diff {p['reshape_pool_max_abs_grad_diff']:.1e})."]
    if res.get("thunk_profiles"):
        lines += ["", "Thunk time by HLO category (ms/step, summed over threads; jax.profiler trace with "
                      "`--xla_cpu_enable_xprof_traceme=true`):", ""]
        for r in res["thunk_profiles"]:
            if "error" in r:
                continue
            cats = ", ".join(f"{k} {v:.2f}" for k, v in r["by_category_ms"].items() if v >= 0.01 * r["thunk_ms_per_step"])
            lines.append(f"- {r['model']} {r['step']} (pool={r['pool']}): {r['thunk_ms_per_step']:.2f} total; {cats}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--groups", default="2,10,100,1000")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=0, help="steps per timing round (default per model)")
    ap.add_argument("--repeats", type=int, default=0, help="timing rounds (default per model)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about half the time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch/cooper")
    ap.add_argument("--no-check", action="store_true", help="skip the JAX-vs-torch equivalence check")
    ap.add_argument("--xla-sweep", action="store_true", help="CNN G=10 under several XLA_FLAGS (subprocesses)")
    ap.add_argument("--profile", action="store_true", help="CNN: per-conv and fwd/bwd timings, HLO summary")
    ap.add_argument("--out", default=str(RESULTS), help="results folder ('' to write nothing)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for torch's OpenMP pool unless already set (default PASSIVE: idle workers "
                         "sleep instead of spinning, which keeps torch usable on a shared, oversubscribed CPU; "
                         "'' = torch's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    groups = [int(g) for g in args.groups.split(",") if g]
    for m in models:
        if m not in SETTINGS:
            ap.error(f"unknown model {m!r}; valid: {', '.join(SETTINGS)}")

    T = None
    threads = None
    if args.omp_wait_policy and "OMP_WAIT_POLICY" not in os.environ:
        # must be set before torch loads libgomp; see README (spinning OpenMP workers on a loaded machine)
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if not args.no_torch:
        try:
            T = torch_modules()
        except ImportError as e:
            print(f"torch/cooper not installed ({e}); pip install -e '.[bench]' -- timing JAX only", file=sys.stderr)
        else:
            T["torch"].set_num_threads(2)
            threads = T["torch"].get_num_threads()
    t0 = time.perf_counter()
    res: dict[str, Any] = {"batch_size": args.batch_size, "sparsity": args.sparsity, "quick": args.quick,
                           "command": " ".join([Path(sys.executable).name, "benchmarks/ceag_step.py",
                                                *(argv if argv is not None else sys.argv[1:])]),
                           "environment": environment(threads), "models": {}}
    if T is not None and not args.no_check:
        res["equivalence"] = {}
        for m in models:
            e = equivalence_check(m, args, T)
            res["equivalence"][m] = e
            print(f"[check {m}] G=2, 14 steps: max|loss diff|={e['max_abs_loss_diff']:.2e} "
                  f"max|lambda diff|={e['max_abs_multiplier_diff']:.2e} lambda jax={np.round(e['multipliers_jax'], 5)} "
                  f"torch={np.round(e['multipliers_torch'], 5)} max|w diff|={e['max_abs_weight_diff_layer']:.2e}",
                  flush=True)
    for m in models:
        print(f"[{m}] {SETTINGS[m]['what']}", flush=True)
        res["models"][m] = bench_model(m, groups, args, T)
    if args.profile and T is not None:
        print("[profile cnn]", flush=True)
        res["profile"] = profile_cnn(args, T)
        print("[thunk profiles (jax.profiler trace, one subprocess each)]", flush=True)
        res["thunk_profiles"] = run_thunk_profiles(args)
    if args.xla_sweep and T is not None:
        print("[xla sweep cnn G=10]", flush=True)
        res["xla_sweep"] = xla_sweep(args)
    res["environment"]["loadavg_end"] = os.getloadavg()
    res["total_seconds"] = time.perf_counter() - t0

    if args.child:
        Path(args.child).write_text(json.dumps(res))
        return 0
    md = markdown(res)
    print()
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ceag_step.json").write_text(json.dumps(res, indent=1))
        (out / "ceag_step.md").write_text(md)
        print(f"wrote {out / 'ceag_step.json'} and {out / 'ceag_step.md'} ({res['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
