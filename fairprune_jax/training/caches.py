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
  (each host has its own cache folder). Each is one orbax checkpoint (:func:`save_state`), like a run's own
  checkpoints, with its fingerprint inside; one that does not fit or is damaged is computed again.
- **Parsed tables** (``dense/tables/``): the Dataset a tabular loader (Adult, a CSV file) built, keyed by the
  bytes of the files it read, its options, the data package's code and the parsing libraries' versions
  (:func:`load_dataset_cached`); the same switch as the dense models.

Delete the folder to clear both. Nothing here imports JAX at import time (numpy only): the compilation cache must be set
before JAX starts where possible.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

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
# One training state in one orbax checkpoint (the cached dense models and pruned starts)
# ---------------------------------------------------------------------------

def save_state(path: Path, state, meta: dict) -> None:
    """Write a training state (any pytree of arrays) as an orbax checkpoint in the folder ``path``, with ``meta``
    (JSON: the fingerprint that must match on load, the history) as a second item of the same checkpoint, the
    way :mod:`checkpoint` saves a run's phases. It is written beside ``path`` (orbax's own temporary folder,
    renamed when complete) and then put in the place of an earlier one, so a crash leaves the earlier
    checkpoint or none, never a mixture. Orbax's save is collective over the processes of a multi-process
    run: every process calls it (the caches of ``fairprune run`` are per host, one process)."""
    import shutil
    from fairprune_jax.training import distributed
    from fairprune_jax.training.checkpoint import _ocp
    ocp = _ocp()
    meta = json.loads(json.dumps(meta, default=_plain))
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    new, old = path.with_name(path.name + ".new"), path.with_name(path.name + ".old")
    if distributed.is_primary():
        shutil.rmtree(new, ignore_errors=True)             # left by a crash
    distributed.barrier("cache-save-start")
    mngr = _manager(new)
    try:
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
    finally:
        mngr.close()
    if distributed.is_primary():
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier("cache-save-end")


def _manager(path: Path):
    """An orbax manager of the one-step checkpoint in ``path`` that knows its two items (so their metadata
    and contents can be read without a save first)."""
    from fairprune_jax.training.checkpoint import _ocp
    ocp = _ocp()
    opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(path).absolute(), options=opts, item_handlers={   # orbax wants absolute
        "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def _plain(x):
    """numpy scalars and arrays as Python numbers and lists in the JSON ``meta``; anything else as its text."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def state_meta(path: Path) -> dict | None:
    """The ``meta`` saved with a state by :func:`save_state` (the arrays are not read); None when there is no
    readable one (no such folder, an interrupted or corrupt write)."""
    path = Path(path)
    if not path.is_dir():
        return None
    from fairprune_jax.training.checkpoint import _ocp
    try:
        mngr = _manager(path)
        try:
            if mngr.latest_step() is None:
                return None
            meta = mngr.restore(0, args=_ocp().args.Composite(meta=_ocp().args.JsonRestore()))["meta"]
        finally:
            mngr.close()
    except Exception:  # noqa: BLE001 - whatever orbax raises on a truncated folder: a miss, computed again
        return None
    return meta if isinstance(meta, dict) else None


def load_state(path: Path, template, fingerprint: dict):
    """``(state, meta)`` from :func:`save_state`'s folder when its ``meta["fingerprint"]`` equals ``fingerprint``
    and every leaf of ``template`` is saved under the same name (its path in the tree) with the same shape and
    dtype, and nothing else is; None otherwise (the caller computes the state again). Nothing is cast."""
    import jax
    from fairprune_jax.training.checkpoint import _ocp
    ocp = _ocp()
    meta = state_meta(path)
    if meta is None or meta.get("fingerprint") != fingerprint:
        return None
    want = {_names(p): (tuple(np.shape(jax.random.key_data(x) if _is_key(x) else x)),
                        str(np.dtype((jax.random.key_data(x) if _is_key(x) else x).dtype)))
            for p, x in jax.tree_util.tree_flatten_with_path(template)[0]}
    try:
        mngr = _manager(Path(path))
        try:
            saved = mngr.item_metadata(0)["state"]
            have = {_names(p): (tuple(m.shape), str(np.dtype(m.dtype)))
                    for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
            if have != want:
                return None
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
            state = mngr.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        finally:
            mngr.close()
    except Exception:  # noqa: BLE001 - a truncated or corrupt checkpoint is a miss, never a failed run
        return None
    return state, meta


def _names(path) -> tuple[str, ...]:
    """A tree path as plain names (a field, a dict key or an index alike), the same for a saved tree and its
    template."""
    return tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _is_key(x) -> bool:
    import jax
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def arrays_digest(tree) -> str:
    """A digest of every array of ``tree`` (names, shapes, dtypes and bytes, in leaf order): what a cache
    derived from trained weights is keyed by, so that another model's (a dense model retrained on other data
    into the same folder) never matches."""
    import jax
    h = hashlib.sha1()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.ascontiguousarray(np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def digest(key: dict) -> str:
    """A short stable name for a JSON-able key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------
