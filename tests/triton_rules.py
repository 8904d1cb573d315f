"""Triton's model-loading rules as a test oracle: the generated configs are checked against the
rules the server applies when it loads a model (schema, dims vs max_batch_size, instance kinds,
dynamic batching, warm-up, model files). The product builds configs as protobuf messages and
needs none of this; the tests use it to show what they build is what Triton accepts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.triton.model_config import (
    _MODEL_SUFFIX,
    ModelIO,
    TensorSpec,
    _config_dims,
    parse_config,
    read_onnx_io,
    version_dirs,
)

_ORT_INT_PARAMETERS = ("intra_op_thread_count", "inter_op_thread_count")
_ORT_ACCELERATORS = ("tensorrt", "cuda")


@dataclass(frozen=True)
class ConfigCheck:
    """Outcome of :func:`validate_config`: ``ok`` or ``failed`` (see messages)."""

    status: Literal["ok", "failed"]
    messages: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


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


def _config_source(config: str | os.PathLike[str]) -> tuple[str, Path | None]:
    if isinstance(config, str) and any(c in config for c in "\n{:") and not os.path.exists(config):
        return config, None
    path = Path(config)
    path = path / "config.pbtxt" if path.is_dir() else path
    return path.read_text(encoding="utf-8"), path


def validate_config(
    config: str | os.PathLike[str], *, model_dir: str | os.PathLike[str] | None = None
) -> ConfigCheck:
    """Validate a Triton config: schema, semantics and agreement with the model files.

    ``config`` is config text, a ``config.pbtxt`` path, or a model directory. The text is
    parsed into Triton's own ``ModelConfig`` protobuf. Then the rules Triton applies when
    loading are checked (data types, dims, duplicate names, batching, instance groups, version
    policy, platform-specific optimisation settings). With a model directory (given, or derived
    from the path) it also checks: ``name`` matches the directory, each numeric version folder
    holds the model file, and every input/output name, data type and dims agree with the model
    file (ONNX graph) or, for plans, the I/O recorded in the deploy facts
    (``<version>/deploy.json``, else the model's ``deploy.json``), including that instance
    groups only select optimisation profiles the engine has. Never raises for an invalid
    config; the messages say what is wrong.
    """
    try:
        text, path = _config_source(config)
        parsed = parse_config(text)
    except OSError as exc:
        return ConfigCheck("failed", (f"cannot read {Path(config).name}: {exc}",))
    except UserInputError as exc:
        return ConfigCheck("failed", (exc.problem,))
    problems = _semantic_problems(parsed)
    model_dir = model_dir if model_dir is not None else path and path.parent
    if model_dir is not None:
        problems += _model_dir_problems(parsed, Path(model_dir))
    return ConfigCheck("failed", tuple(problems)) if problems else ConfigCheck("ok")


def _model_dir_problems(config: Any, model_dir: Path) -> list[str]:
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
        io = _io_for_check(config.platform, model_file, model_dir)
        if isinstance(io, str):
            problems.append(io)
            continue
        problems += _io_problems(config, io, f"{vdir.name}/{file_name}")
    return problems


def _io_for_check(platform: str, model_file: Path, model_dir: Path) -> ModelIO | str:
    if platform == "onnxruntime_onnx":
        try:
            return read_onnx_io(model_file)
        except UserInputError as exc:
            return exc.one_line()
    # A plan cannot be opened without TensorRT: use the I/O recorded when it was written.
    deploy = model_file.parent / "deploy.json"
    deploy = deploy if deploy.is_file() else model_dir / "deploy.json"
    try:
        data = json.loads(deploy.read_text(encoding="utf-8"))
        inputs, outputs = (
            tuple(TensorSpec(t["name"], t["data_type"], tuple(t["shape"])) for t in data[key])
            for key in ("inputs", "outputs")
        )
        return ModelIO(
            inputs=inputs,
            outputs=outputs,
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
