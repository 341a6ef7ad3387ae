"""Pruning methods, registered by name (``METHODS``)."""
from fairprune_jax.methods.base import (METHODS, Context, Method, RunConfig, get_method, make_optimizer,
                                        method_options, register)
from fairprune_jax.methods import baselines  # noqa: F401  (registers magnitude, gmp, random)

__all__ = ["METHODS", "Context", "Method", "RunConfig", "get_method", "make_optimizer", "method_options",
           "register"]
