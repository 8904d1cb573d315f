"""Block selection by recoverability (DC-ViT Step 3).

Each candidate block is compressed alone (FFN-only at width h'), finetuned by feature mimicking
on the few-shot images, and scored by KL(teacher || student) on the metric set; lower is more
recoverable. Scores are persisted after every block, so an interrupted ranking resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_json
from ..progress import ProgressEvent, ProgressFn, quiet
from ..records import ArchSpec
from .finetune import FinetuneProgress, FinetuneSchedule, feature_mimic, kl_score
from .surgery import apply_spec, compress_blocks


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
    should_stop: Callable[[], bool] | None = None,
) -> BlockRanking:
    """Score every block in ``candidates`` by DC-ViT recoverability at width ``hidden``.

    ``cache`` (a JSON file) receives the scores after each block together with ``cache_key``;
    a later call with the same key skips the blocks already scored.
    """
    scores = _load_partial(cache, cache_key)
    start = time.perf_counter()
    todo = [b for b in candidates if b not in scores]
    for k, b in enumerate(todo, start=1):
        spec = compress_blocks(base_spec, [b], hidden, chooser)
        student = apply_spec(teacher, spec)

        def report(p: FinetuneProgress, k: int = k, b: int = b) -> None:
            progress(
                ProgressEvent(
                    stage=f"rank block {b}",
                    item=k,
                    items=len(todo),
                    step=p.step,
                    steps=p.total,
                    loss=p.loss,
                    eta_s=p.eta,
                )
            )

        feature_mimic(
            student,
            teacher,
            data,
            schedule,
            trainable_upto=b,
            device=device,
            seed=seed + b,
            progress=report,
            should_stop=should_stop,
        )
        if should_stop is not None and should_stop():
            break
        scores[b] = kl_score(student, teacher, metric_images, device=device)
        if cache is not None:
            atomic_write_json(cache, {"key": cache_key, "hidden": hidden, "scores": scores})
    return BlockRanking(
        scores={b: scores[b] for b in candidates if b in scores},
        hidden=hidden,
        criterion="kl_after_finetune",
        seconds=time.perf_counter() - start,
    )
