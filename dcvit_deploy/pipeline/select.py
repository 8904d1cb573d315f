"""The select unit: the budget decision over the family's measured outcomes, confirmed.

Selection itself stays a pure function of measurements (:mod:`dcvit_deploy.select`). This unit
resolves the budget (absolute ``--latency-ms``, or relative ``--speedup`` to the original
measured in the same run), decides, and then re-measures the chosen artifact in a fresh
process: if that confirmation no longer fits, the candidate is set aside with the reason and
the search continues, so a model that misses its budget is never published.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import UserInputError
from ..records import CandidateOutcome, LatencyBudget, Selection, from_dict, to_dict
from .unit import UnitOutput

if TYPE_CHECKING:
    from ..options import DeployOptions
    from ..records import Artifact, LatencyStats, TargetProfile
    from .context import JobContext

ORIGINAL = "original"

ConfirmFn = Callable[["Artifact", int], "LatencyStats"]
"""Re-measure an artifact at a batch size in a fresh process (the profile is bound)."""


def select_unit_id(profile: str) -> str:
    return f"select/{profile}"


def budget_batch(profile: TargetProfile, dopts: DeployOptions) -> int:
    batch = dopts.batch_size or profile.budget_batch_size
    if batch not in profile.batch_sizes:
        raise UserInputError(
            f"--batch-size {batch} is not one of profile {profile.name}'s batch sizes "
            f"{list(profile.batch_sizes)}",
            "pick one of them or edit the profile's batch_sizes",
        )
    return batch


def resolve_budget(
    profile: TargetProfile, dopts: DeployOptions, outcomes: Sequence[CandidateOutcome]
) -> tuple[LatencyBudget | None, dict[str, Any]]:
    """The budget in milliseconds, and how it was derived (for the report).

    ``--speedup S`` means: at most the original's measured figure / S, the original measured
    in this run at the budget's batch size and statistic.
    """
    if not dopts.has_budget:
        return None, {}
    batch = budget_batch(profile, dopts)
    statistic = dopts.statistic or profile.statistic
    how: dict[str, Any] = {"kind": "absolute"}
    ms = dopts.latency_ms
    if dopts.speedup is not None:
        orig = next((o for o in outcomes if o.candidate == ORIGINAL), None)
        stats = orig.latency_at(batch) if orig is not None else None
        if stats is None:
            raise UserInputError(
                "--speedup needs the original model measured in the same run, and it was not",
                "keep the original in the family (drop --no-original) or use --latency-ms",
            )
        original_ms = stats.stat(statistic)
        ms = original_ms / dopts.speedup
        how = {"kind": "relative", "speedup": dopts.speedup, "original_ms": original_ms}
    assert ms is not None
    try:
        budget = LatencyBudget(ms=ms, statistic=statistic, batch_size=batch, margin=dopts.margin)  # type: ignore[arg-type]
    except ValueError as exc:
        raise UserInputError(
            f"invalid latency budget: {exc}", "see --latency-ms, --margin"
        ) from exc
    how["ms"] = ms
    return budget, how


def _set_aside(outcome: CandidateOutcome, why: str) -> CandidateOutcome:
    return dataclasses.replace(outcome, status="profile_failed", error=why)


def decide_confirmed(
    outcomes: Sequence[CandidateOutcome],
    budget: LatencyBudget,
    *,
    prefer: str,
    search: str,
    confirm: ConfirmFn | None,
    max_confirmations: int = 4,
) -> tuple[Selection, list[CandidateOutcome], dict[str, Any]]:
    """Decide; confirm the choice in a fresh process; on a failed confirmation set the choice
    aside (with the measured figure as the reason) and decide again. Returns the selection,
    the outcomes it was made over and the confirmations ``{name: {...}}``."""
    from ..select import decide

    items = list(outcomes)
    confirmations: dict[str, Any] = {}
    while True:
        selection = decide(items, budget, search=search, prefer=prefer)  # type: ignore[arg-type]
        chosen = selection.chosen
        if chosen is None or confirm is None or len(confirmations) >= max_confirmations:
            return selection, items, confirmations
        outcome = next(o for o in items if o.candidate == chosen)
        assert outcome.artifact is not None
        stats = confirm(outcome.artifact, budget.batch_size)
        figure = stats.stat(budget.statistic)
        fits = budget.admits(stats)
        confirmations[chosen] = {"ms": figure, "fits": fits, "stats": to_dict(stats)}
        if fits:
            return selection, items, confirmations
        why = (
            f"re-measured in a fresh process at {figure:.4g} ms {budget.statistic}, which no "
            f"longer fits the budget of {budget.ms:.4g} ms"
        )
        items = [_set_aside(o, why) if o.candidate == chosen else o for o in items]


class SelectUnit:
    """Decide under the budget for ``profile``; confirm the choice in a fresh process."""

    optional = False

    def __init__(self, profile: TargetProfile, outcomes: list[CandidateOutcome]) -> None:
        self.profile = profile
        self.outcomes = outcomes
        self.id = select_unit_id(profile.name)

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        d = ctx.dopts
        return {
            "outcomes": [to_dict(o) for o in self.outcomes],
            "budget": [d.latency_ms, d.speedup, d.statistic, d.margin, d.batch_size],
            "prefer": d.prefer,
            "search": d.search,
            "confirm": d.confirm,
        }

    def execute(self, ctx: JobContext) -> UnitOutput:
        budget, how = resolve_budget(self.profile, ctx.dopts, self.outcomes)
        if budget is None:
            return UnitOutput(result={"selection": None, "budget": how})
        profile = self.profile

        def confirm(artifact: Artifact, batch: int) -> LatencyStats:
            return confirm_in_fresh_process(artifact, profile, batch)

        selection, items, confirmations = decide_confirmed(
            self.outcomes,
            budget,
            prefer=ctx.dopts.prefer,
            search=ctx.dopts.search,
            confirm=confirm if ctx.dopts.confirm and _confirm_available() else None,
        )
        return UnitOutput(
            result={
                "selection": to_dict(selection),
                "budget": how,
                "confirmations": confirmations,
                "set_aside": {o.candidate: o.error for o in items if o not in self.outcomes},
            }
        )


def confirm_in_fresh_process(
    artifact: Artifact, profile: TargetProfile, batch_size: int
) -> LatencyStats:
    from ..confirm import confirm_in_fresh_process as confirm

    return confirm(artifact, profile, batch_size)


def _confirm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dcvit_deploy.confirm") is not None


def selection_of(result: dict[str, Any]) -> Selection | None:
    sel = result.get("selection")
    return from_dict(Selection, sel) if sel else None
