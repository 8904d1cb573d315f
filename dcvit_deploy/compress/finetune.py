"""Step 4 of DC-ViT: finetune a compressed student by feature mimicking, and score students.

The student learns to reproduce the original (teacher) model's ``forward_features`` output -- all
tokens after the final norm, before pooling and head -- on a few unlabeled images. The teacher's
classifier head is reused unchanged, so only the layers up to one block past the deepest
compressed block are trained (see :func:`trainable_parameters`).

Everything here relies only on timm's stable ``VisionTransformer`` attribute names
(``patch_embed``, ``cls_token``, ``reg_token``, ``dist_token``, ``pos_embed``, ``norm_pre``,
``blocks``, ``norm``, ``fc_norm``, ``head``, ``head_dist``, ``forward_features``), so it works for
any ViT whose ``blocks`` hold original blocks, FFN-only blocks or ``nn.Identity``.

Importing this module imports torch only.
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
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dcvit_deploy.errors import TrainingDiverged, UnsupportedModelError
from dcvit_deploy.store.records import from_dict as _record_from_dict
from dcvit_deploy.store.records import to_dict as _record_to_dict

AmpMode = Literal["auto", "off", "bf16"]
TrainableUpto = int | Literal["all"]

PAPER_EPOCHS = 2000
"""Finetuning length of the paper: 2000 epochs of the few-shot set, per finetune."""
PAPER_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
"""timm RandAugment policy of the reference training transform."""

# The cheaper ``default`` preset, chosen on the Fashion-MNIST benchmark
# (benchmarks/results/compression_quality.md): after the closed-form re-fit, 200 steps (batch 32,
# lr 1e-4) on plain views came within 0.3 point of -- in fact above -- the paper procedure
# (RandAugment, progressive, finetune ranking); the paper's RandAugment + random resized crop cost
# 1.2 points of top-1 on 28x28 inputs, so the default does not augment.
DEFAULT_ITERATIONS = 200
DEFAULT_LR = 1e-4
DEFAULT_LR_WARMUP_FRACTION = 0.05


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def iterations_for_epochs(epochs: float, num_images: int, batch_size: int) -> int:
    """Optimiser steps that show ``num_images`` images ``epochs`` times (batch capped at the
    set size)."""
    _check(epochs > 0, "epochs must be > 0")
    _check(num_images >= 1, "num_images must be >= 1")
    _check(batch_size >= 1, "batch_size must be >= 1")
    per_epoch = math.ceil(num_images / min(batch_size, num_images))
    return max(1, math.ceil(epochs * per_epoch))


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class FinetuneSchedule:
    """How one feature-mimicking finetune runs. Frozen; vary it with ``dataclasses.replace``.

    - ``iterations``: optimiser steps; ``batch_size`` images per step (capped at the data size
      when the data is a ``Dataset``).
    - AdamW with ``lr``, ``weight_decay`` (applied to every trainable parameter, as the reference
      code does), ``betas``, ``eps``.
    - lr: linear warm-up over ``lr_warmup_iterations`` steps, then cosine from ``lr`` to
      ``min_lr`` over the remaining steps.
    - ``loss_warmup_fraction``: the loss weight ramps linearly from 0 (first step) to 1 over this
      fraction of the steps (paper: the first 20 of 2000 epochs, i.e. 0.01); 0 disables the ramp.
    - ``grad_clip``: max global gradient norm, or ``None``.
    - ``augment`` / ``auto_augment``: whether the few-shot images get timm's training transform
      (random resized crop, flip and this RandAugment policy). Augmentation happens where the
      images are loaded -- build the dataset with :func:`train_transform` -- because
      :func:`feature_mimic` receives already-transformed tensors.
    - ``amp``: ``"auto"`` uses bf16 autocast on CUDA and none on CPU; ``"bf16"`` forces bf16
      autocast on any device; ``"off"`` runs in fp32.
    - ``preset``: the name of the preset it came from, for reports.
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
        _check(len(self.betas) == 2, "betas must be a pair")
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

    # ------------------------------------------------------------------ presets

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
        """A budget finetune: far fewer steps than the paper, a higher lr with a short linear
        warm-up (a higher lr needs it), same loss and ramp; no augmentation unless ``augment``
        (the paper's RandAugment cost 1.2 points on the 28x28 benchmark). ``iterations`` is
        capped at the paper's length for ``num_images``, which it never needs to exceed."""
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict stamped with the records schema version."""
        return _record_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneSchedule:
        return _record_from_dict(cls, data)

    # ------------------------------------------------------------------ per-step values

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: linear warm-up, then cosine to ``min_lr``."""
        warm = self.lr_warmup_iterations
        if step < warm:
            return self.lr * (step + 1) / warm
        span = max(1, self.iterations - warm)
        progress = min(1.0, (step - warm) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def loss_warmup_steps(self) -> int:
        """Steps of the loss-weight ramp (0: no ramp)."""
        if self.loss_warmup_fraction <= 0:
            return 0
        return max(1, round(self.loss_warmup_fraction * self.iterations))

    def loss_weight_at(self, step: int) -> float:
        """Loss weight of 0-based ``step``: 0 at step 0, rising linearly to 1 after the ramp."""
        ramp = self.loss_warmup_steps
        if ramp == 0:
            return 1.0
        return min(1.0, step / ramp)


def train_transform(schedule: FinetuneSchedule, data_config: dict[str, Any]) -> Callable[..., Any]:
    """The image transform that matches ``schedule``: the run's own
    :func:`~dcvit_deploy.model.images.build_transforms` -- timm's training transform with
    ``schedule.auto_augment`` when ``schedule.augment``, else the model's eval transform."""
    from dcvit_deploy.model.images import build_transforms

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


def _trainable_modules_and_tokens(
    model: nn.Module, upto: TrainableUpto
) -> tuple[list[nn.Module], list[nn.Parameter]]:
    _check_vit(model)
    depth = len(model.blocks)  # type: ignore[arg-type]
    valid_index = isinstance(upto, int) and not isinstance(upto, bool) and 0 <= upto < depth
    if upto != "all" and not valid_index:
        raise ValueError(
            f"trainable_upto must be 'all' or a block index in [0, {depth - 1}], not {upto!r}"
        )
    modules: list[nn.Module] = []
    # norm_pre sits between the embeddings and block 0 (a LayerNorm in CLIP-style ViTs); it is
    # part of the embedding stage, so it trains with it.
    for name in ("patch_embed", "norm_pre"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            modules.append(module)
    last = depth - 1 if upto == "all" else min(depth - 1, upto + 1)
    modules.extend(model.blocks[: last + 1])  # type: ignore[index]
    norm = getattr(model, "norm", None)
    if isinstance(norm, nn.Module):
        modules.append(norm)
    tokens = [
        p
        for p in (
            getattr(model, n, None) for n in ("cls_token", "reg_token", "dist_token", "pos_embed")
        )
        if isinstance(p, nn.Parameter)
    ]
    return modules, tokens


def trainable_parameters(
    student: nn.Module, deepest_modified_block: TrainableUpto
) -> list[nn.Parameter]:
    """The parameters DC-ViT trains after compressing blocks up to ``deepest_modified_block``.

    Trainable: patch embedding (and ``norm_pre``), cls/reg/dist tokens, position embedding,
    ``blocks[0 .. deepest_modified_block + 1]`` (clipped to the last block) and the final
    ``norm``. Everything else -- later blocks, ``fc_norm``, the classifier head(s) -- stays
    frozen, so the teacher's head keeps reading features the student learns to reproduce.
    ``"all"`` returns every parameter (the PRACTISE baseline finetunes the whole model). Does not
    change ``requires_grad``; see :func:`set_trainable`. Each parameter is listed once, in
    ``named_parameters`` order.
    """
    if deepest_modified_block == "all":
        _check_vit(student)
        return list(student.parameters())
    modules, tokens = _trainable_modules_and_tokens(student, deepest_modified_block)
    chosen = {id(p) for m in modules for p in m.parameters()} | {id(p) for p in tokens}
    return [p for p in student.parameters() if id(p) in chosen]


def trainable_parameter_names(student: nn.Module, upto: TrainableUpto) -> list[str]:
    """Names (``named_parameters``) of :func:`trainable_parameters`, for logs and tests."""
    chosen = {id(p) for p in trainable_parameters(student, upto)}
    return [n for n, p in student.named_parameters() if id(p) in chosen]


def set_trainable(student: nn.Module, upto: TrainableUpto) -> list[nn.Parameter]:
    """Set ``requires_grad`` by the rule of :func:`trainable_parameters`; return the trainable
    parameters. Every other parameter of ``student`` gets ``requires_grad=False``."""
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
    """A progress report: ``step`` steps of ``total`` done; ``loss`` is the unweighted feature
    MSE of the latest batch, ``loss_weight`` its ramp weight; times in seconds."""

    step: int
    total: int
    loss: float
    loss_weight: float
    lr: float
    elapsed: float
    eta: float


@dataclass(frozen=True)
class FinetuneResult:
    """Outcome of :func:`feature_mimic`.

    ``initial_loss`` / ``final_loss``: unweighted feature MSE of the first / last training batch
    (measured before that step's update). ``loss_history``: sparse ``(step, loss)`` pairs, 1-based
    steps. ``stopped``: ``should_stop`` ended the run early. ``amp``: the autocast dtype used, or
    ``"off"``.
    """

    steps: int
    total_steps: int
    initial_loss: float
    final_loss: float
    loss_history: tuple[tuple[int, float], ...]
    seconds: float
    images_per_second: float
    trainable_params: int
    stopped: bool
    device: str
    amp: str

    def to_dict(self) -> dict[str, Any]:
        return _record_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneResult:
        return _record_from_dict(cls, data)


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
    data: Dataset[Any] | DataLoader[Any] | torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless stream of image batches.

    A ``Dataset`` (or a tensor of images) is walked in a fresh ``generator``-seeded permutation
    each epoch, ``batch_size`` (capped at its length) images at a time, a batch never straddling
    two epochs; items are fetched anew each time so a random transform in the dataset yields new
    views. A ``DataLoader`` is iterated as it is, epoch after epoch.
    """
    if isinstance(data, torch.Tensor):
        data = TensorDataset(data)
    if isinstance(data, DataLoader):
        while True:
            empty = True
            for item in data:
                empty = False
                yield _image_of(item)
            if empty:
                raise ValueError("the DataLoader yielded no batches")
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the few-shot dataset is empty")
    batch = min(batch_size, n)
    # A TensorDataset is indexed in one gather instead of one item at a time.
    images = data.tensors[0] if isinstance(data, TensorDataset) else None
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            idx = order[start : start + batch]
            if images is not None:
                yield images[idx]
            else:
                yield torch.stack([_image_of(data[int(i)]) for i in idx])


class TeacherFeatureBank:
    """A fixed bank of (augmented) views and the teacher's ``forward_features`` on them.

    Passing a bank as the data of :func:`feature_mimic` skips the teacher's forward pass at every
    step (a quarter of a step's cost); the price is that augmentation is limited to the views
    in the bank. Build it with :meth:`build`.
    """

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
    data: Dataset[Any] | DataLoader[Any] | torch.Tensor | TeacherFeatureBank,
    schedule: FinetuneSchedule,
    *,
    trainable_upto: TrainableUpto,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: Callable[[FinetuneProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log_every: int | None = None,
) -> FinetuneResult:
    """Finetune ``student`` in place to reproduce ``teacher.forward_features`` on ``data``.

    Contract:
    - ``data``: a ``Dataset`` of already-transformed image tensors (items may be ``(image,
      label)``; labels are ignored), a ``DataLoader`` yielding such batches, or an ``[N,3,H,W]``
      tensor. Batches are drawn as in :func:`_batches`. A :class:`TeacherFeatureBank` supplies
      the teacher's features with its views, and the teacher is not run.
    - Loss: ``w(step) * MSE(student.forward_features(x), teacher.forward_features(x))`` over all
      tokens and channels, ``w`` the ramp of :meth:`FinetuneSchedule.loss_weight_at` (0 at the
      first step, so with ``weight_decay=0`` the first step leaves the weights unchanged).
    - The teacher runs in eval mode under ``no_grad``. The student also runs in eval mode while
      it trains: that disables dropout, drop-path and patch dropout (the method uses none) and
      keeps any norm statistics fixed, without relying on each module's own training checks.
    - Trainable parameters follow :func:`trainable_parameters` for ``trainable_upto``; AdamW
      with per-step lr from :meth:`FinetuneSchedule.lr_at`; optional global-norm gradient clip.
    - Both models are moved to ``device`` (default: the student's device) and left there. The
      student's ``requires_grad`` flags and train/eval modes are restored on return.
    - Deterministic on CPU: the same seed, data and schedule give bitwise-identical weights.
      Batch order comes from a ``seed``-ed generator; torch's CPU RNG and Python's ``random``
      are seeded for the run (for random transforms in the dataset) and restored afterwards.
    - On CUDA, ``schedule.amp`` ``"auto"`` runs both forwards under bf16 autocast; the loss is
      computed in fp32.
    - ``progress`` is called every ``log_every`` steps (default: about 100 reports per run) and
      after the last step; ``should_stop`` is polled before every step and ends the run early.
    """
    if student is teacher:
        raise ValueError("student and teacher must be different modules")
    _check_vit(student)
    _check_vit(teacher)
    dev = _resolve_device(student, device)
    student.to(dev)
    teacher.to(dev)
    total = schedule.iterations
    every = max(1, total // 100) if log_every is None else max(1, log_every)
    amp_dtype = _autocast_dtype(schedule.amp, dev)

    history: list[tuple[int, float]] = []
    initial_loss = math.nan
    last_loss = math.nan
    images_seen = 0
    steps_done = 0
    stopped = False

    with (
        _preserved_requires_grad(student),
        _preserved_requires_grad(teacher),
        _preserved_modes(student, teacher),
        _seeded_global_rng(seed),
    ):
        params = set_trainable(student, trainable_upto)
        for p in teacher.parameters():
            p.requires_grad_(False)
        if not params:
            raise ValueError("the student has no trainable parameters for this trainable_upto")
        n_trainable = sum(p.numel() for p in params)
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
        if isinstance(data, TeacherFeatureBank):
            stream = _batches(torch.arange(len(data)), schedule.batch_size, generator)
        else:
            stream = _batches(data, schedule.batch_size, generator)
        start = time.perf_counter()
        for step in range(total):
            if should_stop is not None and should_stop():
                stopped = True
                break
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
            images_seen += x.shape[0]
            # Reading the loss synchronises the device, so only on reporting steps.
            report = step == 0 or steps_done % every == 0 or steps_done == total
            if report:
                last_loss = float(mse.detach())
                if not math.isfinite(last_loss):
                    raise TrainingDiverged(
                        f"the finetune diverged at step {steps_done}/{total}: feature loss "
                        f"{last_loss} at lr {lr:.3g}",
                        "lower --lr (the presets use 1e-4 and 3e-5) or use a --schedule preset",
                    )
                if step == 0:
                    initial_loss = last_loss
                history.append((steps_done, last_loss))
                if progress is not None:
                    elapsed = time.perf_counter() - start
                    eta = elapsed / steps_done * (total - steps_done)
                    progress(
                        FinetuneProgress(steps_done, total, last_loss, weight, lr, elapsed, eta)
                    )
        if steps_done and history and history[-1][0] != steps_done:
            # Stopped between reporting steps: record where it ended.
            last_loss = float(mse.detach())
            history.append((steps_done, last_loss))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start

    return FinetuneResult(
        steps=steps_done,
        total_steps=total,
        initial_loss=initial_loss,
        final_loss=last_loss,
        loss_history=tuple(history),
        seconds=seconds,
        images_per_second=images_seen / seconds if seconds > 0 else math.nan,
        trainable_params=n_trainable,
        stopped=stopped,
        device=str(dev),
        amp="off" if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
    )


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
    """Mean over ``images`` of KL(softmax(teacher logits) || softmax(student logits)), in fp32.

    DC-ViT's recoverability score of a compressed student: 0 when the two models agree exactly,
    larger the more the student's predictions drift. Both models run in eval mode (their modes
    are restored) on ``device`` (default: the student's)."""
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
    """MSE between student and teacher ``forward_features`` over ``images`` (every token and
    channel weighs the same), in fp32 and eval mode -- PRACTISE's recoverability measure and the
    finetuning objective evaluated on held-out images."""
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
    "trainable_parameter_names",
    "trainable_parameters",
]
