"""Native TensorRT backend: ONNX -> strongly typed engine, run with torch CUDA tensors.

Written against the TensorRT 10.x/11.x Python API and imported lazily: importing this module
never imports ``tensorrt``. The parts that need no GPU are pure and tested directly:

* :func:`builder_settings` turns a target profile into :class:`BuilderSettings` (precision,
  strong typing, workspace, builder optimisation level, one min/opt/max shape profile from the
  profile's batch sizes, the timing-cache path);
* :func:`build_serialized_engine` drives a ``tensorrt`` module (the real one, or a fake in tests)
  through Builder -> create_network(flags) -> OnnxParser.parse_from_file -> config settings ->
  add_optimization_profile -> build_serialized_network, raising :class:`BuildError` with the
  parser's messages when a candidate's graph is rejected;
* :func:`check_engine_compatible` refuses an engine built by another TensorRT version or on
  another GPU (a plan only deserialises on the version and GPU that built it).

Precision: networks are strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on
TensorRT 10; always on in 11, which removed the weakly typed ``BuilderFlag.FP16``), so an FP16
engine comes from an FP16 ONNX graph (``export_onnx(precision="fp16")``); the build refuses a
graph whose precision does not match the profile.

Artifacts: ``<out_dir>/<candidate>.plan`` plus ``<candidate>.plan.json`` (TensorRT version, GPU
name, compute capability, I/O names/shapes/dtypes, build seconds, settings), both written
atomically. All candidates built into one directory share one timing cache file (default
``<out_dir>/timing.cache``), read and merged under a file lock so parallel builds do not lose
each other's entries. The runtime uses torch CUDA tensors and a torch CUDA stream
(``set_tensor_address`` + ``execute_async_v3``); no pycuda.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..atomic import atomic_write_bytes, atomic_write_json, sha256_file
from ..errors import BackendUnavailable, BuildError, EngineMismatch, ProfileError, UserInputError
from ..measure import CudaEventTimer, HostTimer, Timer
from ..records import SCHEMA_VERSION, Artifact, LatencyStats, TargetProfile
from .base import (
    Availability,
    BackendBase,
    OptionSpec,
    check_batch,
    cuda_availability,
    module_found,
    timed,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch

log = logging.getLogger(__name__)

DEFAULT_TIMING_CACHE = "timing.cache"
MIB = 1 << 20


@dataclass(frozen=True)
class ShapeProfile:
    """One optimisation profile for the input: full shapes at min / opt / max batch."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BuilderSettings:
    """Everything the builder is told, derived from a profile by :func:`builder_settings`."""

    precision: Literal["fp32", "fp16"]
    strongly_typed: bool
    workspace_bytes: int
    optimization_level: int
    tf32: bool
    shape_profile: ShapeProfile
    timing_cache: str | None


OPTIONS: dict[str, OptionSpec] = {
    "workspace_mib": OptionSpec(int, 4096, "builder workspace limit (MiB)", minimum=1),
    "builder_optimization_level": OptionSpec(
        int,
        3,
        "TensorRT builder optimisation level (pinned for reproducible builds)",
        minimum=0,
        maximum=5,
    ),
    "tf32": OptionSpec(bool, True, "allow TF32 math for FP32 layers (TensorRT's default)"),
    "device_id": OptionSpec(int, 0, "CUDA device index", minimum=0),
}


def builder_settings(
    profile: TargetProfile,
    input_shape: tuple[int, ...],
    *,
    input_name: str = "input",
    timing_cache: Path | str | None = None,
) -> BuilderSettings:
    """Builder settings for ``profile`` and one item's ``input_shape`` (C, H, W). Pure.

    The shape profile spans the profile's batch sizes: min = smallest, opt = the budget batch
    size (the one the latency budget is judged at), max = largest.
    """
    if profile.precision not in ("fp32", "fp16"):
        raise ProfileError(
            f"precision = {profile.precision!r} is not supported by backend 'tensorrt'",
            "use fp32 or fp16",
        )
    if not input_shape or any(int(d) < 1 for d in input_shape):
        raise UserInputError(f"input shape {input_shape!r} is not a static (C, H, W)", "re-export")
    opts = _options(profile)
    item = tuple(int(d) for d in input_shape)
    return BuilderSettings(
        precision=profile.precision,
        strongly_typed=True,
        workspace_bytes=int(opts["workspace_mib"]) * MIB,
        optimization_level=int(opts["builder_optimization_level"]),
        tf32=bool(opts["tf32"]),
        shape_profile=ShapeProfile(
            input_name=input_name,
            min=(min(profile.batch_sizes), *item),
            opt=(profile.budget_batch_size, *item),
            max=(profile.max_batch, *item),
        ),
        timing_cache=str(timing_cache) if timing_cache is not None else None,
    )


