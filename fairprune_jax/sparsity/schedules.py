"""Sparsity schedules: how the target sparsity is reached over training."""
from __future__ import annotations

import math

from fairprune_jax.sparsity.masks import check_sparsity


def one_shot(final_sparsity: float) -> list[float]:
    """Prune once, straight to the target."""
    check_sparsity(final_sparsity)
    return [float(final_sparsity)]


def cubic(step: int, final_sparsity: float, total_steps: int, *, initial_sparsity: float = 0.0,
          begin_step: int = 0) -> float:
    """Gradual pruning (Zhu & Gupta 2017): s_t = s_f + (s_i - s_f) (1 - t/T)^3.

    ``t`` counts from ``begin_step``; before it the sparsity is ``s_i``, after
    ``begin_step + total_steps`` it is ``s_f``.
    """
    check_sparsity(final_sparsity)
    if total_steps <= 0:
        return float(final_sparsity)
    t = min(max(step - begin_step, 0), total_steps) / total_steps
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - t) ** 3)


def cubic_steps(final_sparsity: float, total_steps: int, frequency: int, *,
                initial_sparsity: float = 0.0) -> list[tuple[int, float]]:
    """``[(step, sparsity)]`` at which a gradual schedule updates the mask (every ``frequency`` steps, ending on s_f)."""
    frequency = max(int(frequency), 1)
    points = [(t, cubic(t, final_sparsity, total_steps, initial_sparsity=initial_sparsity))
              for t in range(frequency, total_steps + 1, frequency)]
    if not points or points[-1][0] != total_steps:
        points.append((max(total_steps, 0), float(final_sparsity)))
    return points


def iterative_rounds(final_sparsity: float, fraction: float = 0.2) -> list[float]:
    """Sparsity after each round when every round removes ``fraction`` of the remaining weights.

    Round r reaches 1 - (1 - fraction)^r; the last round is clipped to the
    target (lottery-ticket style iterative magnitude pruning, Frankle & Carbin 2019).
    """
    check_sparsity(final_sparsity)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"per-round pruning fraction must be in (0, 1); got {fraction}")
    if final_sparsity == 0.0:
        return []
    # at least one round: for a tiny target ceil(ratio - 1e-9) is 0 and out[-1] would not exist
    rounds = max(math.ceil(math.log(1.0 - final_sparsity) / math.log(1.0 - fraction) - 1e-9), 1)
    out = [1.0 - (1.0 - fraction) ** r for r in range(1, rounds + 1)]
    out[-1] = float(final_sparsity)
    return out


def capped_rounds(final_sparsity: float, fraction: float, max_rounds: int) -> tuple[list[float], float]:
    """:func:`iterative_rounds`, at most ``max_rounds`` of them (0: no cap): with the cap the per-round fraction
    is raised so that ``max_rounds`` rounds land on the target. Returns the sparsities and the fraction used."""
    sched = iterative_rounds(final_sparsity, fraction)
    max_rounds = int(max_rounds)
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0 (0 = no cap); got {max_rounds}")
    if max_rounds and len(sched) > max_rounds:
        fraction = 1.0 - (1.0 - final_sparsity) ** (1.0 / max_rounds)
        sched = [1.0 - (1.0 - fraction) ** r for r in range(1, max_rounds + 1)]
        sched[-1] = float(final_sparsity)
    return sched, float(fraction)
