"""The run directory: where a pipeline run keeps everything, its versioned manifest and its lock.

Layout (all writes atomic, temporary files unique per writer)::

    RUN/manifest.json              schema, identity, run id, inputs, one record per unit
    RUN/.lock, RUN/.lock.json      the run lock and who holds it (pid, host, command)
    RUN/family/                    candidates (<name>.safetensors + <name>.json), family.json
    RUN/metric_set/                cached synthetic metric set
    RUN/onnx/<precision>/<name>.onnx           exported graphs
    RUN/artifacts/<profile>/       built artifacts and their metadata
    RUN/raw/<profile>/<name>-b<B>.json         raw per-iteration latencies
    RUN/logs/<name>.log            per-candidate error logs
    RUN/report.json, candidates.csv, SUMMARY.md, pareto.png   (the run's current profile)
    RUN/reports/<profile>/         the same reports, one folder per measured profile
    RUN/triton/                    the run-local Triton model repository

A run's *identity* is the model and its weights' content: another model's run is refused
(``--overwrite`` moves it aside, never deletes) unless it never finished a unit; everything else
is a unit input. One process at a time: an OS-level ``flock`` (released by the kernel when its
holder dies, so a killed process's lock is taken over); a second is refused naming the pid.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dcvit_deploy.config.options import CompressOptions, DeployOptions
from dcvit_deploy.errors import RunDirError
from dcvit_deploy.store.atomic import atomic_write_json
from dcvit_deploy.store.records import read_json

MANIFEST_SCHEMA = 2
MANIFEST = "manifest.json"
LOCK = ".lock"
LOCK_INFO = ".lock.json"
_OWN_FILES = {LOCK, LOCK_INFO}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class UnitRecord:
    """One unit's record (see :mod:`dcvit_deploy.pipeline.runner`); ``kept``: its last OK
    record while a rerun with other inputs failed, was skipped or replaced it."""

    status: Literal["ok", "failed", "skipped", "running", "interrupted"]
    fingerprint: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    kept: UnitRecord | None = None


@dataclass(frozen=True)
class RunInputs:
    profiles: tuple[str, ...] = ()
    profile_sources: dict[str, str] = field(default_factory=dict)
    compress_options: CompressOptions | None = None
    deploy_options: DeployOptions | None = None


@dataclass(frozen=True)
class ManifestFile:
    """The layout of ``manifest.json``, checked whenever it is read."""

    identity: dict[str, Any]
    units: dict[str, UnitRecord] = field(default_factory=dict)
    inputs: RunInputs = field(default_factory=RunInputs)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path``, checked against :class:`ManifestFile` (one
    :class:`RunDirError` naming the file and the problem)."""
    from dcvit_deploy.model.images import DataOverrides

    data = read_json(
        path,
        ManifestFile,
        schema=MANIFEST_SCHEMA,
        localns={"DataOverrides": DataOverrides},
        what="manifest",
        fix="pass --overwrite to move the run aside and start anew",
        error=RunDirError,
    )
    data.setdefault("units", {})
    data.setdefault("inputs", {})
    return data


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


@dataclass
class RunLock:
    """An exclusive ``filelock`` on ``RUN/.lock``; ``took_over``: the pid of a dead process
    whose lock information was still on disk."""

    root: Path
    took_over: int | None = None
    _lock: Any = field(default=None, repr=False)

    def acquire(self) -> RunLock:
        from filelock import FileLock, Timeout

        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / LOCK), timeout=0)
        info_path = self.root / LOCK_INFO
        try:
            lock.acquire()
        except Timeout:
            holder = _lock_info(info_path)
            who = f"pid {holder.get('pid', '?')}"
            if holder.get("host") and holder.get("host") != socket.gethostname():
                who += f" on {holder['host']}"
            since = f" since {holder['started']}" if holder.get("started") else ""
            raise RunDirError(
                f"{self.root} is in use by another dcvit-deploy process ({who}{since})",
                "wait for it to finish, or choose another --out directory",
            ) from None
        previous = _lock_info(info_path)
        pid = previous.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
            self.took_over = pid
        atomic_write_json(
            info_path,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": _now(),
                "command": " ".join(sys.argv[:1] + sys.argv[1:8])[:300],
            },
        )
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is not None:
            (self.root / LOCK_INFO).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None