def _options(profile: TargetProfile) -> dict[str, Any]:
    from .base import check_options

    return check_options("tensorrt", profile.backend_options, OPTIONS)


def tensorrt_major(trt: ModuleType) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        return 0


def network_flags(trt: ModuleType) -> int:
    """Network creation flags: STRONGLY_TYPED on TensorRT 10; nothing on 11+ (always strong)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None or tensorrt_major(trt) >= 11:
        return 0
    return 1 << int(flag)


def import_tensorrt() -> ModuleType:
    """Import ``tensorrt`` or raise :class:`BackendUnavailable` saying how to install it."""
    try:
        return importlib.import_module("tensorrt")
    except Exception as exc:  # ImportError, or OSError from missing libnvinfer/libnvonnxparser
        raise BackendUnavailable(
            f"TensorRT cannot be imported: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            "install TensorRT 10+ for this CUDA version (pip install tensorrt from NVIDIA's "
            "index) on the GPU machine, then check with 'dcvit-deploy doctor'",
        ) from exc


def _capturing_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that forwards to :mod:`logging` and keeps error messages.

    Defined in a function because it subclasses ``trt.ILogger`` (only known after import).
    """

    class CapturingLogger(trt.ILogger):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif level <= int(trt.ILogger.Severity.WARNING):
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return CapturingLogger()


def _parser_error(err: Any) -> str:
    try:
        return f"node {err.node()} ({err.node_operator()}): {err.desc()}"
    except Exception:
        return str(err)


def build_serialized_engine(
    trt: ModuleType,
    onnx_path: Path,
    settings: BuilderSettings,
    *,
    candidate: str,
) -> tuple[bytes, list[dict[str, Any]]]:
    """Parse ``onnx_path`` and build a serialized engine with ``settings`` using module ``trt``.

    Returns the plan bytes and the network's I/O (name, shape with -1 for dynamic axes, dtype).
    Raises :class:`BuildError` naming the candidate with the parser's or builder's messages.
    """
    from filelock import FileLock

    logger = _capturing_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so weights stored as external data are found.
    if not parser.parse_from_file(str(onnx_path)):
        messages = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(
            f"candidate {candidate!r}: TensorRT could not parse {Path(onnx_path).name}: "
            + ("; ".join(messages) or "no parser message"),
            "check that every op is supported by this TensorRT version (see the parser "
            "message), or re-export with another opset",
        )
    io = _network_io(network)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    if not settings.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache_path = Path(settings.timing_cache) if settings.timing_cache else None
    lock = FileLock(str(cache_path) + ".lock") if cache_path else None
    if cache_path is not None and lock is not None:
        with lock:
            data = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, False)  # ignore_mismatch=False: never mix GPUs
    shape = settings.shape_profile
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(shape.input_name, shape.min, shape.opt, shape.max)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-3:]) or "see the TensorRT log"
        raise BuildError(
            f"candidate {candidate!r}: TensorRT failed to build an engine: {detail}",
            "raise [backend_options] workspace_mib, or check the log for unsupported layers",
        )
    if cache_path is not None and lock is not None:
        # Merge with whatever other builds wrote meanwhile, then replace the file atomically.
        with lock:
            merged = config.get_timing_cache()
            if cache_path.is_file():
                merged.combine(config.create_timing_cache(cache_path.read_bytes()), False)
            atomic_write_bytes(cache_path, bytes(merged.serialize()))
    return bytes(serialized), io


def _network_io(network: Any) -> list[dict[str, Any]]:
    out = []
    for mode, count, get in (
        ("input", network.num_inputs, network.get_input),
        ("output", network.num_outputs, network.get_output),
    ):
        for i in range(count):
            t = get(i)
            out.append(
                {
                    "name": str(t.name),
                    "mode": mode,
                    "shape": [int(d) for d in t.shape],
                    "dtype": _dtype_name(t.dtype),
                }
            )
    return out


