"""Triton model configs: the artifact's I/O, the ``config.pbtxt`` text, and its validation.

Every input/output name, data type and shape in a config comes from the artifact itself:
an ONNX file's graph inputs/outputs, or, for a TensorRT plan (which cannot be inspected without
TensorRT), the engine metadata JSON the engine builder writes next to the plan. That file is
``<plan>.json`` (e.g. ``c60.plan.json``, as the TensorRT backend writes it) unless
``artifact.meta["engine_meta"]`` names another file. The fields read::

    {"tensorrt_version": "10.13.0", "gpu_name": "NVIDIA H100 80GB HBM3",
     "compute_capability": "9.0",
     "settings": {"shape_profile": {"max": [8, 3, 224, 224], ...}, ...},
     "io": [{"name": "input", "mode": "input", "shape": [-1, 3, 224, 224], "dtype": "half"},
            {"name": "logits", "mode": "output", "shape": [-1, 1000], "dtype": "half"}]}

The profile's largest batch is ``settings.shape_profile.max[0]``; a top-level ``max_batch``
(or ``profile_max_batch``) overrides it, and ``gpu`` is accepted for ``gpu_name``. ``-1``
marks a dynamic dimension; dtypes may be TensorRT (``float``/``half``), numpy or torch
names.

With ``max_batch_size > 0`` Triton owns the batch dimension: ``dims`` exclude it and the
artifact's first dimension must be dynamic. With ``max_batch_size: 0`` (written explicitly)
``dims`` are the full shape. onnx and tritonclient are imported lazily; without tritonclient
:func:`validate_config` reports ``skipped`` instead of pretending to have validated.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dcvit_deploy.errors import UserInputError

__all__ = [
    "Accelerator",
    "ConfigCheck",
    "ModelIO",
    "NotServable",
    "TensorSpec",
    "engine_meta_path",
    "platform_for",
    "read_engine_io",
    "read_onnx_io",
    "render_config",
    "validate_config",
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
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "BOOL": "TYPE_BOOL",
    "STRING": "TYPE_STRING",
}
# Engine metadata dtype spellings (numpy, torch, TensorRT enum names) -> Triton data types.
_ENGINE_TYPES = {
    "float32": "TYPE_FP32",
    "fp32": "TYPE_FP32",
    "float": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "fp16": "TYPE_FP16",
    "half": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "bf16": "TYPE_BF16",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# --------------------------------------------------------------------------- artifact I/O


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, Triton data type and full shape (``-1`` = dynamic)."""

    name: str
    data_type: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelIO:
    """The I/O of an artifact and, for engines, the facts a deployment must match.

    ``max_batch`` is the engine profile's largest batch (``None``: not limited by the file).
    ``facts`` holds ``tensorrt_version``, ``gpu`` and ``compute_capability`` when known.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def tensor(self, name: str) -> TensorSpec | None:
        return next((t for t in (*self.inputs, *self.outputs) if t.name == name), None)


class NotServable(UserInputError):
    """The artifact's format has no Triton platform that serves it as it was measured."""


def platform_for(backend: str) -> Platform:
    """Triton platform for an artifact backend name (``onnxruntime`` or ``tensorrt``, or the
    ``triton_platform`` a plugin backend declares).

    ``torch`` artifacts are refused with :class:`NotServable`: the torch backend stores a
    ``torch.export`` program (``.pt2``) and measures it op by op, cast to the profile's precision
    and replayed from a CUDA graph; Triton's PyTorch backend loads TorchScript and runs neither
    that program nor its CUDA graph, so a published model would not be the one measured.
    """
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
    """Graph inputs (minus initializers) and outputs of an ONNX file, weights not loaded.

    ``model`` may pass an already loaded ``onnx.ModelProto`` of ``path``.
    """
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


# --------------------------------------------------------------------------- config text


