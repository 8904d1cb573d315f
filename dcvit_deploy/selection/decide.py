"""Budget selection: the densest verified candidate whose measured latency fits the budget.

Everything here is pure logic over :class:`~dcvit_deploy.store.records.CandidateOutcome` records; it
builds, measures and imports nothing heavy.

Capacity order (over both axes)
    Artifacts are ranked by ``retained`` (fraction of the original MACs, larger is denser, on a
    grid of :data:`RETAINED_TIE`: sizes within half a point are one size), ties broken toward
    the higher ``precision`` (bits), then the more faithful (:func:`faithfulness`; ``None``
    ranks last), then by name, so every decision is deterministic.

Selectable
    ``outcome.selectable`` (status ``ok`` and verification passed or not run) *and* a finite
    ``budget.statistic`` measured at ``budget.batch_size``.

Never raises for an infeasible budget
    :func:`decide` returns a :class:`Selection` with ``chosen=None`` and a reason for every
    candidate, which is what a report needs; :func:`infeasible_error` is the one line (exit 3).

Uncertainty
    Every figure comes with a spread (:meth:`LatencyStats.spread`: the round-to-round
    interquartile range when measured in interleaved rounds, see
    :mod:`dcvit_deploy.latency.rounds`),
    and a relative budget with the spread of its reference (``LatencyBudget.spread_ms``).
    *Fits* is decided on the figure itself (``figure * (1 + margin) <= ms``), so a decision
    never depends on how noisy the run was; but a candidate whose interval
    ``[figure - spread, figure + spread] * (1 + margin)`` overlaps ``ms +- budget spread`` is
    *within noise* (:func:`within_noise`) and its fit is reported as uncertain: callers
    re-measure those (:func:`needs_remeasure`, more interleaved rounds) before accepting or
    rejecting them. A candidate
    is *dominated* only when it is slower than a larger sibling beyond both spreads.

Preference
    ``prefer="capacity"`` (default) chooses the densest candidate that fits;
    ``prefer="fidelity"`` the most faithful among those that fit (:func:`faithfulness`: the
    lowest KL to the original, else the highest ``fidelity``), ties broken by capacity order;
    when the images cannot separate it from the runner-up, its reason says so.

Confirmation
    :func:`select_confirmed` re-measures the choice (and its denser neighbour) through a
    caller-supplied ``confirm`` function -- in practice a fresh process,
    :func:`dcvit_deploy.latency.confirm.confirm_in_fresh_process` -- and continues the search with
    the
    next candidate when the confirmation no longer fits. A confirmation that misses only within
    its own spread is measured again with :data:`RECONFIRM_FACTOR` times the rounds first.

Reason strings start with a stable prefix that tools may match on: ``chosen:``,
``over budget:``, ``fits, but smaller than chosen``, ``fits, but lower precision than chosen``,
``fits, but lower fidelity than chosen``, ``fits`` (nothing chosen), ``dominated:``,
``confirmation failed:``, ``not deployable:`` (a pick that could not be trained or verified, or
missed the fidelity floor), ``verification failed:``, ``export failed:``, ``build failed:``,
``profile failed:``, ``below floor:``, ``not measured``. A figure measured in rounds reads
``p50 4.70 ms +- 0.08 (5 rounds)``; a fit within noise ends with ``; within noise of the
budget``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, Protocol

from dcvit_deploy.errors import BudgetInfeasible
from dcvit_deploy.store.records import (
    PRECISION_BITS,
    STATISTICS,
    CandidateOutcome,
    LatencyBudget,
    LatencyStats,
    Selection,
    Statistic,
    Verification,
)

Prefer = Literal["capacity", "fidelity"]
PREFERENCES: tuple[str, ...] = ("capacity", "fidelity")


class ConfirmFn(Protocol):
    """``confirm(names)`` re-measures those candidates (in a fresh process) and returns their
    stats at the budget's batch size; ``rounds``, when given, asks for exactly that many
    rounds in a new measurement (nothing answered from earlier ones)."""

    def __call__(
        self, names: Sequence[str], *, rounds: int | None = None
    ) -> Mapping[str, LatencyStats]: ...


RECONFIRM_FACTOR = 3
"""A confirmation within noise of the budget is measured again with this many times its
rounds (the spread of a median shrinks about as the square root of the rounds)."""

__all__ = [
    "COMPARE_TOP_K",
    "RECONFIRM_FACTOR",
    "ConfirmFn",
    "budget_summary",
    "capacity_order",
    "decide",
    "dominated",
    "fit_class",
    "infeasible_error",
    "must_compare",
    "needs_remeasure",
    "pareto_front",
    "relative_budget",
    "select_confirmed",
    "within_noise",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers


RETAINED_TIE = 0.005
"""Retained-MAC fractions on one grid step (half a point of the original's MACs) are one size."""


def faithfulness(outcome: CandidateOutcome) -> float:
    """Higher is closer to the original: minus the KL divergence when measured (it ranks with
    far less variance than top-1 agreement), else the top-1 agreement (``-inf`` when none)."""
    c = outcome.closeness
    if c is not None:
        return -c.kl if math.isfinite(c.kl) else -math.inf
    return outcome.fidelity if outcome.fidelity is not None else -math.inf


def _capacity_key(outcome: CandidateOutcome) -> tuple[float, float, float]:
    size = round(outcome.retained / RETAINED_TIE)
    return (size, PRECISION_BITS.get(outcome.precision, 32), faithfulness(outcome))


def capacity_order(outcomes: Iterable[CandidateOutcome]) -> list[CandidateOutcome]:
    """Outcomes densest first: size, then precision, then faithfulness (desc), then name."""
    return sorted(outcomes, key=lambda o: (*(-v for v in _capacity_key(o)), o.candidate))


def _latency(outcome: CandidateOutcome, batch_size: int, statistic: str) -> float | None:
    """The statistic at ``batch_size`` for a selectable outcome; ``None`` when unusable."""
    if not outcome.selectable:
        return None
    stats = outcome.latency_at(batch_size)
    if stats is None:
        return None
    value = stats.stat(statistic)
    return value if math.isfinite(value) and value >= 0 else None


def _spread(outcome: CandidateOutcome, batch_size: int, statistic: str) -> float:
    """Round-to-round spread of the statistic (0 when unknown or not finite)."""
    stats = outcome.latency_at(batch_size)
    if stats is None:
        return 0.0
    value = stats.spread(statistic)
    return value if math.isfinite(value) and value > 0 else 0.0


def _rounds(outcome: CandidateOutcome, batch_size: int) -> int:
    stats = outcome.latency_at(batch_size)
    return stats.rounds if stats is not None else 0


def _fits(outcome: CandidateOutcome, budget: LatencyBudget) -> bool:
    if _latency(outcome, budget.batch_size, budget.statistic) is None:
        return False
    stats = outcome.latency_at(budget.batch_size)
    return stats is not None and budget.admits(stats)


FitClass = Literal["fits", "over", "noise"]


def fit_class(outcome: CandidateOutcome, budget: LatencyBudget) -> FitClass | None:
    """``fits`` / ``over`` when the whole interval ``figure +- spread`` (margin applied) is
    below / above the budget ``ms +- budget.spread_ms``; ``noise`` when they overlap;
    ``None`` for an outcome that cannot be selected or was not measured."""
    lat = _latency(outcome, budget.batch_size, budget.statistic)
    if lat is None:
        return None
    spr = _spread(outcome, budget.batch_size, budget.statistic)
    g = 1.0 + budget.margin
    if (lat + spr) * g <= budget.ms - budget.spread_ms:
        return "fits"
    if (lat - spr) * g > budget.ms + budget.spread_ms:
        return "over"
    return "noise"


def within_noise(outcomes: Iterable[CandidateOutcome], budget: LatencyBudget) -> tuple[str, ...]:
    """Candidates (densest first) whose fit is within noise of the budget: re-measure them
    before accepting or rejecting them."""
    return tuple(o.candidate for o in capacity_order(outcomes) if fit_class(o, budget) == "noise")


def needs_remeasure(
    outcomes: Iterable[CandidateOutcome], budget: LatencyBudget, *, prefer: Prefer = "capacity"
) -> tuple[str, ...]:
    """The within-noise candidates whose fit could change the choice, densest first.

    ``capacity``: those at least as dense as the densest candidate that clearly fits (a
    smaller one cannot be chosen either way). ``fidelity``: every within-noise candidate.
    """
    ordered = capacity_order(outcomes)
    noisy = [o for o in ordered if fit_class(o, budget) == "noise"]
    if prefer == "fidelity":
        return tuple(o.candidate for o in noisy)
    clear = next((o for o in ordered if fit_class(o, budget) == "fits"), None)
    if clear is None:
        return tuple(o.candidate for o in noisy)
    limit = _capacity_key(clear)
    return tuple(o.candidate for o in noisy if _capacity_key(o) >= limit)


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
        spread = reference.spread(statistic) if reference_spread_ms is None else reference_spread_ms
    else:
        ref_ms = float(reference)
        spread = reference_spread_ms or 0.0
    if not (math.isfinite(ref_ms) and ref_ms > 0):
        raise ValueError(f"the reference figure must be a positive number of ms, not {ref_ms}")
    return LatencyBudget(
        ms=ref_ms / speedup,
        statistic=statistic,
        batch_size=batch_size,
        margin=margin,
        speedup=float(speedup),
        reference=reference_name,
        reference_ms=ref_ms,
        reference_spread_ms=max(0.0, float(spread)),
    )


def _decimals(value: float) -> int:
    return 2 if abs(value) >= 1.0 else 3


def _ms(value: float) -> str:
    return f"{value:.{_decimals(value)}f}"


def _ceil_ms(value: float) -> str:
    """``value`` rounded *up* at the precision :func:`_ms` prints, so the text still admits it."""
    d = _decimals(value)
    scaled = math.ceil(value * 10**d - 1e-9)
    return f"{scaled / 10**d:.{d}f}"


def _margin_text(margin: float) -> str:
    return f"margin {margin * 100:g}%"


def _budget_expr(value: float, budget: LatencyBudget, spread: float = 0.0, rounds: int = 1) -> str:
    """``p50 6.10 ms x1.05 = 6.41`` (or ``p50 6.10 ms`` without a margin); with a spread or
    rounds: ``p50 6.10 ms +- 0.08 (5 rounds)``."""
    figure = f"{budget.statistic} {_ms(value)} ms"
    if spread > 0 or rounds > 1:
        figure += f" +- {_ms(spread)}" + (f" ({rounds} rounds)" if rounds > 1 else "")
    if budget.margin > 0:
        guarded = value * (1.0 + budget.margin)
        return f"{figure} x{1.0 + budget.margin:.2f} = {_ms(guarded)}"
    return figure


def _budget_text(budget: LatencyBudget) -> str:
    """``5.00 ms`` or, relative, ``5.00 ms (original 6.50 ms / 1.3)``."""
    if budget.relative and budget.reference_ms is not None:
        return (
            f"{_ms(budget.ms)} ms ({budget.reference} {_ms(budget.reference_ms)} ms / "
            f"{budget.speedup:g})"
        )
    return f"{_ms(budget.ms)} ms"


def budget_summary(budget: LatencyBudget) -> str:
    """One line for the console: ``p50 x(1+5%) <= 5.00 ms at batch 1`` or, relative,
    ``p50 x(1+0%) <= 1.60 ms (original 1.84 ms / 1.15) at batch 1``."""
    return (
        f"{budget.statistic} x(1+{budget.margin * 100:g}%) <= {_budget_text(budget)} "
        f"at batch {budget.batch_size}"
    )


def _verification_text(v: Verification | None) -> str:
    if v is None:
        return "no details"
    if v.reason:
        return v.reason
    parts = [f"max_abs {v.max_abs:.3g}", f"cosine {v.cosine:.4f}", f"top-1 {v.top1_agreement:.1%}"]
    if not v.finite:
        parts.insert(0, "NaN/Inf in outputs")
    return ", ".join(parts)


def _failure_reason(outcome: CandidateOutcome, batch_size: int) -> str | None:
    """Reason for an outcome that cannot be selected at all, else ``None``."""
    detail = outcome.error.strip() or "no details"
    if outcome.status == "export_failed":
        return f"export failed: {detail}"
    if outcome.status == "build_failed":
        return f"build failed: {detail}"
    if outcome.status == "profile_failed":
        return f"profile failed: {detail}"
    if outcome.status == "below_floor":
        return f"below floor: {detail}"
    if outcome.status == "not_measured":
        return "not measured" + (f": {outcome.error.strip()}" if outcome.error.strip() else "")
    if outcome.status == "verify_failed":
        text = outcome.error.strip() or _verification_text(outcome.verification)
        return f"verification failed: {text}"
    if outcome.verification is not None and not outcome.verification.passed:
        return f"verification failed: {_verification_text(outcome.verification)}"
    if outcome.latency_at(batch_size) is None:
        measured = sorted(s.batch_size for s in outcome.latency)
        return f"not measured at batch {batch_size} (measured batches: {measured or 'none'})"
    return None


def _check_unique(names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"candidate {name!r} appears twice; selection needs unique names")
        seen.add(name)


# --------------------------------------------------------------------------- pareto


def dominated(
    outcomes: Iterable[CandidateOutcome], batch_size: int, statistic: str
) -> dict[str, str]:
    """Candidates slower than a strictly larger sibling beyond both spreads.

    Returns ``{dominated name: sibling name}``: ``o`` is dominated by a sibling ``s`` with a
    strictly larger capacity key (``retained``, then ``fidelity``) when
    ``lat(o) - spread(o) > lat(s) + spread(s)``; the sibling named is the one with the lowest
    ``lat + spread``. Equal figures, or intervals that overlap, are not dominance: on a noisy
    machine such a difference says nothing about the models. Only selectable outcomes
    measured at ``batch_size`` take part. A dominated candidate can never be the best choice
    under any budget: the sibling is faster and denser.
    """
    eligible = [
        (o, lat, _spread(o, batch_size, statistic))
        for o in capacity_order(outcomes)
        if (lat := _latency(o, batch_size, statistic)) is not None
    ]
    out: dict[str, str] = {}
    best: tuple[float, str] | None = None  # lowest upper bound among strictly larger groups
    i = 0
    while i < len(eligible):
        key = _capacity_key(eligible[i][0])
        j = i
        while j < len(eligible) and _capacity_key(eligible[j][0]) == key:
            j += 1
        group = eligible[i:j]
        for o, lat, spr in group:
            if best is not None and lat - spr > best[0]:
                out[o.candidate] = best[1]
        for o, lat, spr in group:
            if best is None or lat + spr < best[0]:
                best = (lat + spr, o.candidate)
        i = j
    return out


def pareto_front(
    outcomes: Iterable[CandidateOutcome], batch_size: int, statistic: str
) -> tuple[CandidateOutcome, ...]:
    """Selectable, measured outcomes not :func:`dominated` by a larger sibling.

    Returned densest first; along the result latency strictly decreases as capacity decreases
    (except between candidates of identical capacity), i.e. it is the latency/capacity
    trade-off curve.
    """
    items = list(outcomes)
    beaten = dominated(items, batch_size, statistic)
    return tuple(
        o
        for o in capacity_order(items)
        if _latency(o, batch_size, statistic) is not None and o.candidate not in beaten
    )


# --------------------------------------------------------------------------- decide / select


def _choose(
    ordered: Sequence[CandidateOutcome], budget: LatencyBudget, prefer: Prefer
) -> CandidateOutcome | None:
    fitting = [o for o in ordered if _fits(o, budget)]
    if not fitting:
        return None
    if prefer == "fidelity":
        # max() keeps the first of equals: ordered is capacity order, so ties go to capacity.
        return max(fitting, key=faithfulness)
    return fitting[0]


def _undecided(chosen: CandidateOutcome, others: Sequence[CandidateOutcome]) -> str:
    """``; N images cannot separate it from X (...)`` when the runner-up in faithfulness is
    within 1.96 standard errors of the chosen one's KL, else ``""``."""
    runner = max(others, key=faithfulness, default=None)
    a, b = chosen.closeness, runner.closeness if runner else None
    if runner is None or a is None or b is None or not math.isfinite(a.kl + b.kl):
        return ""
    if abs(a.kl - b.kl) > 1.96 * math.hypot(a.kl_se, b.kl_se):
        return ""
    return (f"; {a.samples} images cannot separate it from {runner.candidate} (KL {a.kl:.3g} "
            f"+- {a.kl_se:.2g} vs {b.kl:.3g} +- {b.kl_se:.2g}): add --holdout images or "
            "--eval-data")  # fmt: skip


def _reasons(
    outcomes: Sequence[CandidateOutcome], budget: LatencyBudget, prefer: Prefer = "capacity"
) -> tuple[str | None, dict[str, str]]:
    ordered = capacity_order(outcomes)
    chosen = _choose(ordered, budget, prefer)
    beaten = dominated(ordered, budget.batch_size, budget.statistic)
    by_name = {o.candidate: o for o in ordered}
    limit = _budget_text(budget)
    reasons: dict[str, str] = {}
    for o in ordered:
        failure = _failure_reason(o, budget.batch_size)
        if failure is not None:
            reasons[o.candidate] = failure
            continue
        lat = _latency(o, budget.batch_size, budget.statistic)
        assert lat is not None  # guaranteed by _failure_reason returning None
        spr = _spread(o, budget.batch_size, budget.statistic)
        expr = _budget_expr(lat, budget, spr, _rounds(o, budget.batch_size))
        noise = "; within noise of the budget" if fit_class(o, budget) == "noise" else ""
        if chosen is not None and o.candidate == chosen.candidate:
            if prefer == "fidelity":
                fid = f"fidelity {o.fidelity:.1%}" if o.fidelity is not None else "no fidelity"
                fid += f", KL {o.closeness.kl:.3g}" if o.closeness else ""
                why = f"highest-fidelity verified candidate within budget ({fid}, retained "
                rest = [f for f in ordered if _fits(f, budget) and f is not o]
                noise = _undecided(o, rest) + noise
            else:
                why = "densest verified candidate within budget (retained "
            reasons[o.candidate] = f"chosen: {why}{o.retained:.1%} MACs); {expr} <= {limit}{noise}"
            continue
        if _fits(o, budget):
            status = f"fits ({expr} <= {limit})"
            if chosen is not None:
                same_size = _capacity_key(o)[0] == _capacity_key(chosen)[0]
                rel = "lower precision than" if same_size else "smaller than"
                if prefer == "fidelity" and faithfulness(o) < faithfulness(chosen):
                    rel = "lower fidelity than"
                status = f"fits, but {rel} chosen {chosen.candidate} ({expr} <= {limit})"
        else:
            status = f"over budget: {expr} > {limit}"
        status += noise
        if o.candidate in beaten:
            sibling = beaten[o.candidate]
            sib = by_name[sibling]
            sib_lat = _latency(sib, budget.batch_size, budget.statistic)
            assert sib_lat is not None
            sib_spr = _spread(sib, budget.batch_size, budget.statistic)
            both = (
                f" beyond both spreads (+-{_ms(spr)}, +-{_ms(sib_spr)})" if spr or sib_spr else ""
            )
            reasons[o.candidate] = (
                f"dominated: not faster than larger sibling {sibling} ({budget.statistic} "
                f"{_ms(lat)} ms vs {_ms(sib_lat)} ms{both}); {status}"
            )
        else:
            reasons[o.candidate] = status
    return (chosen.candidate if chosen is not None else None), reasons


def _figures(
    outcomes: Sequence[CandidateOutcome], budget: LatencyBudget
) -> dict[str, tuple[float, float, int]]:
    out: dict[str, tuple[float, float, int]] = {}
    for o in capacity_order(outcomes):
        lat = _latency(o, budget.batch_size, budget.statistic)
        if lat is not None:
            out[o.candidate] = (
                lat,
                _spread(o, budget.batch_size, budget.statistic),
                _rounds(o, budget.batch_size),
            )
    return out


def decide(
    outcomes: Iterable[CandidateOutcome],
    budget: LatencyBudget,
    *,
    search: Literal["all", "bisect"] = "all",
    measured: Sequence[str] | None = None,
    prefer: Prefer = "capacity",
) -> Selection:
    """Choose the preferred selectable outcome that the budget admits; never raises for that.

    ``prefer="capacity"``: the densest; ``"fidelity"``: the highest fidelity, ties by
    capacity. ``chosen`` is ``None`` when nothing fits; every outcome gets a reason either
    way; ``figures`` holds (figure, spread, rounds) per measured candidate and ``uncertain``
    the candidates within noise of the budget. ``measured`` defaults to every outcome whose
    status is not ``not_measured``. Raises ``ValueError`` (a caller bug) when two outcomes
    share a name or ``prefer`` is unknown.
    """
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {PREFERENCES}, not {prefer!r}")
    items = list(outcomes)
    _check_unique(o.candidate for o in items)
    chosen, reasons = _reasons(items, budget, prefer)
    if measured is None:
        measured = [o.candidate for o in items if o.status != "not_measured"]
    return Selection(
        budget=budget,
        chosen=chosen,
        reasons=reasons,
        search=search,
        measured=tuple(measured),
        prefer=prefer,
        figures=_figures(items, budget),
        uncertain=within_noise(items, budget),
    )


def infeasible_error(
    selection: Selection | LatencyBudget, outcomes: Iterable[CandidateOutcome]
) -> BudgetInfeasible:
    """The one-line :class:`BudgetInfeasible` explaining why nothing fits the budget.

    ``selection`` is the (infeasible) :class:`Selection` or just its :class:`LatencyBudget`.

    When some candidate was measured it names the fastest one and the smallest budget (with
    the margin applied, rounded up at the printed precision) that would admit it.
    """
    budget = selection.budget if isinstance(selection, Selection) else selection
    items = list(outcomes)
    where = (
        f"{budget.statistic} <= {_ms(budget.ms)} ms at batch {budget.batch_size} "
        f"({_margin_text(budget.margin)})"
    )
    measured = [
        (lat, o)
        for o in capacity_order(items)
        if (lat := _latency(o, budget.batch_size, budget.statistic)) is not None
    ]
    if measured:
        lat, fastest = min(measured, key=lambda item: item[0])
        need = _ceil_ms(lat * (1.0 + budget.margin))
        return BudgetInfeasible(
            f"no candidate meets {where}: the fastest, {fastest.candidate}, measures "
            f"{_ms(lat)} ms; a budget of at least {need} ms would admit it",
            "raise the latency budget, lower the margin, or add smaller candidates",
        )
    if not items:
        return BudgetInfeasible(
            f"no candidate meets {where}: there are no candidates", "build the candidate family"
        )
    counts: dict[str, int] = {}
    for o in items:
        reason = _failure_reason(o, budget.batch_size) or "unusable"
        kind = reason.split(":")[0].split(" (")[0]
        counts[kind] = counts.get(kind, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return BudgetInfeasible(
        f"no candidate meets {where}: none is selectable ({summary})",
        "see the per-candidate reasons in the report and fix the failures, "
        f"or measure batch {budget.batch_size}",
    )


# --------------------------------------------------------------------------- confirmation


COMPARE_TOP_K = 3
"""Under ``--prefer fidelity`` a measure-first family trains the ``COMPARE_TOP_K`` densest
candidates that fit, and compares their trained fidelity (see :func:`must_compare`)."""


def must_compare(
    outcomes: Iterable[CandidateOutcome], budget: LatencyBudget, prefer: Prefer
) -> tuple[str, ...]:
    """The fitting candidates whose order under ``prefer`` needs their trained fidelity, densest
    first: ``fidelity``: the :data:`COMPARE_TOP_K` densest; ``capacity``: the densest and any
    tied with it on retained MACs (a mixed family's methods at one size), which fidelity breaks.
    A measure-first family trains these before it decides; the bound is the point: the rest
    of the family is never trained."""
    fitting = [o for o in capacity_order(outcomes) if _fits(o, budget)]
    if prefer == "fidelity":
        return tuple(o.candidate for o in fitting[:COMPARE_TOP_K])
    return tuple(o.candidate for o in fitting if o.retained == fitting[0].retained)


def denser_neighbour(
    outcomes: Iterable[CandidateOutcome], name: str, budget: LatencyBudget
) -> str | None:
    """The next denser selectable candidate measured at the budget's batch size, if any."""
    ordered = [
        o
        for o in capacity_order(outcomes)
        if _latency(o, budget.batch_size, budget.statistic) is not None
    ]
    names = [o.candidate for o in ordered]
    if name not in names:
        return None
    i = names.index(name)
    return names[i - 1] if i > 0 else None


def _confirmed(
    results: Mapping[str, LatencyStats],
    chosen: str,
    names: Sequence[str],
    reference: str | None,
    budget: LatencyBudget,
    confirmed: dict[str, tuple[float, float, int]],
    notes: list[str],
) -> tuple[LatencyBudget, LatencyStats]:
    """The budget a confirmation is judged against and the chosen candidate's stats there;
    records every confirmed figure. A relative budget is relative to the reference measured
    in the same run: the confirmation is a run of its own, so it re-measures the reference
    alongside and the budget follows (machine drift between the two runs cancels out)."""
    check = budget
    if reference is not None and reference in results:
        ref_stats = results[reference]
        check = relative_budget(
            budget.speedup or 1.0,
            ref_stats,
            statistic=budget.statistic,
            batch_size=budget.batch_size,
            margin=budget.margin,
            reference_name=reference,
        )
        notes.append(
            f"{reference} re-measured in the same fresh process: "
            f"{_ms(ref_stats.stat(budget.statistic))} ms, so the budget there is "
            f"{_budget_text(check)}"
        )
    for name in names:
        if name in results:
            st = results[name]
            confirmed[name] = (st.stat(budget.statistic), st.spread(budget.statistic), st.rounds)
    if chosen not in results:
        raise ValueError(f"confirm({list(names)}) returned no stats for {chosen!r}")
    return check, results[chosen]


def _within_noise_of(stats: LatencyStats, budget: LatencyBudget) -> bool:
    """Whether ``stats`` misses ``budget`` by no more than the two spreads together."""
    value = stats.stat(budget.statistic)
    spread = stats.spread(budget.statistic)
    return (value - spread) * (1.0 + budget.margin) <= budget.ms + budget.spread_ms


def _reference_of(items: Sequence[CandidateOutcome], budget: LatencyBudget) -> str | None:
    """The reference candidate of a relative budget, when it is among the measured outcomes."""
    if not budget.relative or not budget.reference:
        return None
    names = {o.candidate for o in items if _latency(o, budget.batch_size, budget.statistic)}
    return budget.reference if budget.reference in names else None


def select_confirmed(
    outcomes: Iterable[CandidateOutcome],
    budget: LatencyBudget,
    confirm: ConfirmFn | None,
    *,
    prefer: Prefer = "capacity",
    search: Literal["all", "bisect"] = "all",
    measured: Sequence[str] | None = None,
    max_confirmations: int = 3,
    ready: Callable[[str], str | None] | None = None,
) -> Selection:
    """:func:`decide`, then confirm the choice; continue the search while confirmation fails.

    ``confirm(names)`` re-measures the chosen candidate and its denser neighbour (when there
    is one not confirmed yet) -- in a fresh process, :mod:`dcvit_deploy.latency.confirm` -- and
    returns their stats at ``budget.batch_size``. The choice stands when the budget admits
    the confirmed figure. A figure over the budget but within its own spread of it is not
    enough to overturn the rounds' decision: it is measured again, once, with
    :data:`RECONFIRM_FACTOR` times the rounds, and that figure decides. A candidate whose
    confirmation misses is excluded with a ``confirmation failed:`` reason and the decision
    is repeated without it, up to ``max_confirmations`` choices (then nothing is chosen:
    never publish a model that missed its budget twice). Both figures
    are recorded in ``Selection.confirmed`` and every step in ``notes``. A denser neighbour
    that fits in its confirmation is noted but not chosen: one fresh measurement does not
    overturn the rounds' median. A relative budget's reference (``budget.reference``, e.g. the
    original) is re-measured in the same call, last in ``names``, and the confirmation is
    judged against ``reference figure there / speedup`` -- the budget means the same thing in
    the fresh process as in the run. ``confirm`` must measure ``names[0]`` and that reference
    in one process; the other names are informational. ``ready(choice)``, called before the
    confirmation, makes the choice deployable (measure-first: trains and verifies it) or says
    why it cannot be, and the search continues without it. ``confirm=None``: no confirmation.
    Pure apart from calling ``confirm`` and ``ready``.
    """
    if max_confirmations < 1:
        raise ValueError("max_confirmations must be >= 1")
    items = list(outcomes)
    _check_unique(o.candidate for o in items)
    excluded: dict[str, str] = {}
    confirmed: dict[str, tuple[float, float, int]] = {}
    notes: list[str] = []
    calls = 0
    while True:
        pool = [o for o in items if o.candidate not in excluded]
        sel = decide(pool, budget, search=search, measured=measured, prefer=prefer)
        chosen = sel.chosen
        if chosen is None:
            if excluded:
                notes.append("no remaining candidate fits after those set aside")
            break
        if calls >= max_confirmations:
            notes.append(
                f"gave up after {calls} failed confirmation(s); not choosing {chosen} unconfirmed"
            )
            excluded[chosen] = (
                f"not confirmed: the search stopped after {calls} failed confirmation(s)"
            )
            sel = dataclasses.replace(sel, chosen=None)
            break
        why = ready(chosen) if ready is not None else None
        if why is not None:
            excluded[chosen] = f"not deployable: {why}"
            notes.append(f"{chosen} set aside: {why}; continuing the search")
            continue
        if confirm is None:
            break
        names = [chosen]
        neighbour = denser_neighbour(items, chosen, budget)
        if neighbour is not None and neighbour not in confirmed:
            names.append(neighbour)
        reference = _reference_of(items, budget)
        if reference is not None and reference not in names:
            names.append(reference)
        results = confirm(names)
        calls += 1
        check, stats = _confirmed(results, chosen, names, reference, budget, confirmed, notes)
        if not check.admits(stats) and _within_noise_of(stats, check):
            more = stats.rounds * RECONFIRM_FACTOR
            again = [chosen] + ([reference] if reference is not None else [])
            first = _budget_expr(
                stats.stat(budget.statistic), budget, stats.spread(budget.statistic), stats.rounds
            )
            notes.append(
                f"confirmation of {chosen}: {first} > {_budget_text(check)}, within noise of "
                f"the budget; measured again with {more} rounds"
            )
            again_results = confirm(again, rounds=more)
            check, stats = _confirmed(
                again_results, chosen, again, reference, budget, confirmed, notes
            )
        expr = _budget_expr(
            stats.stat(budget.statistic), budget, stats.spread(budget.statistic), stats.rounds
        )
        if neighbour is not None and neighbour in results:
            nb = results[neighbour]
            nb_fits = budget.admits(nb)
            notes.append(
                f"denser neighbour {neighbour} re-measured in a fresh process: "
                f"{_budget_expr(nb.stat(budget.statistic), budget)} "
                + ("fits too (kept the rounds' decision)" if nb_fits else "still over budget")
            )
        if check.admits(stats):
            notes.append(f"confirmed {chosen} in a fresh process: {expr} <= {_budget_text(check)}")
            break
        excluded[chosen] = (
            f"confirmation failed: re-measured in a fresh process at {expr} > "
            f"{_budget_text(check)}; the search continued with the next candidate"
        )
        notes.append(f"confirmation of {chosen} failed ({expr}); continuing the search")
    reasons = dict(sel.reasons)
    reasons.update(excluded)
    return dataclasses.replace(
        sel,
        reasons={o.candidate: reasons[o.candidate] for o in capacity_order(items)},
        figures=_figures(items, budget),
        uncertain=within_noise(items, budget),
        confirmed=confirmed,
        notes=tuple(notes),
    )
