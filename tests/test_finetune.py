"""Feature-mimicking finetune (DC-ViT step 4) and the student scores, on tiny CPU ViTs."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

# Same geometry as the ``tiny_vit`` fixture, for variants the fixture does not build.
from fakes.runs import TINY_VIT_KWARGS
from torch import nn
from torch.utils.data import Dataset

from dcvit_deploy.compress.finetune import (
    FinetuneProgress,
    FinetuneResult,
    FinetuneSchedule,
    feature_error,
    feature_mimic,
    iterations_for_epochs,
    kl_score,
    set_trainable,
    trainable_parameters,
)
from dcvit_deploy.errors import UnsupportedModelError
from dcvit_deploy.store.records import from_dict, to_dict


class FFNOnly(nn.Module):
    """The shape surgery gives a compressed block: ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.ls2 = block.ls2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls2(self.mlp(self.norm2(x)))


class PairDataset(Dataset):
    """Items are ``(image, label)``, as an image-folder dataset yields them."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], 0


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).clamp(-1, 1)


def _perturbed(teacher: nn.Module, block: int = 1, scale: float = 0.1) -> nn.Module:
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in student.blocks[block].parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return student


def trainable_parameter_names(model: nn.Module, upto: int | str) -> list[str]:
    chosen = {id(p) for p in trainable_parameters(model, upto)}  # type: ignore[arg-type]
    return [n for n, p in model.named_parameters() if id(p) in chosen]


def _expected_names(model: nn.Module, blocks: range) -> list[str]:
    keep = ("cls_token", "pos_embed", "patch_embed.", "norm.", *(f"blocks.{i}." for i in blocks))
    return [n for n, _ in model.named_parameters() if n.startswith(keep)]


# --------------------------------------------------------------------------- trainable set


def test_trainable_set_follows_the_paper_rule(tiny_vit: nn.Module) -> None:
    names = trainable_parameter_names(tiny_vit, 1)
    assert names == _expected_names(tiny_vit, range(3))  # blocks 0..(1 + 1)
    assert "cls_token" in names and "pos_embed" in names and "norm.weight" in names
    assert not any(n.startswith(("blocks.3.", "head.", "fc_norm.")) for n in names)

    params = set_trainable(tiny_vit, 1)
    grad_names = [n for n, p in tiny_vit.named_parameters() if p.requires_grad]
    assert grad_names == names
    assert len(params) == len(names)
    assert not tiny_vit.head.weight.requires_grad


def test_trainable_set_clips_at_last_block_and_all_includes_head(tiny_vit: nn.Module) -> None:
    last = trainable_parameter_names(tiny_vit, 3)
    assert last == _expected_names(tiny_vit, range(4))
    assert "head.weight" not in last
    everything = trainable_parameter_names(tiny_vit, "all")
    assert everything == [n for n, _ in tiny_vit.named_parameters()]
    with pytest.raises(ValueError, match="trainable_upto"):
        trainable_parameters(tiny_vit, 4)
    with pytest.raises(ValueError, match="trainable_upto"):
        trainable_parameters(tiny_vit, -1)


def test_trainable_set_on_distilled_and_compressed_models() -> None:
    import timm

    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **TINY_VIT_KWARGS)
    deit.blocks[1] = nn.Identity()
    deit.blocks[2] = FFNOnly(deit.blocks[2])
    names = trainable_parameter_names(deit, 2)
    assert "dist_token" in names and "cls_token" in names
    assert any(n.startswith("blocks.2.mlp.") for n in names)
    assert any(n.startswith("blocks.3.") for n in names)
    assert not any(n.startswith(("head.", "head_dist.")) for n in names)
    assert not any(n.startswith("blocks.2.attn") for n in names)


def test_non_vit_is_rejected() -> None:
    with pytest.raises(UnsupportedModelError):
        trainable_parameters(nn.Linear(3, 3), 0)


# --------------------------------------------------------------------------- schedule


def test_paper_preset_matches_the_method() -> None:
    s = FinetuneSchedule.paper(500)
    assert s.iterations == 2000 * 8  # 2000 epochs of 500 images at batch 64
    assert (s.lr, s.weight_decay, s.batch_size) == (3e-5, 1e-4, 64)
    # the loss ramp spans the first 20 of 2000 epochs (160 steps)
    assert (s.loss_weight_at(80), s.loss_weight_at(159), s.loss_weight_at(160)) == (
        0.5,
        159 / 160,
        1,
    )
    assert s.augment and s.auto_augment == "rand-m9-mstd0.5-inc1"
    assert FinetuneSchedule.paper(50).iterations == 2000  # batch capped at the 50 images
    assert iterations_for_epochs(1.5, 100, 64) == 3
    d = FinetuneSchedule.default(500)
    assert d.iterations < s.iterations and d.lr > s.lr and d.preset == "default"
    assert not d.augment and d.auto_augment is None  # RandAugment hurt on the benchmark
    assert FinetuneSchedule.default(500, augment=True).auto_augment == s.auto_augment


def test_schedule_curves_and_roundtrip() -> None:
    s = FinetuneSchedule(iterations=100, lr=1e-3, lr_warmup_iterations=10, loss_warmup_fraction=0.1)
    assert s.lr_at(0) == pytest.approx(1e-4)
    assert s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(99) < 1e-5
    assert [s.loss_weight_at(i) for i in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert FinetuneSchedule(iterations=10, loss_warmup_fraction=0.0).loss_weight_at(0) == 1.0
    assert from_dict(FinetuneSchedule, to_dict(s)) == s
    tiny = FinetuneSchedule.tiny()
    assert from_dict(FinetuneSchedule, to_dict(tiny)) == tiny
    with pytest.raises(ValueError):
        FinetuneSchedule(iterations=0)
    with pytest.raises(ValueError):
        FinetuneSchedule(iterations=10, amp="fp8")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- feature mimicking


def test_feature_mimic_recovers_a_perturbed_block(tiny_vit: nn.Module) -> None:
    teacher = tiny_vit
    student = _perturbed(teacher)
    train, held_out = _images(16, 1), _images(8, 2)
    head_before = student.head.weight.detach().clone()
    late_before = [p.detach().clone() for p in student.blocks[3].parameters()]
    before = feature_error(student, teacher, held_out)
    reports: list[FinetuneProgress] = []

    result = feature_mimic(
        student,
        teacher,
        train,
        FinetuneSchedule.tiny(iterations=40, batch_size=8, lr=1e-3),
        trainable_upto=1,
        seed=0,
        progress=reports.append,
    )

    after = feature_error(student, teacher, held_out)
    assert after < before / 2
    assert result.final_loss < result.initial_loss
    assert result.steps == 40 and result.amp == "off"
    assert [r.step for r in reports] == list(range(1, 41))  # about 100 reports: every step here
    assert reports[-1].eta == 0.0 and all(r.total == 40 for r in reports)
    assert reports[-1].loss == result.final_loss and reports[0].loss == result.initial_loss
    # Frozen parts are untouched and the student's flags are restored.
    assert torch.equal(student.head.weight, head_before)
    for p, q in zip(student.blocks[3].parameters(), late_before, strict=True):
        assert torch.equal(p, q)
    assert all(p.requires_grad for p in student.parameters())


def test_feature_mimic_is_deterministic_for_a_seed(tiny_vit: nn.Module) -> None:
    data = PairDataset(_images(12, 3))
    schedule = FinetuneSchedule.tiny(iterations=5, batch_size=4)

    def run(seed: int) -> dict[str, torch.Tensor]:
        student = _perturbed(tiny_vit)
        feature_mimic(student, tiny_vit, data, schedule, trainable_upto=1, seed=seed)
        return student.state_dict()

    first, second, other = run(7), run(7), run(8)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # A different seed draws other batches, so the weights differ: the check above has teeth.
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_loss_ramp_starts_at_zero_weight(tiny_vit: nn.Module) -> None:
    data = _images(8, 4)

    def one_step(loss_warmup_fraction: float) -> tuple[nn.Module, FinetuneResult, float]:
        student = _perturbed(tiny_vit)
        schedule = dataclasses.replace(  # one step; the ramp weighs it 0 (one-step ramp)
            FinetuneSchedule.tiny(iterations=1, batch_size=4),
            loss_warmup_fraction=loss_warmup_fraction,
        )
        weights: list[float] = []
        result = feature_mimic(
            student,
            tiny_vit,
            data,
            schedule,
            trainable_upto=1,
            progress=lambda r: weights.append(r.loss_weight),
        )
        return student, result, weights[0]

    reference = _perturbed(tiny_vit).state_dict()
    ramped, result, weight = one_step(0.1)
    assert result.steps == 1 and result.initial_loss > 0
    assert weight == 0.0
    assert all(torch.equal(v, ramped.state_dict()[k]) for k, v in reference.items())
    unramped, _, weight = one_step(0.0)
    assert weight == 1.0
    assert not all(torch.equal(v, unramped.state_dict()[k]) for k, v in reference.items())


def test_stochastic_layers_are_off_and_modes_restored() -> None:
    import timm

    torch.manual_seed(0)
    kwargs = dict(TINY_VIT_KWARGS, drop_path_rate=0.5, proj_drop_rate=0.5, pos_drop_rate=0.5)
    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).train()
    student = copy.deepcopy(teacher).train()
    result = feature_mimic(
        student,
        teacher,
        _images(4, 5),
        FinetuneSchedule.tiny(iterations=1, batch_size=4),
        trainable_upto=0,
    )
    # Identical models in deterministic mode give exactly zero loss; active dropout would not.
    assert result.initial_loss == 0.0
    assert student.training and teacher.training
    assert all(m.training for m in student.modules())


def test_feature_mimic_trains_a_compressed_student(tiny_vit: nn.Module) -> None:
    student = copy.deepcopy(tiny_vit)
    student.blocks[1] = FFNOnly(student.blocks[1])
    student.blocks[2] = nn.Identity()
    data = PairDataset(_images(8, 6))
    result = feature_mimic(
        student, tiny_vit, data, FinetuneSchedule.tiny(iterations=6), trainable_upto=2, seed=0
    )
    assert result.steps == 6 and math.isfinite(result.final_loss)
    assert result.final_loss < result.initial_loss


def test_feature_mimic_rejects_same_module(tiny_vit: nn.Module) -> None:
    with pytest.raises(ValueError, match="different"):
        feature_mimic(tiny_vit, tiny_vit, _images(4, 0), FinetuneSchedule.tiny(), trainable_upto=0)


# --------------------------------------------------------------------------- scores


def test_kl_score_and_feature_error(tiny_vit: nn.Module) -> None:
    images = _images(6, 7)
    same = copy.deepcopy(tiny_vit)
    assert kl_score(same, tiny_vit, images, batch=4) == 0.0
    assert feature_error(same, tiny_vit, images, batch=4) == 0.0
    other = _perturbed(tiny_vit, scale=0.5)
    kl = kl_score(other, tiny_vit, images, batch=4)
    assert kl > 0
    # Batch size does not change the mean.
    assert kl == pytest.approx(kl_score(other, tiny_vit, images, batch=6), rel=1e-5)
    assert feature_error(other, tiny_vit, images) > 0
    with pytest.raises(ValueError):
        kl_score(other, tiny_vit, images[0])


def test_amp_policy_and_bf16_run(tiny_vit: nn.Module) -> None:
    from dcvit_deploy.compress.finetune import _autocast_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _autocast_dtype("auto", cuda) is torch.bfloat16
    assert _autocast_dtype("auto", cpu) is None
    assert _autocast_dtype("off", cuda) is None
    assert _autocast_dtype("bf16", cpu) is torch.bfloat16
    schedule = dataclasses.replace(FinetuneSchedule.tiny(iterations=2), amp="bf16")
    result = feature_mimic(
        _perturbed(tiny_vit), tiny_vit, _images(4, 8), schedule, trainable_upto=1
    )
    assert result.amp == "bfloat16" and math.isfinite(result.final_loss)


def test_train_transform_follows_the_schedule() -> None:
    from PIL import Image

    from dcvit_deploy.compress.finetune import train_transform

    config = {
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.9,
    }
    image = Image.fromarray(
        (torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    )
    plain = train_transform(FinetuneSchedule.tiny(), config)
    assert plain(image).shape == (3, 32, 32)
    assert torch.equal(plain(image), plain(image))  # no augmentation: deterministic
    augmented = train_transform(FinetuneSchedule.paper(50), config)
    assert "RandAugment" in repr(augmented)
    torch.manual_seed(0)
    views = [augmented(image) for _ in range(3)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert not torch.equal(views[0], views[1])


def test_a_diverged_finetune_stops_with_the_step_instead_of_scoring_best(tiny_vit):
    """A non-finite loss stops the finetune naming the step and lr (here one NaN weight, as a
    huge --lr produces after some steps); a student with non-finite outputs is never scored
    KL 0 (max(0.0, nan) is 0.0)."""
    import copy

    import torch

    from dcvit_deploy.compress.finetune import FinetuneSchedule, feature_mimic, kl_score
    from dcvit_deploy.errors import TrainingDiverged

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    student = copy.deepcopy(tiny_vit)
    with torch.no_grad():
        student.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    schedule = FinetuneSchedule.tiny(batch_size=2)
    schedule = dataclasses.replace(schedule, iterations=5, lr_warmup_iterations=0)
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+/5.*lr"):
        feature_mimic(student, tiny_vit, images, schedule, trainable_upto="all")
    broken = copy.deepcopy(tiny_vit)
    with torch.no_grad():
        broken.head.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="non-finite outputs"):
        kl_score(broken, tiny_vit, images)
