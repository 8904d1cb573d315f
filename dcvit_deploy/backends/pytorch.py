"""PyTorch backend (``torch``): the reference runtime, eager or CUDA graphs, CPU or CUDA.

It builds from the candidate's torch module, not from ONNX: the protocol's ``needs_module`` is
``True`` and :meth:`TorchBackend.build` takes ``model=``. The module is captured with
``torch.export`` (the same tracer the ONNX exporter uses, with a dynamic batch axis) and saved
as ``<out_dir>/<candidate>.pt2``, so the artifact is self-contained: measuring or running it
later needs no Python class of the compressed model, and what is measured is what was built.
The loaded program runs op by op (eager kernels); on CUDA, ``measure.cuda_graphs`` captures one
forward in a CUDA graph and times its replay.

Precision: the program is saved in FP32 and cast when loaded -- ``fp16``/``bf16`` modules on CUDA,
``fp32`` or ``bf16`` on CPU. ``[backend_options]``: ``device_id``, ``num_threads`` (CPU
intra-op threads, 0 = leave torch's setting), ``channels_last`` is not offered (ViTs gain
nothing from it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dcvit_deploy.backends.base import (
    Availability,
    BackendBase,
    OptionSpec,
    ReadyMeasurement,
    check_batch,
    cuda_availability,
    module_found,
    timed,
)
from dcvit_deploy.errors import BuildError, ProfileError, UserInputError
from dcvit_deploy.latency.loop import CudaEventTimer, HostTimer, Timer
from dcvit_deploy.store.atomic import atomic_path, sha256_file
from dcvit_deploy.store.records import Artifact, LatencyStats, TargetProfile

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch


class TorchBackend(BackendBase):
    """Runs the candidate's module with PyTorch (reference numbers and CPU/GPU eager latency)."""

    name: ClassVar[str] = "torch"
    needs_module: ClassVar[bool] = True
    OPTIONS: ClassVar[dict[str, OptionSpec]] = {
        "device_id": OptionSpec(int, 0, "CUDA device index", minimum=0),
        "num_threads": OptionSpec(
            int, 0, "CPU intra-op threads while measuring (0: leave torch's setting)", minimum=0
        ),
    }

    def __init__(self) -> None:
        self._loaded: tuple[tuple[Any, ...], torch.nn.Module] | None = None

    def validate_profile(self, profile: TargetProfile) -> None:
        self.options(profile)
        allowed = ("fp32", "bf16") if profile.device == "cpu" else ("fp32", "fp16", "bf16")
        if profile.precision not in allowed:
            raise ProfileError(
                f"precision = {profile.precision!r} is not supported by backend 'torch' on "
                f"{profile.device}",
                f"use one of: {', '.join(allowed)}",
            )

    def _probe(self, profile: TargetProfile | None) -> Availability:
        if not module_found("torch"):
            return Availability(False, "torch is not installed", "pip install torch")
        no_gpu = cuda_availability(profile)
        if no_gpu is not None:
            return no_gpu
        return Availability(True, "torch is installed")

    def build(
        self,
        onnx_path: Path | None,
        profile: TargetProfile,
        out_dir: Path,
        *,
        candidate: str,
        timing_cache: Path | None = None,
        model: torch.nn.Module | None = None,
        input_shape: tuple[int, int, int] | None = None,
    ) -> Artifact:
        """Capture ``model`` with torch.export and save ``<out_dir>/<candidate>.pt2``.

        ``input_shape`` (C, H, W) defaults to the size the model was built for (timm's patch
        embedding, else its pretrained config). ``onnx_path`` and ``timing_cache`` are ignored.
        """
        self._require(profile)
        if model is None:
            raise UserInputError(
                f"backend 'torch' builds from the candidate's module, none given for {candidate!r}",
                "pass model=<torch module> to build() (backend.needs_module is True)",
            )
        import torch

        shape = input_shape or _model_input_size(model)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / f"{candidate}.pt2"
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            example = torch.randn(2, *shape, device=_param_device(model))
            program = torch.export.export(
                model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
            )
            with atomic_path(dest) as tmp:
                torch.export.save(program, str(tmp))
        except Exception as exc:
            raise BuildError(
                f"candidate {candidate!r}: torch.export could not capture the module: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                "remove data-dependent Python control flow from forward()",
            ) from exc
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - t0
        return Artifact(
            candidate=candidate,
            backend=self.name,
            path=str(dest),
            sha256=sha256_file(dest),
            precision=profile.precision,
            input_name="input",
            output_name="logits",
            input_shape=tuple(int(d) for d in shape),
            build_seconds=seconds,
            meta={"torch_version": torch.__version__, "format": "torch.export"},
        )

    def _module(self, artifact: Artifact, profile: TargetProfile) -> torch.nn.Module:
        import torch

        device = _device(profile, self.options(profile))
        dtype = _dtype(profile.precision)
        key = (artifact.path, artifact.sha256, str(device), str(dtype))
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        self._loaded = None
        program = torch.export.load(artifact.path)
        module = program.module().to(device=device, dtype=dtype)
        self._loaded = (key, module)
        return module

    def measure(
        self,
        artifact: Artifact,
        profile: TargetProfile,
        batch_size: int,
        *,
        raw_path: Path | None = None,
    ) -> LatencyStats:
        """CPU: host clock around one forward. CUDA: forward on a dedicated stream, timed with
        CUDA events (``device_*`` scopes) or the host clock plus synchronise (``host``)."""
        ready = self._ready(lambda: self._module(artifact, profile), artifact, profile, batch_size)
        try:
            return timed(
                ready.step,
                profile=profile,
                artifact=artifact,
                batch_size=batch_size,
                timer=ready.timer,
                raw_path=raw_path,
            )
        finally:
            ready.close()

    def open_measurement(
        self, artifact: Artifact, profile: TargetProfile, batch_size: int
    ) -> ReadyMeasurement:
        """Load the artifact into its own module (not the one-module cache, so several can be
        open in interleaved rounds) and return its step and timer, as :meth:`measure` times
        them. On CPU, ``num_threads`` is applied now and restored by ``close``."""
        import torch

        def load() -> torch.nn.Module:
            device, dtype = _device(profile, self.options(profile)), _dtype(profile.precision)
            return torch.export.load(artifact.path).module().to(device=device, dtype=dtype)

        return self._ready(load, artifact, profile, batch_size)

    def _ready(
        self,
        load: Callable[[], torch.nn.Module],
        artifact: Artifact,
        profile: TargetProfile,
        batch_size: int,
    ) -> ReadyMeasurement:
        """The step and timer of one forward at ``batch_size`` (checks first, then ``load``)."""
        import torch

        self._require(profile)
        check_batch(artifact, profile, batch_size)
        opts = self.options(profile)
        module = load()
        device = _device(profile, opts)
        x = torch.randn(batch_size, *artifact.input_shape, device=device).to(
            _dtype(profile.precision)
        )
        if device.type == "cpu":
            previous = torch.get_num_threads()
            if opts["num_threads"]:
                torch.set_num_threads(int(opts["num_threads"]))

            def step() -> None:
                with torch.inference_mode():
                    module(x)

            return ReadyMeasurement(
                step, HostTimer(name="host"), lambda: torch.set_num_threads(previous)
            )
        stream = torch.cuda.Stream(device)
        cuda_step = _cuda_step(module, x, stream, cuda_graph=profile.measure.cuda_graphs)
        timer: Timer
        if profile.scope == "host":
            timer = HostTimer(sync=stream.synchronize, name="host")
        else:
            timer = CudaEventTimer(stream)
        return ReadyMeasurement(cuda_step, timer)

    def run(self, artifact: Artifact, profile: TargetProfile, inputs: np.ndarray) -> np.ndarray:
        import torch

        self._require(profile)
        module = self._module(artifact, profile)
        device = _device(profile, self.options(profile))
        x = torch.from_numpy(inputs).to(device=device, dtype=_dtype(profile.precision))
        with torch.inference_mode():
            y = module(x)
        return y.float().cpu().numpy()


