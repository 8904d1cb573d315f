"""Triton model configs: the artifact's I/O and Triton's ``ModelConfig`` built from it.

Every name, data type and shape in a config comes from the artifact: an ONNX file's graph, or
for a TensorRT plan the engine metadata JSON written next to it (``<plan>.json`` unless
``artifact.meta["engine_meta"]`` names another): ``io`` entries (name, mode, shape with ``-1``
dynamic, TensorRT/numpy/torch dtype names), the profile's max batch from ``max_batch``,
``profile_max_batch`` or ``settings.shape_profile.max[0]``, and the build facts. With
``max_batch_size > 0`` Triton owns the batch dimension (``dims`` exclude it; it must be
dynamic); ``max_batch_size: 0`` is written explicitly. onnx and tritonclient load on first use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dcvit_deploy.errors import UserInputError

__all__ = [
    "Accelerator",
    "ModelIO",
    "NotServable",
    "TensorSpec",
    "build_config",
    "config_text",
    "engine_meta_path",
    "platform_for",
    "read_engine_io",
    "read_onnx_io",
]

Platform = Literal["onnxruntime_onnx", "tensorrt_plan"]
Kind = Literal["KIND_GPU", "KIND_CPU"]

_PLATFORM_BY_BACKEND: dict[str, Platform] = {
    "onnxruntime": "onnxruntime_onnx",
    "ort": "onnxruntime_onnx",
    "onnx": "onnxruntime_onnx",
    "tensorrt": "tensorrt_plan",
    "trt": "tensorrt_plan",
}
_MODEL_SUFFIX: dict[str, str] = {"onnxruntime_onnx": ".onnx", "tensorrt_plan": ".plan"}

# ONNX TensorProto element type names -> Triton data types.
_ONNX_TYPES = {
    "FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
    "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "BOOL": "TYPE_BOOL", "STRING": "TYPE_STRING",
}  # fmt: skip
# Engine metadata dtype spellings (numpy, torch, TensorRT enum names) -> Triton data types.
_ENGINE_TYPES = {
    "float32": "TYPE_FP32", "fp32": "TYPE_FP32", "float": "TYPE_FP32", "float16": "TYPE_FP16",
    "fp16": "TYPE_FP16", "half": "TYPE_FP16", "bfloat16": "TYPE_BF16", "bf16": "TYPE_BF16",
    "int8": "TYPE_INT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}  # fmt: skip


# --------------------------------------------------------------------------- artifact I/O


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, Triton data type and full shape (``-1`` = dynamic)."""

    name: str
    data_type: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelIO:
    """An artifact's I/O; for engines the profile's ``max_batch`` (``None``: not limited) and
    ``facts`` (``tensorrt_version``, ``gpu``, ``compute_capability`` when known)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def tensor(self, name: str) -> TensorSpec | None:
        return next((t for t in (*self.inputs, *self.outputs) if t.name == name), None)


class NotServable(UserInputError):
    """The artifact's format has no Triton platform that serves it as it was measured."""


def platform_for(backend: str) -> Platform:
    """Triton platform for an artifact backend (or the ``triton_platform`` a plugin declares).
    ``torch`` is :class:`NotServable`: Triton's PyTorch backend loads TorchScript, not the
    measured ``torch.export`` program and its CUDA graph."""
    key = backend.lower()
    if key in ("torch", "pytorch"):
        raise NotServable(
            f"backend {backend!r} artifacts (torch.export programs, measured with the torch "
            "runtime) have no Triton platform that serves them as measured",
            "publish from an onnxruntime or tensorrt profile (e.g. ort-cuda, h100-trt-fp16); "
            "the torch measurements stay in the reports",
        )
    platform = _PLATFORM_BY_BACKEND.get(key) or _declared_platform(backend)
    if platform is None:
        raise NotServable(
            f"artifacts of backend {backend!r} cannot be served by Triton's ONNX Runtime or "
            "TensorRT platforms",
            "deploy an onnxruntime or tensorrt artifact",
        )
    return platform


def _declared_platform(backend: str) -> Platform | None:
    """The platform a plugin backend declares for its artifacts (its ``triton_platform``)."""
    from dcvit_deploy.backends import get_backend
    from dcvit_deploy.errors import DcvitError

    try:
        declared = getattr(get_backend(backend), "triton_platform", None)
    except DcvitError:
        return None
    return declared if declared in _MODEL_SUFFIX else None


def _load_onnx(path: str | os.PathLike[str]) -> Any:
    import onnx

    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise UserInputError(
            f"cannot read ONNX model {Path(path).name}: {exc}", "re-export the candidate"
        ) from exc


