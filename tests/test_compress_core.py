"""Planner, accounting, surgery contracts, model loading and candidate round-trip (tiny ViTs)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from dcvit_deploy.compress.macs import LN_MACS_PER_ELEMENT, _numel, geometry_of
from dcvit_deploy.compress.plan import feasible_range, plan_structure
from dcvit_deploy.compress.surgery import (
    FFNBlock,
    apply_spec,
    compress_blocks,
    identity_spec,
    make_chooser,
    narrow_mlp,
    reshape,
)
from dcvit_deploy.errors import CheckpointMismatchError, UnsupportedModelError, UserInputError
from dcvit_deploy.store.records import BlockSpec, MacCount


def count_module_macs(model: torch.nn.Module) -> MacCount:
    """MACs of a *built* model from its blocks' actual shapes: independent of
    ``Geometry.count`` (which works from specs), to cross-check the planner against surgery."""
    from timm.models.vision_transformer import Block

    vit: Any = model
    pe = vit.patch_embed
    tokens = int(pe.num_patches) + int(getattr(model, "num_prefix_tokens", 1))
    d = int(vit.embed_dim)
    proj = pe.proj
    ln = int(pe.num_patches) * int(proj.weight[0].numel()) * d
    if _numel(getattr(model, "norm", None)) > 0:
        ln += LN_MACS_PER_ELEMENT * tokens * d
    if _numel(getattr(model, "fc_norm", None)) > 0:
        ln += LN_MACS_PER_ELEMENT * d
    for head_name in ("head", "head_dist"):
        w = getattr(getattr(model, head_name, None), "weight", None)
        if w is not None:
            ln += int(w.numel())
    full = ln
    for blk in vit.blocks:
        mlp = getattr(blk, "mlp", None)
        if mlp is not None:
            h = int(mlp.fc1.out_features)
            ln += LN_MACS_PER_ELEMENT * tokens * d + 2 * tokens * d * h
            full += LN_MACS_PER_ELEMENT * tokens * d + 2 * tokens * d * h
        if isinstance(blk, Block):
            attn: Any = blk.attn
            qkv = attn.qkv.weight
            proj_w = attn.proj.weight
            a = (
                LN_MACS_PER_ELEMENT * tokens * d
                + tokens * int(qkv.numel())
                + tokens * int(proj_w.numel())
            )
            ln += a
            full += a + 2 * tokens * tokens * d
    return MacCount(linear_norm=ln, full=full, params=_numel(model))


@pytest.fixture(scope="module")
def vit_b_geometry():
    import timm

    return geometry_of(timm.create_model("vit_base_patch16_224", pretrained=False))


# ----------------------------------------------------------------------------- accounting


def test_reference_mac_numbers_vit_b(vit_b_geometry):
    g = vit_b_geometry
    assert round(g.attn_linear_norm / 1e9, 4) == 0.4654
    assert round(g.m_mlp / 1e9, 4) == 0.9296
    total = g.count([BlockSpec("attn_mlp", 3072)] * 12)
    assert round(total.linear_norm / 1e9, 4) == 16.8636
    assert total.params == 86_567_656
    # attention matmuls add 2*N^2*d per block
    assert total.full - total.linear_norm == 12 * 2 * 197 * 197 * 768


@pytest.mark.parametrize(("k", "n", "hidden"), [(2, 3, 1535), (3, 4, 1151), (4, 5, 920)])
def test_planner_reproduces_worked_numbers(vit_b_geometry, k, n, hidden):
    g = vit_b_geometry
    block = g.block_macs(BlockSpec("attn_mlp", 3072))[0]
    total = g.count([BlockSpec("attn_mlp", 3072)] * 12).linear_norm
    plan = plan_structure(g, 12, k * block / total, max_blocks=10)
    assert (plan.n_blocks, plan.hidden) == (n, hidden)
    assert plan.achieved == pytest.approx(k * block / total, abs=2e-4)


def test_planner_rounding_records_effect(vit_b_geometry):
    plan = plan_structure(vit_b_geometry, 12, 0.1655, max_blocks=10, round_to=64)
    assert plan.hidden % 64 == 0 and plan.hidden_unrounded == 1535
    assert plan.hidden == 1536
    assert plan.achieved < 0.1655  # one more unit kept -> slightly less reduction


def test_planner_rejects_infeasible_target_naming_range(vit_b_geometry):
    _lo, hi = feasible_range(vit_b_geometry, 12, 10)
    with pytest.raises(UserInputError, match=r"outside the feasible range 2\.76%\.\."):
        plan_structure(vit_b_geometry, 12, 0.01, max_blocks=10)
    with pytest.raises(UserInputError, match="feasible range"):
        plan_structure(vit_b_geometry, 12, hi + 0.01, max_blocks=10)
    assert plan_structure(vit_b_geometry, 12, hi, max_blocks=10).n_blocks == 10


# ----------------------------------------------------------------------------- surgery contracts


def _x(seed: int = 0, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_identity_spec_gives_identical_outputs(tiny_vit):
    spec = identity_spec(tiny_vit, "vit_tiny_patch16_224", {})
    assert all(
        b.kind == "attn_mlp" and b.mlp_hidden == spec.base_mlp_hidden and b.kept is None
        for b in spec.blocks
    )
    x = _x()
    with torch.no_grad():
        assert torch.equal(apply_spec(tiny_vit, spec)(x), tiny_vit(x))


def test_narrowing_equals_zeroing_dropped_units(tiny_vit):
    blk = tiny_vit.blocks[1]
    kept = [0, 3, 5, 100, 200, 255]
    narrowed = narrow_mlp(blk.mlp, kept)
    zeroed = copy.deepcopy(blk.mlp)
    mask = torch.zeros(blk.mlp.fc1.out_features, dtype=torch.bool)
    mask[kept] = True
    with torch.no_grad():
        zeroed.fc2.weight[:, ~mask] = 0
    h = torch.randn(2, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(narrowed(h), zeroed(h), atol=1e-5, rtol=1e-5)
    assert narrowed.fc1.weight.shape == (6, 64) and narrowed.fc2.weight.shape == (64, 6)
    assert torch.equal(narrowed.fc2.bias, blk.mlp.fc2.bias)


def test_ffn_block_equals_block_minus_attention_residual(tiny_vit):
    blk = copy.deepcopy(tiny_vit.blocks[2])
    ffn = FFNBlock(blk.norm2, copy.deepcopy(blk.mlp), blk.ls2, blk.drop_path2)
    with torch.no_grad():  # a block whose attention branch contributes nothing
        blk.attn.proj.weight.zero_()
        blk.attn.proj.bias.zero_()
    h = torch.randn(2, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(ffn(h), blk(h))
        # and it is NOT the same as replacing attn with Identity (which adds norm1(x))
        blk_id = copy.deepcopy(tiny_vit.blocks[2])
        blk_id.attn = _PassThrough()
        assert not torch.allclose(ffn(h), blk_id(h))


class _PassThrough(torch.nn.Module):
    """``attn = Identity`` as a naive user would write it (accepting timm's extra kwargs)."""

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return x


def test_spec_counts_match_built_module(tiny_vit):
    spec = identity_spec(tiny_vit, "vit_tiny_patch16_224", {})
    chooser = make_chooser("weight", tiny_vit, seed=0)
    s = compress_blocks(spec, [1, 2], 96, chooser)
    s = compress_blocks(s, [3], 0, chooser, kind="identity")
    model = apply_spec(tiny_vit, s)
    assert isinstance(model.blocks[1], FFNBlock)
    assert geometry_of(tiny_vit).count(s.blocks) == count_module_macs(model)
    assert model(_x()).shape == (3, 10)


def test_neuron_choices_are_nested_across_widths(tiny_vit):
    for method in ("random", "weight", "activation"):
        chooser = make_chooser(method, tiny_vit, seed=3, images=_x(1, 4))
        wide, narrow = set(chooser(1, 128)), set(chooser(1, 32))
        assert narrow < wide, method


def test_warm_reshape_reuses_finetuned_units_and_base_for_new_ones(tiny_vit):
    spec = identity_spec(tiny_vit, "vit_tiny_patch16_224", {})
    chooser = make_chooser("random", tiny_vit, seed=0)
    s_small = compress_blocks(spec, [1], 32, chooser)
    s_big = compress_blocks(spec, [1, 2], 128, chooser)
    small = apply_spec(tiny_vit, s_small)
    with torch.no_grad():  # pretend finetuning changed block 1's kept units
        small.blocks[1].mlp.fc1.weight.add_(1.0)
    big = reshape(small, s_small, s_big, tiny_vit)
    kept_small = list(s_small.blocks[1].kept)
    kept_big = list(s_big.blocks[1].kept)
    for j, k in enumerate(kept_big):
        src = (
            small.blocks[1].mlp.fc1.weight[kept_small.index(k)]
            if k in kept_small
            else tiny_vit.blocks[1].mlp.fc1.weight[k]
        )
        assert torch.equal(big.blocks[1].mlp.fc1.weight[j], src)
    with pytest.raises(ValueError, match="cannot restore"):
        reshape(big, s_big, spec, tiny_vit)


# ----------------------------------------------------------------------------- models


def test_unsupported_model_is_refused_by_name():
    import timm

    from dcvit_deploy.model.loading import check_supported

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3)
    with pytest.raises(UnsupportedModelError, match="SwinTransformer, not a plain ViT"):
        check_supported(swin, "swin_tiny_patch4_window7_224")


