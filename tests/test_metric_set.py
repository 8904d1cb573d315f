"""Synthetic metric set by model inversion (DC-ViT step 2), its cache, and real-image sets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcvit_deploy.compress import metric_set as ms
from dcvit_deploy.compress.metric_set import (
    InversionSettings,
    choose_targets,
    load_or_synthesize,
    real_metric_set,
    synthesize_metric_set,
    tv_prior,
    valid_range,
)
from dcvit_deploy.store.records import from_dict, to_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's roll scales to 4 px at 32x32, half a patch of the tiny ViT: a random-init model is
# far less shift-tolerant than a trained one, so tests that need convergence roll by 1 px, and
# use lr 0.1 so 60 steps converge for every seed tried (at 0.25 some seeds oscillate).
QUICK = InversionSettings(num_images=10, iterations=60, warmup_iterations=3, jitter=1, lr=0.1)


@pytest.fixture
def confident_vit(tiny_vit: nn.Module) -> nn.Module:
    """The tiny ViT with a 10x head: random-init logits are otherwise too flat to invert into."""
    with torch.no_grad():
        tiny_vit.head.weight.mul_(10)
    return tiny_vit


def test_paper_settings_and_jitter_scaling() -> None:
    s = InversionSettings.paper()
    assert (s.num_images, s.iterations, s.warmup_iterations) == (50, 2000, 100)
    assert (s.lr, s.betas, s.tv_weight, s.tv_beta, s.l2_weight) == (
        0.25,
        (0.5, 0.9),
        1e-4,
        0.6,
        1e-5,
    )
    assert s.flip and s.keep_best
    assert [s.jitter_for(h) for h in (224, 384, 32, 2)] == [30, 51, 4, 1]
    assert dataclasses.replace(s, jitter=7).jitter_for(224) == 7
    assert s.lr_at(0) == pytest.approx(0.0025) and s.lr_at(99) == pytest.approx(0.25)
    assert s.lr_at(1999) < 1e-5
    assert InversionSettings.fast().iterations < s.iterations
    assert from_dict(InversionSettings, to_dict(s)) == s


def test_targets_distinct_or_cycled() -> None:
    g = torch.Generator().manual_seed(0)
    t = choose_targets(50, 1000, g)
    assert len(set(t.tolist())) == 50 and t.tolist() == sorted(t.tolist())
    cycled = choose_targets(25, 10, g)
    counts = torch.bincount(cycled, minlength=10)
    assert counts.min() == 2 and counts.max() == 3


def test_tv_prior_matches_its_definition() -> None:
    x = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).view(2, 3, 3, 3) ** 1.5
    beta = 0.6
    right = x[..., :, 1:] - x[..., :, :-1]
    down = x[..., 1:, :] - x[..., :-1, :]
    diag = x[..., 1:, 1:] - x[..., :-1, :-1]
    anti = x[..., 1:, :-1] - x[..., :-1, 1:]
    expected = sum(d.norm() ** beta for d in (right, down, diag, anti))
    assert float(tv_prior(x, beta)) == pytest.approx(float(expected), rel=1e-5)
    flat = torch.ones(1, 3, 8, 8)
    noisy = flat + torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert float(tv_prior(flat, beta)) < 1e-3 < float(tv_prior(noisy, beta))


def test_inversion_makes_the_teacher_predict_its_targets(confident_vit: nn.Module) -> None:
    result = synthesize_metric_set(
        confident_vit, (3, 32, 32), (0.5,) * 3, (0.5,) * 3, QUICK, seed=0
    )
    assert result.images.shape == (10, 3, 32, 32) and result.targets is not None
    assert sorted(result.targets.tolist()) == list(range(10))
    # Baseline: the same teacher on fresh noise (the inversion's own starting point).
    noise = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(99)).clamp(-1, 1)
    with torch.no_grad():
        logits = confident_vit(noise)
    noise_top1 = float((logits.argmax(-1) == result.targets).float().mean())
    noise_ce = float(F.cross_entropy(logits, result.targets))
    assert result.teacher_top1_on_targets >= 0.8 > noise_top1
    assert result.final_ce < noise_ce / 2
    with torch.no_grad():  # the reported numbers are the teacher's on the returned images
        again = float(F.cross_entropy(confident_vit(result.images), result.targets))
    assert again == pytest.approx(result.final_ce, rel=1e-4)
    # The teacher's eval mode and requires_grad flags are restored.
    assert not confident_vit.training
    assert all(p.requires_grad for p in confident_vit.parameters())


def test_images_stay_in_valid_range_and_seed_is_reproducible(tiny_vit: nn.Module) -> None:
    settings = InversionSettings(num_images=4, iterations=8, warmup_iterations=2)
    low, high = valid_range(IMAGENET_MEAN, IMAGENET_STD)
    reports: list[ms.InversionProgress] = []
    a = synthesize_metric_set(
        tiny_vit,
        (3, 32, 32),
        IMAGENET_MEAN,
        IMAGENET_STD,
        settings,
        seed=3,
        progress=reports.append,
    )
    assert (a.images >= low - 1e-6).all() and (a.images <= high + 1e-6).all()
    # Noise and lr 0.25 push pixels onto the bounds, so each channel's minimum is its own bound:
    # the clip is per channel, from the model's mean/std.
    assert torch.isclose(a.images.amin(dim=(0, 2, 3)), low.flatten(), atol=1e-5).all()
    assert reports[-1].step == reports[-1].total == 8
    b = synthesize_metric_set(tiny_vit, (3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, settings, seed=3)
    c = synthesize_metric_set(tiny_vit, (3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, settings, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)


def test_cache_hit_skips_synthesis(
    tiny_vit: nn.Module, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = InversionSettings(num_images=3, iterations=4, warmup_iterations=1)
    args = (tmp_path, "teacher-sha", tiny_vit, (3, 32, 32), (0.5,) * 3, (0.5,) * 3, settings)
    first = load_or_synthesize(*args, seed=1)
    assert not first.from_cache and first.cache_key
    assert [p.name for p in tmp_path.iterdir()] == [f"metric_set-{first.cache_key}.safetensors"]

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("synthesised despite a cached set")

    monkeypatch.setattr(ms, "synthesize_metric_set", boom)
    second = load_or_synthesize(*args, seed=1)
    assert second.from_cache and second.cache_key == first.cache_key
    assert torch.equal(second.images, first.images) and torch.equal(second.targets, first.targets)
    assert second.final_ce == first.final_ce
    # Anything in the key changing (seed, weights fingerprint) misses the cache.
    with pytest.raises(AssertionError, match="despite"):
        load_or_synthesize(*args, seed=2)
    with pytest.raises(AssertionError, match="despite"):
        load_or_synthesize(tmp_path, "other-sha", *args[2:], seed=1)


def test_corrupt_cache_is_recomputed(tiny_vit: nn.Module, tmp_path) -> None:
    settings = InversionSettings(num_images=2, iterations=2, warmup_iterations=1)
    key = ms.metric_set_key("t", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, settings, 0)
    ms.cache_path(tmp_path, key).write_bytes(b"not a safetensors file")
    result = load_or_synthesize(
        tmp_path, "t", tiny_vit, (3, 32, 32), (0.5,) * 3, (0.5,) * 3, settings, seed=0
    )
    assert not result.from_cache
    assert ms.load_metric_set(ms.cache_path(tmp_path, key)).from_cache


def test_real_metric_set_wraps_and_validates() -> None:
    images = torch.rand(5, 3, 16, 16, dtype=torch.float64)
    wrapped = real_metric_set(images)
    assert wrapped.source == "real" and wrapped.targets is None and len(wrapped) == 5
    assert wrapped.images.dtype == torch.float32
    images.zero_()
    assert wrapped.images.abs().sum() > 0  # a copy, not a view
    with pytest.raises(ValueError):
        real_metric_set(torch.rand(3, 16, 16))
