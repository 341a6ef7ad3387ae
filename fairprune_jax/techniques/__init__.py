"""The machinery pruning methods are built from, one floor below ``methods/``: the gradual-pruning start
(``gradual``), rewinding and ticket reports (``rewind``), Ballot's votes (``voting``), per-group weight
importance (``group_importance``), the fairness objective of BiFP and its baselines (``fairness_objective``)
and BiP's bilevel mask search (``bilevel``). Each runs training steps, so it sits above ``training``; a method
file imports these, never another method file. A method's ``Context`` reaches them as an argument (imported
for annotations only, so nothing here imports ``methods`` at run time)."""
