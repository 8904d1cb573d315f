"""Dense candidate families in one call (DC-ViT Steps 1-4 over many targets, or PRACTISE).

Work is reused across targets when ``reuse`` is on: blocks are ranked once (at a representative
width) and each target is warm-started from its neighbouring, already-finetuned candidate --
kept neurons are nested across widths, so the neighbour's units carry over and any unit it
lacks comes from the pretrained model -- then finetuned for ``warm_fraction`` of a schedule.
With ``reuse`` off every target is compressed independently, as the paper does: its own
ranking at its own width, then progressive compression from the pretrained model.

Every candidate is written (safetensors + JSON spec) as soon as it is finished, with a
fingerprint of everything it depends on; a rerun skips candidates whose fingerprint matches.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from ..atomic import atomic_write_json, fingerprint
from ..errors import UserInputError
from ..progress import ProgressEvent, ProgressFn, quiet
from ..records import ArchSpec, Candidate, to_dict
from .candidate import build_candidate, read_candidate, save_candidate
from .finetune import FinetuneProgress, FinetuneSchedule, feature_mimic
from .macs import Geometry, geometry_of
from .plan import StructurePlan, plan_family
from .practise import blocks_for_target, rank_blocks_practise
from .recoverability import BlockRanking, default_candidate_blocks, rank_blocks
from .surgery import (
    NEURON_CHOICES,
    NeuronChoice,
    compress_blocks,
    identity_spec,
    make_chooser,
    reshape,
)

Method = Literal["dcvit", "practise"]
METHODS: tuple[str, ...] = ("dcvit", "practise")
ORIGINAL = "original"


@dataclass(frozen=True)
class FamilyConfig:
    """Everything that decides what a family contains and how it is trained."""

    schedule: FinetuneSchedule
    targets: tuple[float, ...]
    method: Method = "dcvit"
    rank_schedule: FinetuneSchedule | None = None
    round_to: int = 1
    candidate_blocks: tuple[int, ...] | None = None
    neuron_choice: str = "random"
    reuse: bool = True
    warm_fraction: float = 0.5
    seed: int = 0
    include_original: bool = True
    practise_adaptor_steps: int = 100

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserInputError(
                f"unknown method {self.method!r}", f"use one of {', '.join(METHODS)}"
            )
        if self.neuron_choice not in NEURON_CHOICES:
            raise UserInputError(
                f"unknown neuron choice {self.neuron_choice!r}",
                f"use one of {', '.join(NEURON_CHOICES)}",
            )
        if not self.targets:
            raise UserInputError("no compression targets given", "pass e.g. --targets 5%:50%:5%")
        if not 0 < self.warm_fraction <= 1:
            raise UserInputError("warm_fraction must be in (0, 1]", "pass e.g. --warm-fraction 0.5")
        if self.round_to < 1:
            raise UserInputError("round_to must be >= 1", "pass e.g. --round-to 8")

    @property
    def ranking_schedule(self) -> FinetuneSchedule:
        return self.rank_schedule or self.schedule


@dataclass
class FamilyResult:
    """The candidates written (original first, then by increasing reduction) and the costs."""

    candidates: list[Candidate]
    rankings: dict[int, BlockRanking]
    seconds: dict[str, float] = field(default_factory=dict)
    finetune_steps: int = 0
    reused: list[str] = field(default_factory=list)


def candidate_name(method: str, reduction: float) -> str:
    """``dcvit-0166`` for 16.6%: sorts by size and survives any file system."""
    return f"{method}-{round(reduction * 1000):04d}"


def _scaled(schedule: FinetuneSchedule, fraction: float) -> FinetuneSchedule:
    if fraction >= 1:
        return schedule
    it = max(1, round(schedule.iterations * fraction))
    return replace(
        schedule,
        iterations=it,
        lr_warmup_iterations=min(it, round(schedule.lr_warmup_iterations * fraction)),
    )


class _Family:
    """One family run: holds the shared state so the per-target steps stay small."""

    def __init__(
        self,
        teacher: nn.Module,
        *,
        model_name: str,
        model_kwargs: dict[str, Any],
        data: Any,
        metric_images: torch.Tensor,
        out_dir: Path,
        config: FamilyConfig,
        teacher_fingerprint: str,
        input_fingerprint: str,
        activation_images: torch.Tensor | None,
        device: torch.device | str | None,
        progress: ProgressFn,
    ) -> None:
        self.teacher = teacher.eval()
        self.data = data
        self.metric = metric_images
        self.out = out_dir
        self.cfg = config
        self.device = device
        self.progress = progress
        self.geom: Geometry = geometry_of(teacher)
        self.base_spec: ArchSpec = identity_spec(teacher, model_name, model_kwargs)
        self.depth = self.base_spec.depth
        self.base_macs = self.geom.count(self.base_spec.blocks)
        self.blocks = config.candidate_blocks or default_candidate_blocks(self.depth)
        bad = [b for b in self.blocks if not 0 <= b < self.depth]
        if bad:
            raise UserInputError(
                f"candidate blocks {bad} do not exist (model depth {self.depth})",
                f"choose blocks in 0..{self.depth - 1}",
            )
        self.chooser = make_chooser(
            cast(NeuronChoice, config.neuron_choice),
            teacher,
            seed=config.seed,
            images=activation_images,
        )
        self.common = {
            "teacher": teacher_fingerprint,
            "data": input_fingerprint,
            "config": to_dict(config),
            "metric": fingerprint([float(metric_images.sum()), list(metric_images.shape)]),
        }
        self.input_fp = input_fingerprint
        self.rankings: dict[int, BlockRanking] = {}
        self.steps = 0
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    # ------------------------------------------------------------------ helpers

    def _finetune(
        self, student: nn.Module, schedule: FinetuneSchedule, upto: int | str, label: str, seed: int
    ) -> dict[str, Any]:
        def report(p: FinetuneProgress) -> None:
            self.progress(
                ProgressEvent(
                    stage=f"finetune {label}", step=p.step, steps=p.total, loss=p.loss, eta_s=p.eta
                )
            )

        res = feature_mimic(
            student,
            self.teacher,
            self.data,
            schedule,
            trainable_upto=upto,  # type: ignore[arg-type]
            device=self.device,
            seed=seed,
            progress=report,
        )
        self.steps += res.steps
        return {"steps": res.steps, "seconds": round(res.seconds, 3), "final_loss": res.final_loss}

    def ranking(self, hidden: int) -> BlockRanking:
        key_width = hidden if self.cfg.method == "dcvit" else 0
        if key_width in self.rankings:
            return self.rankings[key_width]
        t0 = time.perf_counter()
        key = fingerprint({**self.common, "hidden": key_width, "blocks": list(self.blocks)})
        cache = self.out / f"ranking-{self.cfg.method}-{key_width}.json"
        if self.cfg.method == "dcvit":
            r = rank_blocks(
                self.teacher,
                self.base_spec,
                self.data,
                self.metric,
                candidates=self.blocks,
                hidden=hidden,
                chooser=self.chooser,
                schedule=self.cfg.ranking_schedule,
                seed=self.cfg.seed,
                device=self.device,
                cache=cache,
                cache_key=key,
                progress=self.progress,
            )
        else:
            r = rank_blocks_practise(
                self.teacher,
                self.data,
                self.metric,
                candidates=self.blocks,
                steps=self.cfg.practise_adaptor_steps,
                seed=self.cfg.seed,
                cache=cache,
                cache_key=key,
                progress=self.progress,
            )
        self.seconds[f"ranking_{key_width}"] = time.perf_counter() - t0
        self.rankings[key_width] = r
        return r

    def _existing(self, name: str, fp: str) -> Candidate | None:
        spec = self.out / f"{name}.json"
        if not spec.is_file():
            return None
        try:
            cand = read_candidate(spec)
        except UserInputError:
            return None
        if cand.recipe.get("fingerprint") != fp or not (self.out / cand.weights).is_file():
            return None
        return cand

    def _record(
        self, name: str, target: float, spec: ArchSpec, recipe: dict[str, Any]
    ) -> Candidate:
        return Candidate(
            name=name,
            method=self.cfg.method if name != ORIGINAL else "original",
            target_reduction=target,
            arch=spec,
            macs=self.geom.count(spec.blocks),
            base_macs=self.base_macs,
            recipe=recipe,
            seed=self.cfg.seed,
            input_fingerprint=self.input_fp,
            weights="",
            weights_sha256="",
        )

    # ------------------------------------------------------------------ steps

    def original(self) -> Candidate:
        fp = fingerprint({**self.common, "name": ORIGINAL})
        done = self._existing(ORIGINAL, fp)
        if done is not None:
            return done
        cand = self._record(ORIGINAL, 0.0, self.base_spec, {"fingerprint": fp, "finetune": None})
        return save_candidate(self.out, cand, self.teacher)

    def dcvit_target(
        self,
        plan: StructurePlan,
        rank_width: int,
        prev: tuple[Candidate, nn.Module] | None,
        item: int,
        items: int,
    ) -> tuple[Candidate, nn.Module]:
        ranking = self.ranking(rank_width)
        chosen = list(ranking.order[: plan.n_blocks])
        name = candidate_name("dcvit", plan.achieved)
        warm = prev if (self.cfg.reuse and prev is not None and prev[0].name != ORIGINAL) else None
        fp = fingerprint(
            {
                **self.common,
                "name": name,
                "plan": to_dict(plan),
                "chosen": chosen,
                "warm_from": warm[0].recipe.get("fingerprint") if warm else None,
            }
        )
        done = self._existing(name, fp)
        if done is not None:
            return done, build_candidate(done, self.out / done.weights)
        self.progress(
            ProgressEvent(
                stage="compress",
                item=item,
                items=items,
                message=f"{name}: blocks {chosen} -> h'={plan.hidden}",
            )
        )
        t0 = time.perf_counter()
        stages: list[dict[str, Any]] = []
        target_spec = compress_blocks(self.base_spec, chosen, plan.hidden, self.chooser)
        if warm is not None:
            student = reshape(warm[1], warm[0].arch, target_spec, self.teacher)
            sched = _scaled(self.cfg.schedule, self.cfg.warm_fraction)
            stages.append(
                {
                    "blocks": chosen,
                    **self._finetune(student, sched, max(chosen), name, self.cfg.seed),
                }
            )
            self.reused.append(name)
        else:  # progressive: one block at a time, best first, finetune after each
            student, spec = copy.deepcopy(self.teacher), self.base_spec
            for k in range(1, len(chosen) + 1):
                step_spec = compress_blocks(self.base_spec, chosen[:k], plan.hidden, self.chooser)
                student = reshape(student, spec, step_spec, self.teacher)
                spec = step_spec
                stages.append(
                    {
                        "blocks": chosen[:k],
                        **self._finetune(
                            student,
                            self.cfg.schedule,
                            max(chosen[:k]),
                            f"{name} ({k}/{len(chosen)})",
                            self.cfg.seed + k,
                        ),
                    }
                )
        recipe = {
            "fingerprint": fp,
            "n_blocks": plan.n_blocks,
            "hidden": plan.hidden,
            "hidden_unrounded": plan.hidden_unrounded,
            "round_to": plan.round_to,
            "blocks": chosen,
            "ranking_width": rank_width,
            "ranking_scores": {str(b): s for b, s in ranking.scores.items()},
            "neuron_choice": self.cfg.neuron_choice,
            "warm_from": warm[0].name if warm else None,
            "finetune": stages,
            "schedule": to_dict(self.cfg.schedule),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        cand = save_candidate(
            self.out, self._record(name, plan.target, target_spec, recipe), student
        )
        return cand, student

    def practise_target(
        self, k: int, target: float, item: int, items: int
    ) -> tuple[Candidate, nn.Module]:
        ranking = self.ranking(0)
        chosen = list(ranking.order[:k])
        spec = compress_blocks(self.base_spec, chosen, 0, kind="identity")
        name = candidate_name(
            "practise", 1.0 - self.geom.count(spec.blocks).linear_norm / self.base_macs.linear_norm
        )
        fp = fingerprint({**self.common, "name": name, "chosen": chosen})
        done = self._existing(name, fp)
        if done is not None:
            return done, build_candidate(done, self.out / done.weights)
        self.progress(
            ProgressEvent(
                stage="compress", item=item, items=items, message=f"{name}: drop blocks {chosen}"
            )
        )
        t0 = time.perf_counter()
        student = reshape(self.teacher, self.base_spec, spec, self.teacher)
        stage = self._finetune(student, self.cfg.schedule, "all", name, self.cfg.seed)
        recipe = {
            "fingerprint": fp,
            "dropped": chosen,
            "ranking_scores": {str(b): s for b, s in ranking.scores.items()},
            "finetune": [stage],
            "schedule": to_dict(self.cfg.schedule),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        cand = save_candidate(self.out, self._record(name, target, spec, recipe), student)
        return cand, student


def compress_family(
    teacher: nn.Module,
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    data: Any,
    metric_images: torch.Tensor,
    out_dir: str | Path,
    config: FamilyConfig,
    teacher_fingerprint: str,
    input_fingerprint: str,
    activation_images: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: ProgressFn = quiet,
) -> FamilyResult:
    """Compress ``teacher`` at every target of ``config`` and write the candidates to ``out_dir``.

    ``data``: a Dataset of (augmented) few-shot image tensors for finetuning; ``metric_images``:
    the synthetic (or real held-out) images that score blocks. All targets are validated before
    any work starts. Returns the candidates in order of increasing reduction (the original first
    when ``include_original``); a rerun resumes from what is on disk.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fam = _Family(
        teacher,
        model_name=model_name,
        model_kwargs=model_kwargs,
        data=data,
        metric_images=metric_images,
        out_dir=out,
        config=config,
        teacher_fingerprint=teacher_fingerprint,
        input_fingerprint=input_fingerprint,
        activation_images=activation_images,
        device=device,
        progress=progress,
    )
    t0 = time.perf_counter()
    cands: list[Candidate] = []
    if config.include_original:
        cands.append(fam.original())
    targets = sorted(config.targets)
    if config.method == "dcvit":
        plans = plan_family(
            fam.geom, fam.depth, targets, max_blocks=len(fam.blocks), round_to=config.round_to
        )
        unique = _unique_plans(plans)
        rank_width = unique[len(unique) // 2].hidden
        prev: tuple[Candidate, nn.Module] | None = None
        for i, plan in enumerate(unique, start=1):
            width = rank_width if config.reuse else plan.hidden
            prev = fam.dcvit_target(plan, width, prev, i, len(unique))
            cands.append(prev[0])
    else:
        block_frac = fam.geom.block_macs(fam.base_spec.blocks[0])[0] / fam.base_macs.linear_norm
        ks: dict[int, float] = {}
        for t in targets:
            ks.setdefault(blocks_for_target(t, block_frac, len(fam.blocks)), t)
        for i, (k, t) in enumerate(sorted(ks.items()), start=1):
            cands.append(fam.practise_target(k, t, i, len(ks))[0])
    fam.seconds["total"] = time.perf_counter() - t0
    index = {
        "candidates": [c.name + ".json" for c in cands],
        "config": to_dict(config),
        "seconds": fam.seconds,
    }
    atomic_write_json(out / "family.json", index)
    return FamilyResult(
        candidates=cands,
        rankings=fam.rankings,
        seconds=fam.seconds,
        finetune_steps=fam.steps,
        reused=fam.reused,
    )


def _unique_plans(plans: Sequence[StructurePlan]) -> list[StructurePlan]:
    """Drop targets that plan to the same structure as a smaller one (dense but distinct)."""
    seen: set[tuple[int, int]] = set()
    out = []
    for p in plans:
        if (p.n_blocks, p.hidden) not in seen:
            seen.add((p.n_blocks, p.hidden))
            out.append(p)
    return out


def load_family(out_dir: str | Path) -> list[Candidate]:
    """The candidates listed in ``family.json`` (written last by :func:`compress_family`)."""
    p = Path(out_dir) / "family.json"
    if not p.is_file():
        raise UserInputError(f"no family.json in {out_dir}", "run compression first")
    names = json.loads(p.read_text())["candidates"]
    return [read_candidate(Path(out_dir) / n) for n in names]
