"""Records to and from plain JSON, in one place: :func:`to_dict` writes a record dataclass
stamped with the schema version, :func:`from_dict` reads it back, converting and checking every
field from its type annotation (a record's fields are its file format); :func:`read_json` does
that for a file, :func:`safe_name` checks a name that becomes a path component."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from dcvit_deploy.errors import DcvitError, SchemaError, UserInputError

SCHEMA_VERSION = 1
"""Version of every persisted record layout. Bump on incompatible change and add a migration."""

T = TypeVar("T")


def to_dict(record: Any) -> dict[str, Any]:
    """Serialise a record dataclass to a JSON-compatible dict, stamped with the schema version."""
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        raise TypeError(f"to_dict expects a record instance, got {type(record).__name__}")
    return {"schema": SCHEMA_VERSION, **_plain(record)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def from_dict(
    cls: type[T], data: Any, *, schema: int | None = SCHEMA_VERSION, localns: Any = None
) -> T:
    """Rebuild a record of type ``cls`` from :func:`to_dict` output, checking the ``schema``
    version (``None``: not stamped) and every field's type and invariants; :class:`SchemaError`
    names the first field that does not fit. ``localns`` resolves names ``cls`` imports lazily."""
    found = data.get("schema", schema) if isinstance(data, dict) else schema
    if schema is not None and found != schema:
        raise SchemaError(f"it was written with schema {found}; this version reads {schema}")
    return typing.cast(T, _build(cls, data, "", localns))


def _build(tp: Any, value: Any, where: str, ns: Any) -> Any:
    at = f"{where}: " if where else ""

    def bad(expected: str) -> SchemaError:
        return SchemaError(f"{at}expected {expected}, got {reprlib.repr(value)}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad(f"an object ({getattr(tp, '__name__', tp)})")
        hints, kwargs = typing.get_type_hints(tp, localns=ns), {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _build(
                    hints[f.name], value[f.name], f"{where}.{f.name}".lstrip("."), ns
                )
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError(f"{at}missing key {f.name!r}")
        try:
            return typing.cast(Any, tp)(**kwargs)
        except (ValueError, TypeError, DcvitError) as exc:
            raise SchemaError(f"{at}{getattr(exc, 'problem', exc)}") from exc
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        error = bad(str(tp))
        for arg in (a for a in typing.get_args(tp) if a is not type(None)):
            try:
                return _build(arg, value, where, ns)
            except SchemaError as exc:
                error = exc
        raise error
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)):
            return tuple(_build(args[0], v, f"{where}[{i}]", ns) for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)}" if args[-1] is not Ellipsis else "a list")
        return tuple(
            _build(a, v, f"{where}[{i}]", ns)
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("an object")
        vt = typing.get_args(tp)[1]
        return {k: _build(vt, v, f"{where}.{k}".lstrip("."), ns) for k, v in value.items()}
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad(f"one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if tp is float:
        if value is None or value in ("inf", "-inf"):
            return math.nan if value is None else float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp in (int, str, bool) and (
        isinstance(value, bool) != (tp is bool) or not isinstance(value, tp)
    ):
        raise bad(f"{'an' if tp is int else 'a'} {tp.__name__}")
    return value


def read_json(
    path: str | os.PathLike[str],
    record: type | None = None,
    *,
    what: str,
    fix: str,
    error: type[UserInputError] = UserInputError,
    **kw: Any,
) -> dict[str, Any]:
    """The JSON object in ``path``, checked on load as ``record`` (``kw`` go to :func:`from_dict`):
    any problem is one ``error`` naming the file, ``what`` it should be, the field and ``fix``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {p} not found", fix) from None
    except (OSError, ValueError) as exc:
        raise error(f"{p} is corrupt ({type(exc).__name__}: {str(exc)[:120]})", fix) from exc
    try:
        if not isinstance(data, dict):
            raise SchemaError(f"expected a JSON object, got {type(data).__name__}")
        if record is not None:
            from_dict(record, data, **kw)
    except SchemaError as exc:
        raise error(f"{p} is not a dcvit-deploy {what} ({exc.problem[:300]})", fix) from exc
    return data


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A name that becomes one file or folder name (profile, candidate, Triton model, precision)."""


def safe_name(value: Any, what: str, error: type[UserInputError] = UserInputError) -> str:
    """``value`` if it is one safe path component (:data:`SAFE_NAME`), else one line naming
    ``what`` (the option or file field) and the fix."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise error(
            f"{what} {reprlib.repr(value)} is not a usable file or folder name",
            "use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return value
