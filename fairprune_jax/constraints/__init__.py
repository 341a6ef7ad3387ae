"""Fairness enforced as constraints: the Lagrangian, the multipliers and the dual optimizers that move them
(``constrained``, over ``lagrangian``, ``dual_ascent`` and ``buffers``), the same dual step as optax pieces for a user's own loop
(``dual``), and the differentiable fairness surrogates that penalties and constraints are written in
(``surrogates``). Array arithmetic only: no model, no training loop."""
