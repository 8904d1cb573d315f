"""``--search bisect`` inside the profile unit: measure O(log N) candidates, chosen by the
budget (so, unlike exhaustive profiling, the budget is an input of the measurement)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserInputError
from ..records import CandidateOutcome, LatencyBudget
from .select import ORIGINAL, budget_batch

if TYPE_CHECKING:
    from ..options import DeployOptions
    from ..records import LatencyStats, TargetProfile
    from .context import JobContext
    from .family import Family
    from .profile import ProfileUnit


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
        from ..select import bisect_search

        by_name = {c.name: c for c in self.family.candidates}
        order = [n for n in unit.order if n in unit.artifacts]
        batch = budget_batch(self.profile, self.dopts)
        statistic = self.dopts.statistic or self.profile.statistic
        ms = self.dopts.latency_ms
        if self.dopts.speedup is not None:
            if ORIGINAL not in unit.artifacts:
                raise UserInputError(
                    "--speedup needs the original model built and verified in this run",
                    "keep the original in the family (drop --no-original) or use --latency-ms",
                )
            earlier = unit.reusable(ctx, ORIGINAL)
            if earlier is not None:
                latency[ORIGINAL] = earlier
            else:
                unit.measure(ctx, [ORIGINAL], latency, errors, files)
            if ORIGINAL not in latency:
                raise UserInputError(
                    f"the original could not be measured: {errors.get(ORIGINAL)}",
                    "fix the measurement or use --latency-ms",
                )
            orig = next(s for s in latency[ORIGINAL] if s.batch_size == batch)
            ms = orig.stat(statistic) / self.dopts.speedup
        assert ms is not None
        budget = LatencyBudget(
            ms=ms,
            statistic=statistic,
            batch_size=batch,
            margin=self.dopts.margin,  # type: ignore[arg-type]
        )

        def measure_one(name: str) -> CandidateOutcome:
            if name not in latency and name not in errors:
                earlier = unit.reusable(ctx, name)
                if earlier is not None:
                    latency[name] = earlier
                else:
                    unit.measure(ctx, [name], latency, errors, files)
            c = by_name[name]
            base: dict[str, Any] = {
                "candidate": name,
                "method": c.method,
                "retained": c.retained,
                "macs": c.macs,
                "fidelity": self.family.fidelity(name),
                "artifact": unit.artifacts[name],
            }
            if name in latency:
                return CandidateOutcome(**base, status="ok", latency=tuple(latency[name]))
            return CandidateOutcome(**base, status="profile_failed", error=errors.get(name, ""))

        bisect_search(order, measure_one, budget, prefer=self.dopts.prefer)  # type: ignore[arg-type]
