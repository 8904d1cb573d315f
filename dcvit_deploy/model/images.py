"""Few-shot image data: folder listing, seeded sampling, timm preprocessing, decoding, and
bundled demo photos. A folder may be flat or one subfolder per class (labels are ignored).
timm, PIL and scikit-image are imported on first use.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch.utils.data import Dataset

from dcvit_deploy.errors import DataError, EnvironmentProblem, UserInputError

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
"""File suffixes (compared lower-case) that :func:`list_images` treats as images."""

DEFAULT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
"""RandAugment policy of the DC-ViT finetuning recipe (timm notation)."""

INTERPOLATIONS: frozenset[str] = frozenset(
    {"nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"}
)
CROP_MODES: frozenset[str] = frozenset({"center", "squash", "border"})

DataConfig = dict[str, Any]
"""timm data config: ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``,
``crop_pct``, ``crop_mode``."""


def _accepted_text() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ImageList:
    """Images found under ``root``: absolute ``paths`` sorted by their path relative to ``root``."""

    root: Path
    paths: tuple[Path, ...]
    runs: tuple[Path, ...] = ()  # dcvit-deploy run directories left out

    @property
    def note(self) -> str:
        """One line naming the run directories left out (empty when none)."""
        names = ", ".join(p.relative_to(self.root).as_posix() for p in self.runs)
        return f"left out of the images under --data: dcvit-deploy run {names}" if names else ""

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Path]:
        return iter(self.paths)

    def __getitem__(self, index: int) -> Path:
        return self.paths[index]


def list_images(root: str | os.PathLike[str]) -> ImageList:
    """Every image under ``root`` (by suffix), recursively, sorted by relative path. Hidden
    names, symlinked folders and dcvit-deploy run directories (known by their manifest: a run in
    its own image folder never learns from its plots) are left out. :class:`DataError` when
    ``root`` is missing, not a folder, or holds no image."""
    base = Path(root).expanduser()
    if not base.exists():
        raise DataError(
            f"image folder {base} does not exist",
            "pass an existing folder of images (flat, or one subfolder per class)",
        )
    if not base.is_dir():
        raise DataError(
            f"{base} is a file, not a folder of images",
            f"pass the folder that holds the images (e.g. {base.parent})",
        )
    base = base.resolve()
    found: list[tuple[str, Path]] = []
    runs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        folder = Path(dirpath)
        if "manifest.json" in filenames and _is_run(folder / "manifest.json"):
            runs.append(folder)
            dirnames[:] = []
            continue
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = folder / name
            if path.is_file():
                found.append((path.relative_to(base).as_posix(), path))
    if not found:
        raise DataError(
            f"no images found under {base} (accepted extensions: {_accepted_text()})",
            "add image files to the folder or point to the folder that holds them",
        )
    found.sort(key=lambda item: item[0])
    return ImageList(root=base, paths=tuple(p for _, p in found), runs=tuple(sorted(runs)))


def _is_run(manifest: Path) -> bool:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"schema", "identity", "units"} <= data.keys()


# --------------------------------------------------------------------------- sampling


def sampling_note(available: int, num_samples: int | None) -> str | None:
    """The warning text :func:`sample_images` issues for these counts, or ``None`` if none."""
    if num_samples is not None and num_samples > available:
        return (
            f"asked for {num_samples} few-shot images but only {available} were found; "
            f"using all {available}"
        )
    return None


def sample_images(
    paths: ImageList | Sequence[Path], num_samples: int | None, seed: int
) -> list[Path]:
    """A seeded subset of ``num_samples`` paths (``None``: all), in input order; depends only
    on ``len(paths)``, ``num_samples`` and ``seed``. Asking for more than exist uses all of them
    (:func:`sampling_note` says so once, as a run note)."""
    items = list(paths)
    if not items:
        raise DataError("there are no images to sample from", "point to a folder with images")
    if num_samples is None:
        return items
    if not _positive_int(num_samples):
        raise UserInputError(
            f"number of few-shot samples must be a positive integer, got {num_samples!r}",
            "pass e.g. --num-samples 500, or omit it to use every image",
        )
    if sampling_note(len(items), num_samples) is not None:
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), num_samples))
    return [items[i] for i in chosen]


# --------------------------------------------------------------------------- preprocessing


_EXAMPLES = {"mean": "0.485 0.456 0.406", "std": "0.229 0.224 0.225"}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_floats(name: str, values: tuple[float, ...], allow_zero: bool) -> None:
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            problem = "finite numbers"
        elif v < 0 or (v == 0 and not allow_zero):
            problem = ">= 0" if allow_zero else "> 0"
        else:
            continue
        raise UserInputError(
            f"{name} values must be {problem}, got {values}", f"pass e.g. {name} {_EXAMPLES[name]}"
        )


@dataclass(frozen=True)
class DataOverrides:
    """Overrides of the model's preprocessing, as timm's scripts allow (``None`` = keep):
    ``img_size`` (H = W) or ``input_size`` (C, H, W); ``mean``/``std`` one value or one per
    channel. Invalid values raise :class:`UserInputError` on construction."""

    img_size: int | None = None
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None

    def __post_init__(self) -> None:
        if self.img_size is not None and self.input_size is not None:
            raise UserInputError("img_size and input_size were both given", "pass only one of them")
        if self.img_size is not None and not _positive_int(self.img_size):
            raise UserInputError(
                f"img_size must be a positive integer, got {self.img_size!r}", "pass e.g. 224"
            )
        if self.input_size is not None:
            size = tuple(self.input_size)
            if len(size) != 3 or not all(_positive_int(s) for s in size):
                raise UserInputError(
                    f"input_size must be three positive integers (C, H, W), "
                    f"got {self.input_size!r}",
                    "pass e.g. 3 224 224",
                )
            object.__setattr__(self, "input_size", size)
        for name, allow_zero in (("mean", True), ("std", False)):
            values = getattr(self, name)
            if values is None:
                continue
            values = tuple(values)
            if not values:
                raise UserInputError(f"{name} is empty", "pass one value or one per channel")
            _check_floats(name, values, allow_zero)
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise UserInputError(
                f"unknown interpolation {self.interpolation!r}",
                f"use one of {', '.join(sorted(INTERPOLATIONS))}",
            )
        if self.crop_pct is not None and (
            isinstance(self.crop_pct, bool)
            or not isinstance(self.crop_pct, (int, float))
            or not 0 < self.crop_pct <= 1
        ):
            raise UserInputError(
                f"crop_pct must be in (0, 1], got {self.crop_pct!r}", "pass e.g. 0.875 or 1.0"
            )
        if self.crop_mode is not None and self.crop_mode not in CROP_MODES:
            raise UserInputError(
                f"unknown crop_mode {self.crop_mode!r}",
                f"use one of {', '.join(sorted(CROP_MODES))}",
            )


def _per_channel(name: str, values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise UserInputError(
            f"{name} has {len(values)} values but the input has {channels} channels",
            f"pass one value or {channels}",
        )
    return values


def _fixed_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) the patch embedding enforces, if any: timm keeps the architecture's default
    ``input_size`` in ``pretrained_cfg`` even for a model built with another ``img_size``."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    proj = getattr(embed, "proj", None)
    if not getattr(embed, "strict_img_size", False) or size is None:
        return None
    channels = getattr(proj, "in_channels", None)
    if not isinstance(channels, int) or len(tuple(size)) != 2:
        return None
    height, width = (int(v) for v in size)
    return channels, height, width


def resolve_data_config(model: nn.Module, overrides: DataOverrides | None = None) -> DataConfig:
    """The model's own preprocessing (``timm.data.resolve_data_config``; the patch embedding's
    enforced size wins over ``pretrained_cfg``) with ``overrides``; mean/std one per channel."""
    import timm.data

    base = timm.data.resolve_data_config({}, model=model)
    ov = overrides or DataOverrides()
    channels, height, width = (int(v) for v in base["input_size"])
    fixed = _fixed_input_size(model)
    if fixed is not None:
        channels, height, width = fixed
    if ov.input_size is not None:
        channels, height, width = ov.input_size
    elif ov.img_size is not None:
        height = width = ov.img_size
    mean = tuple(float(v) for v in (ov.mean if ov.mean is not None else base["mean"]))
    std = tuple(float(v) for v in (ov.std if ov.std is not None else base["std"]))
    return {
        "input_size": (channels, height, width),
        "interpolation": ov.interpolation or str(base["interpolation"]),
        "mean": _per_channel("mean", mean, channels),
        "std": _per_channel("std", std, channels),
        "crop_pct": float(ov.crop_pct if ov.crop_pct is not None else base["crop_pct"]),
        "crop_mode": ov.crop_mode or str(base.get("crop_mode", "center")),
    }


def build_transforms(
    data_config: DataConfig, train: bool, auto_augment: str | None = DEFAULT_AUTO_AUGMENT
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's transform for ``data_config`` (PIL RGB -> normalised ``[C, H, W]``): with
    ``train``, random resized crop, flip and RandAugment ``auto_augment`` (``None``: off); else
    the deterministic eval transform (``crop_pct``, ``crop_mode``)."""
    import timm.data

    cfg = data_config
    common: dict[str, Any] = {k: tuple(cfg[k]) for k in ("input_size", "mean", "std")}
    common["interpolation"] = cfg["interpolation"]
    if train:
        return timm.data.create_transform(is_training=True, auto_augment=auto_augment, **common)
    return timm.data.create_transform(
        crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode"), **common
    )


