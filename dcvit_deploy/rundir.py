"""The run directory: where a pipeline run keeps everything, and its versioned manifest.

Layout (all writes atomic)::

    RUN/manifest.json          schema, identity, inputs, per-step and per-candidate status
    RUN/family/                candidates (<name>.safetensors + <name>.json), rankings
    RUN/metric_set/            cached synthetic metric set
    RUN/onnx/<name>.onnx       exported graphs (+ <name>.fp16.onnx)
    RUN/artifacts/<backend>/   built artifacts and their metadata
    RUN/raw/<name>-b<B>.json   raw per-iteration latencies
    RUN/outcomes/<profile>/<name>.json   CandidateOutcome per candidate and target (report source)
    RUN/logs/<name>.log        per-candidate error logs
    RUN/report.json, candidates.csv, SUMMARY.md, pareto.png, triton/

A run's *identity* is the model and its weights: a directory holding another model's run is
refused (``--overwrite`` moves it aside, never deletes it). Everything else -- data, targets,
profile, budget -- is an input whose fingerprint decides which steps are redone.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .errors import RunDirError

MANIFEST_SCHEMA = 1
MANIFEST = "manifest.json"


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older manifest to the current schema (none older exists yet)."""
    version = data.get("schema")
    if version == MANIFEST_SCHEMA:
        return data
    raise RunDirError(
        f"manifest schema {version} is not readable by this version (reads {MANIFEST_SCHEMA})",
        "use a new --out directory or the dcvit-deploy version that wrote it",
    )


@dataclass
class RunDir:
    """An open run directory; :meth:`save` is called by every mutator."""

    root: Path
    manifest: dict[str, Any]

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
        """Open (or create) ``root`` for a run of ``identity``.

        Same identity: resume. Different identity: :class:`RunDirError` unless ``overwrite``, in
        which case the old directory is renamed to ``<root>.old-<timestamp>``. A non-empty
        directory without a manifest is refused the same way. ``must_exist``: refuse to start a
        new run (``--resume`` of a run that is not there).
        """
        path = Path(root)
        manifest_path = path / MANIFEST
        if manifest_path.is_file():
            try:
                data = _migrate(json.loads(manifest_path.read_text()))
            except ValueError as exc:
                raise RunDirError(
                    f"{manifest_path} is corrupt: {exc}", "pass --overwrite to start anew"
                ) from exc
            if data.get("identity") == identity:
                return cls(path, data)
            if not overwrite:
                other = data.get("identity", {})
                raise RunDirError(
                    f"{path} holds a run of another model ({other.get('model')}, weights "
                    f"{str(other.get('weights'))[:12]})",
                    "choose another --out directory, or pass --overwrite to move the old run aside",
                )
            cls._move_aside(path)
        elif path.exists() and any(path.iterdir()):
            if not overwrite:
                raise RunDirError(
                    f"{path} is not empty and is not a dcvit-deploy run directory",
                    "choose another --out directory, or pass --overwrite to move it aside",
                )
            cls._move_aside(path)
        if must_exist:
            raise RunDirError(
                f"there is no run to resume in {path}", "drop --resume to start a new run"
            )
        path.mkdir(parents=True, exist_ok=True)
        run = cls(
            path,
            {
                "schema": MANIFEST_SCHEMA,
                "identity": identity,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "inputs": {},
                "steps": {},
                "candidates": {},
            },
        )
        run.save()
        return run

    @staticmethod
    def _move_aside(path: Path) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = path.with_name(f"{path.name}.old-{stamp}")
        shutil.move(str(path), str(target))

    @classmethod
    def load(cls, root: str | Path) -> RunDir:
        """Open an existing run without an identity check (for stage subcommands)."""
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise RunDirError(
                f"{root} is not a run directory (no {MANIFEST})",
                "run `dcvit-deploy compress` first",
            )
        return cls(Path(root), _migrate(json.loads(path.read_text())))

    def save(self) -> None:
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_json(self.root / MANIFEST, self.manifest)

    # ------------------------------------------------------------------ layout

    def sub(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def family_dir(self) -> Path:
        return self.sub("family")

    # ------------------------------------------------------------------ steps

    def set_inputs(self, **inputs: Any) -> None:
        self.manifest["inputs"].update(inputs)
        self.save()

    def step_done(self, step: str, fp: str) -> bool:
        s = self.manifest["steps"].get(step)
        return bool(s and s.get("status") == "ok" and s.get("fingerprint") == fp)

    @contextmanager
    def step(self, step: str, fp: str) -> Iterator[dict[str, Any]]:
        """Record ``step`` as running, then ok (with ``info`` the body filled) or failed.

        KeyboardInterrupt is recorded as ``interrupted`` so ``status`` shows where a run stopped.
        """
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        self.manifest["steps"][step] = {"status": "running", "fingerprint": fp}
        self.save()
        try:
            yield info
        except KeyboardInterrupt:
            self.manifest["steps"][step] = {"status": "interrupted", "fingerprint": fp}
            self.save()
            raise
        except BaseException as exc:
            self.manifest["steps"][step] = {
                "status": "failed",
                "fingerprint": fp,
                "error": f"{type(exc).__name__}: {exc}"[:500],
            }
            self.save()
            raise
        self.manifest["steps"][step] = {
            "status": "ok",
            "fingerprint": fp,
            "seconds": round(time.perf_counter() - t0, 3),
            **info,
        }
        self.save()

    # ------------------------------------------------------------------ candidates

    def candidate_stage(self, name: str, stage: str) -> dict[str, Any] | None:
        return self.manifest["candidates"].get(name, {}).get(stage)

    def stage_done(self, name: str, stage: str, fp: str) -> dict[str, Any] | None:
        """The recorded info of a finished ``stage`` of ``name`` if its fingerprint matches."""
        s = self.candidate_stage(name, stage)
        if s and s.get("status") == "ok" and s.get("fingerprint") == fp:
            return s
        return None

    def mark_candidate(self, name: str, stage: str, status: str, fp: str, **info: Any) -> None:
        self.manifest["candidates"].setdefault(name, {})[stage] = {
            "status": status,
            "fingerprint": fp,
            **info,
        }
        self.save()

    def log(self, name: str, text: str) -> Path:
        """Append ``text`` to the candidate's log (kept across reruns)."""
        path = self.sub("logs") / f"{name}.log"
        with open(path, "a", encoding="utf-8") as f:
            f.write(time.strftime("[%Y-%m-%d %H:%M:%S] ") + text.rstrip() + "\n")
        return path
