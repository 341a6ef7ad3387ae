"""Running steps over data: the train state (``state``), the masked forward pass and losses (``losses``), the
one masked training step and ``fit`` (``train``), evaluation over a split (``evaluation``), several seeds in one vmapped run (``seeds``), placement over devices and
processes (``distributed``), resumable checkpoints (``checkpoint``), what persists between runs (``caches``)
and experiment tracking (``tracking``). It uses sparsity, metrics and constraints; it knows no method."""