def _cuda_step(
    module: torch.nn.Module, x: torch.Tensor, stream: torch.cuda.Stream, *, cuda_graph: bool
) -> Callable[[], None]:
    import torch

    def forward() -> None:
        with torch.inference_mode(), torch.cuda.stream(stream):
            module(x)

    if not cuda_graph:
        return forward
    # Warm up on the capture stream (lazy init, cuBLAS handles) before capturing one forward.
    for _ in range(3):
        forward()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph, stream=stream):
        module(x)

    def replay() -> None:
        with torch.cuda.stream(stream):
            graph.replay()

    replay.graph = graph  # type: ignore[attr-defined]  # keep the graph alive with the step
    return replay


def _device(profile: TargetProfile, opts: dict[str, Any]) -> torch.device:
    import torch

    if profile.device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(opts["device_id"]))


def _dtype(precision: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _param_device(model: torch.nn.Module) -> torch.device:
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _model_input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) from the patch embedding (timm ViTs; honours an overridden ``img_size``),
    else from the model's pretrained/default config."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    channels = getattr(getattr(embed, "proj", None), "in_channels", None)
    if size is not None and channels is not None:
        h, w = (int(v) for v in size)
        return int(channels), h, w
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and "input_size" in cfg:
            c, h, w = (int(v) for v in cfg["input_size"])
            return c, h, w
    raise UserInputError(
        "cannot tell the model's input size", "pass input_shape=(C, H, W) to build()"
    )
