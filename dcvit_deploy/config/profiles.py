"""Target profiles: TOML files that say where and how a candidate is deployed and measured.

A profile names the runtime (``backend``), ``device``, ``precision``, the production
``batch_sizes`` (TensorRT optimisation profiles are built from them), the batch size and
``statistic`` a latency budget applies to, the timing ``scope``, the measurement settings
(``[measure]``, the fields of :class:`~dcvit_deploy.store.records.MeasureSettings`),
backend-specific ``[backend_options]``, the ``precisions`` it tries (the reference
``precision`` among them) and how it quantizes (``[quantize]``,
:class:`~dcvit_deploy.store.records.QuantizeSettings`). Example::

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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.errors import ProfileError, SchemaError, UserInputError
from dcvit_deploy.store.records import (
    MeasureSettings,
    QuantizeSettings,
    TargetProfile,
    from_dict,
    safe_name,
)


def _profile_dir() -> Path:
    """The repository's ``profiles/`` (checkout, editable install), else the copy a regular
    install puts under ``<prefix>/share/dcvit-deploy/profiles``."""
    import sys

    checkout = Path(__file__).resolve().parents[2] / "profiles"
    installed = Path(sys.prefix) / "share" / "dcvit-deploy" / "profiles"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


PROFILE_DIR = _profile_dir()
"""Built-in profiles: ``<repo>/profiles/*.toml``."""

DEFAULT_PROFILE = "cpu-ort"
MAX_BATCH = 4096
"""Larger batch sizes are refused (every one is built and measured)."""


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
        data = _toml_loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"cannot read profile {str(path)!r}: {exc}", "check the file") from exc
    except ValueError as exc:  # not UTF-8, or TOMLDecodeError (which names line and column)
        why = " ".join(str(exc).split())[:150]
        raise ProfileError(
            f"profile {path.name} is not valid TOML (UTF-8 text): {why}",
            "give a TOML text file (see the profiles/ folder)",
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
    """Validate a parsed profile and build the :class:`TargetProfile`: keys, types and allowed
    values are its fields' (and :class:`MeasureSettings`'), checked by
    :func:`~dcvit_deploy.store.records.from_dict`; unknown keys are refused.

    With ``check_backend`` the backend name is looked up in the registry and the backend checks
    its options and the device/precision/scope combination.
    """
    where = f"profile {source}"
    for table, record, label in (
        (data, TargetProfile, ""),
        (data.get("measure"), MeasureSettings, "[measure] "),
        (data.get("quantize"), QuantizeSettings, "[quantize] "),
    ):
        known = [f.name for f in dataclasses.fields(record)]
        unknown = [k for k in table if k not in known] if isinstance(table, Mapping) else []
        if unknown:
            raise ProfileError(
                f"{where}: unknown {label}key {unknown[0]!r}", f"use only: {', '.join(known)}"
            )
    sizes = data.get("batch_sizes")
    default = {"budget_batch_size": sizes[0] if sizes else 0} if isinstance(sizes, list) else {}
    try:
        profile = from_dict(TargetProfile, {**default, **data}, schema=None)
    except SchemaError as exc:
        raise ProfileError(
            f"{where}: {exc.problem}", "fix that value (the profiles/ folder has examples)"
        ) from exc
    safe_name(profile.name, f"{where}: name", ProfileError)
    sizes = profile.batch_sizes
    if max(sizes) > MAX_BATCH or len(set(sizes)) != len(sizes):
        raise ProfileError(
            f"{where}: batch_sizes = {list(sizes)} repeats a value or exceeds {MAX_BATCH}",
            "list each size once, e.g. batch_sizes = [1, 8]",
        )
    if profile.scope != "host" and profile.device != "cuda":
        raise ProfileError(
            f"{where}: scope = {profile.scope!r} needs device = 'cuda'", "use scope = 'host' on CPU"
        )
    profile = dataclasses.replace(profile, batch_sizes=tuple(sorted(sizes)))
    if check_backend:
        from dcvit_deploy.backends import get_backend

        try:
            backend = get_backend(profile.backend)
        except Exception as exc:
            fix = getattr(exc, "fix", None) or "install the backend or pick a built-in one"
            problem = getattr(exc, "problem", str(exc))
            raise ProfileError(f"{where}: backend = {profile.backend!r}: {problem}", fix) from exc
        from dcvit_deploy.export.quantize import check_precisions

        try:
            check_precisions(profile)
            for p in profile.precisions or (profile.precision,):
                backend.validate_profile(dataclasses.replace(profile, precision=p))
        except UserInputError as exc:
            problem = exc.problem.removeprefix(f"profile {profile.name}: ")
            raise ProfileError(f"{where}: {problem}", exc.fix) from exc
    return profile


if TYPE_CHECKING:
    from dcvit_deploy.config.options import DeployOptions


Target = tuple[TargetProfile, "DeployOptions"]
"""One target of ``--profile a,b,c``: its profile and the options naming it alone."""


def targets_of(dopts: DeployOptions) -> list[Target]:
    """Each target of ``--profile a,b,c``: its profile and the options naming it alone."""
    from dataclasses import replace

    from dcvit_deploy.errors import OptionError

    out: list[Target] = []
    for source in (s.strip() for s in dopts.profile.split(",")):
        if not source:
            raise OptionError(
                f"--profile {dopts.profile!r} has an empty entry",
                "separate targets by single commas, e.g. cpu-ort,t4-trt-fp16",
            )
        profile = load_profile(source)
        if any(p.name == profile.name for p, _ in out):
            raise OptionError(f"--profile names target {profile.name!r} twice", "list it once")
        out.append((profile, replace(dopts, profile=source)))
    return out
