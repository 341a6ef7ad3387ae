"""Pruning methods, registered by name (``METHODS``)."""
from fairprune_jax.methods.base import (METHODS, Context, DefaultChange, Method, MethodSettings, NoOptions, RunConfig,
                                        get_method, make_optimizer, register)
from fairprune_jax.methods import baselines  # noqa: F401  (registers magnitude, gmp, random)
from fairprune_jax.methods import lth  # noqa: F401  (registers lth)
from fairprune_jax.methods import ballot  # noqa: F401  (registers ballot)
from fairprune_jax.methods import fair_scratch  # noqa: F401  (registers fair_scratch)

__all__ = ["METHODS", "Context", "DefaultChange", "Method", "MethodSettings", "NoOptions", "RunConfig", "get_method", "make_optimizer", "register"]
from fairprune_jax.methods import ceag  # noqa: E402,F401  (registers ceag)
from fairprune_jax.methods import nft  # noqa: E402,F401  (registers nft)
from fairprune_jax.methods import el  # noqa: E402,F401  (registers el)
from fairprune_jax.methods import bifp  # noqa: E402,F401  (registers bifp and its structured baselines)
from fairprune_jax.methods import fairgrape  # noqa: E402,F401  (registers fairgrape)