def _lock_info(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class RunDir:
    """An open, locked run directory (a context manager; :meth:`close` releases the lock);
    every mutator saves the manifest."""

    root: Path
    manifest: dict[str, Any]
    lock: RunLock | None = None
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ open / create

    @classmethod
    def open(
        cls,
        root: str | Path,
        identity: dict[str, Any],
        *,
        overwrite: bool = False,
        must_exist: bool = False,
    ) -> RunDir:
        """Lock and open (or create) ``root`` for a run of ``identity``: the same identity
        resumes; another one, a corrupt manifest or a non-run folder is :class:`RunDirError`
        unless ``overwrite`` (moved to ``<root>.old-<stamp>``), or replaced when that run never
        finished a unit. ``must_exist``: refuse to start a new run (``--resume``)."""
        path = Path(root).absolute()  # artifacts recorded relative to it resolve from any cwd
        if must_exist and not (path / MANIFEST).is_file():
            raise RunDirError(
                f"there is no run to resume in {path}", "drop --resume to start a new run"
            )
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path} is a file, not a folder", "choose another --out directory")
        lock = RunLock(path).acquire()
        try:
            run = cls._open_locked(path, identity, lock, overwrite=overwrite)
        except BaseException:
            lock.release()
            raise
        if lock.took_over is not None:
            run.notes.append(
                f"took over the lock of pid {lock.took_over}, which is no longer running"
            )
        return run

    @classmethod
    def _open_locked(
        cls, path: Path, identity: dict[str, Any], lock: RunLock, *, overwrite: bool
    ) -> RunDir:
        manifest_path = path / MANIFEST
        notes: list[str] = []
        if manifest_path.is_file():
            try:
                data = read_manifest(manifest_path)
            except RunDirError:
                if not overwrite:
                    raise
                data = None
            if data is not None and data.get("identity") == identity:
                return cls(path, data, lock)
            if data is not None and not overwrite:
                if any(u.get("status") == "ok" for u in data.get("units", {}).values()):
                    other = data.get("identity", {})
                    raise RunDirError(
                        f"{path} holds a run of another model ({other.get('model')}, weights "
                        f"{str(other.get('weights'))[:12]})",
                        "choose another --out directory, or pass --overwrite to move it aside",
                    )
                cls._clear(path)
                notes.append("replaced an earlier run of another model that never finished a unit")
            else:
                notes.append(f"moved the old run aside to {cls._move_aside(path).name}")
        elif any(p.name not in _OWN_FILES for p in path.iterdir()):
            if not overwrite:
                raise RunDirError(
                    f"{path} is not empty and is not a dcvit-deploy run directory",
                    "choose another --out directory, or pass --overwrite to move it aside",
                )
            notes.append(f"moved the old contents aside to {cls._move_aside(path).name}")
        run = cls(
            path,
            {
                "schema": MANIFEST_SCHEMA,
                "identity": identity,
                "created": _now(),
                "inputs": {},
                "units": {},
            },
            lock,
            notes,
        )
        run.save()
        return run

    @staticmethod
    def _move_aside(path: Path) -> Path:
        """Move every entry of ``path`` except the lock into ``<path>.old-<stamp>/``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = path.with_name(f"{path.name}.old-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.old-{stamp}-{n}")
        target.mkdir(parents=True)
        for entry in path.iterdir():
            if entry.name not in _OWN_FILES:
                shutil.move(str(entry), str(target / entry.name))
        return target

    @staticmethod
    def _clear(path: Path) -> None:
        """Remove a run that never finished a unit (nothing of value), keeping the lock."""
        for entry in (e for e in path.iterdir() if e.name not in _OWN_FILES):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    @classmethod
    def load(cls, root: str | Path, *, lock: bool = True) -> RunDir:
        """Open an existing run without an identity check; ``lock=False`` reads without locking
        (``status`` while a run is going on)."""
        base = Path(root).absolute()
        path = base / MANIFEST
        if not path.is_file():
            raise RunDirError(
                f"{root} is not a run directory (no {MANIFEST})",
                "run `dcvit-deploy compress` first",
            )
        held = RunLock(base).acquire() if lock else None
        try:
            return cls(base, read_manifest(path), held)
        except BaseException:
            if held is not None:
                held.release()
            raise

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(self) -> None:
        self.manifest["updated"] = _now()
        atomic_write_json(self.root / MANIFEST, self.manifest)

    # ------------------------------------------------------------------ layout

    def sub(self, name: str, *, file: bool = False) -> Path:
        """``RUN/name``, created (with ``file`` only its folder); a name that would leave the run
        directory (absolute, ``..``, a link out) is refused."""
        p = self.inside(name)
        (p.parent if file else p).mkdir(parents=True, exist_ok=True)
        return p

    def inside(self, name: str | Path) -> Path:
        """``RUN/name``, or :class:`RunDirError` when that is not inside the run directory."""
        p = self.root / name
        if Path(name).is_absolute() or not p.resolve().is_relative_to(self.root.resolve()):
            raise RunDirError(
                f"{str(name)!r} is outside the run directory {self.root}",
                "name files inside the run (no '..'); restore the manifest if it was edited",
            )
        return p

    @property
    def family_dir(self) -> Path:
        return self.sub("family")

    def rel(self, path: str | Path) -> str:
        """``path`` relative to the run (a moved run still resumes), or absolute if outside."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(p.resolve())

    def resolve(self, recorded: str | Path) -> Path:
        """A recorded path: relative to the run (refused if it leaves it), or absolute (a Triton
        repository elsewhere)."""
        p = Path(recorded)
        return p if p.is_absolute() else self.inside(p)

    # ------------------------------------------------------------------ inputs and units

    @property
    def run_id(self) -> str:
        """This run's unique id: the owner recorded in the Triton versions it publishes (a copy
        of the directory is the same run; another run never has it)."""
        if "run_id" not in self.manifest:
            self.manifest["run_id"] = uuid.uuid4().hex
            self.save()
        return str(self.manifest["run_id"])

    def set_inputs(self, **inputs: Any) -> None:
        self.manifest["inputs"].update(inputs)
        self.save()

    def unit(self, unit_id: str) -> dict[str, Any] | None:
        rec = self.manifest["units"].get(unit_id)
        return rec if isinstance(rec, dict) else None

    def units(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest["units"])

    def record_unit(self, unit_id: str, record: dict[str, Any]) -> None:
        self.manifest["units"][unit_id] = record
        self.save()

    def log(self, name: str, text: str) -> Path:
        """Append ``text`` to the candidate's log (kept across reruns)."""
        path = self.sub(f"logs/{name}.log", file=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(time.strftime("[%Y-%m-%d %H:%M:%S] ") + text.rstrip() + "\n")
        return path
