"""The reports of a job: ``report.json``, ``candidates.csv``, ``SUMMARY.md`` and
``pareto.png`` for one profile, written to ``RUN/reports/<profile>/`` and, for the run's
current profile, to ``RUN/`` -- always from the current family's outcomes, so a report never
lists a superseded candidate as selectable and is never replaced by one with less."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.units.quantizing import artifact_plan
from dcvit_deploy.pipeline.view import RunView
from dcvit_deploy.store.atomic import atomic_write_with
from dcvit_deploy.store.records import to_dict

if TYPE_CHECKING:
    from dcvit_deploy.pipeline.context import JobContext
    from dcvit_deploy.pipeline.result import JobResult
    from dcvit_deploy.pipeline.units.compressing import Family
    from dcvit_deploy.store.records import TargetProfile


def run_meta(
    ctx: JobContext, family: Family, profile: TargetProfile, result: JobResult
) -> dict[str, Any]:
    """What the reports say about the run besides the outcomes: inputs, notes (skipped
    images, held-out set, budget basis, confirmations, publishing, FP16 loss), superseded
    candidates, and which artifact was verified with which runtime."""
    run, view = ctx.run, RunView(ctx.run)
    info = family.info
    notes = list(result.notes)
    skipped = info.get("skipped_images") or []
    for line in (info.get("skipped_summary"), info.get("holdout_note")):
        if line and line not in notes:
            notes.append(str(line))
    if result.budget.get("kind") == "relative":
        b = result.budget
        notes.append(
            f"budget relative to the original: {b['original_ms']:.4g} ms / {b['speedup']:g} = "
            f"{b['ms']:.4g} ms"
        )
    if result.selection is not None:
        notes += list(result.selection.notes)
    for pub in result.published.get("models", []):
        notes.append(
            f"published {pub['candidate']} as Triton model {pub['model']} version {pub['version']}"
            + ("" if pub["created"] else " (already there)")
        )
    verified: dict[str, Any] = {}
    from dcvit_deploy.export.quantize import artifact_name
    from dcvit_deploy.pipeline.outcomes import graph_unit_id

    chosen = result.selection.chosen if result.selection else None
    for cand, p, name in artifact_plan(family, profile, view.precisions(profile)):
        rec = family.trained.get(cand.name) if name == chosen else family.measured(cand.name)
        key = rec.key if rec is not None else cand.name
        res = view.result(graph_unit_id(profile, p, key))
        art = artifact_name(key, p, profile.precision)
        built = view.result(UnitId("build", profile.name, name=art))
        entry: dict[str, Any] = {}
        if res is not None:
            entry["onnx"] = f"{res['path']} with onnxruntime (CPU) against PyTorch"
            if "method" in res:  # a quantized graph: how, and on a CPU why (measured once)
                keys = ("method", "method_timing_ms", "quantized_ops")
                entry["quantization"] = {k: res[k] for k in keys}
        if built is not None:
            entry["artifact"] = f"{built['artifact']['path']} with {built['verified_with']}"
        verified[name] = entry
    return {
        "run_dir": run.root.name,
        "verified": verified,
        "model": ctx.copts.model,
        "identity": view.identity,
        "images": info.get("images"),
        "skipped_images": skipped,
        "holdout": info.get("holdout"),
        "holdout_note": info.get("holdout_note", ""),
        "notes": notes,
        "superseded": list(result.superseded),
        "budget_basis": result.budget,
        "confirmations": dict(result.selection.confirmed) if result.selection else {},
        "published": result.published,
    }


def _copy(src: Path, dest: Path) -> None:
    def write(tmp: Path) -> None:
        shutil.copyfile(src, tmp)

    atomic_write_with(dest, write)


def write_run_reports(
    ctx: JobContext, family: Family, profile: TargetProfile, result: JobResult
) -> dict[str, Path]:
    from dcvit_deploy.latency.machine import capture_environment
    from dcvit_deploy.reports.writers import write_reports

    run = ctx.run
    folder = run.sub(f"reports/{profile.name}")
    paths = write_reports(
        folder,
        run_meta=run_meta(ctx, family, profile, result),
        outcomes=list(result.outcomes),
        selection=result.selection,
        profile_dict=to_dict(profile),
        env_dict=capture_environment(),
    )
    inputs = RunView(run).inputs
    current = inputs.get("profiles", [profile.name])[-1]
    if current != profile.name or inputs.get("fleet"):  # fleet: fleet.json
        return paths
    top = {}
    for key, path in paths.items():
        dest = run.root / path.name
        _copy(path, dest)
        top[key] = dest
    return top
