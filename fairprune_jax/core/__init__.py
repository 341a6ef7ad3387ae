"""The floor everything stands on: the run configuration and its choices (``config``), the library's warnings
and progress bars (``notices``) and the naming of pytree leaves (``trees``). Nothing here imports another part
of fairprune_jax, and ``config`` / ``notices`` import no JAX, so the command line can build its parser and
answer ``--help`` at once."""
