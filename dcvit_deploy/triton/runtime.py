"""The runtime settings a target profile measured with, as Triton config settings.

Triton must serve what was measured, so the settings in ``config.pbtxt`` come from the same
:class:`~dcvit_deploy.store.records.TargetProfile` the latency numbers came from: the backend's
validated ``[backend_options]`` (defaults filled in by the backend's own option table) and the
``[measure]`` settings.

* ``device = "cpu"`` -> ``instance_group { kind: KIND_CPU }``; ``"cuda"`` ->
  ``{ kind: KIND_GPU gpus: [device_id] }``.
* onnxruntime ``intra_op_num_threads`` / ``inter_op_num_threads`` -> ``parameters``
  ``intra_op_thread_count`` / ``inter_op_thread_count`` (0 is ONNX Runtime's default in both).
* onnxruntime ``execution_mode`` -> ``parameters { key: "execution_mode" }`` (0 / 1).
* onnxruntime ``graph_optimization_level`` -> ``optimization { graph { level } }``: basic -1,
  extended 1, disable 2; omitted for ``all``, the Triton backend's default.
* onnxruntime ``provider = "tensorrt"`` -> ``optimization { execution_accelerators {
  gpu_execution_accelerator [{ name: "tensorrt" ... }] } }`` with the workspace, builder
  optimisation level and min/opt/max shapes the measuring session used.
* tensorrt ``[measure] cuda_graphs`` -> ``optimization { cuda { graphs: true } }``, exactly
  when measured with CUDA graphs; onnxruntime with ``provider = "tensorrt"`` and
  ``[measure] cuda_graphs`` -> the accelerator's ``trt_cuda_graph_enable: "1"``.

Refused (:class:`ServingMismatch`, one line with a fix), because Triton cannot reproduce them:
ONNX Runtime's CUDA provider measured with CUDA graph capture (Triton's onnxruntime backend has
no such option for it). Profiles the backend itself refuses (``validate_profile``) raise its
:class:`~dcvit_deploy.errors.ProfileError`. Not mirrored, and recorded in
``notes``: I/O binding / ``no_copy`` (Triton always copies request tensors, so served latency
includes copies the measurement may have left out) and the TensorRT provider's engine and
timing cache paths (machine-local; they change load time, not latency).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.store.records import TargetProfile
from dcvit_deploy.triton.model_config import (
    GRAPH_LEVELS,
    Accelerator,
    Kind,
    NotServable,
    Platform,
    platform_for,
)

__all__ = ["ServingMismatch", "ServingSettings", "serving_settings"]

MIB = 1 << 20


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
    """The profile's ``[backend_options]``, validated by the backend (``validate_profile``),
    with the backend's defaults filled in."""
    from dcvit_deploy.backends import get_backend
    from dcvit_deploy.errors import BackendUnavailable

    # BackendBase.options validates against the backend's OPTIONS table (a ProfileError for a
    # bad option propagates). Publishing needs no runtime: a backend that cannot be loaded on
    # this machine, or one without ``options`` (not in the Backend protocol), passes the
    # profile's options through and the defaults below apply.
    try:
        backend = get_backend(profile.backend)
    except BackendUnavailable:
        return dict(profile.backend_options)
    # The backend's own profile check first: a profile it would refuse to measure (say, CUDA
    # graphs without bound buffers) has no measured settings to publish.
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
    """Triton settings for an artifact measured under ``profile``.

    ``artifact_input`` and ``item_shape`` (one item's shape, e.g. ``(3, 224, 224)``) give the
    TensorRT provider's shape profile, as the onnxruntime backend built it when measuring.
    Raises :class:`NotServable` for backends Triton cannot serve (``torch``) and
    :class:`ServingMismatch` for measured settings Triton cannot reproduce.
    """
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
