"""Backend registry: built-in runtimes by name, plus plugins from entry points.

Built-ins: ``onnxruntime`` (CPU, CUDA and TensorRT execution providers), ``tensorrt`` (native
TensorRT engines) and ``torch`` (PyTorch eager / CUDA graphs, the reference runtime). Third-party
packages add backends under the entry-point group :data:`ENTRY_POINT_GROUP`::

    [project.entry-points."dcvit_deploy.backends"]
    mybackend = "mypkg.backend:make_backend"   # a class or zero-argument factory

A name registered twice (a plugin reusing a built-in name, or two plugins) is refused with the
names of both sources. Nothing here imports a runtime: backends are loaded when asked for.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from typing import TYPE_CHECKING

from dcvit_deploy.backends.base import Availability, Backend, missing_attributes
from dcvit_deploy.errors import BackendUnavailable, BuildError, UserInputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dcvit_deploy.store.records import TargetProfile

__all__ = [
    "BUILTIN_BACKENDS",
    "ENTRY_POINT_GROUP",
    "Availability",
    "Backend",
    "BuildError",
    "backend_names",
    "backend_sources",
    "doctor",
    "get_backend",
    "register_backend",
    "unregister_backend",
]

ENTRY_POINT_GROUP = "dcvit_deploy.backends"

BUILTIN_BACKENDS: dict[str, str] = {
    "onnxruntime": "dcvit_deploy.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "dcvit_deploy.backends.tensorrt:TensorRTBackend",
    "torch": "dcvit_deploy.backends.pytorch:TorchBackend",
}

# Backends registered programmatically (tests, notebooks): name -> factory.
_REGISTERED: dict[str, Callable[[], Backend]] = {}
_INSTANCES: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend factory in-process; refuses a name that already exists."""
    sources = backend_sources()
    if name in sources:
        raise UserInputError(
            f"backend name {name!r} is already registered (by {sources[name]})",
            "choose another name",
        )
    _REGISTERED[name] = factory


def unregister_backend(name: str) -> None:
    """Remove an in-process registration (built-ins and entry points cannot be removed)."""
    _REGISTERED.pop(name, None)
    _INSTANCES.pop(name, None)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def backend_sources() -> dict[str, str]:
    """Every known backend name -> where it comes from (``module:attr`` or ``<registered>``).

    Raises :class:`UserInputError` when two sources claim one name.
    """
    sources: dict[str, str] = dict(BUILTIN_BACKENDS)
    for ep in _entry_points():
        if ep.name in sources:
            raise UserInputError(
                f"backend name {ep.name!r} is registered twice: by {sources[ep.name]} and by "
                f"entry point {ep.value}",
                "uninstall one of the packages or rename its entry point in group "
                f"{ENTRY_POINT_GROUP!r}",
            )
        sources[ep.name] = ep.value
    for name in _REGISTERED:
        if name in sources:
            raise UserInputError(
                f"backend name {name!r} is registered twice: by {sources[name]} and in-process",
                "unregister the in-process backend",
            )
        sources[name] = "<registered>"
    return sources


def backend_names() -> list[str]:
    """Sorted names of every known backend."""
    return sorted(backend_sources())


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (instantiated once per process).

    Unknown names raise :class:`UserInputError` listing the known ones; a plugin that fails to
    load raises :class:`BackendUnavailable` naming its entry point.
    """
    sources = backend_sources()
    if name not in sources:
        raise UserInputError(
            f"unknown backend {name!r}", f"use one of: {', '.join(sorted(sources))}"
        )
    if name in _INSTANCES:
        return _INSTANCES[name]
    source = sources[name]
    if name in _REGISTERED:
        factory: Callable[[], Backend] = _REGISTERED[name]
    else:
        factory = _load_factory(name, source)
    try:
        backend = factory()
    except Exception as exc:
        raise BackendUnavailable(
            f"backend {name!r} ({source}) failed to start: {type(exc).__name__}: {exc}",
            "reinstall the package that provides it, or pick another backend",
        ) from exc
    missing = missing_attributes(backend)
    if missing:
        raise BackendUnavailable(
            f"backend {name!r} ({source}) does not implement {', '.join(missing)}",
            "update the package that provides it",
        )
    if backend.name != name:
        raise BackendUnavailable(
            f"backend registered as {name!r} ({source}) calls itself {backend.name!r}",
            "make the entry-point name match the backend's name attribute",
        )
    _INSTANCES[name] = backend
    return backend


def _load_factory(name: str, source: str) -> Callable[[], Backend]:
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
        obj = module
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except Exception as exc:
        raise BackendUnavailable(
            f"backend {name!r} could not be loaded from {source}: {type(exc).__name__}: {exc}",
            "reinstall the package that provides it, or pick another backend",
        ) from exc
    if not callable(obj):
        raise BackendUnavailable(
            f"backend {name!r} entry {source} is not callable",
            "point the entry point at a backend class or factory function",
        )
    return obj


def doctor(profile: TargetProfile | None = None) -> list[tuple[str, Availability]]:
    """Every backend's availability here (for ``profile`` when given); never raises."""
    try:
        names = backend_names()
    except UserInputError as exc:
        return [("registry", Availability(False, exc.problem, exc.fix or ""))]
    rows: list[tuple[str, Availability]] = []
    for name in names:
        try:
            backend = get_backend(name)
            if profile is not None and profile.backend != name:
                rows.append((name, backend.availability(None)))
            else:
                rows.append((name, backend.availability(profile)))
        except Exception as exc:  # doctor reports; it never fails
            fix = getattr(exc, "fix", "") or ""
            rows.append((name, Availability(False, str(getattr(exc, "problem", exc)), fix)))
    return rows
