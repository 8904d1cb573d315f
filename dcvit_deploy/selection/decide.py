"""The decision: the densest (or, ``--prefer fidelity``, the most faithful) verified artifact
whose measured figure fits the budget, with a :class:`~dcvit_deploy.store.records.Reason` for
every candidate; then its confirmation in a fresh process. Pure logic over
:class:`~dcvit_deploy.store.records.CandidateOutcome` records; never raises for an infeasible
budget (:func:`infeasible_error` is the one line, exit 3).

Capacity order: ``retained`` MACs on a grid of :data:`RETAINED_TIE`, then precision (bits),
then :func:`faithfulness`, then name. A candidate is *dominated* only when it is slower than a
larger sibling beyond both spreads; fits and noise are :mod:`dcvit_deploy.selection.budget`'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, Protocol

from dcvit_deploy.errors import BudgetInfeasible
from dcvit_deploy.selection.budget import (
    Figure,
    figure,
    fit_class,
    fits,
    latency,
    misses_within_noise,
    relative_budget,
    spread,
)
from dcvit_deploy.selection.reasons import LABELS, budget_text, ceil_ms, failure, figure_text, ms
from dcvit_deploy.store.records import (
    PRECISION_BITS,
    CandidateOutcome,
    LatencyBudget,
    LatencyStats,
    Reason,
    Relation,
    Selection,
)

Prefer = Literal["capacity", "fidelity"]
PREFERENCES: tuple[str, ...] = ("capacity", "fidelity")
RETAINED_TIE = 0.005
"""Retained-MAC fractions on one grid step (half a point of the original's MACs) are one size."""
RECONFIRM_FACTOR = 3
"""A confirmation within noise of the budget is measured again with this many times its rounds."""
COMPARE_TOP_K = 3
"""Under ``--prefer fidelity`` a measure-first family trains and compares this many candidates."""


class ConfirmFn(Protocol):
    """``confirm(names)``: their stats at the budget's batch size, re-measured in a fresh
    process (``rounds``: exactly that many, in a new measurement)."""

    def __call__(
        self, names: Sequence[str], *, rounds: int | None = None
    ) -> Mapping[str, LatencyStats]: ...


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


def within_noise(outcomes: Iterable[CandidateOutcome], budget: LatencyBudget) -> tuple[str, ...]:
    """Candidates (densest first) whose fit is within noise of the budget."""
    return tuple(o.candidate for o in capacity_order(outcomes) if fit_class(o, budget) == "noise")


def needs_remeasure(
    outcomes: Iterable[CandidateOutcome], budget: LatencyBudget, *, prefer: Prefer = "capacity"
) -> tuple[str, ...]:
    """The within-noise candidates whose fit could change the choice, densest first: under
    ``capacity`` those at least as dense as the densest that clearly fits; under ``fidelity``
    all of them."""
    ordered = capacity_order(outcomes)
    noisy = [o for o in ordered if fit_class(o, budget) == "noise"]
    clear = next((o for o in ordered if fit_class(o, budget) == "fits"), None)
    if prefer == "fidelity" or clear is None:
        return tuple(o.candidate for o in noisy)
    return tuple(o.candidate for o in noisy if _capacity_key(o) >= _capacity_key(clear))


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
        (o, lat, spread(o, batch_size, statistic))
        for o in capacity_order(outcomes)
        if (lat := latency(o, batch_size, statistic)) is not None
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
        if latency(o, batch_size, statistic) is not None and o.candidate not in beaten
    )


# --------------------------------------------------------------------------- decide


def _choose(
    ordered: Sequence[CandidateOutcome], budget: LatencyBudget, prefer: Prefer
) -> CandidateOutcome | None:
    fitting = [o for o in ordered if fits(o, budget)]
    if not fitting:
        return None
    # max() keeps the first of equals: ordered is capacity order, so ties go to capacity.
    return max(fitting, key=faithfulness) if prefer == "fidelity" else fitting[0]


