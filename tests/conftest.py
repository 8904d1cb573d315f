"""Shared fixtures: tiny timm ViTs and real bundled photos; no download anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_VIT_KWARGS = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 2,
    "num_classes": 10,
}


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def tiny_vit():
    """A random-init 4-block ViT (32x32 input, 16 patches + cls token), eval mode, seeded."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT_KWARGS)
    return model.eval()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real photos bundled with scikit-image (flat + one class subfolder)."""
    from PIL import Image
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("photos")
    names = [
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
    ]
    (root / "sub").mkdir()
    for i, name in enumerate(names):
        arr = getattr(skdata, name)()
        target = root / "sub" if i % 2 else root
        Image.fromarray(arr).save(target / f"{name}.png")
    return root
