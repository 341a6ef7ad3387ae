"""Shared fixtures for the core tests: tiny models built once per session.

Building a model compiles one initializer per distinct kernel shape (seconds
each on a loaded 2-core CPU), so the core tests share these few configurations.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

_XLA_CACHE_KEYS = {"JAX_COMPILATION_CACHE_DIR": None, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


#: XLA's CPU backend without its LLVM optimisation passes: on this suite's tiny models compiling, not running,
#: is most of the time, and skipping those passes takes the suite from 1294 s to 1083 s on 2 cores. Results
#: differ from an optimised build in float rounding only; the tests that depend on the rounding of a user's
#: run (the bit-for-bit reproduction of committed cells, parity of paths that BatchNorm and SGD amplify) are
#: marked ``default_numerics`` and run in a process of their own with XLA's default flags
#: (:func:`pytest_pyfunc_call`). FAIRPRUNE_TEST_XLA_OPT=default keeps the default optimisation everywhere.
#: The two further flags skip LLVM's expensive passes and XLA:CPU's fusion emitters: the ceag first steps on
#: MobileNet-V2 compile in 25 s instead of 50 s (tests/test_paper_settings.py, 2 cores).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
FAST_COMPILE_FLAGS = (FAST_COMPILE_FLAG, "--xla_llvm_disable_expensive_passes=true",
                      "--xla_cpu_use_fusion_emitters=false")


def fast_compile_flags(flags: str) -> list[str]:
    """The suite's compile flags among ``flags`` (what subprocess runs keep of the caller's XLA_FLAGS)."""
    return [f for f in flags.split() if f in FAST_COMPILE_FLAGS]


def pytest_pyfunc_call(pyfuncitem):
    """A ``default_numerics`` test, in a suite compiled without XLA's optimisation passes: run it again in a
    pytest process with XLA's default flags, and pass or fail with it."""
    if pyfuncitem.get_closest_marker("default_numerics") is None or \
            FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", "").split():
        return None
    import subprocess
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in FAST_COMPILE_FLAGS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(XLA_FLAGS=flags, FAIRPRUNE_TEST_XLA_OPT="default")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                        pyfuncitem.nodeid], cwd=str(pyfuncitem.config.rootpath), env=env,
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, f"{pyfuncitem.nodeid} with XLA's default flags:\n{p.stdout[-6000:]}\n{p.stderr[-2000:]}"
    return True


def _fast_compiles() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("FAIRPRUNE_TEST_XLA_OPT") == "default" or "xla_backend_optimization_level" in flags:
        return
    os.environ["XLA_FLAGS"] = " ".join([flags, *FAST_COMPILE_FLAGS]).strip()


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole test run, shared by the xdist workers and by the
    subprocesses the tests start (they inherit the environment).

    Most tests run the same few tiny configurations, and on a CPU compiling, not training, is most of their
    cost (the default ``fairprune run`` takes 60 s of CPU cold and 26 s with its executables cached). The
    folder is new for every run, so every executable is still compiled once per run, and removed at the end.
    ``FAIRPRUNE_TEST_XLA_CACHE=0`` turns it off; a ``JAX_COMPILATION_CACHE_DIR`` already set is kept.
    """
    # the tests never read or write the user's dense-model cache (a test turns it on in a folder of its own)
    os.environ.setdefault("FAIRPRUNE_DENSE_CACHE", "0")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return                                   # workers inherit the controller's environment
    _fast_compiles()
    if os.environ.get("FAIRPRUNE_TEST_XLA_CACHE", "1") == "0":
        return
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    folder = tempfile.mkdtemp(prefix="fairprune-tests-xla-")
    config._fairprune_xla_cache = folder
    for key, value in _XLA_CACHE_KEYS.items():
        os.environ[key] = folder if value is None else value
    if "jax" in sys.modules:                     # imported by a plugin before this hook: set it there too
        import jax
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


#: The longest test files, longest first (measured with --durations; xdist's --dist loadfile hands files to the
#: workers in collection order, so starting with these keeps one worker from running a long file at the end).
LONG_FILES = ["test_paper_settings.py", "test_every_dataset.py", "test_native_datasets.py", "test_prune_api.py", "test_lottery.py", "test_compare.py", "test_bifp.py",
              "test_checkpoint.py", "test_notebook.py", "test_distributed.py", "test_accelerator_smoke.py",
              "test_readme_examples.py", "test_cli.py", "test_masks.py", "test_seeds.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: file order kept otherwise


def pytest_unconfigure(config):
    folder = getattr(config, "_fairprune_xla_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)

# name -> (input_shape, num_classes, model kwargs)
TINY_MODELS = {
    "mlp": ((10,), 3, {"hidden": (8, 6)}),
    "cnn": ((8, 8, 1), 3, {"channels": (4, 8), "hidden": 8}),
    "resnet": ((8, 8, 3), 3, {"depth": 8, "width": 4}),
}


@pytest.fixture(scope="session")
def tiny_models():
    """``{name: (functional_model, params, model_state)}`` for mlp, cnn and resnet (built lazily)."""
    from fairprune_jax.models import build_model

    cache: dict = {}

    class _Lazy(dict):
        def __missing__(self, name):
            shape, nc, kw = TINY_MODELS[name]
            self[name] = build_model(name, shape, nc, seed=0, **kw)
            return self[name]

    return _Lazy(cache)


@pytest.fixture
def no_training(monkeypatch):
    """Fail if a run starts building or training a model: bad input must be refused before that."""
    from fairprune_jax.running import preparation

    def boom(*a, **k):
        raise RuntimeError("work started before the input was validated")
    monkeypatch.setattr(preparation, "build_context", boom)
    monkeypatch.setattr(preparation, "train_dense", boom)
