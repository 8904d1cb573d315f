"""Confirmation: re-measure chosen artifacts in a fresh Python process.

Everything a long run accumulates in its own process -- warm allocator pools, a thread pool
that has been spinning, a turbo phase right after start-up, one backend's cached session --
can bias every figure measured there. Before a choice is published it is measured again in a
process that shares none of that: ``sys.executable -m dcvit_deploy.latency.confirm JOB OUT``, where
``JOB`` is a JSON file holding the profile and the artifact records, and ``OUT`` receives the
statistics. The child measures the artifacts in interleaved rounds
(:func:`dcvit_deploy.latency.rounds.measure_rounds`), so a chosen candidate and its denser neighbour
are compared at the same moments.

API
    :func:`confirm_in_fresh_process` -- one artifact -> its :class:`LatencyStats`.
    :func:`confirm_artifacts` -- several (the chosen one and its denser neighbour) -> stats.
    :class:`FreshProcessConfirm` -- a ``confirm(names)`` callable for
    :func:`dcvit_deploy.selection.decide.select_confirmed`, caching what it already measured.

A child that fails, prints garbage or runs past ``timeout_s`` raises :class:`ConfirmationError`
(exit code 1) with the end of its stderr; the parent never hangs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dcvit_deploy.errors import DcvitError
from dcvit_deploy.store.atomic import atomic_write_json
from dcvit_deploy.store.records import (
    SCHEMA_VERSION,
    Artifact,
    LatencyStats,
    TargetProfile,
    from_dict,
    to_dict,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ConfirmationError",
    "FreshProcessConfirm",
    "confirm_artifacts",
    "confirm_in_fresh_process",
    "main",
]

DEFAULT_TIMEOUT_S = 600.0
"""Wall-clock limit of one confirmation process (start-up, session creation and rounds)."""

JOB_KIND = "dcvit-deploy/confirm-job"


class ConfirmationError(DcvitError):
    """The confirmation process failed or timed out (the measurement, not the budget)."""


def _job(
    artifacts: Mapping[str, Artifact],
    profile: TargetProfile,
    batch_size: int,
    *,
    min_rounds: int | None,
    max_rounds: int | None,
    seed: int,
    raw_dir: Path | None,
) -> dict[str, Any]:
    return {
        "kind": JOB_KIND,
        "schema": SCHEMA_VERSION,
        "profile": to_dict(profile),
        "artifacts": {name: to_dict(a) for name, a in artifacts.items()},
        "batch_size": batch_size,
        "min_rounds": min_rounds,
        "max_rounds": max_rounds,
        "seed": seed,
        "raw_dir": str(raw_dir) if raw_dir is not None else None,
    }


def confirm_artifacts(
    artifacts: Mapping[str, Artifact],
    profile: TargetProfile,
    batch_size: int,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    min_rounds: int | None = None,
    max_rounds: int | None = None,
    seed: int = 0,
    raw_dir: Path | None = None,
    python: str | None = None,
) -> dict[str, LatencyStats]:
    """Measure ``artifacts`` (name -> artifact) at ``batch_size`` in one fresh process.

    The child runs :func:`~dcvit_deploy.latency.rounds.measure_rounds` over them (rounds bounds from
    the arguments or the profile; raw samples under ``raw_dir`` if given) and returns each
    one's combined stats, with ``actions`` noting the fresh process. Raises
    :class:`ConfirmationError` when the child fails or exceeds ``timeout_s``.
    """
    if not artifacts:
        return {}
    with tempfile.TemporaryDirectory(prefix="dcvit-confirm-") as tmp:
        job_path = Path(tmp) / "job.json"
        out_path = Path(tmp) / "out.json"
        atomic_write_json(
            job_path,
            _job(
                artifacts,
                profile,
                batch_size,
                min_rounds=min_rounds,
                max_rounds=max_rounds,
                seed=seed,
                raw_dir=raw_dir,
            ),
        )
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the child imports this package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [
            python or sys.executable,
            "-m",
            "dcvit_deploy.latency.confirm",
            str(job_path),
            str(out_path),
        ]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ConfirmationError(
                f"the confirmation process for {', '.join(artifacts)} ran past {timeout_s:g} s",
                "raise the confirmation timeout or lower [measure] max_rounds",
            ) from exc
        if done.returncode != 0 or not out_path.is_file():
            tail = (done.stderr or "").strip().splitlines()[-5:]
            raise ConfirmationError(
                f"the confirmation process for {', '.join(artifacts)} failed with exit code "
                f"{done.returncode}: {' | '.join(tail) or 'no output'}",
                "run 'python -m dcvit_deploy.latency.confirm JOB OUT' by hand to see the error",
            )
        try:
            data = json.loads(out_path.read_text(encoding="utf-8"))
            return {name: from_dict(LatencyStats, data["stats"][name]) for name in artifacts}
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfirmationError(
                f"the confirmation process wrote an unreadable result: {exc}",
                "this is a bug; report it with the job file",
            ) from exc


def confirm_in_fresh_process(
    artifact: Artifact,
    profile: TargetProfile,
    batch_size: int,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    min_rounds: int | None = None,
    max_rounds: int | None = None,
    raw_dir: Path | None = None,
) -> LatencyStats:
    """Re-measure one artifact at ``batch_size`` in a fresh process (see
    :func:`confirm_artifacts`)."""
    stats = confirm_artifacts(
        {artifact.candidate: artifact},
        profile,
        batch_size,
        timeout_s=timeout_s,
        min_rounds=min_rounds,
        max_rounds=max_rounds,
        raw_dir=raw_dir,
    )
    return stats[artifact.candidate]


class FreshProcessConfirm:
    """A ``confirm(names, rounds=None) -> {name: stats}`` for
    :func:`dcvit_deploy.selection.decide.select_confirmed`.

    ``names[0]`` (the chosen candidate) and ``anchor`` (the reference of relative budgets,
    when asked for) are always answered from one process; a later call whose pair was already
    measured together is answered from that process, other names (the denser neighbour, which
    is informational) from the latest process that measured them -- so a sweep of budgets
    starts few processes. Otherwise every name asked is measured together in a new fresh
    process. ``calls`` counts processes started, ``seconds`` their wall time, ``latest`` holds
    each candidate's most recent confirmation.
    """

    def __init__(
        self,
        artifacts: Mapping[str, Artifact],
        profile: TargetProfile,
        batch_size: int,
        *,
        anchor: str | None = "original",
        **kwargs: Any,
    ) -> None:
        self.artifacts = dict(artifacts)
        self.profile = profile
        self.batch_size = batch_size
        self.anchor = anchor
        self.kwargs = kwargs
        self.groups: list[dict[str, LatencyStats]] = []
        self.calls = 0
        self.seconds = 0.0

    @property
    def latest(self) -> dict[str, LatencyStats]:
        out: dict[str, LatencyStats] = {}
        for group in self.groups:
            out.update(group)
        return out

    def use(self, name: str, artifact: Artifact) -> None:
        """Confirm ``name`` with ``artifact`` from now on (a trained pick instead of the
        structure that was measured): nothing measured with the old one answers for it."""
        if self.artifacts.get(name) != artifact:
            self.artifacts[name] = artifact
            self.groups = [g for g in self.groups if name not in g]

    def __call__(
        self, names: Sequence[str], *, rounds: int | None = None
    ) -> dict[str, LatencyStats]:
        """Stats of ``names``; ``rounds``: measure them anew in exactly that many rounds (a
        confirmation within noise of the budget, measured again)."""
        import time

        if not names:
            return {}
        must = [names[0]] + [n for n in names[1:] if n == self.anchor]
        for group in reversed(self.groups if rounds is None else []):
            if all(n in group for n in must):
                latest = self.latest
                out = {n: group[n] for n in must}
                out.update({n: latest[n] for n in names if n not in out and n in latest})
                return out
        todo = {n: self.artifacts[n] for n in dict.fromkeys(names)}
        kwargs = dict(self.kwargs)
        if rounds is not None:
            kwargs.update(min_rounds=rounds, max_rounds=rounds)
        t0 = time.perf_counter()
        group = confirm_artifacts(todo, self.profile, self.batch_size, **kwargs)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        self.groups.append(group)
        return dict(group)


# --------------------------------------------------------------------------- the child


def run_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Measure what ``job`` asks (in this process) and return the result document."""
    import dataclasses

    from dcvit_deploy.backends import get_backend
    from dcvit_deploy.latency.rounds import measure_rounds

    if job.get("kind") != JOB_KIND:
        raise ValueError(f"not a confirmation job: kind {job.get('kind')!r}")
    profile = from_dict(TargetProfile, job["profile"])
    artifacts = {name: from_dict(Artifact, a) for name, a in job["artifacts"].items()}
    batch = int(job["batch_size"])
    backend = get_backend(profile.backend)
    raw_dir = Path(job["raw_dir"]) if job.get("raw_dir") else None
    result = measure_rounds(
        backend,
        artifacts,
        profile,
        (batch,),
        raw_dir=raw_dir,
        seed=int(job.get("seed", 0)),
        min_rounds=job.get("min_rounds"),
        max_rounds=job.get("max_rounds"),
    )
    note = f"confirmed in a fresh process (pid {os.getpid()})"
    stats = {
        name: dataclasses.replace(s, actions=(*s.actions, note))
        for name in artifacts
        for s in (result.at(name, batch),)
    }
    return {
        "schema": SCHEMA_VERSION,
        "pid": os.getpid(),
        "rounds": result.rounds,
        "seconds": result.seconds,
        "stats": {name: to_dict(s) for name, s in stats.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcvit_deploy.latency.confirm",
        description="Re-measure artifacts in this (fresh) process; write their stats as JSON.",
    )
    parser.add_argument("job", type=Path, help="job JSON written by confirm_artifacts")
    parser.add_argument("out", type=Path, help="where to write the result JSON")
    args = parser.parse_args(argv)
    job = json.loads(args.job.read_text(encoding="utf-8"))
    atomic_write_json(args.out, run_job(job))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
