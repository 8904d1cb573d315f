"""The family engine (DC-ViT Steps 1-4 over many targets, or PRACTISE; planned by
:mod:`.procedure`): after ranking, every target's *structure* is built at once from the
pretrained weights (surgery plus the closed-form re-fit: no finetune), so the whole family can be
measured before any of it is trained; :meth:`FamilyEngine.train` finetunes one structure into
``<name>.trained``. Each is written (safetensors + JSON spec) as soon as it is finished, with a
fingerprint of everything it depends on; a rerun skips those that match.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from dcvit_deploy.compress.candidate import build_candidate, read_candidate, save_candidate
from dcvit_deploy.compress.finetune import (
    FinetuneProgress,
    FinetuneSchedule,
    TeacherFeatureBank,
    _image_of,
    feature_mimic,
)
from dcvit_deploy.compress.macs import Geometry, geometry_of
from dcvit_deploy.compress.practise import rank_blocks_practise
from dcvit_deploy.compress.procedure import (
    FamilyConfig,
    PlannedCandidate,
    candidate_name,
    preview_family,
    structure_tag,
)
from dcvit_deploy.compress.recoverability import (
    BlockRanking,
    RankCriterion,
    finetune_reporter,
    rank_blocks,
)
from dcvit_deploy.compress.refit import block_streams, refit_blocks
from dcvit_deploy.compress.surgery import (
    NeuronChoice,
    compress_blocks,
    identity_spec,
    make_chooser,
    reshape,
)
from dcvit_deploy.errors import UserInputError
from dcvit_deploy.progress import ProgressEvent, ProgressFn, quiet
from dcvit_deploy.store.atomic import atomic_write_json, fingerprint
from dcvit_deploy.store.records import ArchSpec, Candidate, read_json, safe_name, to_dict

ORIGINAL = "original"


@dataclass
class FamilyResult:
    """The candidates written (original first, then by increasing reduction) and the costs."""

    candidates: list[Candidate]
    rankings: dict[int, BlockRanking]
    seconds: dict[str, float] = field(default_factory=dict)
    finetune_steps: int = 0


def _scaled(schedule: FinetuneSchedule, fraction: float) -> FinetuneSchedule:
    if fraction >= 1:
        return schedule
    it = max(1, round(schedule.iterations * fraction))
    warmup = min(it, round(schedule.lr_warmup_iterations * fraction))
    return replace(schedule, iterations=it, lr_warmup_iterations=warmup)


Training = Generator[tuple[Any, ...], dict[str, Any], Candidate]
"""A structure in training: yields its finetune, returns its candidate (``FamilyEngine.settle``)."""


def finetune_task(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    schedule: FinetuneSchedule,
    upto: Any,
    seed: int,
    device: torch.device | str | None,
    progress: Callable[[FinetuneProgress], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One feature-mimicking finetune as an executor task: trains ``student`` (seeded by
    ``seed``) and returns its weights and the stage record."""
    res = feature_mimic(student, teacher, data, schedule, trainable_upto=upto, device=device,
                        seed=seed, progress=progress)  # fmt: skip
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    return state, {
        "steps": res.steps,
        "seconds": round(res.seconds, 3),
        "final_loss": res.final_loss,
    }


