"""Fashion-MNIST utilities for the compression-quality benchmark.

Everything here runs offline on a few CPU cores:

* :func:`load_fmnist` reads the idx ``.gz`` files shipped by the Debian package
  ``dataset-fashion-mnist`` (or the folder named by ``DCVIT_FMNIST_DIR``).
* :func:`build_teacher` creates a 12-block timm ViT sized for 32x32 inputs whose
  ``pretrained_cfg`` carries Fashion-MNIST preprocessing, so ``timm.data.resolve_data_config``
  -- and therefore the project's generic folder-based data path -- reproduces the benchmark's
  preprocessing exactly.
* :func:`train_teacher` trains it once and caches weights (safetensors) and a JSON record under
  ``benchmarks/.cache/``; later calls with the same configuration load the cache.
* :func:`evaluate`, :func:`predict_logits` and :func:`agreement` score models on the 10k test set.
* :func:`write_fewshot_folder` writes unlabeled training images as PNG files so the benchmark
  feeds the compressor through the same folder path a user would.

Geometry choice: the 28x28 images are zero-padded by 2 pixels per side to 32x32 (not resized).
Padding keeps every pixel value exact, so a 32x32 PNG written by :func:`write_fewshot_folder` and
decoded by the generic eval transform (resize to 32 is a no-op at ``crop_pct=1.0``, centre crop
32) gives bit-identical model inputs to :func:`to_model_input`. The grey channel is replicated to
3 channels.

Patch size: 8 (a 4x4 grid of patches plus the class token, 17 tokens), not 4 (65 tokens). A
training step (batch 256, 2 cores) costs ~0.4 s instead of ~1.5 s, and measured one-epoch runs
reached 81 % test top-1 with patch 8 (lr 1e-3, no augmentation) against 59 % with patch 4
(lr 2e-3, shift/flip augmentation), so a teacher good enough to benchmark against trains in
minutes. For DC-ViT the token count matters little: the attention projections and the MLP both
scale linearly with it, so their MAC ratio -- what the compression plan works from -- is the
same.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from dcvit_deploy.store.atomic import atomic_write_json, atomic_write_with, fingerprint
from torch import nn

from dcvit_deploy.errors import EnvironmentProblem, UserInputError

if TYPE_CHECKING:
    from PIL import Image

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the idx files."""

FMNIST_DIR_ENV = "DCVIT_FMNIST_DIR"
"""Environment variable that, when set, replaces :data:`FMNIST_DIR`."""

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
"""Default cache for trained teachers (gitignored)."""

Split = Literal["train", "test"]

_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

RAW_SIZE = 28
IMG_SIZE = 32
PAD = (IMG_SIZE - RAW_SIZE) // 2
NUM_CLASSES = 10
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# Pixel statistics of the 60k training images (28x28, values in [0, 1]), replicated per channel.
FMNIST_MEAN: tuple[float, float, float] = (0.2860, 0.2860, 0.2860)
FMNIST_STD: tuple[float, float, float] = (0.3530, 0.3530, 0.3530)

TEACHER_ARCH = "vit_tiny_patch16_224"
TEACHER_KWARGS: dict[str, Any] = {
    "img_size": IMG_SIZE,
    "patch_size": 8,  # 4x4 grid of 8x8 patches + cls token; see module docstring
    "in_chans": 3,
    "embed_dim": 96,
    "depth": 12,
    "num_heads": 3,
    "num_classes": NUM_CLASSES,
}
"""The first benchmark teacher ("redundant"): 17 tokens, under-trained, blocks nearly free to
drop (two whole blocks cost 0.06 point after finetuning)."""

DENSE_KWARGS: dict[str, Any] = {
    "img_size": RAW_SIZE,
    "patch_size": 4,  # 7x7 grid of 4x4 patches + cls token = 50 tokens, no padding
    "in_chans": 3,
    "embed_dim": 48,
    "depth": 12,
    "num_heads": 3,
    "num_classes": NUM_CLASSES,
    "drop_path_rate": 0.0,
}
"""The non-redundant teacher: more tokens (so attention has spatial work to do), a width matched
to the task, no stochastic depth (which trains blocks to be droppable), trained for longer."""

