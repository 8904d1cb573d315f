"""Closed-form re-fit of compressed blocks from unlabeled calibration tokens (no training).

With the kept fc1 rows fixed, an FFN-only block ``y = x + ls2(fc2(h))``, ``h = act(fc1(norm2(x)))``,
is linear in fc2, so the fc2 that best reproduces the original block's output ``t`` is a ridge
regression of ``ls2⁻¹(t − x)`` on ``[h, 1]`` (CORP / NuWa style), applied before or instead of
finetuning. Blocks are re-fitted in depth order on the *student's* own token stream, so each fit
also absorbs the drift the shallower blocks left. Relies on timm's stable attribute names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from dcvit_deploy.compress.surgery import FFNBlock
from dcvit_deploy.errors import UnsupportedModelError

DEFAULT_RIDGE = 1e-4
"""Ridge strength, relative to the mean diagonal of the Gram matrix of the hidden activations."""


@dataclass(frozen=True)
class RefitStats:
    """Per-block result: mean squared error of the block output on the calibration tokens
    before (surgery only) and after the re-fit, and the number of tokens fitted."""

    block: int
    mse_before: float
    mse_after: float
    tokens: int


@torch.no_grad()
def tokens_before(model: nn.Module, images: torch.Tensor, block: int) -> torch.Tensor:
    """The token stream entering ``model.blocks[block]`` (``[N, T, D]``) for ``images``."""
    m = cast(Any, model)
    for name in ("patch_embed", "_pos_embed", "blocks"):
        if not hasattr(m, name):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no {name!r}", "use a plain timm VisionTransformer"
            )
    x = m.patch_embed(images)
    x = m._pos_embed(x)
    if hasattr(m, "patch_drop"):
        x = m.patch_drop(x)
    if hasattr(m, "norm_pre"):
        x = m.norm_pre(x)
    for blk in m.blocks[:block]:
        x = blk(x)
    return x


@torch.no_grad()
def block_streams(model: nn.Module, images: torch.Tensor, batch: int = 128) -> list[torch.Tensor]:
    """Tokens entering every block and leaving the last: ``depth + 1`` tensors ``[N, T, D]``."""
    was = model.training
    model.eval()
    outs: list[list[torch.Tensor]] = []
    try:
        for chunk in images.split(batch):
            x = tokens_before(model, chunk, 0)
            seq = [x]
            for blk in cast(Any, model).blocks:
                x = blk(x)
                seq.append(x)
            outs.append(seq)
    finally:
        model.train(was)
    return [torch.cat([o[i] for o in outs]) for i in range(len(outs[0]))]


def _hidden(block: FFNBlock, x: torch.Tensor) -> torch.Tensor:
    mlp = cast(Any, block.mlp)
    h = mlp.act(mlp.fc1(block.norm2(x)))
    norm = getattr(mlp, "norm", None)
    return norm(h) if isinstance(norm, nn.Module) else h


def _ls_gamma(block: nn.Module, dim: int, like: torch.Tensor) -> torch.Tensor:
    ls = cast(Any, block).ls2
    gamma = getattr(ls, "gamma", None)
    if gamma is None:
        if not isinstance(ls, nn.Identity):
            raise UnsupportedModelError(
                f"cannot re-fit through {type(ls).__name__}", "use timm LayerScale or none"
            )
        return torch.ones(dim, dtype=like.dtype, device=like.device)
    g = gamma.detach().to(like)
    if bool((g.abs() < 1e-8).any()):
        raise UnsupportedModelError("LayerScale has zero entries", "cannot re-fit this block")
    return g


@torch.no_grad()
def fit_fc2(
    block: FFNBlock, x: torch.Tensor, target: torch.Tensor, ridge: float = DEFAULT_RIDGE
) -> None:
    """Set ``block.mlp.fc2`` to the ridge solution making ``block(x)`` reproduce ``target`` in
    least squares; ``ridge`` relative to the mean diagonal of ``HᵀH``, bias not penalised,
    normal equations in float64."""
    fc2 = cast(nn.Linear, cast(Any, block.mlp).fc2)
    d = x.shape[-1]
    xs = x.reshape(-1, d)
    ts = target.reshape(-1, d)
    k = fc2.in_features
    gram = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=x.device)
    rhs = torch.zeros(k + 1, d, dtype=torch.float64, device=x.device)
    gamma = _ls_gamma(block, d, xs).double()
    for xc, tc in zip(xs.split(8192), ts.split(8192), strict=True):
        h = _hidden(block, xc).double()
        a = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], dim=1)
        gram += a.T @ a
        rhs += a.T @ ((tc.double() - xc.double()) / gamma)
    scale = float(gram.diagonal()[:k].mean()) if k else 0.0
    reg = torch.zeros(k + 1, dtype=torch.float64, device=x.device)
    reg[:k] = ridge * max(scale, 1e-12)
    sol = torch.linalg.solve(gram + torch.diag(reg), rhs)  # [k+1, d]
    fc2.weight.copy_(sol[:k].T.to(fc2.weight))
    if fc2.bias is not None:
        fc2.bias.copy_(sol[k].to(fc2.bias))
    elif ridge >= 0:  # no bias to absorb the constant: refit without it
        sol = torch.linalg.solve(gram[:k, :k] + torch.diag(reg[:k]), rhs[:k])
        fc2.weight.copy_(sol.T.to(fc2.weight))


@torch.no_grad()
def refit_blocks(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    blocks: Iterable[int] | None = None,
    *,
    ridge: float = DEFAULT_RIDGE,
    teacher_streams: list[torch.Tensor] | None = None,
    batch: int = 128,
) -> list[RefitStats]:
    """Re-fit the fc2 of the FFN-only ``blocks`` (default: all) of ``student`` in place,
    shallowest first, on preprocessed calibration ``images``; ``teacher_streams``
    (:func:`block_streams` of the same images) saves the teacher pass. Per-block errors."""
    m = cast(Any, student)
    depth = len(m.blocks)
    wanted = sorted(
        b for b in (range(depth) if blocks is None else blocks) if isinstance(m.blocks[b], FFNBlock)
    )
    if not wanted:
        return []
    streams = teacher_streams if teacher_streams is not None else block_streams(teacher, images)
    was = student.training
    student.eval()
    stats: list[RefitStats] = []
    try:
        # The student's stream is recomputed once per block from the previous block's input,
        # so the cost is one pass through the blocks up to the deepest re-fitted one.
        xs = [tokens_before(student, c, 0) for c in images.split(batch)]
        pos = 0
        for b in wanted:
            for i in range(len(xs)):
                for blk in m.blocks[pos:b]:
                    xs[i] = blk(xs[i])
            pos = b
            x = torch.cat(xs)
            target = streams[b + 1].to(x)
            blk = m.blocks[b]
            before = float(((blk(x) - target) ** 2).mean())
            fit_fc2(blk, x, target, ridge)
            after = float(((blk(x) - target) ** 2).mean())
            stats.append(RefitStats(b, before, after, int(x.shape[0] * x.shape[1])))
    finally:
        student.train(was)
    return stats


__all__ = [
    "DEFAULT_RIDGE",
    "RefitStats",
    "block_streams",
    "fit_fc2",
    "refit_blocks",
    "tokens_before",
]
