"""Block selection by recoverability (DC-ViT Step 3).

Each candidate block is compressed alone (FFN-only at width h'), recovered, and scored by
KL(teacher || student) on the metric set; lower is more recoverable. How it is recovered is the
``criterion`` (:data:`RANK_CRITERIA`):

- ``"finetune"`` -- the paper: feature-mimicking finetune of blocks 0..b+1 on the few-shot
  images (``schedule``), the frozen tail run at every step;
- ``"refit"`` -- the closed-form re-fit of the block's fc2 only (:mod:`.refit`), no training;
- ``"refit_finetune"`` -- the re-fit, then the finetune (usually with few steps);
- ``"local"`` -- the re-fit, then ``schedule.iterations`` steps training blocks b and b+1 to
  reproduce the teacher's output of block b+1 from the teacher's input of block b, on a fixed
  bank of calibration tokens (the frozen tail is never run).

Scores are persisted after every block, so an interrupted ranking resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from dcvit_deploy.compress.finetune import (
    FinetuneProgress,
    FinetuneSchedule,
    _preserved_modes,
    _preserved_requires_grad,
    feature_mimic,
    kl_score,
)
from dcvit_deploy.compress.refit import DEFAULT_RIDGE, block_streams, refit_blocks
from dcvit_deploy.compress.surgery import apply_spec, compress_blocks
from dcvit_deploy.progress import ProgressEvent, ProgressFn, quiet
from dcvit_deploy.store.atomic import atomic_write_json
from dcvit_deploy.store.records import ArchSpec

RankCriterion = Literal["finetune", "refit", "refit_finetune", "local"]
RANK_CRITERIA: tuple[str, ...] = ("finetune", "refit", "refit_finetune", "local")


@dataclass(frozen=True)
class BlockRanking:
    """Per-block recoverability scores (lower = easier to recover) and the resulting order."""

    scores: dict[int, float]
    hidden: int
    criterion: str
    seconds: float

    @property
    def order(self) -> tuple[int, ...]:
        return tuple(sorted(self.scores, key=lambda b: (self.scores[b], b)))


def finetune_reporter(
    progress: ProgressFn, remote: bool, stage: str, item: int = 0, items: int = 0
) -> Callable[[FinetuneProgress], None] | None:
    """A finetune's steps as ``stage`` events of ``progress``; ``None`` where the finetune runs
    remotely (its task cannot call back)."""

    def on_step(p: FinetuneProgress) -> None:
        progress(ProgressEvent(stage=stage, item=item, items=items, step=p.step, steps=p.total,
                               loss=p.loss, eta_s=p.eta))  # fmt: skip

    return None if remote else on_step


def default_candidate_blocks(depth: int) -> tuple[int, ...]:
    """The reference choice: every block but the first and the last (all, for depth <= 2)."""
    return tuple(range(1, depth - 1)) if depth > 2 else tuple(range(depth))


def _load_partial(path: Path | None, key: str) -> dict[int, float]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("key") != key:
        return {}
    return {int(k): float(v) for k, v in data.get("scores", {}).items()}


def score_block(
    b: int,
    teacher: nn.Module,
    base_spec: ArchSpec,
    data: Any,
    metric_images: torch.Tensor,
    hidden: int,
    chooser: Callable[[int, int], Sequence[int]],
    schedule: FinetuneSchedule,
    seed: int,
    criterion: str,
    calibration: torch.Tensor | None,
    streams: list[torch.Tensor] | None,
    ridge: float,
    device: torch.device | str | None,
    progress: Callable[[FinetuneProgress], None] | None = None,
) -> float:
    """Block ``b``'s recoverability score (an executor task: pure, seeded by ``seed + b``)."""
    student = apply_spec(teacher, compress_blocks(base_spec, [b], hidden, chooser))
    if streams is not None:
        refit_blocks(student, teacher, cast(torch.Tensor, calibration), [b], ridge=ridge,
                     teacher_streams=streams)  # fmt: skip
    if criterion == "local":
        local_mimic(student, streams or [], b, schedule, seed=seed + b)
    elif criterion != "refit":
        feature_mimic(student, teacher, data, schedule, trainable_upto=b, device=device,
                      seed=seed + b, progress=progress)  # fmt: skip
    return kl_score(student, teacher, metric_images, device=device)