# --------------------------------------------------------------------------- decoding


SIXTEEN_BIT_MODES: frozenset[str] = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
"""PIL modes of 16-bit single-channel images (16-bit grayscale PNG and TIFF)."""


def _to_rgb(img: Image.Image) -> Image.Image | str:
    """``img`` as 8-bit RGB, or a one-line reason it cannot be converted faithfully. PIL's
    ``convert("RGB")`` *clips* 16/32-bit pixels, so those are scaled: 16-bit by 255/65535, mode
    ``I`` as 8-bit when it fits 0..255, else as 16-bit; mode ``F`` has no range and is refused."""
    from PIL import Image

    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        import numpy as np

        arr = np.asarray(img).astype(np.int64)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            return (
                f"{mode} image with values {lo}..{hi} outside the 16-bit range; "
                "convert it to 8-bit first"
            )
        scale = 1.0 if mode == "I" and hi <= 255 else 255.0 / 65535.0
        eight = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if mode == "F":
        return "32-bit floating-point image (PIL mode F) has no defined range; convert it to 8-bit"
    return img.convert("RGB")


def _decode(path: Path | io.BytesIO) -> Image.Image | str:
    """The fully decoded 8-bit RGB image, or a one-line reason it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decodes every pixel, so truncation shows here
            return _to_rgb(img)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        reason = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def skipped_summary(skipped: Sequence[tuple[Path, str]], total: int, limit: int = 3) -> str:
    """One line (empty when none): how many images were skipped, ``limit`` of them by name
    with their reasons."""
    if not skipped:
        return ""
    shown = "; ".join(f"{Path(p).name}: {reason}" for p, reason in skipped[:limit])
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"{len(skipped)} of {total} images could not be used and were skipped ({shown}{more})"


@dataclass(frozen=True)
class HoldoutSplit:
    """Held-out candidates in seeded order (the caller uses the first ``holdout`` that decode)
    and a note when fewer than ``holdout`` were left outside the few-shot set."""

    paths: tuple[Path, ...]
    note: str = ""


def split_holdout(
    all_paths: Sequence[Path], train: Sequence[Path], holdout: int, seed: int
) -> HoldoutSplit:
    """Images not in ``train`` in a ``Random(seed + 1)`` order (kept so resumed runs keep
    their held-out set); ``train`` itself when none is left over (the note says so)."""
    if not _positive_int(holdout):
        raise UserInputError(
            f"--holdout must be a positive integer, got {holdout!r}", "pass e.g. --holdout 32"
        )
    chosen = set(train)
    rest = [p for p in all_paths if p not in chosen]
    random.Random(seed + 1).shuffle(rest)
    note = holdout_note(len(rest) + len(chosen), len(chosen), holdout)
    return HoldoutSplit(paths=tuple(rest or train), note=note)


def holdout_note(available: int, num_samples: int | None, holdout: int) -> str:
    """The note :func:`split_holdout` will give for these counts, without listing any file."""
    train = available if num_samples is None else min(num_samples, available)
    rest = available - train
    if rest <= 0:
        return (
            "no images left over for a held-out set: fidelity and verification use "
            "training images (add images or lower --num-samples)"
        )
    if rest < holdout:
        return (
            f"--holdout {holdout} asked for more held-out images than the {rest} left "
            f"after the {train} few-shot samples; using {rest}"
        )
    return ""


class FewShotImages(Dataset[Any]):
    """Map-style dataset of the decodable images (``dataset[i]`` is ``transform(rgb)``, no
    label). Each file is decoded once on construction; failures go to ``skipped`` as
    ``(path, reason)``; :class:`DataError` when none decodes."""

    def __init__(
        self,
        paths: Iterable[str | os.PathLike[str]],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.transform = transform
        self.skipped: list[tuple[Path, str]] = []
        good: list[Path] = []
        given = [Path(p) for p in paths]
        for path in given:
            result = _decode(path)
            if isinstance(result, str):
                self.skipped.append((path, result))
            else:
                good.append(path)
        if not good:
            detail = f"; first: {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else ""
            raise DataError(
                f"none of the {len(given)} images could be decoded{detail}",
                "check that the files are valid images (re-export or re-download them)",
            )
        self.paths: tuple[Path, ...] = tuple(good)
        self._blobs: list[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a worker on another machine), the dataset carries its files' bytes."""
        return {**self.__dict__, "_blobs": self._blobs or [p.read_bytes() for p in self.paths]}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        blob = self._blobs[index] if self._blobs else None
        img = _decode(io.BytesIO(blob) if blob is not None else self.paths[index])
        if isinstance(img, str):  # the file changed after construction
            raise DataError(
                f"{self.paths[index]} can no longer be decoded ({img})",
                "do not modify the image folder while a run is using it",
            )
        return self.transform(img) if self.transform is not None else img


