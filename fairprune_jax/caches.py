"""What a run keeps between runs, in the user's cache folder (``$XDG_CACHE_HOME/fairprune_jax`` or
``~/.cache/fairprune_jax``): compiled XLA executables and trained dense models.

- **Compilation cache** (``xla/``): JAX's persistent compilation cache, on by default for ``fairprune run``,
  ``fairprune compare`` and ``prune()``. A second run of the same setting loads its executables instead of
  compiling them. JAX keys every entry by the computation, the jax / jaxlib version and the device, so an
  upgrade or another machine simply compiles again. Off: ``--no-compile-cache``, ``prune(..., compile_cache=False)``
  or ``FAIRPRUNE_XLA_CACHE=0``; elsewhere: ``FAIRPRUNE_XLA_CACHE=FOLDER``; a ``JAX_COMPILATION_CACHE_DIR`` already
  set wins.
- **Dense models** (``dense/``): ``fairprune run`` saves the dense model it trained, keyed by everything that
  decides it (the dense settings, the data's fingerprint, the jax version, the platform and device count), and a
  later run with the same key starts from it instead of training it again (another method, sparsity or method
  option on the same data: the dense model is the same by construction). Beside it, the gradually pruned start
  of ceag / nft / el (:func:`gradual.pruned_start`, keyed by the sparsity and the pruning settings), so one of
  them run after another prunes once. Off: ``--no-dense-cache`` or
  ``FAIRPRUNE_DENSE_CACHE=0``; elsewhere: ``FAIRPRUNE_DENSE_CACHE=FOLDER``. Not used by several processes
  (each host has its own cache folder).

Delete the folder to clear both. Nothing here imports JAX at import time: the compilation cache must be set
before JAX starts where possible.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

XLA_CACHE_ENV = "FAIRPRUNE_XLA_CACHE"
DENSE_CACHE_ENV = "FAIRPRUNE_DENSE_CACHE"


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/fairprune_jax``, or ``~/.cache/fairprune_jax``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path("~").expanduser() / ".cache") / "fairprune_jax"


def _folder(env: str, default: str, enabled: bool) -> Path | None:
    choice = os.environ.get(env, "").strip()
    if not enabled or choice == "0":
        return None
    folder = Path(choice).expanduser() if choice else cache_home() / default
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None                      # an unwritable home: run without the cache rather than fail
    return folder


def use_compilation_cache(enabled: bool = True) -> str | None:
    """Turn on JAX's persistent compilation cache for this process; returns the folder (None: off).

    Best before JAX is imported (the CLI calls it first). In a process where JAX has already compiled without a
    cache (a notebook), the cache is switched on for what compiles from now on; a cache the caller configured
    is left as it is.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if "jax" in sys.modules:
        import jax
        if jax.config.jax_compilation_cache_dir:            # the caller's own cache
            return jax.config.jax_compilation_cache_dir
    folder = _folder(XLA_CACHE_ENV, "xla", enabled)
    if folder is None:
        return None
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")      # entries are small (0.7 MB per run)
    if "jax" in sys.modules:             # imported already (a caller's process): set it there too
        import jax
        from jax.experimental.compilation_cache import compilation_cache
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        compilation_cache.reset_cache()  # JAX decides once per process whether a cache is used: decide again
    return str(folder)


def dense_cache_folder(key: dict, enabled: bool = True) -> Path | None:
    """The folder of the cached dense model for ``key`` (see :func:`runner.dense_fingerprint`), None when off."""
    root = _folder(DENSE_CACHE_ENV, "dense", enabled)
    if root is None:
        return None
    return root / digest(key)


# ---------------------------------------------------------------------------
# One training state in one file (the cached dense models and pruned starts)
# ---------------------------------------------------------------------------

_META = "__meta__"


def save_state(path: Path, state, meta: dict) -> None:
    """Write a training state (any pytree of arrays) into ``path``: every leaf under its tree path (PRNG keys as
    their data) and ``meta`` (JSON) inside the same ``.npz`` file, written to a temporary name and renamed into
    place (one atomic write; a crash leaves the previous file or none). Plain numpy rather than orbax: one process
    writes it (the caches are per host), and orbax's writes are collective over every process."""
    import jax
    import numpy as np
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for key, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if _is_key(x):
            x = jax.random.key_data(x)
        elif isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        arrays[jax.tree_util.keystr(key)] = np.asarray(x)
    arrays[_META] = np.frombuffer(json.dumps(meta, default=_plain).encode(), np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _plain(x):
    """numpy scalars and arrays as Python numbers and lists in the JSON ``meta``; anything else as its text."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def state_meta(path: Path) -> dict | None:
    """The ``meta`` of a file written by :func:`save_state` (its arrays are not read); None when there is no
    readable one."""
    import numpy as np
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return json.loads(bytes(z[_META]).decode())
    except (OSError, ValueError, KeyError, EOFError):
        return None


def load_state(path: Path, template, fingerprint: dict):
    """``(state, meta)`` from a file written by :func:`save_state` whose ``meta["fingerprint"]`` equals
    ``fingerprint``, every leaf matched to ``template`` by its tree path, shape and dtype; None when there is no
    such file or it does not fit (the caller then computes the state again)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    meta = state_meta(path)
    if meta is None or meta.get("fingerprint") != fingerprint:
        return None
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    try:
        with np.load(path) as z:
            for key, t in leaves:
                name = jax.tree_util.keystr(key)
                if name not in z.files:
                    return None
                v = z[name]
                want = jax.random.key_data(t) if _is_key(t) else t
                if v.shape != tuple(want.shape) or v.dtype != np.dtype(want.dtype):
                    return None
                out.append(jax.random.wrap_key_data(jnp.asarray(v), impl=jax.random.key_impl(t)) if _is_key(t)
                           else jnp.asarray(v))
    except (OSError, ValueError, EOFError):
        return None
    return jax.tree_util.tree_unflatten(treedef, out), meta


def _is_key(x) -> bool:
    import jax
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def digest(key: dict) -> str:
    """A short stable name for a JSON-able key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
