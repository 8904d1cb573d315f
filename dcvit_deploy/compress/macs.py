"""MAC and parameter accounting per block part, under two conventions.

``linear_norm`` (the DC-ViT reference code's convention, reproduced to the digit on ViT-B/16:
attention part 0.4654 G, MLP 0.9296 G, model 16.8636 G): linear layers without bias terms,
LayerNorm at 4 MACs per element, patch embedding, final norm and classifier head(s) on the
prefix token(s). ``full`` adds the attention products QK^T and AV (2·N²·d per attention branch);
softmax and GELU are counted by neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from dcvit_deploy.store.records import BlockSpec, MacCount

if TYPE_CHECKING:
    from torch import nn

LN_MACS_PER_ELEMENT = 4


@dataclass(frozen=True)
class Geometry:
    """Shape facts of a base ViT that every count derives from (per image)."""

    tokens: int
    embed_dim: int
    num_heads: int
    base_mlp_hidden: int
    stem_macs: int  # patch embedding + final norm + head(s): parts surgery never touches
    base_params: int
    attn_params: int  # norm1 + qkv + proj + ls1 (+ q/k norms) of one block
    mlp_fixed_params: int  # norm2 + fc2 bias + ls2 of one block
    per_hidden_params: int  # one hidden unit: an fc1 row + its bias + an fc2 column

    @property
    def attn_linear_norm(self) -> int:
        """M_attn: LN1 + qkv + proj of one block."""
        n, d = self.tokens, self.embed_dim
        return LN_MACS_PER_ELEMENT * n * d + n * d * 3 * d + n * d * d

    @property
    def attn_matmul(self) -> int:
        """QK^T and AV products of one attention branch."""
        return 2 * self.tokens * self.tokens * self.embed_dim

    @property
    def mlp_norm(self) -> int:
        return LN_MACS_PER_ELEMENT * self.tokens * self.embed_dim

    def mlp_linear(self, hidden: int) -> int:
        """fc1 + fc2 at a given hidden width (M_mlp at the base width)."""
        return 2 * self.tokens * self.embed_dim * hidden

    @property
    def m_mlp(self) -> int:
        return self.mlp_linear(self.base_mlp_hidden)

    def block_macs(self, spec: BlockSpec) -> tuple[int, int]:
        """(linear_norm, full) MACs of one block."""
        if spec.kind == "identity":
            return 0, 0
        ln = self.mlp_norm + self.mlp_linear(spec.mlp_hidden)
        full = ln
        if spec.kind == "attn_mlp":
            ln += self.attn_linear_norm
            full = ln + self.attn_matmul
        return ln, full

    def block_params(self, spec: BlockSpec) -> int:
        if spec.kind == "identity":
            return 0
        p = self.mlp_fixed_params + spec.mlp_hidden * self.per_hidden_params
        if spec.kind == "attn_mlp":
            p += self.attn_params
        return p

    def count(self, blocks: Sequence[BlockSpec]) -> MacCount:
        """Per-image MACs (both conventions) and parameters of a model with these blocks."""
        ln = full = self.stem_macs
        params = self.base_params - self.depth_params_base(len(blocks))
        for spec in blocks:
            b_ln, b_full = self.block_macs(spec)
            ln += b_ln
            full += b_full
            params += self.block_params(spec)
        return MacCount(linear_norm=ln, full=full, params=params)

    def depth_params_base(self, depth: int) -> int:
        full = BlockSpec(kind="attn_mlp", mlp_hidden=self.base_mlp_hidden)
        return depth * self.block_params(full)


def _numel(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())


def geometry_of(model: nn.Module) -> Geometry:
    """Read the geometry of an (uncompressed) timm ViT."""
    vit = cast(Any, model)  # timm attributes are dynamic: nn.Module types them Tensor | Module
    pe = vit.patch_embed
    num_patches = int(pe.num_patches)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    tokens = num_patches + prefix
    d = int(vit.embed_dim)
    proj = pe.proj
    in_per_patch = int(proj.weight.shape[1] * proj.weight.shape[2] * proj.weight.shape[3])
    stem = num_patches * in_per_patch * d
    norm = getattr(model, "norm", None)
    if norm is not None and _numel(norm) > 0:
        stem += LN_MACS_PER_ELEMENT * tokens * d
    fc_norm = getattr(model, "fc_norm", None)
    if fc_norm is not None and _numel(fc_norm) > 0:
        stem += LN_MACS_PER_ELEMENT * d
    for head_name in ("head", "head_dist"):
        head = getattr(model, head_name, None)
        w = getattr(head, "weight", None)
        if w is not None:
            stem += int(w.shape[0]) * int(w.shape[1])
    blk = vit.blocks[0]
    attn_params = sum(_numel(getattr(blk, n, None)) for n in ("norm1", "attn", "ls1"))
    fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
    hidden = int(fc1.out_features)
    per_hidden = d + d + (1 if fc1.bias is not None else 0)
    mlp_fixed = (
        _numel(blk.norm2) + _numel(blk.ls2) + (fc2.bias.numel() if fc2.bias is not None else 0)
    )
    return Geometry(
        tokens=tokens,
        embed_dim=d,
        num_heads=int(blk.attn.num_heads),
        base_mlp_hidden=hidden,
        stem_macs=stem,
        base_params=_numel(model),
        attn_params=attn_params,
        mlp_fixed_params=mlp_fixed,
        per_hidden_params=per_hidden,
    )
