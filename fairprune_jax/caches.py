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
  option on the same data: the dense model is the same by construction). Off: ``--no-dense-cache`` or
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
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return root / digest