# Parsed tables (the Adult files, a CSV file): the Dataset a tabular loader built from the same bytes
# ---------------------------------------------------------------------------

def _data_code() -> str:
    """A hash of the data package's source: a parsed table is reused only by the code that parsed it."""
    here = Path(__file__).resolve().parents[1] / "data"       # this file is in training/
    h = hashlib.sha256()
    for p in sorted(here.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _versions() -> dict:
    from importlib import metadata
    out = {}
    for name in ("numpy", "pandas", "scikit-learn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def data_key(name: str, data_dir, options: dict, files: list) -> dict:
    """What a tabular loader's result depends on: the loader and its options, the bytes of every file it reads
    (size and SHA-256), the data package's source and the versions of the libraries that parse and encode."""
    def digest_file(p: Path) -> list:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return [p.name, p.stat().st_size, h.hexdigest()]
    return {"loader": name, "options": {k: options[k] for k in sorted(options)},
            "files": [digest_file(Path(p)) for p in files], "code": _data_code(), "versions": _versions()}


def load_dataset_cached(name: str, data_dir, options: dict, *, enabled: bool = True):
    """``data.load_dataset(name, data_dir, **options)``, reusing the Dataset an earlier run parsed from the same
    bytes with the same options and code (``tables/<key>.npz`` in the dense-model folder; off with it:
    ``--no-dense-cache`` or ``FAIRPRUNE_DENSE_CACHE=0``). The warnings the parse gave are kept with it and given
    again. Only the tabular loaders, whose files :func:`data.source_files` names; anything else loads as usual.
    Returns ``(dataset, from_cache)``."""
    import warnings
    from fairprune_jax.data import load_dataset, source_files
    from fairprune_jax.core.notices import FairpruneWarning, warn
    options = {k: v for k, v in options.items() if v is not None}
    root = _folder(DENSE_CACHE_ENV, "dense", enabled)
    try:
        files = source_files(name, data_dir) if root is not None else None
    except (OSError, ValueError):
        files = None                                 # a missing file: the loader says so in its own words
    if files is None:
        return load_dataset(name, data_dir, **options), False
    key = data_key(name, data_dir, options, files)
    path = root / "tables" / f"{digest(key)}.npz"
    got = _read_dataset(path, key)
    if got is not None:
        ds, messages = got
        for m in messages:
            warn(m)
        ds.__dict__["_from_cache"] = True            # (not in meta: results.json's dataset meta is unchanged)
        return ds, True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(name, data_dir, **options)
    messages = []
    for w in caught:                                 # given again, as the loader gave them
        if issubclass(w.category, FairpruneWarning):
            messages.append(str(w.message))
            warn(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        _write_dataset(path, key, ds, messages)
    except (OSError, TypeError, ValueError):         # a full disk, a read-only folder: the next run parses again
        pass
    return ds, False


def _write_dataset(path: Path, key: dict, ds, messages: list[str]) -> None:
    arrays = {f"{split}_{part}": getattr(s, part) for split, s in ds.splits().items() for part in ("x", "y", "g")}
    meta = {"key": key, "name": ds.name, "group_names": list(ds.group_names), "group_attrs": list(ds.group_attrs),
            "class_names": list(ds.class_names), "meta": ds.meta, "warnings": messages,
            "fingerprint": ds.fingerprint()}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta, default=_plain).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)                            # one atomic write


def _read_dataset(path: Path, key: dict):
    """``(Dataset, warnings)`` saved by :func:`_write_dataset` for ``key``, or None (missing, other key, damaged,
    or not the data it was: its fingerprint is checked after loading)."""
    from fairprune_jax.data.base import Dataset, Split
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            if meta.get("key") != json.loads(json.dumps(key, default=_plain)):
                return None
            splits = {s: Split(z[f"{s}_x"], z[f"{s}_y"], z[f"{s}_g"])
                      for s in ("train", "test", "val") if f"{s}_x" in z.files}
        ds = Dataset(name=meta["name"], train=splits["train"], test=splits["test"], val=splits.get("val"),
                     group_names=meta["group_names"], group_attrs=meta["group_attrs"],
                     class_names=meta["class_names"], meta=meta["meta"])
        ds.validate()
        if ds.fingerprint() != meta["fingerprint"]:
            return None
    except Exception:  # noqa: BLE001 - a truncated or foreign file is a miss: the data is parsed again
        return None
    return ds, list(meta.get("warnings", []))
