"""Data parallelism through JAX itself: a device mesh, sharded batches, replicated state.

The step functions do not change. A batch is placed with its rows split over
the ``data`` axis of a :func:`jax.make_mesh` mesh (``NamedSharding(mesh,
P("data"))``); params, masks, optimizer state, multipliers and replay buffers
are replicated (``P()``). ``jax.jit`` sees the *global* arrays, so a
``segment_sum`` over the batch (group counts) or a replay-buffer update is the
result on the global batch: XLA inserts the all-reduces / all-gathers. Only
where the arrays live changes.

Multi-host: every process loads the whole (small, seeded) dataset and builds
the same global batch; :func:`shard_batch` hands each process's devices their
rows (``jax.make_array_from_callback``). Call :func:`initialize` (that is,
``jax.distributed.initialize()``) before anything else touches JAX.

``fit`` and ``evaluate`` take a ``mesh``; without one they use the mesh
installed by :func:`use_mesh` (the CLI installs it around the whole run), and
without that they run on the default device as before.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("fairprune_mesh", default=None)


#: The environment variables :func:`initialize` reads when a flag is not given (as the README names them).
ENV_VARS = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}


def process_settings(coordinator: str | None = None, num_processes: int | str | None = None,
                     process_id: int | str | None = None, env: dict | None = None) -> dict:
    """The ``jax.distributed.initialize`` arguments from the flags, else the ``JAX_*`` environment variables.

    All three given (flags or environment): an explicit cluster (localhost, a
    hand-made cluster). None given: ``{}``, and ``jax.distributed`` detects the
    cluster itself (SLURM, Cloud TPU, Open MPI, ...). Anything in between, or
    a value out of range, is a ``ValueError`` naming the flag, raised before
    JAX starts.
    """
    import os
    env = os.environ if env is None else env
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    source = {}
    for key, var in ENV_VARS.items():
        if given[key] is None and env.get(var, "").strip():
            given[key], source[key] = env[var].strip(), var
    flag = {k: source.get(k, f"--{k.replace('_', '-')}") for k in given}
    for key in ("num_processes", "process_id"):
        if given[key] is not None:
            try:
                given[key] = int(given[key])
            except (TypeError, ValueError):
                raise ValueError(f"{flag[key]} must be an integer; got {given[key]!r}") from None
    have = [k for k, v in given.items() if v is not None]
    if not have:
        return {}
    if len(have) < 3:
        missing = [f"{flag[k]} (or {ENV_VARS[k]})" for k in given if given[k] is None]
        raise ValueError(f"multi-process run: {', '.join(flag[k] for k in have)} given but not "
                         f"{', '.join(missing)}; give all three, or none to let jax.distributed detect the cluster "
                         "(SLURM, Cloud TPU)")
    if given["num_processes"] < 1:
        raise ValueError(f"{flag['num_processes']} must be >= 1; got {given['num_processes']}")
    if not 0 <= given["process_id"] < given["num_processes"]:
        raise ValueError(f"{flag['process_id']} must be in [0, {given['num_processes']}) for "
                         f"{given['num_processes']} processes; got {given['process_id']}")
    addr = str(given["coordinator"])
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{flag['coordinator']} must be HOST:PORT (process 0's address and a free port, "
                         f"e.g. 10.0.0.1:12345); got {addr!r}")
    return {"coordinator_address": addr, "num_processes": given["num_processes"],
            "process_id": given["process_id"]}


def initialize(**kwargs: Any) -> None:
    """Join a multi-process run: ``jax.distributed.initialize(**kwargs)``.

    ``kwargs`` as :func:`process_settings` returns them; empty: jax detects
    the cluster itself (SLURM, Cloud TPU). CPU devices of several processes
    talk over gloo (jax's default ``jax_cpu_collectives_implementation``).
    Must run before any JAX computation; a second call is a no-op.
    """
    if jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:   # no coordinator reachable, no cluster detected, a timeout
        where = (f"coordinator {kwargs['coordinator_address']}, process {kwargs['process_id']} of "
                 f"{kwargs['num_processes']}" if kwargs else "settings detected by jax (SLURM, Cloud TPU)")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not join the multi-process run ({where}): {first}; check that every process got "
                         "the same --coordinator and --num-processes and that process 0 is running, or pass the "
                         "three flags where jax cannot detect the cluster") from e


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Wait until every process got here (a no-op in a single-process run)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"fairprune:{name}")


def agree(value: int) -> int:
    """Process 0's ``value`` on every process (a no-op in a single-process run): one decision for all."""
    if not is_multiprocess():
        return int(value)
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _digest31(value: Any) -> int:
    """A 31-bit digest of a JSON-able value (the same on every process for the same value)."""
    import hashlib
    import json
    text = json.dumps(value, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "big") & 0x7FFFFFFF


def check_same_everywhere(parts: dict[str, Any], what: str = "settings") -> None:
    """Refuse a multi-process run whose processes were given different ``parts`` (a no-op in one process).

    Every process of a run must be started with the same command on the same data: with one argument or one
    copy of the data different, each process would train its own shard with its own settings, the gradients
    would be averaged into a model that none of the settings describe, and process 0 would report it under its
    own (or the collectives would abort in native code over unequal sizes). Each entry of ``parts`` is
    digested and the digests gathered from every process, so every process fails with the same message,
    naming the entries that differ and the processes that differ from process 0."""
    if not is_multiprocess():
        return
    from jax.experimental import multihost_utils
    keys = sorted(parts)
    mine = np.asarray([len(keys)] + [_digest31([k, parts[k]]) for k in keys], np.int32)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(mine.size)))
    if len(set(sizes.reshape(-1).tolist())) > 1:
        raise ValueError(f"the processes of this run were given different {what} (their number of settings "
                         f"differs: {sizes.reshape(-1).tolist()}; another fairprune version?): start every "
                         "process with the same command, data and fairprune version")
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)
    differ = [k for i, k in enumerate(keys) if len(set(every[:, i + 1].tolist())) > 1]
    if differ:
        procs = [p for p in range(every.shape[0]) if not np.array_equal(every[p], every[0])]
        raise ValueError(f"the processes of this run were given different {what}: {', '.join(differ[:8])} "
                         f"differ{'s' if len(differ) == 1 else ''} between process 0 and process(es) "
                         f"{', '.join(map(str, procs[:8]))}; every process must run the same command on the same "
                         "data (a copy of the data on each host must be identical): nothing was trained")


