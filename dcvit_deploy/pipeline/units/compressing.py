"""The family unit (compress the teacher into a dense family) and the family as the run's one
source of truth.

The current family -- ``family/family.json`` plus each structure's weights checksum, as recorded
by the family unit, and the trained subset, as recorded by the train units (``train/<name>``:
the trained weights' checksum and the structure they were trained from) -- defines which
candidates exist and which are trained. Every reader (export, build, profile, select, publish,
report, status, compare) goes through :func:`current_family`; candidates of an earlier family
that are no longer in it are *superseded*: listed as such, never chosen.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dcvit_deploy.errors import SchemaError, UserInputError
from dcvit_deploy.pipeline.context import TRAIN_PACKAGES, versions
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.unit import UnitOutput
from dcvit_deploy.pipeline.view import RunView
from dcvit_deploy.progress import ProgressEvent
from dcvit_deploy.store.atomic import fingerprint, sha256_file
from dcvit_deploy.store.records import from_dict, safe_name
from dcvit_deploy.store.rundir import MANIFEST

if TYPE_CHECKING:
    from dcvit_deploy.config.options import CompressOptions
    from dcvit_deploy.pipeline.context import JobContext, Prepared
    from dcvit_deploy.pipeline.runner import Runner
    from dcvit_deploy.store.records import Candidate
    from dcvit_deploy.store.rundir import RunDir


# The options that do not change the candidates, and why (a test holds every other one to it)
NOT_IDENTITY = {
    "data": "a location: the images enter by content",
    "device": "where the finetune runs, not what it computes",
    "train": "which structures are trained, not what a structure or its training is",
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


def family_config(opts: CompressOptions, n_images: int) -> Any:
    """The family engine's config: the schedule preset with the user's iterations, ranking
    iterations, lr and batch size, and its procedure (how blocks are ranked, re-fit, progressive
    or one-shot: :data:`dcvit_deploy.compress.procedure.PROCEDURES`) under the user's options."""
    from dcvit_deploy.compress.finetune import FinetuneSchedule
    from dcvit_deploy.compress.procedure import FamilyConfig

    def shortened(s: FinetuneSchedule, it: int) -> FinetuneSchedule:
        return dataclasses.replace(
            s, iterations=it, lr_warmup_iterations=min(s.lr_warmup_iterations, it)
        )

    if opts.schedule == "tiny":
        sched = FinetuneSchedule.tiny(batch_size=opts.batch_size or 4)
    else:
        preset = FinetuneSchedule.paper if opts.schedule == "paper" else FinetuneSchedule.default
        sched = preset(n_images, batch_size=opts.batch_size or 64)
    sched = sched if opts.iterations is None else shortened(sched, opts.iterations)
    sched = sched if opts.lr is None else dataclasses.replace(sched, lr=opts.lr)
    fields: dict[str, Any] = {
        "schedule": sched,
        "targets": tuple(opts.targets),
        "method": opts.methods[0],
        "methods": tuple(opts.methods),
        "round_to": opts.round_to,
        "candidate_blocks": opts.candidate_blocks,
        "neuron_choice": opts.neuron_choice,
        "warm_fraction": opts.warm_fraction,
        "seed": opts.seed,
        "include_original": opts.include_original,
    }
    if opts.rank_iterations is not None:
        fields["rank_schedule"] = shortened(sched, opts.rank_iterations)
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

    id = str(UnitId("family"))
    optional = False

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        prep = ctx.prep()  # the held-out images always enter: fidelity is measured on them
        ident = family_identity(ctx.copts, prep)
        versions_ = versions(TRAIN_PACKAGES)
        return {**ident, "fidelity": prep.holdout_fp, "versions": versions_,
                "train_all": ctx.copts.trains_all}  # fmt: skip

    def execute(self, ctx: JobContext) -> UnitOutput:
        from dcvit_deploy.compress.family import compress_family
        from dcvit_deploy.model.images import skipped_summary

        prep = ctx.prep()
        run = ctx.run
        for name in _repair(run.family_dir):
            ctx.note(f"candidate {name}: weights missing or corrupted; rebuilding it")
        inputs, source = family_inputs(ctx)
        result = compress_family(prep.teacher, train=False, **inputs)
        cands = list(result.candidates)
        names = [c.name for c in cands]
        if len(set(names)) != len(names):  # a bug in naming, never a user error
            raise RuntimeError(f"candidate names collide: {names}")
        fid = _fidelity(cands, run.family_dir, prep)
        files = [run.family_dir / "family.json"]
        for c in cands:
            files += [run.family_dir / f"{c.name}.json", run.family_dir / c.weights]
        dataset = inputs["data"]
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
                "train_all": ctx.copts.trains_all,
                "seconds": result.seconds,
                "metric_set": source,
                "images": len(dataset),
                "skipped_images": [f"{p}: {r}" for p, r in dataset.skipped],
                "skipped_summary": skipped_summary(dataset.skipped, len(prep.train_paths)),
                "holdout": int(prep.holdout.shape[0]),
                "holdout_note": prep.holdout_note,
            },
            files=tuple(files),
        )


