"""Block surgery on timm ViTs: FFN-only blocks, narrowed MLPs, dropped blocks.

All functions work on a deep copy unless they say ``_inplace``; the source model is never
mutated. Replacing ``block.attn`` with ``nn.Identity`` would NOT remove attention in timm (the
block would add ``norm1(x)`` to the residual), so an attention-free block is a separate module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import torch
from torch import nn

from dcvit_deploy.config.options import NeuronChoice
from dcvit_deploy.errors import UserInputError
from dcvit_deploy.store.records import ArchSpec, BlockSpec

if TYPE_CHECKING:
    from collections.abc import Iterable


NEURON_CHOICES: tuple[str, ...] = get_args(NeuronChoice)


class FFNBlock(nn.Module):
    """``x + drop_path2(ls2(mlp(norm2(x))))``: a timm Block with its attention branch removed.

    Keeps timm's attribute names (``norm2``, ``mlp``, ``ls2``, ``drop_path2``) so state-dict keys
    stay ``blocks.i.norm2.weight`` etc. and surgery on surgery composes.
    """

    def __init__(
        self, norm2: nn.Module, mlp: nn.Module, ls2: nn.Module, drop_path2: nn.Module
    ) -> None:
        super().__init__()
        self.norm2 = norm2
        self.mlp = mlp
        self.ls2 = ls2
        self.drop_path2 = drop_path2

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class DroppedBlock(nn.Module):
    """A removed block: returns its input (accepts the extra arguments timm may pass)."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return x


