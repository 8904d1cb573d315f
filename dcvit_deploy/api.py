"""The Python API: one function per pipeline stage, and the whole pipeline.

The CLI is a thin shell over these. Every stage works on a :class:`~dcvit_deploy.rundir.RunDir`
and skips work whose inputs' fingerprint is unchanged, so rerunning a command resumes it.
One candidate's export/build/profile failure is recorded in its outcome and the run goes on.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from .atomic import atomic_write_json, fingerprint, sha256_file
from .errors import BudgetInfeasible, DcvitError, UserInputError
from .progress import ProgressEvent, ProgressFn, quiet
from .records import (
    Artifact,
    Candidate,
    CandidateOutcome,
    LatencyBudget,
    LatencyStats,
    Selection,
    TargetProfile,
    Verification,
    from_dict,
    to_dict,
)
from .options import CompressOptions, DeployOptions
from .rundir import RunDir

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .data import DataOverrides
    from .records import OutcomeStatus

# =========================================================================== helpers


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError(
            "--device cuda was asked for but torch sees no CUDA device", "use --device cpu"
        )
    return name


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def identity_of(opts: CompressOptions) -> dict[str, Any]:
    """The run's identity: the model and its weights (see :mod:`dcvit_deploy.rundir`)."""
    if opts.checkpoint:
        weights = (
            sha256_file(opts.checkpoint)
            if Path(opts.checkpoint).is_file()
            else f"missing:{opts.checkpoint}"
        )
    elif opts.pretrained_cache:
        weights = "hub-cache"
    else:
        weights = "random-init"
    return {"model": opts.model, "weights": weights, "model_kwargs": opts.model_kwargs}


def budget_of(profile: TargetProfile, opts: DeployOptions) -> LatencyBudget | None:
    if opts.latency_ms is None:
        return None
    batch = opts.batch_size or profile.budget_batch_size
    if batch not in profile.batch_sizes:
        raise UserInputError(
            f"--batch-size {batch} is not one of the profile's batch sizes "
            f"{list(profile.batch_sizes)}",
            "pick one of them or edit the profile's batch_sizes",
        )
    try:
        return LatencyBudget(
            ms=opts.latency_ms,
            statistic=opts.statistic or profile.statistic,  # type: ignore[arg-type]
            batch_size=batch,
            margin=opts.margin,
        )
    except ValueError as exc:
        raise UserInputError(
            f"invalid latency budget: {exc}", "see --latency-ms, --statistic, --margin"
        ) from exc


# =========================================================================== compress


@dataclass
class Prepared:
    """Loaded teacher, data and held-out images shared by the stages of one process."""

    teacher: nn.Module
    model_kwargs: dict[str, Any]
    data_config: dict[str, Any]
    train_paths: list[Path]
    holdout: torch.Tensor
    holdout_note: str
    input_fp: str


def prepare(opts: CompressOptions) -> Prepared:
    """Load the model (from local weights only) and the few-shot images; split a held-out set."""
    import random

    from .data import input_fingerprint as data_fp
    from .data import list_images, load_eval_tensor, resolve_data_config, sample_images
    from .models import geometry_kwargs, load_model

    images = list_images(opts.data)  # fail fast on bad data before loading the model
    loaded = load_model(
        opts.model,
        checkpoint=opts.checkpoint,
        model_kwargs=opts.model_kwargs,
        pretrained_cache=opts.pretrained_cache,
        random_init=opts.random_init,
    )
    kwargs = {**loaded.model_kwargs, **geometry_kwargs(loaded.model)}
    dcfg = resolve_data_config(loaded.model, opts.data_overrides)
    all_paths = list(images)
    train = sample_images(all_paths, opts.num_samples, opts.seed)
    chosen = set(train)
    rest = [p for p in all_paths if p not in chosen]
    random.Random(opts.seed + 1).shuffle(rest)
    note = ""
    if not rest:
        rest = list(train)
        note = (
            "no images left over for a held-out set: fidelity and verification use training images"
        )
    holdout = load_eval_tensor(rest, dcfg, max_images=opts.holdout)
    return Prepared(
        teacher=loaded.model,
        model_kwargs=kwargs,
        data_config=dict(dcfg),
        train_paths=train,
        holdout=holdout,
        holdout_note=note,
        input_fp=data_fp(train),
    )


