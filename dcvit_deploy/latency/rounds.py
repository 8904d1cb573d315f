"""Interleaved rounds: measure a family of candidates so that all of them see the same machine.

Measured one after another, a load burst, turbo phase or thermal drift lands on whichever
candidate ran then. Instead round ``r`` measures every candidate and batch size once, in an
order shuffled per round (seeded), with the shared loop and exactly ``round_windows`` windows. A
candidate's figures are the **median over rounds**; ``spread_ms`` (round-to-round interquartile
range) is the uncertainty every selection decision takes into account. Rounds run from
``min_rounds`` until every candidate's rounds agree (:func:`rounds_stable`), at most
``max_rounds``. Backends with ``open_measurement`` keep one session per candidate open;
others are measured with ``measure()`` each round. Raw samples of all rounds go to one file per
candidate and batch size, with a per-round index; machine state per round goes to ``machine``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcvit_deploy.latency.loop import (
    load_raw,
    mean_std_cov,
    measure,
    median,
    own_threads,
    percentile,
    save_raw,
)
from dcvit_deploy.latency.machine import busy_warning, machine_state, runtime_threads
from dcvit_deploy.store.records import (
    STATISTICS,
    Artifact,
    LatencyStats,
    MeasureSettings,
    TargetProfile,
)

__all__ = [
    "RoundRecord",
    "RoundsResult",
    "combine_rounds",
    "measure_rounds",
    "round_settings",
    "rounds_stable",
]

RawPath = Callable[[str, int], Path]


@dataclass(frozen=True)
class RoundRecord:
    """One candidate at one batch size in one round: its loop statistics and raw samples."""

    round: int
    position: int
    stats: LatencyStats
    samples: tuple[float, ...]
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundsResult:
    """Combined stats per candidate and batch size, the candidate order of each round, rounds
    run, and wall seconds spent measuring."""

    stats: dict[str, dict[int, LatencyStats]]
    orders: tuple[tuple[str, ...], ...]
    rounds: int
    stopped_early: bool
    seconds: float
    raw_files: dict[str, dict[int, str]] = field(default_factory=dict)

    def at(self, name: str, batch_size: int) -> LatencyStats:
        return self.stats[name][batch_size]

    def latency(self, name: str) -> tuple[LatencyStats, ...]:
        """``name``'s combined stats, one per batch size (for ``CandidateOutcome.latency``)."""
        return tuple(self.stats[name][b] for b in sorted(self.stats[name]))

    def estimates(self) -> dict[str, tuple[LatencyStats, ...]]:
        return {name: self.latency(name) for name in self.stats}


def round_settings(settings: MeasureSettings) -> MeasureSettings:
    """The loop settings of one round: the profile's warm-up and windows, exactly
    ``round_windows`` windows, no minimum duration (the rounds provide the duration)."""
    return dataclasses.replace(
        settings,
        min_windows=settings.round_windows,
        max_windows=settings.round_windows,
        min_duration_s=0.0,
    )


def rounds_stable(
    estimates: Mapping[str, tuple[LatencyStats, ...]],
    tolerance: float = 0.10,
    statistic: str = "p50",
) -> bool:
    """Default stop rule: for every candidate the round-to-round spread of ``statistic`` is at
    most ``tolerance`` of its figure (the profile's ``stability_tolerance``). Dispersion within
    rounds does not keep the rounds going: more rounds do not make a busy machine quiet."""
    return all(
        s.spread(statistic) <= tolerance * s.stat(statistic)
        for stats in estimates.values()
        for s in stats
    )


# --------------------------------------------------------------------------- combining


