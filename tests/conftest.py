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


FLEET_TARGETS = ("cpu-ort-1t", "cpu-ort-2t")
"""The CPU targets the shared Ray cluster's node carries (``target:<name>`` resources)."""


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """The one local Ray cluster every Ray test shares: 2 CPUs, the two CPU test targets, and
    tests/ on the workers' path, whose setup hook installs the scripted figures
    (:mod:`fakes.fleet`; inactive until a test writes the figures file)."""
    import ray
    from fakes.fleet import FIGURES_ENV

    tests = Path(__file__).parent
    os.environ[FIGURES_ENV] = str(tmp_path_factory.mktemp("figures") / "figures.json")
    path = os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        resources={f"target:{t}": 1 for t in FLEET_TARGETS},
        include_dashboard=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": path, FIGURES_ENV: os.environ[FIGURES_ENV]},
            "worker_process_setup_hook": "fakes.fleet.install_scripted_figures",
        },
    )
    yield ray
    ray.shutdown()
