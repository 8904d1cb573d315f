"""Latency without a clock: fake stats, and figures by structure wherever the pipeline measures."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from dcvit_deploy.store.records import LatencyStats


def fake_stats(batch: int, p50: float, rounds: Sequence[float] = ()) -> LatencyStats:
    """Fake stats; ``rounds``: per-round p50s (figure = their median, spread = their IQR)."""
    if rounds:
        return dataclasses.replace(
            fake_stats(batch, p50),
            rounds=len(rounds),
            round_medians=tuple(rounds),
            round_figures={"p50": tuple(rounds)},
        )
    return LatencyStats(
        batch_size=batch,
        iterations=100,
        mean=p50 * 1.01,
        std=p50 * 0.02,
        cov=0.02,
        min=p50 * 0.95,
        max=p50 * 1.3,
        p50=p50,
        p90=p50 * 1.05,
        p95=p50 * 1.08,
        p99=p50 * 1.2,
        throughput=1000.0 * batch / p50,
        scope="device_compute",
        timer="fake",
        windows=3,
        window_medians=(p50, p50, p50),
        stable=True,
        warmup_iters=10,
        duration_s=1.0,
    )


@contextmanager
def scripted_latency() -> Iterator[SimpleNamespace]:
    """Latency by structure instead of a clock, wherever the pipeline measures: a candidate's
    p50 (ms) is its retained MAC fraction as its name says (``dcvit-1003-...``: 0.8997; the
    original 1.0), plus ``trained_offset`` for a trained artifact (``<name>.trained``), with no
    spread. Patches the interleaved rounds and the fresh-process confirmation; ``confirmed``
    lists the artifacts each confirmation measured."""
    from dcvit_deploy.latency.rounds import RoundsResult

    script = SimpleNamespace(trained_offset=0.0, confirmed=[])

    def p50(artifact: Any) -> float:
        name = artifact.candidate.removesuffix(".trained")
        ms = 1.0 if name == "original" else 1.0 - int(name.split("-")[1]) / 10000
        return ms + (script.trained_offset if name != artifact.candidate else 0.0)

    def rounds(backend: Any, artifacts: Any, profile: Any, batch_sizes: Any = None, **_: Any):
        batches = tuple(batch_sizes or (profile.budget_batch_size,))
        stats = {n: {b: fake_stats(b, p50(a)) for b in batches} for n, a in artifacts.items()}
        return RoundsResult(stats, (), rounds=1, stopped_early=False, seconds=0.0)

    def confirm(artifacts: Any, profile: Any, batch_size: int, **_: Any) -> dict[str, Any]:
        script.confirmed.append(dict(artifacts))
        return {n: fake_stats(batch_size, p50(a)) for n, a in artifacts.items()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dcvit_deploy.latency.rounds.measure_rounds", rounds)
        mp.setattr("dcvit_deploy.latency.confirm.confirm_artifacts", confirm)
        yield script
