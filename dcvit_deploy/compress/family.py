"""Dense candidate families in one call (DC-ViT Steps 1-4 over many targets, or PRACTISE).

Measure first, train what is chosen: after ranking, every target's *structure* is built at once
from the pretrained weights (surgery plus the closed-form re-fit: seconds, no finetune) and
written with state ``structure``; latency depends on the structure, not on weight values, so
the whole family can be measured before any of it is trained. :meth:`_Family.train` finetunes
one structure into ``<name>.trained`` (:func:`train_family` over many); a caller trains the
picks only, or everything (:func:`compress_family` with ``train``).

Work is reused across targets when ``reuse`` is on: blocks are ranked once (at a representative
width) and each target is warm-started from its neighbouring, already-finetuned candidate --
kept neurons are nested across widths, so the neighbour's units carry over and any unit it
lacks comes from the pretrained model -- then finetuned for ``warm_fraction`` of a schedule.
With ``reuse`` off every target is compressed independently, as the paper does: its own
ranking at its own width, then progressive compression from the pretrained model.

Beyond the paper (see :data:`PROCEDURES`): blocks can be ranked without finetuning
(``rank_criterion``), every newly compressed block can get a closed-form re-fit of its fc2 before
finetuning (``refit``, :mod:`.refit`), and a family may hold several methods at once
(``methods=("dcvit", "practise")``), each candidate named after its exact structure.

Every structure and trained candidate is written (safetensors + JSON spec) as soon as it is
finished, with a fingerprint of everything it depends on; a rerun skips those that match.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

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
from dcvit_deploy.compress.plan import StructurePlan, plan_family
from dcvit_deploy.compress.practise import blocks_for_target, rank_blocks_practise
from dcvit_deploy.compress.recoverability import (
    RANK_CRITERIA,
    BlockRanking,
    RankCriterion,
    default_candidate_blocks,
    rank_blocks,
)
from dcvit_deploy.compress.refit import DEFAULT_RIDGE, block_streams, refit_blocks
from dcvit_deploy.compress.surgery import (
    NEURON_CHOICES,
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

Method = Literal["dcvit", "practise"]
METHODS: tuple[str, ...] = ("dcvit", "practise")
ORIGINAL = "original"
Trainable = Literal["paper", "dcvit", "all"]
TRAINABLE: tuple[str, ...] = ("paper", "dcvit", "all")

PROCEDURES: dict[str, dict[str, Any]] = {
    # The paper: rank by a full finetune per block, compress progressively, no re-fit.
    "paper": {
        "rank_criterion": "finetune",
        "rank_iterations": None,
        "shared_ranking": False,
        "refit": False,
        "progressive": True,
        "reuse": False,
        "bank_views": 0,
    },
    # Chosen on the Fashion-MNIST benchmark (benchmarks/results/compression_quality.md): rank
    # once (at the middle width) by re-fit + a 20-step finetune per block -- the same top blocks
    # as the paper's finetune ranking at a third of its cost, where the re-fit alone picked worse
    # blocks (-1.4 points) -- then one-shot surgery + re-fit of the chosen blocks and one short
    # finetune per candidate on cached teacher features (plain views: see FinetuneSchedule.default).
    "default": {
        "rank_criterion": "refit_finetune",
        "rank_iterations": 20,
        "shared_ranking": True,
        "refit": True,
        "progressive": False,
        "reuse": False,
        "bank_views": 1,
    },
}
"""How a family is built, by schedule preset name: pass ``**PROCEDURES[name]`` to
:class:`FamilyConfig` (``"tiny"`` uses ``"default"``). The field defaults equal ``"default"``."""


def procedure(preset: str) -> dict[str, Any]:
    """The :class:`FamilyConfig` fields of a schedule preset (``paper``; anything else gets the
    ``default`` procedure)."""
    return dict(PROCEDURES["paper" if preset == "paper" else "default"])


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
    reuse: bool = PROCEDURES["default"]["reuse"]
    warm_fraction: float = 0.5
    seed: int = 0
    include_original: bool = True
    practise_adaptor_steps: int = 100
    # Several methods in one family (e.g. ("dcvit", "practise")); empty: just ``method``.
    methods: tuple[str, ...] = ()
    # How blocks are ranked: "finetune" (paper), "refit", "refit_finetune", "local".
    rank_criterion: str = PROCEDURES["default"]["rank_criterion"]
    # Closed-form re-fit of each newly compressed block's fc2 before finetuning.
    refit: bool = PROCEDURES["default"]["refit"]
    refit_ridge: float = DEFAULT_RIDGE
    # Compress the chosen blocks one at a time with a finetune after each (paper), or at once.
    progressive: bool = PROCEDURES["default"]["progressive"]
    # What the finetune trains: "paper" = each method's own setting (DC-ViT: blocks
    # 0..deepest+1; PRACTISE: all), "dcvit" = blocks 0..deepest modified+1, "all" = everything.
    trainable: str = "paper"
    # > 0: finetune on a fixed bank of this many passes of augmented views with the teacher's
    # features computed once (TeacherFeatureBank); 0: fresh views and a teacher pass every step.
    bank_views: int = PROCEDURES["default"]["bank_views"]
    # Rank blocks once, at the middle candidate's width, even without ``reuse``.
    shared_ranking: bool = PROCEDURES["default"]["shared_ranking"]
    # Steps of each ranking finetune when ``rank_schedule`` is not given (None: ``schedule``).
    rank_iterations: int | None = PROCEDURES["default"]["rank_iterations"]

    def __post_init__(self) -> None:
        for m in (self.method, *self.methods):
            if m not in METHODS:
                raise UserInputError(f"unknown method {m!r}", f"use one of {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise UserInputError(
                f"method listed twice in {','.join(self.methods)}", "list each method once"
            )
        if self.rank_criterion not in RANK_CRITERIA:
            raise UserInputError(
                f"unknown ranking criterion {self.rank_criterion!r}",
                f"use one of {', '.join(RANK_CRITERIA)}",
            )
        if self.trainable not in TRAINABLE:
            raise UserInputError(
                f"unknown trainable range {self.trainable!r}", f"use one of {', '.join(TRAINABLE)}"
            )
        if self.rank_iterations is not None and self.rank_iterations < 1:
            raise UserInputError("rank_iterations must be >= 1", "pass e.g. 20, or None")
        if self.bank_views < 0:
            raise UserInputError("bank_views must be >= 0", "pass e.g. 8, or 0 for no bank")
        if self.refit_ridge < 0:
            raise UserInputError("refit_ridge must be >= 0", "pass e.g. 1e-4")
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
        """``rank_schedule``, else ``schedule`` shortened to ``rank_iterations``, else
        ``schedule``."""
        if self.rank_schedule is not None:
            return self.rank_schedule
        if self.rank_iterations is not None and self.rank_iterations < self.schedule.iterations:
            it = self.rank_iterations
            return replace(
                self.schedule,
                iterations=it,
                lr_warmup_iterations=min(it, max(1, round(0.05 * it))),
            )
        return self.schedule

    @classmethod
    def from_preset(cls, preset: str, **fields: Any) -> FamilyConfig:
        """A config with the procedure of schedule preset ``preset`` (:func:`procedure`);
        ``fields`` (schedule, targets, ...) are set on top and win over the procedure's."""
        return cls(**{**procedure(preset), **fields})

    @property
    def all_methods(self) -> tuple[str, ...]:
        """The methods this family holds, in order."""
        return self.methods or (self.method,)

    def trainable_for(self, method: str, deepest: int) -> int | Literal["all"]:
        """The ``trainable_upto`` of a finetune of ``method`` whose deepest change is block
        ``deepest``."""
        if self.trainable == "all" or (self.trainable == "paper" and method == "practise"):
            return "all"
        return deepest