def load_eval_tensor(
    paths: Iterable[str | os.PathLike[str]],
    data_config: DataConfig,
    max_images: int | None = None,
) -> torch.Tensor:
    """The first ``max_images`` decodable images (all if ``None``), in order, through the eval
    transform, as one float ``[N, C, H, W]`` batch."""
    import torch

    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    transform = build_transforms(data_config, train=False)
    tensors: list[torch.Tensor] = []
    tried = 0
    for p in paths:
        if max_images is not None and len(tensors) >= max_images:
            break
        tried += 1
        img = _decode(Path(p))
        if not isinstance(img, str):
            tensors.append(transform(img))
    if not tensors:
        raise DataError(
            f"none of the {tried} images could be decoded",
            "check that the files are valid images (re-export or re-download them)",
        )
    return torch.stack(tensors)


# --------------------------------------------------------------------------- fingerprint


def input_fingerprint(paths: ImageList | Iterable[str | os.PathLike[str]]) -> str:
    """sha256 of the image set: sorted paths relative to the listing's root (or the common
    parent), sizes and contents; independent of where the folder lives and of the order."""
    if isinstance(paths, ImageList):
        root, items = paths.root, list(paths.paths)
    else:
        items = [Path(p).resolve() for p in paths]
        if not items:
            raise DataError("there are no images to fingerprint", "point to a folder with images")
        root = Path(os.path.commonpath([p.parent for p in items]))
    digest = hashlib.sha256()
    for rel, path in sorted((p.relative_to(root).as_posix(), p) for p in items):
        content = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                content.update(block)
                size += len(block)
        digest.update(f"{rel}\0{size}\0{content.hexdigest()}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- demo images

DEMO_PHOTOS: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry",
    "hubble_deep_field", "coins", "moon", "clock", "brick", "grass", "gravel", "text",
)  # fmt: skip
"""Photos bundled inside scikit-image (no download) used by :func:`write_demo_images`."""


