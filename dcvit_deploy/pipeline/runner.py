"""The runner: executes units in order, skips what is still valid, records every status.

A unit is skipped (its recorded result reused) only when its record is OK, its fingerprint --
a hash of the unit's declared inputs -- is unchanged, and every output it recorded still exists
with the recorded checksum; a missing or corrupted output makes the runner redo the unit (and
say so). Status is saved to the manifest before and after every unit, so ``status`` shows where
a run stopped; Ctrl-C and SIGTERM are recorded as ``interrupted``.
"""

from __future__ import annotations

import signal
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.errors import DcvitError
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.unit import Unit, UnitResult
from dcvit_deploy.store.atomic import fingerprint, sha256_file

if TYPE_CHECKING:
    from dcvit_deploy.pipeline.context import JobContext
    from dcvit_deploy.store.rundir import RunDir


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the unit is recorded as interrupted and the run resumes."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (main thread only)."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def outputs_problem(run: RunDir, outputs: dict[str, str]) -> str | None:
    """Why a recorded unit's outputs are no longer what it wrote, or ``None`` when intact."""
    for rel, digest in sorted(outputs.items()):
        path = run.resolve(rel)
        if not path.is_file():
            return f"{rel} is missing"
        if sha256_file(path) != digest:
            return f"{rel} was changed or corrupted since it was written"
    return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Runner:
    """Runs units against one :class:`JobContext` (one locked run directory)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def run(self, unit: Unit) -> UnitResult:
        ctx = self.ctx
        run = ctx.run
        rec = run.unit(unit.id) or {}
        if (uid := UnitId.parse(unit.id)) and uid.kind in ctx.elsewhere:
            rec = rec or {"status": "failed", "reason": "it did not run where it should have"}
            res, why = dict(rec.get("result", {})), rec.get("reason", "")
            return UnitResult(unit.id, rec["status"], res, reason=why, reused=True)
        fp = fingerprint(unit.inputs(ctx))
        # a unit that acts on shared state (publishing) is only current as its latest record:
        # an older one says nothing of what the repository serves now
        kept = {} if getattr(unit, "stateful", False) else rec.get("kept") or {}
        for good in (rec, kept):
            if good.get("status") != "ok" or good.get("fingerprint") != fp:
                continue
            problem = outputs_problem(run, good.get("outputs", {}))
            if problem is None:
                if good is not rec:  # back to the inputs of the kept record: it is current again
                    self._record(unit.id, dict(good))
                return UnitResult(unit.id, "ok", dict(good.get("result", {})), reused=True)
            ctx.note(f"{unit.id}: {problem}; redoing it")
        ctx.previous[unit.id] = self._kept(unit.id) or rec
        self._record(unit.id, {"status": "running", "fingerprint": fp, "started": _now()})
        t0 = time.perf_counter()
        try:
            out = unit.execute(ctx)
        except KeyboardInterrupt:
            self._failed(unit.id, fp, "interrupted", t0, reason="interrupted; rerun to resume")
            raise
        except DcvitError as exc:
            reason = exc.one_line()
            self._failed(unit.id, fp, "failed", t0, reason=reason)
            if not unit.optional:
                raise
            return UnitResult(unit.id, "failed", reason=reason)
        except Exception as exc:
            log = run.log(unit.id.replace("/", "_"), traceback.format_exc())
            reason = f"{type(exc).__name__}: {str(exc)[:300]} (log: {run.rel(log)})"
            self._failed(unit.id, fp, "failed", t0, reason=reason)
            if not unit.optional:
                raise
            return UnitResult(unit.id, "failed", reason=reason)
        outputs = {run.rel(p): sha256_file(p) for p in out.files if Path(p).is_file()}
        seconds = round(time.perf_counter() - t0, 3)
        self._record(
            unit.id,
            {
                "status": "ok",
                "fingerprint": fp,
                "finished": _now(),
                "seconds": seconds,
                "outputs": outputs,
                "result": out.result,
            },
        )
        return UnitResult(unit.id, "ok", out.result, seconds=seconds)

    def skip(self, unit_id: str, reason: str) -> UnitResult:
        """Record that a unit does not apply this time (e.g. its candidate failed export)."""
        self._record(
            unit_id, {"status": "skipped", "fingerprint": "", "reason": reason, "finished": _now()}
        )
        return UnitResult(unit_id, "skipped", reason=reason)

    def _kept(self, unit_id: str) -> dict[str, Any] | None:
        """The unit's last OK record: its record, or the one a later failure, skip or redo with
        other inputs kept (so going back to the earlier inputs reuses it)."""
        rec = self.ctx.run.unit(unit_id) or {}
        return rec if rec.get("status") == "ok" else rec.get("kept")

    def _record(self, unit_id: str, record: dict[str, Any]) -> None:
        """Record ``record``, keeping the last OK record beside it unless it replaces it with
        the same inputs: a failing or differently configured rerun never loses good work."""
        kept = self._kept(unit_id)
        if kept and kept.get("fingerprint") != record.get("fingerprint"):
            record["kept"] = {k: v for k, v in kept.items() if k != "kept"}
        self.ctx.run.record_unit(unit_id, record)

    def _failed(self, unit_id: str, fp: str, status: str, t0: float, *, reason: str) -> None:
        self._record(
            unit_id,
            {
                "status": status,
                "fingerprint": fp,
                "finished": _now(),
                "seconds": round(time.perf_counter() - t0, 3),
                "reason": reason,
            },
        )
