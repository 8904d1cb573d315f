"""What happened to each candidate of the current family on one target, assembled from the
unit records (the family is the source of truth; nothing else is read), and the check that a
decision is made on measurements of every candidate's artifact as it is now."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.export.quantize import QUANTIZED, structure_of
from dcvit_deploy.pipeline.units.building import build_facts, closeness_of
from dcvit_deploy.pipeline.units.exporting import export_unit_id, graph_facts, onnx_precision_for
from dcvit_deploy.pipeline.units.quantizing import artifact_plan, quantize_unit_id, tried_precisions
from dcvit_deploy.store.atomic import sha256_file
from dcvit_deploy.store.records import CandidateOutcome, LatencyStats, from_dict

if TYPE_CHECKING:
    from dcvit_deploy.pipeline.units.compressing import Family
    from dcvit_deploy.store.records import TargetProfile
    from dcvit_deploy.store.rundir import RunDir


def profile_unit_id(profile: str) -> str:
    return f"profile/{profile}"


def measured(
    run: RunDir, profile: str
) -> tuple[dict[str, list[LatencyStats]], dict[str, str], dict[str, str]]:
    """Latencies, measurement failures and the artifacts considered (name -> sha256) recorded
    by the profile unit of ``profile``."""
    rec = run.unit(profile_unit_id(profile))
    if not rec or rec.get("status") != "ok":
        return {}, {}, {}
    res = rec.get("result", {})
    lat = {
        name: [from_dict(LatencyStats, s) for s in stats]
        for name, stats in res.get("latency", {}).items()
    }
    return lat, dict(res.get("errors", {})), dict(res.get("artifacts", {}))


def check_measured(run: RunDir, profile: TargetProfile, outcomes: list[CandidateOutcome]) -> None:
    """Before a decision, in one line: every candidate's artifact as it is now was considered
    by the profile unit (not a candidate of a rerun ``family``, not rebuilt since), and every
    selectable artifact is still the file that was measured."""
    considered = measured(run, profile.name)[2]
    fresh = [
        o.candidate
        for o in outcomes
        if o.status == "not_measured"
        and (o.artifact is None or considered.get(o.candidate) != o.artifact.sha256)
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


def candidate_facts(family: Family, name: str, precision: str = "") -> dict[str, Any]:
    """The fields every outcome of artifact ``name`` shares, whatever happened to it."""
    cand = next(c for c in family.candidates if c.name == structure_of(name))
    return {
        "candidate": name,
        "method": cand.method,
        "retained": cand.retained,
        "macs": cand.macs,
        "fidelity": family.fidelity(cand.name),
        "precision": precision,
    }


def graph_unit_id(profile: TargetProfile, precision: str, name: str) -> str:
    """The unit that makes the ONNX graph artifact (``name``, ``precision``) is built from."""
    if precision in QUANTIZED:
        return quantize_unit_id(profile.name, precision, name)
    return export_unit_id(onnx_precision_for(precision), name)


def outcomes_for(
    run: RunDir, family: Family, profile: TargetProfile, precisions: tuple[str, ...] = ()
) -> list[CandidateOutcome]:
    """One outcome per artifact (candidate, precision) of ``family`` on ``profile`` (default:
    the precisions it was last deployed with), in family order."""
    latency, errors, considered = measured(run, profile.name)
    out = []
    tried = precisions or tried_precisions(run, profile)
    for cand, p, name in artifact_plan(family, profile, tried):
        base = candidate_facts(family, name, p)
        rec = run.unit(graph_unit_id(profile, p, cand.name))
        onnx_path, verification = graph_facts(run, graph_unit_id(profile, p, cand.name))
        if rec is None:
            out.append(CandidateOutcome(**base, status="not_measured"))
            continue
        if onnx_path is None or verification is None:
            reason = str(rec.get("reason", "")) or f"export {rec.get('status')}"
            out.append(CandidateOutcome(**base, status="export_failed", error=reason))
            continue
        if not verification.passed:
            out.append(
                CandidateOutcome(
                    **base,
                    status="verify_failed",
                    verification=verification,
                    error=f"ONNX verification failed: {verification.reason}",
                )
            )
            continue
        artifact, built, reason = build_facts(run, profile.name, name)
        close = closeness_of(run, profile.name, name)
        base.update({"fidelity": close.agreement, "closeness": close} if close else {})
        if reason:
            out.append(
                CandidateOutcome(
                    **base, status="build_failed", verification=verification, error=reason
                )
            )
            continue
        if artifact is None or built is None:
            out.append(CandidateOutcome(**base, status="not_measured", verification=verification))
            continue
        if not built.passed:
            out.append(
                CandidateOutcome(
                    **base,
                    status="verify_failed",
                    verification=built,
                    artifact=artifact,
                    error=f"built artifact failed verification on {profile.backend}: "
                    f"{built.reason}",
                )
            )
            continue
        stats = latency.get(name) if considered.get(name) == artifact.sha256 else None
        if stats:
            out.append(
                CandidateOutcome(
                    **base,
                    status="ok",
                    verification=built,
                    artifact=artifact,
                    latency=tuple(stats),
                )
            )
        elif name in errors:
            out.append(
                CandidateOutcome(
                    **base,
                    status="profile_failed",
                    verification=built,
                    artifact=artifact,
                    error=errors[name],
                )
            )
        else:
            out.append(
                CandidateOutcome(
                    **base, status="not_measured", verification=built, artifact=artifact
                )
            )
    return out