def rank_blocks(
    teacher: nn.Module,
    base_spec: ArchSpec,
    data: Any,
    metric_images: torch.Tensor,
    *,
    candidates: Sequence[int],
    hidden: int,
    chooser: Callable[[int, int], Sequence[int]],
    schedule: FinetuneSchedule,
    seed: int,
    device: torch.device | str | None = None,
    cache: Path | None = None,
    cache_key: str = "",
    progress: ProgressFn = quiet,
    criterion: RankCriterion = "finetune",
    calibration: torch.Tensor | None = None,
    ridge: float = DEFAULT_RIDGE,
    executor: Any = None,
) -> BlockRanking:
    """Score every block in ``candidates`` by DC-ViT recoverability at width ``hidden``, each
    one task of ``executor`` (default: here, in order). Every ``criterion`` but ``"finetune"``
    needs ``calibration`` images. ``cache`` (JSON) receives the scores as blocks finish, with
    ``cache_key``; a later call with the same key skips the blocks already scored."""
    from dcvit_deploy.pipeline.executor import LocalExecutor

    if criterion not in RANK_CRITERIA:
        raise ValueError(f"unknown ranking criterion {criterion!r}; use one of {RANK_CRITERIA}")
    if criterion != "finetune" and calibration is None:
        raise ValueError(f"ranking criterion {criterion!r} needs calibration images")
    scores = _load_partial(cache, cache_key)
    start = time.perf_counter()
    todo = [b for b in candidates if b not in scores]
    streams = None
    if todo and criterion != "finetune":
        streams = block_streams(teacher, cast(torch.Tensor, calibration))
    ex = executor or LocalExecutor()
    common = (teacher, base_spec, data, metric_images, hidden, chooser, schedule, seed)
    rest = (criterion, calibration, streams, ridge, device)
    gpu = str(device).startswith("cuda")
    tasks = []
    for k, b in enumerate(todo, start=1):
        report = finetune_reporter(progress, ex.remote, f"rank block {b}", k, len(todo))
        tasks.append(ex.task(f"rank block {b}", score_block, (b, *common, *rest, report), gpu))
    for k, (task, score) in enumerate(ex.map(tasks), start=1):
        b = task.args[0]
        progress(ProgressEvent(stage=f"rank block {b} ({criterion})", item=k, items=len(todo)))
        scores[b] = score
        if cache is not None:
            atomic_write_json(cache, {"key": cache_key, "hidden": hidden, "scores": scores})
    return BlockRanking(
        scores={b: scores[b] for b in candidates if b in scores},
        hidden=hidden,
        criterion=f"kl_after_{criterion}",
        seconds=time.perf_counter() - start,
    )


def local_mimic(
    student: nn.Module,
    streams: list[torch.Tensor],
    block: int,
    schedule: FinetuneSchedule,
    *,
    seed: int = 0,
) -> None:
    """Train ``student.blocks[block]`` and the next one in place to map the teacher's tokens
    entering ``block`` to those leaving ``block + 1`` (``streams``: :func:`.refit.block_streams`),
    with the schedule's batch, AdamW and lr curve (no loss ramp)."""
    blocks = cast(Any, student).blocks
    last = min(block + 1, len(blocks) - 1)
    pair = nn.Sequential(*(blocks[i] for i in range(block, last + 1)))  # shares, never copies
    x_all, t_all = streams[block], streams[last + 1]
    n = x_all.shape[0]
    opt = torch.optim.AdamW(
        pair.parameters(),
        lr=schedule.lr_at(0),
        betas=schedule.betas,
        weight_decay=schedule.weight_decay,
    )
    g = torch.Generator().manual_seed(seed)
    with _preserved_requires_grad(pair), _preserved_modes(pair):
        pair.requires_grad_(True)
        pair.eval()
        for step in range(schedule.iterations):
            for group in opt.param_groups:
                group["lr"] = schedule.lr_at(step)
            idx = torch.randint(0, n, (min(schedule.batch_size, n),), generator=g)
            loss = F.mse_loss(pair(x_all[idx]), t_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
