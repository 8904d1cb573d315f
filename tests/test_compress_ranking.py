"""Cheap recoverability rankings (re-fit, local loss) and the teacher feature bank."""

from __future__ import annotations

import pytest
import torch

from dcvit_deploy.compress.finetune import FinetuneSchedule, TeacherFeatureBank, feature_mimic
from dcvit_deploy.compress.recoverability import rank_blocks
from dcvit_deploy.compress.surgery import apply_spec, compress_blocks, identity_spec


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _chooser(b: int, h: int) -> list[int]:
    return list(range(h))


@pytest.mark.parametrize("criterion", ["refit", "local"])
def test_cheap_rankings_score_every_block_without_finetuning(tiny_vit, criterion, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("cheap rankings must not run the full finetune")

    monkeypatch.setattr("dcvit_deploy.compress.recoverability.feature_mimic", boom)
    spec = identity_spec(tiny_vit, "vit_tiny_patch16_224", {})
    r = rank_blocks(
        tiny_vit,
        spec,
        None,
        _images(4, 1),
        candidates=(1, 2),
        hidden=64,
        chooser=_chooser,
        schedule=FinetuneSchedule.tiny(iterations=3),
        seed=0,
        criterion=criterion,
        calibration=_images(8),
    )
    assert set(r.scores) == {1, 2} and all(v >= 0 for v in r.scores.values())
    assert r.criterion == f"kl_after_{criterion}"
    with pytest.raises(ValueError, match="needs calibration"):
        rank_blocks(
            tiny_vit, spec, None, _images(2), candidates=(1,), hidden=64, chooser=_chooser,
            schedule=FinetuneSchedule.tiny(), seed=0, criterion=criterion,
        )  # fmt: skip


def test_feature_bank_trains_like_live_teacher(tiny_vit):
    images = _images(8)
    spec = compress_blocks(identity_spec(tiny_vit, "m", {}), [1], 64, _chooser)
    live, banked = apply_spec(tiny_vit, spec), apply_spec(tiny_vit, spec)
    sched = FinetuneSchedule.tiny(iterations=4, batch_size=4)
    bank = TeacherFeatureBank.build(tiny_vit, images)
    calls = []
    hook = tiny_vit.register_forward_hook(lambda *a: calls.append(1))
    try:
        feature_mimic(banked, tiny_vit, bank, sched, trainable_upto=1, seed=3)
    finally:
        hook.remove()
    feature_mimic(live, tiny_vit, images, sched, trainable_upto=1, seed=3)
    assert not calls  # the teacher never ran during the banked finetune
    for a, b in zip(live.parameters(), banked.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.equal(live.blocks[1].mlp.fc2.weight, tiny_vit.blocks[1].mlp.fc2.weight)
