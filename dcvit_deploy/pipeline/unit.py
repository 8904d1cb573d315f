"""The unit protocol: one step of the pipeline, with declared inputs and recorded outputs.

A unit (compress the family, export one candidate, build one artifact, profile a family on a
target, select, publish, report) declares

- ``id``: where its record lives in the manifest, ``str`` of its :class:`~.ids.UnitId`;
- ``inputs()``: everything that changes its result, by *content* (image bytes, weights
  checksums, the options that matter, the profile's content, runtime versions where the
  result depends on them, the device for measurements). Its fingerprint is a hash of these;
- ``execute(ctx)``: does the work and returns a :class:`UnitOutput`: a JSON-able result and
  the files it wrote, which the runner checksums into the record;
- ``optional``: a failure of an optional unit (one candidate's export) is recorded as FAILED
  and the run goes on; a required unit's failure stops the run.

The :class:`~dcvit_deploy.pipeline.runner.Runner` skips a unit only when its record is OK, its
fingerprint matches and every recorded output still exists with its checksum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from dcvit_deploy.pipeline.context import JobContext

UnitStatus = Literal["ok", "failed", "skipped"]
"""``ok``: done (now or reused); ``failed``: recorded with its reason; ``skipped``: not
applicable (e.g. a candidate whose export failed is not built), with the reason."""


@dataclass(frozen=True)
class UnitOutput:
    """What :meth:`Unit.execute` returns: a JSON-able result and the files it wrote."""

    result: dict[str, Any]
    files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class UnitResult:
    """What the runner returns for a unit: its status, reason and result."""

    unit: str
    status: UnitStatus
    result: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    reused: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Unit(Protocol):
    """A pipeline step (see the module docstring)."""

    id: str
    optional: bool

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        """Everything that changes the result, JSON-able, by content."""
        ...

    def execute(self, ctx: JobContext) -> UnitOutput:
        """Do the work; raise a :class:`~dcvit_deploy.errors.DcvitError` for a failure."""
        ...
