"""fairprune_jax: fairness-aware pruning in JAX."""
__version__ = "0.1.0"
