"""Triton Inference Server model repository writer and config validator.

Layout written by :func:`write_model_repository`::

    <repo>/<model>/config.pbtxt            (or configs/<config_name>.pbtxt, per-GPU)
    <repo>/<model>/<version>/model.onnx    (ONNX Runtime)  | model.plan (TensorRT)
    <repo>/<model>/deploy.json             (or configs/<config_name>.deploy.json)

Every input/output name, data type and shape in the config comes from the artifact itself:
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
names. A plan only loads in a Triton whose TensorRT version matches the builder's, so the
version, GPU and compute capability go to ``deploy.json``.

With ``max_batch_size > 0`` Triton owns the batch dimension: ``dims`` exclude it and the
artifact's first dimension must be dynamic. With ``max_batch_size: 0`` (written explicitly)
``dims`` are the full shape. onnx and tritonclient are imported lazily; without tritonclient
:func:`validate_config` reports ``skipped`` instead of pretending to have validated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import __version__
from .atomic import atomic_write_json, atomic_write_text, atomic_write_with, sha256_file
from .errors import UserInputError
from .records import SCHEMA_VERSION, Artifact, LatencyStats, to_dict

__all__ = [
    "ConfigCheck",
    "ModelIO",
    "TensorSpec",
    "engine_meta_path",
    "platform_for",
    "read_engine_io",
    "read_onnx_io",
    "render_config",
    "validate_config",
    "write_model_repository",
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


def platform_for(backend: str) -> Platform:
    """Triton platform for an artifact backend name (``onnxruntime`` or ``tensorrt``)."""
    try:
        return _PLATFORM_BY_BACKEND[backend.lower()]
    except KeyError:
        raise UserInputError(
            f"artifacts of backend {backend!r} cannot be served by Triton's ONNX Runtime or "
            "TensorRT platforms",
            "deploy an onnxruntime or tensorrt artifact",
        ) from None


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
class _Settings:
    max_batch_size: int
    instance_count: int
    kind: Kind
    gpus: tuple[int, ...]
    dynamic_batching: bool
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    cuda_graphs: bool
    warmup_batch_sizes: tuple[int, ...]
    default_model_filename: str | None


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
    comment: str = "",
) -> str:
    """Deterministic ``config.pbtxt`` text (no timestamps; same inputs give the same bytes).

    Settings are taken as given; :func:`write_model_repository` decides defaults and checks
    them against the artifact first.
    """
    s = _Settings(
        max_batch_size=max_batch_size,
        instance_count=instance_count,
        kind=kind,
        gpus=tuple(gpus),
        dynamic_batching=dynamic_batching,
        preferred_batch_sizes=tuple(preferred_batch_sizes),
        max_queue_delay_us=max_queue_delay_us,
        cuda_graphs=cuda_graphs,
        warmup_batch_sizes=tuple(warmup_batch_sizes),
        default_model_filename=default_model_filename,
    )
    lines: list[str] = []
    if comment:
        lines += [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += [
        f"name: {_quote(model_name)}",
        f"platform: {_quote(platform)}",
        f"max_batch_size: {s.max_batch_size}",
    ]
    if s.default_model_filename:
        lines.append(f"default_model_filename: {_quote(s.default_model_filename)}")
    for section, specs in (("input", io.inputs), ("output", io.outputs)):
        lines.append(f"{section} [")
        for i, spec in enumerate(specs):
            lines += [
                "  {",
                f"    name: {_quote(spec.name)}",
                f"    data_type: {spec.data_type}",
                f"    dims: {_dims(_config_dims(spec, s.max_batch_size, section))}",
                "  }" + ("," if i < len(specs) - 1 else ""),
            ]
        lines.append("]")
    lines += ["instance_group [", "  {", f"    count: {s.instance_count}", f"    kind: {s.kind}"]
    if s.gpus:
        lines.append(f"    gpus: {_dims(s.gpus)}")
    lines += ["  }", "]"]
    if s.dynamic_batching:
        lines.append("dynamic_batching {")
        if s.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: {_dims(s.preferred_batch_sizes)}")
        if s.max_queue_delay_us:
            lines.append(f"  max_queue_delay_microseconds: {s.max_queue_delay_us}")
        lines.append("}")
    if s.cuda_graphs:
        lines += ["optimization {", "  cuda {", "    graphs: true", "  }", "}"]
    if s.warmup_batch_sizes:
        lines.append("model_warmup [")
        for i, batch in enumerate(s.warmup_batch_sizes):
            lines += ["  {", f'    name: "warmup_batch{batch}"']
            lines.append(f"    batch_size: {batch if s.max_batch_size > 0 else 1}")
            for spec in io.inputs:
                dims = _warmup_dims(spec, s.max_batch_size, batch)
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
            lines.append("  }" + ("," if i < len(s.warmup_batch_sizes) - 1 else ""))
        lines.append("]")
    return "\n".join(lines) + "\n"


def _warmup_dims(spec: TensorSpec, max_batch_size: int, batch: int) -> tuple[int, ...]:
    dims = _config_dims(spec, max_batch_size, "input")
    if max_batch_size == 0 and dims and dims[0] == -1:
        dims = (batch, *dims[1:])
    return dims


def _static_for_warmup(io: ModelIO, max_batch_size: int) -> bool:
    return all(d > 0 for spec in io.inputs for d in _warmup_dims(spec, max_batch_size, 1))


# --------------------------------------------------------------------------- writer


def _check_name(value: str, what: str) -> None:
    if not _NAME_RE.match(value) or value in (".", ".."):
        raise UserInputError(
            f"{what} {value!r} is not a valid directory name",
            "use letters, digits, '_', '-' and '.', starting with a letter or digit",
        )


def _tensor_dict(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "data_type": spec.data_type, "shape": list(spec.shape)}


def _copy_atomic(src: Path, dest: Path) -> None:
    def copy(tmp: Path) -> None:
        shutil.copyfile(src, tmp)

    atomic_write_with(dest, copy)


def write_model_repository(
    repo_dir: str | os.PathLike[str],
    model_name: str,
    artifact: Artifact,
    *,
    max_batch_size: int | None = None,
    instance_count: int = 1,
    kind: Kind = "KIND_GPU",
    gpus: Sequence[int] = (),
    dynamic_batching: bool | None = None,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 0,
    cuda_graphs: bool | None = None,
    warmup_batch_sizes: Sequence[int] | None = None,
    version: int = 1,
    config_name: str | None = None,
    latency: LatencyStats | Iterable[LatencyStats] | None = None,
    source_candidate: str | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write one model of a Triton repository from a measured artifact; return the model dir.

    * platform: from ``artifact.backend`` (``onnxruntime`` -> ``onnxruntime_onnx``,
      ``tensorrt`` -> ``tensorrt_plan``).
    * ``max_batch_size``: ``None`` means the engine profile's max batch for a plan, and
      ``max(preferred_batch_sizes)`` (or 0 without them) for ONNX; it must be covered by the
      engine profile and needs a dynamic batch dimension when > 0.
    * ``dynamic_batching``: ``None`` means on iff ``max_batch_size > 0``; preferred sizes
      (typically the profile's batch sizes) > 1 are written, each must be <= max_batch_size.
    * ``cuda_graphs``: ``None`` means on for TensorRT plans; not available for ONNX.
    * ``warmup_batch_sizes``: ``None`` means one warm-up at ``max_batch_size`` (or 1) when all
      non-batch input dims are static; ``()`` disables warm-up.
    * ``config_name``: write a per-GPU ``configs/<config_name>.pbtxt`` whose
      ``default_model_filename`` points at ``<version>/model_<config_name>.<ext>``, selected at
      serve time with ``--model-config-name``; deploy facts go to
      ``configs/<config_name>.deploy.json``.
    * ``latency``: the measured stats (one or several batch sizes) recorded in the deploy
      facts; ``source_candidate`` defaults to ``artifact.candidate``.

    The model file is copied atomically and its sha256 checked against ``artifact.sha256``;
    the config is written last (and validated against Triton's schema when tritonclient is
    installed). Raises :class:`UserInputError` (one line with a fix) for every mismatch between
    the request and the artifact.
    """
    _check_name(model_name, "model name")
    if latency is None:
        latency = ()
    elif isinstance(latency, LatencyStats):
        latency = (latency,)
    if config_name is not None:
        _check_name(config_name, "config name")
    if version < 1:
        raise UserInputError(f"model version {version} is invalid", "use a version >= 1")
    if instance_count < 1:
        raise UserInputError("instance_count must be >= 1", "pass instance_count=1 or more")
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise UserInputError(f"instance kind {kind!r} is unknown", "use KIND_GPU or KIND_CPU")
    platform = platform_for(artifact.backend)
    src = Path(artifact.path)
    if not src.is_file():
        raise UserInputError(
            f"artifact file {src.name} of candidate {artifact.candidate} is missing",
            "rebuild the candidate's artifact",
        )

    onnx_model: Any = None
    if platform == "tensorrt_plan":
        io = read_engine_io(engine_meta_path(src, artifact.meta))
        if kind == "KIND_CPU":
            raise UserInputError(
                "a TensorRT plan cannot run on KIND_CPU instances", "use kind='KIND_GPU'"
            )
    else:
        onnx_model = _load_onnx(src)
        io = read_onnx_io(src, model=onnx_model)

    input_names = [t.name for t in io.inputs]
    output_names = [t.name for t in io.outputs]
    if artifact.input_name not in input_names or artifact.output_name not in output_names:
        raise UserInputError(
            f"artifact of {artifact.candidate} names input {artifact.input_name!r} and output "
            f"{artifact.output_name!r}, but {src.name} has inputs {input_names} and outputs "
            f"{output_names}",
            "rebuild the artifact record from the model file (names must match exactly)",
        )

    preferred = sorted({int(b) for b in preferred_batch_sizes})
    if max_batch_size is None:
        if platform == "tensorrt_plan" and io.max_batch is not None:
            max_batch_size = io.max_batch
        else:
            max_batch_size = max(preferred, default=0)
    if max_batch_size < 0:
        raise UserInputError("max_batch_size must be >= 0", "pass 0 (no batching) or more")
    if platform == "tensorrt_plan" and max_batch_size > 0 and io.max_batch is None:
        raise UserInputError(
            "the engine metadata does not record its optimisation profile's max batch, so "
            f"max_batch_size {max_batch_size} cannot be checked",
            "rebuild the engine with dcvit-deploy (it records 'max_batch')",
        )
    if io.max_batch is not None and max_batch_size > io.max_batch:
        raise UserInputError(
            f"the engine's optimisation profile allows batches up to {io.max_batch}, but "
            f"max_batch_size is {max_batch_size}",
            f"rebuild the engine with a profile max >= {max_batch_size} or lower max_batch_size",
        )
    for spec in (*io.inputs, *io.outputs):  # fail early with the batch-dimension message
        _config_dims(spec, max_batch_size, "input" if spec in io.inputs else "output")

    if dynamic_batching is None:
        dynamic_batching = max_batch_size > 0
    if dynamic_batching and max_batch_size == 0:
        raise UserInputError(
            "dynamic batching needs max_batch_size > 0",
            "pass a max_batch_size or dynamic_batching=False",
        )
    too_big = [b for b in preferred if b > max_batch_size]
    if dynamic_batching and too_big:
        raise UserInputError(
            f"preferred batch sizes {too_big} exceed max_batch_size {max_batch_size}",
            "raise max_batch_size or drop those sizes",
        )
    preferred_out = [b for b in preferred if b > 1] if dynamic_batching else []

    if cuda_graphs is None:
        cuda_graphs = platform == "tensorrt_plan"
    if cuda_graphs and platform != "tensorrt_plan":
        raise UserInputError(
            "Triton's CUDA graph optimisation applies to TensorRT plans only",
            "pass cuda_graphs=False for ONNX models",
        )

    if warmup_batch_sizes is None:
        default = max_batch_size if max_batch_size > 0 else 1
        warmups = [default] if _static_for_warmup(io, max_batch_size) else []
    else:
        warmups = sorted({int(b) for b in warmup_batch_sizes})
        if warmups and not _static_for_warmup(io, max_batch_size):
            raise UserInputError(
                "model warm-up needs static non-batch input dims, but the inputs are "
                f"{[list(t.shape) for t in io.inputs]}",
                "pass warmup_batch_sizes=() or export with static image size",
            )
        bad = [b for b in warmups if b < 1 or (max_batch_size > 0 and b > max_batch_size)]
        if bad:
            raise UserInputError(
                f"warm-up batch sizes {bad} are outside 1..{max(max_batch_size, 1)}",
                "use warm-up sizes within max_batch_size",
            )

    model_dir = Path(repo_dir) / model_name
    suffix = _MODEL_SUFFIX[platform]
    model_file = f"model_{config_name}{suffix}" if config_name else f"model{suffix}"
    dest = model_dir / str(version) / model_file

    # 1. the model file (and any ONNX external data), byte-identical to what was measured
    _copy_atomic(src, dest)
    digest = sha256_file(dest)
    if artifact.sha256 and digest != artifact.sha256:
        dest.unlink(missing_ok=True)
        raise UserInputError(
            f"{src.name} changed since candidate {artifact.candidate} was built and measured "
            f"(sha256 {digest[:12]} != {artifact.sha256[:12]})",
            "rebuild and re-measure the candidate so the shipped file is the measured one",
        )
    if platform == "onnxruntime_onnx":
        for location in _external_data_files(onnx_model):
            _copy_atomic(src.parent / location, dest.parent / location)

    # 2. deploy facts
    source = source_candidate or artifact.candidate
    if config_name:
        config_rel = f"configs/{config_name}.pbtxt"
        deploy_path = model_dir / "configs" / f"{config_name}.deploy.json"
    else:
        config_rel = "config.pbtxt"
        deploy_path = model_dir / "deploy.json"
    facts = dict(io.facts)
    deploy = {
        "schema": SCHEMA_VERSION,
        "kind": "dcvit-deploy/triton-model",
        "generator": f"dcvit-deploy {__version__}",
        "model_name": model_name,
        "version": version,
        "config": config_rel,
        "platform": platform,
        "model_file": f"{version}/{model_file}",
        "sha256": digest,
        "source": {
            "candidate": source,
            "backend": artifact.backend,
            "precision": artifact.precision,
            "file_name": src.name,
            "build_seconds": artifact.build_seconds,
        },
        "tensorrt_version": facts.get("tensorrt_version", artifact.meta.get("tensorrt_version")),
        "gpu": facts.get("gpu", artifact.meta.get("gpu", artifact.meta.get("gpu_name"))),
        "compute_capability": facts.get(
            "compute_capability", artifact.meta.get("compute_capability")
        ),
        "engine_profile_max_batch": io.max_batch,
        "max_batch_size": max_batch_size,
        "inputs": [_tensor_dict(t) for t in io.inputs],
        "outputs": [_tensor_dict(t) for t in io.outputs],
        "latency": [to_dict(s) for s in latency],
        "artifact_meta": artifact.meta,
        "extra": extra_meta or {},
    }
    atomic_write_json(deploy_path, deploy)

    # 3. the config, last: Triton treats a model directory with a config as ready
    text = render_config(
        model_name,
        platform,
        io,
        max_batch_size=max_batch_size,
        instance_count=instance_count,
        kind=kind,
        gpus=gpus,
        dynamic_batching=dynamic_batching,
        preferred_batch_sizes=preferred_out,
        max_queue_delay_us=max_queue_delay_us,
        cuda_graphs=cuda_graphs,
        warmup_batch_sizes=warmups,
        default_model_filename=model_file if config_name else None,
        comment=f"Generated by dcvit-deploy from candidate {source}; "
        f"build facts in {deploy_path.name}",
    )
    check = _schema_check(text)
    if check.status == "failed":
        raise RuntimeError(f"generated an invalid Triton config: {'; '.join(check.messages)}")
    atomic_write_text(model_dir / config_rel, text)
    return model_dir


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


