"""The budget: a relative budget's derivation, and how an outcome's figure meets a budget.

*Fits* is decided on the figure itself (``figure * (1 + margin) <= ms``), so a decision never
depends on how noisy the run was; a candidate whose interval ``figure +- spread`` (margin
applied) overlaps ``ms +- budget spread`` is *within noise* and its fit is reported as uncertain
(:func:`fit_class`); callers re-measure those in more rounds before accepting or rejecting
them. Spreads are :meth:`LatencyStats.spread` (round-to-round, see
:mod:`dcvit_deploy.latency.rounds`)."""

from __future__ import annotations

import math
from typing import Literal

from dcvit_deploy.store.records import (
    STATISTICS,
    CandidateOutcome,
    LatencyBudget,
    LatencyStats,
    Statistic,
)

Figure = tuple[float, float, int]
"""``(ms, spread ms, rounds)`` of a budget's statistic."""
FitClass = Literal["fits", "over", "noise"]


def latency(outcome: CandidateOutcome, batch_size: int, statistic: str) -> float | None:
    """The statistic at ``batch_size`` of a selectable outcome; ``None`` when unusable."""
    stats = outcome.latency_at(batch_size) if outcome.selectable else None
    value = stats.stat(statistic) if stats is not None else math.nan
    return value if math.isfinite(value) and value >= 0 else None


def spread(outcome: CandidateOutcome, batch_size: int, statistic: str) -> float:
    """Round-to-round spread of the statistic (0 when unknown or not finite)."""
    stats = outcome.latency_at(batch_size)
    value = stats.spread(statistic) if stats is not None else 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def figure(outcome: CandidateOutcome, budget: LatencyBudget) -> Figure | None:
    """The outcome's figure at the budget's batch size and statistic; ``None`` when unusable."""
    lat = latency(outcome, budget.batch_size, budget.statistic)
    if lat is None:
        return None
    stats = outcome.latency_at(budget.batch_size)
    rounds = stats.rounds if stats is not None else 0
    return lat, spread(outcome, budget.batch_size, budget.statistic), rounds


def fits(outcome: CandidateOutcome, budget: LatencyBudget) -> bool:
    stats = outcome.latency_at(budget.batch_size)
    return figure(outcome, budget) is not None and stats is not None and budget.admits(stats)


def fit_class(outcome: CandidateOutcome, budget: LatencyBudget) -> FitClass | None:
    """``fits`` / ``over`` when the whole interval ``figure +- spread`` (margin applied) is
    below / above ``ms +- budget.spread_ms``; ``noise`` when they overlap; ``None`` for an
    outcome that cannot be selected or was not measured."""
    fig = figure(outcome, budget)
    if fig is None:
        return None
    lat, spr, _ = fig
    g = 1.0 + budget.margin
    if (lat + spr) * g <= budget.ms - budget.spread_ms:
        return "fits"
    return "over" if (lat - spr) * g > budget.ms + budget.spread_ms else "noise"


def misses_within_noise(stats: LatencyStats, budget: LatencyBudget) -> bool:
    """Whether ``stats`` misses ``budget`` by no more than the two spreads together."""
    value, spr = stats.stat(budget.statistic), stats.spread(budget.statistic)
    return not budget.admits(stats) and (value - spr) * (1.0 + budget.margin) <= (
        budget.ms + budget.spread_ms
    )


def relative_budget(
    speedup: float,
    reference: LatencyStats | float,
    *,
    statistic: Statistic,
    batch_size: int,
    margin: float = 0.0,
    reference_name: str = "original",
    reference_spread_ms: float | None = None,
) -> LatencyBudget:
    """The budget "at least ``speedup`` times faster than ``reference_name``": ``ms`` is the
    reference's ``statistic`` divided by ``speedup``. ``reference`` is the reference's stats
    measured in the same run (its spread makes the budget uncertain by spread / speedup) or a
    bare figure in ms (spread ``reference_spread_ms`` or 0)."""
    if not (isinstance(speedup, (int, float)) and math.isfinite(speedup) and speedup > 0):
        raise ValueError(f"speedup must be a positive number, not {speedup!r}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}")
    if isinstance(reference, LatencyStats):
        if reference.batch_size != batch_size:
            raise ValueError(
                f"the reference was measured at batch {reference.batch_size}, "
                f"the budget is for batch {batch_size}"
            )
        ref_ms = reference.stat(statistic)
        spr = reference.spread(statistic) if reference_spread_ms is None else reference_spread_ms
    else:
        ref_ms, spr = float(reference), reference_spread_ms or 0.0
    if not (math.isfinite(ref_ms) and ref_ms > 0):
        raise ValueError(f"the reference figure must be a positive number of ms, not {ref_ms}")
    return LatencyBudget(
        ms=ref_ms / speedup, statistic=statistic, batch_size=batch_size, margin=margin,
        speedup=float(speedup), reference=reference_name, reference_ms=ref_ms,
        reference_spread_ms=max(0.0, float(spr)),
    )  # fmt: skip