def test_unknown_model_name():
    from dcvit_deploy.model.loading import load_model

    with pytest.raises(UserInputError, match="unknown timm model 'vit_nope'"):
        load_model("vit_nope", random_init=True)


def test_a_random_init_model_has_no_zero_bias_to_fold_away():
    """timm zero-initialises biases and the ONNX simplifier folds x + 0 away: a random
    structure's graph would lack nodes its finetuned version has, and measuring structures
    first would under-measure every candidate of a random model."""
    from conftest import TINY_VIT_KWARGS

    from dcvit_deploy.model.loading import load_model

    torch.manual_seed(0)
    model = load_model("vit_tiny_patch16_224", random_init=True, model_kwargs=TINY_VIT_KWARGS)
    biases = [p for n, p in model.model.named_parameters() if n.endswith(".bias")]
    assert len(biases) > 20 and all(bool((p != 0).all()) for p in biases)


def test_checkpoint_infers_kwargs_and_reports_mismatch(tmp_path, tiny_vit):
    from safetensors.torch import save_file

    from dcvit_deploy.model.loading import load_model

    ck = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(ck))
    loaded = load_model(
        "vit_tiny_patch16_224",
        checkpoint=ck,
        model_kwargs={"embed_dim": 64, "depth": 4, "num_heads": 2},
    )
    assert loaded.inferred == {"num_classes": 10, "img_size": 32, "patch_size": 8, "in_chans": 3}
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), tiny_vit(x))
    with pytest.raises(CheckpointMismatchError, match=r"missing \d+ keys \(e\.g\. blocks\.\d+\."):
        load_model(
            "vit_tiny_patch16_224", checkpoint=ck, model_kwargs={"embed_dim": 64, "num_heads": 2}
        )
    pth = tmp_path / "w.pth"
    torch.save({"model": tiny_vit.state_dict()}, pth)
    again = load_model(
        "vit_tiny_patch16_224",
        checkpoint=pth,
        model_kwargs={"embed_dim": 64, "depth": 4, "num_heads": 2},
    )
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), tiny_vit(x))