def _schedules(opts: CompressOptions, n_images: int) -> tuple[Any, Any]:
    from .compress.finetune import FinetuneSchedule

    if opts.schedule == "paper":
        sched = FinetuneSchedule.paper(n_images, batch_size=opts.batch_size or 64)
    elif opts.schedule == "tiny":
        sched = FinetuneSchedule.tiny(batch_size=opts.batch_size or 4)
    else:
        sched = FinetuneSchedule.default(n_images, batch_size=opts.batch_size or 64)
    changes: dict[str, Any] = {}
    if opts.iterations is not None:
        changes["iterations"] = opts.iterations
        changes["lr_warmup_iterations"] = min(sched.lr_warmup_iterations, opts.iterations)
    if opts.lr is not None:
        changes["lr"] = opts.lr
    sched = dataclasses.replace(sched, **changes)
    rank = None
    if opts.rank_iterations is not None:
        rank = dataclasses.replace(
            sched,
            iterations=opts.rank_iterations,
            lr_warmup_iterations=min(sched.lr_warmup_iterations, opts.rank_iterations),
        )
    return sched, rank


def compress(
    run: RunDir, opts: CompressOptions, prep: Prepared | None = None, progress: ProgressFn = quiet
) -> list[Candidate]:
    """Step 1: the dense family (DC-ViT or PRACTISE) in ``run/family``, plus per-candidate
    fidelity (top-1 agreement with the original on held-out images)."""
    from .compress.family import FamilyConfig, compress_family, load_family
    from .compress.finetune import train_transform
    from .compress.metric_set import InversionSettings, load_or_synthesize, real_metric_set
    from .data import FewShotImages

    fp = fingerprint({"opts": _opts_dict(opts), "versions": _versions()})
    if run.step_done("compress", fp):
        return load_family(run.family_dir)
    prep = prep or prepare(opts)
    device = _device(opts.device)
    sched, rank = _schedules(opts, len(prep.train_paths))
    dataset = FewShotImages(prep.train_paths, train_transform(sched, prep.data_config))
    run.set_inputs(
        model=opts.model,
        checkpoint=opts.checkpoint,
        data=str(opts.data),
        images=len(dataset),
        skipped_images=[f"{p}: {r}" for p, r in dataset.skipped],
        holdout=int(prep.holdout.shape[0]),
        holdout_note=prep.holdout_note,
        data_fingerprint=prep.input_fp,
        versions=_versions(),
    )
    # The run identity already holds the weights fingerprint: never hash a checkpoint twice.
    teacher_fp = run.manifest["identity"]["weights"]
    with run.step("compress", fp) as info:
        if opts.metric == "real":
            metric = real_metric_set(prep.holdout)
        else:
            settings = (
                InversionSettings.paper() if opts.inversion == "paper" else InversionSettings.fast()
            )
            if opts.inversion_iterations is not None:
                settings = dataclasses.replace(
                    settings,
                    iterations=opts.inversion_iterations,
                    warmup_iterations=min(
                        settings.warmup_iterations, opts.inversion_iterations // 2
                    ),
                )

            def inv_progress(p: Any) -> None:
                progress(
                    ProgressEvent(
                        stage="metric set",
                        step=p.step,
                        steps=p.total,
                        loss=p.loss,
                        eta_s=getattr(p, "eta", None),
                    )
                )

            metric = load_or_synthesize(
                run.sub("metric_set"),
                str(teacher_fp),
                prep.teacher,
                prep.data_config["input_size"],
                prep.data_config["mean"],
                prep.data_config["std"],
                settings,
                seed=opts.seed,
                device=device,
                progress=inv_progress,
            )
        config = FamilyConfig(
            schedule=sched,
            rank_schedule=rank,
            targets=tuple(opts.targets),
            method=opts.methods[0],
            round_to=opts.round_to,
            candidate_blocks=opts.candidate_blocks,
            neuron_choice=opts.neuron_choice,
            reuse=opts.reuse,
            warm_fraction=opts.warm_fraction,
            seed=opts.seed,
            include_original=opts.include_original,
        )
        result = compress_family(
            prep.teacher,
            model_name=opts.model,
            model_kwargs=prep.model_kwargs,
            data=dataset,
            metric_images=metric.images,
            out_dir=run.family_dir,
            config=config,
            teacher_fingerprint=str(teacher_fp),
            input_fingerprint=prep.input_fp,
            activation_images=prep.holdout if opts.neuron_choice == "activation" else None,
            device=device,
            progress=progress,
        )
        _record_fidelity(run, result.candidates, prep)
        info.update(
            candidates=[c.name for c in result.candidates],
            seconds_detail=result.seconds,
            finetune_steps=result.finetune_steps,
            metric_set=metric.source,
        )
    return result.candidates