def read_onnx_io(path: str | os.PathLike[str], *, model: Any = None) -> ModelIO:
    """Graph inputs (minus initializers) and outputs of an ONNX file (or its loaded ``model``),
    weights not loaded."""
    import onnx

    if model is None:
        model = _load_onnx(path)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}

    def spec(value: Any) -> TensorSpec:
        if not value.type.HasField("tensor_type"):
            raise UserInputError(
                f"ONNX value {value.name!r} is not a tensor; Triton configs need tensor I/O",
                "export a model whose inputs and outputs are plain tensors",
            )
        tensor = value.type.tensor_type
        type_name = onnx.TensorProto.DataType.Name(tensor.elem_type)
        if type_name not in _ONNX_TYPES:
            raise UserInputError(
                f"ONNX tensor {value.name!r} has type {type_name}, which Triton cannot serve",
                "export with float32/float16 inputs and outputs",
            )
        if not tensor.HasField("shape"):
            raise UserInputError(
                f"ONNX tensor {value.name!r} has no shape",
                "export with shape information (run shape inference) before deploying",
            )
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSpec(value.name, _ONNX_TYPES[type_name], dims)

    inputs = tuple(spec(v) for v in graph.input if v.name not in initializers)
    outputs = tuple(spec(v) for v in graph.output)
    return ModelIO(inputs=inputs, outputs=outputs)


def _external_data_files(model: Any) -> list[str]:
    """Relative locations of an ONNX model's external-data tensors (they must travel with it)."""
    import onnx

    locations: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return sorted(locations)


def engine_meta_path(plan: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
    """Where a plan's engine metadata lives: ``meta["engine_meta"]`` or ``<plan>.json``."""
    plan = Path(plan)
    if meta and meta.get("engine_meta"):
        named = Path(str(meta["engine_meta"]))
        return named if named.is_absolute() else plan.parent / named
    return plan.with_name(plan.name + ".json")


def read_engine_io(meta_path: str | os.PathLike[str]) -> ModelIO:
    """I/O, profile max batch and build facts from a TensorRT engine metadata JSON."""
    meta_path = Path(meta_path)
    fix = "rebuild the engine with dcvit-deploy, which writes this file next to the plan"
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"engine metadata {meta_path.name} not found", fix) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"engine metadata {meta_path.name} is unreadable: {exc}", fix) from exc
    io = data.get("io")
    if not isinstance(io, list) or not io:
        raise UserInputError(f"engine metadata {meta_path.name} has no 'io' list", fix)
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for entry in io:
        try:
            name = str(entry["name"])
            shape = tuple(int(d) for d in entry["shape"])
            dtype = str(entry["dtype"]).lower().removeprefix("datatype.").removeprefix("torch.")
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(
                f"engine metadata {meta_path.name}: bad io entry {entry!r}", fix
            ) from exc
        if dtype not in _ENGINE_TYPES:
            raise UserInputError(
                f"engine tensor {name!r} has dtype {dtype!r}, which Triton cannot serve",
                "build the engine with float32/float16 I/O",
            )
        mode = str(entry.get("mode", "input" if entry.get("is_input") else "output")).lower()
        target = inputs if mode == "input" else outputs
        target.append(TensorSpec(name, _ENGINE_TYPES[dtype], shape))
    max_batch = data.get("max_batch", data.get("profile_max_batch"))
    if max_batch is None:
        profile_max = ((data.get("settings") or {}).get("shape_profile") or {}).get("max")
        if isinstance(profile_max, (list, tuple)) and profile_max:
            max_batch = profile_max[0]
    facts = {k: data[k] for k in ("tensorrt_version", "compute_capability") if k in data}
    if data.get("gpu", data.get("gpu_name")) is not None:
        facts["gpu"] = data.get("gpu", data.get("gpu_name"))
    return ModelIO(
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        max_batch=int(max_batch) if max_batch is not None else None,
        facts=facts,
    )


# --------------------------------------------------------------------------- config message


def _config_dims(spec: TensorSpec, max_batch_size: int, what: str) -> tuple[int, ...]:
    """Triton ``dims`` for ``spec``: without the batch dimension when Triton owns batching."""
    if max_batch_size == 0:
        if not spec.shape:
            raise UserInputError(
                f"{what} {spec.name!r} is a scalar", "export tensors with at least one dim"
            )
        return spec.shape
    if not spec.shape or spec.shape[0] != -1:
        batch = spec.shape[0] if spec.shape else "none"
        raise UserInputError(
            f"{what} {spec.name!r} has a static batch dimension ({batch}) but max_batch_size is "
            f"{max_batch_size}",
            "re-export with a dynamic batch axis, or write the repository with max_batch_size=0",
        )
    if len(spec.shape) < 2:
        raise UserInputError(
            f"{what} {spec.name!r} has only a batch dimension",
            "use max_batch_size=0 or export a [batch, n] tensor",
        )
    return spec.shape[1:]