def narrow_mlp(mlp: nn.Module, kept: Sequence[int]) -> nn.Module:
    """A copy of a timm ``Mlp`` keeping hidden units ``kept`` (in that order).

    fc1 keeps rows ``kept`` (weight and bias), fc2 keeps columns ``kept`` and its full bias.
    """
    idx = torch.as_tensor(list(kept), dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError("cannot narrow an MLP to zero hidden units")
    fc1: nn.Linear = mlp.fc1  # type: ignore[assignment]
    fc2: nn.Linear = mlp.fc2  # type: ignore[assignment]
    if int(idx.max()) >= fc1.out_features or int(idx.min()) < 0:
        raise ValueError(f"kept neuron index out of range 0..{fc1.out_features - 1}")
    new = copy.deepcopy(mlp)
    w1 = fc1.weight.detach()
    new_fc1 = nn.Linear(
        fc1.in_features, idx.numel(), bias=fc1.bias is not None, device=w1.device, dtype=w1.dtype
    )
    new_fc2 = nn.Linear(
        idx.numel(), fc2.out_features, bias=fc2.bias is not None, device=w1.device, dtype=w1.dtype
    )
    with torch.no_grad():
        new_fc1.weight.copy_(w1[idx])
        if fc1.bias is not None:
            new_fc1.bias.copy_(fc1.bias.detach()[idx])
        new_fc2.weight.copy_(fc2.weight.detach()[:, idx])
        if fc2.bias is not None:
            new_fc2.bias.copy_(fc2.bias.detach())
    new.fc1 = new_fc1
    new.fc2 = new_fc2
    return new


def identity_spec(model: nn.Module, model_name: str, model_kwargs: dict[str, object]) -> ArchSpec:
    """The ArchSpec of an unmodified timm ViT."""
    vit = cast(Any, model)  # timm attributes are dynamic: nn.Module types them Tensor | Module
    blk = vit.blocks[0]
    hidden = int(blk.mlp.fc1.out_features)
    return ArchSpec(
        model_name=model_name,
        model_kwargs=dict(model_kwargs),
        embed_dim=int(vit.embed_dim),
        num_heads=int(blk.attn.num_heads),
        base_mlp_hidden=hidden,
        blocks=tuple(BlockSpec(kind="attn_mlp", mlp_hidden=hidden) for _ in vit.blocks),
    )


def full_spec(spec: ArchSpec) -> ArchSpec:
    """The uncompressed spec of the same base model."""
    full = BlockSpec(kind="attn_mlp", mlp_hidden=spec.base_mlp_hidden)
    return _with_blocks(spec, [full] * spec.depth)


def _with_blocks(spec: ArchSpec, blocks: Sequence[BlockSpec]) -> ArchSpec:
    return ArchSpec(
        model_name=spec.model_name,
        model_kwargs=spec.model_kwargs,
        embed_dim=spec.embed_dim,
        num_heads=spec.num_heads,
        base_mlp_hidden=spec.base_mlp_hidden,
        blocks=tuple(blocks),
    )


def _kept_list(b: BlockSpec) -> list[int]:
    # kept=None means "the first mlp_hidden units" (all of them at full width).
    return list(b.kept) if b.kept is not None else list(range(b.mlp_hidden))


def _gather_mlp(
    mlp: nn.Module, mlp_kept: list[int], base_mlp: nn.Module | None, new_kept: list[int]
) -> nn.Module:
    """An MLP with units ``new_kept`` (original indices): rows present in ``mlp`` (whose units are
    ``mlp_kept``) are taken from it; the others from the uncompressed ``base_mlp``."""
    pos = {k: j for j, k in enumerate(mlp_kept)}
    missing = [k for k in new_kept if k not in pos]
    if missing and base_mlp is None:
        raise ValueError(
            f"units {missing[:5]} are not in the current block and no base model was given"
        )
    new = narrow_mlp(mlp, [pos.get(k, 0) for k in new_kept])
    if missing:
        with torch.no_grad():
            for j, k in enumerate(new_kept):
                if k in pos:
                    continue
                new.fc1.weight[j].copy_(base_mlp.fc1.weight[k])  # type: ignore[union-attr,index]
                if new.fc1.bias is not None:  # type: ignore[union-attr]
                    new.fc1.bias[j].copy_(base_mlp.fc1.bias[k])  # type: ignore[union-attr,index]
                new.fc2.weight[:, j].copy_(base_mlp.fc2.weight[:, k])  # type: ignore[union-attr,index]
    return new


def reshape(
    model: nn.Module, current: ArchSpec, target: ArchSpec, base: nn.Module | None = None
) -> nn.Module:
    """A copy of ``model`` (built as ``current``) reshaped to ``target``, reusing its weights.

    Blocks may lose their attention branch, be dropped, or change their kept units; a unit not
    present in ``model`` is taken from ``base`` (the uncompressed original), which is how a
    family member is warm-started from its neighbour. Restoring attention or a dropped block
    is refused.
    """
    if current.depth != target.depth or len(model.blocks) != target.depth:  # type: ignore[arg-type]
        raise ValueError("current spec, target spec and model must have the same depth")
    out = copy.deepcopy(model)
    blocks = cast(Any, out).blocks  # nn.Sequential of timm blocks (typed Tensor | Module)
    for i, (c, t) in enumerate(zip(current.blocks, target.blocks, strict=True)):
        if c == t:
            continue
        if t.kind == "identity":
            blocks[i] = DroppedBlock()
            continue
        if c.kind == "identity" or (c.kind == "mlp" and t.kind == "attn_mlp"):
            raise ValueError(
                f"block {i}: cannot restore a removed "
                f"{'block' if c.kind == 'identity' else 'attention'}"
            )
        blk = blocks[i]
        base_mlp = base.blocks[i].mlp if base is not None else None  # type: ignore[index,union-attr]
        new_kept = _kept_list(t)
        cur_kept = _kept_list(c)
        mlp = (
            blk.mlp if new_kept == cur_kept else _gather_mlp(blk.mlp, cur_kept, base_mlp, new_kept)
        )
        if t.kind == "mlp":
            blocks[i] = FFNBlock(blk.norm2, mlp, blk.ls2, blk.drop_path2)
        else:
            blk.mlp = mlp
    return out


def apply_spec(base: nn.Module, spec: ArchSpec) -> nn.Module:
    """A copy of the *uncompressed* ``base`` reshaped to ``spec``, reusing its pretrained weights.

    ``kept`` indices select the pretrained fc1 rows / fc2 columns; ``kept=None`` with a narrower
    width keeps the first ``mlp_hidden`` units (only meaningful when weights are loaded after).
    """
    return reshape(base, full_spec(spec), spec, base)


def compress_blocks(
    spec: ArchSpec,
    blocks: Iterable[int],
    hidden: int,
    chooser: Callable[[int, int], Sequence[int]] | None = None,
    *,
    kind: Literal["mlp", "identity"] = "mlp",
) -> ArchSpec:
    """A new spec with ``blocks`` made FFN-only at width ``hidden`` (or dropped).

    ``chooser(block_index, hidden)`` returns the kept pretrained neurons of that block (needed
    unless the blocks are dropped or kept at full width).
    """
    new_blocks = list(spec.blocks)
    for b in blocks:
        if not 0 <= b < spec.depth:
            raise UserInputError(
                f"block {b} does not exist (depth {spec.depth})", "pick valid blocks"
            )
        if kind == "identity":
            new_blocks[b] = BlockSpec(kind="identity", mlp_hidden=0)
            continue
        kept = None
        if hidden < spec.base_mlp_hidden:
            if chooser is None:
                raise ValueError("narrowing needs a neuron chooser")
            kept = tuple(int(k) for k in chooser(b, hidden))
        new_blocks[b] = BlockSpec(kind="mlp", mlp_hidden=hidden, kept=kept)
    return _with_blocks(spec, new_blocks)


# --------------------------------------------------------------------------- neuron choice


def choose_random(hidden_base: int, hidden: int, *, seed: int, block: int) -> tuple[int, ...]:
    """The paper's choice: a seeded random subset (sorted), independent per block."""
    g = torch.Generator().manual_seed(seed * 1009 + block)
    perm = torch.randperm(hidden_base, generator=g)[:hidden]
    return tuple(sorted(int(i) for i in perm))


def choose_by_weight(block: nn.Module, hidden: int) -> tuple[int, ...]:
    """Keep units with the largest ‖fc1 row‖·‖fc2 column‖ (data-free magnitude criterion)."""
    blk = cast(Any, block)  # timm attributes are dynamic: nn.Module types them Tensor | Module
    fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
    score = fc1.weight.detach().norm(dim=1) * fc2.weight.detach().norm(dim=0)
    return tuple(sorted(int(i) for i in torch.topk(score, hidden).indices))


@torch.no_grad()
def hidden_activation_scores(
    model: nn.Module, images: torch.Tensor, batch: int = 32
) -> dict[int, torch.Tensor]:
    """Mean |GELU(fc1(norm2(x)))|·‖fc2 column‖ per hidden unit of every block, on ``images``.

    Scaling by the fc2 column norm measures each unit's contribution to the block output rather
    than the activation alone.
    """
    sums: dict[int, torch.Tensor] = {}
    hooks = []
    for i, blk in enumerate(cast(Any, model).blocks):
        if not hasattr(blk, "mlp"):
            continue

        def hook(_m: nn.Module, _inp: object, out: torch.Tensor, i: int = i) -> None:
            s = out.detach().abs().float().sum(dim=tuple(range(out.ndim - 1)))
            sums[i] = sums.get(i, torch.zeros_like(s)) + s

        hooks.append(blk.mlp.act.register_forward_hook(hook))
    try:
        model.eval()
        for start in range(0, images.shape[0], batch):
            model(images[start : start + batch])
    finally:
        for h in hooks:
            h.remove()
    out: dict[int, torch.Tensor] = {}
    for i, s in sums.items():
        col = model.blocks[i].mlp.fc2.weight.detach().float().norm(dim=0)  # type: ignore[index,union-attr]
        out[i] = s * col
    return out


def make_chooser(
    method: NeuronChoice,
    base: nn.Module,
    *,
    seed: int,
    images: torch.Tensor | None = None,
) -> Callable[[int, int], Sequence[int]]:
    """A ``chooser(block, hidden)`` for :func:`compress_blocks` over the uncompressed ``base``."""
    if method not in NEURON_CHOICES:
        raise UserInputError(
            f"unknown neuron choice {method!r}", f"use one of {', '.join(NEURON_CHOICES)}"
        )
    hidden_base = int(cast(Any, base).blocks[0].mlp.fc1.out_features)
    if method == "random":
        return lambda b, h: choose_random(hidden_base, h, seed=seed, block=b)
    if method == "weight":
        return lambda b, h: choose_by_weight(cast(Any, base).blocks[b], h)
    if images is None:
        raise ValueError("activation-based neuron choice needs images")
    scores = hidden_activation_scores(base, images)
    return lambda b, h: tuple(sorted(int(i) for i in torch.topk(scores[b], h).indices))