def _chosen_reason(
    o: CandidateOutcome, fig: Figure, noise: bool, prefer: Prefer, others: list[CandidateOutcome]
) -> Reason:
    """Under ``fidelity`` with its fidelity, KL and, when the runner-up in faithfulness is within
    1.96 standard errors of its KL, that runner-up (the images cannot separate them)."""
    values, versus = {"retained": o.retained}, ""
    if prefer == "fidelity":
        values |= {"fidelity": o.fidelity} if o.fidelity is not None else {}
        values |= {"kl": o.closeness.kl} if o.closeness else {}
        runner = max(others, key=faithfulness, default=None)
        a, b = o.closeness, runner.closeness if runner else None
        close = a and b and abs(a.kl - b.kl) <= 1.96 * math.hypot(a.kl_se, b.kl_se)
        if runner and a and b and math.isfinite(a.kl + b.kl) and close:
            versus = runner.candidate
            values |= {"samples": a.samples, "kl_se": a.kl_se, "versus_kl": b.kl,
                       "versus_kl_se": b.kl_se}  # fmt: skip
    return Reason("chosen", fig, noise=noise, versus=versus, values=values)


def _reasons(
    ordered: Sequence[CandidateOutcome], budget: LatencyBudget, prefer: Prefer
) -> tuple[str | None, dict[str, Reason]]:
    chosen = _choose(ordered, budget, prefer)
    beaten = dominated(ordered, budget.batch_size, budget.statistic)
    figs = {o.candidate: figure(o, budget) for o in ordered}
    reasons: dict[str, Reason] = {}
    for o in ordered:
        fig, fail = figs[o.candidate], failure(o, budget.batch_size)
        if fail is not None or fig is None:
            assert fail is not None  # a usable figure has no failure
            reasons[o.candidate] = fail
            continue
        noise = fit_class(o, budget) == "noise"
        if chosen is not None and o.candidate == chosen.candidate:
            others = [f for f in ordered if fits(f, budget) and f is not o]
            reasons[o.candidate] = _chosen_reason(o, fig, noise, prefer, others)
            continue
        r = Reason("over", fig, noise=noise)
        if fits(o, budget):
            r = Reason("fits", fig, noise=noise)
            if chosen is not None:
                same = _capacity_key(o)[0] == _capacity_key(chosen)[0]
                rel: Relation = "lower precision" if same else "smaller"
                if prefer == "fidelity" and faithfulness(o) < faithfulness(chosen):
                    rel = "lower fidelity"
                r = dataclasses.replace(r, versus=chosen.candidate, relation=rel)
        if (sibling := beaten.get(o.candidate)) is not None:
            sib = figs[sibling]
            assert sib is not None
            values = {"sibling_ms": sib[0], "sibling_spread": sib[1]}
            r = dataclasses.replace(r, dominated_by=sibling, values=values)
        reasons[o.candidate] = r
    return (chosen.candidate if chosen is not None else None), reasons


def _figures(outcomes: Sequence[CandidateOutcome], budget: LatencyBudget) -> dict[str, Figure]:
    return {o.candidate: f for o in capacity_order(outcomes) if (f := figure(o, budget))}


def decide(
    outcomes: Iterable[CandidateOutcome],
    budget: LatencyBudget,
    *,
    search: Literal["all", "bisect"] = "all",
    measured: Sequence[str] | None = None,
    prefer: Prefer = "capacity",
) -> Selection:
    """Choose the preferred selectable outcome the budget admits (``chosen=None`` when none);
    every outcome gets a reason. ``measured`` defaults to every outcome not ``not_measured``.
    ``ValueError`` (a caller bug): two outcomes share a name, or ``prefer`` is unknown."""
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {PREFERENCES}, not {prefer!r}")
    items = list(outcomes)
    _check_unique(o.candidate for o in items)
    chosen, reasons = _reasons(capacity_order(items), budget, prefer)
    if search == "bisect":  # the search never needed it
        skipped = (o.candidate for o in items if o.status == "not_measured" and not o.error)
        reasons |= dict.fromkeys(skipped, Reason("not_searched", detail="not reached"))
    if measured is None:
        measured = [o.candidate for o in items if o.status != "not_measured"]
    return Selection(
        budget=budget, chosen=chosen, reasons=reasons, search=search, measured=tuple(measured),
        prefer=prefer, figures=_figures(items, budget), uncertain=within_noise(items, budget),
    )  # fmt: skip


