"""What a dense family holds and how it is built, known before any work: the procedures
(:data:`PROCEDURES`, the paper's and ours), :class:`FamilyConfig`, the candidates' names and
:func:`preview_family`, which plans every candidate from the teacher's shape alone.
:mod:`.family` builds and trains them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from torch import nn

from dcvit_deploy.compress.finetune import FinetuneSchedule
from dcvit_deploy.compress.macs import geometry_of
from dcvit_deploy.compress.plan import StructurePlan, plan_family
from dcvit_deploy.compress.practise import blocks_for_target
from dcvit_deploy.compress.recoverability import RANK_CRITERIA, default_candidate_blocks
from dcvit_deploy.compress.refit import DEFAULT_RIDGE
from dcvit_deploy.compress.surgery import NEURON_CHOICES
from dcvit_deploy.config.options import METHODS
from dcvit_deploy.errors import UserInputError
from dcvit_deploy.store.records import BlockSpec

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
    # Chosen on the Fashion-MNIST benchmark (benchmarks/results/compression_quality.md): one
    # ranking (middle width) by re-fit + a 20-step finetune per block (the paper's top blocks at a
    # third of its cost; the re-fit alone picked worse ones), one-shot surgery + re-fit, one short
    # finetune per candidate on cached teacher features.
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
"""How a family is built, by schedule preset name (:func:`procedure`); the field defaults of
:class:`FamilyConfig` equal ``"default"``."""


def procedure(preset: str) -> dict[str, Any]:
    """The :class:`FamilyConfig` fields of a schedule preset (``paper``; anything else gets the
    ``default`` procedure)."""
    return dict(PROCEDURES["paper" if preset == "paper" else "default"])


def _one_of(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise UserInputError(f"unknown {what} {value!r}", f"use one of {', '.join(choices)}")


@dataclass(frozen=True)
class FamilyConfig:
    """Everything that decides what a family contains and how it is trained."""

    schedule: FinetuneSchedule
    targets: tuple[float, ...]
    method: str = "dcvit"
    rank_schedule: FinetuneSchedule | None = None
    round_to: int = 1
    candidate_blocks: tuple[int, ...] | None = None
    neuron_choice: str = "random"
    # Warm-start each target from its neighbouring trained candidate (kept neurons are nested
    # across widths) for ``warm_fraction`` of a schedule; off: every target from the teacher.
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
            _one_of(m, METHODS, "method")
        if len(set(self.methods)) != len(self.methods):
            raise UserInputError(
                f"method listed twice in {','.join(self.methods)}", "list each method once"
            )
        _one_of(self.rank_criterion, RANK_CRITERIA, "ranking criterion")
        _one_of(self.trainable, TRAINABLE, "trainable range")
        _one_of(self.neuron_choice, NEURON_CHOICES, "neuron choice")
        if self.rank_iterations is not None and self.rank_iterations < 1:
            raise UserInputError("rank_iterations must be >= 1", "pass e.g. 20, or None")
        if self.bank_views < 0:
            raise UserInputError("bank_views must be >= 0", "pass e.g. 8, or 0 for no bank")
        if self.refit_ridge < 0:
            raise UserInputError("refit_ridge must be >= 0", "pass e.g. 1e-4")
        if not self.targets:
            raise UserInputError("no compression targets given", "pass e.g. --targets 5%:50%:5%")
        if not 0 < self.warm_fraction <= 1:
            raise UserInputError("warm_fraction must be in (0, 1]", "pass e.g. --warm-fraction 0.5")
        if self.round_to < 1:
            raise UserInputError("round_to must be >= 1", "pass e.g. --round-to 8")

    @property
    def ranking_schedule(self) -> FinetuneSchedule:
        """``rank_schedule``, else ``schedule`` shortened to ``rank_iterations`` (if fewer)."""
        if self.rank_schedule is not None:
            return self.rank_schedule
        if self.rank_iterations is not None and self.rank_iterations < self.schedule.iterations:
            it = self.rank_iterations
            warmup = min(it, max(1, round(0.05 * it)))
            return replace(self.schedule, iterations=it, lr_warmup_iterations=warmup)
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

    def blocks(self, depth: int) -> tuple[int, ...]:
        """The blocks a candidate may compress in a model of ``depth`` blocks (checked)."""
        blocks = self.candidate_blocks or default_candidate_blocks(depth)
        bad = [b for b in blocks if not 0 <= b < depth]
        if bad:
            raise UserInputError(
                f"candidate blocks {bad} do not exist (model depth {depth})",
                f"choose blocks in 0..{depth - 1}",
            )
        return blocks


def candidate_name(method: str, reduction: float, structure: str = "") -> str:
    """``dcvit-1655-n3h123`` for 16.55% by compressing 3 blocks to width 123: sorts by size,
    survives any file system, and -- with ``structure`` (:func:`structure_tag`) -- is unique for
    every distinct structure whatever the reduction's rounding."""
    base = f"{method}-{round(reduction * 10000):04d}"
    return f"{base}-{structure}" if structure else base


def structure_tag(method: str, n_blocks: int, hidden: int = 0) -> str:
    """``n3h123`` (DC-ViT: blocks made FFN-only, their width) or ``d2`` (blocks dropped)."""
    return f"d{n_blocks}" if method == "practise" else f"n{n_blocks}h{hidden}"


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
    """The candidates a config plans, and in ``duplicates`` each ``"<method>@<target>"`` that
    plans to the same structure as a smaller target of its method, with the name both share."""

    candidates: list[PlannedCandidate]
    duplicates: dict[str, str]


def preview_family(teacher: nn.Module, config: FamilyConfig) -> FamilyPreview:
    """Plan every candidate of ``config`` from the teacher's shape alone (no data, no training),
    in order of method then reduction; raises :class:`UserInputError` naming the feasible range
    for a target a method cannot reach."""
    geom = geometry_of(teacher)
    depth = len(cast(Any, teacher).blocks)
    n_blocks = len(config.blocks(depth))
    targets = sorted(config.targets)
    out: list[PlannedCandidate] = []
    dups: dict[str, str] = {}
    for m in config.all_methods:
        seen: dict[tuple[int, int], str] = {}
        planned: list[tuple[float, int, int, float, StructurePlan | None]]  # t, n, h', achieved
        if m == "dcvit":
            plans = plan_family(geom, depth, targets, max_blocks=n_blocks, round_to=config.round_to)
            planned = [
                (t, p.n_blocks, p.hidden, p.achieved, p)
                for t, p in zip(targets, plans, strict=True)
            ]
        else:
            full = BlockSpec(kind="attn_mlp", mlp_hidden=geom.base_mlp_hidden)
            block_macs = geom.block_macs(full)[0]
            base = geom.count([full] * depth).linear_norm
            ks = [blocks_for_target(t, block_macs / base, n_blocks) for t in targets]
            planned = [
                (t, k, 0, k * block_macs / base, None) for t, k in zip(targets, ks, strict=True)
            ]
        for t, k, hidden, achieved, plan in planned:
            if (k, hidden) in seen:
                dups[f"{m}@{t:.6g}"] = seen[(k, hidden)]
                continue
            name = seen[(k, hidden)] = candidate_name(m, achieved, structure_tag(m, k, hidden))
            out.append(PlannedCandidate(name, m, t, k, hidden, achieved, plan))
    return FamilyPreview(candidates=out, duplicates=dups)
