"""What pruning did to each group: additive group counts and every fairness metric computed from them
(``counts``, ``fairness``; fairlearn's definitions), and the per-group certificate with its confidence
intervals (``certify``). Pure functions of counts: no model, no training, no data loading.

(The package is ``metrics`` rather than ``fairness`` because ``fairprune_jax.fairness`` names the metrics
module itself, as it did before the package existed.)"""