def test_model_kwargs_parsing():
    from dcvit_deploy.model.loading import parse_model_kwargs

    assert parse_model_kwargs(["num_classes=10 img_size=32", "global_pool=avg"]) == {
        "num_classes": 10,
        "img_size": 32,
        "global_pool": "avg",
    }
    with pytest.raises(UserInputError, match="not key=value"):
        parse_model_kwargs(["num_classes"])


def test_candidate_round_trip(tmp_path, tiny_vit):
    from dcvit_deploy.compress.candidate import load_candidate, save_candidate
    from dcvit_deploy.model.loading import geometry_kwargs
    from dcvit_deploy.store.records import Candidate

    kwargs = {**geometry_kwargs(tiny_vit), "num_heads": 2}
    spec = identity_spec(tiny_vit, "vit_tiny_patch16_224", kwargs)
    s = compress_blocks(spec, [1, 2], 40, make_chooser("random", tiny_vit, seed=1))
    model = apply_spec(tiny_vit, s)
    g = geometry_of(tiny_vit)
    cand = Candidate(
        name="c1",
        method="dcvit",
        target_reduction=0.2,
        arch=s,
        macs=g.count(s.blocks),
        base_macs=g.count(spec.blocks),
        recipe={"schedule": "tiny"},
        seed=1,
        input_fingerprint="abc",
        weights="",
        weights_sha256="",
    )
    saved = save_candidate(tmp_path, cand, model)
    assert (tmp_path / "c1.safetensors").is_file() and len(saved.weights_sha256) == 64
    loaded_cand, rebuilt = load_candidate(tmp_path / "c1.json")
    assert loaded_cand == saved
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    (tmp_path / "c1.safetensors").write_bytes(b"corrupt")
    with pytest.raises(UserInputError, match="do not match the checksum"):
        load_candidate(tmp_path / "c1.json")