SMALL_KWARGS: dict[str, Any] = {**DENSE_KWARGS, "patch_size": 7}
"""As :data:`DENSE_KWARGS` with 7x7 patches (4x4 grid + cls = 17 tokens): ~3x cheaper per image,
for machines where the 50-token teacher's benchmark does not fit the time available."""

TEACHERS: dict[str, dict[str, Any]] = {
    "p8d96": TEACHER_KWARGS,
    "p4d48": DENSE_KWARGS,
    "p7d48": SMALL_KWARGS,
}
"""Named teacher architectures (all 12-block ``vit_tiny_patch16_224`` variants)."""

CACHE_SCHEMA = 1
"""Layout version of the cached teacher JSON record."""


# --------------------------------------------------------------------------- data


def fmnist_dir() -> Path:
    """The dataset folder: ``$DCVIT_FMNIST_DIR`` when set and non-empty, else :data:`FMNIST_DIR`."""
    override = os.environ.get(FMNIST_DIR_ENV, "").strip()
    return Path(override) if override else FMNIST_DIR


def _read_idx(path: Path, magic: int) -> tuple[np.ndarray, tuple[int, ...]]:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise UserInputError(
            f"{path} is not an idx file with magic {magic}",
            "reinstall the dataset (apt-get install --reinstall dataset-fashion-mnist)",
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header)
    if data.size != math.prod(dims):
        raise UserInputError(
            f"{path} holds {data.size} values but its header says {dims}",
            "reinstall the dataset (apt-get install --reinstall dataset-fashion-mnist)",
        )
    return data.reshape(dims), dims


def load_fmnist(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Load one split: ``(images uint8 [N, 28, 28], labels int64 [N])``.

    ``split`` is ``"train"`` (60 000 images) or ``"test"`` (10 000). Raises
    :class:`EnvironmentProblem` when the files are missing, :class:`UserInputError` when they
    are malformed. The arrays are freshly read and writable.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = fmnist_dir()
    img_name, lbl_name = _FILES[split]
    missing = [n for n in (img_name, lbl_name) if not (root / n).is_file()]
    if missing:
        raise EnvironmentProblem(
            f"Fashion-MNIST file {missing[0]} not found in {root}",
            f"apt-get install dataset-fashion-mnist, or set {FMNIST_DIR_ENV} to a folder "
            "holding the four idx .gz files",
        )
    images, _ = _read_idx(root / img_name, _IDX_IMAGES_MAGIC)
    labels, _ = _read_idx(root / lbl_name, _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (RAW_SIZE, RAW_SIZE):
        raise UserInputError(
            f"Fashion-MNIST {split} split has images {images.shape} and labels {labels.shape}",
            "reinstall the dataset (apt-get install --reinstall dataset-fashion-mnist)",
        )
    return images, labels.astype(np.int64)


def pad_to_model_size(images: np.ndarray) -> np.ndarray:
    """Zero-pad uint8 ``[N, 28, 28]`` images to ``[N, 32, 32]`` (2 pixels per side)."""
    if images.ndim != 3 or images.shape[1:] != (RAW_SIZE, RAW_SIZE):
        raise ValueError(f"expected uint8 [N, 28, 28] images, got {images.shape}")
    return np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))


def data_config_of(model: nn.Module) -> dict[str, Any]:
    """The model's timm data config (what the generic data path will use)."""
    import timm.data

    return dict(timm.data.resolve_data_config({}, model=model))