def _dtype_name(dtype: Any) -> str:
    """``trt.DataType.HALF`` -> ``'half'`` (pybind enums have ``name``; str() is the fallback)."""
    name = getattr(dtype, "name", None)
    return str(name or str(dtype).split(".")[-1]).lower()


# --------------------------------------------------------------------------- engine metadata


def check_engine_compatible(
    meta: dict[str, Any],
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
) -> None:
    """Refuse an engine built with another TensorRT version or on another GPU. Pure."""
    built = (
        str(meta.get("tensorrt_version")),
        str(meta.get("gpu_name")),
        str(meta.get("compute_capability")),
    )
    here = (tensorrt_version, gpu_name, compute_capability)
    if built != here:
        raise EngineMismatch(
            f"engine {meta.get('candidate', '?')!r} was built with TensorRT {built[0]} on "
            f"{built[1]} (sm {built[2]}) but this machine has TensorRT {here[0]} on {here[1]} "
            f"(sm {here[2]})",
            "rebuild the engine on this machine with this TensorRT version",
        )


def engine_meta_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def read_engine_meta(plan: Path) -> dict[str, Any]:
    path = engine_meta_path(plan)
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise UserInputError(
            f"engine metadata {path.name} is missing or unreadable",
            "rebuild the engine (its metadata is written next to the plan)",
        ) from exc


def device_identity(device_id: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of ``device_id`` through torch."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_id)
    return torch.cuda.get_device_name(device_id), f"{major}.{minor}"


# --------------------------------------------------------------------------- the backend


class TensorRTBackend(BackendBase):
    """Strongly typed TensorRT engines built from ONNX; timed with CUDA events."""

    name: ClassVar[str] = "tensorrt"
    needs_module: ClassVar[bool] = False
    OPTIONS: ClassVar[dict[str, OptionSpec]] = OPTIONS

    def __init__(self) -> None:
        self._runner: TensorRTRunner | None = None

    def validate_profile(self, profile: TargetProfile) -> None:
        self.options(profile)
        if profile.device != "cuda":
            raise ProfileError(
                f"device = {profile.device!r} cannot run backend 'tensorrt'", "use device 'cuda'"
            )
        if profile.precision not in ("fp32", "fp16"):
            raise ProfileError(
                f"precision = {profile.precision!r} is not supported by backend 'tensorrt'",
                "use fp32 or fp16 (an FP16 ONNX graph from export_onnx(precision='fp16'))",
            )

    def _probe(self, profile: TargetProfile | None) -> Availability:
        if not module_found("tensorrt"):
            return Availability(
                False,
                "the tensorrt Python package is not installed",
                "pip install tensorrt (from NVIDIA's index) on the GPU machine",
            )
        from ..envinfo import cuda_device_count, package_version

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
                "export the candidate first (dcvit_deploy.export.export_onnx)",
            )
        from ..export import onnx_io, onnx_precision

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
        gpu_name, capability = device_identity(device_id)
        t0 = time.perf_counter()
        plan, network_io = build_serialized_engine(trt, onnx_path, settings, candidate=candidate)
        seconds = time.perf_counter() - t0
        plan_path = out_dir / f"{candidate}.plan"
        atomic_write_bytes(plan_path, plan)
        meta: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "candidate": candidate,
            "tensorrt_version": str(trt.__version__),
            "gpu_name": gpu_name,
            "compute_capability": capability,
            "device_id": device_id,
            "onnx_sha256": sha256_file(onnx_path),
            "io": network_io,
            "build_seconds": seconds,
            "settings": dataclasses.asdict(settings),
            "profile": profile.name,
        }
        meta = json.loads(json.dumps(meta))  # JSON-plain (lists, not tuples) like its file
        atomic_write_json(engine_meta_path(plan_path), meta)
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
        if self._runner is not None and self._runner.key == (artifact.path, artifact.sha256):
            return self._runner
        self._runner = None  # release the previous engine before loading the next
        self._runner = TensorRTRunner(artifact, device_id=int(self.options(profile)["device_id"]))
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
        step = runner.step(batch_size, copies=copies, cuda_graph=profile.measure.cuda_graphs)
        timer: Timer
        if profile.scope == "host":
            timer = HostTimer(sync=runner.stream.synchronize, name="host")
        else:
            timer = CudaEventTimer(runner.stream)
        return timed(
            step,
            profile=profile,
            artifact=artifact,
            batch_size=batch_size,
            timer=timer,
            raw_path=raw_path,
        )

    def run(self, artifact: Artifact, profile: TargetProfile, inputs: np.ndarray) -> np.ndarray:
        self._require(profile)
        return self._runner_for(artifact, profile).infer(inputs)


