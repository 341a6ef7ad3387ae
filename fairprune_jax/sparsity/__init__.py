"""Which weights a model keeps: 0/1 masks that mirror the params (``masks``), the scores that rank weights
(``scores``), when a target sparsity is reached (``schedules``), the optax ``Pruner`` for a user's own loop
(``pruning``), and structured units with the compaction that physically removes them (``units``,
``compact``). Below training: it knows models and pytrees, not optimizers' runs, data or methods."""
