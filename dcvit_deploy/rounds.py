"""Interleaved rounds: measure a family of candidates so that all of them see the same machine.

Measuring each candidate once, one after the other, gives each its own moment: a burst of load
from another process, a turbo phase right after start-up or a thermal drift lands on whichever
candidate happened to be measured then, and a smaller candidate can come out slower than a
denser one. Rounds spread every candidate over the whole run instead:

* Round ``r`` measures every candidate (and every requested batch size) once, in an order
  shuffled per round with ``random.Random(seed)`` -- so no candidate is always first or last.
* Each measurement is the shared timing loop (:func:`dcvit_deploy.latency.loop.measure`) with the
  profile's warm-up and exactly ``round_windows`` windows (:func:`round_settings`).
* A candidate's figures are the **median over rounds** of each round's figure (mean, p50, p90,
  p95, p99); ``spread_ms`` / :meth:`LatencyStats.spread` is the round-to-round interquartile
  range -- the uncertainty every decision in :mod:`dcvit_deploy.selection.decide` takes into
  account.
* At least ``min_rounds`` rounds run; after each further round the ``stop`` predicate (by
  default: every candidate's rounds agree, :func:`rounds_stable`) may end the run; at most
  ``max_rounds`` rounds run. Callers pass ``stop`` built from their budget decisions (see
  :func:`dcvit_deploy.selection.decide.decisions_clear`), so rounds stop as soon as nothing the
  budget
  depends on is within noise.
* ``prior``: continue an earlier result with more rounds for some candidates (re-measure the
  ones within noise of the budget); the other candidates' results are carried over.

Backends that offer ``open_measurement`` (:class:`~dcvit_deploy.backends.base.OpenMeasurement`)
keep one session per candidate open for the whole run; others are measured with their plain
``measure()`` per round (a fresh session and warm-up each round; neither is timed).

Raw per-round samples go to ``raw_dir/<profile>/<candidate>-b<B>.json`` (or where ``raw_path``
says): every timed sample of every round, concatenated, with a per-round index in ``meta``.
Machine state (load average before/after each round, CPU pressure, governor, thread settings)
is recorded in each combined :class:`LatencyStats`'s ``machine``, with a warning when the
machine was busy.
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

from dcvit_deploy.latency.loop import load_raw, measure, median, own_threads, percentile, save_raw
from dcvit_deploy.latency.machine import busy_warning, machine_state, runtime_threads
from dcvit_deploy.store.records import (
    STATISTICS,
    Artifact,
    CandidateOutcome,
    LatencyStats,
    MeasureSettings,
    TargetProfile,
)

__all__ = [
    "RoundRecord",
    "RoundsResult",
    "StopPredicate",
    "combine_rounds",
    "measure_rounds",
    "round_settings",
    "rounds_stable",
    "with_latency",
]

StopPredicate = Callable[[Mapping[str, tuple[LatencyStats, ...]]], bool]
"""Called after each round from ``min_rounds`` on with every candidate's current combined
stats (one per batch size, like ``CandidateOutcome.latency``); ``True`` ends the rounds."""

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
    """Combined statistics per candidate and batch size, and how they were obtained.

    ``records[name][batch]``: every round's :class:`RoundRecord`; ``stats[name][batch]``: the
    combined :class:`LatencyStats` (median over rounds, spread, machine state); ``orders``:
    the candidate order of each round; ``rounds``: rounds run in total (the last call's rounds
    are ``rounds - prior rounds``); ``seconds``: wall time spent measuring, all calls together.
    """

    stats: dict[str, dict[int, LatencyStats]]
    records: dict[str, dict[int, tuple[RoundRecord, ...]]]
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
    """One :class:`LatencyStats` from the rounds of one candidate at one batch size.

    Figures (mean, p50..p99) are medians over rounds; ``min``/``max`` the extremes of all
    samples; ``std``/``cov`` over all settled samples pooled (so round-to-round drift shows in
    the dispersion); ``stable`` when the rounds' p50s agree -- interquartile range at most
    ``stability_tolerance`` of the median -- and the pooled CoV is at most ``max_cov``.
    """
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
    mean_all = math.fsum(pooled) / len(pooled)
    std = math.sqrt(math.fsum((x - mean_all) ** 2 for x in pooled) / len(pooled))
    cov = std / mean_all if mean_all > 0 else 0.0
    p50s = figures["p50"]
    xs = sorted(p50s)
    iqr = percentile(xs, 75) - percentile(xs, 25) if len(xs) > 1 else 0.0
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
    stop: StopPredicate | None = None,
    prior: RoundsResult | None = None,
    reason: str = "",
    max_seconds: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> RoundsResult:
    """Measure ``artifacts`` (candidate name -> built artifact) in interleaved rounds.

    ``backend`` is a :class:`~dcvit_deploy.backends.base.Backend` (``open_measurement`` is
    used when it has one). ``batch_sizes`` defaults to the profile's budget batch size.
    ``min_rounds``/``max_rounds`` default to the profile's ``[measure]`` values; ``stop``
    defaults to :func:`rounds_stable`; ``max_seconds`` optionally bounds the wall time (checked
    after each round from ``min_rounds`` on). Raw files go to ``raw_path(name, batch)`` or
    ``raw_dir/<profile>/<name>-b<B>.json`` (neither: not saved).

    ``prior``: an earlier result to continue. Candidates in ``artifacts`` get this call's
    rounds appended to their earlier ones (``reason`` is recorded in their ``actions``, e.g.
    "within noise of the budget"); candidates only in ``prior`` are carried over unchanged.
    Round numbers and the seed sequence continue from ``prior``.

    Measurement errors propagate (a failing candidate should have failed its build); every
    session opened here is closed.
    """
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
    stop_rule = stop if stop is not None else (lambda est: rounds_stable(est, tol))
    options = dict(profile.backend_options)

    start_round = prior.rounds if prior is not None else 0
    records: dict[str, dict[int, list[RoundRecord]]] = {}
    if prior is not None:
        for name, by_batch in prior.records.items():
            records[name] = {b: list(rs) for b, rs in by_batch.items()}
    for name in artifacts:
        records.setdefault(name, {})
        for b in batches:
            records[name].setdefault(b, [])
    earlier_actions: dict[str, dict[int, tuple[str, ...]]] = {}
    if prior is not None:
        earlier_actions = {
            n: {b: s.actions for b, s in by.items()} for n, by in prior.stats.items()
        }
    orders: list[tuple[str, ...]] = list(prior.orders) if prior is not None else []
    rng = random.Random(f"{seed}:{start_round}")
    names = list(artifacts)

    opened: dict[tuple[str, int], Any] = {}
    open_fn = getattr(backend, "open_measurement", None)
    t0 = time.perf_counter()
    done = 0
    stopped_early = False

    def combined(name: str, b: int, final: bool) -> LatencyStats:
        acts = list(earlier_actions.get(name, {}).get(b, ()))
        if final and name in artifacts:
            n_new = done
            goal = "the decisions were clear" if stop is not None else "the rounds agreed"
            if prior is not None and name in prior.stats:
                acts.append(
                    f"re-measured in {n_new} more interleaved round(s)"
                    + (f" ({reason})" if reason else "")
                )
            elif stopped_early and n_new > lo:
                acts.append(f"ran {n_new} interleaved rounds (min_rounds={lo}) until {goal}")
            elif not stopped_early and n_new >= hi and hi > lo:
                acts.append(f"stopped at max_rounds={hi} interleaved rounds before {goal}")
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
            for r in range(hi):
                order = names[:]
                rng.shuffle(order)
                orders.append(tuple(order))
                round_no = start_round + r
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
                            tmp_raw = Path(tmp) / f"r{round_no}-{position}-b{b}.json"
                            stats = backend.measure(
                                artifacts[name], round_profile, b, raw_path=tmp_raw
                            )
                            raw = load_raw(tmp_raw) if tmp_raw.exists() else []
                        after = machine_state()
                        records[name][b].append(
                            RoundRecord(round_no, position, stats, tuple(raw), before, after)
                        )
                        if progress is not None:
                            progress(
                                f"round {round_no + 1} {name} b{b}: p50 {stats.p50:.4g} ms "
                                f"(load {(after.get('load_avg') or ['?'])[0]})"
                            )
                done = r + 1
                if done < lo:
                    continue
                if done >= hi:
                    break
                estimates = {
                    n: tuple(combined(n, b, False) for b in sorted(records[n])) for n in records
                }
                if stop_rule(estimates):
                    stopped_early = True
                    break
                if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                    break
    finally:
        # Last opened, first closed: a handle restoring global state (torch's thread count)
        # restores what the one opened before it saw.
        for handle in reversed(list(opened.values())):
            handle.close()

    elapsed = time.perf_counter() - t0 + (prior.seconds if prior is not None else 0.0)
    stats_out: dict[str, dict[int, LatencyStats]] = {}
    raw_files: dict[str, dict[int, str]] = dict(prior.raw_files) if prior is not None else {}
    for name, lists in records.items():
        by_batch = {b: tuple(rs) for b, rs in lists.items()}
        if prior is not None and name not in artifacts and name in prior.stats:
            stats_out[name] = dict(prior.stats[name])
            continue
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
        records={n: {b: tuple(rs) for b, rs in by.items()} for n, by in records.items()},
        orders=tuple(orders),
        rounds=start_round + done,
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


def with_latency(
    outcomes: Sequence[CandidateOutcome],
    estimates: RoundsResult | Mapping[str, tuple[LatencyStats, ...]],
) -> list[CandidateOutcome]:
    """``outcomes`` with ``latency`` replaced from ``estimates`` for the candidates in it
    (the others unchanged) -- to decide on the current round estimates."""
    table = estimates.estimates() if isinstance(estimates, RoundsResult) else estimates
    return [
        dataclasses.replace(o, latency=tuple(table[o.candidate])) if o.candidate in table else o
        for o in outcomes
    ]
