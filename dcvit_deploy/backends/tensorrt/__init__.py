"""Native TensorRT backend: ONNX -> strongly typed engine, run with torch CUDA tensors.

Written against the TensorRT 10.x/11.x Python API and imported lazily: importing this package
never imports ``tensorrt``. Laid out like Polygraphy's TensorRT backend:

* :mod:`.settings` -- pure: :func:`builder_settings` turns a target profile into
  :class:`BuilderSettings` (precision, strong typing, workspace, builder optimisation level, one
  min/opt/max shape profile from the profile's batch sizes, the timing-cache path), and
  :func:`check_engine_compatible` refuses a plan built by another TensorRT version or GPU;
* :mod:`.loaders` -- small loaders named for what they make from what
  (:func:`network_from_onnx_path`, :func:`engine_bytes_from_network`, :func:`engine_from_bytes`,
  :func:`save_engine`) and the one process-wide TensorRT logger whose messages each build
  captures and quotes in its :class:`BuildError`;
* :mod:`.runner` -- :class:`TensorRTRunner`: one engine, context and stream on one device,
  buffers and CUDA graphs it owns, I/O dtypes mapped or refused by name; CUDA through the
  :class:`CudaDevice` seam (torch, no pycuda) that the tests replace with a CPU fake.

Precision: networks are strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on
TensorRT 10; always on in 11, which removed the weakly typed ``BuilderFlag.FP16``), so an FP16
engine comes from an FP16 ONNX graph (``export_onnx(precision="fp16")``); the build refuses a
graph whose precision does not match the profile.

Artifacts: ``<out_dir>/<candidate>.plan`` plus ``<candidate>.plan.json`` (TensorRT version, GPU
name, compute capability, device, I/O names/shapes/dtypes, build seconds, settings, what
happened to the timing cache), both written atomically. All candidates built into one
directory share one timing cache file (default ``<out_dir>/timing.cache``), read and merged under
a file lock so parallel builds do not lose each other's entries.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dcvit_deploy.backends.base import (
    Availability,
    BackendBase,
    OptionSpec,
    check_batch,
    cuda_availability,
    module_found,
    timed,
)
from dcvit_deploy.backends.tensorrt.engine_runner import (
    Binding,
    CudaDevice,
    TensorRTExecutionError,
    TensorRTRunner,
    TorchCudaDevice,
    torch_dtype,
)
from dcvit_deploy.backends.tensorrt.loaders import (
    EngineBuild,
    LogCapture,
    ParsedNetwork,
    build_engine,
    build_serialized_engine,
    engine_bytes_from_network,
    engine_from_bytes,
    import_tensorrt,
    network_flags,
    network_from_onnx_path,
    process_logger,
    save_engine,
    tensorrt_major,
)
from dcvit_deploy.backends.tensorrt.settings import (
    DEFAULT_TIMING_CACHE,
    MIB,
    OPTIONS,
    BuilderSettings,
    ShapeProfile,
    builder_settings,
    check_engine_compatible,
    engine_meta_path,
    read_engine_meta,
)
from dcvit_deploy.errors import BuildError, ProfileError, UserInputError
from dcvit_deploy.store.atomic import sha256_file
from dcvit_deploy.store.records import SCHEMA_VERSION, Artifact, LatencyStats, TargetProfile

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch

__all__ = [
    "DEFAULT_TIMING_CACHE",
    "MIB",
    "OPTIONS",
    "Binding",
    "BuilderSettings",
    "CudaDevice",
    "EngineBuild",
    "LogCapture",
    "ParsedNetwork",
    "ShapeProfile",
    "TensorRTBackend",
    "TensorRTExecutionError",
    "TensorRTRunner",
    "TorchCudaDevice",
    "build_engine",
    "build_serialized_engine",
    "builder_settings",
    "check_engine_compatible",
    "engine_bytes_from_network",
    "engine_from_bytes",
    "engine_meta_path",
    "import_tensorrt",
    "module_found",
    "network_flags",
    "network_from_onnx_path",
    "process_logger",
    "read_engine_meta",
    "save_engine",
    "tensorrt_major",
    "torch_dtype",
]


class TensorRTBackend(BackendBase):
    """Strongly typed TensorRT engines built from ONNX; timed with CUDA events."""

    name: ClassVar[str] = "tensorrt"
    needs_module: ClassVar[bool] = False
    OPTIONS: ClassVar[dict[str, OptionSpec]] = OPTIONS

    device_factory: Callable[[int], CudaDevice] = TorchCudaDevice
    """Makes the CUDA seam for a device index (tests substitute a CPU fake)."""

    def __init__(self) -> None:
        self._runner: TensorRTRunner | None = None

    def validate_profile(self, profile: TargetProfile) -> None:
        self.options(profile)
        if profile.device != "cuda":
            raise ProfileError(
                f"device = {profile.device!r} cannot run backend 'tensorrt'", "use device 'cuda'"
            )
        if profile.precision not in ("fp32", "fp16", "int8", "fp8"):
            raise ProfileError(
                f"precision = {profile.precision!r} is not supported by backend 'tensorrt'",
                "use fp32 or fp16 (int8/fp8: a Q/DQ graph from dcvit_deploy.export.quantize)",
            )

    def _probe(self, profile: TargetProfile | None) -> Availability:
        if not module_found("tensorrt"):
            return Availability(
                False,
                "the tensorrt Python package is not installed",
                "pip install tensorrt (from NVIDIA's index) on the GPU machine",
            )
        from dcvit_deploy.latency.machine import cuda_device_count, package_version

        if profile is None:
            if cuda_device_count() == 0:
                return Availability(
                    False,
                    "TensorRT needs a CUDA GPU but the driver reports none here",
                    "run on a machine with an NVIDIA GPU and driver",
                )
            return Availability(True, f"tensorrt {package_version('tensorrt')} found")
        no_gpu = cuda_availability(profile)
        if no_gpu is not None:
            return no_gpu
        return Availability(True, f"tensorrt {package_version('tensorrt')} found")

    def build(
        self,
        onnx_path: Path | None,
        profile: TargetProfile,
        out_dir: Path,
        *,
        candidate: str,
        timing_cache: Path | None = None,
        model: torch.nn.Module | None = None,
    ) -> Artifact:
        """Build ``<out_dir>/<candidate>.plan`` (+ ``.plan.json``). ``timing_cache`` defaults to
        ``<out_dir>/timing.cache`` so every candidate built into one directory shares it."""
        self._require(profile)
        if onnx_path is None or not Path(onnx_path).is_file():
            raise UserInputError(
                f"ONNX file {str(onnx_path)!r} for candidate {candidate!r} does not exist",
                "export the candidate first (dcvit_deploy.export.onnx.export_onnx)",
            )
        from dcvit_deploy.export.onnx import onnx_io, onnx_precision

        onnx_path = Path(onnx_path)
        precision = onnx_precision(onnx_path)
        if precision != profile.precision:
            raise BuildError(
                f"candidate {candidate!r}: the ONNX graph is {precision} but profile "
                f"{profile.name!r} asks for {profile.precision} (strongly typed builds take "
                "their precision from the graph)",
                f"export with export_onnx(..., precision={profile.precision!r})",
            )
        io = onnx_io(onnx_path)
        item_shape = tuple(int(d) for d in io["input_shape"][1:])
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cache = Path(timing_cache) if timing_cache is not None else out_dir / DEFAULT_TIMING_CACHE
        settings = builder_settings(
            profile, item_shape, input_name=io["input_name"], timing_cache=cache
        )
        trt = import_tensorrt()
        device_id = int(self.options(profile)["device_id"])
        device = self.device_factory(device_id)
        gpu_name, capability = device.identity()
        t0 = time.perf_counter()
        with device.activate():  # the builder times tactics on the current device
            built = build_engine(trt, onnx_path, settings, candidate=candidate)
        seconds = time.perf_counter() - t0
        plan_path = out_dir / f"{candidate}.plan"
        meta: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "candidate": candidate,
            "tensorrt_version": str(trt.__version__),
            "gpu_name": gpu_name,
            "compute_capability": capability,
            "device_id": device_id,
            "onnx_sha256": sha256_file(onnx_path),
            "io": built.io,
            "build_seconds": seconds,
            "settings": dataclasses.asdict(settings),
            "timing_cache": built.timing_cache,
            "profile": profile.name,
        }
        meta = json.loads(json.dumps(meta))  # JSON-plain (lists, not tuples) like its file
        save_engine(plan_path, built.plan, meta)
        return Artifact(
            candidate=candidate,
            backend=self.name,
            path=str(plan_path),
            sha256=sha256_file(plan_path),
            precision=profile.precision,
            input_name=io["input_name"],
            output_name=io["output_name"],
            input_shape=item_shape,
            build_seconds=seconds,
            meta=meta,
        )

    def _runner_for(self, artifact: Artifact, profile: TargetProfile) -> TensorRTRunner:
        device_id = int(self.options(profile)["device_id"])
        key = (artifact.path, artifact.sha256, device_id)
        if self._runner is not None and self._runner.key == key:
            return self._runner
        previous, self._runner = self._runner, None
        if previous is not None:  # release the previous engine before loading the next
            previous.close()
        self._runner = TensorRTRunner(
            artifact, device_id=device_id, device=self.device_factory(device_id)
        )
        return self._runner

    def measure(
        self,
        artifact: Artifact,
        profile: TargetProfile,
        batch_size: int,
        *,
        raw_path: Path | None = None,
    ) -> LatencyStats:
        """Scope ``device_compute``: CUDA events around ``execute_async_v3`` on the runner's
        stream (device buffers, no copies). ``device_with_copies``: events around H2D copy +
        execute + D2H copy from pinned memory. ``host``: host clock with stream synchronise.
        ``measure.cuda_graphs`` captures the step in a CUDA graph and times its replay."""
        self._require(profile)
        check_batch(artifact, profile, batch_size)
        runner = self._runner_for(artifact, profile)
        copies = profile.scope == "device_with_copies" or not profile.measure.no_copy
        with runner.activated():
            step = runner.step(batch_size, copies=copies, cuda_graph=profile.measure.cuda_graphs)
            return timed(
                step,
                profile=profile,
                artifact=artifact,
                batch_size=batch_size,
                timer=runner.timer(profile.scope),
                raw_path=raw_path,
            )

    def run(self, artifact: Artifact, profile: TargetProfile, inputs: np.ndarray) -> np.ndarray:
        self._require(profile)
        return self._runner_for(artifact, profile).infer(inputs)
