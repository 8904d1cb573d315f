"""The public Python API: the main job and the commands over an existing run.

A thin layer over :mod:`dcvit_deploy.pipeline`, whose units do the work. Every function takes
the options records of :mod:`dcvit_deploy.config.options`, checks them before any work
(:mod:`dcvit_deploy.config.validate`), locks the run directory for its duration, and raises
:class:`~dcvit_deploy.errors.DcvitError` subclasses for problems a user can fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from dcvit_deploy.config.options import CompressOptions, DeployOptions
from dcvit_deploy.config.validate import Validated, validate_stage
from dcvit_deploy.pipeline import JobResult, run_job, stage_job, status_of
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.progress import ProgressFn, quiet

__all__ = [
    "CompressOptions",
    "DeployOptions",
    "JobResult",
    "report_over_run",
    "run_pipeline",
    "select_over_run",
    "stage_over_run",
    "status",
]


def run_pipeline(
    copts: CompressOptions,
    dopts: DeployOptions,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: ProgressFn = quiet,
    stop_after: Literal["family", "deploy"] = "deploy",
    checked: Validated | None = None,
    executor: Any = None,
) -> JobResult:
    """The main job: compress → export/verify → build/verify → profile → select (confirmed) →
    publish to Triton → reports. Rerunning resumes; see :mod:`dcvit_deploy.pipeline`.
    ``checked``: the result of :func:`dcvit_deploy.config.validate.validate_run`, when the caller
    already ran it (the job then loads, reads and plans nothing twice); ``executor``: where
    independent work runs (:mod:`dcvit_deploy.pipeline.executor`)."""
    return run_job(
        copts,
        dopts,
        out,
        overwrite=overwrite,
        resume=resume,
        progress=progress,
        stop_after=stop_after,
        checked=checked,
        executor=executor,
    )


def stage_over_run(
    out: str | Path,
    dopts: DeployOptions,
    *,
    until: Literal["export", "build", "profile"],
    progress: ProgressFn = quiet,
) -> JobResult:
    """Export, build or profile (and select when a budget is given) the current family of an
    existing run."""
    validate_stage(out, dopts, need_backend=until != "export")
    return stage_job(out, dopts, until=until, progress=progress)


def select_over_run(
    out: str | Path, dopts: DeployOptions, *, profile_given: bool = True
) -> JobResult:
    """Select among the measured outcomes of a run's current family under a budget; publish (to
    the Triton repository and model name the run was deployed with, unless ``dopts`` names
    them) and write the reports. ``profile_given=False``: use the profile the run was last
    measured with instead of ``dopts.profile``."""
    validate_stage(out, dopts, need_budget=True, need_backend=False)
    return stage_job(out, dopts, until="select", profile_given=profile_given)


def report_over_run(out: str | Path, profile: str | None = None) -> dict[str, Path]:
    """Rewrite the reports of a run from what it recorded (never with less; nothing is decided
    or published); ``profile``: default the profile the run was last measured with."""
    dopts = DeployOptions(profile=profile or "cpu-ort")
    validate_stage(out, dopts, need_backend=False)
    return stage_job(out, dopts, until="report", profile_given=profile is not None).reports


def status(out: str | Path) -> dict[str, Any]:
    """Units, per-profile outcome statuses and the stages of every candidate of the current
    family (``{"status": "not measured"}`` before its first stage), and the superseded
    candidates of earlier families (``{"status": "superseded"}``)."""
    s = status_of(out)
    ids = {k: UnitId.parse(k) for k in s["units"]}
    steps = {k: v["status"] for k, v in s["units"].items() if (u := ids[k]) and not u.name}
    candidates: dict[str, dict[str, str]] = {name: {} for name in s["family"]}
    for unit_id, rec in s["units"].items():
        if (u := ids[unit_id]) is None:
            continue
        name = f"{u.name}.{u.precision}" if u.kind == "quantize" else u.name
        if u.kind == "train" and u.name in candidates:
            candidates[u.name]["train"] = rec["status"]
        elif u.kind in ("export", "build", "quantize") and u.candidate in candidates:
            stage = f"{u.kind}:{u.precision if u.kind == 'export' else u.profile}"
            stage += ":trained" if ".trained" in name else ""
            candidates.setdefault(name.replace(".trained", ""), {})[stage] = rec["status"]
    for name in candidates:
        candidates[name] = candidates[name] or {"status": "not measured"}
    candidates.update({name: {"status": "superseded"} for name in s["superseded"]})
    return {**s, "steps": steps, "candidates": candidates, "outcomes": s.get("outcomes", {})}
