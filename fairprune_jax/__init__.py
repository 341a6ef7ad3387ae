"""fairprune_jax: fairness-aware pruning in JAX."""
__version__ = "0.1.0"

# Light on import (``fairprune --help`` must not import jax): the public classes load on first use.
_LAZY = {"Pruner": "fairprune_jax.pruning", "Dual": "fairprune_jax.dual", "prune": "fairprune_jax.api",
         "Pruned": "fairprune_jax.api", "Report": "fairprune_jax.result"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fairprune_jax' has no attribute {name!r}")
