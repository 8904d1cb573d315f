"""Shared fixtures: tiny timm ViTs, real bundled photos and the scripted backend; no download
anywhere. Shared plain helpers live in ``fakes/`` (``fakes.runs`` for the end-to-end tests)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.runs import TINY_VIT_KWARGS

os.environ.setdefault("OMP_NUM_THREADS", "1")

SCRIPTED_PLUGIN = Path(__file__).parent / "fakes" / "scripted"
"""The scripted backend's module and its ``*.dist-info`` entry point (see its docstring)."""


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


class LatencyScript:
    """The scripted backend's figures: ms at batch 1 per candidate, or per short name (method
    and achieved reduction, such as ``dcvit-1003``), in the run (``run``) and in the fresh
    confirmation process (``fresh``, over ``run`` there); and the log of every measurement
    either process opened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.log_path = Path(f"{path}.log")

    def write(self, run: dict[str, float], fresh: dict[str, float] | None = None) -> None:
        self.path.write_text(json.dumps({"run": run, "fresh": fresh or {}}))
        self.log_path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def fresh(self, figures: dict[str, float]) -> Iterator[None]:
        """Within: the confirmation process measures ``figures`` (over the run's); the log
        restarts and is kept after."""
        before = self.path.read_text()
        self.write(json.loads(before)["run"], figures)
        try:
            yield
        finally:
            self.path.write_text(before)

    def log(self) -> list[dict[str, Any]]:
        """``{"pid", "process": "run" | "fresh", "candidate", "batch"}`` per measurement."""
        if not self.log_path.is_file():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]


@pytest.fixture(scope="module")
def latency_script(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LatencyScript]:
    """The scripted backend, installed for this module's tests as a plugin is (its folder on
    ``sys.path`` and, for the confirmation process, ``PYTHONPATH``), and its script."""
    from dcvit_deploy.backends import unregister_backend

    script = LatencyScript(tmp_path_factory.mktemp("script") / "latency.json")
    inherited = os.environ.get("PYTHONPATH")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SCRIPTED_PLUGIN))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SCRIPTED_PLUGIN), inherited])))
        mp.setenv("DCVIT_SCRIPTED_LATENCY", str(script.path))
        yield script
    unregister_backend("scripted")  # the instance this process loaded


class TrainedTinyViT:
    """A tiny ViT trained (40 AdamW steps, ~5 s on one core) to separate 10 noisy class
    prototypes, and a sampler of images of those classes: logits that mean something, so
    quantization can be judged on top-1 (a random-init model's near-ties cannot)."""

    def __init__(self) -> None:
        import timm
        import torch

        torch.manual_seed(0)
        self.protos = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        self.model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT_KWARGS)
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        for _ in range(40):
            x, y = self.images(16, gen)
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.model.eval()

    def images(self, n: int, gen: Any) -> tuple[Any, Any]:
        import torch

        y = torch.randint(0, 10, (n,), generator=gen)
        return self.protos[y] + torch.randn(n, 3, 32, 32, generator=gen), y


@pytest.fixture(scope="session")
def trained_tiny_vit() -> TrainedTinyViT:
    return TrainedTinyViT()
