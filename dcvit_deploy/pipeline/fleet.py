"""Several targets in one run (``--profile a,b,c``): one family and one export serve them all;
build, verification, measurement, selection, publishing and reports happen per target.

Locally the targets run one after another. With Ray each is one task on a node that carries it
(:func:`resources_for`), running the same units as locally (build, verify, profile, select with
its fresh-process confirmation) in a scratch copy of the run that holds the family, the graphs
and the target's earlier records and files -- the node's runner skips what is still valid by its
own device and runtime versions -- and returning the records and files, which the head alone
writes into the run before it publishes and reports. A node never trains: measuring first, a
target whose choice is not trained yet says so (:class:`~dcvit_deploy.errors.NeedsTraining`);
the head trains the union of those picks (as tasks), exports them and sends those targets
again, until every target has chosen a trained candidate or nothing (at most one round per
candidate).

Triton: a repository per target, ``<repo>/<profile>/<model>``, under the one model name: a
Triton server runs on one GPU type and loads one repository, so clients call the same name on
every pool, each target's versions advance on their own, and a target that now picks nothing
clears its own repository without touching another target's model.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dcvit_deploy.errors import BudgetInfeasible, DcvitError, EnvironmentProblem, NeedsTraining
from dcvit_deploy.pipeline.executor import Resources, Task, Unplaceable
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.result import JobResult
from dcvit_deploy.pipeline.runner import Runner
from dcvit_deploy.pipeline.units.exporting import onnx_precision_for
from dcvit_deploy.pipeline.view import RunView
from dcvit_deploy.selection.fidelity import fidelity_set
from dcvit_deploy.selection.reasons import render
from dcvit_deploy.store.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from dcvit_deploy.config.options import CompressOptions, DeployOptions
    from dcvit_deploy.pipeline.context import JobContext, Prepared
    from dcvit_deploy.pipeline.executor import LocalExecutor
    from dcvit_deploy.pipeline.units.compressing import Family
    from dcvit_deploy.store.records import TargetProfile

from dcvit_deploy.config.profiles import Target, targets_of  # noqa: F401  (re-exported)


def resources_for(profile: TargetProfile) -> Resources:
    """A node that carries ``profile`` (it advertises ``target:<name>``) and, for a GPU target,
    one whole GPU of its type, named as Ray labels nodes ("Tesla T4" -> ``T4``); a CPU target
    reserves the threads its runtime uses, so measurements on one node do not share cores."""
    custom = {f"target:{profile.name}": 1.0}
    if profile.device != "cuda":
        threads = int(profile.backend_options.get("intra_op_num_threads") or 1)
        return Resources(threads, 0, None, custom)
    gpu = profile.gpu or ""
    m = re.match(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)", gpu)  # Ray's own pattern
    kind = (m.group(1) if m else re.sub(r"^NVIDIA\s+", "", gpu)).replace(" ", "-")
    return Resources(1, 1, kind or None, custom)


@dataclass(frozen=True)
class TargetJob:
    """What a target's task needs besides the shared family and graphs."""

    key: str
    profile: TargetProfile
    copts: CompressOptions
    dopts: DeployOptions
    prep: Prepared
    manifest: dict[str, Any]
    files: dict[str, bytes]


def _ours(uid: UnitId, name: str) -> bool:
    return uid.kind in ("profile", "select", "build", "quantize") and uid.profile == name


def _target_files(root: Path, name: str) -> dict[str, bytes]:
    """The files a target's units write: artifacts, timing cache, raw latencies, logs."""
    globs = (f"artifacts/{name}/**/*", f"artifacts/{name}.*", f"raw/{name}/**/*",
             f"logs/build_{name}_*", f"logs/*_{name}.log", f"onnx/*/{name}/*")  # fmt: skip
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for g in globs
        for p in root.glob(g)
        if p.is_file()
    }


