"""A small end-to-end family on a tiny ViT: DC-ViT with reuse, resume, independent, PRACTISE."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VIT_KWARGS

from dcvit_deploy.compress import family as family_mod
from dcvit_deploy.compress.candidate import load_candidate
from dcvit_deploy.compress.family import FamilyConfig, compress_family, load_family
from dcvit_deploy.compress.finetune import FinetuneSchedule
from dcvit_deploy.errors import UserInputError


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _run(tiny_vit, images, out, **cfg):
    config = FamilyConfig(
        schedule=FinetuneSchedule.tiny(iterations=3), targets=(0.10, 0.2, 0.3), **cfg
    )
    return compress_family(
        tiny_vit,
        model_name="vit_tiny_patch16_224",
        model_kwargs=dict(TINY_VIT_KWARGS),
        data=images,
        metric_images=images[:4],
        out_dir=out,
        config=config,
        teacher_fingerprint="t",
        input_fingerprint="d",
    )


def test_dcvit_family_with_reuse_writes_rebuildable_candidates(tiny_vit, images, tmp_path):
    res = _run(tiny_vit, images, tmp_path)
    names = [c.name for c in res.candidates]
    assert names[0] == "original" and len(names) == 4
    reductions = [c.reduction for c in res.candidates]
    assert reductions == sorted(reductions) and reductions[0] == 0.0
    for c, t in zip(res.candidates[1:], (0.10, 0.2, 0.3), strict=True):
        assert c.reduction == pytest.approx(t, abs=0.01)
        assert c.recipe["blocks"] and set(c.recipe["blocks"]) <= {1, 2}
    assert res.reused == names[2:]  # first target progressive, later ones warm-started
    assert res.candidates[2].recipe["warm_from"] == names[1]
    _cand, model = load_candidate(tmp_path / f"{names[-1]}.json")
    assert model(images[:2]).shape == (2, 10)
    assert [c.name for c in load_family(tmp_path)] == names


def test_family_resumes_without_redoing_work(tiny_vit, images, tmp_path, monkeypatch):
    first = _run(tiny_vit, images, tmp_path)

    def boom(*a, **k):
        raise AssertionError("finetuning ran again on resume")

    monkeypatch.setattr(family_mod, "feature_mimic", boom)
    monkeypatch.setattr("dcvit_deploy.compress.recoverability.feature_mimic", boom)
    again = _run(tiny_vit, images, tmp_path)
    assert [c.weights_sha256 for c in again.candidates] == [
        c.weights_sha256 for c in first.candidates
    ]


def test_changed_option_redoes_dependent_work(tiny_vit, images, tmp_path):
    first = _run(tiny_vit, images, tmp_path)
    again = _run(tiny_vit, images, tmp_path, neuron_choice="weight")
    assert first.candidates[1].weights_sha256 != again.candidates[1].weights_sha256


def test_independent_mode_ranks_per_width_and_is_progressive(tiny_vit, images, tmp_path):
    res = _run(tiny_vit, images, tmp_path, reuse=False)
    assert res.reused == []
    widths = {c.recipe["ranking_width"] for c in res.candidates[1:]}
    assert widths == {c.recipe["hidden"] for c in res.candidates[1:]}
    two_block = [c for c in res.candidates[1:] if c.recipe["n_blocks"] == 2]
    assert two_block and len(two_block[0].recipe["finetune"]) == 2


def test_practise_family_drops_whole_blocks(tiny_vit, images, tmp_path):
    res = _run(tiny_vit, images, tmp_path, method="practise")
    kinds = [[b.kind for b in c.arch.blocks] for c in res.candidates[1:]]
    assert all("identity" in k and "mlp" not in k for k in kinds)
    assert res.candidates[1].name.startswith("practise-")


def test_bad_config_errors():
    with pytest.raises(UserInputError, match="unknown method 'prune'"):
        FamilyConfig(schedule=FinetuneSchedule.tiny(), targets=(0.1,), method="prune")  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match="no compression targets"):
        FamilyConfig(schedule=FinetuneSchedule.tiny(), targets=())