def infeasible_error(
    selection: Selection | LatencyBudget, outcomes: Iterable[CandidateOutcome]
) -> BudgetInfeasible:
    """The one line explaining why nothing fits (``selection``: the infeasible selection or its
    budget): the fastest candidate and the smallest budget (margin applied, rounded up at the
    printed precision) that would admit it, else a count of the failures by kind."""
    budget = selection.budget if isinstance(selection, Selection) else selection
    items = list(outcomes)
    where = (
        f"{budget.statistic} <= {ms(budget.ms)} ms at batch {budget.batch_size} "
        f"(margin {budget.margin * 100:g}%)"
    )
    measured = [
        (lat, o)
        for o in capacity_order(items)
        if (lat := latency(o, budget.batch_size, budget.statistic)) is not None
    ]
    if measured:
        lat, fastest = min(measured, key=lambda item: item[0])
        return BudgetInfeasible(
            f"no candidate meets {where}: the fastest, {fastest.candidate}, measures "
            f"{ms(lat)} ms; a budget of at least {ceil_ms(lat * (1.0 + budget.margin))} ms "
            "would admit it",
            "raise the latency budget, lower the margin, or add smaller candidates",
        )
    if not items:
        return BudgetInfeasible(
            f"no candidate meets {where}: there are no candidates", "build the candidate family"
        )
    counts: dict[str, int] = {}
    for o in items:
        r = failure(o, budget.batch_size)
        kind = "unusable" if r is None else LABELS[r.kind]
        kind += f" at batch {budget.batch_size}" if r and "batch" in r.values else ""
        counts[kind] = counts.get(kind, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return BudgetInfeasible(
        f"no candidate meets {where}: none is selectable ({summary})",
        "see the per-candidate reasons in the report and fix the failures, "
        f"or measure batch {budget.batch_size}",
    )


# --------------------------------------------------------------------------- confirmation


def must_compare(
    outcomes: Iterable[CandidateOutcome], budget: LatencyBudget, prefer: Prefer
) -> tuple[str, ...]:
    """The fitting candidates a measure-first family trains before it decides (their trained
    fidelity orders them), densest first: under ``fidelity`` the :data:`COMPARE_TOP_K` densest;
    under ``capacity`` the densest and any tied with it on retained MACs (a mixed family's
    methods at one size). The rest of the family is never trained."""
    fitting = [o for o in capacity_order(outcomes) if fits(o, budget)]
    if prefer == "fidelity":
        return tuple(o.candidate for o in fitting[:COMPARE_TOP_K])
    return tuple(o.candidate for o in fitting if o.retained == fitting[0].retained)


def denser_neighbour(
    outcomes: Iterable[CandidateOutcome], name: str, budget: LatencyBudget
) -> str | None:
    """The next denser selectable candidate measured at the budget's batch size, if any."""
    names = [o.candidate for o in capacity_order(outcomes) if figure(o, budget) is not None]
    i = names.index(name) if name in names else 0
    return names[i - 1] if i > 0 else None


def _confirmed(
    results: Mapping[str, LatencyStats],
    chosen: str,
    names: Sequence[str],
    reference: str | None,
    budget: LatencyBudget,
    confirmed: dict[str, Figure],
    notes: list[str],
) -> tuple[LatencyBudget, LatencyStats]:
    """The budget a confirmation is judged against and the chosen candidate's stats there;
    records every confirmed figure. A relative budget follows its reference re-measured in
    the same fresh process (machine drift between the two runs cancels out)."""
    check = budget
    if reference is not None and reference in results:
        ref_stats = results[reference]
        check = relative_budget(
            budget.speedup or 1.0, ref_stats, statistic=budget.statistic,
            batch_size=budget.batch_size, margin=budget.margin, reference_name=reference,
        )  # fmt: skip
        notes.append(
            f"{reference} re-measured in the same fresh process: "
            f"{ms(ref_stats.stat(budget.statistic))} ms, so the budget there is "
            f"{budget_text(check)}"
        )
    for name in names:
        if name in results:
            st = results[name]
            confirmed[name] = (st.stat(budget.statistic), st.spread(budget.statistic), st.rounds)
    if chosen not in results:
        raise ValueError(f"confirm({list(names)}) returned no stats for {chosen!r}")
    return check, results[chosen]


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

    ``ready(choice)`` first makes the choice deployable (measure-first: trains and verifies it)
    or says why it cannot be (``not_deployable``; the search continues). ``confirm`` then
    re-measures the choice, its denser neighbour (once) and a relative budget's reference, in
    that order, in one fresh process; the budget there is the reference's figure / speedup. A
    figure that misses only within its own spread is measured again with
    :data:`RECONFIRM_FACTOR` times the rounds and that decides. A choice that still misses is
    set aside (``confirmation_failed``) and the decision repeated, up to ``max_confirmations``
    (then nothing is chosen). A denser neighbour that fits is noted, not chosen: one fresh
    measurement does not overturn the rounds' median. ``confirm=None``: no confirmation.
    """
    if max_confirmations < 1:
        raise ValueError("max_confirmations must be >= 1")
    items = list(outcomes)
    _check_unique(o.candidate for o in items)
    excluded: dict[str, Reason] = {}
    confirmed: dict[str, Figure] = {}
    notes: list[str] = []
    calls = 0
    stat = budget.statistic
    usable = {o.candidate for o in items if figure(o, budget) is not None}
    reference = budget.reference if budget.relative and budget.reference in usable else None
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
            excluded[chosen] = Reason("not_confirmed", values={"confirmations": calls})
            sel = dataclasses.replace(sel, chosen=None)
            break
        why = ready(chosen) if ready is not None else None
        if why is not None:
            excluded[chosen] = Reason("not_deployable", detail=why)
            notes.append(f"{chosen} set aside: {why}; continuing the search")
            continue
        if confirm is None:
            break
        names = [chosen]
        neighbour = denser_neighbour(items, chosen, budget)
        if neighbour is not None and neighbour not in confirmed:
            names.append(neighbour)
        if reference is not None and reference not in names:
            names.append(reference)
        results = confirm(names)
        calls += 1
        check, st = _confirmed(results, chosen, names, reference, budget, confirmed, notes)
        if misses_within_noise(st, check):
            more = st.rounds * RECONFIRM_FACTOR
            again = [chosen] + ([reference] if reference is not None else [])
            first = figure_text(budget, st.stat(stat), st.spread(stat), st.rounds)
            notes.append(
                f"confirmation of {chosen}: {first} > {budget_text(check)}, within noise of "
                f"the budget; measured again with {more} rounds"
            )
            again_results = confirm(again, rounds=more)
            check, st = _confirmed(again_results, chosen, again, reference, budget, confirmed,
                                   notes)  # fmt: skip
        fig = (st.stat(stat), st.spread(stat), st.rounds)
        expr = figure_text(budget, *fig)
        if neighbour is not None and neighbour in results:
            nb = results[neighbour]
            fit = "still over budget"
            fit = "fits too (kept the rounds' decision)" if budget.admits(nb) else fit
            notes.append(f"denser neighbour {neighbour} re-measured in a fresh process: "
                         f"{figure_text(budget, nb.stat(stat))} {fit}")  # fmt: skip
        if check.admits(st):
            notes.append(f"confirmed {chosen} in a fresh process: {expr} <= {budget_text(check)}")
            break
        excluded[chosen] = Reason("confirmation_failed", fig, None if check == budget else check)
        notes.append(f"confirmation of {chosen} failed ({expr}); continuing the search")
    reasons = {**sel.reasons, **excluded}
    return dataclasses.replace(
        sel,
        reasons={o.candidate: reasons[o.candidate] for o in capacity_order(items)},
        figures=_figures(items, budget),
        uncertain=within_noise(items, budget),
        confirmed=confirmed,
        notes=tuple(notes),
    )