def family_inputs(ctx: JobContext) -> tuple[dict[str, Any], str]:
    """The keyword arguments of :class:`~dcvit_deploy.compress.family.FamilyEngine` for this
    run, and where its metric set came from."""
    from dcvit_deploy.compress.finetune import train_transform
    from dcvit_deploy.model.images import FewShotImages
    from dcvit_deploy.pipeline.context import torch_device

    prep, opts = ctx.prep(), ctx.copts
    device = torch_device(opts.device)
    config = family_config(opts, len(prep.train_paths))
    metric = _metric_set(ctx, device)
    inputs = {
        "model_name": opts.model,
        "model_kwargs": prep.model_kwargs,
        "data": FewShotImages(prep.train_paths, train_transform(config.schedule, prep.data_config)),
        "metric_images": metric.images,
        "out_dir": ctx.run.family_dir,
        "config": config,
        "teacher_fingerprint": prep.weights_fp,
        "input_fingerprint": fingerprint(family_identity(opts, prep)),
        "activation_images": prep.holdout if opts.neuron_choice == "activation" else None,
        "device": device,
        "progress": ctx.progress,
        "executor": ctx.executor,
    }
    return inputs, metric.source


def _metric_set(ctx: JobContext, device: str) -> Any:
    from dcvit_deploy.compress.metric_set import (
        InversionSettings,
        load_or_synthesize,
        real_metric_set,
    )

    prep, opts = ctx.prep(), ctx.copts
    dcfg = prep.data_config
    if opts.metric == "real":
        return real_metric_set(prep.holdout)
    settings = InversionSettings.paper() if opts.inversion == "paper" else InversionSettings.fast()
    if opts.inversion_iterations is not None:
        settings = dataclasses.replace(
            settings,
            iterations=opts.inversion_iterations,
            warmup_iterations=min(settings.warmup_iterations, opts.inversion_iterations // 2),
        )

    def inv_progress(p: Any) -> None:
        ctx.progress(ProgressEvent(stage="metric set", step=p.step, steps=p.total, loss=p.loss,
                                   eta_s=getattr(p, "eta", None)))  # fmt: skip

    return load_or_synthesize(ctx.run.sub("metric_set"), prep.weights_fp, prep.teacher,
                              dcfg["input_size"], dcfg["mean"], dcfg["std"], settings,
                              seed=opts.seed, device=device, progress=inv_progress)  # fmt: skip


class TrainUnit:
    """Finetune one structure of the family into its trained candidate
    (``family/<name>.trained``); its fidelity on the held-out images is recorded with it."""

    optional = True  # a pick that cannot be trained is set aside; the search goes on

    def __init__(
        self, structure: Candidate, engines: Callable[[], Any], prev: Candidate | None
    ) -> None:
        self.structure = structure
        self.engines = engines
        self.prev = prev
        self.id = str(UnitId("train", name=structure.name))

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        s = self.structure
        return {
            "structure": s.weights_sha256,
            "identity": s.recipe.get("fingerprint"),  # teacher, images, procedure, schedule
            "warm_from": self.prev.weights_sha256 if self.prev else None,
            "versions": versions(TRAIN_PACKAGES),
        }

    def execute(self, ctx: JobContext) -> UnitOutput:
        s = self.structure
        cand = self.engines()[s.method].train(s, self.prev)
        family_dir = ctx.run.family_dir
        return UnitOutput(
            result={
                "weights_sha256": cand.weights_sha256,
                **self.inputs(ctx),
                **_fidelity([cand], family_dir, ctx.prep())[cand.name],
            },
            files=(family_dir / f"{cand.key}.json", family_dir / cand.weights),
        )


def train_picks(ctx: JobContext, runner: Runner, family: Family, names: Sequence[str]) -> Family:
    """Finetune the candidates ``names`` of ``family`` (a trained one is reused while its
    structure and identity are unchanged) and return the family with them: the one step
    whose cost grows with what is chosen. The items are independent unless the procedure
    chains (``--reuse``: each warm-starts from the previous trained one of its method), so an
    executor may fan them out."""
    from dcvit_deploy.compress.family import family_engines

    engines: list[Any] = []

    def engine() -> Any:
        if not engines:  # built once, on the first candidate that is not trained yet
            engines.append(family_engines(ctx.prep().teacher, **family_inputs(ctx)[0]))
        return engines[0]

    chained = bool(ctx.copts.reuse)  # no preset warm-starts; only --reuse does
    todo = [c for c in family.candidates if c.name in names and c.name not in family.trained]
    if ctx.executor.remote and not chained and len(todo) > 1:  # the finetunes as tasks first:
        from dcvit_deploy.compress.family import train_family  # each unit then finds its own

        train_family(engine(), todo)
    prev: dict[str, Candidate] = {}
    for c in family.candidates:
        if c.name in names and c.state == "structure":
            runner.run(TrainUnit(c, engine, prev.get(c.method) if chained else None))
            trained = current_family(ctx.run).trained.get(c.name)
            if trained is not None:
                prev[c.method] = trained
    return current_family(ctx.run)


@dataclass(frozen=True)
class Family:
    """The run's current family: every candidate's structure (in family order), the trained
    ones and their recorded facts. ``train_all``: every candidate is trained before it is
    measured; otherwise the structures are measured and only what is chosen is trained."""

    candidates: tuple[Candidate, ...]
    facts: dict[str, dict[str, Any]]
    info: dict[str, Any]
    trained: dict[str, Candidate] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.candidates)

    @property
    def train_all(self) -> bool:
        return bool(self.info.get("train_all", True))

    def measured(self, name: str) -> Candidate | None:
        """The record whose artifact is measured: trained under ``train_all`` (``None`` until
        it is), else the structure."""
        cand = next(c for c in self.candidates if c.name == name)
        return self.trained.get(name) if self.train_all else cand

    def fidelity(self, name: str, trained: bool = False) -> float | None:
        facts = self.facts.get(name, {})
        v = (facts.get("trained") or facts if trained else facts).get("fidelity")
        return None if v is None else float(v)


