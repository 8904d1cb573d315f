"""The shared timing loop, driven by a scripted clock: exact statistics and stop decisions."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence

import pytest

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.latency.loop import (
    HostTimer,
    load_raw,
    measure,
    percentile,
    save_raw,
    spread,
)
from dcvit_deploy.store.records import LatencyStats, MeasureSettings


class ScriptedTimer:
    """Each timed call takes the next scripted duration; the clock advances by exactly that.

    The clock counts integer nanoseconds so time budgets are compared without rounding drift.
    Running past the script fails the test (a loop that does not stop is a bug).
    """

    name = "scripted"

    def __init__(self, durations_ms: Sequence[float]) -> None:
        self._durations = list(durations_ms)
        self._ns = 0
        self.calls = 0

    def time_ms(self, step: Callable[[], None]) -> float:
        step()
        if self.calls >= len(self._durations):
            raise AssertionError(f"the loop asked for more than {len(self._durations)} steps")
        ms = self._durations[self.calls]
        self.calls += 1
        self._ns += round(ms * 1_000_000)
        return ms

    def wall_ns(self) -> int:
        return self._ns


def settings(**overrides: object) -> MeasureSettings:
    base: dict[str, object] = dict(
        warmup_iters=0,
        warmup_min_s=0.0,
        window_iters=4,
        min_window_s=0.0,
        min_windows=3,
        max_windows=10,
        stability_tolerance=0.10,
        min_duration_s=0.0,
    )
    base.update(overrides)
    return MeasureSettings(**base)  # type: ignore[arg-type]


def run(
    durations: Sequence[float], **overrides: object
) -> tuple[LatencyStats, list[float], ScriptedTimer]:
    timer = ScriptedTimer(durations)
    steps: list[int] = []
    stats, raw = measure(
        lambda: steps.append(1),
        settings=settings(**overrides),
        batch_size=1,
        scope="host",
        timer=timer,
    )
    assert len(steps) == timer.calls  # every timed call ran the step exactly once
    return stats, raw, timer


def test_exact_statistics_exclude_warmup() -> None:
    warm = [500.0, 500.0]
    windows: list[float] = [*[10, 11, 12, 13], *[10, 12, 11, 20], *[11, 11, 12, 12]]  # 3 windows
    timer = ScriptedTimer(warm + windows)
    stats, raw = measure(
        lambda: None,
        settings=settings(warmup_iters=2),
        batch_size=4,
        scope="host",
        timer=timer,
    )
    xs = sorted(windows)  # [10,10,11,11,11,11,12,12,12,12,13,20]
    assert raw == [float(x) for x in windows]
    assert stats.iterations == 12 and stats.warmup_iters == 2
    assert stats.window_medians == (11.5, 11.5, 11.5) and stats.windows == 3
    assert stats.stable is True
    assert stats.mean == pytest.approx(145 / 12)
    assert stats.std == pytest.approx(statistics.pstdev(xs))
    assert stats.cov == pytest.approx(statistics.pstdev(xs) / (145 / 12))
    assert (stats.min, stats.max) == (10.0, 20.0)
    assert stats.p50 == pytest.approx(11.5)  # rank 5.5 between 11 and 12
    assert stats.p90 == pytest.approx(12.9)  # rank 9.9 between 12 and 13
    assert stats.p95 == pytest.approx(16.15)  # rank 10.45 between 13 and 20
    assert stats.p99 == pytest.approx(19.23)
    assert stats.throughput == pytest.approx(4 * 1000 / (145 / 12))
    assert stats.duration_s == pytest.approx(sum(windows) / 1000)
    assert stats.timer == "scripted" and stats.scope == "host" and stats.batch_size == 4
    # The 20 ms outlier gives a 21% coefficient of variation: the only warning.
    assert len(stats.warnings) == 1 and "coefficient of variation 21.0%" in stats.warnings[0]


def test_warmup_runs_until_both_count_and_time_are_met() -> None:
    # 1 warm-up iteration asked, but 50 ms minimum at 10 ms each -> 5 warm-up steps.
    stats, _, timer = run([10.0] * 5 + [1.0] * 12, warmup_iters=1, warmup_min_s=0.05)
    assert stats.warmup_iters == 5
    assert timer.calls == 17


def test_windows_extend_to_min_window_time() -> None:
    # window_iters=2 but each window must last 100 ms at 20 ms a step -> 5 steps per window.
    stats, raw, _ = run([20.0] * 15, window_iters=2, min_window_s=0.1)
    assert stats.windows == 3
    assert len(raw) == 15 and stats.iterations == 15


def test_stops_as_soon_as_last_three_windows_agree() -> None:
    # A slow first window (cold caches) then three agreeing ones: stop after window 4.
    durations = [100.0] * 4 + [10.0] * 12
    stats, _, timer = run(durations)
    assert stats.windows == 4 and stats.stable is True
    assert stats.window_medians == (100.0, 10.0, 10.0, 10.0)
    assert timer.calls == 16
    # The slow first window had not settled: left out of the statistics, counted and said.
    assert stats.settle_windows == 1 and stats.iterations == 12
    assert stats.max == 10.0 and stats.p50 == 10.0
    assert any("left 1 leading window(s) out" in a for a in stats.actions)


def test_fast_phase_after_warmup_is_not_the_figure() -> None:
    # Issue 11: the first sustained round after warm-up ran at 27 ms, every later one at 35 ms.
    # The old loop stopped on three agreeing 27 ms windows... only if they came first; here
    # two fast windows then the steady state: the figure is the steady state.
    durations = [27.0] * 8 + [35.0] * 12
    stats, raw, _ = run(durations)
    assert stats.stable is True and stats.settle_windows == 2
    assert stats.p50 == 35.0
    assert len(raw) == 20  # the raw samples still hold the settling windows


def test_cov_40_percent_is_not_stable() -> None:
    # Regression (issue 11): a bimodal busy-machine run -- every window has the same median,
    # but a third of the samples are 2.2x slower: CoV ~40 %, reported "stable: yes" before.
    window = [5.0, 5.0, 11.0] * 4  # median 5.0 in every window
    stats, _, timer = run(window * 5, window_iters=12, max_windows=5)
    assert stats.window_medians == (5.0,) * 5
    assert stats.cov == pytest.approx(0.4, abs=0.05)
    assert stats.stable is False
    assert timer.calls == 60  # kept measuring to max_windows instead of stopping at 3
    assert any("coefficient of variation" in w and "max_cov" in w for w in stats.warnings)


def test_max_cov_is_configurable() -> None:
    window = [5.0, 5.0, 11.0] * 4
    stats, _, _ = run(window * 3, window_iters=12, max_cov=0.5)
    assert stats.stable is True and stats.windows == 3


def test_unstable_run_is_bounded_and_reported() -> None:
    # Window medians alternate 10 / 20 ms: never within 10%; stop at max_windows=5.
    durations: list[float] = []
    for i in range(5):
        durations += [10.0 if i % 2 == 0 else 20.0] * 4
    stats, _, timer = run(durations, max_windows=5)
    assert stats.windows == 5 and timer.calls == 20
    assert stats.stable is False
    assert any("did not stabilise" in w and "100.0%" in w for w in stats.warnings)


def test_stability_tolerance_boundary() -> None:
    # medians 10, 11, 10: spread 10% -> stable at tolerance 0.10, unstable at 0.09.
    durations = [10.0] * 4 + [11.0] * 4 + [10.0] * 4
    stable, _, _ = run(durations, stability_tolerance=0.10, max_windows=3)
    unstable, _, _ = run(durations, stability_tolerance=0.09, max_windows=3)
    assert stable.stable is True
    assert unstable.stable is False


def test_min_duration_keeps_measuring_stable_windows() -> None:
    # Stable from the start, but 100 ms of windows are required at 4 ms per window.
    stats, _, _ = run([1.0] * 100, min_duration_s=0.1, max_windows=30)
    assert stats.windows == 25 and stats.stable is True
    assert not stats.warnings


def test_min_duration_not_reached_is_warned() -> None:
    stats, _, _ = run([1.0] * 20, min_duration_s=0.1, max_windows=5)
    assert stats.windows == 5
    assert any("min_duration_s" in w for w in stats.warnings)


def test_high_cov_is_unstable_even_when_medians_agree() -> None:
    stats, _, _ = run([1.0, 1.0, 1.0, 100.0] * 10)
    assert stats.stable is False  # agreeing medians, CoV > 100 %: not stable (issue 11)
    assert stats.cov > 1.0 and stats.windows == 10
    assert any("coefficient of variation" in w for w in stats.warnings)


def test_fewer_than_three_windows_is_warned() -> None:
    stats, _, _ = run([5.0] * 8, min_windows=1, max_windows=2)
    assert stats.windows == 2 and stats.stable is True
    assert any("2 window(s)" in w for w in stats.warnings)


def test_percentile_and_spread_helpers() -> None:
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError):
        percentile([], 50)
    assert spread([10.0, 11.0, 10.5]) == pytest.approx(0.1)
    assert math.isinf(spread([0.0, 1.0]))


def test_host_timer_includes_sync() -> None:
    order: list[str] = []
    timer = HostTimer(sync=lambda: order.append("sync"))
    ms = timer.time_ms(lambda: order.append("step"))
    assert order == ["step", "sync"]
    assert ms >= 0.0 and timer.wall_ns() > 0


def test_save_raw_roundtrip_atomic(tmp_path) -> None:
    path = tmp_path / "raw.json"
    save_raw(path, [1.5, 2.25, 3.0], meta={"candidate": "c1"})
    assert load_raw(path) == [1.5, 2.25, 3.0]
    assert not list(tmp_path.glob("*.partial"))
    data = json.loads(path.read_text())
    assert data["unit"] == "ms" and data["meta"] == {"candidate": "c1"} and data["schema"] == 1


def test_save_raw_refuses_unknown_format(tmp_path) -> None:
    with pytest.raises(UserInputError) as err:
        save_raw(tmp_path / "raw.csv", [1.0])
    assert "ending in .json" in str(err.value)
