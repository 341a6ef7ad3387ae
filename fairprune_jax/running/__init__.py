"""The entry points, top of the stack: one run end to end (``runner`` with ``validation``, ``preparation`` and
``outputs``), grids and suites of runs (``compare`` with ``grid``, ``summaries`` and ``grid_report``), the command
line (``cli``, ``cli_args``), ``prune()`` on a user's own model (``api``) and ``fairprune methods``
(``method_listing``, the generated ``method_catalog``, ``option_docs``). Importing this package imports
nothing else: ``fairprune --help`` must not import JAX."""