@dataclass
class FamilyResult:
    """The candidates written (original first, then by increasing reduction) and the costs."""

    candidates: list[Candidate]
    rankings: dict[int, BlockRanking]
    seconds: dict[str, float] = field(default_factory=dict)
    finetune_steps: int = 0
    reused: list[str] = field(default_factory=list)


def candidate_name(method: str, reduction: float, structure: str = "") -> str:
    """``dcvit-1655-n3h123`` for 16.55% by compressing 3 blocks to width 123: sorts by size,
    survives any file system, and -- with ``structure`` (:func:`structure_tag`) -- is unique for
    every distinct structure whatever the reduction's rounding."""
    base = f"{method}-{round(reduction * 10000):04d}"
    return f"{base}-{structure}" if structure else base


def structure_tag(method: str, n_blocks: int, hidden: int = 0) -> str:
    """``n3h123`` (DC-ViT: blocks made FFN-only, their width) or ``d2`` (blocks dropped)."""
    return f"d{n_blocks}" if method == "practise" else f"n{n_blocks}h{hidden}"


def _scaled(schedule: FinetuneSchedule, fraction: float) -> FinetuneSchedule:
    if fraction >= 1:
        return schedule
    it = max(1, round(schedule.iterations * fraction))
    return replace(
        schedule,
        iterations=it,
        lr_warmup_iterations=min(it, round(schedule.lr_warmup_iterations * fraction)),
    )


