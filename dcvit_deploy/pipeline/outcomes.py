"""What happened to each candidate of the current family on one target, assembled from the
unit records (the family is the source of truth; nothing else is read)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dcvit_deploy.pipeline.units.building import build_facts
from dcvit_deploy.pipeline.units.exporting import export_facts, export_unit_id, onnx_precision_for
from dcvit_deploy.store.records import CandidateOutcome, LatencyStats, from_dict

if TYPE_CHECKING:
    from dcvit_deploy.pipeline.units.compressing import Family
    from dcvit_deploy.store.records import TargetProfile
    from dcvit_deploy.store.rundir import RunDir


def profile_unit_id(profile: str) -> str:
    return f"profile/{profile}"


def measured(run: RunDir, profile: str) -> tuple[dict[str, list[LatencyStats]], dict[str, str]]:
    """Latencies and measurement failures recorded by the profile unit of ``profile``."""
    rec = run.unit(profile_unit_id(profile))
    if not rec or rec.get("status") != "ok":
        return {}, {}
    res = rec.get("result", {})
    lat = {
        name: [from_dict(LatencyStats, s) for s in stats]
        for name, stats in res.get("latency", {}).items()
    }
    return lat, dict(res.get("errors", {}))


def candidate_facts(family: Family, name: str) -> dict[str, Any]:
    """The fields every outcome of candidate ``name`` shares, whatever happened to it."""
    cand = next(c for c in family.candidates if c.name == name)
    return {
        "candidate": cand.name,
        "method": cand.method,
        "retained": cand.retained,
        "macs": cand.macs,
        "fidelity": family.fidelity(cand.name),
    }


def outcomes_for(run: RunDir, family: Family, profile: TargetProfile) -> list[CandidateOutcome]:
    """One outcome per candidate of ``family`` on ``profile``, in family order."""
    precision = onnx_precision_for(profile.precision)
    latency, errors = measured(run, profile.name)
    out = []
    for cand in family.candidates:
        base = candidate_facts(family, cand.name)
        rec = run.unit(export_unit_id(precision, cand.name))
        onnx_path, verification = export_facts(run, precision, cand.name)
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
        artifact, built, reason = build_facts(run, profile.name, cand.name)
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
        stats = latency.get(cand.name)
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
        elif cand.name in errors:
            out.append(
                CandidateOutcome(
                    **base,
                    status="profile_failed",
                    verification=built,
                    artifact=artifact,
                    error=errors[cand.name],
                )
            )
        else:
            out.append(
                CandidateOutcome(
                    **base, status="not_measured", verification=built, artifact=artifact
                )
            )
    return out
