"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers.

``[backend_options]`` (all optional; see :attr:`OnnxRuntimeBackend.OPTIONS`): ``provider``
(``auto`` = ``cpu`` on CPU profiles, ``cuda`` on CUDA profiles; or ``cpu``/``cuda``/``tensorrt``),
``intra_op_num_threads`` / ``inter_op_num_threads`` (0 = ONNX Runtime's default),
``graph_optimization_level``, ``execution_mode``, ``io_binding``, ``device_id``,
``log_severity_level`` and, for the TensorRT provider, ``trt_workspace_mib`` and
``trt_builder_optimization_level``.

Rules this backend keeps:

* Sessions are created before timing and cached per artifact; creating one is never timed. The
  TensorRT provider builds its engine inside the first run, so :meth:`build` runs once per batch
  size with an on-disk engine cache, and :func:`~dcvit_deploy.latency.loop.measure` warms up anyway.
* A session that asked for CUDA or TensorRT but silently fell back to CPU (ONNX Runtime only logs
  a warning) is refused with :class:`BackendUnavailable`, detected through
  ``session.get_providers()``: CPU numbers must never be reported as GPU numbers.
* On CUDA with ``io_binding`` and ``measure.no_copy``, inputs and outputs are bound on the device
  so the timed region has no host copies. ``measure.cuda_graphs`` enables ONNX Runtime's CUDA
  graph capture on the CUDA provider (``enable_cuda_graph``) and on the TensorRT provider
  (``trt_cuda_graph_enable``); it needs those fixed device buffers, so a profile asking for graphs
  without ``io_binding`` and ``no_copy`` is refused rather than silently timed without them.
* A captured graph replays the shapes and buffer addresses it was captured with. ONNX Runtime's
  CUDA provider can keep several graphs per session (run option ``gpu_graph_id``) but its
  TensorRT provider captures one per session, so with graphs every batch size gets its own
  session, and the buffers bound for it stay bound for the session's life (measuring the same
  batch size again reuses them).
* Timing is host wall time around ``run`` (scope ``host``): ONNX Runtime runs on its own stream,
  so the device scopes (``device_compute``, ``device_with_copies``) cannot be bracketed by CUDA
  events and are refused. Host time with copies is scope ``host`` with ``measure.no_copy = false``.
