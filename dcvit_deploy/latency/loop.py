"""The one timing loop every backend measures with.

A backend hands :func:`measure` a zero-argument ``step`` (one inference; sessions, engines and
buffers already exist) and a :class:`Timer` (:class:`HostTimer`, with ``sync`` for enqueued
device work, or :class:`CudaEventTimer`). The rules (trtexec, perf_analyzer, Model Navigator):

1. **Warm-up**: at least ``warmup_iters`` steps *and* ``warmup_min_s`` seconds.
2. **Windows** of ``window_iters`` steps, each extended to ``min_window_s`` seconds.
3. **Stable** when the last :data:`STABILITY_WINDOWS` window medians satisfy ``max <= min *
   (1 + stability_tolerance)`` *and* the reported samples' CoV is at most ``max_cov`` (a bimodal
   run whose medians happen to agree is not stable).
4. **Stop** when stable after ``min_windows`` windows and ``min_duration_s``, or after
   ``max_windows`` (then ``stable=False`` with a warning).
5. **Settling**: leading windows outside the tolerance of a stable tail are left out of the
   statistics (``settle_windows``, an ``actions`` entry); the raw samples keep them first.
6. **Statistics** over the settled windows: numpy's linear percentiles, population ``std``,
   ``cov = std / mean``, throughput ``batch_size * 1000 / mean``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.store.atomic import atomic_write_json
from dcvit_deploy.store.records import SCHEMA_VERSION, LatencyStats, MeasureSettings, Scope

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

STABILITY_WINDOWS = 3
"""How many trailing window medians must agree for a run to count as stable."""

HIGH_COV = 0.10
"""Coefficient of variation above which a warning is attached (trtexec warns on unstable runs)."""


class Timer(Protocol):
    """Times one call of a step and tells wall-clock time for the loop's time budgets."""

    name: str

    def time_ms(self, step: Callable[[], None]) -> float:
        """Run ``step`` once and return its duration in milliseconds."""
        ...

    def wall_ns(self) -> int:
        """Monotonic integer nanoseconds for the loop's time budgets (no float drift)."""
        ...


class HostTimer:
    """Monotonic host clock around the step; ``sync`` (inside the timed region) for a step
    that only enqueues asynchronous work."""

    def __init__(self, sync: Callable[[], None] | None = None, *, name: str = "host") -> None:
        self.name = name
        self._sync = sync

    def time_ms(self, step: Callable[[], None]) -> float:
        sync = self._sync
        t0 = time.perf_counter_ns()
        step()
        if sync is not None:
            sync()
        return (time.perf_counter_ns() - t0) / 1e6

    def wall_ns(self) -> int:
        return time.perf_counter_ns()


