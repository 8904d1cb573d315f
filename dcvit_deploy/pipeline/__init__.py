"""The pipeline as step units over a locked run directory.

Each step is a unit with declared inputs (fingerprinted by content), a typed result, a status
and recorded outputs (checksummed): :mod:`.family` (compress the family; also the run's one
source of truth), :mod:`.export`, :mod:`.build`, :mod:`.profile`, :mod:`.select`,
:mod:`.publish`, :mod:`.report`. :mod:`.runner` executes them, skipping a unit only when its
fingerprint is unchanged and its outputs are intact; :mod:`.job` orders them, :mod:`.fleet` over
several targets; :mod:`.executor` runs independent work in this process or on Ray.
"""

from __future__ import annotations

from dcvit_deploy.pipeline.job import run_job, stage_job, status_of
from dcvit_deploy.pipeline.result import JobResult

__all__ = ["JobResult", "run_job", "stage_job", "status_of"]