def parse_devices(spec: int | str | None) -> int | None:
    """``"all"`` / ``None`` -> ``None`` (every device); ``"4"`` / ``4`` -> 4 (checked >= 1)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None
    try:
        n = int(spec)
    except (TypeError, ValueError):
        raise ValueError(f"--devices must be a positive integer or 'all'; got {spec!r}") from None
    if n < 1:
        raise ValueError(f"--devices must be a positive integer or 'all'; got {spec!r}")
    return n


def make_mesh(devices: int | str | None = None) -> Mesh:
    """A 1-D ``data`` mesh over the first ``devices`` devices (``None`` / ``"all"``: all of them).

    Over several processes the mesh must span every device (each host holds a
    part of every batch), so ``devices`` must then be all of them.
    """
    n_wanted = parse_devices(devices)
    available = jax.devices()
    n = len(available) if n_wanted is None else n_wanted
    if n > len(available):
        raise ValueError(f"--devices {n}: only {len(available)} {available[0].platform} device(s) are visible "
                         f"({jax.process_count()} process(es)); use --devices {len(available)} or 'all'")
    if jax.process_count() > 1 and n != len(available):
        raise ValueError(f"--devices {n}: a multi-host run uses every device ({len(available)}); use --devices all")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=available[:n])


def num_devices(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.devices.size)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """Within the block, ``fit`` / ``evaluate`` without an explicit ``mesh`` run data-parallel on ``mesh``."""
    token = _MESH.set(mesh)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh installed by :func:`use_mesh`, or ``None``."""
    return _MESH.get()


def sync_each_step(mesh: Mesh | None) -> bool:
    """True for a multi-device CPU mesh (virtual devices, e.g. in tests).

    XLA's CPU runtime runs every device of a program on a shared thread pool;
    with several collective programs in flight at once (evaluation dispatches
    its independent batches back to back) the devices' threads can wait on
    different all-reduces and the run dies with a rendezvous timeout. On such
    a mesh ``fit`` / ``evaluate`` wait for each step before dispatching the
    next (cheap on CPU; accelerators keep fully asynchronous dispatch).
    """
    return mesh is not None and num_devices(mesh) > 1 and mesh.devices.flat[0].platform == "cpu"


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the ``data`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh | None, what: str = "--batch-size") -> None:
    """A training batch is split evenly over the devices: its size must be a multiple of their number."""
    n = num_devices(mesh)
    if batch_size % n:
        lo = max(batch_size // n * n, n)
        raise ValueError(f"{what} {batch_size} is not divisible by the {n} devices of the data-parallel mesh; "
                         f"use a multiple of {n} (e.g. {lo} or {lo + n}) or fewer devices (--devices N; in "
                         "prune() or your own loop, a smaller mesh: distributed.make_mesh(N))")


def round_up(batch_size: int, mesh: Mesh | None) -> int:
    """``batch_size`` rounded up to a multiple of the device count (evaluation pads with ``w = 0``)."""
    n = num_devices(mesh)
    return -(-batch_size // n) * n


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Multi-host: every process holds the same full value; each fills its own devices' slices.
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put(np.asarray(jax.random.key_data(x)), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    arr = np.asarray(x)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def shard_batch(batch: dict, mesh: Mesh | None) -> dict:
    """Place a host batch ``{x, y, g, w}`` with its rows split over the mesh (a no-op without a mesh)."""
    if mesh is None or (mesh.devices.size == 1 and jax.process_count() == 1
                        and mesh.devices.flat[0] == jax.devices()[0]):
        # One device: the jitted step copies host arrays to it in its own fast path (about 50 us a step for an
        # MLP batch against 350 us for device_put of each array, most of a small model's step time on a CPU).
        return batch
    rows = {int(np.shape(v)[0]) for v in batch.values()}
    for b in rows:
        check_batch_size(b, mesh, what="batch size")
    sh = batch_sharding(mesh)
    return {k: _put(v, sh) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Place every array leaf of ``tree`` (state, params, masks, ...) on every device of the mesh."""
    if mesh is None:
        return tree
    sh = replicated(mesh)
    return jax.tree.map(lambda x: _put(x, sh) if isinstance(x, (jax.Array, np.ndarray)) else x, tree)


def is_primary() -> bool:
    """True on the process that writes results (process 0)."""
    return jax.process_index() == 0