def _opts_dict(opts: CompressOptions) -> dict[str, Any]:
    d = dataclasses.asdict(opts)
    d.pop("device")  # where finetuning ran does not change what the run is
    return d


def _record_fidelity(run: RunDir, candidates: Sequence[Candidate], prep: Prepared) -> None:
    import torch

    from .compress.candidate import build_candidate

    holdout = prep.holdout
    with torch.no_grad():
        ref = prep.teacher.cpu().eval()(holdout).argmax(-1)
        for c in candidates:
            model = build_candidate(c, run.family_dir / c.weights)
            agree = float((model(holdout).argmax(-1) == ref).float().mean())
            run.mark_candidate(
                c.name,
                "fidelity",
                "ok",
                c.weights_sha256,
                top1_agreement=agree,
                images=int(holdout.shape[0]),
            )


# =========================================================================== per-candidate deploy


def _fail(
    run: RunDir, cand: Candidate, status: OutcomeStatus, exc: BaseException, **extra: Any
) -> CandidateOutcome:
    log = run.log(cand.name, f"{status}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    msg = exc.one_line() if isinstance(exc, DcvitError) else f"{type(exc).__name__}: {exc}"
    outcome = CandidateOutcome(
        candidate=cand.name,
        method=cand.method,
        retained=cand.retained,
        macs=cand.macs,
        status=status,
        error=f"{msg} (log: {log.relative_to(run.root)})",
        **extra,
    )
    return outcome


def _save_outcome(run: RunDir, outcome: CandidateOutcome, profile: str) -> None:
    """Persist a measured (or failed) outcome under ``outcomes/<profile>/`` -- one directory per
    target, so measurements for different targets never mix."""
    atomic_write_json(
        run.sub(f"outcomes/{profile}") / f"{outcome.candidate}.json", to_dict(outcome)
    )


def load_outcomes(run: RunDir, profile: str) -> list[CandidateOutcome]:
    d = run.root / "outcomes" / profile
    if not d.is_dir():
        return []
    return [
        from_dict(CandidateOutcome, json.loads(p.read_text())) for p in sorted(d.glob("*.json"))
    ]


def _fidelity(run: RunDir, name: str) -> float | None:
    s = run.candidate_stage(name, "fidelity")
    return float(s["top1_agreement"]) if s else None


def export_candidate(
    run: RunDir, cand: Candidate, images: torch.Tensor, profile: TargetProfile, opts: DeployOptions
) -> tuple[Path, Verification]:
    """Export to ONNX (plus an FP16 graph for FP16 profiles) and verify the deployed file with
    ONNX Runtime CPU against PyTorch on held-out images."""
    from .compress.candidate import build_candidate
    from .export import export_onnx, verify_onnx

    fp = fingerprint(
        {
            "w": cand.weights_sha256,
            "opset": opts.opset,
            "simplify": opts.simplify,
            "precision": profile.precision,
            "img": float(images.sum()),
        }
    )
    onnx_dir = run.sub("onnx")
    path = onnx_dir / f"{cand.name}.onnx"
    done = run.stage_done(cand.name, "export", fp)
    if done and path.is_file():
        return run.root / done["path"], from_dict(Verification, done["verification"])
    model = build_candidate(cand, run.family_dir / cand.weights)
    input_shape = tuple(int(v) for v in images.shape[1:])
    common: dict[str, Any] = {
        "input_shape": input_shape,
        "opset": opts.opset,
        "simplify": opts.simplify,
    }
    export_onnx(model, path, **common)
    verification = verify_onnx(model, path, images)
    deploy_path = path
    if profile.precision == "fp16" and verification.passed:
        # The deployed graph is the FP16 one: verify *it* (FP16 ViTs can overflow in LayerNorm
        # or attention); its thresholds come from the file's precision.
        deploy_path = onnx_dir / f"{cand.name}.fp16.onnx"
        export_onnx(model, deploy_path, precision="fp16", **common)
        verification = verify_onnx(model, deploy_path, images)
    run.mark_candidate(
        cand.name,
        "export",
        "ok",
        fp,
        path=str(deploy_path.relative_to(run.root)),  # relative: a moved run still resumes
        verification=to_dict(verification),
    )
    return deploy_path, verification


def evaluate_candidate(
    run: RunDir,
    cand: Candidate,
    profile: TargetProfile,
    opts: DeployOptions,
    images: torch.Tensor,
    *,
    until: Literal["export", "build", "profile"] = "profile",
    progress: ProgressFn = quiet,
) -> CandidateOutcome:
    """Export, verify, build and profile one candidate (each step cached by fingerprint).

    Never raises for a candidate's own failure: the outcome records it (and a log file). Measured
    and failed outcomes are persisted per profile; ``until`` stops early without persisting.
    """
    outcome = _evaluate(run, cand, profile, opts, images, until=until, progress=progress)
    if outcome.status != "not_measured":
        _save_outcome(run, outcome, profile.name)
    return outcome


def _evaluate(
    run: RunDir,
    cand: Candidate,
    profile: TargetProfile,
    opts: DeployOptions,
    images: torch.Tensor,
    *,
    until: Literal["export", "build", "profile"] = "profile",
    progress: ProgressFn = quiet,
) -> CandidateOutcome:
    from .backends import get_backend

    base: dict[str, Any] = {
        "candidate": cand.name,
        "method": cand.method,
        "retained": cand.retained,
        "macs": cand.macs,
        "fidelity": _fidelity(run, cand.name),
    }
    progress(ProgressEvent(stage=f"export {cand.name}"))
    try:
        onnx_path, verification = export_candidate(run, cand, images, profile, opts)
    except DcvitError as exc:
        return _fail(run, cand, "export_failed", exc, fidelity=base["fidelity"])
    except Exception as exc:  # exporter internals raise anything; recorded, not fatal
        return _fail(run, cand, "export_failed", exc, fidelity=base["fidelity"])
    if not verification.passed:
        outcome = CandidateOutcome(
            **base,
            status="verify_failed",
            verification=verification,
            error=f"verification failed: {verification.reason}",
        )
        return outcome
    if until == "export":  # not persisted: the outcome file holds the latest measured result
        return CandidateOutcome(**base, status="not_measured", verification=verification)
    backend = get_backend(profile.backend)
    build_fp = fingerprint({"onnx": sha256_file(onnx_path), "profile": to_dict(profile)})
    progress(ProgressEvent(stage=f"build {cand.name}", message=profile.backend))
    done = run.stage_done(cand.name, "build", build_fp)
    try:
        if done:
            artifact = from_dict(Artifact, done["artifact"])
        else:
            model = None
            if getattr(backend, "needs_module", False):
                from .compress.candidate import build_candidate

                model = build_candidate(cand, run.family_dir / cand.weights)
            artifact = backend.build(
                onnx_path,
                profile,
                run.sub(f"artifacts/{profile.name}"),
                candidate=cand.name,
                timing_cache=run.root / "artifacts" / f"{profile.name}.timing.cache",
                model=model,
            )
            run.mark_candidate(cand.name, "build", "ok", build_fp, artifact=to_dict(artifact))
    except Exception as exc:
        return _fail(
            run, cand, "build_failed", exc, verification=verification, fidelity=base["fidelity"]
        )
    if until == "build":
        return CandidateOutcome(
            **base, status="not_measured", verification=verification, artifact=artifact
        )
    stats: list[LatencyStats] = []
    try:
        from .envinfo import capture_environment

        env_fp = fingerprint(
            {
                k: v
                for k, v in capture_environment().items()
                if k in ("cpu", "cuda", "device", "gpu")
            }
        )
        for b in profile.batch_sizes:
            prof_fp = fingerprint(
                {"a": artifact.sha256, "b": b, "m": to_dict(profile.measure), "env": env_fp}
            )
            stage = f"profile_b{b}"
            done_p = run.stage_done(cand.name, stage, prof_fp)
            if done_p:
                stats.append(from_dict(LatencyStats, done_p["stats"]))
                continue
            progress(ProgressEvent(stage=f"profile {cand.name}", message=f"batch {b}"))
            s = backend.measure(
                artifact, profile, b, raw_path=run.sub("raw") / f"{cand.name}-b{b}.json"
            )
            run.mark_candidate(cand.name, stage, "ok", prof_fp, stats=to_dict(s))
            stats.append(s)
    except Exception as exc:
        return _fail(
            run,
            cand,
            "profile_failed",
            exc,
            verification=verification,
            artifact=artifact,
            fidelity=base["fidelity"],
            latency=tuple(stats),
        )
    outcome = CandidateOutcome(
        **base, status="ok", verification=verification, latency=tuple(stats), artifact=artifact
    )
    return outcome


# =========================================================================== select, triton, report


@dataclass
class PipelineResult:
    selection: Selection | None
    outcomes: list[CandidateOutcome]
    reports: dict[str, Path]
    triton: Path | None
    infeasible: BudgetInfeasible | None = None


def deploy(
    run: RunDir,
    candidates: Sequence[Candidate],
    profile: TargetProfile,
    opts: DeployOptions,
    images: torch.Tensor,
    *,
    progress: ProgressFn = quiet,
) -> PipelineResult:
    """Steps 2-5 over a family: evaluate (all, or bisect), select, write Triton repo + reports."""
    from .select import bisect_search, capacity_order, decide, infeasible_error

    backend_check(profile)
    budget = budget_of(profile, opts)
    by_name = {c.name: c for c in candidates}
    outcomes: dict[str, CandidateOutcome] = {}
    items = len(candidates)

    def measure_one(name: str) -> CandidateOutcome:
        progress(ProgressEvent(stage="deploy", item=len(outcomes) + 1, items=items, message=name))
        o = evaluate_candidate(run, by_name[name], profile, opts, images, progress=progress)
        outcomes[name] = o
        return o

    selection: Selection | None = None
    if budget is not None and opts.search == "bisect":
        order = [c.name for c in sorted(candidates, key=lambda c: (-c.retained, c.name))]
        selection, _measured = bisect_search(order, measure_one, budget)
        for c in candidates:
            if c.name not in outcomes:
                outcomes[c.name] = CandidateOutcome(
                    candidate=c.name,
                    method=c.method,
                    retained=c.retained,
                    macs=c.macs,
                    status="not_measured",
                    fidelity=_fidelity(run, c.name),
                )  # reported for this run only: never overwrites an earlier measurement
    else:
        for c in sorted(candidates, key=lambda c: (-c.retained, c.name)):
            measure_one(c.name)
        if budget is not None:
            selection = decide(outcomes.values(), budget, search="all")
    ordered = capacity_order(outcomes.values())
    infeasible = None
    if selection is not None and selection.chosen is None:
        infeasible = infeasible_error(selection, ordered)
    triton_path = None
    if selection is not None and selection.chosen is not None:
        triton_path = write_triton(run, selection, ordered, profile, opts)
    reports = write_run_reports(run, ordered, selection, profile)
    return PipelineResult(
        selection=selection,
        outcomes=ordered,
        reports=reports,
        triton=triton_path,
        infeasible=infeasible,
    )


def backend_check(profile: TargetProfile) -> None:
    """Fail early, with the backend's reason and fix, when the profile cannot run here."""
    from .backends import get_backend

    backend = get_backend(profile.backend)
    backend.validate_profile(profile)
    backend.availability(profile).require(profile.backend)


def write_triton(
    run: RunDir,
    selection: Selection,
    outcomes: Sequence[CandidateOutcome],
    profile: TargetProfile,
    opts: DeployOptions,
) -> Path:
    from .select import pareto_front
    from .triton import write_model_repository

    repo = Path(opts.triton_repo) if opts.triton_repo else run.root / "triton"
    names = [selection.chosen] if selection.chosen else []
    if opts.triton_pareto:
        front = pareto_front(outcomes, selection.budget.batch_size, selection.budget.statistic)
        names += [o.candidate for o in front if o.candidate not in names]
    by_name = {o.candidate: o for o in outcomes}
    for name in names:
        o = by_name[name]
        if o.artifact is None:
            continue
        write_model_repository(
            repo,
            f"dcvit_{name.replace('-', '_')}",
            o.artifact,
            max_batch_size=profile.max_batch,
            preferred_batch_sizes=list(profile.batch_sizes),
            kind="KIND_GPU" if profile.device == "cuda" else "KIND_CPU",
            latency=o.latency_at(selection.budget.batch_size),
            source_candidate=name,
        )
    return repo


def write_run_reports(
    run: RunDir,
    outcomes: Sequence[CandidateOutcome],
    selection: Selection | None,
    profile: TargetProfile,
) -> dict[str, Path]:
    from .envinfo import capture_environment
    from .report import write_reports

    meta = {
        "run_dir": run.root.name,
        "identity": run.manifest.get("identity"),
        "inputs": run.manifest.get("inputs"),
    }
    return write_reports(
        run.root,
        run_meta=meta,
        outcomes=list(outcomes),
        selection=selection,
        profile_dict=to_dict(profile),
        env_dict=capture_environment(),
    )


# =========================================================================== the whole job


def run_pipeline(
    copts: CompressOptions,
    dopts: DeployOptions,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: ProgressFn = quiet,
    stop_after: Literal["compress", "deploy"] = "deploy",
) -> PipelineResult:
    """The main job: compress → export/verify → build → profile → select → Triton + reports."""
    from .profiles import load_profile

    profile = None
    if stop_after == "deploy":  # validate profile, budget and backend before hours of work
        profile = load_profile(dopts.profile)
        budget_of(profile, dopts)
        backend_check(profile)
    run = RunDir.open(out, identity_of(copts), overwrite=overwrite, must_exist=resume)
    run.set_inputs(
        compress_options=_jsonable(_opts_dict(copts)), deploy_options=dataclasses.asdict(dopts)
    )
    prep = prepare(copts)
    candidates = compress(run, copts, prep, progress)
    if profile is None:
        return PipelineResult(selection=None, outcomes=[], reports={}, triton=None)
    return deploy(run, candidates, profile, dopts, prep.holdout, progress=progress)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def status(out: str | Path) -> dict[str, Any]:
    """A summary of a run directory: steps, candidates and their stages."""
    run = RunDir.load(out)
    m = run.manifest
    return {
        "run": str(run.root),
        "identity": m.get("identity"),
        "steps": {k: v.get("status") for k, v in m.get("steps", {}).items()},
        "candidates": {
            n: {s: v.get("status") for s, v in st.items()}
            for n, st in m.get("candidates", {}).items()
        },
        "outcomes": {
            d.name: {o.candidate: o.status for o in load_outcomes(run, d.name)}
            for d in sorted((run.root / "outcomes").glob("*"))
            if d.is_dir()
        },
    }


# ================================================================ stages over an existing run


def _options_from_manifest(run: RunDir) -> CompressOptions:
    from .data import DataOverrides

    raw = dict(run.manifest.get("inputs", {}).get("compress_options") or {})
    if not raw:
        raise UserInputError(
            f"{run.root} has no recorded compression options", "run `dcvit-deploy compress` first"
        )
    ov = raw.pop("data_overrides", None)
    overrides = (
        DataOverrides(
            **cast(
                "dict[str, Any]",
                {k: tuple(v) if isinstance(v, list) else v for k, v in ov.items()},
            )
        )
        if ov
        else None
    )
    raw["targets"] = tuple(raw["targets"])
    if raw.get("candidate_blocks") is not None:
        raw["candidate_blocks"] = tuple(raw["candidate_blocks"])
    return CompressOptions(**raw, data_overrides=overrides, device="auto")


def _reopen(out: str | Path) -> tuple[RunDir, CompressOptions, list[Candidate]]:
    from .compress.family import load_family

    run = RunDir.load(out)
    if not run.step_done(
        "compress", run.manifest["steps"].get("compress", {}).get("fingerprint", "")
    ):
        raise UserInputError(
            f"the compression step of {out} has not finished",
            "rerun `dcvit-deploy compress` to resume it",
        )
    return run, _options_from_manifest(run), load_family(run.family_dir)


def stage_over_run(
    out: str | Path,
    dopts: DeployOptions,
    *,
    until: Literal["export", "build", "profile"],
    progress: ProgressFn = quiet,
) -> PipelineResult:
    """``export``/``build``/``profile`` every candidate of an existing run (profile also selects
    when a budget is given)."""
    from .profiles import load_profile

    run, copts, cands = _reopen(out)
    profile = load_profile(dopts.profile)
    budget_of(profile, dopts)
    if until != "export":
        backend_check(profile)
    images = prepare(copts).holdout
    if until == "profile":
        return deploy(run, cands, profile, dopts, images, progress=progress)
    outcomes = [
        evaluate_candidate(run, c, profile, dopts, images, until=until, progress=progress)
        for c in cands
    ]
    return PipelineResult(selection=None, outcomes=outcomes, reports={}, triton=None)


def select_over_run(out: str | Path, dopts: DeployOptions) -> PipelineResult:
    """Select among the measured outcomes of a run; write the Triton repository and reports."""
    from .profiles import load_profile
    from .select import capacity_order, decide, infeasible_error

    run = RunDir.load(out)
    profile = load_profile(dopts.profile)
    budget = budget_of(profile, dopts)
    outcomes = capacity_order(load_outcomes(run, profile.name))
    if not outcomes:
        raise UserInputError(
            f"{out} has no measured candidates", "run `dcvit-deploy profile` first"
        )
    assert budget is not None
    selection = decide(outcomes, budget)
    infeasible = infeasible_error(selection, outcomes) if selection.chosen is None else None
    triton = write_triton(run, selection, outcomes, profile, dopts) if selection.chosen else None
    reports = write_run_reports(run, outcomes, selection, profile)
    return PipelineResult(
        selection=selection,
        outcomes=outcomes,
        reports=reports,
        triton=triton,
        infeasible=infeasible,
    )


def report_over_run(out: str | Path, dopts: DeployOptions) -> dict[str, Path]:
    """Rewrite the reports of a run from its outcomes (with a selection when a budget is given)."""
    from .profiles import load_profile
    from .select import capacity_order, decide

    run = RunDir.load(out)
    profile = load_profile(dopts.profile)
    budget = budget_of(profile, dopts)
    outcomes = capacity_order(load_outcomes(run, profile.name))
    selection = decide(outcomes, budget) if budget is not None and outcomes else None
    return write_run_reports(run, outcomes, selection, profile)
