"""A small end-to-end family on a tiny ViT: DC-ViT with reuse, resume, independent, PRACTISE."""

from __future__ import annotations

import pytest
import torch
from fakes.runs import TINY_VIT_KWARGS

from dcvit_deploy.compress import family as family_mod
from dcvit_deploy.compress.candidate import load_candidate
from dcvit_deploy.compress.family import compress_family, load_family
from dcvit_deploy.compress.finetune import FinetuneSchedule
from dcvit_deploy.compress.procedure import (
    FamilyConfig,
    candidate_name,
    preview_family,
    procedure,
    structure_tag,
)
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


REUSE = {**procedure("paper"), "reuse": True}


def test_dcvit_family_with_reuse_writes_rebuildable_candidates(tiny_vit, images, tmp_path):
    res = _run(tiny_vit, images, tmp_path, **REUSE)
    names = [c.name for c in res.candidates]
    assert names[0] == "original" and len(names) == 4
    reductions = [c.reduction for c in res.candidates]
    assert reductions == sorted(reductions) and reductions[0] == 0.0
    for c, t in zip(res.candidates[1:], (0.10, 0.2, 0.3), strict=True):
        assert c.reduction == pytest.approx(t, abs=0.01)
        assert c.recipe["blocks"] and set(c.recipe["blocks"]) <= {1, 2}
    warm = [c.name for c in res.candidates if c.recipe.get("warm_from")]
    assert warm == names[2:]  # first target progressive, later ones warm-started
    assert res.candidates[2].recipe["warm_from"] == names[1]
    _cand, model = load_candidate(tmp_path / f"{names[-1]}.json")
    assert model(images[:2]).shape == (2, 10)
    assert [c.name for c in load_family(tmp_path)] == names


def test_family_resumes_without_redoing_work(tiny_vit, images, tmp_path, monkeypatch):
    first = _run(tiny_vit, images, tmp_path, **REUSE)

    def boom(*a, **k):
        raise AssertionError("finetuning ran again on resume")

    monkeypatch.setattr(family_mod, "feature_mimic", boom)
    monkeypatch.setattr("dcvit_deploy.compress.recoverability.feature_mimic", boom)
    again = _run(tiny_vit, images, tmp_path, **REUSE)
    assert [c.weights_sha256 for c in again.candidates] == [
        c.weights_sha256 for c in first.candidates
    ]


def test_changed_option_redoes_dependent_work(tiny_vit, images, tmp_path):
    first = _run(tiny_vit, images, tmp_path)
    again = _run(tiny_vit, images, tmp_path, neuron_choice="weight")
    assert first.candidates[1].weights_sha256 != again.candidates[1].weights_sha256


def test_independent_mode_ranks_per_width_and_is_progressive(tiny_vit, images, tmp_path):
    res = _run(tiny_vit, images, tmp_path, **{**REUSE, "reuse": False})
    assert not any(c.recipe.get("warm_from") for c in res.candidates)
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
    with pytest.raises(UserInputError, match="unknown ranking criterion"):
        FamilyConfig(schedule=FinetuneSchedule.tiny(), targets=(0.1,), rank_criterion="x")
    with pytest.raises(UserInputError, match="listed twice"):
        FamilyConfig(schedule=FinetuneSchedule.tiny(), targets=(0.1,), methods=("dcvit", "dcvit"))


