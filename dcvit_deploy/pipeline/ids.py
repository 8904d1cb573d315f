"""Unit ids: where each unit's record lives in the manifest, as a type.

``str(UnitId)`` is the manifest key (``family``, ``train/<name>``, ``export/<precision>/<name>``,
``quantize/<profile>/<precision>/<name>``, ``build/<profile>/<name>``, ``profile/<profile>``,
``select/<profile>``, ``publish/<profile>``); :meth:`UnitId.parse` reads one back. Nothing else
builds or splits these strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

Kind = Literal["family", "train", "export", "quantize", "build", "profile", "select", "publish"]
FIELDS: dict[str, tuple[str, ...]] = {
    "family": (),
    "train": ("name",),
    "export": ("precision", "name"),
    "quantize": ("profile", "precision", "name"),
    "build": ("profile", "name"),
    "profile": ("profile",),
    "select": ("profile",),
    "publish": ("profile",),
}


@dataclass(frozen=True)
class UnitId:
    """One unit's id: its kind and whichever of target profile, precision and candidate or
    artifact name (``name``) the kind has."""

    kind: Kind
    profile: str = ""
    precision: str = ""
    name: str = ""

    def __str__(self) -> str:
        return "/".join([self.kind, *(getattr(self, f) for f in FIELDS[self.kind])])

    @classmethod
    def parse(cls, text: str) -> UnitId | None:
        """The id recorded as ``text``, or ``None`` when it is not a unit id."""
        kind, *parts = str(text).split("/")
        if kind not in FIELDS or len(parts) != len(FIELDS[kind]):
            return None
        return cls(cast("Kind", kind), **dict(zip(FIELDS[kind], parts, strict=True)))

    @property
    def candidate(self) -> str:
        """The candidate (structure) an artifact-level unit works on (``""``: none)."""
        return self.name.split(".", 1)[0]
