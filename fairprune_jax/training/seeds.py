"""Several seeds in one program: ``jax.vmap`` over a stacked training state.

Seeds of one configuration have identical shapes (same model, same masks
structure, same batch size), so their states stack along a new leading axis
and one compiled step trains all of them at once; each seed keeps its own
init, mask, PRNG key and batch order. On an accelerator this turns S small
steps into one larger one; on a CPU it removes S-1 dispatches per step, but the
arithmetic still grows S-fold (see benchmarks/README.md, ``vmap_seeds.py``).

:func:`fit_seeds` is :func:`fairprune_jax.training.train.fit` for S states at once
(``fairprune compare`` with ``parallel_seeds = true`` trains its dense models
with it): the same batches, PRNG keys and per-epoch history per seed, so each
seed's result matches its own ``fit`` run up to float rounding.
"""
from __future__ import annotations

import time
import weakref
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from fairprune_jax.core.notices import tqdm

from fairprune_jax.training import checkpoint as checkpoint_lib
from fairprune_jax.training import distributed
from fairprune_jax.data.base import Split, batch_indices
from fairprune_jax.training.train import TrainState, check_finite


def stack(trees: list[Any]) -> Any:
    """Stack pytrees of equal structure along a new leading (seed) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, n: int) -> list[Any]:
    """Inverse of :func:`stack`: ``n`` pytrees, one per index of the leading axis.

    One ``jnp.unstack`` per leaf (a single op giving all ``n`` slices), not
    ``n`` indexing ops per leaf: for a training state of 8 seeds that is ~30
    dispatches instead of ~240 (tens of milliseconds on a CPU).
    """
    leaves, treedef = jax.tree.flatten(tree)
    for x in leaves:
        if x.shape[:1] != (n,):
            raise ValueError(f"unstack: expected a leading axis of size {n}; got a leaf of shape {x.shape}")
    parts = [jnp.unstack(x) for x in leaves]
    return [treedef.unflatten([p[i] for p in parts]) for i in range(n)]


def stack_states(states: list[TrainState]) -> TrainState:
    """One :class:`TrainState` whose every leaf has a leading seed axis (PRNG keys included)."""
    return stack(states)


_VMAPPED: "weakref.WeakKeyDictionary[Callable, Callable]" = weakref.WeakKeyDictionary()


def vmap_step(train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]) -> Callable:
    """``(stacked_state, stacked_batch) -> (stacked_state, stacked_stats)``, jitted once for all seeds.

    The stacked state is donated, like the single-seed step's state: its
    buffers are reused for the result instead of allocating (and, for leaves
    that pass through unchanged such as the masks, copying) a second stacked
    state every step. One vmapped function per ``train_step`` (cached), so
    repeated calls do not recompile.
    """
    try:
        return _VMAPPED[train_step]
    except (KeyError, TypeError):
        pass
    fn = jax.jit(jax.vmap(train_step), donate_argnums=0)
    try:
        _VMAPPED[train_step] = fn
    except TypeError:   # not weak-referenceable: no caching
        pass
    return fn


def stacked_batches(split: Split, batch_size: int, seeds: list[int], epoch: int) -> Iterator[dict]:
    """Per-seed shuffled batches of one epoch, stacked to ``(S, B, ...)`` (each seed its own order).

    Seed ``s``'s slice is exactly ``train_batches(split, batch_size, s, epoch)``'s
    batch; the rows of all seeds are gathered with one fancy index per array.
    """
    iters = [batch_indices(len(split), batch_size, s, epoch) for s in seeds]
    w = np.ones((len(seeds), batch_size), np.float32)
    for parts in zip(*iters):
        idx = np.stack(parts)
        yield {"x": split.x[idx], "y": split.y[idx], "g": split.g[idx], "w": w}


def _check_finite(stacked: TrainState, seeds: list[int], desc: str) -> None:
    nan_steps = np.asarray(stacked.nan_step)
    for s, bad in zip(seeds, nan_steps):
        check_finite(stacked.replace(nan_step=bad), f"{desc} (seed {s})")


def fit_seeds(states: list[TrainState], train_step: Callable, split: Split, *, epochs: int, batch_size: int,
              seeds: list[int], desc: str = "train", progress: bool = True,
              log_every: int = 10) -> tuple[list[TrainState], list[dict]]:
    """:func:`fairprune_jax.training.train.fit` for several states of identical shapes in one vmapped run.

    ``states[i]`` is trained on the batch order of ``seeds[i]`` (as
    ``fit(states[i], ..., seed=seeds[i])`` would) with its own PRNG key;
    ``train_step`` is the single-seed step (``make_train_step``), vmapped here.
    Returns the trained states and one history per seed (per-epoch mean loss and
    accuracy as in ``fit``; ``seconds`` is this seed's share of the wall time and
    ``parallel_seeds`` records the shared run). A NaN/Inf loss raises
    :class:`~fairprune_jax.training.train.NonFiniteLossError` naming the seed.

    No hooks, no device mesh and no checkpoints: a checkpointed or data-parallel
    run trains its seeds one after another with ``fit``.
    """
    if len(states) != len(seeds) or not states:
        raise ValueError(f"fit_seeds needs one seed per state; got {len(states)} states and {len(seeds)} seeds")
    if distributed.current_mesh() is not None:
        raise ValueError("parallel seeds do not combine with a device mesh (--devices): train the seeds "
                         "one after another")
    if checkpoint_lib.current() is not None:
        raise ValueError("parallel seeds do not combine with checkpoints: train the seeds one after another")
    n = len(states)
    stacked = stack_states(states)   # new buffers: the callers' states stay valid
    vstep = vmap_step(train_step)
    histories: list[dict[str, Any]] = [{"loss": [], "accuracy": []} for _ in range(n)]
    n_steps = (len(split) // batch_size) * epochs
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, desc=f"{desc} x{n} seeds", disable=not progress, leave=False, dynamic_ncols=True,
               mininterval=0.5)
    global_step = 0
    for epoch in range(epochs):
        ep_stats = []
        for batch in stacked_batches(split, batch_size, seeds, epoch):
            stacked, stats = vstep(stacked, batch)
            ep_stats.append(stats)
            global_step += 1
            if global_step % log_every == 0:
                bar.set_postfix(loss=f"{float(jnp.mean(stats['loss'])):.4f}")
                _check_finite(stacked, seeds, desc)
            bar.update(1)
        if ep_stats:
            losses, accs = jax.device_get((jnp.stack([s["loss"] for s in ep_stats]),
                                           jnp.stack([s["accuracy"] for s in ep_stats])))   # (steps, S)
            for i, h in enumerate(histories):
                # one contiguous float32 column per seed: the same reduction as fit's np.mean
                h["loss"].append(float(np.mean(np.ascontiguousarray(losses[:, i]))))
                h["accuracy"].append(float(np.mean(np.ascontiguousarray(accs[:, i]))))
        _check_finite(stacked, seeds, desc)
    bar.close()
    wall = time.perf_counter() - t0
    for h in histories:
        h["seconds"] = wall / n
        h["parallel_seeds"] = {"seeds": list(seeds), "wall_s": wall}
    return unstack(stacked, n), histories