Training = Generator[tuple[Any, ...], dict[str, Any], Candidate]
"""A structure in training: yields its finetune, returns its candidate (``_Family.settle``)."""


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
        calibration: torch.Tensor | None = None,
        executor: Any = None,
    ) -> None:
        from dcvit_deploy.pipeline.executor import LocalExecutor

        self.executor = executor or LocalExecutor()
        self.teacher = teacher.eval()
        self.calibration = calibration
        self._streams: list[torch.Tensor] | None = None
        self.bank: TeacherFeatureBank | None = None
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
            # which other targets share the family changes no candidate (its own plan and
            # blocks are in its fingerprint), so a new target list reuses every structure
            "config": {k: v for k, v in to_dict(config).items() if k != "targets"},
            "metric": fingerprint([float(metric_images.sum()), list(metric_images.shape)]),
        }
        self.input_fp = input_fingerprint
        self.rankings: dict[int, BlockRanking] = {}
        self.steps = 0
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    # ------------------------------------------------------------------ helpers

    def _reporter(self, label: str) -> Callable[[FinetuneProgress], None] | None:
        def report(p: FinetuneProgress) -> None:
            self.progress(
                ProgressEvent(
                    stage=f"finetune {label}", step=p.step, steps=p.total, loss=p.loss, eta_s=p.eta
                )
            )

        return None if self.executor.remote else report

    def _finetune(
        self, student: nn.Module, schedule: FinetuneSchedule, upto: int | str, label: str, seed: int
    ) -> dict[str, Any]:
        args = (student, self.teacher, self._train_data(), schedule, upto, seed, self.device)
        stage = finetune_task(*args, self._reporter(label))[1]
        self.steps += stage["steps"]
        return stage

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
        stats = refit_blocks(
            student,
            self.teacher,
            calib,
            blocks,
            ridge=self.cfg.refit_ridge,
            teacher_streams=self._streams,
        )
        self.seconds["refit"] = self.seconds.get("refit", 0.0) + time.perf_counter() - t0
        return [
            {"block": st.block, "mse_before": st.mse_before, "mse_after": st.mse_after}
            for st in stats
        ]

    def ranking(self, hidden: int) -> BlockRanking:
        key_width = hidden if self.cfg.method == "dcvit" else 0
        if key_width in self.rankings:
            return self.rankings[key_width]
        t0 = time.perf_counter()
        cfg = self.cfg
        rank_cfg = {  # only what the ranking depends on, so families can share it
            "method": cfg.method,
            "criterion": cfg.rank_criterion if cfg.method == "dcvit" else "adaptor",
            "schedule": to_dict(cfg.ranking_schedule) if cfg.method == "dcvit" else None,
            "adaptor_steps": cfg.practise_adaptor_steps if cfg.method == "practise" else None,
            "neuron_choice": cfg.neuron_choice,
            "seed": cfg.seed,
            "ridge": cfg.refit_ridge if cfg.rank_criterion != "finetune" else None,
        }
        key = fingerprint(
            {
                "teacher": self.common["teacher"],
                "data": self.common["data"],
                "metric": self.common["metric"],
                "rank": rank_cfg,
                "hidden": key_width,
                "blocks": list(self.blocks),
            }
        )
        cache = self.out / f"ranking-{self.cfg.method}-{key_width}-{key[:8]}.json"
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
                criterion=cast(RankCriterion, self.cfg.rank_criterion),
                calibration=None if self.cfg.rank_criterion == "finetune" else self._calib(),
                ridge=self.cfg.refit_ridge,
                executor=self.executor,
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

    def _existing(self, stem: str, fp: str) -> Candidate | None:
        spec = self.out / f"{stem}.json"
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
            state="trained" if name == ORIGINAL else "structure",
        )

    # ------------------------------------------------------------------ steps

    def original(self) -> Candidate:
        fp = fingerprint({**self.common, "name": ORIGINAL})
        done = self._existing(ORIGINAL, fp)
        if done is not None:
            return done
        cand = self._record(ORIGINAL, 0.0, self.base_spec, {"fingerprint": fp, "finetune": None})
        return save_candidate(self.out, cand, self.teacher)

    def dcvit_structure(
        self, plan: StructurePlan, rank_width: int, item: int, items: int
    ) -> Candidate:
        """One target's structure: its best blocks made FFN-only at the planned width, each
        re-fit in closed form (when the procedure re-fits) from the pretrained weights."""
        ranking = self.ranking(rank_width)
        chosen = list(ranking.order[: plan.n_blocks])
        name = candidate_name(
            "dcvit", plan.achieved, structure_tag("dcvit", plan.n_blocks, plan.hidden)
        )
        fp = fingerprint({**self.common, "name": name, "plan": to_dict(plan), "chosen": chosen})
        done = self._existing(name, fp)
        if done is not None:
            return done
        self.progress(
            ProgressEvent(
                stage="compress",
                item=item,
                items=items,
                message=f"{name}: blocks {chosen} -> h'={plan.hidden}",
            )
        )
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
            self.out, self._record(name, plan.target, target_spec, recipe), student
        )

    def practise_structure(self, k: int, target: float, item: int, items: int) -> Candidate:
        """One target's structure: its ``k`` best blocks dropped from the pretrained model."""
        ranking = self.ranking(0)
        chosen = list(ranking.order[:k])
        spec = compress_blocks(self.base_spec, chosen, 0, kind="identity")
        name = candidate_name(
            "practise",
            1.0 - self.geom.count(spec.blocks).linear_norm / self.base_macs.linear_norm,
            structure_tag("practise", k),
        )
        fp = fingerprint({**self.common, "name": name, "chosen": chosen})
        done = self._existing(name, fp)
        if done is not None:
            return done
        self.progress(
            ProgressEvent(
                stage="compress", item=item, items=items, message=f"{name}: drop blocks {chosen}"
            )
        )
        student = reshape(self.teacher, self.base_spec, spec, self.teacher)
        recipe = {
            "fingerprint": fp,
            "dropped": chosen,
            "trainable_upto": self.cfg.trainable_for("practise", max(chosen)),
            "ranking_scores": {str(b): s for b, s in ranking.scores.items()},
        }
        return save_candidate(self.out, self._record(name, target, spec, recipe), student)

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
            self.reused.append(name)
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
                label = f"{name} ({k}/{len(chosen)})"
                stages.append(
                    {"blocks": chosen[:k], **self._finetune(student, sched, upto, label, seed + k)}
                )
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
) -> dict[str, _Family]:
    """One engine per method of ``config``, writing to ``out_dir``; ``executor``
    (:mod:`dcvit_deploy.pipeline.executor`) runs the independent finetunes as tasks.

    ``data``: a Dataset of (augmented) few-shot image tensors for finetuning; ``metric_images``:
    the synthetic (or real held-out) images that score blocks; ``calibration_images``: the
    preprocessed images the closed-form re-fit and the re-fit/local rankings fit on (default:
    one seeded pass over ``data``, see :func:`calibration_bank`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        m: _Family(
            teacher,
            model_name=model_name,
            model_kwargs=model_kwargs,
            data=data,
            metric_images=metric_images,
            out_dir=out,
            config=replace(config, method=cast(Method, m), methods=()),
            teacher_fingerprint=teacher_fingerprint,
            input_fingerprint=input_fingerprint,
            activation_images=activation_images,
            device=device,
            progress=progress,
            calibration=calibration_images,
            executor=executor,
        )
        for m in config.all_methods
    }


def train_family(engines: dict[str, _Family], candidates: Sequence[Candidate]) -> list[Candidate]:
    """``candidates`` (structures) finetuned, in order: the step whose cost grows with the
    family. Its items are independent unless the procedure chains (``reuse`` warm-starts each
    from the previous trained candidate of its method): then the engine's executor runs each
    method's finetunes as tasks, and the result is the same whichever executor ran them."""
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

    ``inputs``: the keyword arguments of :func:`family_engines`. All targets are validated before
    any work starts. Returns the candidates (structures, or trained with ``train``) in order of
    increasing reduction (the original first when ``include_original``), every method of
    ``config.all_methods`` interleaved by size; a rerun resumes from what is on disk.
    """
    config: FamilyConfig = inputs["config"]
    preview = preview_family(teacher, config)  # validates every target of every method first
    fams = family_engines(teacher, **inputs)
    t0 = time.perf_counter()
    first = fams[config.all_methods[0]]
    cands = [first.original()] if config.include_original else []
    items = len(preview.candidates)
    item = 0
    calib = first.calibration
    for m, fam in fams.items():
        t_m = time.perf_counter()
        fam.calibration = fam.calibration if fam.calibration is not None else calib
        mine = [p for p in preview.candidates if p.method == m]
        if m == "dcvit":
            unique = [p.plan for p in mine if p.plan is not None]
            rank_width = unique[len(unique) // 2].hidden
            for plan in unique:
                item += 1
                width = rank_width if (fam.cfg.reuse or fam.cfg.shared_ranking) else plan.hidden
                cands.append(fam.dcvit_structure(plan, width, item, items))
        else:
            for p in mine:
                item += 1
                cands.append(fam.practise_structure(p.n_blocks, p.target, item, items))
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
    atomic_write_json(Path(inputs["out_dir"]) / "family.json", index)
    rankings: dict[int, BlockRanking] = {}
    for fam in fams.values():
        rankings.update(fam.rankings)
    return FamilyResult(
        candidates=cands,
        rankings=rankings,
        seconds=seconds,
        finetune_steps=sum(f.steps for f in fams.values()),
        reused=[r for f in fams.values() for r in f.reused],
    )


@dataclass(frozen=True)
class PlannedCandidate:
    """A candidate a family will hold: its name, method, structure and the target it serves
    (the smallest of the targets that collapse onto it)."""

    name: str
    method: str
    target: float
    n_blocks: int
    hidden: int  # DC-ViT MLP width; 0 for dropped blocks
    achieved: float
    plan: StructurePlan | None = None


@dataclass(frozen=True)
class FamilyPreview:
    """What :func:`compress_family` will build, known before any work.

    ``duplicates`` maps ``"<method>@<target>"`` of every target that plans to the same structure
    as a smaller target of the same method to the candidate name both share (those targets add
    no candidate)."""

    candidates: list[PlannedCandidate]
    duplicates: dict[str, str]


def preview_family(teacher: nn.Module, config: FamilyConfig) -> FamilyPreview:
    """Plan every candidate of ``config`` from the teacher's shape alone (no data, no training).

    Validates every target of every method (raises :class:`UserInputError` naming the feasible
    range); returns the unique candidates, in order of method then reduction, and the targets
    that collapse onto an earlier one. Cheap: call it before any work to warn about duplicates.
    """
    geom = geometry_of(teacher)
    depth = len(cast(Any, teacher).blocks)
    blocks = config.candidate_blocks or default_candidate_blocks(depth)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise UserInputError(
            f"candidate blocks {bad} do not exist (model depth {depth})",
            f"choose blocks in 0..{depth - 1}",
        )
    targets = sorted(config.targets)
    out: list[PlannedCandidate] = []
    dups: dict[str, str] = {}
    for m in config.all_methods:
        seen: dict[tuple[int, int], str] = {}
        if m == "dcvit":
            plans = plan_family(
                geom, depth, targets, max_blocks=len(blocks), round_to=config.round_to
            )
            for t, p in zip(targets, plans, strict=True):
                key = (p.n_blocks, p.hidden)
                if key in seen:
                    dups[f"{m}@{t:.6g}"] = seen[key]
                    continue
                name = candidate_name(m, p.achieved, structure_tag(m, p.n_blocks, p.hidden))
                seen[key] = name
                out.append(PlannedCandidate(name, m, t, p.n_blocks, p.hidden, p.achieved, p))
        else:
            from dcvit_deploy.store.records import BlockSpec

            full = BlockSpec(kind="attn_mlp", mlp_hidden=geom.base_mlp_hidden)
            base = geom.count([full] * depth).linear_norm
            block_frac = geom.block_macs(full)[0] / base
            for t in targets:
                k = blocks_for_target(t, block_frac, len(blocks))
                if (k, 0) in seen:
                    dups[f"{m}@{t:.6g}"] = seen[(k, 0)]
                    continue
                achieved = k * geom.block_macs(full)[0] / base
                name = candidate_name(m, achieved, structure_tag(m, k))
                seen[(k, 0)] = name
                out.append(PlannedCandidate(name, m, t, k, 0, achieved))
    return FamilyPreview(candidates=out, duplicates=dups)


def calibration_bank(data: Any, *, seed: int = 0, views: int = 1) -> torch.Tensor:
    """``views`` seeded passes over a Dataset (or ``[N,3,H,W]`` tensor) stacked into one tensor:
    a fixed set of (possibly augmented) views for the closed-form re-fit."""
    if isinstance(data, torch.Tensor):
        return data
    import random

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = random.getstate()
        random.seed(seed)
        try:
            imgs = [_image_of(data[i]) for _ in range(views) for i in range(len(data))]
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