def _quote(text: str) -> str:
    if any(ord(c) < 32 for c in text):
        raise UserInputError(f"name {text!r} contains control characters", "rename the tensor")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dims(values: Iterable[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


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


def _block(name: str, body: list[str], indent: str) -> list[str]:
    return [f"{indent}{name} {{", *body, f"{indent}}}"]


def render_config(
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
    default_model_filename: str | None = None,
    latest_versions: int | None = None,
    graph_level: int | None = None,
    gpu_accelerators: Sequence[Accelerator] = (),
    parameters: Mapping[str, str] | None = None,
    comment: str = "",
) -> str:
    """Deterministic ``config.pbtxt`` text (no timestamps; same inputs give the same bytes).

    Settings are taken as given; the repository writers decide them (from the target profile)
    and check them against the artifact first. ``latest_versions``: write
    ``version_policy { latest { num_versions: N } }``. ``graph_level``: the onnxruntime
    backend's ``optimization { graph { level } }``. ``parameters``: model-level string
    parameters (the onnxruntime backend's thread counts, execution mode), sorted by key.
    """
    lines: list[str] = []
    if comment:
        lines += [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += [
        f"name: {_quote(model_name)}",
        f"platform: {_quote(platform)}",
        f"max_batch_size: {max_batch_size}",
    ]
    if default_model_filename:
        lines.append(f"default_model_filename: {_quote(default_model_filename)}")
    if latest_versions is not None:
        lines += _block(
            "version_policy",
            _block("latest", [f"    num_versions: {latest_versions}"], "  "),
            "",
        )
    for section, specs in (("input", io.inputs), ("output", io.outputs)):
        lines.append(f"{section} [")
        for i, spec in enumerate(specs):
            lines += [
                "  {",
                f"    name: {_quote(spec.name)}",
                f"    data_type: {spec.data_type}",
                f"    dims: {_dims(_config_dims(spec, max_batch_size, section))}",
                "  }" + ("," if i < len(specs) - 1 else ""),
            ]
        lines.append("]")
    lines += ["instance_group [", "  {", f"    count: {instance_count}", f"    kind: {kind}"]
    if gpus:
        lines.append(f"    gpus: {_dims(gpus)}")
    lines += ["  }", "]"]
    if dynamic_batching:
        lines.append("dynamic_batching {")
        if preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: {_dims(preferred_batch_sizes)}")
        if max_queue_delay_us:
            lines.append(f"  max_queue_delay_microseconds: {max_queue_delay_us}")
        lines.append("}")
    optimization: list[str] = []
    if graph_level is not None:
        optimization += _block("graph", [f"    level: {graph_level}"], "  ")
    if cuda_graphs:
        optimization += _block("cuda", ["    graphs: true"], "  ")
    if gpu_accelerators:
        entries: list[str] = []
        for i, acc in enumerate(gpu_accelerators):
            entries += ["      {", f"        name: {_quote(acc.name)}"]
            for key, value in acc.parameters:
                entries.append(
                    f"        parameters {{ key: {_quote(key)} value: {_quote(value)} }}"
                )
            entries.append("      }" + ("," if i < len(gpu_accelerators) - 1 else ""))
        optimization += _block(
            "execution_accelerators",
            ["    gpu_execution_accelerator [", *entries, "    ]"],
            "  ",
        )
    if optimization:
        lines += _block("optimization", optimization, "")
    for key in sorted(parameters or {}):
        value = (parameters or {})[key]
        lines.append(
            f"parameters {{ key: {_quote(key)} value {{ string_value: {_quote(value)} }} }}"
        )
    if warmup_batch_sizes:
        lines.append("model_warmup [")
        for i, batch in enumerate(warmup_batch_sizes):
            lines += ["  {", f'    name: "warmup_batch{batch}"']
            lines.append(f"    batch_size: {batch if max_batch_size > 0 else 1}")
            for spec in io.inputs:
                dims = _warmup_dims(spec, max_batch_size, batch)
                lines += [
                    "    inputs {",
                    f"      key: {_quote(spec.name)}",
                    "      value {",
                    f"        data_type: {spec.data_type}",
                    f"        dims: {_dims(dims)}",
                    "        random_data: true",
                    "      }",
                    "    }",
                ]
            lines.append("  }" + ("," if i < len(warmup_batch_sizes) - 1 else ""))
        lines.append("]")
    return "\n".join(lines) + "\n"


def _warmup_dims(spec: TensorSpec, max_batch_size: int, batch: int) -> tuple[int, ...]:
    dims = _config_dims(spec, max_batch_size, "input")
    if max_batch_size == 0 and dims and dims[0] == -1:
        dims = (batch, *dims[1:])
    return dims


def _static_for_warmup(io: ModelIO, max_batch_size: int) -> bool:
    return all(d > 0 for spec in io.inputs for d in _warmup_dims(spec, max_batch_size, 1))


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ConfigCheck:
    """Outcome of :func:`validate_config`: ``ok``, ``failed`` (see messages) or ``skipped``."""

    status: Literal["ok", "failed", "skipped"]
    messages: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _parse(text: str) -> tuple[Any, ConfigCheck | None]:
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None, ConfigCheck(
            "skipped",
            (
                "skipped: tritonclient not installed; pip install 'tritonclient[grpc]' to validate "
                "configs against Triton's schema",
            ),
        )
    try:
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        return None, ConfigCheck("failed", (f"not a valid Triton ModelConfig: {exc}",))
    return config, None


def parse_config(text: str) -> Any:
    """Parse config text into Triton's ``ModelConfig`` message; ``None`` without tritonclient.

    Raises :class:`UserInputError` when the text is not a valid ModelConfig.
    """
    config, early = _parse(text)
    if early is not None and early.status == "failed":
        raise UserInputError(early.messages[0], "fix or remove the config.pbtxt")
    return config


def _schema_check(text: str) -> ConfigCheck:
    config, early = _parse(text)
    if early is not None:
        return early
    problems = _semantic_problems(config)
    return ConfigCheck("failed", tuple(problems)) if problems else ConfigCheck("ok")


# The onnxruntime backend's graph levels: -1 basic, 1 extended, 2 disabled, absent/0 all.
GRAPH_LEVELS = {"basic": -1, "extended": 1, "disable": 2}
_ORT_INT_PARAMETERS = ("intra_op_thread_count", "inter_op_thread_count")
_ORT_ACCELERATORS = ("tensorrt", "cuda")


def _tensor_problems(section: str, tensors: Any, mbs: int) -> list[str]:
    from tritonclient.grpc import model_config_pb2

    problems: list[str] = []
    seen: set[str] = set()
    for t in tensors:
        if not t.name:
            problems.append(f"a model {section} has no name")
        elif t.name in seen:
            problems.append(f"model {section} {t.name!r} is declared more than once")
        seen.add(t.name)
        if t.data_type == model_config_pb2.TYPE_INVALID:
            problems.append(f"model {section} {t.name!r} must specify data_type")
        dims = list(t.dims)
        if not dims and not t.HasField("reshape"):
            problems.append(f"model {section} {t.name!r} must specify dims")
        bad = [d for d in dims if d == 0 or d < -1]
        if bad:
            problems.append(
                f"model {section} {t.name!r} has invalid dims {dims}: each must be >= 1 or -1"
            )
        if mbs == 0 and getattr(t, "allow_ragged_batch", False):
            problems.append(f"model {section} {t.name!r} allows ragged batch without batching")
    return problems


def _semantic_problems(config: Any) -> list[str]:
    """Rules Triton enforces when it loads a model (or that this project relies on)."""
    from tritonclient.grpc import model_config_pb2

    problems: list[str] = []
    mbs = config.max_batch_size
    platform = config.platform
    if platform not in _MODEL_SUFFIX:
        problems.append(f"platform {platform!r} is not onnxruntime_onnx or tensorrt_plan")
    if mbs < 0:
        problems.append(f"max_batch_size must be >= 0, not {mbs}")
    if config.HasField("dynamic_batching"):
        if mbs == 0:
            problems.append("dynamic_batching needs max_batch_size > 0")
        big = [b for b in config.dynamic_batching.preferred_batch_size if b > mbs]
        if big and mbs > 0:
            problems.append(f"preferred_batch_size {big} exceeds max_batch_size {mbs}")
        small = [b for b in config.dynamic_batching.preferred_batch_size if b < 1]
        if small:
            problems.append(f"preferred_batch_size {small} must be >= 1")
    if not config.input or not config.output:
        problems.append("the config must list inputs and outputs")
    problems += _tensor_problems("input", config.input, mbs)
    problems += _tensor_problems("output", config.output, mbs)

    policy = config.version_policy
    which = policy.WhichOneof("policy_choice") if config.HasField("version_policy") else None
    if which == "latest" and policy.latest.num_versions < 1:
        problems.append("version_policy latest needs num_versions >= 1")
    if which == "specific" and any(v < 1 for v in policy.specific.versions):
        problems.append(f"version_policy specific versions {list(policy.specific.versions)} < 1")

    kinds = model_config_pb2.ModelInstanceGroup.Kind
    for i, group in enumerate(config.instance_group):
        label = group.name or f"{config.name or 'model'}_{i}"
        if group.count < 0:
            problems.append(f"instance group {label} has count {group.count}; use >= 1")
        if group.kind == kinds.Value("KIND_CPU") and len(group.gpus):
            problems.append(f"instance group {label} has kind KIND_CPU but lists gpus")
        negative = [g for g in group.gpus if g < 0]
        if negative:
            problems.append(f"instance group {label} lists invalid gpu ids {negative}")
        if group.kind == kinds.Value("KIND_CPU") and platform == "tensorrt_plan":
            problems.append(f"instance group {label}: a TensorRT plan cannot run on KIND_CPU")
        for p in group.profile:
            if not p.isdigit():
                problems.append(
                    f"instance group {label} names optimisation profile {p!r}; profiles are "
                    "engine profile indices ('0', '1', ...)"
                )
        if group.profile and platform != "tensorrt_plan":
            problems.append(f"instance group {label} selects engine profiles on {platform}")

    opt = config.optimization
    if opt.cuda.graphs and platform != "tensorrt_plan":
        problems.append(
            "optimization.cuda.graphs is only honoured by Triton's TensorRT backend, "
            f"not {platform}"
        )
    if opt.HasField("graph") and platform != "onnxruntime_onnx":
        problems.append(f"optimization.graph.level is an onnxruntime setting, not for {platform}")
    if opt.HasField("graph") and opt.graph.level not in (-1, 0, 1, 2):
        problems.append(
            f"optimization.graph.level {opt.graph.level} is not -1 (basic), 0 (all), "
            "1 (extended) or 2 (disabled)"
        )
    accelerators = opt.execution_accelerators.gpu_execution_accelerator
    if accelerators and platform != "onnxruntime_onnx":
        problems.append(f"gpu_execution_accelerator is an onnxruntime setting, not for {platform}")
    for acc in accelerators:
        if platform == "onnxruntime_onnx" and acc.name not in _ORT_ACCELERATORS:
            problems.append(f"unknown gpu_execution_accelerator {acc.name!r}; use tensorrt or cuda")
    if (
        accelerators
        and config.instance_group
        and all(g.kind == kinds.Value("KIND_CPU") for g in config.instance_group)
    ):
        problems.append("gpu_execution_accelerator given but every instance group is KIND_CPU")

    if platform == "onnxruntime_onnx":
        for key in _ORT_INT_PARAMETERS:
            if key in config.parameters:
                value = config.parameters[key].string_value
                if not value.isdigit():
                    problems.append(
                        f"parameter {key} must be a non-negative integer, not {value!r}"
                    )
        if "execution_mode" in config.parameters:
            value = config.parameters["execution_mode"].string_value
            if value not in ("0", "1"):
                problems.append(f"parameter execution_mode must be 0 or 1, not {value!r}")

    input_names = {t.name for t in config.input}
    for warm in config.model_warmup:
        if mbs > 0 and not 1 <= warm.batch_size <= mbs:
            problems.append(f"warm-up {warm.name!r} batch_size {warm.batch_size} not in 1..{mbs}")
        unknown = set(warm.inputs) - input_names
        if unknown:
            problems.append(f"warm-up {warm.name!r} feeds unknown inputs {sorted(unknown)}")
    return problems


def _config_source(
    config: str | os.PathLike[str],
) -> tuple[str | None, Path | None, ConfigCheck | None]:
    if isinstance(config, str) and any(c in config for c in "\n{:") and not os.path.exists(config):
        return config, None, None
    path = Path(config)
    if path.is_dir():
        path = path / "config.pbtxt"
    try:
        return path.read_text(encoding="utf-8"), path, None
    except OSError as exc:
        return None, path, ConfigCheck("failed", (f"cannot read {path.name}: {exc}",))


def validate_config(
    config: str | os.PathLike[str], *, model_dir: str | os.PathLike[str] | None = None
) -> ConfigCheck:
    """Validate a Triton config: schema, semantics and agreement with the model files.

    ``config`` is config text, a ``config.pbtxt`` / ``configs/<name>.pbtxt`` path, or a model
    directory. The text is parsed into Triton's own ``ModelConfig`` protobuf (from
    ``tritonclient[grpc]``); without it the result is ``skipped``, never ``ok``. Then the rules
    Triton applies when loading are checked (data types, dims, duplicate names, batching,
    instance groups, version policy, platform-specific optimisation settings). With a model
    directory (given, or derived from the path) it also checks: ``name`` matches the directory,
    each numeric version folder holds the model file, and every input/output name, data type
    and dims agree with the model file (ONNX graph) or, for plans, the I/O recorded in the
    deploy facts (``<version>/deploy.json``, else the model's ``deploy.json``), including that
    instance groups only select optimisation profiles the engine has. Never raises for an
    invalid config; the messages say what is wrong.
    """
    text, path, early = _config_source(config)
    if early is not None:
        return early
    assert text is not None
    parsed, early = _parse(text)
    if early is not None:
        return early
    problems = _semantic_problems(parsed)
    if model_dir is None and path is not None:
        model_dir = path.parent.parent if path.parent.name == "configs" else path.parent
    if model_dir is not None:
        problems += _model_dir_problems(parsed, Path(model_dir), path)
    return ConfigCheck("failed", tuple(problems)) if problems else ConfigCheck("ok")


def version_dirs(model_dir: Path) -> list[Path]:
    """The numeric version folders of a model directory, oldest first."""
    if not model_dir.is_dir():
        return []
    return sorted(
        (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0),
        key=lambda p: int(p.name),
    )


def _model_dir_problems(config: Any, model_dir: Path, config_path: Path | None) -> list[str]:
    problems: list[str] = []
    if config.name and config.name != model_dir.name:
        problems.append(f"config name {config.name!r} != model directory {model_dir.name!r}")
    suffix = _MODEL_SUFFIX.get(config.platform)
    if suffix is None:
        return problems
    file_name = config.default_model_filename or f"model{suffix}"
    versions = version_dirs(model_dir)
    if not versions:
        problems.append(f"no numeric version folder in {model_dir.name}/")
        return problems
    for vdir in versions:
        model_file = vdir / file_name
        if not model_file.is_file():
            problems.append(f"{vdir.name}/{file_name} is missing")
            continue
        io = _io_for_check(config.platform, model_file, model_dir, config_path)
        if isinstance(io, str):
            problems.append(io)
            continue
        problems += _io_problems(config, io, f"{vdir.name}/{file_name}")
    return problems


def _io_for_check(
    platform: str, model_file: Path, model_dir: Path, config_path: Path | None
) -> ModelIO | str:
    if platform == "onnxruntime_onnx":
        try:
            return read_onnx_io(model_file)
        except UserInputError as exc:
            return exc.one_line()
    # A plan cannot be opened without TensorRT: use the I/O recorded when it was written.
    if config_path is not None and config_path.parent.name == "configs":
        deploy = config_path.with_name(config_path.stem + ".deploy.json")
    elif (model_file.parent / "deploy.json").is_file():
        deploy = model_file.parent / "deploy.json"
    else:
        deploy = model_dir / "deploy.json"
    try:
        data = json.loads(deploy.read_text(encoding="utf-8"))
        return ModelIO(
            inputs=tuple(
                TensorSpec(t["name"], t["data_type"], tuple(t["shape"])) for t in data["inputs"]
            ),
            outputs=tuple(
                TensorSpec(t["name"], t["data_type"], tuple(t["shape"])) for t in data["outputs"]
            ),
            max_batch=data.get("engine_profile_max_batch"),
            facts={"profiles": int(data.get("engine_profiles", 1))},
        )
    except (OSError, KeyError, TypeError, ValueError) as exc:
        return f"cannot read the plan's recorded I/O from {deploy.name}: {exc}"


def _io_problems(config: Any, io: ModelIO, where: str) -> list[str]:
    from tritonclient.grpc import model_config_pb2

    problems: list[str] = []
    mbs = config.max_batch_size
    if io.max_batch is not None and mbs > io.max_batch:
        problems.append(f"max_batch_size {mbs} exceeds the engine profile max {io.max_batch}")
    profiles = io.facts.get("profiles")
    if profiles is not None:
        for group in config.instance_group:
            missing = [p for p in group.profile if p.isdigit() and int(p) >= profiles]
            if missing:
                problems.append(
                    f"instance group selects optimisation profiles {missing}, but {where} has "
                    f"{profiles} profile(s)"
                )
    for section, declared, actual in (
        ("input", config.input, io.inputs),
        ("output", config.output, io.outputs),
    ):
        by_name = {t.name: t for t in actual}
        names = {t.name for t in declared}
        if names != set(by_name):
            problems.append(
                f"{section} names {sorted(names)} != {where} {section}s {sorted(by_name)}"
            )
        for t in declared:
            spec = by_name.get(t.name)
            if spec is None:
                continue
            dtype = model_config_pb2.DataType.Name(t.data_type)
            if dtype != spec.data_type:
                problems.append(f"{section} {t.name!r}: data_type {dtype} != {spec.data_type}")
            try:
                expected = _config_dims(spec, mbs, section)
            except UserInputError as exc:
                problems.append(exc.one_line())
                continue
            dims = tuple(t.dims)
            if len(dims) != len(expected) or any(
                e != -1 and d != e for d, e in zip(dims, expected, strict=False)
            ):
                problems.append(
                    f"{section} {t.name!r}: dims {list(dims)} do not match {where} {list(expected)}"
                )
    return problems
