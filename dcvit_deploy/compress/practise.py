"""PRACTISE-style whole-block dropping, the few-shot baseline, on the same machinery.

Scoring (per block): drop the block, put an identity-initialised linear adaptor in the gap,
train only the adaptor by feature MSE on the few-shot images, and measure the remaining feature
error on the metric set ("recoverability"); every ViT block saves the same latency, so the
score is the error itself. The k most recoverable blocks are dropped at once and the whole model
is finetuned by feature mimicking. The adaptors serve scoring only: in a ViT they cannot be
folded into the next block (its LayerNorm sits in between), so the final model drops the blocks
outright and relies on the whole-model finetune.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from dcvit_deploy.compress.finetune import _image_of, feature_error
from dcvit_deploy.compress.recoverability import BlockRanking, _load_partial
from dcvit_deploy.progress import ProgressEvent, ProgressFn, quiet
from dcvit_deploy.store.atomic import atomic_write_json


class AdaptedGap(nn.Module):
    """A dropped block replaced by a linear adaptor initialised to the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.adaptor = nn.Linear(dim, dim)
        with torch.no_grad():
            self.adaptor.weight.copy_(torch.eye(dim))
            self.adaptor.bias.zero_()

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.adaptor(x)


def _train_adaptor(
    student: nn.Module,
    teacher: nn.Module,
    batches: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
) -> None:
    params = [p for n, p in student.named_parameters() if "adaptor" in n]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    student.eval()
    # timm's forward_features is dynamic on nn.Module (typed Tensor | Module): cast(Any, ...)
    for _ in range(steps):
        x = batches()
        with torch.no_grad():
            target = cast(Any, teacher).forward_features(x)
        loss = torch.nn.functional.mse_loss(cast(Any, student).forward_features(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def rank_blocks_practise(
    teacher: nn.Module,
    data: Any,
    metric_images: torch.Tensor,
    *,
    candidates: Sequence[int],
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    cache: Any = None,
    cache_key: str = "",
    progress: ProgressFn = quiet,
) -> BlockRanking:
    """Score blocks by feature error after dropping each and training an adaptor in its place."""
    scores = _load_partial(cache, cache_key)
    start = time.perf_counter()
    device = next(teacher.parameters()).device
    teacher.eval()
    g = torch.Generator().manual_seed(seed)
    n = len(data)

    def batches() -> torch.Tensor:
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        return torch.stack([_image_of(data[int(i)]) for i in idx]).to(device)

    todo = [b for b in candidates if b not in scores]
    for k, b in enumerate(todo, start=1):
        progress(ProgressEvent(stage=f"practise score block {b}", item=k, items=len(todo)))
        student = copy.deepcopy(teacher)
        # timm attributes are dynamic: nn.Module types them Tensor | Module
        cast(Any, student).blocks[b] = AdaptedGap(int(cast(Any, teacher).embed_dim)).to(device)
        _train_adaptor(student, teacher, batches, steps, lr)
        scores[b] = feature_error(student, teacher, metric_images, device=device)
        if cache is not None:
            atomic_write_json(cache, {"key": cache_key, "scores": scores})
    return BlockRanking(
        scores={b: scores[b] for b in candidates if b in scores},
        hidden=0,
        criterion="feature_error_with_adaptor",
        seconds=time.perf_counter() - start,
    )


def blocks_for_target(target: float, block_fraction: float, max_blocks: int) -> int:
    """How many whole blocks to drop to come closest to ``target`` (at least 1)."""
    return min(max_blocks, max(1, round(target / block_fraction)))
