"""Pure parts of the TensorRT backend: builder settings from a profile, engine metadata checks.

Nothing here imports ``tensorrt`` or touches a GPU; every function is tested directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dcvit_deploy.backends.base import OptionSpec, check_options
from dcvit_deploy.errors import EngineMismatch, ProfileError, UserInputError
from dcvit_deploy.store.records import TargetProfile

DEFAULT_TIMING_CACHE = "timing.cache"
MIB = 1 << 20

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

    precision: Literal["fp32", "fp16", "int8", "fp8"]  # the graph's: no builder flag sets it
    strongly_typed: bool
    workspace_bytes: int
    optimization_level: int
    tf32: bool
    shape_profile: ShapeProfile
    timing_cache: str | None


def options(profile: TargetProfile) -> dict[str, Any]:
    """The profile's ``[backend_options]`` for ``tensorrt``, validated, defaults filled in."""
    return check_options("tensorrt", profile.backend_options, OPTIONS)


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
    if profile.precision not in ("fp32", "fp16", "int8", "fp8"):
        raise ProfileError(
            f"precision = {profile.precision!r} is not supported by backend 'tensorrt'",
            "use fp32, fp16, int8 or fp8",
        )
    if not input_shape or any(int(d) < 1 for d in input_shape):
        raise UserInputError(f"input shape {input_shape!r} is not a static (C, H, W)", "re-export")
    opts = options(profile)
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
    """``<candidate>.plan`` -> ``<candidate>.plan.json``."""
    return plan.with_name(plan.name + ".json")


def read_engine_meta(plan: Path) -> dict[str, Any]:
    """The metadata written next to a plan by the build; UserInputError when missing."""
    path = engine_meta_path(plan)
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise UserInputError(
            f"engine metadata {path.name} is missing or unreadable",
            "rebuild the engine (its metadata is written next to the plan)",
        ) from exc