"""

from __future__ import annotations

import shutil
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
    random_inputs,
    timed,
)
from dcvit_deploy.errors import BackendUnavailable, BuildError, ProfileError, UserInputError
from dcvit_deploy.latency.loop import HostTimer
from dcvit_deploy.latency.machine import UNAVAILABLE, package_version
from dcvit_deploy.store.atomic import atomic_path, sha256_file
from dcvit_deploy.store.records import Artifact, LatencyStats, TargetProfile

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import onnxruntime
    import torch

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_OPT_LEVELS = ("disable", "basic", "extended", "all")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


class OnnxRuntimeBackend(BackendBase):
    """ONNX files run by ONNX Runtime; the artifact is the ONNX file itself (copied into place)."""

    name: ClassVar[str] = "onnxruntime"
    needs_module: ClassVar[bool] = False
    OPTIONS: ClassVar[dict[str, OptionSpec]] = {
        "provider": OptionSpec(
            str, "auto", "execution provider", choices=("auto", "cpu", "cuda", "tensorrt")
        ),
        "intra_op_num_threads": OptionSpec(
            int, 0, "threads inside one operator (0: one per physical core)", minimum=0
        ),
        "inter_op_num_threads": OptionSpec(
            int, 0, "threads across operators in parallel mode (0: default)", minimum=0
        ),
        "graph_optimization_level": OptionSpec(
            str, "all", "ONNX Runtime graph optimisations", choices=_OPT_LEVELS
        ),
        "execution_mode": OptionSpec(
            str, "sequential", "operator scheduling", choices=("sequential", "parallel")
        ),
        "allow_spinning": OptionSpec(
            bool,
            True,
            "let idle pool threads spin for work (ONNX Runtime's default; off on shared runners)",
        ),
        "io_binding": OptionSpec(
            bool, True, "on GPU providers, bind device buffers (no copies when measure.no_copy)"
        ),
        "device_id": OptionSpec(int, 0, "CUDA device index", minimum=0),
        "log_severity_level": OptionSpec(int, 3, "0 verbose .. 4 fatal", minimum=0, maximum=4),
        "trt_workspace_mib": OptionSpec(
            int, 4096, "TensorRT provider workspace limit (MiB)", minimum=1
        ),
        "trt_builder_optimization_level": OptionSpec(
            int, 3, "TensorRT provider builder optimisation level", minimum=0, maximum=5
        ),
    }

    def __init__(self) -> None:
        # One cached session: measuring several batch sizes of one artifact reuses it, and
        # holding at most one bounds memory when a family of candidates is measured in turn.
        # With CUDA graphs the session is per batch size and keeps its bound step (buffers).
        self._cache_key: tuple[Any, ...] | None = None
        self._cache_session: onnxruntime.InferenceSession | None = None
        self._cache_step: Callable[[], None] | None = None

    # ------------------------------------------------------------------ profile & availability

    def provider(self, profile: TargetProfile) -> str:
        """The provider key (``cpu``/``cuda``/``tensorrt``) this profile runs on."""
        chosen = self.options(profile)["provider"]
        if chosen == "auto":
            return "cpu" if profile.device == "cpu" else "cuda"
        return str(chosen)

    def validate_profile(self, profile: TargetProfile) -> None:
        self.options(profile)
        provider = self.provider(profile)
        if (provider == "cpu") != (profile.device == "cpu"):
            raise ProfileError(
                f"[backend_options] provider = {provider!r} does not match device = "
                f"{profile.device!r}",
                "use provider 'cpu' with device 'cpu', and 'cuda' or 'tensorrt' with 'cuda'",
            )
        if profile.precision not in ("fp32", "fp16", "int8"):
            raise ProfileError(
                f"precision = {profile.precision!r} is not supported by backend 'onnxruntime'",
                "use fp32, fp16 or int8 (a quantized graph from dcvit_deploy.export.quantize)",
            )
        if profile.scope != "host":
            raise ProfileError(
                f"scope = {profile.scope!r} is not measurable with backend 'onnxruntime' "
                "(it runs on its own CUDA stream, so no CUDA events can bracket its work)",
                "use scope 'host' (with measure.no_copy = false to include the copies), or the "
                "tensorrt backend for device scopes",
            )
        if profile.measure.cuda_graphs:
            opts = self.options(profile)
            if provider == "cpu" or not opts["io_binding"] or not profile.measure.no_copy:
                raise ProfileError(
                    "measure.cuda_graphs needs a GPU provider with fixed device buffers: "
                    f"provider = {provider!r}, io_binding = {opts['io_binding']}, "
                    f"measure.no_copy = {profile.measure.no_copy}",
                    "use provider 'cuda' or 'tensorrt' with io_binding = true and "
                    "measure.no_copy = true, or set measure.cuda_graphs = false",
                )

    def _probe(self, profile: TargetProfile | None) -> Availability:
        if not module_found("onnxruntime"):
            return Availability(
                False,
                "the onnxruntime package is not installed",
                "pip install onnxruntime-gpu (Linux x86-64) or onnxruntime; never both",
            )
        gpu_build = package_version("onnxruntime-gpu") != UNAVAILABLE
        version = package_version("onnxruntime")
        if profile is None:
            kind = "GPU build" if gpu_build else "CPU build"
            return Availability(True, f"onnxruntime {version} ({kind}) is installed")
        no_gpu = cuda_availability(profile)
        if no_gpu is not None:
            return no_gpu
        provider = self.provider(profile)
        if provider != "cpu" and not gpu_build:
            return Availability(
                False,
                f"provider {provider!r} needs the onnxruntime-gpu build; "
                f"the CPU build {version} is installed",
                "pip uninstall onnxruntime && pip install onnxruntime-gpu",
            )
        if provider == "tensorrt" and not _tensorrt_libraries_found():
            return Availability(
                False,
                "the TensorRT provider needs the TensorRT libraries (libnvinfer), not found",
                "install TensorRT matching onnxruntime-gpu's CUDA version",
            )
        return Availability(True, f"onnxruntime {version} with provider {provider!r}")

    # ------------------------------------------------------------------ build

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
        """Copy the ONNX file to ``out_dir/<candidate>.onnx`` and prove a session loads it.

        ``build_seconds`` is session creation (plus, for the TensorRT provider, the first run of
        every batch size, which builds and caches its engines under ``out_dir/ort_trt_cache``).
        ``timing_cache`` and ``model`` are ignored (the TensorRT provider keeps its own caches).
        """
        self._require(profile)
        if onnx_path is None or not Path(onnx_path).is_file():
            raise UserInputError(
                f"ONNX file {str(onnx_path)!r} for candidate {candidate!r} does not exist",
                "export the candidate first (dcvit_deploy.export.onnx.export_onnx)",
            )
        from dcvit_deploy.export.onnx import onnx_io, onnx_precision

        source = Path(onnx_path)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / f"{candidate}.onnx"
        if not dest.exists() or dest.resolve() != source.resolve():
            with atomic_path(dest) as tmp:
                shutil.copyfile(source, tmp)
        precision = onnx_precision(dest)
        if precision != profile.precision:
            raise BuildError(
                f"candidate {candidate!r}: the ONNX graph is {precision} but profile "
                f"{profile.name!r} asks for {profile.precision}",
                f"export with export_onnx(..., precision={profile.precision!r})",
            )
        io = onnx_io(dest)
        static_batch = io["input_shape"][0]
        if isinstance(static_batch, int) and any(b != static_batch for b in profile.batch_sizes):
            raise BuildError(
                f"candidate {candidate!r}: the ONNX input has a static batch of {static_batch} "
                f"but profile {profile.name!r} measures batch sizes {list(profile.batch_sizes)}",
                "export with dynamic_batch=True",
            )
        artifact = Artifact(
            candidate=candidate,
            backend=self.name,
            path=str(dest),
            sha256=sha256_file(dest),
            precision=profile.precision,
            input_name=io["input_name"],
            output_name=io["output_name"],
            input_shape=tuple(int(d) for d in io["input_shape"][1:]),
            build_seconds=0.0,
        )
        provider = self.provider(profile)
        t0 = time.perf_counter()
        try:
            session = self._session(artifact, profile)
            if provider == "tensorrt":
                for b in profile.batch_sizes:  # engines are built inside the first run
                    self._run_session(session, artifact, random_inputs((b, *artifact.input_shape)))
        except (BackendUnavailable, ProfileError):
            raise
        except Exception as exc:
            raise BuildError(
                f"candidate {candidate!r}: ONNX Runtime could not load {dest.name}: "
                f"{_first_line(exc)}",
                "check the exported graph (export_onnx verify) or the provider's requirements",
            ) from exc
        seconds = time.perf_counter() - t0
        import dataclasses

        return dataclasses.replace(
            artifact,
            build_seconds=seconds,
            meta={
                "onnxruntime_version": package_version("onnxruntime"),
                "provider": PROVIDERS[provider],
                "session_providers": list(session.get_providers()),
                "options": self.options(profile),
                "inputs": io["inputs"],
                "outputs": io["outputs"],
            },
        )

    # ------------------------------------------------------------------ sessions

    def _session(
        self,
        artifact: Artifact,
        profile: TargetProfile,
        *,
        cuda_graph: bool = False,
        batch_size: int | None = None,
    ) -> onnxruntime.InferenceSession:
        """The cached session for ``artifact``; with ``cuda_graph`` one per ``batch_size``."""
        opts = self.options(profile)
        graph_batch = batch_size if cuda_graph else None
        key = (
            artifact.path,
            artifact.sha256,
            profile.name,
            repr(sorted(opts.items())),
            cuda_graph,
            graph_batch,
        )
        if self._cache_key == key and self._cache_session is not None:
            return self._cache_session
        self._cache_key, self._cache_session, self._cache_step = None, None, None
        session = create_session(
            Path(artifact.path),
            provider=self.provider(profile),
            options=opts,
            profile=profile,
            input_name=artifact.input_name,
            input_shape=artifact.input_shape,
            cuda_graph=cuda_graph,
            cache_dir=Path(artifact.path).parent,
        )
        self._cache_key, self._cache_session = key, session
        return session

    @staticmethod
    def _run_session(
        session: onnxruntime.InferenceSession, artifact: Artifact, inputs: np.ndarray
    ) -> np.ndarray:
        dtype = _ORT_TYPES.get(session.get_inputs()[0].type, "float32")
        out = session.run([artifact.output_name], {artifact.input_name: inputs.astype(dtype)})
        return out[0]

    # ------------------------------------------------------------------ measure & run

    def _timing_setup(
        self, artifact: Artifact, profile: TargetProfile, batch_size: int
    ) -> tuple[dict[str, Any], str, bool, bool]:
        """Options, provider, whether I/O is bound on the device, whether CUDA graphs are used
        (validate_profile refused graphs without bound buffers)."""
        self._require(profile)
        check_batch(artifact, profile, batch_size)
        opts = self.options(profile)
        provider = self.provider(profile)
        settings = profile.measure
        bind = provider != "cpu" and bool(opts["io_binding"]) and settings.no_copy
        return opts, provider, bind, bind and settings.cuda_graphs

    def measure(
        self,
        artifact: Artifact,
        profile: TargetProfile,
        batch_size: int,
        *,
        raw_path: Path | None = None,
    ) -> LatencyStats:
        opts, _, bind, cuda_graph = self._timing_setup(artifact, profile, batch_size)
        session = self._session(artifact, profile, cuda_graph=cuda_graph, batch_size=batch_size)
        if cuda_graph and self._cache_step is not None:
            step = self._cache_step  # the buffers this session's graph was captured with
        else:
            step = _timing_step(session, artifact, batch_size, bind, int(opts["device_id"]))
            if cuda_graph:
                self._cache_step = step
        return timed(
            step,
            profile=profile,
            artifact=artifact,
            batch_size=batch_size,
            timer=HostTimer(name="host"),
            raw_path=raw_path,
        )

    def open_measurement(
        self, artifact: Artifact, profile: TargetProfile, batch_size: int
    ) -> ReadyMeasurement:
        """A session of its own, kept open across interleaved rounds (see
        :mod:`dcvit_deploy.latency.rounds`): created once per candidate and batch size, never timed,
        and not the one-slot cache (which interleaving would empty every round)."""
        opts, provider, bind, cuda_graph = self._timing_setup(artifact, profile, batch_size)
        session = create_session(
            Path(artifact.path),
            provider=provider,
            options=opts,
            profile=profile,
            input_name=artifact.input_name,
            input_shape=artifact.input_shape,
            cuda_graph=cuda_graph,
            cache_dir=Path(artifact.path).parent,
        )
        step = _timing_step(session, artifact, batch_size, bind, int(opts["device_id"]))
        holder: list[Any] = [session]
        return ReadyMeasurement(step, HostTimer(name="host"), closer=holder.clear)

    def run(self, artifact: Artifact, profile: TargetProfile, inputs: np.ndarray) -> np.ndarray:
        self._require(profile)
        session = self._session(artifact, profile)
        return self._run_session(session, artifact, inputs).astype("float32")


# --------------------------------------------------------------------------- helpers


def _timing_step(
    session: onnxruntime.InferenceSession,
    artifact: Artifact,
    batch_size: int,
    bind: bool,
    device_id: int,
) -> Callable[[], None]:
    """One timed inference at ``batch_size`` on random inputs: through device-bound buffers
    when ``bind``, else a plain ``session.run``."""
    dtype = _ORT_TYPES.get(session.get_inputs()[0].type, "float32")
    x = random_inputs((batch_size, *artifact.input_shape), dtype)
    if bind:
        return _bound_step(session, artifact, x, device_id=device_id)
    feed = {artifact.input_name: x}
    names = [artifact.output_name]

    def step() -> None:
        session.run(names, feed)

    return step


def create_session(
    path: Path,
    *,
    provider: str,
    options: dict[str, Any],
    profile: TargetProfile | None = None,
    input_name: str = "input",
    input_shape: tuple[int, ...] = (),
    cuda_graph: bool = False,
    cache_dir: Path | None = None,
) -> onnxruntime.InferenceSession:
    """Create an InferenceSession on ``provider`` and prove the provider is really in use.

    Raises :class:`BackendUnavailable` when ONNX Runtime fell back to another provider.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(options.get("intra_op_num_threads", 0))
    so.inter_op_num_threads = int(options.get("inter_op_num_threads", 0))
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[str(options.get("graph_optimization_level", "all"))]
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if options.get("execution_mode") == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    so.log_severity_level = int(options.get("log_severity_level", 3))
    spin = "1" if options.get("allow_spinning", True) else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    providers = provider_list(
        provider,
        options,
        profile=profile,
        input_name=input_name,
        input_shape=input_shape,
        cuda_graph=cuda_graph,
        cache_dir=cache_dir,
    )
    session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    wanted = PROVIDERS[provider]
    used = list(session.get_providers())
    if wanted not in used:
        raise BackendUnavailable(
            f"ONNX Runtime could not use {wanted} and fell back to {', '.join(used)}; "
            "refusing to report those numbers as GPU numbers",
            "install the CUDA/cuDNN (and TensorRT) versions onnxruntime-gpu "
            f"{package_version('onnxruntime')} requires and check the GPU with "
            "'dcvit-deploy doctor', or use the CPU profile 'cpu-ort'",
        )
    return session