@dataclass(frozen=True)
class Accelerator:
    """One ``optimization.execution_accelerators.gpu_execution_accelerator`` entry."""

    name: str
    parameters: tuple[tuple[str, str], ...] = ()


def build_config(
    model_name: str,
    platform: Platform,
    io: ModelIO,
    *,
    max_batch_size: int,
    instance_count: int = 1,
    kind: Kind = "KIND_GPU",
    gpus: Sequence[int] = (),
    dynamic_batching: bool = False,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 0,
    cuda_graphs: bool = False,
    warmup_batch_sizes: Sequence[int] = (),
    graph_level: int | None = None,
    gpu_accelerators: Sequence[Accelerator] = (),
    parameters: Mapping[str, str] | None = None,
) -> Any:
    """Triton's ``ModelConfig`` message for ``io`` with these settings, taken as given (the
    repository checks them against the artifact first); valid by construction."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    def tensors(specs: Iterable[TensorSpec], section: str) -> list[dict[str, Any]]:
        return [
            {
                "name": s.name,
                "data_type": s.data_type,
                "dims": list(_config_dims(s, max_batch_size, section)),
            }
            for s in specs
        ]

    optimization: dict[str, Any] = {}
    if graph_level is not None:
        optimization["graph"] = {"level": graph_level}
    if cuda_graphs:
        optimization["cuda"] = {"graphs": True}
    if gpu_accelerators:
        accelerators = [
            {"name": a.name, "parameters": dict(a.parameters)} for a in gpu_accelerators
        ]
        optimization["execution_accelerators"] = {"gpu_execution_accelerator": accelerators}
    warmups = [
        {
            "name": f"warmup_batch{batch}",
            "batch_size": batch if max_batch_size > 0 else 1,
            "inputs": {
                s.name: {
                    "data_type": s.data_type,
                    "dims": list(_warmup_dims(s, max_batch_size, batch)),
                    "random_data": True,
                }
                for s in io.inputs
            },
        }
        for batch in warmup_batch_sizes
    ]
    config: dict[str, Any] = {
        "name": model_name,
        "platform": platform,
        "max_batch_size": max_batch_size,
        "input": tensors(io.inputs, "input"),
        "output": tensors(io.outputs, "output"),
        "instance_group": [{"count": instance_count, "kind": kind, "gpus": list(gpus)}],
        "parameters": {k: {"string_value": v} for k, v in (parameters or {}).items()},
        "model_warmup": warmups,
    }
    if dynamic_batching:
        config["dynamic_batching"] = {
            "preferred_batch_size": list(preferred_batch_sizes),
            "max_queue_delay_microseconds": max_queue_delay_us,
        }
    if optimization:
        config["optimization"] = optimization
    return json_format.ParseDict(config, model_config_pb2.ModelConfig())


def config_text(config: Any) -> str:
    """Deterministic ``config.pbtxt`` text of a ``ModelConfig``; ``max_batch_size: 0`` is
    written although proto3's default (without it, Triton's auto-complete may pick a batch)."""
    from google.protobuf import text_format

    text = text_format.MessageToString(config)
    if config.max_batch_size == 0:
        text = text.replace("\ninput {", "\nmax_batch_size: 0\ninput {", 1)
    return text


def _warmup_dims(spec: TensorSpec, max_batch_size: int, batch: int) -> tuple[int, ...]:
    dims = _config_dims(spec, max_batch_size, "input")
    if max_batch_size == 0 and dims and dims[0] == -1:
        dims = (batch, *dims[1:])
    return dims


def _static_for_warmup(io: ModelIO, max_batch_size: int) -> bool:
    return all(d > 0 for spec in io.inputs for d in _warmup_dims(spec, max_batch_size, 1))


def parse_config(text: str) -> Any:
    """Config text as Triton's ``ModelConfig``; :class:`UserInputError` when it is not one."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise UserInputError(
            f"not a valid Triton ModelConfig: {exc}", "fix or remove the config.pbtxt"
        ) from exc


def version_dirs(model_dir: Path) -> list[Path]:
    """The numeric version folders of a model directory, oldest first."""
    if not model_dir.is_dir():
        return []
    return sorted(
        (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0),
        key=lambda p: int(p.name),
    )
