"""Budget selection: the densest verified candidate whose measured latency fits the budget.

Everything here is pure logic over :class:`~dcvit_deploy.records.CandidateOutcome` records; it
builds, measures and imports nothing heavy.

Capacity order
    Candidates are ranked by ``retained`` (fraction of the original MACs, larger is denser),
    ties broken by ``fidelity`` (higher first; ``None`` ranks last) and then by name, so every
    decision is deterministic.

Selectable
    ``outcome.selectable`` (status ``ok`` and verification passed or not run) *and* a finite
    ``budget.statistic`` measured at ``budget.batch_size``.

Two entry points
    :func:`decide` never raises for an infeasible budget: it returns a :class:`Selection` with
    ``chosen=None`` and a reason for every candidate, which is what a report needs.
    :func:`select` is :func:`decide` plus :func:`raise_if_infeasible`: it raises
    :class:`~dcvit_deploy.errors.BudgetInfeasible` (exit code 3) when nothing fits. A pipeline
    that wants both writes its reports from :func:`decide` and then calls
    :func:`raise_if_infeasible`.

Reason strings start with a stable prefix that tools may match on: ``chosen:``,
``over budget:``, ``fits, but smaller than chosen``, ``dominated:``, ``verification failed:``,
``export failed:``, ``build failed:``, ``profile failed:``, ``not measured``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, NamedTuple

from .errors import BudgetInfeasible
from .records import CandidateOutcome, LatencyBudget, Selection, Verification

__all__ = [
    "BisectResult",
    "bisect_search",
    "capacity_order",
    "decide",
    "dominated",
    "infeasible_error",
    "pareto_front",
    "raise_if_infeasible",
    "select",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers


def _capacity_key(outcome: CandidateOutcome) -> tuple[float, float]:
    fidelity = outcome.fidelity if outcome.fidelity is not None else -math.inf
    return (outcome.retained, fidelity)


def capacity_order(outcomes: Iterable[CandidateOutcome]) -> list[CandidateOutcome]:
    """Outcomes sorted densest first: ``retained`` desc, then ``fidelity`` desc, then name."""
    return sorted(
        outcomes,
        key=lambda o: (-_capacity_key(o)[0], -_capacity_key(o)[1], o.candidate),
    )


def _latency(outcome: CandidateOutcome, batch_size: int, statistic: str) -> float | None:
    """The statistic at ``batch_size`` for a selectable outcome; ``None`` when unusable."""
    if not outcome.selectable:
        return None
    stats = outcome.latency_at(batch_size)
    if stats is None:
        return None
    value = stats.stat(statistic)
    return value if math.isfinite(value) and value >= 0 else None


def _fits(outcome: CandidateOutcome, budget: LatencyBudget) -> bool:
    if _latency(outcome, budget.batch_size, budget.statistic) is None:
        return False
    stats = outcome.latency_at(budget.batch_size)
    return stats is not None and budget.admits(stats)


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


def _budget_expr(value: float, budget: LatencyBudget) -> str:
    """``p50 6.10 ms x1.05 = 6.41`` (or ``p50 6.10 ms`` without a margin)."""
    if budget.margin > 0:
        guarded = value * (1.0 + budget.margin)
        return f"{budget.statistic} {_ms(value)} ms x{1.0 + budget.margin:.2f} = {_ms(guarded)}"
    return f"{budget.statistic} {_ms(value)} ms"


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
    """Candidates that are not faster than a strictly larger sibling.

    Returns ``{dominated name: sibling name}`` where the sibling is the fastest candidate with a
    strictly larger capacity key (``retained``, then ``fidelity``) whose latency is ``<=`` the
    dominated one's. Only selectable outcomes measured at ``batch_size`` take part. A dominated
    candidate can never be the best choice under any budget: the sibling is at least as fast
    and denser.
    """
    eligible = [
        (o, lat)
        for o in capacity_order(outcomes)
        if (lat := _latency(o, batch_size, statistic)) is not None
    ]
    out: dict[str, str] = {}
    best: tuple[float, str] | None = None  # fastest among strictly larger groups
    i = 0
    while i < len(eligible):
        key = _capacity_key(eligible[i][0])
        j = i
        while j < len(eligible) and _capacity_key(eligible[j][0]) == key:
            j += 1
        group = eligible[i:j]
        for o, lat in group:
            if best is not None and best[0] <= lat:
                out[o.candidate] = best[1]
        for o, lat in group:
            if best is None or lat < best[0]:
                best = (lat, o.candidate)
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


def _reasons(
    outcomes: Sequence[CandidateOutcome], budget: LatencyBudget
) -> tuple[str | None, dict[str, str]]:
    ordered = capacity_order(outcomes)
    chosen: CandidateOutcome | None = next((o for o in ordered if _fits(o, budget)), None)
    beaten = dominated(ordered, budget.batch_size, budget.statistic)
    by_name = {o.candidate: o for o in ordered}
    reasons: dict[str, str] = {}
    for o in ordered:
        failure = _failure_reason(o, budget.batch_size)
        if failure is not None:
            reasons[o.candidate] = failure
            continue
        lat = _latency(o, budget.batch_size, budget.statistic)
        assert lat is not None  # guaranteed by _failure_reason returning None
        expr = _budget_expr(lat, budget)
        if chosen is not None and o.candidate == chosen.candidate:
            reasons[o.candidate] = (
                f"chosen: densest verified candidate within budget (retained {o.retained:.1%} "
                f"MACs); {expr} <= {_ms(budget.ms)} ms"
            )
            continue
        if _fits(o, budget):
            status = f"fits ({expr} <= {_ms(budget.ms)} ms)"
            if chosen is not None:
                status = (
                    f"fits, but smaller than chosen {chosen.candidate} "
                    f"({expr} <= {_ms(budget.ms)} ms)"
                )
        else:
            status = f"over budget: {expr} > {_ms(budget.ms)} ms"
        if o.candidate in beaten:
            sibling = beaten[o.candidate]
            sib_lat = _latency(by_name[sibling], budget.batch_size, budget.statistic)
            assert sib_lat is not None
            reasons[o.candidate] = (
                f"dominated: not faster than larger sibling {sibling} ({budget.statistic} "
                f"{_ms(lat)} ms vs {_ms(sib_lat)} ms); {status}"
            )
        else:
            reasons[o.candidate] = status
    return (chosen.candidate if chosen is not None else None), reasons


def decide(
    outcomes: Iterable[CandidateOutcome],
    budget: LatencyBudget,
    *,
    search: Literal["all", "bisect"] = "all",
    measured: Sequence[str] | None = None,
) -> Selection:
    """Choose the densest selectable outcome that the budget admits; never raises for that.

    ``chosen`` is ``None`` when nothing fits; every outcome gets a reason either way.
    ``measured`` defaults to every outcome whose status is not ``not_measured``.
    Raises ``ValueError`` (a caller bug) when two outcomes share a name.
    """
    items = list(outcomes)
    _check_unique(o.candidate for o in items)
    chosen, reasons = _reasons(items, budget)
    if measured is None:
        measured = [o.candidate for o in items if o.status != "not_measured"]
    return Selection(
        budget=budget, chosen=chosen, reasons=reasons, search=search, measured=tuple(measured)
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


def raise_if_infeasible(selection: Selection, outcomes: Iterable[CandidateOutcome]) -> None:
    """Raise :func:`infeasible_error` when ``selection.chosen`` is ``None``; else do nothing."""
    if selection.chosen is None:
        raise infeasible_error(selection, outcomes)


def select(outcomes: Iterable[CandidateOutcome], budget: LatencyBudget) -> Selection:
    """:func:`decide` over all outcomes, raising ``BudgetInfeasible`` (exit 3) if none fits."""
    items = list(outcomes)
    selection = decide(items, budget)
    raise_if_infeasible(selection, items)
    return selection


# --------------------------------------------------------------------------- bisect


class BisectResult(NamedTuple):
    """``(selection, outcomes)``: the decision and every outcome measured, densest first."""

    selection: Selection
    outcomes: tuple[CandidateOutcome, ...]


def bisect_search(
    ordered_candidates: Sequence[str],
    measure: Callable[[str], CandidateOutcome],
    budget: LatencyBudget,
    *,
    tolerance: float = 0.05,
) -> BisectResult:
    """Find the densest fitting candidate while measuring only O(log N) of them.

    ``ordered_candidates`` must be densest first (the order of :func:`capacity_order`);
    ``measure(name)`` builds, verifies and profiles one candidate and returns its outcome
    (failures are outcomes with a non-``ok`` status, not exceptions). Each name is measured at
    most once.

    Method: binary search for the first fitting index, stepping over failed candidates to the
    nearest working one; then measure the boundary's smaller neighbour, and walk upwards
    (towards denser candidates) from the boundary until two consecutive working candidates
    are *clearly* over budget, i.e. their statistic exceeds ``budget.ms / (1 + margin)`` by
    more than the effective tolerance. The effective tolerance is ``tolerance`` (the latency
    jitter assumed between candidates) widened to the largest monotonicity violation seen
    among measured candidates (a smaller candidate slower than a denser one), so observed
    noise widens the linear scan near the boundary. A violation beyond ``tolerance`` is logged
    and noted (``warning: ...``) in the chosen candidate's reason (or the slower candidate's
    when none is chosen); smaller ones show up as ``dominated:`` reasons only.

    Guarantee: the result equals :func:`decide` over all candidates whenever a denser
    candidate is never faster than ``1/(1+tolerance)`` times a smaller one, except for isolated
    slow outliers (which the two-candidate confirmation and the widened tolerance absorb). An
    isolated, anomalously *fast* dense candidate far above the boundary can be missed: use
    exhaustive search when such plateaus matter. Raises ``ValueError`` (a caller bug) on
    duplicate names, a mislabelled outcome, or measured ``retained`` values that contradict
    the given order.
    """
    names = list(ordered_candidates)
    _check_unique(names)
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    n = len(names)
    cache: dict[int, CandidateOutcome] = {}
    measured_order: list[str] = []

    def get(i: int) -> CandidateOutcome:
        if i not in cache:
            outcome = measure(names[i])
            if outcome.candidate != names[i]:
                raise ValueError(
                    f"measure({names[i]!r}) returned the outcome of {outcome.candidate!r}"
                )
            cache[i] = outcome
            measured_order.append(names[i])
        return cache[i]

    def lat(i: int) -> float | None:
        return _latency(get(i), budget.batch_size, budget.statistic)

    def fits(i: int) -> bool:
        return _fits(get(i), budget)

    def violation() -> tuple[float, int, int] | None:
        """Worst measured (ratio - 1, denser index, smaller index) with the smaller slower."""
        points = sorted((i, v) for i in cache if (v := lat(i)) is not None)
        worst: tuple[float, int, int] | None = None
        fastest_denser: tuple[float, int] | None = None
        for i, v in points:
            if fastest_denser is not None and v > fastest_denser[0] > 0:
                excess = v / fastest_denser[0] - 1.0
                if worst is None or excess > worst[0]:
                    worst = (excess, fastest_denser[1], i)
            if fastest_denser is None or v < fastest_denser[0]:
                fastest_denser = (v, i)
        return worst

    def clearly_over(i: int) -> bool:
        v = lat(i)
        if v is None:
            return False
        worst = violation()
        tol = max(tolerance, worst[0] if worst else 0.0)
        return v * (1.0 + budget.margin) > budget.ms * (1.0 + tol)

    # 1. Binary search for the first fitting index, assuming monotone latency.
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        probe = None
        for step in range(hi - lo):
            for cand in (mid + step, mid - step) if step else (mid,):
                if lo <= cand < hi and lat(cand) is not None:
                    probe = cand
                    break
            if probe is not None:
                break
        if probe is None:  # every candidate in [lo, hi) failed
            break
        if fits(probe):
            hi = probe
        else:
            lo = probe + 1
    boundary = hi
    binary_count = len(measured_order)

    # 2. Check the neighbour below the boundary (smaller) to observe local monotonicity.
    i = boundary + 1
    while i < n:
        if lat(i) is not None:
            break
        i += 1

    # 3. Walk upwards until two consecutive working candidates are clearly over budget.
    best = boundary if boundary < n else None
    run: list[int] = []
    i = boundary - 1
    while i >= 0:
        if lat(i) is not None:
            if fits(i):
                best = i
                run = []
            else:
                run.append(i)
                if len(run) >= 2 and all(clearly_over(j) for j in run[-2:]):
                    break
        i -= 1
    top = i  # last index examined by the walk (-1 when it reached the densest candidate)

    outcomes = [cache[k] for k in sorted(cache)]
    retained = [o.retained for o in outcomes]
    if any(b > a + 1e-12 for a, b in itertools.pairwise(retained)):
        raise ValueError(
            "bisect_search needs candidates ordered densest first (retained descending); "
            f"measured retained values in the given order: {retained}"
        )

    selection = decide(outcomes, budget, search="bisect", measured=measured_order)
    reasons = dict(selection.reasons)

    worst = violation()
    if worst is not None and worst[0] > tolerance:
        excess, denser, smaller = worst
        scanned = len(measured_order) - binary_count
        warning = (
            f"warning: latency is not monotone in capacity: {names[smaller]} is "
            f"{excess:.0%} slower than denser {names[denser]}; measured {scanned} extra "
            "candidate(s) around the boundary"
        )
        log.warning("bisect search: %s", warning.removeprefix("warning: "))
        anchor = selection.chosen or names[smaller]
        reasons[anchor] = f"{reasons[anchor]}; {warning}"

    stop_name = names[top] if top >= 0 else None
    for k, name in enumerate(names):
        if k in cache:
            continue
        if best is not None and k > best:
            why = f"smaller than chosen {names[best]}"
        elif stop_name is not None:
            why = f"denser than {stop_name}, which is clearly over budget"
        else:
            why = "skipped by the search"
        reasons[name] = f"not measured (bisect): {why}"

    result = Selection(
        budget=budget,
        chosen=selection.chosen,
        reasons=reasons,
        search="bisect",
        measured=tuple(measured_order),
    )
    return BisectResult(result, tuple(outcomes))
