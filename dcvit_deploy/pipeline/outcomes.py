"""What happened to each candidate of the current family on one target, assembled from the
unit records (the family is the source of truth; nothing else is read), and the check that a
decision is made on measurements of every candidate's artifact as it is now."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.export.quantize import QUANTIZED, artifact_name, structure_of
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.units.exporting import onnx_precision_for
from dcvit_deploy.pipeline.units.quantizing import artifact_plan
from dcvit_deploy.pipeline.view import RunView
from dcvit_deploy.store.atomic import sha256_file
from dcvit_deploy.store.records import CandidateOutcome

if TYPE_CHECKING:
    from dcvit_deploy.pipeline.units.compressing import Family
    from dcvit_deploy.store.records import Candidate, LatencyStats, TargetProfile
    from dcvit_deploy.store.rundir import RunDir


def check_measured(run: RunDir, profile: TargetProfile, outcomes: list[CandidateOutcome]) -> None:
    """Before a decision, in one line: every candidate's artifact as it is now was considered
    by the profile unit (not a candidate of a rerun ``family``, not rebuilt since), and every
    selectable artifact is still the file that was measured."""
    considered = RunView(run).measured(profile.name)[2]
    fresh = [
        o.candidate
        for o in outcomes
        if o.status == "not_measured"
        and (o.artifact is None or considered.get(o.candidate) != o.artifact.sha256)
        and considered.get(o.candidate) != ""  # a search that did not reach it
    ]
    fix = f"run `dcvit-deploy profile --out {run.root}` (it builds and measures what changed)"
    if fresh:
        raise UserInputError(
            f"{len(fresh)} candidate(s) of the current family were never measured on profile "
            f"{profile.name} as built now ({', '.join(fresh)})",
            fix,
        )
    for o in outcomes:
        a = o.artifact
        if (
            o.status == "ok"
            and a
            and (not Path(a.path).is_file() or sha256_file(a.path) != a.sha256)
        ):
            raise UserInputError(
                f"artifact {run.rel(a.path)} of candidate {o.candidate} is missing or changed "
                "since it was built and measured",
                fix,
            )


def candidate_facts(
    family: Family, name: str, rec: Candidate | None = None, precision: str = ""
) -> dict[str, Any]:
    """The fields every outcome of artifact ``name`` shares, whatever happened to it, when
    record ``rec`` (default: the one the family measures) is the one deployed."""
    cand = next(c for c in family.candidates if c.name == structure_of(name))
    rec = rec or family.measured(cand.name)
    final = rec is not None and rec.state == "trained"
    return {
        "candidate": name,
        "method": cand.method,
        "retained": cand.retained,
        "macs": cand.macs,
        "fidelity": family.fidelity(cand.name, trained=final),
        "measured_on": "trained" if final else "structure",
        "trained": final,
        "precision": precision,
    }


def graph_unit_id(profile: TargetProfile, precision: str, key: str) -> UnitId:
    """The unit that makes the ONNX graph artifact (record ``key``, ``precision``) is built from."""
    if precision in QUANTIZED:
        return UnitId("quantize", profile.name, precision, key)
    return UnitId("export", precision=onnx_precision_for(precision), name=key)


def outcomes_for(
    run: RunDir, family: Family, profile: TargetProfile, precisions: tuple[str, ...] = ()
) -> list[CandidateOutcome]:
    """One outcome per artifact (candidate, precision) of ``family`` on ``profile`` (default:
    the precisions it was last deployed with), in family order."""
    view = RunView(run)
    latency, errors, considered = view.measured(profile.name)
    tried = precisions or view.precisions(profile)
    return [
        outcome_of(
            run,
            family,
            profile,
            name,
            latency.get(name),
            errors.get(name, ""),
            considered=considered.get(name, ""),
            precision=p,
        )
        for _, p, name in artifact_plan(family, profile, tried)
    ]


def outcome_of(
    run: RunDir,
    family: Family,
    profile: TargetProfile,
    name: str,
    stats: list[LatencyStats] | None,
    error: str = "",
    rec: Candidate | None = None,
    considered: str | None = None,
    precision: str = "",
) -> CandidateOutcome:
    """What happened to artifact ``name`` (candidate and precision) made from record ``rec``
    (default: the one the family measures) on ``profile``, with its measured ``stats`` or
    measurement ``error``; ``considered``: the checksum of the artifact those stats measured
    (they count only for that artifact)."""
    precision = precision or (name.split(".")[-1] if "." in name else profile.precision)
    rec = rec or family.measured(structure_of(name))
    base = candidate_facts(family, name, rec, precision)
    if rec is None:
        return CandidateOutcome(**base, status="not_measured", error="not trained")
    key = artifact_name(rec.key, precision, profile.precision)
    view, uid = RunView(run), graph_unit_id(profile, precision, rec.key)
    graph = view.record(uid)
    onnx_path, verification = view.graph(uid)
    if graph is None:
        return CandidateOutcome(**base, status="not_measured")
    if onnx_path is None or verification is None:
        reason = str(graph.get("reason", "")) or f"export {graph.get('status')}"
        return CandidateOutcome(**base, status="export_failed", error=reason)
    if not verification.passed:
        return CandidateOutcome(
            **base,
            status="verify_failed",
            verification=verification,
            error=f"ONNX verification failed: {verification.reason}",
        )
    artifact, built, reason = view.built(profile.name, key)
    close = view.closeness(profile.name, key)
    base.update({"fidelity": close.agreement, "closeness": close} if close else {})
    if reason:
        return CandidateOutcome(
            **base, status="build_failed", verification=verification, error=reason
        )
    if artifact is None or built is None:
        return CandidateOutcome(**base, status="not_measured", verification=verification)
    if not built.passed:
        return CandidateOutcome(
            **base,
            status="verify_failed",
            verification=built,
            artifact=artifact,
            error=f"built artifact failed verification on {profile.backend}: {built.reason}",
        )
    if considered is not None and considered != artifact.sha256:
        stats = None
    done: dict[str, Any] = {"verification": built, "artifact": artifact}
    if stats:
        return CandidateOutcome(**base, status="ok", latency=tuple(stats), **done)
    if error:
        return CandidateOutcome(**base, status="profile_failed", error=error, **done)
    return CandidateOutcome(**base, status="not_measured", **done)