def combine_rounds(
    records: Sequence[RoundRecord],
    settings: MeasureSettings,
    *,
    backend: str = "",
    backend_options: Mapping[str, Any] | None = None,
    actions: Sequence[str] = (),
) -> LatencyStats:
    """One candidate's rounds at one batch size as one :class:`LatencyStats`: figures are
    medians over rounds; ``std``/``cov`` over the settled samples pooled (drift shows);
    ``stable`` when the rounds' p50 IQR is within ``stability_tolerance`` of the median and the
    pooled CoV within ``max_cov``."""
    if not records:
        raise ValueError("no rounds to combine")
    per = [r.stats for r in records]
    first = per[0]
    figures = {name: tuple(float(getattr(s, name)) for s in per) for name in STATISTICS}
    med = {name: median(values) for name, values in figures.items()}
    pooled: list[float] = []
    for r in records:
        pooled.extend(r.samples[len(r.samples) - r.stats.iterations :])
    if not pooled:
        pooled = [s.p50 for s in per]
    _, std, cov = mean_std_cov(pooled)
    p50s = figures["p50"]
    iqr = percentile(p50s, 75) - percentile(p50s, 25) if len(p50s) > 1 else 0.0
    tol = settings.stability_tolerance
    agree = iqr <= tol * med["p50"]
    stable = agree and cov <= settings.max_cov
    warnings: list[str] = []
    if not agree:
        warnings.append(
            f"rounds disagree: p50 per round {', '.join(f'{v:.4g}' for v in p50s)} ms, "
            f"interquartile range {iqr:.3g} ms > {tol:.0%} of the median after {len(per)} "
            "round(s); decisions use this spread"
        )
    elif not stable:
        warnings.append(
            f"high dispersion: the samples of {len(per)} round(s) have a coefficient of "
            f"variation of {cov:.1%} > max_cov {settings.max_cov:.0%}; the machine is probably "
            "busy"
        )
    busy = [
        w
        for r in records
        if (w := busy_warning(r.before, r.after, own_threads=own_threads(backend_options or {})))
    ]
    if busy:
        warnings.append(f"{len(busy)} of {len(records)} round(s): {busy[-1]}")
    window_medians: list[float] = []
    for s in per:
        window_medians.extend(s.window_medians)
    loads = [
        {
            "round": r.round,
            "position": r.position,
            "load_before": (r.before.get("load_avg") or [None])[0],
            "load_after": (r.after.get("load_avg") or [None])[0],
            "cpu_pressure_after": r.after.get("cpu_pressure_avg10"),
        }
        for r in records
    ]
    machine = {
        "before": dict(records[0].before),
        "after": dict(records[-1].after),
        "threads": runtime_threads(backend, dict(backend_options or {})),
        "rounds": loads,
    }
    mean_fig = med["mean"]
    return LatencyStats(
        batch_size=first.batch_size,
        iterations=sum(s.iterations for s in per),
        mean=mean_fig,
        std=std,
        cov=cov,
        min=min(s.min for s in per),
        max=max(s.max for s in per),
        p50=med["p50"],
        p90=med["p90"],
        p95=med["p95"],
        p99=med["p99"],
        throughput=first.batch_size * 1000.0 / mean_fig if mean_fig > 0 else math.inf,
        scope=first.scope,
        timer=first.timer,
        windows=sum(s.windows for s in per),
        window_medians=tuple(window_medians),
        stable=stable,
        warmup_iters=sum(s.warmup_iters for s in per),
        duration_s=sum(s.duration_s for s in per),
        warnings=tuple(warnings),
        settle_windows=sum(s.settle_windows for s in per),
        rounds=len(per),
        round_medians=p50s,
        round_figures=figures,
        spread_ms=iqr,
        machine=machine,
        actions=tuple(actions),
    )


# --------------------------------------------------------------------------- the rounds


def _default_raw_path(raw_dir: Path, profile: TargetProfile) -> RawPath:
    def path(name: str, batch_size: int) -> Path:
        return raw_dir / profile.name / f"{name}-b{batch_size}.json"

    return path