@dataclass(frozen=True)
class _Entry:
    """What :func:`current_family` reads of each candidate the family unit recorded."""

    name: str
    weights_sha256: str

    def __post_init__(self) -> None:
        safe_name(self.name, "candidate name")


def current_family(run: RunDir) -> Family:
    """The family recorded by the last successful family unit (the one source of truth), with
    the candidates trained from its structures.

    Raises :class:`UserInputError` when compression has not finished, or when a structure's
    files no longer match what the family unit recorded (rerun ``compress`` to rebuild it).
    A trained candidate whose files changed is not trained (a rerun trains it again).
    """
    from dcvit_deploy.compress.candidate import read_candidate

    view = RunView(run)
    result = view.result(UnitId("family"))
    if result is None:
        raise UserInputError(
            f"the family of {run.root} has not been compressed yet",
            "run (or rerun, to resume) `dcvit-deploy compress`",
        )
    cands = []
    facts = {}
    trained = {}
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
        facts[cand.name] = dict(raw)
        res = view.result(UnitId("train", name=cand.name))
        spec = run.family_dir / f"{cand.name}.trained.json"
        if cand.state == "trained":  # the original: its weights are final
            trained[cand.name] = cand
        elif (
            res is not None
            and (res.get("structure"), res.get("identity"))
            == (cand.weights_sha256, cand.recipe.get("fingerprint"))
            and spec.is_file()
        ):
            t = read_candidate(spec)
            if t.weights_sha256 == res.get("weights_sha256"):
                trained[cand.name] = t
                facts[cand.name]["trained"] = res
    info = {k: v for k, v in result.items() if k != "candidates"}
    return Family(tuple(cands), facts, info, trained)


def superseded(run: RunDir, family: Family) -> list[str]:
    """Candidates that earlier units of this run worked on but that the current family no
    longer holds (never selectable)."""
    kinds = ("export", "build", "quantize", "train")
    names = {uid.candidate for uid in RunView(run).records() if uid.kind in kinds}
    return sorted(names - set(family.names))
