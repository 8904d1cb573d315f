"""Step 2 of DC-ViT: the metric set, images on which compressed students are scored.

By default synthetic: images inverted from the teacher (DeepInversion without the BatchNorm
term, which a ViT lacks): from Gaussian noise, optimised so the teacher classifies each as its
target class, under a TV prior and a small L2 penalty, with a random roll and flip each step.
:func:`real_metric_set` wraps held-out real images instead; :func:`load_or_synthesize` caches a
synthetic set keyed by everything that determines it. Only used to score blocks, never to train.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dcvit_deploy.compress.finetune import _autocast, _resolve_device
from dcvit_deploy.store.atomic import atomic_write_with, fingerprint
from dcvit_deploy.store.records import to_dict

CACHE_FORMAT = 1
"""Version of the cached metric-set file layout; part of the cache key."""

PAPER_RESOLUTION = 224
PAPER_JITTER = 30
"""The paper rolls images by up to 30 px at 224x224; other sizes scale this proportionally."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class InversionSettings:
    """How a synthetic metric set is inverted (frozen; defaults are the reference code's).

    Adam with linear lr warm-up then cosine to 0; each step rolls the batch by up to ``jitter``
    px per axis (``None``: ``round(30 * H / 224)``) and mirrors it if ``flip`` (p = 1/2). Loss:
    ``CE + tv_weight * tv_prior(x, tv_beta) + l2_weight * mean_i ||x_i||_2``; pixels clipped to
    the valid range after each step. ``keep_best``: return the lowest-loss iterate. ``amp``:
    ``auto`` = bf16 autocast of the teacher on CUDA only (images and loss stay fp32).
    """

    num_images: int = 50
    iterations: int = 2000
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_iterations: int = 100
    jitter: int | None = None
    flip: bool = True
    tv_weight: float = 1e-4
    tv_beta: float = 0.6
    l2_weight: float = 1e-5
    keep_best: bool = True
    amp: Literal["auto", "off", "bf16"] = "auto"

    def __post_init__(self) -> None:
        _check(self.num_images >= 1, "num_images must be >= 1")
        _check(self.iterations >= 1, "iterations must be >= 1")
        _check(self.lr > 0, "lr must be > 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "bad betas")
        _check(
            0 <= self.warmup_iterations <= self.iterations,
            "warmup_iterations must be in [0, iterations]",
        )
        _check(self.jitter is None or self.jitter >= 0, "jitter must be >= 0 or None")
        _check(self.tv_weight >= 0 and self.l2_weight >= 0, "prior weights must be >= 0")
        _check(self.tv_beta > 0, "tv_beta must be > 0")
        _check(self.amp in ("auto", "off", "bf16"), f"unknown amp mode {self.amp!r}")

    @classmethod
    def paper(cls) -> InversionSettings:
        """The paper's settings: 50 images, 2000 Adam steps (lr 0.25, betas 0.5/0.9, 100-step
        warm-up, cosine), roll +-30 px at 224 and flip, TV weight 1e-4 with beta 0.6, L2 1e-5."""
        return cls()

    @classmethod
    def fast(cls, *, iterations: int = 200, num_images: int = 50) -> InversionSettings:
        """A CPU-friendly set: the paper's loss and optimiser with 10x fewer steps (warm-up
        scaled with them). Images are less refined, which matters less for ranking blocks than
        for looking at them."""
        return cls(
            num_images=num_images,
            iterations=iterations,
            warmup_iterations=max(1, iterations // 20),
        )

    def jitter_for(self, height: int) -> int:
        """Roll range in pixels for images of ``height`` pixels."""
        if self.jitter is not None:
            return self.jitter
        return max(1, round(PAPER_JITTER * height / PAPER_RESOLUTION))

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: linear warm-up, then cosine to 0."""
        warm = self.warmup_iterations
        if step < warm:
            return self.lr * (step + 1) / warm
        span = max(1, self.iterations - warm)
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * (step - warm) / span))


@dataclass(frozen=True, eq=False)
class MetricSet:
    """Images to score students on (``[N,3,H,W]`` float32 on the CPU, normalised), the class
    each synthetic image was inverted towards (``None`` for real ones), and the teacher's mean CE
    and top-1 on those targets (NaN for real images)."""

    images: torch.Tensor
    targets: torch.Tensor | None
    final_ce: float
    teacher_top1_on_targets: float
    source: Literal["synthetic", "real"] = "synthetic"
    cache_key: str = ""
    from_cache: bool = False

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class InversionProgress:
    """A progress report of :func:`synthesize_metric_set`; times in seconds."""

    step: int
    total: int
    loss: float
    ce: float
    lr: float
    elapsed: float
    eta: float


def real_metric_set(images: torch.Tensor) -> MetricSet:
    """Wrap held-out real images (already transformed and normalised, ``[N,3,H,W]``) as a
    metric set. The tensor is copied to float32 on the CPU."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images [N,3,H,W], got {shape}")
    _check(images.shape[0] >= 1, "the metric set needs at least one image")
    return MetricSet(
        images=images.detach().to("cpu", torch.float32).clone(),
        targets=None,
        final_ce=math.nan,
        teacher_top1_on_targets=math.nan,
        source="real",
    )


# --------------------------------------------------------------------------- inversion


def valid_range(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(low, high)`` of normalised pixels whose raw value lies in [0, 1], shaped
    ``[1,3,1,1]``."""
    _check(len(mean) == 3 and len(std) == 3, "mean and std need 3 channels")
    _check(all(s > 0 for s in std), "std must be > 0")
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (0.0 - m) / s, (1.0 - m) / s


def choose_targets(num_images: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Target classes: ``num_images`` distinct random classes (sorted), or, when the model has
    fewer classes than that, every class cycled in order so each appears equally often (+-1)."""
    _check(num_classes >= 1, "the model has no classes")
    if num_images <= num_classes:
        chosen = torch.randperm(num_classes, generator=generator)[:num_images]
        return chosen.sort().values
    return torch.arange(num_images) % num_classes


def tv_prior(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Total-variation prior: the sum over the 4 neighbour directions (right, down, and both
    diagonals) of the L2 norm, over the whole batch, of the neighbour differences, each norm
    raised to ``beta``. A tiny constant inside the root keeps the gradient finite on flat
    images when ``beta < 1``."""
    diffs = (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )
    return sum(
        ((d.pow(2).sum() + 1e-20) ** (beta / 2) for d in diffs), torch.zeros((), device=x.device)
    )


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients (only the images are optimised); restored after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_input_size(input_size: Sequence[int]) -> tuple[int, int, int]:
    _check(
        len(input_size) == 3 and input_size[0] == 3 and all(int(v) >= 1 for v in input_size),
        f"input_size must be (3, H, W), not {tuple(input_size)}",
    )
    return int(input_size[0]), int(input_size[1]), int(input_size[2])


@torch.no_grad()
def _teacher_stats(
    teacher: nn.Module, images: torch.Tensor, targets: torch.Tensor
) -> tuple[float, float]:
    logits = teacher(images).float()
    ce = float(F.cross_entropy(logits, targets))
    top1 = float((logits.argmax(dim=-1) == targets).float().mean())
    return ce, top1


def synthesize_metric_set(
    teacher: nn.Module,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    settings: InversionSettings | None = None,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Callable[[InversionProgress], None] | None = None,
) -> MetricSet:
    """Invert ``teacher`` into ``settings.num_images`` images of ``input_size`` (3, H, W), one
    batch (the TV prior spans it, as in the reference code), normalised with ``mean``/``std`` and
    in the valid range. The teacher runs frozen in eval mode (restored after). All randomness
    comes from one CPU generator seeded with ``seed`` (the global RNG is untouched);
    ``progress`` about 20 times."""
    settings = settings or InversionSettings()
    _, height, width = _check_input_size(input_size)
    dev = _resolve_device(teacher, device)
    teacher.to(dev)
    low, high = (t.to(dev) for t in valid_range(mean, std))
    jitter = settings.jitter_for(height)
    total = settings.iterations
    every = max(1, total // 20)
    use_bf16 = settings.amp == "bf16" or (settings.amp == "auto" and dev.type == "cuda")
    gen = torch.Generator().manual_seed(seed)
    n = settings.num_images

    with _frozen_eval(teacher):
        with torch.no_grad():
            probe = teacher(torch.zeros(1, 3, height, width, device=dev))
        num_classes = int(probe.shape[-1])
        targets = choose_targets(n, num_classes, gen).to(dev)
        # The noise is drawn on the CPU so a seed gives the same start on every device. It is
        # clipped like every later iterate (the reference clips only after steps), so every
        # image this function can return lies in the valid range.
        x = torch.randn(n, 3, height, width, generator=gen).to(dev)
        x = torch.maximum(torch.minimum(x, high), low).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=settings.lr_at(0), betas=settings.betas, eps=1e-8)
        best = x.detach().clone()
        best_loss = math.inf
        start = time.perf_counter()
        for step in range(total):
            lr = settings.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # One roll offset and flip per step for the whole batch; the roll wraps around, so no
            # pixel leaves the image.
            dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
            flip = settings.flip and bool(torch.rand((), generator=gen) < 0.5)
            view = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            if flip:
                view = torch.flip(view, dims=(3,))
            with _autocast(torch.bfloat16 if use_bf16 else None, dev):
                logits = teacher(view)
            ce = F.cross_entropy(logits.float(), targets)
            loss = ce
            if settings.tv_weight:
                loss = loss + settings.tv_weight * tv_prior(view, settings.tv_beta)
            if settings.l2_weight:
                loss = loss + settings.l2_weight * view.flatten(1).norm(dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.keep_best:
                # The loss was measured on the current (pre-update) images; keep those.
                value = float(loss.detach())
                if value < best_loss:
                    best_loss = value
                    best.copy_(x.detach())
            optimizer.step()
            with torch.no_grad():
                x.clamp_(low, high)
            done = step + 1
            if progress is not None and (done % every == 0 or done == total):
                elapsed = time.perf_counter() - start
                progress(
                    InversionProgress(
                        step=done,
                        total=total,
                        loss=float(loss.detach()),
                        ce=float(ce.detach()),
                        lr=lr,
                        elapsed=elapsed,
                        eta=elapsed / done * (total - done),
                    )
                )
        final = best if settings.keep_best else x.detach()
        final_ce, top1 = _teacher_stats(teacher, final, targets)

    return MetricSet(
        images=final.to("cpu", torch.float32).contiguous(),
        targets=targets.to("cpu"),
        final_ce=final_ce,
        teacher_top1_on_targets=top1,
        source="synthetic",
    )


# --------------------------------------------------------------------------- disk cache


def metric_set_key(
    teacher_fingerprint: str,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    settings: InversionSettings,
    seed: int,
) -> str:
    """Cache key of a synthetic metric set: a fingerprint of everything that determines it."""
    return fingerprint(
        {
            "format": CACHE_FORMAT,
            "teacher": teacher_fingerprint,
            "input_size": [int(v) for v in input_size],
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "settings": to_dict(settings),
            "seed": int(seed),
        }
    )


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"metric_set-{key}.safetensors"


def save_metric_set(path: str | Path, metric_set: MetricSet, meta: dict[str, Any]) -> None:
    """Write a synthetic set atomically as safetensors (images, targets) with JSON metadata."""
    from safetensors.torch import save_file

    _check(metric_set.targets is not None, "only synthetic sets (with targets) are cached")
    tensors = {
        "images": metric_set.images.contiguous(),
        "targets": metric_set.targets.contiguous(),  # type: ignore[union-attr]
    }
    info = {
        "format": CACHE_FORMAT,
        "final_ce": metric_set.final_ce,
        "teacher_top1_on_targets": metric_set.teacher_top1_on_targets,
        **meta,
    }
    metadata = {"dcvit_metric_set": json.dumps(info, sort_keys=True)}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_metric_set(path: str | Path) -> MetricSet:
    """Read a set written by :func:`save_metric_set`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("dcvit_metric_set")
    if raw is None:
        raise ValueError(f"{path} is not a cached metric set")
    info = json.loads(raw)
    if info.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} has cache format {info.get('format')}, expected {CACHE_FORMAT}")
    tensors = load_file(str(path))
    return MetricSet(
        images=tensors["images"],
        targets=tensors["targets"],
        final_ce=float(info["final_ce"]),
        teacher_top1_on_targets=float(info["teacher_top1_on_targets"]),
        source="synthetic",
        cache_key=str(info.get("key", "")),
        from_cache=True,
    )


def load_or_synthesize(
    cache_dir: str | Path,
    teacher_fingerprint: str,
    teacher: nn.Module,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    settings: InversionSettings | None = None,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Callable[[InversionProgress], None] | None = None,
) -> MetricSet:
    """The synthetic metric set from ``cache_dir``, else synthesised and cached (atomically;
    an unreadable cache file is recomputed). ``teacher_fingerprint`` must identify the teacher's
    weights: the cache trusts it and never hashes the model."""
    settings = settings or InversionSettings()
    key = metric_set_key(teacher_fingerprint, input_size, mean, std, settings, seed)
    path = cache_path(cache_dir, key)
    if path.is_file():
        try:
            return load_metric_set(path)
        except Exception:  # a corrupt or foreign cache file is recomputed, never fatal
            pass
    fresh = synthesize_metric_set(
        teacher, input_size, mean, std, settings, seed=seed, device=device, progress=progress
    )
    meta = {
        "key": key,
        "teacher": teacher_fingerprint,
        "seed": int(seed),
        "input_size": [int(v) for v in input_size],
        "settings": to_dict(settings),
    }
    save_metric_set(path, fresh, meta)
    return dataclasses.replace(fresh, cache_key=key)


__all__ = [
    "CACHE_FORMAT",
    "InversionProgress",
    "InversionSettings",
    "MetricSet",
    "cache_path",
    "choose_targets",
    "load_metric_set",
    "load_or_synthesize",
    "metric_set_key",
    "real_metric_set",
    "save_metric_set",
    "synthesize_metric_set",
    "tv_prior",
    "valid_range",
]
