"""The family unit (compress the teacher into a dense family) and the family as the run's one
source of truth.

The current family -- ``family/family.json`` plus each candidate's weights checksum, as recorded
by the family unit -- defines which candidates exist. Every reader (export, build, profile,
select, publish, report, status, compare) goes through :func:`current_family`; candidates of an
earlier family that are no longer in it are *superseded*: listed as such, never chosen.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dcvit_deploy.errors import SchemaError, UserInputError
from dcvit_deploy.pipeline.context import TRAIN_PACKAGES, versions
from dcvit_deploy.pipeline.unit import UnitOutput
from dcvit_deploy.progress import ProgressEvent
from dcvit_deploy.store.atomic import fingerprint, sha256_file
from dcvit_deploy.store.records import from_dict, safe_name
from dcvit_deploy.store.rundir import MANIFEST

if TYPE_CHECKING:
    from dcvit_deploy.config.options import CompressOptions
    from dcvit_deploy.pipeline.context import JobContext, Prepared
    from dcvit_deploy.store.records import Candidate
    from dcvit_deploy.store.rundir import RunDir

FAMILY_UNIT = "family"

# The options that do not change the candidates, and why (a test holds every other one to it)
NOT_IDENTITY = {
    "data": "a location: the images enter by content",
    "device": "where the finetune runs, not what it computes",
    **dict.fromkeys(
        ("checkpoint", "pretrained_cache", "random_init"), "the weights enter by content"
    ),
}


def family_identity(opts: CompressOptions, prep: Prepared) -> dict[str, Any]:
    """What the candidates' weights depend on, by content and never a location: the teacher,
    the few-shot images, their preprocessing (the resolved data config), the held-out images
    where they choose neurons or score blocks, and every option of the family procedure (those
    that select images or preprocessing enter as what they resolve to)."""
    skip = {*NOT_IDENTITY, "model_kwargs", "num_samples", "holdout", "data_overrides"}
    held = opts.neuron_choice == "activation" or opts.metric == "real"
    ident = {
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k not in skip},
        **{k: getattr(prep, k) for k in ("weights_fp", "model_kwargs", "input_fp", "data_config")},
        "holdout": prep.holdout_fp if held else None,
    }
    return cast(dict[str, Any], json.loads(json.dumps(ident, default=str)))


def schedules(opts: CompressOptions, n_images: int) -> tuple[Any, Any]:
    """The finetune schedule (preset + overrides) and the ranking schedule (or ``None``)."""
    from dcvit_deploy.compress.finetune import FinetuneSchedule

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


def family_config(opts: CompressOptions, n_images: int) -> Any:
    """The family engine's config: the schedule preset's procedure (how blocks are ranked,
    re-fit, progressive or one-shot; see :data:`dcvit_deploy.compress.family.PROCEDURES`) with
    the user's explicit options on top."""
    from dcvit_deploy.compress.family import FamilyConfig

    sched, rank = schedules(opts, n_images)
    fields: dict[str, Any] = {
        "schedule": sched,
        "targets": tuple(opts.targets),
        "method": cast(Any, opts.methods[0]),
        "methods": tuple(opts.methods),
        "round_to": opts.round_to,
        "candidate_blocks": opts.candidate_blocks,
        "neuron_choice": opts.neuron_choice,
        "warm_fraction": opts.warm_fraction,
        "seed": opts.seed,
        "include_original": opts.include_original,
    }
    if rank is not None:
        fields["rank_schedule"] = rank
    if opts.reuse is not None:
        fields["reuse"] = opts.reuse
    return FamilyConfig.from_preset(opts.schedule, **fields)