class CudaEventTimer:
    """GPU time between CUDA events on ``stream`` (the step's stream) around the step; the
    end event is synchronised each time, so a sample is one inference's latency."""

    def __init__(
        self, stream: torch.cuda.Stream | None = None, *, name: str = "cuda_event"
    ) -> None:
        import torch

        self.name = name
        self._stream = stream if stream is not None else torch.cuda.current_stream()
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def time_ms(self, step: Callable[[], None]) -> float:
        self._start.record(self._stream)
        step()
        self._end.record(self._stream)
        self._end.synchronize()
        return float(self._start.elapsed_time(self._end))

    def wall_ns(self) -> int:
        return time.perf_counter_ns()


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100), numpy's default method."""
    if not len(values):
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def mean_std_cov(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, population standard deviation and coefficient of variation (0 for a mean <= 0)."""
    if not len(values):
        return 0.0, 0.0, 0.0
    xs = np.asarray(values, dtype=np.float64)
    mean, std = float(xs.mean()), float(xs.std())
    return mean, std, (std / mean if mean > 0 else 0.0)


def within_tolerance(medians: Sequence[float], tolerance: float) -> bool:
    """``max <= min * (1 + tolerance)``: a product, so a spread of exactly the tolerance passes."""
    return max(medians) <= min(medians) * (1.0 + tolerance)


def spread(medians: Sequence[float]) -> float:
    """``max / min - 1`` of window medians: 0 when they agree exactly (inf if min is 0)."""
    lo, hi = min(medians), max(medians)
    if lo <= 0.0:
        return 0.0 if hi <= 0.0 else math.inf
    return hi / lo - 1.0


def summarize(
    samples_ms: Sequence[float],
    *,
    batch_size: int,
    scope: Scope,
    timer: str,
    window_medians: Sequence[float] = (),
    stable: bool = True,
    warmup_iters: int = 0,
    duration_s: float = 0.0,
    warnings: Sequence[str] = (),
) -> LatencyStats:
    """Distribution statistics of per-iteration latencies (milliseconds)."""
    if not samples_ms:
        raise ValueError("no latency samples to summarise")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    xs = sorted(float(x) for x in samples_ms)
    n = len(xs)
    mean, std, cov = mean_std_cov(xs)
    return LatencyStats(
        batch_size=batch_size,
        iterations=n,
        mean=mean,
        std=std,
        cov=cov,
        min=xs[0],
        max=xs[-1],
        p50=percentile(xs, 50),
        p90=percentile(xs, 90),
        p95=percentile(xs, 95),
        p99=percentile(xs, 99),
        throughput=batch_size * 1000.0 / mean if mean > 0 else math.inf,
        scope=scope,
        timer=timer,
        windows=len(window_medians),
        window_medians=tuple(window_medians),
        stable=stable,
        warmup_iters=warmup_iters,
        duration_s=duration_s,
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------- the loop


def measure(
    step: Callable[[], None],
    *,
    settings: MeasureSettings,
    batch_size: int,
    scope: Scope,
    timer: Timer,
    cov_warn: float = HIGH_COV,
) -> tuple[LatencyStats, list[float]]:
    """Warm up, time ``step`` in windows until stable (or bounded out), and summarise; returns
    the statistics and every timed latency (ms) in order."""
    warmup_ns = _ns(settings.warmup_min_s)
    window_ns = _ns(settings.min_window_s)
    duration_ns = _ns(settings.min_duration_s)
    warmup_done = 0
    start = timer.wall_ns()
    while warmup_done < settings.warmup_iters or timer.wall_ns() - start < warmup_ns:
        timer.time_ms(step)
        warmup_done += 1

    k = min(STABILITY_WINDOWS, settings.max_windows)
    tol = settings.stability_tolerance
    raw: list[float] = []
    starts: list[int] = []  # index in raw of each window's first sample
    medians: list[float] = []
    stable = False
    medians_agree = False
    settle = 0
    cov = 0.0
    t0 = timer.wall_ns()
    elapsed_ns = 0
    while True:
        window: list[float] = []
        w0 = timer.wall_ns()
        while len(window) < settings.window_iters or timer.wall_ns() - w0 < window_ns:
            window.append(timer.time_ms(step))
        starts.append(len(raw))
        raw.extend(window)
        medians.append(median(window))
        elapsed_ns = timer.wall_ns() - t0
        medians_agree = len(medians) >= k and within_tolerance(medians[-k:], tol)
        settle = settled_from(medians, tol, k) if medians_agree else 0
        cov = mean_std_cov(raw[starts[settle] :])[2]
        stable = medians_agree and cov <= settings.max_cov
        enough = len(medians) >= settings.min_windows and elapsed_ns >= duration_ns
        if (enough and stable) or len(medians) >= settings.max_windows:
            break
    elapsed = elapsed_ns / 1e9
    if not stable:
        settle = 0  # nothing is "the settled part" of an unstable run: report all of it

    warnings: list[str] = []
    if k < STABILITY_WINDOWS:
        warnings.append(
            f"stability judged over {k} window(s) only because max_windows={settings.max_windows}"
            f"; raise max_windows to at least {STABILITY_WINDOWS}"
        )
    if not medians_agree:
        last = ", ".join(f"{m:.4g}" for m in medians[-k:])
        warnings.append(
            f"latency did not stabilise: the last {k} window medians ({last} ms) differ by "
            f"{spread(medians[-k:]):.1%} > {settings.stability_tolerance:.0%} after "
            f"{len(medians)} windows (max_windows); quiet the machine or raise max_windows"
        )
    elif not stable:
        warnings.append(
            f"latency did not stabilise: window medians agree but the samples' coefficient of "
            f"variation is {cov:.1%} > max_cov {settings.max_cov:.0%} after {len(medians)} "
            "windows (max_windows); the machine is probably busy -- quiet it, or measure in "
            "interleaved rounds"
        )
    if elapsed_ns < duration_ns:
        warnings.append(
            f"timed for {elapsed:.3g} s, less than min_duration_s={settings.min_duration_s:g} "
            "because max_windows was reached; raise window_iters or max_windows"
        )
    stats = summarize(
        raw[starts[settle] :],
        batch_size=batch_size,
        scope=scope,
        timer=timer.name,
        window_medians=medians,
        stable=stable,
        warmup_iters=warmup_done,
        duration_s=elapsed,
    )
    if settle:
        early = ", ".join(f"{m:.4g}" for m in medians[:settle])
        stats = dataclasses.replace(
            stats,
            settle_windows=settle,
            actions=(
                f"left {settle} leading window(s) out of the statistics (medians {early} ms) "
                f"because they differ from the settled windows by more than {tol:.0%}",
            ),
        )
    if stats.cov > cov_warn:
        warnings.append(
            f"high variation: coefficient of variation {stats.cov:.1%} > {cov_warn:.0%}; "
            "results may not be reproducible"
        )
    if stats.min <= 0.0:
        warnings.append("some iterations were faster than the timer's resolution")
    if warnings:
        stats = _with_warnings(stats, warnings)
    return stats, raw


def settled_from(medians: Sequence[float], tolerance: float, k: int = STABILITY_WINDOWS) -> int:
    """Index of the first window of the longest suffix (at least ``k`` windows) whose medians
    all lie within ``tolerance`` of each other; ``len(medians) - k`` when only the last ``k``
    agree. Callers check that the last ``k`` agree first."""
    start = max(len(medians) - k, 0)
    while start > 0 and within_tolerance(medians[start - 1 :], tolerance):
        start -= 1
    return start


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _with_warnings(stats: LatencyStats, warnings: Sequence[str]) -> LatencyStats:
    return dataclasses.replace(stats, warnings=tuple(stats.warnings) + tuple(warnings))


# --------------------------------------------------------------------------- machine state


def own_threads(backend_options: Mapping[str, Any]) -> int:
    """How many CPU threads a measurement with these options keeps busy (0 = one per core)."""
    from dcvit_deploy.latency.machine import usable_cores

    n = backend_options.get("intra_op_num_threads", backend_options.get("num_threads", 0))
    try:
        n = int(n)
    except (TypeError, ValueError):
        n = 0
    return n if n > 0 else usable_cores()


def with_machine_state(
    stats: LatencyStats,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    *,
    backend: str,
    backend_options: Mapping[str, Any],
) -> LatencyStats:
    """``stats`` with ``machine`` = {before, after, threads} and a warning if the machine was
    busy (:func:`dcvit_deploy.latency.machine.busy_warning`)."""
    from dcvit_deploy.latency.machine import busy_warning, runtime_threads

    machine = {
        "before": dict(before),
        "after": dict(after),
        "threads": runtime_threads(backend, dict(backend_options)),
    }
    warning = busy_warning(dict(before), dict(after), own_threads=own_threads(backend_options))
    warnings = tuple(stats.warnings) + ((warning,) if warning else ())
    return dataclasses.replace(stats, machine=machine, warnings=warnings)


# --------------------------------------------------------------------------- raw samples


def save_raw(
    path: str | Path, raw_ms: Sequence[float], *, meta: dict[str, Any] | None = None
) -> Path:
    """Write per-iteration latencies atomically as ``{"schema", "unit": "ms", "samples",
    "meta"}`` JSON."""
    target = Path(path)
    if target.suffix != ".json":
        raise UserInputError(
            f"cannot save raw timings as {target.name!r}", "use a file name ending in .json"
        )
    samples = [float(x) for x in raw_ms]
    data = {"schema": SCHEMA_VERSION, "unit": "ms", "samples": samples, "meta": dict(meta or {})}
    atomic_write_json(target, data)
    return target


def load_raw(path: str | Path) -> list[float]:
    """Read per-iteration latencies written by :func:`save_raw`."""
    return [float(x) for x in json.loads(Path(path).read_text(encoding="utf-8"))["samples"]]