def run_target(shared: dict[str, bytes], job: TargetJob) -> tuple[Any, ...]:
    """A target's build, verification, measurement and selection on its node (a task):
    ``(unit records, files written, notes, error line, the candidate it needs trained)``."""
    from dcvit_deploy.pipeline.context import JobContext
    from dcvit_deploy.pipeline.job import check_target, deploy
    from dcvit_deploy.pipeline.units.compressing import current_family
    from dcvit_deploy.store.rundir import MANIFEST, RunDir

    root = Path(tempfile.gettempdir()) / f"dcvit-target-{job.key}"
    shutil.rmtree(root, ignore_errors=True)
    try:
        for rel, data in {**shared, **job.files}.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        atomic_write_json(root / MANIFEST, job.manifest)
        with RunDir.load(root) as run:
            ctx = JobContext(run, job.copts, job.dopts, job.profile, _prep=job.prep,
                             elsewhere=("export", "train"))  # fmt: skip
            error = wants = ""
            try:
                check_target(job.profile, job.dopts)
                family = current_family(run)
                deploy(ctx, Runner(ctx), family, job.profile, publish=False)
            except NeedsTraining as exc:
                wants = exc.name
            except DcvitError as exc:
                error = f"failed on {socket.gethostname()}: {exc.one_line()}"
            name = job.profile.name
            records = {str(u): r for u, r in RunView(run).records().items() if _ours(u, name)}
            files = _target_files(root, name)
            changed = {rel: d for rel, d in files.items() if job.files.get(rel) != d}
            return records, changed, ctx.notes, error, wants
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _merge(run: Any, records: dict[str, Any], files: dict[str, bytes]) -> None:
    for rel, data in files.items():  # a log went with the task: the node's copy is complete
        dest = run.root / rel
        if not dest.resolve().is_relative_to(run.root.resolve()):
            raise RuntimeError(f"a target task returned a file outside the run: {rel}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, data)
    for uid, rec in records.items():
        run.record_unit(uid, rec)


def _task(c: JobContext, family: Family, shared: dict[Any, dict[str, bytes]]) -> Task:
    """The target of ``c`` as a task; ``shared`` (by precisions): the family and its graphs."""
    from dcvit_deploy.export.quantize import check_precisions

    run, p = c.run, cast("TargetProfile", c.profile)
    prec = tuple(sorted({onnx_precision_for(x) for x in check_precisions(p, c.dopts)}))
    if prec not in shared:
        recs = [*family.candidates, *family.trained.values()]
        rels = [f"family/{x.key}.json" for x in recs] + [f"family/{x.weights}" for x in recs]
        rels += [f"onnx/{q}/{x.key}.onnx" for x in recs for q in prec]
        shared[prec] = {r: (run.root / r).read_bytes() for r in rels if (run.root / r).is_file()}

    def wanted(u: UnitId) -> bool:
        return u.kind in ("family", "train") or (u.kind == "export" and u.precision in prec)

    units = {str(u): r for u, r in RunView(run).records().items() if wanted(u) or _ours(u, p.name)}
    key = hashlib.sha256(f"{run.root}|{p.name}".encode()).hexdigest()[:16]
    fidelity_set(c.prep(), c.dopts.eval_data)  # the original's logits go with the images
    prep = replace(c.prep(), teacher=cast(Any, None))  # the node needs the held-out images
    manifest = {**run.manifest, "units": units}
    job = TargetJob(key, p, c.copts, c.dopts, prep, manifest, _target_files(run.root, p.name))
    return Task(p.name, run_target, (shared[prec], job), None, resources_for(p))


def deploy_fleet(
    ctx: JobContext, family: Family, targets: list[Target], executor: LocalExecutor
) -> JobResult:
    """Deploy ``family`` on every target; a fleet (more than one) gets its summary."""
    from dcvit_deploy.pipeline.job import _remember_profile, decide_and_publish, deploy

    run, fleet = ctx.run, len(targets) > 1
    ctxs = {}
    for p, d in targets:
        if fleet:  # a Triton repository per target (module docstring)
            base = Path(d.triton_repo) if d.triton_repo else run.root / "triton"
            d = replace(d, triton_repo=str(base / p.name))
        ctxs[p.name] = replace(ctx, dopts=d, profile=p, notes=list(ctx.notes))
    results: dict[str, JobResult | str] = {}

    def attempt(name: str, fn: Any) -> None:
        try:
            results[name] = fn()
        except DcvitError as exc:
            results[name] = f"failed: {exc.one_line()}"

    if not executor.remote:
        for p, _ in targets:
            attempt(p.name, lambda c=ctxs[p.name], p=p: deploy(c, Runner(c), family, p))
    else:
        for p, _ in targets:  # one export per precision serves every target
            deploy(ctxs[p.name], Runner(ctxs[p.name]), family, p, until="export")
        pending = [p for p, _ in targets]
        for _ in range(len(family.candidates) + 1):  # each round trains at least one more
            shared: dict[Any, dict[str, bytes]] = {}
            tasks = [_task(ctxs[p.name], family, shared) for p in pending]
            wanted: dict[str, str] = {}
            for task, out in executor.map(tasks, allow_unplaceable=True):
                c = ctxs[task.key]
                if isinstance(out, Unplaceable):
                    results[task.key] = f"not measured: {out.reason}"
                    continue
                records, files, notes, results[task.key], wants = out
                _merge(run, records, files)
                for n in notes:
                    c.note(n)
                if wants:
                    wanted[task.key] = wants
                elif not results[task.key]:  # no error on the node: select there, publish here
                    prof = cast("TargetProfile", c.profile)
                    _remember_profile(run, prof, c.dopts)
                    c = replace(c, elsewhere=("select",))
                    attempt(task.key, lambda c=c, p=prof, f=family: decide_and_publish(
                        c, Runner(c), f, p))  # fmt: skip
            if not wanted:
                break
            family = _train_wanted(ctx, ctxs, family, wanted, targets)
            pending = [p for p, _ in targets if p.name in wanted]
        else:
            for name in wanted:
                results[name] = "failed: still choosing untrained candidates after one round each"
    if fleet:
        return fleet_result(ctx, family, targets, results)
    name = targets[0][0].name
    if isinstance(results[name], str):
        fix = "add or fix the node that carries it (README: Running on a fleet), then rerun"
        raise EnvironmentProblem(f"target {name} {results[name]}", fix)
    return cast(JobResult, results[name])


def _train_wanted(
    ctx: JobContext,
    ctxs: dict[str, JobContext],
    family: Family,
    wanted: dict[str, str],
    targets: list[Target],
) -> Family:
    """Train what the targets chose (target -> candidate), once each and fanned out as tasks,
    and export each trained one as every target deploys it (the export stage's maker)."""
    from dcvit_deploy.export.quantize import check_precisions
    from dcvit_deploy.pipeline.job import ArtifactMaker
    from dcvit_deploy.pipeline.units.compressing import train_picks

    family = train_picks(ctx, Runner(ctx), family, sorted(set(wanted.values())))
    for p, d in targets:
        make = ArtifactMaker(Runner(ctxs[p.name]), p)
        for name in sorted(set(wanted.values()) & set(family.trained)):
            for precision in check_precisions(p, d):
                make(family.trained[name], precision, export_only=True)
    for target, name in wanted.items():
        ctx.note(f"{target} chose {name}: trained on the head, then sent again")
    return family


def fleet_result(
    ctx: JobContext, family: Family, targets: list[Target], results: dict[str, Any]
) -> JobResult:
    """The fleet summary (``fleet.json``, ``SUMMARY.md``): per target the chosen artifact, the
    figure it was chosen on and its spread, fidelity, why. Exit 1 when a target was not
    measured, else 3 when nothing fits on one -- after everything is written."""
    run = ctx.run
    rows: dict[str, dict[str, Any]] = {}
    for p, _ in targets:
        r = results.get(p.name, "not measured: interrupted")
        if isinstance(r, str):
            rows[p.name] = {"chosen": None, "why": r, "measured": False}
            continue
        sel = r.selection
        chosen = sel.chosen if sel else None
        out = next((o for o in r.outcomes if o.candidate == chosen and o.artifact), None)
        fig = sel.figures.get(chosen, (None, None)) if sel and chosen else (None, None)
        why = r.infeasible.one_line() if r.infeasible else "no budget: measured only"
        rows[p.name] = {
            "chosen": chosen,
            "artifact": run.rel(out.artifact.path) if out and out.artifact else None,
            "statistic": f"{sel.budget.statistic} at batch {sel.budget.batch_size}" if sel else "",
            "figure_ms": fig[0],
            "spread_ms": fig[1],
            "fidelity": out.fidelity if out else None,
            "why": render(sel, chosen) if sel and chosen else why,
            "published": [f"{m['model']} v{m['version']}" for m in r.published.get("models", [])],
            "measured": True,
        }
    atomic_write_json(run.root / "fleet.json", {"schema": 1, "targets": rows})
    lines = ["# Fleet summary\n", "| target | chosen | figure (ms) | spread | fidelity | why |"]
    lines.append("|---|---|---|---|---|---|")
    for name, row in rows.items():
        nums = [row.get(k) for k in ("figure_ms", "spread_ms", "fidelity")]
        cells = [name, row["chosen"] or "-", *("-" if v is None else f"{v:.4g}" for v in nums)]
        lines.append(f"| {' | '.join(cells)} | {row['why']} |")
    lines.append("\nPer target: `reports/<target>/`; a Triton repository `<repo>/<target>/`.\n")
    atomic_write_text(run.root / "SUMMARY.md", "\n".join(lines))
    result = JobResult(selection=None, outcomes=[], notes=ctx.notes, fleet=rows)
    result.reports = {"fleet": run.root / "fleet.json", "summary": run.root / "SUMMARY.md"}
    missing = [f"{n} ({r['why']})" for n, r in rows.items() if not r["measured"]]
    none_fit = [n for n, r in rows.items() if r["measured"] and r["chosen"] is None]
    if missing:
        result.infeasible = EnvironmentProblem(
            f"{len(missing)} of {len(rows)} targets were not measured: {'; '.join(missing)}",
            "fix or add what they need (README: Running on a fleet), then rerun to resume",
        )
    elif none_fit and ctx.dopts.has_budget:
        result.infeasible = BudgetInfeasible(
            f"no candidate meets the budget on {', '.join(none_fit)}", f"see {run.root}/SUMMARY.md"
        )
    return result
