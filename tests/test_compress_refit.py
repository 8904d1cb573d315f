"""Closed-form re-fit of FFN-only blocks: better than surgery alone, exact least squares."""

from __future__ import annotations

import pytest
import torch

from dcvit_deploy.compress.refit import block_streams, fit_fc2, refit_blocks, tokens_before
from dcvit_deploy.compress.surgery import FFNBlock, apply_spec, compress_blocks, identity_spec


def _images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _block_error(student, teacher, images, b):
    x = tokens_before(student, images, b)
    t = block_streams(teacher, images)[b + 1]
    with torch.no_grad():
        return float(((student.blocks[b](x) - t) ** 2).mean())


def test_refit_beats_surgery_on_calibration_tokens(tiny_vit):
    images = _images()
    spec = identity_spec(tiny_vit, "vit_tiny_patch16_224", {})
    spec = compress_blocks(spec, [1, 2], 64, lambda b, h: list(range(0, 256, 4))[:h])
    student = apply_spec(tiny_vit, spec)
    before = [_block_error(student, tiny_vit, images, b) for b in (1, 2)]
    stats = refit_blocks(student, tiny_vit, images)
    assert [s.block for s in stats] == [1, 2]
    after = [_block_error(student, tiny_vit, images, b) for b in (1, 2)]
    for b, a, s in zip(before, after, stats, strict=True):
        assert a < 0.9 * b
        assert s.mse_after == pytest.approx(a, rel=1e-4)
    # block 1's fit matches what surgery alone gave on the same (unchanged) input stream
    assert stats[0].mse_before == pytest.approx(before[0], rel=1e-4)
    # untouched blocks keep their weights
    assert torch.equal(student.blocks[0].mlp.fc2.weight, tiny_vit.blocks[0].mlp.fc2.weight)


def test_refit_with_all_neurons_equals_lstsq(tiny_vit):
    images = _images(24)
    spec = identity_spec(tiny_vit, "vit_tiny_patch16_224", {})
    full = spec.base_mlp_hidden
    student = apply_spec(tiny_vit, compress_blocks(spec, [2], full))  # attention removed only
    assert isinstance(student.blocks[2], FFNBlock)
    x = tokens_before(tiny_vit, images, 2).reshape(-1, 64).double()
    target = block_streams(tiny_vit, images)[3].reshape(-1, 64).double()
    blk = student.blocks[2]
    with torch.no_grad():
        h = blk.mlp.act(blk.mlp.fc1(blk.norm2(x.float()))).double()
    a = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)
    assert a.shape[0] > a.shape[1]  # over-determined: a unique optimum
    sol = torch.linalg.lstsq(a, target - x).solution
    refit_blocks(student, tiny_vit, images, [2], ridge=0.0)
    assert torch.allclose(blk.mlp.fc2.weight.double(), sol[:-1].T, atol=2e-4, rtol=1e-3)
    assert torch.allclose(blk.mlp.fc2.bias.double(), sol[-1], atol=2e-4, rtol=1e-3)
    # and the residual is the least-squares residual: no other fc2 does better
    w = torch.cat([blk.mlp.fc2.weight.T, blk.mlp.fc2.bias[None]]).detach().double()
    res_fit = ((a @ w - (target - x)) ** 2).sum()
    res_opt = ((a @ sol - (target - x)) ** 2).sum()
    assert float(res_fit) == pytest.approx(float(res_opt), rel=1e-5)


def test_ridge_shrinks_weights(tiny_vit):
    images = _images(8)
    spec = identity_spec(tiny_vit, "vit_tiny_patch16_224", {})
    spec = compress_blocks(spec, [1], 32, lambda b, h: list(range(h)))
    a, b = apply_spec(tiny_vit, spec), apply_spec(tiny_vit, spec)
    x = tokens_before(tiny_vit, images, 1)
    t = block_streams(tiny_vit, images)[2]
    fit_fc2(a.blocks[1], x, t, ridge=0.0)
    fit_fc2(b.blocks[1], x, t, ridge=10.0)
    assert b.blocks[1].mlp.fc2.weight.norm() < a.blocks[1].mlp.fc2.weight.norm()