def provider_list(
    provider: str,
    options: dict[str, Any],
    *,
    profile: TargetProfile | None = None,
    input_name: str = "input",
    input_shape: tuple[int, ...] = (),
    cuda_graph: bool = False,
    cache_dir: Path | None = None,
) -> list[Any]:
    """The ``providers=`` list for an InferenceSession (pure; tested without a GPU)."""
    device_id = int(options.get("device_id", 0))
    # With the TensorRT provider the graph is captured by it (trt_cuda_graph_enable); the CUDA
    # provider behind it only runs what TensorRT does not take, and captures nothing.
    cuda_captures = cuda_graph and provider == "cuda"
    cuda: tuple[str, dict[str, str]] = (
        PROVIDERS["cuda"],
        {"device_id": str(device_id), "enable_cuda_graph": "1" if cuda_captures else "0"},
    )
    if provider == "cpu":
        return [PROVIDERS["cpu"]]
    if provider == "cuda":
        return [cuda, PROVIDERS["cpu"]]
    trt: dict[str, str] = {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_timing_cache_enable": "True",
        "trt_builder_optimization_level": str(
            int(options.get("trt_builder_optimization_level", 3))
        ),
        "trt_max_workspace_size": str(int(options.get("trt_workspace_mib", 4096)) * (1 << 20)),
    }
    if cuda_graph:
        trt["trt_cuda_graph_enable"] = "True"
    if cache_dir is not None:
        trt["trt_engine_cache_path"] = str(Path(cache_dir) / "ort_trt_cache")
        trt["trt_timing_cache_path"] = str(Path(cache_dir) / "ort_trt_cache")
    if profile is not None and input_shape:
        # One explicit shape profile from the target's batch sizes, like the native backend.
        dims = "x".join(str(d) for d in input_shape)
        lo, opt, hi = min(profile.batch_sizes), profile.budget_batch_size, profile.max_batch
        trt["trt_profile_min_shapes"] = f"{input_name}:{lo}x{dims}"
        trt["trt_profile_opt_shapes"] = f"{input_name}:{opt}x{dims}"
        trt["trt_profile_max_shapes"] = f"{input_name}:{hi}x{dims}"
    return [(PROVIDERS["tensorrt"], trt), cuda, PROVIDERS["cpu"]]


