"""A plugin backend for end-to-end selection tests: real ONNX Runtime CPU artifacts, real
verification, scripted latencies.

It is found the way a third-party backend is: through the entry point of the ``*.dist-info``
folder next to this file (group ``dcvit_deploy.backends``). With this folder on ``sys.path``
and ``PYTHONPATH``, the pipeline and the fresh confirmation process
(``python -m dcvit_deploy.latency.confirm JOB OUT``) both load it by name.

The script is the JSON file named by ``$DCVIT_SCRIPTED_LATENCY``::

    {"run": {"original": 4.0, "dcvit-1003": 3.5}, "fresh": {"dcvit-1003": 9.0}}

A key names a candidate or the start of its name up to a ``-`` (``dcvit-1003`` for
``dcvit-1003-n1h221``). Every timed step of a candidate at batch B runs the real session and
reports exactly ``B * run[key]`` ms -- in the confirmation process ``B * fresh[key]`` when the
script has one. Every measurement opened appends one JSON line (pid, process, candidate,
batch size) to ``<script>.log``, so a test sees which process measured what.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from dcvit_deploy.backends.base import ReadyMeasurement, timed
from dcvit_deploy.backends.onnxruntime import OnnxRuntimeBackend
from dcvit_deploy.store.records import Artifact, LatencyStats, TargetProfile

ENV = "DCVIT_SCRIPTED_LATENCY"
CONFIRM_MODULE = "dcvit_deploy.latency.confirm"


def process_kind() -> str:
    """``fresh`` in the confirmation process, ``run`` anywhere else."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "fresh" if getattr(spec, "name", "") == CONFIRM_MODULE else "run"


def scripted_ms(candidate: str, batch_size: int) -> float:
    """The scripted figure of ``candidate`` at ``batch_size`` in this process (and log it)."""
    path = Path(os.environ[ENV])
    script = json.loads(path.read_text())
    kind = process_kind()
    table = {**script["run"], **(script.get("fresh", {}) if kind == "fresh" else {})}
    key = next((k for k in table if candidate == k or candidate.startswith(k + "-")), None)
    if key is None:
        raise KeyError(f"{path} scripts no latency for candidate {candidate!r}")
    entry = {"pid": os.getpid(), "process": kind, "candidate": candidate, "batch": batch_size}
    with open(f"{path}.log", "a") as log:
        log.write(json.dumps(entry) + "\n")
    return float(table[key]) * batch_size


class ScriptedTimer:
    """Runs the step, then reports the scripted duration."""

    name = "scripted"

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def time_ms(self, step: Callable[[], None]) -> float:
        step()
        return self.ms

    def wall_ns(self) -> int:
        return time.perf_counter_ns()


class ScriptedBackend(OnnxRuntimeBackend):
    """ONNX Runtime on CPU for build, run and verification; the script for every figure."""

    name: ClassVar[str] = "scripted"
    triton_platform: ClassVar[str] = "onnxruntime_onnx"  # its artifacts are plain ONNX files

    def open_measurement(
        self, artifact: Artifact, profile: TargetProfile, batch_size: int
    ) -> ReadyMeasurement:
        handle = super().open_measurement(artifact, profile, batch_size)
        handle.timer = ScriptedTimer(scripted_ms(artifact.candidate, batch_size))
        return handle

    def measure(
        self,
        artifact: Artifact,
        profile: TargetProfile,
        batch_size: int,
        *,
        raw_path: Path | None = None,
    ) -> LatencyStats:
        handle = self.open_measurement(artifact, profile, batch_size)
        try:
            return timed(
                handle.step,
                profile=profile,
                artifact=artifact,
                batch_size=batch_size,
                timer=handle.timer,
                raw_path=raw_path,
            )
        finally:
            handle.close()