class TensorRTRunner:
    """One deserialized engine + execution context on a dedicated torch CUDA stream."""

    def __init__(self, artifact: Artifact, *, device_id: int = 0) -> None:
        import torch

        trt = import_tensorrt()
        plan = Path(artifact.path)
        meta = read_engine_meta(plan)
        name, capability = device_identity(device_id)
        check_engine_compatible(
            meta,
            tensorrt_version=str(trt.__version__),
            gpu_name=name,
            compute_capability=capability,
        )
        self.key = (artifact.path, artifact.sha256)
        self.trt = trt
        self.device = torch.device("cuda", device_id)
        torch.cuda.set_device(self.device)
        self._logger = _capturing_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineMismatch(
                f"TensorRT could not deserialize {plan.name}: "
                + ("; ".join(self._logger.errors[-2:]) or "unknown error"),
                "rebuild the engine on this machine",
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.inputs = [n for n, i in zip(names, is_input, strict=True) if i]
        self.outputs = [n for n, i in zip(names, is_input, strict=True) if not i]
        if len(self.inputs) != 1 or not self.outputs:
            raise UserInputError(
                f"engine {plan.name} has inputs {self.inputs} and outputs {self.outputs}",
                "export models with one image input",
            )
        self.input_shape = tuple(artifact.input_shape)
        self._buffers: dict[str, torch.Tensor] = {}
        self._keep: list[Any] = []

    def _torch_dtype(self, name: str) -> torch.dtype:
        import torch

        trt = self.trt
        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int8: torch.int8,
            trt.bool: torch.bool,
        }
        for attr, tdtype in (("bfloat16", torch.bfloat16), ("int64", torch.int64)):
            if hasattr(trt, attr):
                table[getattr(trt, attr)] = tdtype
        return table[self.engine.get_tensor_dtype(name)]

    def prepare(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the input shape and bind fresh device buffers; returns (input, first output)."""
        import torch

        name = self.inputs[0]
        shape = (batch_size, *self.input_shape)
        if not self.context.set_input_shape(name, shape):
            raise UserInputError(
                f"batch size {batch_size} is outside the engine's optimisation profile",
                "rebuild with the batch size in the profile's batch_sizes",
            )
        x = torch.randn(shape, device=self.device).to(self._torch_dtype(name))
        self._buffers = {name: x}
        for out in self.outputs:
            out_shape = tuple(int(d) for d in self.context.get_tensor_shape(out))
            self._buffers[out] = torch.empty(
                out_shape, dtype=self._torch_dtype(out), device=self.device
            )
        for tensor_name, tensor in self._buffers.items():
            self.context.set_tensor_address(tensor_name, tensor.data_ptr())
        return x, self._buffers[self.outputs[0]]

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def step(self, batch_size: int, *, copies: bool, cuda_graph: bool) -> Callable[[], None]:
        """A zero-argument step for the timing loop (optionally with copies / as a CUDA graph)."""
        import torch

        x, y = self.prepare(batch_size)
        if copies:
            x_host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True).normal_()
            y_host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)

            def body() -> None:
                with torch.cuda.stream(self.stream):
                    x.copy_(x_host, non_blocking=True)
                    self.enqueue()
                    y_host.copy_(y, non_blocking=True)

            self._keep = [x_host, y_host]
        else:
            body = self.enqueue
        if not cuda_graph:
            return body
        # TensorRT finishes shape-dependent setup in the first enqueue: run once before capture.
        body()
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            body()
        self._keep.append(graph)

        def replay() -> None:
            with torch.cuda.stream(self.stream):
                graph.replay()

        return replay

    def infer(self, inputs: np.ndarray) -> np.ndarray:
        """Run on host ``inputs`` (N, C, H, W); returns the first output as float32 numpy."""
        import torch

        x, y = self.prepare(int(inputs.shape[0]))
        with torch.cuda.stream(self.stream):
            x.copy_(torch.from_numpy(inputs).to(x.dtype))
            self.enqueue()
        self.stream.synchronize()
        return y.float().cpu().numpy()
