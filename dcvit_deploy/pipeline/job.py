"""The job: the units in order over one locked run directory.

``compress`` runs family → (per candidate) export → build → profile → select → publish →
report; the stage commands run the tail of that sequence over an existing run. Measure first
(``--train pick``): the family unit builds every structure, those are exported, built and
measured, and selection trains only its picks (``train/<name>``); with ``--train all`` every
candidate is trained right after the family unit and the trained artifacts are measured.
Everything that can be checked is checked before any unit runs (options, paths, profile,
budget, device, targets), and the run directory is locked for the whole job.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dcvit_deploy.errors import NeedsTraining, NotPublished, UserInputError
from dcvit_deploy.export.quantize import structure_of
from dcvit_deploy.pipeline.context import JobContext, identity_of, prepare
from dcvit_deploy.pipeline.executor import LocalExecutor
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.outcomes import check_measured, outcome_of, outcomes_for
from dcvit_deploy.pipeline.result import JobResult
from dcvit_deploy.pipeline.runner import Runner, terminate_as_interrupt
from dcvit_deploy.pipeline.units.building import BuildUnit
from dcvit_deploy.pipeline.units.compressing import (
    FamilyUnit,
    current_family,
    superseded,
    train_picks,
)
from dcvit_deploy.pipeline.units.exporting import ExportUnit, onnx_precision_for
from dcvit_deploy.pipeline.units.measuring import ProfileUnit, check_device
from dcvit_deploy.pipeline.units.publishing import PublishUnit, unpublish_stale
from dcvit_deploy.pipeline.units.quantizing import artifact_plan, quantized
from dcvit_deploy.pipeline.units.selecting import (
    SelectUnit,
    remeasured_of,
    selection_of,
)
from dcvit_deploy.pipeline.view import RunView
from dcvit_deploy.progress import ProgressFn, quiet
from dcvit_deploy.store.rundir import RunDir

if TYPE_CHECKING:
    from dcvit_deploy.config.options import CompressOptions, DeployOptions
    from dcvit_deploy.config.validate import Validated
    from dcvit_deploy.pipeline.units.compressing import Family
    from dcvit_deploy.store.records import Artifact, Candidate, CandidateOutcome, TargetProfile

Until = Literal["export", "build", "profile", "select", "report"]


def check_target(profile: TargetProfile, dopts: DeployOptions) -> None:
    """Everything about the target that can fail before any work: the profile's checks
    (:func:`~dcvit_deploy.config.validate.check_profile`) and the device."""
    from dcvit_deploy.config.validate import check_profile

    check_profile(dopts, profile=profile)
    check_device(profile, dopts.allow_other_device)


def run_job(
    copts: CompressOptions,
    dopts: DeployOptions,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: ProgressFn = quiet,
    stop_after: Literal["family", "deploy"] = "deploy",
    checked: Validated | None = None,
    executor: LocalExecutor | None = None,
) -> JobResult:
    """The main job: family → export/verify → build/verify → profile → select → publish →
    report, on each target of ``dopts.profile`` (:mod:`.fleet`); ``executor`` runs the
    independent work (:mod:`.executor`; default: this process). ``checked``: what
    :func:`~dcvit_deploy.config.validate.validate_run` established (run here when not given):
    the profiles, the checkpoint and the plan are used, not redone."""
    from dcvit_deploy.config.validate import validate_run
    from dcvit_deploy.pipeline.fleet import deploy_fleet

    executor = executor or LocalExecutor()
    deploying = stop_after == "deploy"
    if checked is None:
        stages = ("compress", "deploy") if deploying else ("compress",)
        checked = validate_run(copts, dopts, out, stages=stages, executor=executor.name)
    targets = list(checked.targets) if deploying else []
    for p, d in [] if executor.remote else targets:  # a remote target is checked on its node
        check_device(p, d.allow_other_device)  # the one check validation leaves
    profile = targets[0][0] if targets else None
    prep = prepare(copts, checked.state_dict)
    with (
        terminate_as_interrupt(),
        RunDir.open(out, identity_of(copts, prep), overwrite=overwrite, must_exist=resume) as run,
    ):
        ctx = JobContext(run, copts, dopts, profile, progress, _prep=prep, executor=executor)
        for n in [*run.notes, prep.images_note, prep.holdout_note]:
            if n:
                ctx.note(n)
        run.set_inputs(
            compress_options=json.loads(json.dumps(asdict(copts), default=str)),
            deploy_options=asdict(dopts),
            fleet=[p.name for p, _ in targets] if len(targets) > 1 else [],
        )
        runner = Runner(ctx)
        runner.run(FamilyUnit())
        family = current_family(run)
        if family.train_all:
            if copts.train == "pick":
                ctx.note("this procedure's targets build on each other: every one is trained")
            family = train_picks(ctx, runner, family, family.names)
        skipped = family.info.get("skipped_summary", "")
        if skipped:
            ctx.note(str(skipped))
        if profile is None:
            result = JobResult(selection=None, outcomes=[], notes=list(ctx.notes))
        elif len(targets) == 1 and not executor.remote:
            result = deploy(ctx, runner, family, profile)
        else:
            result = deploy_fleet(ctx, family, targets, executor)
        result.skipped_images = list(family.info.get("skipped_images", []))
        return result


def deploy(
    ctx: JobContext,
    runner: Runner,
    family: Family,
    profile: TargetProfile,
    *,
    until: Until | None = None,
    publish: bool = True,
) -> JobResult:
    """Export, build, profile, select, publish and report the current family on ``profile``
    (``publish=False``: stop after selecting, as a target's node does)."""
    from dcvit_deploy.export.quantize import check_precisions
    from dcvit_deploy.selection.decide import capacity_order

    run = ctx.run
    ctx = ctx.with_profile(profile)
    runner = Runner(ctx)
    precisions = check_precisions(profile, ctx.dopts)
    artifacts: dict[str, Artifact] = {}
    make = ArtifactMaker(runner, profile)
    # --search bisect makes (exports, quantizes, builds) only the artifacts it measures
    searching = ctx.dopts.search == "bisect" and ctx.dopts.has_budget and until is None
    pending: dict[str, tuple[Candidate, str]] = {}
    for cand, p, name in artifact_plan(family, profile, precisions):
        rec = family.measured(cand.name)  # None: not trained (training everything)
        if rec and searching:
            pending[name] = (rec, p)
        elif rec and (artifact := make(rec, p, export_only=until == "export")):
            artifacts[name] = artifact
    result = JobResult(selection=None, outcomes=[], notes=ctx.notes)
    result.superseded = superseded(run, family)
    if until in ("export", "build"):
        result.outcomes = capacity_order(outcomes_for(run, family, profile, precisions))
        return result
    bisect = None
    if searching:
        from dcvit_deploy.pipeline.units.measuring import BisectPlan

        bisect = BisectPlan(ctx.dopts, profile, family, pending, make)
    from dcvit_deploy.store.records import PRECISION_BITS

    order = [n for _, _, n in sorted(artifact_plan(family, profile, precisions),
             key=lambda t: (-t[0].retained, -PRECISION_BITS[t[1]], t[2]))]  # fmt: skip
    runner.run(ProfileUnit(profile, artifacts, order, bisect=bisect))
    _remember_profile(run, profile, ctx.dopts)
    return decide_and_publish(ctx, runner, family, profile, publish=publish)


class ArtifactMaker:
    """Make one profile's artifact of a record at a precision: export (once per record and
    graph precision), quantize, build, each verified against PyTorch; a failed step skips the
    steps after it. ``methods``: the CPU's quantization method per precision, measured once
    per run and profile."""

    def __init__(self, runner: Runner, profile: TargetProfile) -> None:
        self.runner, self.profile = runner, profile
        self.exported: dict[tuple[str, str], bool] = {}
        measured = profile.quantize.method == "auto"  # measured once per run and profile
        self.methods = RunView(runner.ctx.run).quantize_methods(profile.name) if measured else {}

    def __call__(self, rec: Candidate, p: str, *, export_only: bool = False) -> Artifact | None:
        from dcvit_deploy.export.quantize import QUANTIZED, artifact_name

        runner, profile, view = self.runner, self.profile, RunView(self.runner.ctx.run)
        src, name = onnx_precision_for(p), artifact_name(rec.key, p, profile.precision)
        after = [UnitId("quantize", profile.name, p, rec.key)] * (p in QUANTIZED)

        def fail(why: str, skipped: list[UnitId] = after) -> Artifact | None:
            for uid in [*skipped, UnitId("build", profile.name, name=name)]:
                runner.skip(str(uid), why)
            return None

        if (src, rec.key) not in self.exported:
            self.exported[src, rec.key] = runner.run(ExportUnit(rec, src)).ok
        if not self.exported[src, rec.key]:
            return fail("export failed")
        onnx_path, verification = view.graph(UnitId("export", precision=src, name=rec.key))
        if export_only:
            return None
        if onnx_path is None or verification is None or not verification.passed:
            return fail("ONNX verification failed")
        if p in QUANTIZED:
            onnx_path = quantized(runner, rec, p, profile, onnx_path, self.methods)
            if onnx_path is None:
                return fail("quantization failed", [])
        target = dataclasses.replace(profile, precision=p)  # type: ignore[arg-type]
        if runner.run(BuildUnit(rec, target, onnx_path, name)).ok:
            artifact, built, _ = view.built(profile.name, name)
            if artifact is not None and built is not None and built.passed:
                return artifact
        return None


def _picker(
    ctx: JobContext, runner: Runner, family: Family, profile: TargetProfile
) -> Callable[[str], CandidateOutcome | str]:
    """Measure-first selection's ``pick(name)`` (an artifact: candidate and precision): train
    the candidate (reused when trained before), make, verify and measure the fidelity of its
    trained artifact at that precision and check the floors; its outcome (with the
    structure's figures), or why it cannot ship."""
    from dcvit_deploy.selection.fidelity import apply_floors

    outcomes = {o.candidate: o for o in outcomes_for(ctx.run, family, profile)}
    make = ArtifactMaker(runner, profile)

    def pick(name: str) -> CandidateOutcome | str:
        cand, p = structure_of(name), outcomes[name].precision or profile.precision
        if "train" in ctx.elsewhere and cand not in current_family(ctx.run).trained:
            done = RunView(ctx.run).record(UnitId("train", name=cand)) or {}
            if done.get("status") != "failed":  # a target's node never trains: the head does
                raise NeedsTraining(cand)
        rec = train_picks(ctx, runner, family, [cand]).trained.get(cand)
        if rec is None:
            why = (RunView(ctx.run).record(UnitId("train", name=cand)) or {}).get("reason", "")
            return f"training failed: {why}"
        make(rec, p)
        fam = current_family(ctx.run)
        got = outcome_of(ctx.run, fam, profile, name, None, rec=rec, precision=p)
        if got.artifact is None or got.verification is None or not got.verification.passed:
            return f"the trained artifact did not verify: {got.error or got.status}"
        if got.fidelity is None:
            return "the trained model's outputs are not finite on the held-out images"
        got = dataclasses.replace(got, status="ok", latency=outcomes[name].latency)
        (got,), notes = apply_floors([got], ctx.dopts)
        for line in notes:
            ctx.note(line)
        return got if got.status == "ok" else f"trained artifact below the floor: {got.error}"

    return pick


def _remember_profile(run: RunDir, profile: TargetProfile, dopts: DeployOptions) -> None:
    """Record the profiles this run was measured with (the last one is the run's current),
    where each came from and the precisions it was measured at."""
    from dcvit_deploy.export.quantize import check_precisions

    inputs = RunView(run).inputs
    measured = [p for p in inputs.get("profiles", []) if p != profile.name]
    sources = {**inputs.get("profile_sources", {}), profile.name: dopts.profile}
    tried = {**inputs.get("precisions", {}), profile.name: check_precisions(profile, dopts)}
    run.set_inputs(profiles=[*measured, profile.name], profile_sources=sources, precisions=tried)


def decide_and_publish(
    ctx: JobContext,
    runner: Runner,
    family: Family,
    profile: TargetProfile,
    *,
    render: bool = False,
    publish: bool = True,
) -> JobResult:
    """Select (pure, confirmed), publish to Triton, write the reports. ``render``: decide and
    publish nothing, report what the run recorded (a decision made on these outcomes);
    ``publish=False``: stop after selecting, as a target's node does."""
    from dcvit_deploy.selection.decide import capacity_order, infeasible_error
    from dcvit_deploy.selection.fidelity import apply_floors

    run, view = ctx.run, RunView(ctx.run)
    outcomes = outcomes_for(run, family, profile, ctx.dopts.precisions or ())
    if family.train_all:  # else a structure's fidelity says nothing: its trained pick is judged
        outcomes, undecided = apply_floors(outcomes, ctx.dopts)
        for line in undecided:
            ctx.note(line)
    outcomes = capacity_order(outcomes)
    result = JobResult(selection=None, outcomes=outcomes, notes=ctx.notes)
    result.superseded = superseded(run, family)
    res: dict[str, Any] | None = None
    if render:  # the recorded decision, if it was made on these outcomes
        unit = SelectUnit(profile, outcomes)
        res = view.result(UnitId("select", profile=profile.name))
        if res is not None and res.get("decided_on") != unit.inputs(ctx)["outcomes"]:
            ctx.note("the recorded choice was made on other measurements: run select again")
            res = None
    elif ctx.dopts.has_budget:
        check_measured(run, profile, outcomes)
        pick = ids = None
        if not family.train_all:
            pick = _picker(ctx, runner, family, profile)
            ids = {c.name: c.recipe.get("fingerprint") for c in family.candidates}
        res = runner.run(SelectUnit(profile, outcomes, pick, ids)).result
    if res is not None:
        result.selection, result.budget = selection_of(res), dict(res.get("budget", {}))
        fresh = {(n, s.batch_size): s for n, st in remeasured_of(res).items() for s in st}
        result.outcomes = [  # the report shows the figures the decision was made on
            replace(o, latency=tuple(fresh.get((o.candidate, s.batch_size), s) for s in o.latency))
            for o in outcomes
        ]
    if not family.train_all:  # the chosen as its trained artifact; which others are trained
        family, trained = current_family(run), remeasured_of(res or {}, "trained")

        def final(o: CandidateOutcome) -> CandidateOutcome:
            t = family.trained.get(cand := structure_of(o.candidate))
            if o.candidate in trained and t:
                stats = trained[o.candidate]
                return outcome_of(run, family, profile, o.candidate, stats, rec=t,
                                  precision=o.precision)  # fmt: skip
            return replace(o, trained=t is not None, fidelity=family.fidelity(cand, t is not None))

        result.outcomes = [final(o) for o in result.outcomes]
    if not publish:
        return result
    sel = result.selection
    if render:
        done = view.result(UnitId("publish", profile=profile.name)) or {}
        models = done.get("models")
        if sel is not None and models and models[0]["candidate"] == sel.chosen:
            result.published = done
    elif sel is not None and sel.chosen is not None:
        assert family.train_all or structure_of(sel.chosen) in family.trained, "a structure"
        pub = runner.run(PublishUnit(profile, sel, result.outcomes, family))
        result.published = pub.result
        result.triton = Path(pub.result["repository"]) if pub.ok else None
        if not pub.ok:
            result.not_published = NotPublished(
                f"{sel.chosen} was chosen but not published to Triton: {pub.reason}"
            )
    elif sel is not None:
        result.infeasible = infeasible_error(sel, result.outcomes)
        removed = unpublish_stale(ctx)
        if removed:
            ctx.note(f"removed this run's versions of {removed} from its Triton repository")
    from dcvit_deploy.pipeline.units.reporting import write_run_reports

    result.reports = write_run_reports(ctx, family, profile, result)
    return result


# ----------------------------------------------------------------- commands over an existing run


def reopen(out: str | Path, *, lock: bool = True) -> tuple[RunDir, CompressOptions]:
    """An existing run and the compression options it was made with."""
    run = RunDir.load(out, lock=lock)
    try:
        return run, RunView(run).compress_options()
    except BaseException:
        run.close()
        raise


def stage_job(
    out: str | Path,
    dopts: DeployOptions,
    *,
    until: Until,
    progress: ProgressFn = quiet,
    profile_given: bool = True,
) -> JobResult:
    """``export``/``build``/``profile``/``select`` over an existing run's current family."""
    from dcvit_deploy.config.profiles import load_profile

    run, copts = reopen(out)
    with terminate_as_interrupt(), run:
        view = RunView(run)
        name = dopts.profile if profile_given else view.profile_source(view.current_profile())
        profile = load_profile(name)
        if until not in ("export", "report"):
            check_target(profile, dopts)
        family = current_family(run)
        deployed = view.inputs.get("deploy_options") or {}
        dopts = dataclasses.replace(  # where the run was deployed, unless given now
            dopts,
            triton_repo=dopts.triton_repo or deployed.get("triton_repo"),
            triton_model_name=dopts.triton_model_name or deployed.get("triton_model_name"),
        )
        if until == "select":
            profile = measured_profile(run, profile, given=name if profile_given else None)
        ctx = JobContext(run, copts, dopts, profile, progress)
        runner = Runner(ctx)
        if until in ("select", "report"):
            if not view.record(UnitId("profile", profile=profile.name)):
                raise UserInputError(
                    f"{out} has not been measured on profile {profile.name}",
                    "run `dcvit-deploy profile` first, or pass the --profile it was measured with",
                )
            if until == "select" and dopts.search == "bisect":  # this budget's own search
                return deploy(ctx, runner, family, profile)  # (what was measured is reused)
            return decide_and_publish(ctx, runner, family, profile, render=until == "report")
        return deploy(ctx, runner, family, profile, until=None if until == "profile" else until)


def measured_profile(run: RunDir, profile: TargetProfile, *, given: str | None) -> TargetProfile:
    """The profile content the run's figures on ``profile.name`` were measured with (what a
    decision and the served config use); a ``--profile`` given now must be that content."""
    from dcvit_deploy.store.records import TargetProfile, from_dict, to_dict

    rec = RunView(run).record(UnitId("profile", profile=profile.name))
    if not rec:
        raise UserInputError(
            f"{run.root} has not been measured on profile {profile.name}",
            "run `dcvit-deploy profile` first, or pass the --profile it was measured with",
        )
    was = (rec.get("result") or {}).get("profile")
    if was is None:  # measured before the profile content was recorded
        return profile
    now = to_dict(profile)
    if given and now != was:
        changed = ", ".join(sorted(k for k in {**was, **now} if was.get(k) != now.get(k)))
        raise UserInputError(
            f"profile {given} ({profile.name}) differs in {changed} from the {profile.name} "
            f"the figures of {run.root} were measured with",
            f"measure with it first (`dcvit-deploy profile --out {run.root} --profile {given}`)"
            ", or drop --profile to use the measured one",
        )
    return from_dict(TargetProfile, was)


def status_of(out: str | Path) -> dict[str, Any]:
    """Units, candidates and outputs of a run, read without taking its lock."""
    from dcvit_deploy.pipeline.runner import outputs_problem

    run = RunDir.load(out, lock=False)
    view = RunView(run)
    units = {}
    for uid, rec in view.records().items():
        status = rec.get("status")
        if status == "ok":
            problem = outputs_problem(run, rec.get("outputs", {}))
            if problem:
                status = f"stale ({problem})"
        units[str(uid)] = {"status": status, "reason": rec.get("reason", "")}
    try:
        family = current_family(run)
        names = list(family.names)
        gone = superseded(run, family)
        trained = [n for n, c in family.trained.items() if c.method != "original"]
    except UserInputError as exc:
        names, gone, trained = [], [], []
        units.setdefault("family", {"status": "not ok", "reason": exc.one_line()})
    outcomes: dict[str, dict[str, str]] = {}
    measured_on: dict[str, dict[str, str]] = {}
    if names:
        from dcvit_deploy.config.profiles import load_profile

        for name in view.profiles:
            try:
                prof = load_profile(view.profile_source(name))
            except UserInputError:
                continue
            found = outcomes_for(run, family, prof)
            outcomes[name] = {o.candidate: o.status for o in found}
            measured_on[name] = {o.candidate: o.measured_on for o in found if o.latency}
    return {
        "run": str(run.root),
        "identity": view.identity,
        "units": units,
        "outcomes": outcomes,
        "family": names,
        "trained": trained,
        "measured_on": measured_on,
        "superseded": gone,
        "profiles": view.profiles,
    }