def _bound_step(
    session: onnxruntime.InferenceSession, artifact: Artifact, x: np.ndarray, *, device_id: int
) -> Callable[[], None]:
    """A step that runs with inputs and outputs already on the GPU (no copies in the timer)."""
    import numpy as np
    import onnxruntime as ort

    binding = session.io_binding()
    x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", device_id)
    binding.bind_ortvalue_input(artifact.input_name, x_dev)
    out = session.get_outputs()[0]
    shape = [x.shape[0] if not isinstance(d, int) else d for d in out.shape]
    out_dtype = np.dtype(_ORT_TYPES.get(out.type, "float32"))
    y_dev = ort.OrtValue.ortvalue_from_shape_and_type(shape, out_dtype, "cuda", device_id)
    binding.bind_ortvalue_output(artifact.output_name, y_dev)

    def step() -> None:
        # Synchronous: returns after the provider's stream is done with the run.
        session.run_with_iobinding(binding)

    # Keep the device buffers alive as long as the step (the binding holds raw pointers).
    step.buffers = (x_dev, y_dev)  # type: ignore[attr-defined]
    return step


def _tensorrt_libraries_found() -> bool:
    import ctypes.util

    return bool(ctypes.util.find_library("nvinfer")) or module_found("tensorrt_libs")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