def _bundled_photos() -> list[tuple[str, Any]]:
    """(name, uint8 [H, W, 3] pixels) of the bundled photos this scikit-image provides."""
    try:
        from skimage import data as skdata
    except ImportError as exc:
        raise EnvironmentProblem(
            "scikit-image is not installed; the demo images come from its bundled photos",
            "pip install dcvit-deploy[demo]",
        ) from exc
    import numpy as np

    photos: list[tuple[str, Any]] = []
    for name in DEMO_PHOTOS:
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        try:
            arr = np.asarray(loader())
        except Exception:  # a photo this scikit-image version would have to download
            continue
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            continue
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        photos.append((name, np.ascontiguousarray(arr[:, :, :3])))
    if not photos:
        raise EnvironmentProblem(
            "this scikit-image installation provides none of the bundled demo photos",
            "pip install --upgrade dcvit-deploy[demo]",
        )
    return photos


def write_demo_images(
    out_dir: str | os.PathLike[str], count: int = 32, seed: int = 0
) -> list[Path]:
    """Write ``count`` JPEGs into ``out_dir`` (sorted paths): the bundled photos, then seeded
    crops (40-100 % of each side), half mirrored; same ``count`` and ``seed``, same files."""
    if not _positive_int(count):
        raise UserInputError(
            f"demo image count must be a positive integer, got {count!r}", "pass e.g. 32"
        )
    from PIL import Image

    from dcvit_deploy.store.atomic import atomic_write_with

    photos, rng = _bundled_photos(), random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i in range(count):
        name, arr = photos[i % len(photos)]
        if i >= len(photos):
            h, w = arr.shape[:2]
            ch, cw = (
                max(16, int(h * rng.uniform(0.4, 1.0))),
                max(16, int(w * rng.uniform(0.4, 1.0))),
            )
            top, left = rng.randint(0, max(0, h - ch)), rng.randint(0, max(0, w - cw))
            arr = arr[top : top + ch, left : left + cw]
            if rng.random() < 0.5:
                arr = arr[:, ::-1]
        img = Image.fromarray(arr.copy())
        path = out / f"demo_{i:04d}_{name}.jpg"
        # the default binds this iteration's image; cast: mypy cannot infer such a lambda
        atomic_write_with(
            path, cast(Any, lambda tmp, im=img: im.save(tmp, format="JPEG", quality=90))
        )
        written.append(path)
    return sorted(written)