def measure_rounds(
    backend: Any,
    artifacts: Mapping[str, Artifact],
    profile: TargetProfile,
    batch_sizes: Sequence[int] | None = None,
    *,
    raw_dir: Path | None = None,
    raw_path: RawPath | None = None,
    seed: int = 0,
    min_rounds: int | None = None,
    max_rounds: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> RoundsResult:
    """Measure ``artifacts`` (name -> artifact) in interleaved rounds at ``batch_sizes``
    (default: the budget batch size); rounds bounds default to the profile's. After
    ``min_rounds`` a candidate whose rounds agree (:func:`rounds_stable`) leaves the rounds and
    the others go on among themselves, so one noisy candidate does not keep a dense family
    measuring to ``max_rounds``. Raw files go to
    ``raw_path(name, batch)`` or ``raw_dir/<profile>/<name>-b<B>.json``. Errors propagate;
    every session opened here is closed."""
    settings = profile.measure
    batches = tuple(batch_sizes) if batch_sizes else (profile.budget_batch_size,)
    lo = settings.min_rounds if min_rounds is None else min_rounds
    hi = settings.max_rounds if max_rounds is None else max_rounds
    if lo < 1 or hi < lo:
        raise ValueError(f"need 1 <= min_rounds ({lo}) <= max_rounds ({hi})")
    if raw_path is None and raw_dir is not None:
        raw_path = _default_raw_path(Path(raw_dir), profile)
    per_round = round_settings(settings)
    round_profile = dataclasses.replace(profile, measure=per_round)
    tol = settings.stability_tolerance
    options = dict(profile.backend_options)

    records: dict[str, dict[int, list[RoundRecord]]] = {
        n: {b: [] for b in batches} for n in artifacts
    }
    orders: list[tuple[str, ...]] = []
    rng = random.Random(f"{seed}:0")
    names = list(artifacts)

    opened: dict[tuple[str, int], Any] = {}
    open_fn = getattr(backend, "open_measurement", None)
    t0 = time.perf_counter()
    done = 0
    stopped_early = False
    agreed: set[str] = set()  # the candidates whose rounds agreed (they left the rounds)

    def combined(name: str, b: int, final: bool) -> LatencyStats:
        acts = []
        ran = len(records[name][b])
        if final and name in agreed and ran > lo:
            acts.append(f"ran {ran} interleaved rounds (min_rounds={lo}) until its rounds agreed")
        elif final and name not in agreed and ran >= hi and hi > lo:
            acts.append(f"stopped at max_rounds={hi} interleaved rounds before the rounds agreed")
        return combine_rounds(
            records[name][b],
            settings,
            backend=profile.backend,
            backend_options=options,
            actions=acts,
        )

    try:
        if callable(open_fn):
            for name, artifact in artifacts.items():
                for b in batches:
                    opened[(name, b)] = open_fn(artifact, profile, b)
        with tempfile.TemporaryDirectory(prefix="dcvit-rounds-") as tmp:
            active = names[:]
            for r in range(hi):
                order = active[:]
                rng.shuffle(order)
                orders.append(tuple(order))
                for position, name in enumerate(order):
                    for b in batches:
                        before = machine_state()
                        handle = opened.get((name, b))
                        if handle is not None:
                            stats, raw = measure(
                                handle.step,
                                settings=per_round,
                                batch_size=b,
                                scope=profile.scope,
                                timer=handle.timer,
                            )
                        else:
                            tmp_raw = Path(tmp) / f"r{r}-{position}-b{b}.json"
                            stats = backend.measure(
                                artifacts[name], round_profile, b, raw_path=tmp_raw
                            )
                            raw = load_raw(tmp_raw) if tmp_raw.exists() else []
                        after = machine_state()
                        records[name][b].append(
                            RoundRecord(r, position, stats, tuple(raw), before, after)
                        )
                        if progress is not None:
                            progress(
                                f"round {r + 1} {name} b{b}: p50 {stats.p50:.4g} ms "
                                f"(load {(after.get('load_avg') or ['?'])[0]})"
                            )
                done = r + 1
                if done < lo or done >= hi:
                    continue
                # A candidate whose rounds agree leaves the rounds; the others go on
                # (interleaved among themselves) until theirs agree or max_rounds.
                for n in active:
                    if rounds_stable({n: tuple(combined(n, b, False) for b in batches)}, tol):
                        agreed.add(n)
                active = [n for n in active if n not in agreed]
                if not active:
                    stopped_early = True
                    break
    finally:
        # Last opened, first closed: a handle restoring global state (torch's thread count)
        # restores what the one opened before it saw.
        for handle in reversed(list(opened.values())):
            handle.close()

    elapsed = time.perf_counter() - t0
    stats_out: dict[str, dict[int, LatencyStats]] = {}
    raw_files: dict[str, dict[int, str]] = {}
    for name, lists in records.items():
        by_batch = {b: tuple(rs) for b, rs in lists.items()}
        stats_out[name] = {b: combined(name, b, True) for b in by_batch}
        if raw_path is not None:
            raw_files[name] = {}
            for b, recs in by_batch.items():
                target = raw_path(name, b)
                target.parent.mkdir(parents=True, exist_ok=True)
                save_raw(
                    target,
                    [x for rec in recs for x in rec.samples],
                    meta=_raw_meta(name, b, recs, profile, artifacts.get(name)),
                )
                raw_files[name][b] = str(target)
    return RoundsResult(
        stats=stats_out,
        orders=tuple(orders),
        rounds=done,
        stopped_early=stopped_early,
        seconds=elapsed,
        raw_files=raw_files,
    )


def _raw_meta(
    name: str,
    batch_size: int,
    records: Sequence[RoundRecord],
    profile: TargetProfile,
    artifact: Artifact | None,
) -> dict[str, Any]:
    index = []
    first = 0
    for rec in records:
        index.append(
            {
                "round": rec.round,
                "position": rec.position,
                "first": first,
                "count": len(rec.samples),
                "settled_from": first + len(rec.samples) - rec.stats.iterations,
                "p50": rec.stats.p50,
                "stable": rec.stats.stable,
                "load_before": (rec.before.get("load_avg") or [None])[0],
                "load_after": (rec.after.get("load_avg") or [None])[0],
            }
        )
        first += len(rec.samples)
    return {
        "candidate": name,
        "profile": profile.name,
        "backend": profile.backend,
        "batch_size": batch_size,
        "artifact_sha256": artifact.sha256 if artifact is not None else "",
        "scope": profile.scope,
        "window_iters": profile.measure.window_iters,
        "round_windows": profile.measure.round_windows,
        "rounds": index,
    }