def _repair(family_dir: Path) -> list[str]:
    """Remove candidate specs whose weights are missing or do not match their checksum, so the
    family engine rebuilds exactly those candidates. Returns the names repaired."""
    from dcvit_deploy.compress.candidate import read_candidate

    repaired = []
    for spec in sorted(family_dir.glob("*.json")):
        if spec.name == "family.json" or spec.name.startswith("ranking"):
            continue
        try:
            cand = read_candidate(spec)
        except UserInputError:
            spec.unlink()
            repaired.append(spec.stem)
            continue
        weights = family_dir / cand.weights
        if not weights.is_file() or sha256_file(weights) != cand.weights_sha256:
            spec.unlink()
            weights.unlink(missing_ok=True)
            repaired.append(cand.name)
    return repaired


def _fidelity(candidates: list[Candidate], family_dir: Path, prep: Prepared) -> dict[str, Any]:
    """Top-1 agreement with the original on the held-out images; ``None`` (never 1.0) for a
    candidate whose outputs are not finite."""
    import torch

    from dcvit_deploy.compress.candidate import build_candidate

    out: dict[str, Any] = {}
    holdout = prep.holdout
    with torch.no_grad():
        ref = prep.teacher.cpu().eval()(holdout)
        ref_ok = bool(torch.isfinite(ref).all())
        for c in candidates:
            logits = build_candidate(c, family_dir / c.weights)(holdout)
            finite = bool(torch.isfinite(logits).all())
            agree = (
                float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
                if finite and ref_ok
                else None
            )
            out[c.name] = {"fidelity": agree, "finite": finite}
    return out


class FamilyUnit:
    """Compress the teacher into the dense family (``RUN/family``)."""

    id = FAMILY_UNIT
    optional = False

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        prep = ctx.prep()  # the held-out images always enter: fidelity is measured on them
        ident = family_identity(ctx.copts, prep)
        return {**ident, "fidelity": prep.holdout_fp, "versions": versions(TRAIN_PACKAGES)}

    def execute(self, ctx: JobContext) -> UnitOutput:
        from dcvit_deploy.compress.family import compress_family
        from dcvit_deploy.compress.finetune import train_transform
        from dcvit_deploy.model.images import FewShotImages
        from dcvit_deploy.pipeline.context import torch_device

        prep = ctx.prep()
        opts = ctx.copts
        run = ctx.run
        for name in _repair(run.family_dir):
            ctx.note(f"candidate {name}: weights missing or corrupted; rebuilding it")
        device = torch_device(opts.device)
        config = family_config(opts, len(prep.train_paths))
        dataset = FewShotImages(
            prep.train_paths, train_transform(config.schedule, prep.data_config)
        )
        metric = self._metric_set(ctx, device)
        result = compress_family(
            prep.teacher,
            model_name=opts.model,
            model_kwargs=prep.model_kwargs,
            data=dataset,
            metric_images=metric.images,
            out_dir=run.family_dir,
            config=config,
            teacher_fingerprint=prep.weights_fp,
            input_fingerprint=fingerprint(family_identity(opts, prep)),
            activation_images=prep.holdout if opts.neuron_choice == "activation" else None,
            device=device,
            progress=ctx.progress,
            executor=ctx.executor,
        )
        cands = list(result.candidates)
        names = [c.name for c in cands]
        if len(set(names)) != len(names):  # a bug in naming, never a user error
            raise RuntimeError(f"candidate names collide: {names}")
        fid = _fidelity(cands, run.family_dir, prep)
        files = [run.family_dir / "family.json"]
        for c in cands:
            files += [run.family_dir / f"{c.name}.json", run.family_dir / c.weights]
        from dcvit_deploy.model.images import skipped_summary

        skipped = [f"{p}: {r}" for p, r in dataset.skipped]
        summary = skipped_summary(dataset.skipped, len(prep.train_paths))
        return UnitOutput(
            result={
                "candidates": [
                    {
                        "name": c.name,
                        "method": c.method,
                        "weights_sha256": c.weights_sha256,
                        "retained": c.retained,
                        **fid[c.name],
                    }
                    for c in cands
                ],
                "seconds": result.seconds,
                "finetune_steps": result.finetune_steps,
                "metric_set": metric.source,
                "images": len(dataset),
                "skipped_images": skipped,
                "skipped_summary": summary,
                "holdout": int(prep.holdout.shape[0]),
                "holdout_note": prep.holdout_note,
            },
            files=tuple(files),
        )

    def _metric_set(self, ctx: JobContext, device: str) -> Any:
        from dcvit_deploy.compress.metric_set import (
            InversionSettings,
            load_or_synthesize,
            real_metric_set,
        )

        prep = ctx.prep()
        opts = ctx.copts
        if opts.metric == "real":
            return real_metric_set(prep.holdout)
        settings = (
            InversionSettings.paper() if opts.inversion == "paper" else InversionSettings.fast()
        )
        if opts.inversion_iterations is not None:
            settings = dataclasses.replace(
                settings,
                iterations=opts.inversion_iterations,
                warmup_iterations=min(settings.warmup_iterations, opts.inversion_iterations // 2),
            )

        def inv_progress(p: Any) -> None:
            ctx.progress(
                ProgressEvent(
                    stage="metric set",
                    step=p.step,
                    steps=p.total,
                    loss=p.loss,
                    eta_s=getattr(p, "eta", None),
                )
            )

        return load_or_synthesize(
            ctx.run.sub("metric_set"),
            prep.weights_fp,
            prep.teacher,
            prep.data_config["input_size"],
            prep.data_config["mean"],
            prep.data_config["std"],
            settings,
            seed=opts.seed,
            device=device,
            progress=inv_progress,
        )


@dataclass(frozen=True)
class Family:
    """The run's current family: candidates (in family order) and their recorded facts."""

    candidates: tuple[Candidate, ...]
    facts: dict[str, dict[str, Any]]
    info: dict[str, Any]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.candidates)

    def fidelity(self, name: str) -> float | None:
        v = self.facts.get(name, {}).get("fidelity")
        return None if v is None else float(v)