def test_default_procedure_ranks_once_refits_one_shot_on_cached_features(
    tiny_vit, images, tmp_path, monkeypatch
):
    from dcvit_deploy.compress import recoverability
    from dcvit_deploy.compress.finetune import TeacherFeatureBank

    calls, rank_calls = [], []
    real = family_mod.feature_mimic

    def counting(student, teacher, data, *a, **k):
        calls.append(type(data))
        return real(student, teacher, data, *a, **k)

    def rank_counting(*a, **k):
        rank_calls.append(k["trainable_upto"])
        return real(*a, **k)

    monkeypatch.setattr(family_mod, "feature_mimic", counting)
    monkeypatch.setattr(recoverability, "feature_mimic", rank_counting)
    res = _run(tiny_vit, images, tmp_path)
    dc = res.candidates[1:]
    assert sorted(rank_calls) == [1, 2]  # one short finetune per candidate block, ranked once
    assert len(res.rankings) == 1
    assert next(iter(res.rankings.values())).criterion == "kl_after_refit_finetune"
    assert calls == [TeacherFeatureBank] * len(dc)  # one finetune per candidate, cached teacher
    for c in dc:
        assert c.recipe["progressive"] is False and len(c.recipe["finetune"]) == 1
        assert [r["block"] for r in c.recipe["refit"]] == sorted(c.recipe["blocks"])
        assert all(r["mse_after"] < r["mse_before"] for r in c.recipe["refit"])


def test_rank_iterations_shortens_the_ranking_schedule():
    cfg = FamilyConfig(
        schedule=FinetuneSchedule.tiny(iterations=50), targets=(0.1,), rank_iterations=5
    )
    assert cfg.ranking_schedule.iterations == 5
    paper = FamilyConfig(
        schedule=FinetuneSchedule.tiny(iterations=50),
        targets=(0.1,),
        **procedure("paper"),
    )
    assert paper.ranking_schedule.iterations == 50 and paper.progressive and not paper.refit
    again = FamilyConfig.from_preset(
        "paper", schedule=FinetuneSchedule.tiny(iterations=50), targets=(0.1,), reuse=True
    )
    assert again.progressive and again.bank_views == 0 and again.reuse


def test_mixed_family_holds_both_methods_with_unique_names(tiny_vit, images, tmp_path):
    res = _run(tiny_vit, images, tmp_path, methods=("dcvit", "practise"), trainable="all")
    names = [c.name for c in res.candidates]
    assert names[0] == "original" and len(names) == len(set(names))
    methods = {c.method for c in res.candidates[1:]}
    assert methods == {"dcvit", "practise"}
    reductions = [c.reduction for c in res.candidates]
    assert reductions == sorted(reductions)
    assert [c.name for c in load_family(tmp_path)] == names
    for c in res.candidates[1:]:
        _c, model = load_candidate(tmp_path / f"{c.name}.json")
        assert model(images[:1]).shape == (1, 10)
    drop = [c for c in res.candidates if c.method == "practise"]
    assert drop and all(c.recipe["trainable_upto"] == "all" for c in drop)


def test_candidate_names_are_unique_per_structure():
    # 8.08% and 8.09% rounded to 0.1% collided; the structure tag keeps them apart
    a = candidate_name("dcvit", 0.0808, structure_tag("dcvit", 1, 500))
    b = candidate_name("dcvit", 0.0809, structure_tag("dcvit", 1, 499))
    assert a != b and a == "dcvit-0808-n1h500"
    assert candidate_name("practise", 0.1664, "d2") == "practise-1664-d2"


def test_preview_reports_targets_that_collapse(tiny_vit):
    cfg = FamilyConfig(
        schedule=FinetuneSchedule.tiny(),
        targets=(0.10, 0.1000001, 0.2),
        methods=("dcvit", "practise"),
    )
    prev = preview_family(tiny_vit, cfg)
    dc = [p for p in prev.candidates if p.method == "dcvit"]
    assert len(dc) == 2 and "dcvit@0.1" in prev.duplicates
    assert prev.duplicates["dcvit@0.1"] == dc[0].name
    # on 4 blocks every target rounds to one dropped block: one PRACTISE candidate
    assert len([p for p in prev.candidates if p.method == "practise"]) == 1
    with pytest.raises(UserInputError, match="outside the feasible range"):
        preview_family(tiny_vit, FamilyConfig(schedule=cfg.schedule, targets=(0.9,)))
