"""The machinery pruning methods are built from, one floor below ``methods/``: the gradual-pruning start
(``gradual``), rewinding and ticket reports (``rewind``), per-group weight importance
(``group_importance``), BiP's bilevel mask search with its fairness objective (``bilevel``) and Ballot's
votes (``voting``). Each runs training steps, so it sits above ``training``; a method file imports these,
never another method file. ``Context`` reaches them as an argument (annotations only, no import of
``methods``)."""
