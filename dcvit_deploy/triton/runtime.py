"""The runtime settings a target profile measured with, as Triton config settings.

Triton must serve what was measured: the device becomes the instance group; ONNX Runtime's
thread counts and execution mode become ``parameters``, its graph level ``optimization.graph``,
its TensorRT provider (workspace, builder level, the measuring session's shape profile, CUDA
graphs) a GPU execution accelerator; TensorRT's CUDA graphs ``optimization.cuda.graphs``.
ONNX Runtime's CUDA provider measured with CUDA graphs is refused (:class:`ServingMismatch`:
Triton has no such option); what Triton cannot mirror (bound I/O, no spinning, the provider's
caches) is recorded in ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.store.records import TargetProfile
from dcvit_deploy.triton.model_config import Accelerator, Kind, NotServable, Platform, platform_for

__all__ = ["ServingMismatch", "ServingSettings", "serving_settings"]

MIB = 1 << 20
# The onnxruntime backend's graph levels: -1 basic, 1 extended, 2 disabled, absent/0 all.
GRAPH_LEVELS = {"basic": -1, "extended": 1, "disable": 2}


class ServingMismatch(UserInputError):
    """The profile measured a runtime setting Triton cannot reproduce."""


@dataclass(frozen=True)
class ServingSettings:
    """Triton config settings equal to what ``profile`` measured (see the module table)."""

    platform: Platform
    kind: Kind
    gpus: tuple[int, ...]
    cuda_graphs: bool
    graph_level: int | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    gpu_accelerators: tuple[Accelerator, ...] = ()
    notes: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """Plain-JSON summary for the deploy facts."""
        return {
            "platform": self.platform,
            "kind": self.kind,
            "gpus": list(self.gpus),
            "cuda_graphs": self.cuda_graphs,
            "graph_level": self.graph_level,
            "parameters": dict(self.parameters),
            "gpu_accelerators": [
                {"name": a.name, "parameters": dict(a.parameters)} for a in self.gpu_accelerators
            ],
            "notes": list(self.notes),
        }


def backend_options(profile: TargetProfile) -> dict[str, Any]:
    """The profile's ``[backend_options]``, validated by the backend (a profile it would refuse
    to measure has no settings to publish), defaults filled in; passed through as given when
    the backend cannot be loaded here or has no ``options`` (publishing needs no runtime)."""
    from dcvit_deploy.backends import get_backend
    from dcvit_deploy.errors import BackendUnavailable

    try:
        backend = get_backend(profile.backend)
    except BackendUnavailable:
        return dict(profile.backend_options)
    validate = getattr(backend, "validate_profile", None)
    if callable(validate):
        validate(profile)
    options = getattr(backend, "options", None)
    if callable(options):
        return dict(options(profile))
    return dict(profile.backend_options)


def serving_settings(
    profile: TargetProfile, *, artifact_input: str = "input", item_shape: tuple[int, ...] = ()
) -> ServingSettings:
    """Triton settings for an artifact measured under ``profile``; ``artifact_input`` and
    ``item_shape`` (e.g. ``(3, 224, 224)``) give the TensorRT provider's shape profile."""
    platform = platform_for(profile.backend)
    opts = backend_options(profile)
    gpu = profile.device == "cuda"
    kind: Kind = "KIND_GPU" if gpu else "KIND_CPU"
    gpus = (int(opts.get("device_id", 0)),) if gpu else ()
    measure = profile.measure
    notes: list[str] = []
    if platform == "tensorrt_plan":
        if not gpu:
            raise NotServable(
                f"profile {profile.name!r} is a TensorRT profile on device 'cpu'",
                "use device = 'cuda' for TensorRT profiles",
            )
        if measure.no_copy:
            notes.append(
                "measured without host<->device copies; Triton copies request tensors, so "
                "served latency includes them"
            )
        return ServingSettings(
            platform=platform,
            kind=kind,
            gpus=gpus,
            cuda_graphs=bool(measure.cuda_graphs),
            notes=tuple(notes),
        )

    provider = str(opts.get("provider", "auto"))
    if provider == "auto":
        provider = "cuda" if gpu else "cpu"
    bound = provider != "cpu" and bool(opts.get("io_binding", True)) and measure.no_copy
    if provider == "cuda" and measure.cuda_graphs and bound:
        raise ServingMismatch(
            f"profile {profile.name!r} measured ONNX Runtime's CUDA provider with CUDA graph "
            "capture, which Triton's onnxruntime backend does not offer, so the served latency "
            "would differ",
            "set [measure] cuda_graphs = false in the profile and re-measure, or use provider "
            "'tensorrt' or a tensorrt profile",
        )
    if bound:
        notes.append(
            "measured with I/O bound on the device (no copies); Triton copies request tensors, "
            "so served latency includes them"
        )
    parameters = {
        "intra_op_thread_count": str(int(opts.get("intra_op_num_threads", 0))),
        "inter_op_thread_count": str(int(opts.get("inter_op_num_threads", 0))),
        "execution_mode": "1" if opts.get("execution_mode") == "parallel" else "0",
    }
    if not opts.get("allow_spinning", True):
        notes.append(
            "measured with ONNX Runtime thread spinning off; Triton's onnxruntime backend has no "
            "parameter for it and serves with ONNX Runtime's default (spinning on)"
        )
    level_name = str(opts.get("graph_optimization_level", "all"))
    graph_level = GRAPH_LEVELS.get(level_name)  # None for "all": the backend's default
    accelerators: tuple[Accelerator, ...] = ()
    if provider == "tensorrt":
        trt: dict[str, str] = {
            "max_workspace_size_bytes": str(int(opts.get("trt_workspace_mib", 4096)) * MIB),
            "trt_builder_optimization_level": str(
                int(opts.get("trt_builder_optimization_level", 3))
            ),
        }
        if item_shape:
            dims = "x".join(str(int(d)) for d in item_shape)
            lo, opt, hi = min(profile.batch_sizes), profile.budget_batch_size, profile.max_batch
            trt["trt_profile_min_shapes"] = f"{artifact_input}:{lo}x{dims}"
            trt["trt_profile_opt_shapes"] = f"{artifact_input}:{opt}x{dims}"
            trt["trt_profile_max_shapes"] = f"{artifact_input}:{hi}x{dims}"
        if measure.cuda_graphs and bound:
            # The measuring session captured through the provider (trt_cuda_graph_enable).
            trt["trt_cuda_graph_enable"] = "1"
            notes.append(
                "CUDA graphs: Triton passes trt_cuda_graph_enable to the TensorRT provider, but "
                "binds each request's buffers, not the fixed ones the graph was measured with; "
                "confirm the served latency with perf_analyzer"
            )
        accelerators = (Accelerator("tensorrt", tuple(sorted(trt.items()))),)
        notes.append(
            "the TensorRT provider's engine/timing caches are not configured (machine-local "
            "paths; they change model load time, not latency)"
        )
    return ServingSettings(
        platform=platform,
        kind=kind,
        gpus=gpus,
        cuda_graphs=False,
        graph_level=graph_level,
        parameters=parameters,
        gpu_accelerators=accelerators,
        notes=tuple(notes),
    )