def _schema_check(text: str) -> ConfigCheck:
    config, early = _parse(text)
    if early is not None:
        return early
    problems = _semantic_problems(config)
    return ConfigCheck("failed", tuple(problems)) if problems else ConfigCheck("ok")


def _semantic_problems(config: Any) -> list[str]:
    problems: list[str] = []
    mbs = config.max_batch_size
    if config.platform not in _MODEL_SUFFIX:
        problems.append(f"platform {config.platform!r} is not onnxruntime_onnx or tensorrt_plan")
    if mbs < 0:
        problems.append("max_batch_size must be >= 0")
    if config.HasField("dynamic_batching"):
        if mbs == 0:
            problems.append("dynamic_batching needs max_batch_size > 0")
        big = [b for b in config.dynamic_batching.preferred_batch_size if b > mbs]
        if big and mbs > 0:
            problems.append(f"preferred_batch_size {big} exceeds max_batch_size {mbs}")
    if not config.input or not config.output:
        problems.append("the config must list inputs and outputs")
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
    ``tritonclient[grpc]``); without it the result is ``skipped``, never ``ok``. With a model
    directory (given, or derived from the path) it also checks: ``name`` matches the directory,
    each numeric version folder holds the model file, and every input/output name, data type
    and dims agree with the model file (ONNX graph) or, for plans, the I/O recorded in the
    deploy facts. Never raises for an invalid config; the messages say what is wrong.
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


def _model_dir_problems(config: Any, model_dir: Path, config_path: Path | None) -> list[str]:
    problems: list[str] = []
    if config.name and config.name != model_dir.name:
        problems.append(f"config name {config.name!r} != model directory {model_dir.name!r}")
    suffix = _MODEL_SUFFIX.get(config.platform)
    if suffix is None:
        return problems
    file_name = config.default_model_filename or f"model{suffix}"
    versions = (
        sorted(
            (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
            key=lambda p: int(p.name),
        )
        if model_dir.is_dir()
        else []
    )
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
        )
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        return f"cannot read the plan's recorded I/O from {deploy.name}: {exc}"


def _io_problems(config: Any, io: ModelIO, where: str) -> list[str]:
    from tritonclient.grpc import model_config_pb2

    problems: list[str] = []
    mbs = config.max_batch_size
    if io.max_batch is not None and mbs > io.max_batch:
        problems.append(f"max_batch_size {mbs} exceeds the engine profile max {io.max_batch}")
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
