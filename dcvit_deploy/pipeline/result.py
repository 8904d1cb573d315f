"""What a job returns: the decision, every candidate's outcome, the files written and what the
user should be told."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dcvit_deploy.errors import DcvitError, NotPublished
    from dcvit_deploy.store.records import CandidateOutcome, Selection


@dataclass
class JobResult:
    """What a job did: the decision, every candidate's outcome, files written, notes."""

    selection: Selection | None
    outcomes: list[CandidateOutcome]
    reports: dict[str, Path] = field(default_factory=dict)
    triton: Path | None = None
    infeasible: DcvitError | None = None
    not_published: NotPublished | None = None
    notes: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    published: dict[str, Any] = field(default_factory=dict)
    skipped_images: list[str] = field(default_factory=list)
    fleet: dict[str, Any] = field(default_factory=dict)  # target -> choice (several targets)
