"""The backend protocol every runtime implements, and the helpers they share.

A backend builds a runnable :class:`~dcvit_deploy.store.records.Artifact` from the ONNX file
(``build``; one with ``needs_module = True``, the ``torch`` backend, gets the module as
``model=`` instead), times it with the shared loop (``measure``) and runs it for output checks
(``run``); ``availability`` says, without raising or importing the runtime, whether it can work.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from dcvit_deploy.errors import BackendUnavailable, ProfileError
from dcvit_deploy.latency.loop import Timer, measure, save_raw, with_machine_state
from dcvit_deploy.latency.machine import machine_state
from dcvit_deploy.store.records import Artifact, LatencyStats, TargetProfile

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here (for a profile), why not, and how to fix it."""

    ok: bool
    reason: str
    fix: str = ""

    def require(self, backend: str) -> None:
        """Raise :class:`BackendUnavailable` with the reason and fix unless ``ok``."""
        if not self.ok:
            raise BackendUnavailable(
                f"backend {backend!r} cannot run here: {self.reason}", self.fix
            )


@dataclass(frozen=True)
class OptionSpec:
    """One ``[backend_options]`` key: its type, allowed values or range, default and meaning."""

    kind: type
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        return f"{self.kind.__name__}" + (f" {' and '.join(bounds)}" if bounds else "")


def check_options(
    backend: str, options: Mapping[str, Any], specs: Mapping[str, OptionSpec]
) -> dict[str, Any]:
    """Validate ``options`` against ``specs`` and return them with defaults filled in.

    Raises :class:`ProfileError` naming the bad key and the allowed keys or values.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        spec = specs.get(key)
        if spec is None:
            allowed = ", ".join(sorted(specs)) or "(none)"
            raise ProfileError(
                f"unknown [backend_options] key {key!r} for backend {backend!r}",
                f"use one of: {allowed}",
            )
        out[key] = _check_value(backend, key, value, spec)
    for key, spec in specs.items():
        out.setdefault(key, spec.default)
    return out


def _check_value(backend: str, key: str, value: Any, spec: OptionSpec) -> Any:
    where = f"[backend_options] {key} = {value!r} for backend {backend!r}"
    if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok_type = isinstance(value, spec.kind) and not (spec.kind is int and isinstance(value, bool))
    if not ok_type:
        raise ProfileError(f"{where} is not a {spec.kind.__name__}", f"use {spec.describe()}")
    if spec.choices and value not in spec.choices:
        raise ProfileError(f"{where} is not allowed", f"use {spec.describe()}")
    if spec.minimum is not None and value < spec.minimum:
        raise ProfileError(f"{where} is out of range", f"use {spec.describe()}")
    if spec.maximum is not None and value > spec.maximum:
        raise ProfileError(f"{where} is out of range", f"use {spec.describe()}")
    return value


@runtime_checkable
class Backend(Protocol):
    """What the pipeline needs from a runtime. Implementations must not import their runtime at
    module import time (importing :mod:`dcvit_deploy` must stay light)."""

    name: str
    needs_module: bool

    def availability(self, profile: TargetProfile | None = None) -> Availability:
        """Can this backend run ``profile`` (or anything, if ``None``) here? Never raises."""
        ...

    def validate_profile(self, profile: TargetProfile) -> None:
        """Check the profile's device/precision/scope and ``backend_options``; ProfileError."""
        ...

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
        """Build the runnable artifact under ``out_dir`` atomically; BuildError per candidate."""
        ...

    def measure(
        self,
        artifact: Artifact,
        profile: TargetProfile,
        batch_size: int,
        *,
        raw_path: Path | None = None,
    ) -> LatencyStats:
        """Time the artifact at ``batch_size`` with :func:`dcvit_deploy.latency.loop.measure`."""
        ...

    def run(self, artifact: Artifact, profile: TargetProfile, inputs: np.ndarray) -> np.ndarray:
        """Run the artifact on ``inputs`` (N, C, H, W) and return its first output as float32."""
        ...


class OpenMeasurement(Protocol):
    """An artifact kept ready for interleaved rounds: ``step`` runs one inference, ``timer``
    times it, ``close`` releases it. Optional: a backend's ``open_measurement(artifact,
    profile, batch_size)`` returns one; without it rounds call :meth:`Backend.measure`."""

    step: Callable[[], None]
    timer: Timer

    def close(self) -> None: ...


@dataclass
class ReadyMeasurement:
    """The plain :class:`OpenMeasurement` backends return."""

    step: Callable[[], None]
    timer: Timer
    closer: Callable[[], None] | None = None

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
            self.closer = None