@dataclass(frozen=True)
class _Entry:
    """What :func:`current_family` reads of each candidate the family unit recorded."""

    name: str
    weights_sha256: str

    def __post_init__(self) -> None:
        safe_name(self.name, "candidate name")


def current_family(run: RunDir) -> Family:
    """The family recorded by the last successful family unit (the one source of truth).

    Raises :class:`UserInputError` when compression has not finished, or when a candidate's
    files no longer match what the family unit recorded (rerun ``compress`` to rebuild it).
    """
    from dcvit_deploy.compress.candidate import read_candidate

    rec = run.unit(FAMILY_UNIT)
    if not rec or rec.get("status") != "ok":
        raise UserInputError(
            f"the family of {run.root} has not been compressed yet",
            "run (or rerun, to resume) `dcvit-deploy compress`",
        )
    result = rec.get("result", {})
    cands = []
    facts = {}
    try:
        entries = from_dict(tuple[_Entry, ...], result.get("candidates", []), schema=None)
    except SchemaError as exc:
        fix = "rerun `dcvit-deploy compress` to rebuild the family"
        raise UserInputError(f"{run.root / MANIFEST}: the family's {exc.problem}", fix) from exc
    for entry, raw in zip(entries, result.get("candidates", []), strict=True):
        spec = run.family_dir / f"{entry.name}.json"
        cand = read_candidate(spec) if spec.is_file() else None
        if cand is None or cand.weights_sha256 != entry.weights_sha256:
            raise UserInputError(
                f"candidate {entry.name} of {run.root} is missing or was changed",
                "rerun `dcvit-deploy compress` with the same options to rebuild it",
            )
        cands.append(cand)
        facts[cand.name] = raw
    info = {k: v for k, v in result.items() if k != "candidates"}
    return Family(tuple(cands), facts, info)


def superseded(run: RunDir, family: Family) -> list[str]:
    """Candidates that earlier units of this run worked on but that the current family no
    longer holds (never selectable)."""
    names = set()
    for unit_id in run.units():
        parts = unit_id.split("/")
        if parts[0] in ("export", "build", "quantize") and len(parts) >= 3:
            names.add(parts[-1].split(".", 1)[0])  # an artifact's candidate
    return sorted(names - set(family.names))
