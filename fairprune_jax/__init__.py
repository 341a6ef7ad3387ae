"""fairprune_jax: fairness-aware pruning in JAX.

The package is layered in sub-packages, lowest first (docs/ARCHITECTURE.md has the picture): ``core``
(configuration, warnings, pytree names), ``data`` and ``models``, ``sparsity`` (masks, scores, schedules,
compaction), ``metrics`` (group counts, fairness metrics, the certificate), ``constraints`` (multipliers,
dual optimizers, surrogates), ``training`` (the step, ``fit``, evaluation, checkpoints, caches),
``techniques`` (what methods are built from), ``methods`` (the registry), ``reporting`` and ``running`` (run,
compare, the command line, ``prune()``). The public names below load on first use, so ``fairprune --help``
does not import JAX.

**Old module paths.** Before the sub-packages every module sat in this folder (``fairprune_jax.certify``,
``fairprune_jax.train``, ...). Those names keep working: :data:`MOVED` maps each to its module now, and a
finder on ``sys.meta_path`` answers an import of an old name with the very module object of the new one
(``import fairprune_jax.certify as c``, ``from fairprune_jax import certify`` and
``from fairprune_jax.fairness import GroupCounts`` all give the objects of ``fairprune_jax.metrics``; ``python -m``
with an old name runs the new module). A module that was split keeps every name it had, re-exported by the
part that holds the old name. New code imports the new paths.
"""
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

__version__ = "0.1.0"

# Light on import (``fairprune --help`` must not import jax): the public classes load on first use.
_LAZY = {"Pruner": "fairprune_jax.sparsity.pruning", "Dual": "fairprune_jax.constraints.dual",
         "prune": "fairprune_jax.running.api", "Pruned": "fairprune_jax.running.api",
         "Report": "fairprune_jax.reporting.result"}

#: The module paths of the flat layout (``fairprune_jax.<old>``) -> the module that holds them now.
MOVED = {
    "config": "core.config", "notices": "core.notices",
    "masks": "sparsity.masks", "scores": "sparsity.scores", "schedules": "sparsity.schedules",
    "pruning": "sparsity.pruning", "compact": "sparsity.compact",
    "fairness": "metrics.fairness", "certify": "metrics.certify",
    "constrained": "constraints.constrained", "dual": "constraints.dual", "surrogates": "constraints.surrogates",
    "train": "training.train", "checkpoint": "training.checkpoint", "distributed": "training.distributed",
    "seeds": "training.seeds", "caches": "training.caches", "tracking": "training.tracking",
    "gradual": "techniques.gradual", "rewind": "techniques.rewind", "group_importance": "techniques.group_importance",
    "bilevel": "techniques.bilevel",
    "report": "reporting.report", "result": "reporting.result", "tables": "reporting.tables",
    "figures": "reporting.figures",
    "runner": "running.runner", "compare": "running.compare", "cli": "running.cli", "api": "running.api",
    "method_listing": "running.method_listing", "method_catalog": "running.method_catalog",
    "option_docs": "running.option_docs",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Imports an old module path as the module that holds it now (the same object, under both names)."""

    fairprune_moved = True      # found again by this marker if this file runs twice

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    @staticmethod
    def target(fullname: str) -> str | None:
        package, _, name = fullname.rpartition(".")
        return f"{__name__}.{MOVED[name]}" if package == __name__ and name in MOVED else None

    def find_spec(self, fullname, path=None, target=None):
        new = self.target(fullname)
        if new is None:
            return None
        real = importlib.util.find_spec(new)       # imports only the light __init__ of new's sub-package
        return importlib.machinery.ModuleSpec(fullname, self, origin=real.origin, loader_state=new)

    def create_module(self, spec):
        module = importlib.import_module(spec.loader_state)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # importlib set the alias spec on the (already executed) module; give it back its own
        module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)

    def get_code(self, fullname):                   # ``python -m fairprune_jax.<old>`` runs the new module
        new = self.target(fullname)
        return importlib.util.find_spec(new).loader.get_code(new)

    def get_source(self, fullname):
        new = self.target(fullname)
        return importlib.util.find_spec(new).loader.get_source(new)

    def is_package(self, fullname) -> bool:
        return False


if not any(getattr(f, "fairprune_moved", False) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())     # before an editable install's finder, which looks in the folder


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in MOVED:                                # fairprune_jax.certify without importing it first
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fairprune_jax' has no attribute {name!r}")
