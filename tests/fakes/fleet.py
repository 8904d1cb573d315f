"""Helpers that Ray workers import (tests/ is on their path): scripted latency figures and a
task that kills its own worker once."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

FIGURES_ENV = "DCVIT_TEST_SCRIPTED_FIGURES"
"""A JSON file ``{profile name: {candidate: p50 ms}}``: the profile unit reports these figures
for the profiles it names instead of measuring (every other profile is measured)."""


def scripted_stats(batch: int, p50: float) -> Any:
    from dcvit_deploy.store.records import LatencyStats

    return LatencyStats(batch_size=batch, iterations=100, mean=p50, std=0.0, cov=0.0, min=p50,
                        max=p50, p50=p50, p90=p50, p95=p50, p99=p50, throughput=1e3 * batch / p50,
                        scope="host", timer="scripted", windows=3, window_medians=(p50,) * 3,
                        stable=True, warmup_iters=0, duration_s=0.0)  # fmt: skip


def install_scripted_figures() -> None:
    """Patch the profile unit (in this process; in Ray workers through their setup hook)."""
    from dcvit_deploy.pipeline.units.measuring import ProfileUnit

    if getattr(ProfileUnit.measure, "scripted", False):
        return
    original = ProfileUnit.measure

    def measure(self: Any, ctx: Any, names: list[str], latency: dict, errors: dict, files: list):
        path = os.environ.get(FIGURES_ENV, "")
        script = json.loads(Path(path).read_text()) if path and Path(path).is_file() else {}
        figures = script.get(self.profile.name)
        if figures is None:
            return original(self, ctx, names, latency, errors, files)
        for n in names:
            latency[n] = [scripted_stats(b, figures[n]) for b in self.profile.batch_sizes]
        return None

    measure.scripted = True  # type: ignore[attr-defined]
    ProfileUnit.measure = measure  # type: ignore[method-assign]


def die_once(marker: str, fn: Any, *args: Any) -> Any:
    """Kill this worker process the first time (``marker`` absent), else return ``fn(*args)``."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return fn(*args)


def finetuned(student: Any, teacher: Any, images: Any, seed: int) -> dict[str, Any]:
    """A few seeded finetune steps of ``student`` (in place); its weights."""
    from dcvit_deploy.compress.finetune import FinetuneSchedule, feature_mimic

    feature_mimic(student, teacher, images, FinetuneSchedule.tiny(batch_size=2), trainable_upto=1,
                  seed=seed)  # fmt: skip
    return student.state_dict()


def slow_write(path: str, seconds: float) -> str:
    import time

    time.sleep(seconds)
    Path(path).write_text("finished")
    return path