def to_model_input(images: np.ndarray | torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` or ``[N, 32, 32]`` images -> normalised float ``[N, 3, 32, 32]``.

    Equals, bit for bit, what timm's eval transform produces from the 32x32 RGB PNG files written
    by :func:`write_fewshot_folder` under this module's data config (``crop_pct=1.0``).
    """
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.ndim != 3:
        raise ValueError(f"expected uint8 [N, H, W] images, got {x.dtype} {tuple(x.shape)}")
    expected = tuple(data_config["input_size"])
    if x.shape[1:] == (RAW_SIZE, RAW_SIZE) and expected[1:] == (IMG_SIZE, IMG_SIZE):
        x = F.pad(x, (PAD, PAD, PAD, PAD))
    if (3, *x.shape[1:]) != expected:
        raise ValueError(
            f"images of size {tuple(x.shape[1:])} do not match the data config input {expected}"
        )
    # Same arithmetic as torchvision ToTensor (divide by 255) then Normalize ((x - m) / s).
    xf = x.unsqueeze(1).expand(-1, 3, -1, -1).float().div(255.0)
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (xf - mean) / std


def write_fewshot_folder(
    out_dir: str | os.PathLike[str],
    n: int = 500,
    seed: int = 0,
    split: Split = "train",
    size: int = IMG_SIZE,
) -> list[Path]:
    """Write ``n`` unlabeled images of ``split`` as 32x32 RGB PNG files into ``out_dir``.

    The images are a seeded random subset (same ``seed`` -> same files), zero-padded to 32x32
    (``size=32``; ``size=28`` keeps them as they are) and replicated to RGB, named ``fmnist_<index>.png`` after their index in the split (the
    index lets a benchmark look labels up later; the compressor never sees them). Files are
    written atomically. Returns the paths in sorted order.
    """
    from PIL import Image

    images, _ = load_fmnist(split)
    if not 1 <= n <= len(images):
        raise UserInputError(
            f"asked for {n} few-shot images; the {split} split has {len(images)}",
            f"choose n between 1 and {len(images)}",
        )
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(images), size=n, replace=False))
    padded = pad_to_model_size(images[indices]) if size == IMG_SIZE else images[indices]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for idx, img in zip(indices, padded, strict=True):
        rgb = Image.fromarray(np.repeat(img[:, :, None], 3, axis=2))  # uint8 HxWx3 -> RGB
        path = out / f"fmnist_{int(idx):05d}.png"
        atomic_write_with(path, _png_writer(rgb))
        paths.append(path)
    return paths


def _png_writer(image: Image.Image) -> Callable[[Path], None]:
    """A writer for :func:`atomic_write_with` that saves ``image`` as PNG."""
    return lambda tmp: image.save(tmp, format="PNG")


# --------------------------------------------------------------------------- model


def build_teacher(kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A random-init 12-block ViT for Fashion-MNIST with its preprocessing attached.

    ``kwargs``: timm model arguments (default :data:`TEACHER_KWARGS`).
    ``model.pretrained_cfg`` is set so ``timm.data.resolve_data_config({}, model=model)``
    returns the model's input size, the Fashion-MNIST mean/std, bilinear interpolation,
    ``crop_pct=1.0`` and centre crop.
    """
    import timm

    kw = TEACHER_KWARGS if kwargs is None else kwargs
    model = timm.create_model(TEACHER_ARCH, pretrained=False, **kw)
    attach_fmnist_cfg(model, int(kw["img_size"]))
    return model


def attach_fmnist_cfg(model: nn.Module, size: int = IMG_SIZE) -> None:
    """Set the Fashion-MNIST preprocessing fields of ``model.pretrained_cfg`` (in place)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(
        input_size=(3, size, size),
        mean=FMNIST_MEAN,
        std=FMNIST_STD,
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="center",
        num_classes=NUM_CLASSES,
    )
    cfg.pop("test_input_size", None)
    cfg.pop("test_crop_pct", None)
    cast(Any, model).pretrained_cfg = cfg  # timm's attribute; nn.Module types it Tensor | Module


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    batch: int = 1000,
    data_config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Logits ``[N, num_classes]`` of ``model`` (switched to eval mode) on uint8 images.

    Preprocessing is :func:`to_model_input` with ``data_config`` (default: the model's own).
    The model's train/eval mode is restored afterwards.
    """
    cfg = data_config if data_config is not None else data_config_of(model)
    was_training = model.training
    model.eval()
    try:
        outs = [
            model(to_model_input(images[i : i + batch], cfg)).float()
            for i in range(0, len(images), batch)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0, NUM_CLASSES)


def evaluate(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    batch: int = 1000,
    data_config: dict[str, Any] | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on uint8 ``images`` against int ``labels``.

    Preprocessing as in :func:`predict_logits` (default: the model's own data config).
    """
    logits = predict_logits(model, images, batch, data_config)
    target = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(target) != len(logits) or len(target) == 0:
        raise ValueError(f"need as many labels as images (>0), got {len(target)} vs {len(logits)}")
    return float((logits.argmax(1) == target).float().mean())


def agreement(
    student: nn.Module,
    teacher: nn.Module,
    images: np.ndarray | torch.Tensor,
    batch: int = 1000,
    data_config: dict[str, Any] | None = None,
) -> float:
    """Fraction in [0, 1] of ``images`` on which student and teacher predict the same class.

    Both models see the same inputs: preprocessing with ``data_config``, default the
    teacher's (compression never changes preprocessing, and a student rebuilt from an
    architecture spec may not carry the teacher's ``pretrained_cfg``).
    """
    cfg = data_config if data_config is not None else data_config_of(teacher)
    s = predict_logits(student, images, batch, cfg).argmax(1)
    t = predict_logits(teacher, images, batch, cfg).argmax(1)
    if len(s) == 0:
        raise ValueError("agreement needs at least one image")
    return float((s == t).float().mean())


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Everything that determines the trained teacher (and its cache key)."""

    epochs: int = 4
    seed: int = 0
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    # Augmentation is off by default: in a few epochs of 60k images the model does not overfit,
    # and a random +-2 px shift plus flip cost ~2 epochs of progress (measured: 3 epochs with
    # it reached the accuracy of 1 epoch without it).
    shift_pixels: int = 0  # random crop from this much zero padding = random shift
    hflip: bool = False
    arch: str = "p8d96"  # a key of TEACHERS

    def __post_init__(self) -> None:
        if self.arch not in TEACHERS:
            raise ValueError(f"unknown teacher arch {self.arch!r}; choose from {sorted(TEACHERS)}")
        if self.epochs < 1 or self.batch < 1 or self.warmup_steps < 0 or self.shift_pixels < 0:
            raise ValueError(f"invalid teacher training config: {self}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.grad_clip > 0):
            raise ValueError(f"invalid teacher training config: {self}")

    @property
    def kwargs(self) -> dict[str, Any]:
        """The timm model arguments of :attr:`arch`."""
        return TEACHERS[self.arch]

    def key(self) -> str:
        """Cache key: hash of this config, the architecture and the preprocessing."""
        return fingerprint(
            {
                "train": dataclasses.asdict(self),
                "arch": TEACHER_ARCH,
                "kwargs": self.kwargs,
                "mean": FMNIST_MEAN,
                "std": FMNIST_STD,
                "cache_schema": CACHE_SCHEMA,
            }
        )


@dataclass(frozen=True)
class TeacherInfo:
    """What :func:`train_teacher` knows about the teacher it returns."""

    test_top1: float
    train_seconds: float
    eval_seconds: float
    threads: int
    config: TeacherTrainConfig
    weights_path: Path
    record_path: Path
    from_cache: bool
    torch_version: str
    timm_version: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CACHE_SCHEMA,
            "test_top1": self.test_top1,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "threads": self.threads,
            "config": dataclasses.asdict(self.config),
            "arch": TEACHER_ARCH,
            "kwargs": self.config.kwargs,
            "torch_version": self.torch_version,
            "timm_version": self.timm_version,
        }


def _random_shift_flip(
    x: torch.Tensor, shift: int, hflip: bool, gen: torch.Generator
) -> torch.Tensor:
    """Per-image random crop from a zero-padded copy (a shift of up to ``shift`` px) + h-flip."""
    n, h, w = x.shape
    if shift:
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None].expand(n, h, w)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :].expand(n, h, w)
        x = padded[torch.arange(n)[:, None, None], rows, cols]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None], x.flip(-1), x)
    return x


def _lr_at(step: int, total: int, cfg: TeacherTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _load_cached(
    weights: Path, record: Path, cfg: TeacherTrainConfig
) -> tuple[nn.Module, TeacherInfo]:
    from safetensors.torch import load_file

    data = json.loads(record.read_text(encoding="utf-8"))
    if data.get("schema") != CACHE_SCHEMA:
        raise UserInputError(
            f"cached teacher record {record} has schema {data.get('schema')}",
            f"delete {record.parent} to retrain",
        )
    model = build_teacher(cfg.kwargs)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    import timm

    info = TeacherInfo(
        test_top1=float(data["test_top1"]),
        train_seconds=float(data["train_seconds"]),
        eval_seconds=float(data["eval_seconds"]),
        threads=int(data["threads"]),
        config=cfg,
        weights_path=weights,
        record_path=record,
        from_cache=True,
        torch_version=str(data.get("torch_version", torch.__version__)),
        timm_version=str(data.get("timm_version", timm.__version__)),
    )
    return model, info


def train_teacher(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    epochs: int = 4,
    seed: int = 0,
    threads: int = 2,
    log: Callable[[str], None] | None = print,
    **overrides: Any,
) -> tuple[nn.Module, TeacherInfo]:
    """Train (or load from cache) the Fashion-MNIST teacher; returns ``(model in eval mode, info)``.

    Training: the 60k train split, AdamW with linear warm-up then cosine decay to zero, batch
    256, cross-entropy, seeded; optional light augmentation (``shift_pixels``: random crop from
    zero padding; ``hflip``), off by default (see :class:`TeacherTrainConfig`).
    ``overrides`` replace other :class:`TeacherTrainConfig` fields. The result is cached in
    ``cache_dir`` (default ``benchmarks/.cache``) as ``teacher-<key>.safetensors`` plus
    ``teacher-<key>.json`` (test top-1, timings, config, versions); a later call with the same
    configuration loads it instead of training. ``torch`` uses ``threads`` threads during the
    call and the previous setting is restored.
    """
    import timm
    from safetensors.torch import save_file

    cfg = TeacherTrainConfig(epochs=epochs, seed=seed, **overrides)
    root = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    key = cfg.key()
    weights = root / f"teacher-{key}.safetensors"
    record = root / f"teacher-{key}.json"
    if weights.is_file() and record.is_file():
        return _load_cached(weights, record, cfg)

    say = log or (lambda _msg: None)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train_x, train_y = load_fmnist("train")
        test_x, test_y = load_fmnist("test")
        torch.manual_seed(cfg.seed)
        model = build_teacher(cfg.kwargs)
        data_config = data_config_of(model)
        mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)
        size = int(cfg.kwargs["img_size"])
        xs = torch.from_numpy(pad_to_model_size(train_x) if size == IMG_SIZE else train_x)
        ys = torch.from_numpy(train_y)
        gen = torch.Generator().manual_seed(cfg.seed)
        steps_per_epoch = len(xs) // cfg.batch  # drop the ragged last batch
        total = steps_per_epoch * cfg.epochs
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
        )
        model.train()
        t0 = time.perf_counter()
        step = 0
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(xs), generator=gen)
            running = 0.0
            for i in range(steps_per_epoch):
                idx = order[i * cfg.batch : (i + 1) * cfg.batch]
                xb = _random_shift_flip(xs[idx], cfg.shift_pixels, cfg.hflip, gen)
                xb = (xb.unsqueeze(1).expand(-1, 3, -1, -1).float().div(255.0) - mean) / std
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, total, cfg)
                loss = F.cross_entropy(model(xb), ys[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                running += float(loss.detach())
                if (i + 1) % 50 == 0 or i + 1 == steps_per_epoch:
                    say(
                        f"epoch {epoch + 1}/{cfg.epochs} step {i + 1}/{steps_per_epoch} "
                        f"loss {running / ((i % 50) + 1):.4f} {time.perf_counter() - t0:.0f}s"
                    )
                    running = 0.0
            probe = evaluate(
                model, test_x[:1000], test_y[:1000], data_config=data_config
            )  # restores train mode
            say(f"epoch {epoch + 1}: top-1 on the first 1000 test images {probe:.4f}")
        train_seconds = time.perf_counter() - t0
        model.eval()
        t1 = time.perf_counter()
        top1 = evaluate(model, test_x, test_y, data_config=data_config)
        eval_seconds = time.perf_counter() - t1
        say(f"test top-1 {top1:.4f} after {train_seconds:.0f}s training")
    finally:
        torch.set_num_threads(prev_threads)

    info = TeacherInfo(
        test_top1=top1,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        threads=threads,
        config=cfg,
        weights_path=weights,
        record_path=record,
        from_cache=False,
        torch_version=torch.__version__,
        timm_version=timm.__version__,
    )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_with(weights, lambda tmp: save_file(state, str(tmp)))
    atomic_write_json(record, info.to_dict())  # written last: its presence marks a whole cache
    return model, info


if __name__ == "__main__":
    _, _info = train_teacher()
    print(json.dumps(_info.to_dict(), indent=2))
