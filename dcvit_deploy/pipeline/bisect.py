"""``--search bisect`` inside the profile unit: measure O(log N) candidates, chosen by the
budget (so, unlike exhaustive profiling, the budget is an input of the measurement)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.pipeline.outcomes import candidate_facts
from dcvit_deploy.pipeline.units.selecting import ORIGINAL, resolve_budget
from dcvit_deploy.store.records import CandidateOutcome

if TYPE_CHECKING:
    from dcvit_deploy.config.options import DeployOptions
    from dcvit_deploy.pipeline.context import JobContext
    from dcvit_deploy.pipeline.units.compressing import Family
    from dcvit_deploy.pipeline.units.measuring import ProfileUnit
    from dcvit_deploy.store.records import LatencyStats, TargetProfile


class BisectPlan:
    """Which candidates the profile unit measures under ``--search bisect``."""

    def __init__(self, dopts: DeployOptions, profile: TargetProfile, family: Family) -> None:
        self.dopts = dopts
        self.profile = profile
        self.family = family

    def key(self) -> list[Any]:
        d = self.dopts
        return [d.latency_ms, d.speedup, d.statistic, d.margin, d.batch_size, d.prefer]

    def run(
        self,
        ctx: JobContext,
        unit: ProfileUnit,
        latency: dict[str, list[LatencyStats]],
        errors: dict[str, str],
        files: list[Path],
    ) -> None:
        from dcvit_deploy.selection.decide import bisect_search

        order = [n for n in unit.order if n in unit.artifacts]

        def measure_once(name: str) -> None:
            """An earlier measurement with the same artifact and basis, else a new one."""
            if name in latency or name in errors:
                return
            earlier = unit.reusable(ctx, name)
            if earlier is not None:
                latency[name] = earlier
            else:
                unit.measure(ctx, [name], latency, errors, files)

        if self.dopts.speedup is not None:
            if ORIGINAL not in unit.artifacts:
                raise UserInputError(
                    "--speedup needs the original model built and verified in this run",
                    "keep the original in the family (drop --no-original) or use --latency-ms",
                )
            measure_once(ORIGINAL)
            if ORIGINAL not in latency:
                raise UserInputError(
                    f"the original could not be measured: {errors.get(ORIGINAL)}",
                    "fix the measurement or use --latency-ms",
                )
        original = self._outcome(unit, ORIGINAL, latency, errors) if ORIGINAL in latency else None
        budget = resolve_budget(self.profile, self.dopts, [original] if original else [])
        assert budget is not None

        def measure_one(name: str) -> CandidateOutcome:
            measure_once(name)
            return self._outcome(unit, name, latency, errors)

        bisect_search(order, measure_one, budget, prefer=self.dopts.prefer)

    def _outcome(
        self,
        unit: ProfileUnit,
        name: str,
        latency: dict[str, list[LatencyStats]],
        errors: dict[str, str],
    ) -> CandidateOutcome:
        base = {**candidate_facts(self.family, name), "artifact": unit.artifacts[name]}
        if name in latency:
            return CandidateOutcome(**base, status="ok", latency=tuple(latency[name]))
        return CandidateOutcome(**base, status="profile_failed", error=errors.get(name, ""))