REQUIRED_ATTRIBUTES: tuple[str, ...] = (
    "name",
    "availability",
    "validate_profile",
    "build",
    "measure",
    "run",
)


def missing_attributes(obj: object) -> list[str]:
    """Protocol members ``obj`` lacks (used to reject malformed plugin backends)."""
    return [a for a in REQUIRED_ATTRIBUTES if not hasattr(obj, a)]


# --------------------------------------------------------------------------- shared helpers


def module_found(name: str) -> bool:
    """Whether ``name`` could be imported, found without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        # ValueError: the module is in sys.modules with no spec (a stub); treat as present.
        import sys

        return name in sys.modules


def cuda_availability(profile: TargetProfile | None) -> Availability | None:
    """``None`` when the profile needs no GPU or a driver reports one; else why not."""
    if profile is None or profile.device != "cuda":
        return None
    from dcvit_deploy.latency.machine import cuda_device_count

    if cuda_device_count() > 0:
        return None
    return Availability(
        False,
        f"profile {profile.name!r} needs a CUDA GPU but the driver reports none on this machine",
        "run on a machine with an NVIDIA GPU and driver, or use a CPU profile such as 'cpu-ort'",
    )


def random_inputs(shape: Sequence[int], dtype: str = "float32", seed: int = 0) -> np.ndarray:
    """Deterministic standard-normal inputs of ``shape`` (latency does not depend on values)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal(tuple(shape), dtype=np.float32).astype(dtype)


def timed(
    step: Callable[[], None],
    *,
    profile: TargetProfile,
    artifact: Artifact,
    batch_size: int,
    timer: Timer,
    raw_path: Path | None,
    settings_override: dict[str, Any] | None = None,
) -> LatencyStats:
    """Run the shared loop for one artifact and persist raw samples (with their context)."""
    settings = profile.measure
    if settings_override:
        settings = dataclasses.replace(settings, **settings_override)
    before = machine_state()
    stats, raw = measure(
        step, settings=settings, batch_size=batch_size, scope=profile.scope, timer=timer
    )
    stats = with_machine_state(
        stats,
        before,
        machine_state(),
        backend=profile.backend,
        backend_options=profile.backend_options,
    )
    if raw_path is not None:
        save_raw(
            raw_path,
            raw,
            meta={
                "candidate": artifact.candidate,
                "backend": artifact.backend,
                "artifact_sha256": artifact.sha256,
                "profile": profile.name,
                "batch_size": batch_size,
                "scope": profile.scope,
                "timer": timer.name,
                "window_iters": settings.window_iters,
                "settle_windows": stats.settle_windows,
                "machine": stats.machine,
            },
        )
    return stats


def check_batch(artifact: Artifact, profile: TargetProfile, batch_size: int) -> None:
    """Refuse batch sizes outside the profile's range (engines are built for that range)."""
    if batch_size < 1 or batch_size > profile.max_batch:
        raise ProfileError(
            f"batch size {batch_size} is outside profile {profile.name!r}'s range "
            f"1..{profile.max_batch} (artifact {artifact.candidate!r})",
            f"use one of {list(profile.batch_sizes)} or add it to the profile's batch_sizes",
        )


class BackendBase:
    """Small conveniences shared by the built-in backends (not required of plugins)."""

    name: ClassVar[str] = ""
    needs_module: ClassVar[bool] = False
    OPTIONS: ClassVar[dict[str, OptionSpec]] = {}

    def options(self, profile: TargetProfile) -> dict[str, Any]:
        """The profile's backend options, validated, with defaults filled in."""
        return check_options(self.name, profile.backend_options, self.OPTIONS)

    def _require(self, profile: TargetProfile) -> None:
        if profile.backend != self.name:
            raise ProfileError(
                f"profile {profile.name!r} is for backend {profile.backend!r}, not {self.name!r}",
                f"use a profile whose backend is {self.name!r}",
            )
        self.validate_profile(profile)
        self.availability(profile).require(self.name)

    def validate_profile(self, profile: TargetProfile) -> None:  # pragma: no cover - overridden
        self.options(profile)

    def availability(self, profile: TargetProfile | None = None) -> Availability:
        """Can this backend run ``profile`` here? Never raises: a failing probe is reported."""
        try:
            return self._probe(profile)
        except Exception as exc:  # a broken install must show up in doctor, not crash it
            return Availability(False, f"availability check failed: {exc}", "run doctor")

    def _probe(self, profile: TargetProfile | None) -> Availability:  # pragma: no cover
        raise NotImplementedError