class FamilyEngine:
    """One method's family: builds its structures and trains them, sharing the teacher, the
    ranking, the calibration images and the feature bank across targets.

    ``data``: a Dataset of (augmented) few-shot image tensors for finetuning; ``metric_images``:
    the images that score blocks; ``calibration_images``: those the closed-form re-fit and the
    re-fit/local rankings fit on (default: one seeded pass over ``data``,
    :func:`calibration_bank`); ``executor`` (:mod:`dcvit_deploy.pipeline.executor`) runs the
    independent finetunes as tasks."""

    def __init__(
        self,
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
        calibration_images: torch.Tensor | None = None,
        executor: Any = None,
    ) -> None:
        from dcvit_deploy.pipeline.executor import LocalExecutor

        self.executor = executor or LocalExecutor()
        self.teacher = teacher.eval()
        self.calibration = calibration_images
        self._streams: list[torch.Tensor] | None = None
        self.bank: TeacherFeatureBank | None = None
        self.data = data
        self.metric = metric_images
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = config
        self.device = device
        self.progress = progress
        self.geom: Geometry = geometry_of(teacher)
        self.base_spec: ArchSpec = identity_spec(teacher, model_name, model_kwargs)
        self.base_macs = self.geom.count(self.base_spec.blocks)
        self.blocks = config.blocks(self.base_spec.depth)
        self.chooser = make_chooser(
            cast(NeuronChoice, config.neuron_choice),
            teacher,
            seed=config.seed,
            images=activation_images,
        )
        self.common: dict[str, Any] = {
            "teacher": teacher_fingerprint,
            "data": input_fingerprint,
            # which other targets share the family changes no candidate (its own plan and
            # blocks are in its fingerprint), so a new target list reuses every structure
            "config": {k: v for k, v in to_dict(config).items() if k != "targets"},
            "metric": fingerprint([float(metric_images.sum()), list(metric_images.shape)]),
        }
        self.rankings: dict[int, BlockRanking] = {}
        self.steps = 0
        self.seconds: dict[str, float] = {}

    def _reporter(self, label: str) -> Callable[[FinetuneProgress], None] | None:
        return finetune_reporter(self.progress, self.executor.remote, f"finetune {label}")

    def settle(self, targets: list[Training]) -> list[Candidate]:
        """Drive the :meth:`training` generators: each yields its one finetune ``(label,
        student, schedule, trainable range, seed)`` and returns its trained candidate. The
        finetunes are independent: each is one executor task, and each candidate is saved as
        its task finishes (an interrupted family keeps them)."""
        if not self.executor.remote and len(targets) > 1:  # one student in memory at a time
            return [done for t in targets for done in self.settle([t])]
        out: dict[int, Candidate] = {}
        asks: dict[str, tuple[int, list[Any]]] = {}
        for i, gen in enumerate(targets):
            try:
                label, *ask = next(gen)
                asks[label] = (i, ask)
            except StopIteration as done:  # on disk already, or trained in order (progressive)
                out[i] = done.value
        data, gpu = self._train_data() if asks else None, str(self.device).startswith("cuda")
        tasks = []
        for k, (_, a) in asks.items():
            args = (a[0], self.teacher, data, *a[1:], self.device, self._reporter(k))
            tasks.append(self.executor.task(k, finetune_task, args, gpu))
        for task, (state, stage) in self.executor.map(tasks):
            i, ask = asks[task.key]
            ask[0].load_state_dict(state)
            self.steps += stage["steps"]
            try:
                targets[i].send(stage)
            except StopIteration as done:
                out[i] = done.value
        return [out[i] for i in range(len(targets))]

    def _train_data(self) -> Any:
        if self.cfg.bank_views <= 0:
            return self.data
        if self.bank is None:
            t0 = time.perf_counter()
            self.bank = TeacherFeatureBank.build(
                self.teacher, self.data, views=self.cfg.bank_views, seed=self.cfg.seed
            )
            self.seconds["bank"] = time.perf_counter() - t0
        return self.bank

    def _calib(self) -> torch.Tensor:
        if self.calibration is None:
            self.calibration = calibration_bank(self.data, seed=self.cfg.seed)
        return self.calibration

    def _refit(self, student: nn.Module, blocks: Sequence[int]) -> list[dict[str, Any]]:
        """Closed-form re-fit of ``blocks`` of ``student`` (in place); per-block errors."""
        calib = self._calib()
        if self._streams is None:
            self._streams = block_streams(self.teacher, calib)
        t0 = time.perf_counter()
        stats = refit_blocks(student, self.teacher, calib, blocks, ridge=self.cfg.refit_ridge,
                             teacher_streams=self._streams)  # fmt: skip
        self.seconds["refit"] = self.seconds.get("refit", 0.0) + time.perf_counter() - t0
        return [
            {"block": s.block, "mse_before": s.mse_before, "mse_after": s.mse_after} for s in stats
        ]

    def ranking(self, hidden: int) -> BlockRanking:
        """The blocks ranked at width ``hidden`` (DC-ViT; PRACTISE ranks once), computed once
        per run and cached on disk by everything the ranking depends on."""
        cfg = self.cfg
        dcvit = cfg.method == "dcvit"
        width = hidden if dcvit else 0
        if width in self.rankings:
            return self.rankings[width]
        t0 = time.perf_counter()
        rank_cfg = {  # only what the ranking depends on, so families can share it
            "method": cfg.method,
            "criterion": cfg.rank_criterion if dcvit else "adaptor",
            "schedule": to_dict(cfg.ranking_schedule) if dcvit else None,
            "adaptor_steps": None if dcvit else cfg.practise_adaptor_steps,
            "neuron_choice": cfg.neuron_choice,
            "seed": cfg.seed,
            "ridge": cfg.refit_ridge if cfg.rank_criterion != "finetune" else None,
        }
        on = {k: self.common[k] for k in ("teacher", "data", "metric")}
        key = fingerprint({**on, "rank": rank_cfg, "hidden": width, "blocks": list(self.blocks)})
        cache = self.out / f"ranking-{cfg.method}-{width}-{key[:8]}.json"
        shared: dict[str, Any] = {"candidates": self.blocks, "seed": cfg.seed, "cache": cache,
                                  "cache_key": key, "progress": self.progress}  # fmt: skip
        if dcvit:
            r = rank_blocks(
                self.teacher,
                self.base_spec,
                self.data,
                self.metric,
                hidden=hidden,
                chooser=self.chooser,
                schedule=cfg.ranking_schedule,
                device=self.device,
                criterion=cast(RankCriterion, cfg.rank_criterion),
                calibration=None if cfg.rank_criterion == "finetune" else self._calib(),
                ridge=cfg.refit_ridge,
                executor=self.executor,
                **shared,
            )
        else:
            r = rank_blocks_practise(self.teacher, self.data, self.metric,
                                     steps=cfg.practise_adaptor_steps, **shared)  # fmt: skip
        self.seconds[f"ranking_{width}"] = time.perf_counter() - t0
        self.rankings[width] = r
        return r

    def _existing(self, stem: str, fp: str) -> Candidate | None:
        """``<stem>`` as written with fingerprint ``fp``, while its files are there."""
        try:
            cand = read_candidate(self.out / f"{stem}.json")
        except UserInputError:  # missing or unreadable: built again
            return None
        done = cand.recipe.get("fingerprint") == fp and (self.out / cand.weights).is_file()
        return cand if done else None

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
            input_fingerprint=self.common["data"],
            weights="",
            weights_sha256="",
            state="trained" if name == ORIGINAL else "structure",
        )

    def _announce(self, item: int, items: int, message: str) -> None:
        self.progress(ProgressEvent(stage="compress", item=item, items=items, message=message))

    def original(self) -> Candidate:
        fp = fingerprint({**self.common, "name": ORIGINAL})
        done = self._existing(ORIGINAL, fp)
        if done is not None:
            return done
        cand = self._record(ORIGINAL, 0.0, self.base_spec, {"fingerprint": fp, "finetune": None})
        return save_candidate(self.out, cand, self.teacher)

    def dcvit_structure(
        self, p: PlannedCandidate, rank_width: int, item: int, items: int
    ) -> Candidate:
        """One target's structure: its best blocks made FFN-only at the planned width, each
        re-fit in closed form (when the procedure re-fits) from the pretrained weights."""
        ranking = self.ranking(rank_width)
        plan = cast(Any, p.plan)
        chosen = list(ranking.order[: plan.n_blocks])
        fp = fingerprint({**self.common, "name": p.name, "plan": to_dict(plan), "chosen": chosen})
        done = self._existing(p.name, fp)
        if done is not None:
            return done
        self._announce(item, items, f"{p.name}: blocks {chosen} -> h'={plan.hidden}")
        t0 = time.perf_counter()
        target_spec = compress_blocks(self.base_spec, chosen, plan.hidden, self.chooser)
        student = reshape(self.teacher, self.base_spec, target_spec, self.teacher)
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
            "refit": self._refit(student, chosen) if self.cfg.refit else [],
            "progressive": self.cfg.progressive,
            "rank_criterion": self.cfg.rank_criterion,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return save_candidate(
            self.out, self._record(p.name, plan.target, target_spec, recipe), student
        )

    def practise_structure(
        self, p: PlannedCandidate, rank_width: int, item: int, items: int
    ) -> Candidate:
        """One target's structure: its ``p.n_blocks`` best blocks dropped from the pretrained
        model (one ranking serves every target: ``rank_width`` is not used)."""
        ranking = self.ranking(0)
        chosen = list(ranking.order[: p.n_blocks])
        spec = compress_blocks(self.base_spec, chosen, 0, kind="identity")
        name = candidate_name(
            "practise",
            1.0 - self.geom.count(spec.blocks).linear_norm / self.base_macs.linear_norm,
            structure_tag("practise", p.n_blocks),
        )
        fp = fingerprint({**self.common, "name": name, "chosen": chosen})
        done = self._existing(name, fp)
        if done is not None:
            return done
        self._announce(item, items, f"{name}: drop blocks {chosen}")
        student = reshape(self.teacher, self.base_spec, spec, self.teacher)
        recipe = {
            "fingerprint": fp,
            "dropped": chosen,
            "trainable_upto": self.cfg.trainable_for("practise", max(chosen)),
            "ranking_scores": {str(b): s for b, s in ranking.scores.items()},
        }
        return save_candidate(self.out, self._record(name, p.target, spec, recipe), student)

    def train(self, cand: Candidate, prev: Candidate | None = None) -> Candidate:
        return self.settle([self.training(cand, prev)])[0]

    def training(self, cand: Candidate, prev: Candidate | None = None) -> Training:
        """Structure ``cand`` finetuned: ``<name>.trained`` (reused when on disk with the same
        fingerprint; the original is returned as it is). One-shot procedures finetune the
        structure's weights; ``reuse`` warm-starts from ``prev``, the trained neighbour of the
        same method; ``progressive`` redoes the surgery from the teacher a block at a time."""
        if cand.state == "trained":
            return cand
        r, sched, seed = cand.recipe, self.cfg.schedule, self.cfg.seed
        warm = prev if self.cfg.reuse and prev is not None and prev.name != ORIGINAL else None
        stem = f"{cand.name}.trained"
        fp = fingerprint([r["fingerprint"], cand.weights_sha256, warm and warm.weights_sha256])
        done = self._existing(stem, fp)
        if done is not None:
            return done
        t0 = time.perf_counter()
        refits, name = r.get("refit", []), cand.name
        if cand.method == "practise":
            student = build_candidate(cand, self.out / cand.weights)
            stages = [(yield name, student, sched, r["trainable_upto"], seed)]
        elif warm is not None:
            chosen = r["blocks"]
            student = reshape(
                build_candidate(warm, self.out / warm.weights), warm.arch, cand.arch, self.teacher
            )
            fresh = [b for b in chosen if warm.arch.blocks[b].kind == "attn_mlp"]
            refits = self._refit(student, fresh) if self.cfg.refit else []
            upto = self.cfg.trainable_for("dcvit", max(chosen))
            sched = _scaled(sched, self.cfg.warm_fraction)
            stages = [{"blocks": chosen, **(yield name, student, sched, upto, seed)}]
        elif not self.cfg.progressive:
            chosen = r["blocks"]
            student = build_candidate(cand, self.out / cand.weights)
            upto = self.cfg.trainable_for("dcvit", max(chosen))
            stages = [{"blocks": chosen, **(yield name, student, sched, upto, seed + 1)}]
        else:  # one block at a time, best first, finetune after each
            chosen, refits, stages = r["blocks"], [], []
            student, spec = copy.deepcopy(self.teacher), self.base_spec
            for k in range(1, len(chosen) + 1):
                step_spec = compress_blocks(self.base_spec, chosen[:k], r["hidden"], self.chooser)
                student, spec = reshape(student, spec, step_spec, self.teacher), step_spec
                if self.cfg.refit:
                    refits += self._refit(student, [chosen[k - 1]])
                upto = self.cfg.trainable_for("dcvit", max(chosen[:k]))
                report = self._reporter(f"{name} ({k}/{len(chosen)})")
                args = (student, self.teacher, self._train_data(), sched, upto, seed + k)
                stage = finetune_task(*args, self.device, report)[1]
                self.steps += stage["steps"]
                stages.append({"blocks": chosen[:k], **stage})
        recipe = {
            **r,
            "fingerprint": fp,
            "trained_from": cand.weights_sha256,
            "warm_from": warm.name if warm else None,
            "refit": refits,
            "finetune": stages,
            "schedule": to_dict(self.cfg.schedule),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return save_candidate(
            self.out, replace(cand, recipe=recipe, state="trained"), student, stem
        )


def family_engines(
    teacher: nn.Module, *, config: FamilyConfig, **inputs: Any
) -> dict[str, FamilyEngine]:
    """One :class:`FamilyEngine` per method of ``config``; ``inputs``: its other arguments."""
    return {
        m: FamilyEngine(teacher, config=replace(config, method=m, methods=()), **inputs)
        for m in config.all_methods
    }


def train_family(
    engines: dict[str, FamilyEngine], candidates: Sequence[Candidate]
) -> list[Candidate]:
    """``candidates`` (structures) finetuned, in order. They are independent unless the
    procedure chains (``reuse`` warm-starts each from the previous trained candidate of its
    method), so each engine's executor may run them as tasks; the result is the same whichever
    executor ran them."""
    done: dict[str, Candidate] = {}
    for m, fam in engines.items():
        mine = [c for c in candidates if c.method == m]
        if fam.cfg.reuse:
            prev = None
            for c in mine:
                done[c.name] = prev = fam.train(c, prev)
        else:
            done.update((c.name, c) for c in fam.settle([fam.training(c) for c in mine]))
    return [done.get(c.name, c) for c in candidates]


def compress_family(teacher: nn.Module, *, train: bool = True, **inputs: Any) -> FamilyResult:
    """Every target's structure at once (ranking, surgery, closed-form re-fit: no finetune),
    then, with ``train``, every structure finetuned (:func:`train_family`).

    ``inputs``: the keyword arguments of :class:`FamilyEngine`. Every target is validated before
    any work starts. Returns the candidates in order of increasing reduction (the original
    first when ``config.include_original``), every method interleaved by size, and writes
    ``family.json``; a rerun resumes from what is on disk.
    """
    config: FamilyConfig = inputs["config"]
    preview = preview_family(teacher, config)
    fams = family_engines(teacher, **inputs)
    t0 = time.perf_counter()
    first = fams[config.all_methods[0]]
    cands = [first.original()] if config.include_original else []
    items, item = len(preview.candidates), 0
    calib = first.calibration
    for m, fam in fams.items():
        t_m = time.perf_counter()
        fam.calibration = fam.calibration if fam.calibration is not None else calib
        mine = [p for p in preview.candidates if p.method == m]
        build = fam.dcvit_structure if m == "dcvit" else fam.practise_structure
        for p in mine:
            item += 1
            shared = fam.cfg.reuse or fam.cfg.shared_ranking
            cands.append(build(p, mine[len(mine) // 2].hidden if shared else p.hidden, item, items))
        calib = fam.calibration  # share the bank (and its cost) with the next method
        fam.seconds[f"method_{m}"] = time.perf_counter() - t_m
    cands.sort(key=lambda c: (c.name != ORIGINAL, c.reduction, c.name))
    t_train = time.perf_counter()
    if train:
        cands = train_family(fams, cands)
    seconds: dict[str, float] = {"train": time.perf_counter() - t_train}
    for m, fam in fams.items():
        for k, v in fam.seconds.items():
            key = k if len(fams) == 1 or k.startswith("method_") else f"{m}_{k}"
            seconds[key] = seconds.get(key, 0.0) + v
    seconds["total"] = time.perf_counter() - t0
    index = {
        "candidates": [c.key + ".json" for c in cands],
        "config": to_dict(config),
        "seconds": seconds,
        "duplicates": preview.duplicates,
    }
    atomic_write_json(first.out / "family.json", index)
    return FamilyResult(
        candidates=cands,
        rankings={w: r for f in fams.values() for w, r in f.rankings.items()},
        seconds=seconds,
        finetune_steps=sum(f.steps for f in fams.values()),
    )


def calibration_bank(data: Any, *, seed: int = 0) -> torch.Tensor:
    """One seeded pass over a Dataset stacked into one tensor (a ``[N,3,H,W]`` tensor as it is):
    a fixed set of (possibly augmented) views for the closed-form re-fit."""
    if isinstance(data, torch.Tensor):
        return data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = random.getstate()
        random.seed(seed)
        try:
            imgs = [_image_of(data[i]) for i in range(len(data))]
        finally:
            random.setstate(state)
    return torch.stack(imgs)


def load_family(out_dir: str | Path) -> list[Candidate]:
    """The candidates listed in ``family.json`` (written last by :func:`compress_family`)."""
    data = read_json(Path(out_dir) / "family.json", _FamilyList, what="family list",
                     fix="run compression first")  # fmt: skip
    return [read_candidate(Path(out_dir) / n) for n in data["candidates"]]


@dataclass(frozen=True)
class _FamilyList:
    """The layout of ``family.json``: the candidates' spec files, in order."""

    candidates: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in self.candidates:
            safe_name(name.removesuffix(".json"), "candidate spec")
