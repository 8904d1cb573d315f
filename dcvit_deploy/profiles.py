"""Target profiles: TOML files that say where and how a candidate is deployed and measured.

A profile names the runtime (``backend``), ``device``, ``precision``, the production
``batch_sizes`` (TensorRT optimisation profiles are built from them), the batch size and
``statistic`` a latency budget applies to, the timing ``scope``, the measurement settings
(``[measure]``, the fields of :class:`~dcvit_deploy.store.records.MeasureSettings`) and
backend-specific ``[backend_options]``. Example::

    name = "cpu-ort"
    backend = "onnxruntime"
    device = "cpu"
    precision = "fp32"
    batch_sizes = [1]
    budget_batch_size = 1
    statistic = "p50"
    scope = "host"

    [measure]
    window_iters = 50

    [backend_options]
    intra_op_num_threads = 0

Built-in profiles live in the repository's top-level ``profiles/`` directory; any other path to
a ``.toml`` file works too. Every key and value is checked: unknown keys are refused, and errors
name the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dcvit_deploy.errors import ProfileError
from dcvit_deploy.store.records import STATISTICS, MeasureSettings, TargetProfile


def _profile_dir() -> Path:
    """The repository's ``profiles/`` (checkout, editable install), else the copy a regular
    install puts under ``<prefix>/share/dcvit-deploy/profiles``."""
    import sys

    checkout = Path(__file__).resolve().parent.parent / "profiles"
    installed = Path(sys.prefix) / "share" / "dcvit-deploy" / "profiles"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


PROFILE_DIR = _profile_dir()
"""Built-in profiles: ``<repo>/profiles/*.toml``."""

DEFAULT_PROFILE = "cpu-ort"

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16")
SCOPES = ("host", "device_compute", "device_with_copies")

# key -> (expected python type(s), allowed values or () for free); order = documentation order
_TOP_KEYS: dict[str, tuple[tuple[type, ...], tuple[Any, ...]]] = {
    "name": ((str,), ()),
    "description": ((str,), ()),
    "backend": ((str,), ()),
    "device": ((str,), DEVICES),
    "precision": ((str,), PRECISIONS),
    "batch_sizes": ((list,), ()),
    "budget_batch_size": ((int,), ()),
    "statistic": ((str,), STATISTICS),
    "scope": ((str,), SCOPES),
    "gpu": ((str,), ()),
    "measure": ((dict,), ()),
    "backend_options": ((dict,), ()),
}
_REQUIRED = ("name", "backend", "device", "precision", "batch_sizes", "statistic", "scope")


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


def list_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    if not PROFILE_DIR.is_dir():
        return []
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def profile_path(name_or_path: str | Path) -> Path:
    """Resolve a built-in profile name or a path to its file; ProfileError if neither exists."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    looks_like_path = text.endswith(".toml") or "/" in text or "\\" in text
    if looks_like_path:
        if candidate.is_file():
            return candidate
        raise ProfileError(
            f"profile file {text!r} does not exist",
            f"give an existing .toml file or a built-in name ({', '.join(list_profiles())})",
        )
    builtin = PROFILE_DIR / f"{text}.toml"
    if builtin.is_file():
        return builtin
    if candidate.is_file():
        return candidate
    raise ProfileError(
        f"unknown profile {text!r}",
        f"use one of: {', '.join(list_profiles())}, or a path to a .toml file",
    )


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> TargetProfile:
    """Load and validate a built-in profile by name, or a profile file by path."""
    path = profile_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read profile {str(path)!r}: {exc}", "check the file") from exc
    try:
        data = _toml_loads(text)
    except Exception as exc:  # tomllib.TOMLDecodeError; message names line and column
        raise ProfileError(
            f"profile {path.name} is not valid TOML: {exc}", "fix the TOML syntax"
        ) from exc
    profile = profile_from_dict(data, source=path.name)
    if path.parent.resolve() == PROFILE_DIR and profile.name != path.stem:
        raise ProfileError(
            f"built-in profile {path.name} declares name {profile.name!r}",
            f"set name = {path.stem!r}",
        )
    return profile


def profile_from_dict(
    data: Mapping[str, Any], *, source: str = "<dict>", check_backend: bool = True
) -> TargetProfile:
    """Validate a parsed profile and build the :class:`TargetProfile`.

    With ``check_backend`` the backend name is looked up in the registry and the backend checks
    its options and the device/precision/scope combination.
    """
    where = f"profile {source}"
    for key in data:
        if key not in _TOP_KEYS:
            raise ProfileError(f"{where}: unknown key {key!r}", f"use only: {', '.join(_TOP_KEYS)}")
    for key in _REQUIRED:
        if key not in data:
            raise ProfileError(f"{where}: missing key {key!r}", f"add {key} = ... to the profile")
    for key, value in data.items():
        types, allowed = _TOP_KEYS[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProfileError(
                f"{where}: {key} = {value!r} has the wrong type",
                f"use a {' or '.join(t.__name__ for t in types)}"
                + (f", one of: {', '.join(map(str, allowed))}" if allowed else ""),
            )
        if allowed and value not in allowed:
            raise ProfileError(
                f"{where}: {key} = {value!r} is not allowed",
                f"use one of: {', '.join(map(str, allowed))}",
            )

    batch_sizes = data["batch_sizes"]
    if not batch_sizes or not all(
        isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes
    ):
        raise ProfileError(
            f"{where}: batch_sizes = {batch_sizes!r} is not a non-empty list of integers >= 1",
            "use e.g. batch_sizes = [1, 8]",
        )
    if len(set(batch_sizes)) != len(batch_sizes):
        raise ProfileError(
            f"{where}: batch_sizes = {batch_sizes!r} repeats a value", "list each size once"
        )
    budget_batch = data.get("budget_batch_size", batch_sizes[0])
    if budget_batch not in batch_sizes:
        raise ProfileError(
            f"{where}: budget_batch_size = {budget_batch!r} is not one of batch_sizes",
            f"use one of: {', '.join(map(str, batch_sizes))}",
        )
    if data["scope"] != "host" and data["device"] != "cuda":
        raise ProfileError(
            f"{where}: scope = {data['scope']!r} needs device = 'cuda'",
            "use scope = 'host' on CPU",
        )

    measure = measure_settings_from_dict(data.get("measure", {}), where=where)
    try:
        profile = TargetProfile(
            name=data["name"],
            description=data.get("description", ""),
            backend=data["backend"],
            device=data["device"],
            precision=data["precision"],
            batch_sizes=tuple(sorted(batch_sizes)),
            budget_batch_size=budget_batch,
            statistic=data["statistic"],
            scope=data["scope"],
            gpu=data.get("gpu", ""),
            measure=measure,
            backend_options=dict(data.get("backend_options", {})),
        )
    except ValueError as exc:
        raise ProfileError(f"{where}: {exc}", "fix the profile value") from exc

    if check_backend:
        from dcvit_deploy.backends import get_backend

        try:
            backend = get_backend(profile.backend)
        except Exception as exc:
            fix = getattr(exc, "fix", None) or "install the backend or pick a built-in one"
            problem = getattr(exc, "problem", str(exc))
            raise ProfileError(f"{where}: backend = {profile.backend!r}: {problem}", fix) from exc
        try:
            backend.validate_profile(profile)
        except ProfileError as exc:
            raise ProfileError(f"{where}: {exc.problem}", exc.fix) from exc
    return profile


def measure_settings_from_dict(table: Mapping[str, Any], *, where: str) -> MeasureSettings:
    """Build :class:`MeasureSettings` from a ``[measure]`` table, checking keys and types."""
    hints = typing.get_type_hints(MeasureSettings)
    fields = [f.name for f in dataclasses.fields(MeasureSettings)]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in hints:
            raise ProfileError(
                f"{where}: unknown [measure] key {key!r}", f"use one of: {', '.join(fields)}"
            )
        expected = hints[key]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        bad_bool = isinstance(value, bool) and expected is not bool
        if bad_bool or not isinstance(value, expected):
            raise ProfileError(
                f"{where}: [measure] {key} = {value!r} is not a {expected.__name__}",
                f"use a {expected.__name__}",
            )
        kwargs[key] = value
    try:
        return MeasureSettings(**kwargs)
    except ValueError as exc:
        raise ProfileError(f"{where}: [measure] {exc}", "fix the [measure] value") from exc
