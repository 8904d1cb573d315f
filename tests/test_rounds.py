"""Interleaved rounds across candidates, driven by a scripted machine clock shared by all."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from dcvit_deploy.backends.base import ReadyMeasurement, timed
from dcvit_deploy.latency.loop import load_raw, summarize
from dcvit_deploy.latency.machine import busy_warning
from dcvit_deploy.latency.rounds import measure_rounds
from dcvit_deploy.selection.decide import dominated
from dcvit_deploy.store.records import (
    Artifact,
    CandidateOutcome,
    LatencyStats,
    MacCount,
    MeasureSettings,
    TargetProfile,
)

BASE_MS = {"c100": 10.0, "c80": 8.0, "c60": 6.0}
RETAINED = {"c100": 1.0, "c80": 0.8, "c60": 0.6}


class Machine:
    """One clock for every candidate: a step of ``name`` takes ``base[name]`` ms, ``factor``
    times longer while the clock is inside a busy interval (another process's burst)."""

    def __init__(
        self,
        base: Mapping[str, float],
        busy: tuple[tuple[float, float], ...] = (),
        factor: float = 2.5,
    ) -> None:
        self.base = dict(base)
        self.busy = busy
        self.factor = factor
        self.ns = 0

    def step_ms(self, name: str) -> float:
        now_ms = self.ns / 1e6
        slow = any(lo <= now_ms < hi for lo, hi in self.busy)
        ms = self.base[name] * (self.factor if slow else 1.0)
        self.ns += round(ms * 1e6)
        return ms


class MachineTimer:
    name = "scripted"

    def __init__(self, machine: Machine, candidate: str) -> None:
        self.machine = machine
        self.candidate = candidate

    def time_ms(self, step: Callable[[], None]) -> float:
        step()
        return self.machine.step_ms(self.candidate)

    def wall_ns(self) -> int:
        return self.machine.ns


class FakeBackend:
    """The Backend seam: ``measure`` runs the shared loop on the machine's clock; with
    ``with_open`` it also offers ``open_measurement``."""

    name = "fake"
    needs_module = False

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.measure_calls: list[tuple[str, int]] = []

    def measure(
        self,
        artifact: Artifact,
        profile: TargetProfile,
        batch_size: int,
        *,
        raw_path: Path | None = None,
    ) -> LatencyStats:
        self.measure_calls.append((artifact.candidate, batch_size))
        return timed(
            lambda: None,
            profile=profile,
            artifact=artifact,
            batch_size=batch_size,
            timer=MachineTimer(self.machine, artifact.candidate),
            raw_path=raw_path,
        )


class OpeningBackend(FakeBackend):
    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        self.opened: list[str] = []
        self.closed: list[str] = []

    def open_measurement(
        self, artifact: Artifact, profile: TargetProfile, batch_size: int
    ) -> ReadyMeasurement:
        name = artifact.candidate
        self.opened.append(name)
        return ReadyMeasurement(
            lambda: None, MachineTimer(self.machine, name), lambda: self.closed.append(name)
        )


SETTINGS = MeasureSettings(
    warmup_iters=2,
    warmup_min_s=0.0,
    window_iters=5,
    min_window_s=0.0,
    min_windows=3,
    max_windows=3,
    min_duration_s=0.0,
    min_rounds=5,
    max_rounds=5,
    round_windows=1,
)


def profile(
    settings: MeasureSettings = SETTINGS, batch_sizes: tuple[int, ...] = (1,)
) -> TargetProfile:
    return TargetProfile(
        name="fake-cpu",
        backend="fake",
        device="cpu",
        precision="fp32",
        batch_sizes=batch_sizes,
        budget_batch_size=batch_sizes[0],
        statistic="p50",
        scope="host",
        measure=settings,
        backend_options={"intra_op_num_threads": 1},
    )


def artifact(name: str) -> Artifact:
    return Artifact(
        candidate=name,
        backend="fake",
        path=f"{name}.onnx",
        sha256="0" * 64,
        precision="fp32",
        input_name="input",
        output_name="output",
        input_shape=(3, 8, 8),
        build_seconds=0.0,
    )


ARTIFACTS = {name: artifact(name) for name in BASE_MS}


def outcomes(latency: Mapping[str, LatencyStats]) -> list[CandidateOutcome]:
    return [
        CandidateOutcome(
            candidate=name,
            method="dcvit",
            retained=RETAINED[name],
            macs=MacCount(linear_norm=int(1e6 * RETAINED[name]), full=0, params=0),
            status="ok",
            latency=(latency[name],),
        )
        for name in BASE_MS
    ]


# --------------------------------------------------------------------------- regression


def test_regression_burst_during_one_candidate_no_longer_marks_it_dominated() -> None:
    # Issue 11: each candidate measured once, at its own moment. A burst of load from another
    # process (2.5x slower, 300..570 ms) lands exactly on c60, the smallest and fastest.
    busy = ((300.0, 570.0),)
    today = FakeBackend(Machine(BASE_MS, busy))
    single = {n: today.measure(a, profile(), 1) for n, a in ARTIFACTS.items()}
    assert single["c60"].p50 == 15.0  # measured entirely inside the burst
    assert dominated(outcomes(single), 1, "p50") == {"c60": "c80"}  # today: wrongly dominated

    # The same machine, the same burst, measured in interleaved rounds.
    fake = FakeBackend(Machine(BASE_MS, busy))
    result = measure_rounds(fake, ARTIFACTS, profile(), seed=0)
    stats = {n: result.at(n, 1) for n in BASE_MS}
    assert result.rounds == 5
    assert {n: s.p50 for n, s in stats.items()} == BASE_MS  # medians over rounds
    assert dominated(outcomes(stats), 1, "p50") == {}
    hit = [n for n, s in stats.items() if max(s.round_medians) > BASE_MS[n]]
    assert hit  # the burst did hit some rounds -- it just no longer decides anything
    for name in hit:
        assert stats[name].round_medians.count(BASE_MS[name]) >= 3


def test_interleaving_removes_the_first_measured_advantage() -> None:
    # A fast phase for the first 200 ms of sustained work (turbo, a cold neighbour): whatever
    # is measured first gets it. Sequentially, c100 looks faster than c80.
    machine = Machine(BASE_MS, ((200.0, 1e12),), factor=1.4)
    seq = FakeBackend(machine)
    single = {n: seq.measure(a, profile(), 1) for n, a in ARTIFACTS.items()}
    assert single["c100"].p50 < single["c80"].p50
    fake = FakeBackend(Machine(BASE_MS, ((200.0, 1e12),), factor=1.4))
    result = measure_rounds(fake, ARTIFACTS, profile(), seed=3)
    p50 = {n: result.at(n, 1).p50 for n in BASE_MS}
    assert p50["c100"] > p50["c80"] > p50["c60"]


# --------------------------------------------------------------------------- mechanics


def test_rounds_shuffle_order_per_round_seeded() -> None:
    def orders(seed: int) -> tuple[tuple[str, ...], ...]:
        return measure_rounds(FakeBackend(Machine(BASE_MS)), ARTIFACTS, profile(), seed=seed).orders

    a, b = orders(1), orders(1)
    assert a == b and len(a) == 5
    assert all(sorted(o) == sorted(BASE_MS) for o in a)
    assert len({o[0] for o in a}) > 1 or len(set(a)) > 1  # not the same order every round
    assert orders(2) != a


def test_early_stop_after_min_rounds_and_bound_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import dcvit_deploy.latency.rounds as rounds_mod

    settings = dataclasses.replace(SETTINGS, min_rounds=2, max_rounds=6)
    seen: list[int] = []

    def agree_from_3(est: Mapping[str, tuple[LatencyStats, ...]], tol: float) -> bool:
        if "c60" in est:
            seen.append(est["c60"][0].rounds)
        return all(s[0].rounds >= 3 for s in est.values())

    monkeypatch.setattr(rounds_mod, "rounds_stable", agree_from_3)
    fake = FakeBackend(Machine(BASE_MS))
    result = measure_rounds(fake, ARTIFACTS, profile(settings))
    assert result.rounds == 3 and result.stopped_early and seen == [2, 3]
    assert len(fake.measure_calls) == 9
    assert any("until its rounds agreed" in a for a in result.at("c60", 1).actions)
    monkeypatch.setattr(rounds_mod, "rounds_stable", lambda est, tol: False)
    never = measure_rounds(FakeBackend(Machine(BASE_MS)), ARTIFACTS, profile(settings))
    assert never.rounds == 6 and not never.stopped_early
    assert any("max_rounds=6" in a for a in never.at("c60", 1).actions)


def test_a_candidate_whose_rounds_agree_leaves_the_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """One noisy candidate keeps itself in the rounds, not the whole family: the others stop at
    min_rounds, it goes on (alone) to max_rounds."""
    import dcvit_deploy.latency.rounds as rounds_mod

    settings = dataclasses.replace(SETTINGS, min_rounds=2, max_rounds=5)
    monkeypatch.setattr(rounds_mod, "rounds_stable", lambda est, tol: "c80" not in est)
    fake = FakeBackend(Machine(BASE_MS))
    result = measure_rounds(fake, ARTIFACTS, profile(settings))
    calls = {n: sum(1 for c, _ in fake.measure_calls if c == n) for n in BASE_MS}
    assert calls == {"c100": 2, "c80": 5, "c60": 2}
    assert [len(o) for o in result.orders] == [3, 3, 1, 1, 1] and result.rounds == 5
    assert not result.stopped_early
    assert result.at("c60", 1).rounds == 2 and result.at("c80", 1).rounds == 5
    assert any("max_rounds=5" in a for a in result.at("c80", 1).actions)
    assert not result.at("c60", 1).actions  # agreed at min_rounds: nothing to say


def _zero() -> LatencyStats:
    return summarize([1.0], batch_size=1, scope="host", timer="x")


def test_raw_samples_per_profile_candidate_and_batch(tmp_path: Path) -> None:
    prof = profile(batch_sizes=(1, 4))
    result = measure_rounds(
        FakeBackend(Machine(BASE_MS)), ARTIFACTS, prof, (1, 4), raw_dir=tmp_path
    )
    for name in BASE_MS:
        for b in (1, 4):
            path = tmp_path / "fake-cpu" / f"{name}-b{b}.json"
            assert result.raw_files[name][b] == str(path)
            samples = load_raw(path)
            assert len(samples) == 5 * 5  # 5 rounds x 1 window of 5 iterations
            meta = json.loads(path.read_text())["meta"]
            assert [r["round"] for r in meta["rounds"]] == [0, 1, 2, 3, 4]
            assert meta["candidate"] == name and meta["batch_size"] == b
            assert meta["profile"] == "fake-cpu"
    assert [s.batch_size for s in result.latency("c80")] == [1, 4]
    custom = measure_rounds(
        FakeBackend(Machine(BASE_MS)),
        {"c60": ARTIFACTS["c60"]},
        prof,
        raw_path=lambda n, b: tmp_path / "x" / f"{n}_{b}.json",
    )
    assert Path(custom.raw_files["c60"][1]).name == "c60_1.json"


def test_open_measurement_is_used_and_every_session_closed() -> None:
    fake = OpeningBackend(Machine(BASE_MS))
    result = measure_rounds(fake, ARTIFACTS, profile())
    assert fake.measure_calls == []  # one open session per candidate, no per-round measure()
    assert sorted(fake.opened) == sorted(BASE_MS) == sorted(fake.closed)
    assert fake.closed == fake.opened[::-1]  # LIFO: global state is restored in order
    assert result.at("c80", 1).p50 == 8.0


def test_sessions_closed_when_a_round_fails() -> None:
    class Failing(OpeningBackend):
        def open_measurement(
            self, artifact: Artifact, profile: TargetProfile, batch_size: int
        ) -> ReadyMeasurement:
            m = super().open_measurement(artifact, profile, batch_size)
            if artifact.candidate == "c60":

                def boom() -> None:
                    raise RuntimeError("session died")

                m.step = boom
            return m

    fake = Failing(Machine(BASE_MS))
    with pytest.raises(RuntimeError, match="session died"):
        measure_rounds(fake, ARTIFACTS, profile())
    assert sorted(fake.closed) == sorted(BASE_MS)


def test_combined_figures_are_medians_with_spread_and_machine_state() -> None:
    # c80 is hit by a long burst in one round: its figure stays 8.0; the spread shows it.
    fake = FakeBackend(Machine(BASE_MS, ((0.0, 100.0),), factor=3.0))
    result = measure_rounds(fake, ARTIFACTS, profile(), seed=0)
    s = result.at(result.orders[0][0], 1)
    assert s.rounds == 5 and len(s.round_medians) == 5
    assert s.p50 == pytest.approx(sorted(s.round_medians)[2])
    assert s.round_figures["p90"] and s.spread_ms == pytest.approx(s.spread("p50"))
    assert s.iterations == 25 and s.windows == 5
    assert {"before", "after", "threads", "rounds"} <= set(s.machine)
    assert s.machine["threads"]["intra_op_num_threads"] == 1
    assert len(s.machine["rounds"]) == 5


def test_busy_warning() -> None:
    quiet = {"load_avg": (0.2, 0.1, 0.1), "usable_cores": 2}
    assert busy_warning(quiet, {"load_avg": (1.1, 0.3, 0.1), "usable_cores": 2}) is None
    loaded = {"load_avg": (2.5, 2.0, 1.0), "usable_cores": 2}
    text = busy_warning(loaded, loaded, own_threads=1)
    assert text is not None and "busy" in text and "2.5" in text
    assert busy_warning({"load_avg": None}, {"load_avg": None}) is None


def test_bad_round_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="min_rounds"):
        measure_rounds(
            FakeBackend(Machine(BASE_MS)), ARTIFACTS, profile(), min_rounds=4, max_rounds=2
        )
