"""``--search bisect``: the densest fitting candidate while measuring O(log N) of them."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

from dcvit_deploy.selection.budget import fits as fits_budget
from dcvit_deploy.selection.budget import latency, spread
from dcvit_deploy.selection.decide import Prefer, _check_unique, decide
from dcvit_deploy.store.records import CandidateOutcome, LatencyBudget, Reason, Selection

log = logging.getLogger(__name__)


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
    prefer: Prefer = "capacity",
) -> BisectResult:
    """Find the densest fitting candidate while measuring only O(log N) of them.

    ``ordered_candidates``: densest first; ``measure(name)`` builds, verifies and profiles one
    (failures are outcomes, not exceptions), at most once per name. Binary search for the first
    fitting index (stepping over failed candidates), measure the boundary's smaller neighbour,
    then walk towards denser candidates until two in a row are *clearly* over budget: the lower
    end of their interval exceeds the budget by more than ``tolerance`` widened to the largest
    monotonicity violation seen (a smaller candidate slower than a denser one). A violation
    beyond ``tolerance`` is logged and set as the ``warning`` of the chosen candidate's reason
    (else the slower one's). The result equals :func:`decide` over all candidates whenever a
    denser candidate is never faster than ``1/(1+tolerance)`` times a smaller one, except for
    isolated slow outliers; an isolated, anomalously *fast* dense candidate far above the
    boundary can be missed. ``prefer="fidelity"`` chooses among the measured candidates only.
    ``ValueError`` (a caller bug): duplicate names, a mislabelled outcome, or measured
    ``retained`` values that contradict the given order.
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
        return latency(get(i), budget.batch_size, budget.statistic)

    def fits(i: int) -> bool:
        return fits_budget(get(i), budget)

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
        low = v - spread(get(i), budget.batch_size, budget.statistic)
        worst = violation()
        tol = max(tolerance, worst[0] if worst else 0.0)
        return low * (1.0 + budget.margin) > (budget.ms + budget.spread_ms) * (1.0 + tol)

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

    selection = decide(outcomes, budget, search="bisect", measured=measured_order, prefer=prefer)
    reasons = dict(selection.reasons)

    worst = violation()
    if worst is not None and worst[0] > tolerance:
        excess, denser, smaller = worst
        scanned = len(measured_order) - binary_count
        warning = (
            f"latency is not monotone in capacity: {names[smaller]} is {excess:.0%} slower "
            f"than denser {names[denser]}; measured {scanned} extra candidate(s) around the "
            "boundary"
        )
        log.warning("bisect search: %s", warning)
        anchor = selection.chosen or names[smaller]
        reasons[anchor] = dataclasses.replace(reasons[anchor], warning=warning)

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
        reasons[name] = Reason("not_searched", detail=why)
    result = dataclasses.replace(selection, reasons=reasons, measured=tuple(measured_order))
    return BisectResult(result, tuple(outcomes))
