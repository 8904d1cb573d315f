"""The profile unit: real latency of every verified artifact of the family on one target.

Inputs: each artifact's checksum, the profile's content, the runtime versions and the device
the measurement runs on -- a runtime upgrade or another machine re-measures; the budget does
not (selection is a separate, pure step), except under ``--search bisect``, where the budget
decides which candidates are measured at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.errors import EnvironmentProblem, UserInputError
from dcvit_deploy.pipeline.context import RUNTIME_PACKAGES, device_identity, versions
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.outcomes import candidate_facts
from dcvit_deploy.pipeline.unit import UnitOutput
from dcvit_deploy.store.records import CandidateOutcome, to_dict

if TYPE_CHECKING:
    from collections.abc import Callable

    from dcvit_deploy.config.options import DeployOptions
    from dcvit_deploy.pipeline.context import JobContext
    from dcvit_deploy.pipeline.units.compressing import Family
    from dcvit_deploy.store.records import Artifact, Candidate, LatencyStats, TargetProfile


class OtherDevice(EnvironmentProblem):
    """The profile names a GPU other than the one this machine has."""


def check_device(profile: TargetProfile, allow_other: bool) -> str:
    """Refuse to measure a profile that names a GPU on another device (``allow_other``
    overrides); returns a note for the report when overridden, else ``""``."""
    if profile.device != "cuda" or not profile.gpu:
        return ""
    from dcvit_deploy.latency.machine import cuda_device_count

    if cuda_device_count() == 0:
        return ""  # the backend's own availability check says there is no GPU at all
    here = str(device_identity(profile).get("gpu", ""))
    if profile.gpu.lower() in here.lower():
        return ""
    if allow_other:
        return f"profile {profile.name} names {profile.gpu} but was measured on {here}"
    raise OtherDevice(
        f"profile {profile.name!r} is for {profile.gpu}, but this machine's GPU is {here or '?'}",
        "run on that GPU, choose the profile for this one, or pass --allow-other-device",
    )


def raw_path(ctx: JobContext, profile: TargetProfile, name: str, batch: int) -> Path:
    return ctx.run.sub(f"raw/{profile.name}/{name}-b{batch}.json", file=True)


class ProfileUnit:
    """Measure the verified artifacts ``artifacts`` (name -> artifact) on ``profile``."""

    optional = False

    def __init__(
        self,
        profile: TargetProfile,
        artifacts: dict[str, Artifact],
        order: list[str],
        *,
        bisect: Any = None,
    ) -> None:
        self.profile = profile
        self.artifacts = artifacts
        self.order = order
        self.bisect = bisect
        self.id = str(UnitId("profile", profile=profile.name))

    def basis(self) -> str:
        """What every measurement of this unit depends on besides the artifact itself."""
        from dcvit_deploy.store.atomic import fingerprint

        return fingerprint(
            {
                "profile": to_dict(self.profile),
                "runtime": versions(RUNTIME_PACKAGES),
                "device": device_identity(self.profile),
            }
        )

    def reusable(self, ctx: JobContext, name: str) -> list[LatencyStats] | None:
        """An earlier measurement of ``name`` with the same artifact and basis (bisect reuses
        it instead of measuring again)."""
        from dcvit_deploy.store.records import LatencyStats, from_dict

        prev = ctx.previous.get(self.id, {}).get("result", {})
        if prev.get("basis") != self.basis():
            return None
        if prev.get("artifacts", {}).get(name) != self.artifacts[name].sha256:
            return None
        stats = prev.get("latency", {}).get(name)
        return [from_dict(LatencyStats, s) for s in stats] if stats else None

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        return {
            "artifacts": {n: a.sha256 for n, a in sorted(self.artifacts.items())},
            "basis": self.basis(),
            "search": "bisect" if self.bisect is not None else "all",
            "budget": self.bisect.key() if self.bisect is not None else None,
            **({"planned": self.bisect.planned()} if self.bisect and self.bisect.pending else {}),
        }

    def execute(self, ctx: JobContext) -> UnitOutput:
        from dcvit_deploy.latency.machine import capture_environment

        latency: dict[str, list[LatencyStats]] = {}
        errors: dict[str, str] = {}
        files: list[Path] = []
        if self.bisect is not None:
            self.bisect.run(ctx, self, latency, errors, files)
        else:
            self.measure(
                ctx, [n for n in self.order if n in self.artifacts], latency, errors, files
            )
        return UnitOutput(
            result={
                "basis": self.basis(),
                # considered; "": not reached by the search (made or not, not measured)
                "artifacts": {n: a.sha256 for n, a in self.artifacts.items()}
                | dict.fromkeys(self.bisect.pending if self.bisect else (), ""),
                "profile": to_dict(self.profile),  # what is served is what was measured
                "latency": {n: [to_dict(s) for s in st] for n, st in latency.items()},
                "errors": errors,
                "environment": capture_environment(),
                "device_note": check_device(self.profile, ctx.dopts.allow_other_device),
            },
            files=tuple(files),
        )

    def measure(
        self,
        ctx: JobContext,
        names: list[str],
        latency: dict[str, list[LatencyStats]],
        errors: dict[str, str],
        files: list[Path],
    ) -> None:
        """Measure ``names`` at every batch size of the profile in interleaved rounds (order
        shuffled per round, seeded), so no candidate gets a luckier moment than another; a
        candidate whose measurement fails is then measured alone to record its error."""
        from dcvit_deploy.backends import get_backend
        from dcvit_deploy.latency.rounds import measure_rounds
        from dcvit_deploy.progress import ProgressEvent

        if not names:
            return
        backend = get_backend(self.profile.backend)
        profile = self.profile

        def where(name: str, batch: int) -> Path:
            return raw_path(ctx, profile, name, batch)

        def say(text: str) -> None:
            ctx.progress(ProgressEvent(stage="profile", message=text))

        try:
            result = measure_rounds(
                backend,
                {n: self.artifacts[n] for n in names},
                profile,
                profile.batch_sizes,
                raw_path=where,
                seed=ctx.copts.seed,
                progress=say,
            )
        except Exception:
            if len(names) == 1:
                self._measure_alone(ctx, backend, names[0], latency, errors, files)
                return
            for name in names:
                self.measure(ctx, [name], latency, errors, files)
            return
        for name in names:
            latency[name] = list(result.latency(name))
            files += [where(name, b) for b in profile.batch_sizes if where(name, b).is_file()]

    def _measure_alone(
        self,
        ctx: JobContext,
        backend: Any,
        name: str,
        latency: dict[str, list[LatencyStats]],
        errors: dict[str, str],
        files: list[Path],
    ) -> None:
        from dcvit_deploy.errors import DcvitError

        stats = []
        try:
            for b in self.profile.batch_sizes:
                path = raw_path(ctx, self.profile, name, b)
                stats.append(backend.measure(self.artifacts[name], self.profile, b, raw_path=path))
                files.append(path)
        except DcvitError as exc:
            errors[name] = exc.one_line()
            return
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            return
        latency[name] = stats


class BisectPlan:
    """Which artifacts the profile unit makes and measures under ``--search bisect``: one
    O(log N) search per precision (latency falls with size within a precision, not across
    them), each artifact exported, quantized and built only when the search reaches it
    (``pending``: name -> (record, precision), made by ``make``)."""

    def __init__(
        self,
        dopts: DeployOptions,
        profile: TargetProfile,
        family: Family,
        pending: dict[str, tuple[Candidate, str]] | None = None,
        make: Callable[[Candidate, str], Artifact | None] | None = None,
    ) -> None:
        self.dopts = dopts
        self.profile = profile
        self.family = family
        self.pending = dict(pending or {})
        self.make = make

    def key(self) -> list[Any]:
        d = self.dopts
        return [d.latency_ms, d.speedup, d.statistic, d.margin, d.batch_size, d.prefer]

    def planned(self) -> dict[str, Any]:
        """What the artifacts not made yet are made from (their records' weights and the
        export settings): a change searches again."""
        d = self.dopts
        return {
            "records": {n: rec.weights_sha256 for n, (rec, _) in sorted(self.pending.items())},
            "export": [d.opset, d.simplify],
        }

    def run(
        self,
        ctx: JobContext,
        unit: ProfileUnit,
        latency: dict[str, list[LatencyStats]],
        errors: dict[str, str],
        files: list[Path],
    ) -> None:
        from dcvit_deploy.pipeline.units.selecting import ORIGINAL, no_original, resolve_budget
        from dcvit_deploy.selection.bisect import bisect_search

        order = [n for n in unit.order if n in unit.artifacts or n in self.pending]

        def measure_once(name: str) -> None:
            """An earlier measurement with the same artifact and basis, else a new one."""
            if name in latency or name in errors or not self._made(unit, name):
                return
            earlier = unit.reusable(ctx, name)
            if earlier is not None:
                latency[name] = earlier
            else:
                unit.measure(ctx, [name], latency, errors, files)

        if self.dopts.speedup is not None:
            if ORIGINAL not in order:
                from dcvit_deploy.pipeline.outcomes import outcomes_for

                outcomes = outcomes_for(ctx.run, self.family, self.profile)
                raise no_original(next((o for o in outcomes if o.candidate == ORIGINAL), None))
            measure_once(ORIGINAL)
            if ORIGINAL not in latency:
                why = errors.get(ORIGINAL) or "its artifact could not be made (see its units)"
                raise UserInputError(
                    f"the original could not be measured: {why}",
                    "fix the measurement or use --latency-ms",
                )
        original = self._outcome(unit, ORIGINAL, latency, errors) if ORIGINAL in latency else None
        budget = resolve_budget(self.profile, self.dopts, [original] if original else [])
        assert budget is not None

        def measure_one(name: str) -> CandidateOutcome:
            measure_once(name)
            return self._outcome(unit, name, latency, errors)

        chains: dict[str, list[str]] = {}
        for name in order:
            chains.setdefault(self._precision(unit, name), []).append(name)
        for chain in chains.values():
            bisect_search(chain, measure_one, budget, prefer=self.dopts.prefer)

    def _precision(self, unit: ProfileUnit, name: str) -> str:
        if name in self.pending:
            return self.pending[name][1]
        return unit.artifacts[name].precision

    def _made(self, unit: ProfileUnit, name: str) -> bool:
        """``name``'s artifact, made now if the search reached it first (``False``: failed)."""
        if name not in unit.artifacts and name in self.pending and self.make is not None:
            artifact = self.make(*self.pending.pop(name))
            if artifact is not None:
                unit.artifacts[name] = artifact
        return name in unit.artifacts

    def _outcome(
        self,
        unit: ProfileUnit,
        name: str,
        latency: dict[str, list[LatencyStats]],
        errors: dict[str, str],
    ) -> CandidateOutcome:
        art = unit.artifacts.get(name)
        if art is None:
            facts = candidate_facts(self.family, name, precision=self._precision(unit, name))
            return CandidateOutcome(**facts, status="build_failed", error="no artifact")
        base = {**candidate_facts(self.family, name, precision=art.precision), "artifact": art}
        if name in latency:
            return CandidateOutcome(**base, status="ok", latency=tuple(latency[name]))
        return CandidateOutcome(**base, status="profile_failed", error=errors.get(name, ""))
