"""Step 4 of DC-ViT: finetune a compressed student by feature mimicking, and score students.

The student learns to reproduce the teacher's ``forward_features`` (all tokens after the final
norm) on a few unlabeled images; the teacher's head is reused, so only the layers up to one block
past the deepest compressed block train. Relies only on timm's stable ``VisionTransformer``
attribute names, so blocks may be original, FFN-only or ``nn.Identity``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dcvit_deploy.errors import TrainingDiverged, UnsupportedModelError
from dcvit_deploy.model.images import DEFAULT_AUTO_AUGMENT as PAPER_AUTO_AUGMENT
from dcvit_deploy.model.images import build_transforms

AmpMode = Literal["auto", "off", "bf16"]
TrainableUpto = int | Literal["all"]

PAPER_EPOCHS = 2000
"""Finetuning length of the paper: 2000 epochs of the few-shot set, per finetune."""

# The ``default`` preset, from the Fashion-MNIST benchmark (benchmarks/results/
# compression_quality.md): after the re-fit, 200 steps at lr 1e-4 on plain views matched the paper
# procedure; RandAugment + random resized crop cost 1.2 points of top-1, so it does not augment.
DEFAULT_ITERATIONS = 200
DEFAULT_LR = 1e-4
DEFAULT_LR_WARMUP_FRACTION = 0.05


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def iterations_for_epochs(epochs: float, num_images: int, batch_size: int) -> int:
    """Optimiser steps that show ``num_images`` images ``epochs`` times (batch capped at the
    set size)."""
    _check(epochs > 0 and num_images >= 1 and batch_size >= 1, "epochs, images, batch must be > 0")
    per_epoch = math.ceil(num_images / min(batch_size, num_images))
    return max(1, math.ceil(epochs * per_epoch))


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class FinetuneSchedule:
    """How one feature-mimicking finetune runs (frozen; vary with ``dataclasses.replace``).

    AdamW (weight decay on every trainable parameter, as the reference code); lr: linear warm-up
    over ``lr_warmup_iterations``, then cosine to ``min_lr``; the loss weight ramps 0 -> 1 over
    ``loss_warmup_fraction`` of the steps (paper: 0.01). ``augment``/``auto_augment`` select the
    training transform (:func:`train_transform`), applied where the images are loaded. ``amp``:
    ``auto`` = bf16 autocast on CUDA only, ``bf16`` = always, ``off`` = fp32.
    """

    iterations: int
    batch_size: int = 64
    lr: float = 3e-5
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_warmup_iterations: int = 0
    loss_warmup_fraction: float = 0.01
    grad_clip: float | None = None
    augment: bool = True
    auto_augment: str | None = PAPER_AUTO_AUGMENT
    amp: AmpMode = "auto"
    preset: str = "custom"

    def __post_init__(self) -> None:
        _check(self.iterations >= 1, "iterations must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.lr > 0, "lr must be > 0")
        _check(0 <= self.min_lr <= self.lr, "min_lr must be in [0, lr]")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "betas must be in [0, 1)")
        _check(self.eps > 0, "eps must be > 0")
        _check(
            0 <= self.lr_warmup_iterations <= self.iterations,
            "lr_warmup_iterations must be in [0, iterations]",
        )
        _check(0 <= self.loss_warmup_fraction < 1, "loss_warmup_fraction must be in [0, 1)")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or None")
        _check(
            self.amp in ("auto", "off", "bf16"), f"amp must be auto, off or bf16, not {self.amp!r}"
        )

    @classmethod
    def paper(cls, num_images: int, *, batch_size: int = 64) -> FinetuneSchedule:
        """The paper's finetune: AdamW lr 3e-5, wd 1e-4, cosine over 2000 epochs of the few-shot
        set, batch 64, RandAugment, loss weight ramped over the first 1% (20 epochs)."""
        return cls(
            iterations=iterations_for_epochs(PAPER_EPOCHS, num_images, batch_size),
            batch_size=batch_size,
            lr=3e-5,
            weight_decay=1e-4,
            loss_warmup_fraction=0.01,
            augment=True,
            auto_augment=PAPER_AUTO_AUGMENT,
            preset="paper",
        )

    @classmethod
    def default(
        cls,
        num_images: int,
        *,
        iterations: int = DEFAULT_ITERATIONS,
        lr: float = DEFAULT_LR,
        batch_size: int = 64,
        lr_warmup_fraction: float = DEFAULT_LR_WARMUP_FRACTION,
        augment: bool = False,
    ) -> FinetuneSchedule:
        """A budget finetune: far fewer steps, a higher lr with a short warm-up, no augmentation
        unless ``augment``; ``iterations`` capped at the paper's length for ``num_images``."""
        iterations = min(iterations, iterations_for_epochs(PAPER_EPOCHS, num_images, batch_size))
        return cls(
            iterations=iterations,
            batch_size=batch_size,
            lr=lr,
            weight_decay=1e-4,
            lr_warmup_iterations=round(lr_warmup_fraction * iterations),
            loss_warmup_fraction=0.01,
            augment=augment,
            auto_augment=PAPER_AUTO_AUGMENT if augment else None,
            preset="default",
        )

    @classmethod
    def tiny(
        cls, *, iterations: int = 8, batch_size: int = 4, lr: float = 1e-3
    ) -> FinetuneSchedule:
        """For tests and smoke runs: a handful of fp32 steps, no augmentation, no loss ramp."""
        return cls(
            iterations=iterations,
            batch_size=batch_size,
            lr=lr,
            weight_decay=0.0,
            loss_warmup_fraction=0.0,
            augment=False,
            auto_augment=None,
            amp="off",
            preset="tiny",
        )

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: linear warm-up, then cosine to ``min_lr``."""
        warm = self.lr_warmup_iterations
        if step < warm:
            return self.lr * (step + 1) / warm
        span = max(1, self.iterations - warm)
        progress = min(1.0, (step - warm) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def loss_weight_at(self, step: int) -> float:
        """Loss weight of 0-based ``step``: 0 at step 0, rising linearly to 1 after the ramp."""
        if self.loss_warmup_fraction <= 0:
            return 1.0
        return min(1.0, step / max(1, round(self.loss_warmup_fraction * self.iterations)))


def train_transform(schedule: FinetuneSchedule, data_config: dict[str, Any]) -> Callable[..., Any]:
    """The run's :func:`~dcvit_deploy.model.images.build_transforms` for ``schedule``: timm's
    training transform with ``auto_augment`` when ``augment``, else the eval transform."""
    aug = schedule.auto_augment
    return build_transforms(cast(Any, data_config), train=schedule.augment, auto_augment=aug)


# --------------------------------------------------------------------------- trainable set


def _check_vit(model: nn.Module) -> None:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not hasattr(
        model, "forward_features"
    ):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer layout "
            "(needs .blocks as nn.Sequential and .forward_features)",
            "use a plain timm ViT/DeiT model",
        )


def trainable_parameters(student: nn.Module, upto: TrainableUpto) -> list[nn.Parameter]:
    """The parameters DC-ViT trains after compressing blocks up to ``upto``, in
    ``named_parameters`` order: patch embedding (and ``norm_pre``), cls/reg/dist tokens, position
    embedding, ``blocks[0 .. upto + 1]`` (clipped) and the final ``norm``; later blocks,
    ``fc_norm`` and the head(s) stay frozen. ``"all"``: every parameter (PRACTISE)."""
    _check_vit(student)
    if upto == "all":
        return list(student.parameters())
    depth = len(student.blocks)  # type: ignore[arg-type]
    if isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto < depth:
        raise ValueError(
            f"trainable_upto must be 'all' or a block index in [0, {depth - 1}], not {upto!r}"
        )
    named = (getattr(student, n, None) for n in ("patch_embed", "norm_pre", "norm"))
    modules = [m for m in named if isinstance(m, nn.Module)]
    modules.extend(student.blocks[: min(depth - 1, upto + 1) + 1])  # type: ignore[index]
    tokens = (
        getattr(student, n, None) for n in ("cls_token", "reg_token", "dist_token", "pos_embed")
    )
    chosen = {id(p) for m in modules for p in m.parameters()}
    chosen |= {id(p) for p in tokens if isinstance(p, nn.Parameter)}
    return [p for p in student.parameters() if id(p) in chosen]


def set_trainable(student: nn.Module, upto: TrainableUpto) -> list[nn.Parameter]:
    """Set ``requires_grad`` by :func:`trainable_parameters` (every other parameter off); return
    the trainable parameters."""
    params = trainable_parameters(student, upto)
    chosen = {id(p) for p in params}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen)
    return params


@contextmanager
def _preserved_requires_grad(model: nn.Module) -> Iterator[None]:
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextmanager
def _preserved_modes(*models: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit (``train(mode)`` would flatten them)."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


# --------------------------------------------------------------------------- feature mimicking


@dataclass(frozen=True)
class FinetuneProgress:
    """``step`` of ``total`` done; ``loss``: unweighted feature MSE of the latest batch,
    ``loss_weight`` its ramp weight; times in seconds."""

    step: int
    total: int
    loss: float
    loss_weight: float
    lr: float
    elapsed: float
    eta: float


@dataclass(frozen=True)
class FinetuneResult:
    """Outcome of :func:`feature_mimic`: unweighted feature MSE of the first / last training
    batch (before that step's update); ``amp``: the autocast dtype used, or ``"off"``."""

    steps: int
    initial_loss: float
    final_loss: float
    seconds: float
    amp: str


def _autocast_dtype(amp: AmpMode, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def _autocast(dtype: torch.dtype | None, device: torch.device) -> AbstractContextManager[Any]:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model.forward_features(x)``: every token after the final norm, before pooling."""
    forward = cast(Callable[[torch.Tensor], torch.Tensor], model.forward_features)
    return forward(x)


def _image_of(item: Any) -> torch.Tensor:
    """The image tensor of a dataset item: the item itself or the first of a tuple/list."""
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"expected image tensors from the data, got {type(item).__name__}")
    return item


def _batches(
    data: Dataset[Any] | torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless image batches: a fresh ``generator``-seeded permutation each epoch, ``batch_size``
    (capped at the set size) at a time, never straddling two epochs; dataset items are fetched
    anew each time, so a random transform yields new views."""
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the few-shot dataset is empty")
    batch = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            idx = order[start : start + batch]
            if isinstance(data, torch.Tensor):
                yield data[idx]
            else:
                yield torch.stack([_image_of(data[int(i)]) for i in idx])


class TeacherFeatureBank:
    """Fixed (augmented) views and the teacher's ``forward_features`` on them: as the data of
    :func:`feature_mimic` it saves the teacher's forward at every step (a quarter of a step's
    cost), at the price of augmentation limited to the views in the bank."""

    def __init__(self, images: torch.Tensor, features: torch.Tensor) -> None:
        if images.shape[0] != features.shape[0] or images.shape[0] == 0:
            raise ValueError("a feature bank needs as many (>0) features as images")
        self.images = images
        self.features = features

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        teacher: nn.Module,
        data: Dataset[Any] | torch.Tensor,
        *,
        views: int = 1,
        seed: int = 0,
        batch: int = 128,
    ) -> TeacherFeatureBank:
        """``views`` seeded passes over ``data`` (each item fetched anew, so a random transform
        in the dataset gives a new view each pass) and the teacher's features on them."""
        _check(views >= 1, "views must be >= 1")
        if isinstance(data, torch.Tensor):
            images = data.repeat(views, 1, 1, 1)
        else:
            with _seeded_global_rng(seed):
                n = len(data)  # type: ignore[arg-type]
                images = torch.stack([_image_of(data[i]) for _ in range(views) for i in range(n)])
        with _preserved_modes(teacher):
            teacher.eval()
            dev = _resolve_device(teacher, None)
            feats = torch.cat(
                [_features(teacher, c.to(dev)).float().cpu() for c in images.split(batch)]
            )
        return cls(images, feats)


@contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG and Python's ``random`` (what dataset transforms draw from) for the
    duration, restoring the caller's RNG state afterwards."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def feature_mimic(
    student: nn.Module,
    teacher: nn.Module,
    data: Dataset[Any] | torch.Tensor | TeacherFeatureBank,
    schedule: FinetuneSchedule,
    *,
    trainable_upto: TrainableUpto,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: Callable[[FinetuneProgress], None] | None = None,
) -> FinetuneResult:
    """Finetune ``student`` in place to reproduce ``teacher.forward_features`` on ``data``.

    - ``data``: already-transformed images (a ``Dataset``, items may be ``(image, label)``, or an
      ``[N,3,H,W]`` tensor), or a :class:`TeacherFeatureBank` (the teacher is then not run).
    - Loss: ``loss_weight_at(step) * MSE`` over all tokens and channels, in fp32 (0 at the first
      step: with ``weight_decay=0`` that step leaves the weights unchanged). AdamW on
      :func:`trainable_parameters`, per-step ``lr_at``, optional gradient clip.
    - Both models run in eval mode (no dropout/drop-path, fixed norm statistics), the teacher
      under ``no_grad``; both move to ``device`` (default: the student's). ``requires_grad``
      flags and train/eval modes are restored on return.
    - Bitwise deterministic on CPU for one seed: batch order from a seeded generator; torch's CPU
      RNG and Python's ``random`` seeded for the run and restored afterwards.
    - ``progress`` about 100 times per run and after the last step.
    """
    if student is teacher:
        raise ValueError("student and teacher must be different modules")
    _check_vit(student)
    _check_vit(teacher)
    dev = _resolve_device(student, device)
    student.to(dev)
    teacher.to(dev)
    total = schedule.iterations
    every = max(1, total // 100)
    amp_dtype = _autocast_dtype(schedule.amp, dev)
    initial_loss = last_loss = math.nan
    steps_done = 0

    with (
        _preserved_requires_grad(student),
        _preserved_requires_grad(teacher),
        _preserved_modes(student, teacher),
        _seeded_global_rng(seed),
    ):
        params = set_trainable(student, trainable_upto)
        for p in teacher.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.AdamW(
            params,
            lr=schedule.lr_at(0),
            betas=schedule.betas,
            eps=schedule.eps,
            weight_decay=schedule.weight_decay,
        )
        student.eval()
        teacher.eval()
        generator = torch.Generator().manual_seed(seed)
        bank = data if isinstance(data, TeacherFeatureBank) else None
        indices = torch.arange(len(bank)) if bank is not None else data
        stream = _batches(cast(Any, indices), schedule.batch_size, generator)
        start = time.perf_counter()
        for step in range(total):
            lr = schedule.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            weight = schedule.loss_weight_at(step)
            if bank is not None:
                idx = next(stream)
                x = bank.images[idx].to(dev, non_blocking=True)
                target = bank.features[idx].to(dev, non_blocking=True)
            else:
                x = next(stream).to(dev, non_blocking=True)
                with torch.no_grad(), _autocast(amp_dtype, dev):
                    target = _features(teacher, x)
            with _autocast(amp_dtype, dev):
                feats = _features(student, x)
            if feats.shape != target.shape:
                raise UnsupportedModelError(
                    f"student features {tuple(feats.shape)} do not match the teacher's "
                    f"{tuple(target.shape)}",
                    "compress only block internals; token count and width must stay the same",
                )
            mse = F.mse_loss(feats.float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            (mse * weight).backward()
            if schedule.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
            optimizer.step()
            steps_done = step + 1
            # Reading the loss synchronises the device, so only on reporting steps.
            if step == 0 or steps_done % every == 0 or steps_done == total:
                last_loss = float(mse.detach())
                if not math.isfinite(last_loss):
                    raise TrainingDiverged(
                        f"the finetune diverged at step {steps_done}/{total}: feature loss "
                        f"{last_loss} at lr {lr:.3g}",
                        "lower --lr (the presets use 1e-4 and 3e-5) or use a --schedule preset",
                    )
                if step == 0:
                    initial_loss = last_loss
                if progress is not None:
                    elapsed = time.perf_counter() - start
                    eta = elapsed / steps_done * (total - steps_done)
                    progress(
                        FinetuneProgress(steps_done, total, last_loss, weight, lr, elapsed, eta)
                    )
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start

    amp = "off" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    return FinetuneResult(steps_done, initial_loss, last_loss, seconds, amp)


# --------------------------------------------------------------------------- scores


def _chunks(images: torch.Tensor, batch: int) -> Sequence[torch.Tensor]:
    _check(batch >= 1, "batch must be >= 1")
    if images.ndim != 4:
        raise ValueError(f"expected images [N,3,H,W], got shape {tuple(images.shape)}")
    _check(images.shape[0] >= 1, "no images to score on")
    return images.split(batch)


@torch.no_grad()
def kl_score(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    batch: int = 64,
    *,
    device: str | torch.device | None = None,
) -> float:
    """DC-ViT's recoverability score: mean over ``images`` of KL(softmax(teacher) ||
    softmax(student)) in fp32, 0 when the models agree. Eval mode (modes restored), on
    ``device`` (default: the student's)."""
    dev = _resolve_device(student, device)
    total = 0.0
    with _preserved_modes(student, teacher):
        student.eval()
        teacher.eval()
        for chunk in _chunks(images, batch):
            x = chunk.to(dev)
            log_t = F.log_softmax(teacher(x).float(), dim=-1)
            log_s = F.log_softmax(student(x).float(), dim=-1)
            total += float(F.kl_div(log_s, log_t, log_target=True, reduction="sum"))
    if not math.isfinite(total):
        # max(0.0, nan) is 0.0: a broken student would score as the best possible one.
        raise TrainingDiverged(
            f"the recoverability score (KL to the teacher) is {total}: the compressed model "
            "produces non-finite outputs",
            "lower --lr, or check the checkpoint and images for non-finite values",
        )
    # KL is >= 0; rounding can leave a tiny negative sum for near-identical models.
    return max(0.0, total / images.shape[0])


@torch.no_grad()
def feature_error(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    batch: int = 64,
    *,
    device: str | torch.device | None = None,
) -> float:
    """MSE between student and teacher ``forward_features`` over ``images`` in fp32 and eval mode
    (PRACTISE's recoverability measure, the finetune objective on held-out images)."""
    dev = _resolve_device(student, device)
    sq_sum = 0.0
    count = 0
    with _preserved_modes(student, teacher):
        student.eval()
        teacher.eval()
        for chunk in _chunks(images, batch):
            x = chunk.to(dev)
            s = _features(student, x).float()
            t = _features(teacher, x).float()
            if s.shape != t.shape:
                raise ValueError(f"feature shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
            sq_sum += float(((s - t) ** 2).sum())
            count += s.numel()
    return sq_sum / count


__all__ = [
    "DEFAULT_ITERATIONS",
    "DEFAULT_LR",
    "PAPER_AUTO_AUGMENT",
    "PAPER_EPOCHS",
    "FinetuneProgress",
    "FinetuneResult",
    "FinetuneSchedule",
    "TeacherFeatureBank",
    "feature_error",
    "feature_mimic",
    "iterations_for_epochs",
    "kl_score",
    "set_trainable",
    "train_transform",
    "trainable_parameters",
]
