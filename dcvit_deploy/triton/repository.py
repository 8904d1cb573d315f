"""Triton model repositories: publish measured artifacts as numbered versions of one model.

Layout: ``<repo>/<model>/config.pbtxt`` (written last; serves one version, with the settings
that version was measured with), ``<model>/<N>/model.onnx|model.plan`` and ``<N>/deploy.json``
(the version's facts: sha256, source, profile, settings, latency, owner run), and
``<model>/deploy.json`` (the served version's facts). Versions are immutable and staged under a
hidden name, then renamed into place; publishers of one repository take turns through a file
lock (``.dcvit-publish.lock``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dcvit_deploy import __version__
from dcvit_deploy.errors import UserInputError
from dcvit_deploy.store.atomic import (
    atomic_write_json,
    atomic_write_text,
    sha256_file,
)
from dcvit_deploy.store.records import (
    SCHEMA_VERSION,
    Artifact,
    LatencyStats,
    TargetProfile,
    safe_name,
    to_dict,
)
from dcvit_deploy.triton.model_config import (
    _MODEL_SUFFIX,
    ModelIO,
    Platform,
    TensorSpec,
    _config_dims,
    _external_data_files,
    _load_onnx,
    _static_for_warmup,
    build_config,
    config_text,
    engine_meta_path,
    parse_config,
    platform_for,
    read_engine_io,
    read_onnx_io,
    version_dirs,
)
from dcvit_deploy.triton.runtime import serving_settings

__all__ = [
    "Published",
    "RepositoryConflict",
    "default_model_name",
    "publish",
    "unpublish",
]

MODEL_KIND = "dcvit-deploy/triton-model"
VERSION_KIND = "dcvit-deploy/triton-version"
LOCK_NAME = ".dcvit-publish.lock"
LOCK_TIMEOUT_S = 600.0


class RepositoryConflict(UserInputError):
    """The model already in the repository cannot take this artifact as a new version."""


# --------------------------------------------------------------------------- shared checks


def default_model_name(model: str) -> str:
    """``dcvit_<name>`` in lower case letters, digits and ``_`` (a safe path segment anywhere);
    ``hf-hub:timm/vit_s.augreg`` -> ``dcvit_vit_s_augreg``."""
    name = model.strip()
    for prefix in ("hf-hub:", "hf_hub:", "timm:"):
        name = name.removeprefix(prefix)
    name = name.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    name = re.sub(r"_+", "_", name)
    if not name:
        raise UserInputError(
            f"cannot derive a Triton model name from {model!r}",
            "pass a model name (--triton-model-name)",
        )
    return f"dcvit_{name}"


def _tensor_dict(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "data_type": spec.data_type, "shape": list(spec.shape)}


@dataclass(frozen=True)
class _Plan:
    """An artifact checked against the requested settings, ready to be written."""

    platform: Platform
    src: Path
    io: ModelIO
    onnx_model: Any
    max_batch_size: int
    dynamic_batching: bool
    preferred: tuple[int, ...]
    cuda_graphs: bool
    warmups: tuple[int, ...]


def _resolve(
    artifact: Artifact,
    io: ModelIO,
    onnx_model: Any,
    *,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    cuda_graphs: bool,
) -> _Plan:
    """Check the settings against the artifact's I/O (no writes); dynamic batching prefers the
    sizes above 1; one warm-up at the largest batch when the other dims are static."""
    platform = platform_for(artifact.backend)
    input_names = [t.name for t in io.inputs]
    output_names = [t.name for t in io.outputs]
    if artifact.input_name not in input_names or artifact.output_name not in output_names:
        raise UserInputError(
            f"artifact of {artifact.candidate} names input {artifact.input_name!r} and output "
            f"{artifact.output_name!r}, but {Path(artifact.path).name} has inputs "
            f"{input_names} and outputs {output_names}",
            "rebuild the artifact record from the model file (names must match exactly)",
        )
    if platform == "tensorrt_plan" and max_batch_size > 0 and io.max_batch is None:
        raise UserInputError(
            "the engine metadata does not record its optimisation profile's max batch, so "
            f"max_batch_size {max_batch_size} cannot be checked",
            "rebuild the engine with dcvit-deploy (it records 'max_batch')",
        )
    if io.max_batch is not None and max_batch_size > io.max_batch:
        raise UserInputError(
            f"the engine's optimisation profile allows batches up to {io.max_batch}, but "
            f"max_batch_size is {max_batch_size}",
            f"rebuild the engine with a profile max >= {max_batch_size} or lower max_batch_size",
        )
    for spec in (*io.inputs, *io.outputs):  # fail early with the batch-dimension message
        _config_dims(spec, max_batch_size, "input" if spec in io.inputs else "output")
    batching = max_batch_size > 0
    return _Plan(
        platform=platform,
        src=Path(artifact.path),
        io=io,
        onnx_model=onnx_model,
        max_batch_size=max_batch_size,
        dynamic_batching=batching,
        preferred=tuple(sorted({b for b in preferred_batch_sizes if b > 1})) if batching else (),
        cuda_graphs=cuda_graphs,
        warmups=(max_batch_size or 1,) if _static_for_warmup(io, max_batch_size) else (),
    )


def _build_facts(plan: _Plan, artifact: Artifact) -> dict[str, Any]:
    facts = dict(plan.io.facts)
    meta = artifact.meta
    return {
        "tensorrt_version": facts.get("tensorrt_version", meta.get("tensorrt_version")),
        "gpu": facts.get("gpu", meta.get("gpu", meta.get("gpu_name"))),
        "compute_capability": facts.get("compute_capability", meta.get("compute_capability")),
    }


def _verify_digest(src: Path, artifact: Artifact) -> str:
    digest = sha256_file(src)
    if artifact.sha256 and digest != artifact.sha256:
        raise UserInputError(
            f"{src.name} changed since candidate {artifact.candidate} was built and measured "
            f"(sha256 {digest[:12]} != {artifact.sha256[:12]})",
            "rebuild and re-measure the candidate so the shipped file is the measured one",
        )
    return digest


# --------------------------------------------------------------------------- publish


@dataclass(frozen=True)
class Published:
    """What :func:`publish` did: ``created`` False when an existing ``version`` already held the
    artifact with these settings; ``retired``: versions ``replace=True`` removed; ``notes``:
    measured settings Triton cannot mirror."""

    model_name: str
    model_dir: Path
    version: int
    config_path: Path
    sha256: str
    created: bool
    retired: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)


def _signature(config: Any) -> dict[str, Any]:
    """The served interface of a ``ModelConfig``: what a new version must keep."""
    from tritonclient.grpc import model_config_pb2

    def tensors(items: Any) -> list[list[Any]]:
        return [[t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)] for t in items]

    return {
        "platform": config.platform,
        "max_batch_size": config.max_batch_size,
        "inputs": tensors(config.input),
        "outputs": tensors(config.output),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _existing_signature(model_dir: Path) -> dict[str, Any] | None:
    """The served interface of the model already in ``model_dir`` (``None``: none there)."""
    config = model_dir / "config.pbtxt"
    if config.is_file():
        return _signature(parse_config(config.read_text(encoding="utf-8")))
    if version_dirs(model_dir):
        raise RepositoryConflict(
            f"Triton model {model_dir.name!r} exists but has no config.pbtxt to read its "
            "interface from",
            "rerun with --triton-replace or another --triton-model-name",
        )
    return None


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    for key in ("platform", "max_batch_size", "inputs", "outputs"):
        if old.get(key) != new.get(key):
            parts.append(f"{key} {old.get(key)} -> {new.get(key)}")
    return "; ".join(parts)


@contextlib.contextmanager
def _repo_lock(repo: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout

    repo.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(repo / LOCK_NAME))
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise UserInputError(
            f"another process has been publishing into {repo.name}/ for {LOCK_TIMEOUT_S:.0f} s",
            f"wait for it, or remove {LOCK_NAME} if no publisher is running",
        ) from None
    try:
        yield
    finally:
        lock.release()


def _remove_tree(path: Path) -> None:
    """Rename out of Triton's sight first (a hidden name), then delete."""
    hidden = path.with_name(f".removing-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def _remove_model(model_dir: Path) -> None:
    """Hide the version folders first (Triton only reads numeric ones), then delete the model:
    a model directory never has a config over half-deleted versions."""
    for vdir in version_dirs(model_dir):
        _remove_tree(vdir)
    shutil.rmtree(model_dir, ignore_errors=True)


def _versions(model_dir: Path) -> dict[int, dict[str, Any]]:
    """Each version's facts (``<N>/deploy.json``; ``{}`` when none), oldest first."""
    return {int(v.name): _read_json(v / "deploy.json") or {} for v in version_dirs(model_dir)}


def _served(model_dir: Path, versions: dict[int, dict[str, Any]]) -> int | None:
    """The version the config serves: the one the model's ``deploy.json`` describes, else the
    newest."""
    top = (_read_json(model_dir / "deploy.json") or {}).get("version")
    return top if top in versions else max(versions, default=None)


def _version_number(model_dir: Path) -> int:
    """The next version: one past every numeric entry (folders Triton would read included)."""
    if not model_dir.is_dir():
        return 1
    return max((int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), default=0) + 1


def _owner(facts: dict[str, Any]) -> str:
    run = (facts.get("run") or {}).get("run")
    return f"run {run}" if run else "a publisher that recorded no run"


def _serve(model_dir: Path, version: int, facts: dict[str, Any], body: str) -> None:
    """Make the config serve ``version`` only, with the settings it was published with
    (``body`` for a version that recorded none); the model's ``deploy.json`` describes it."""
    served = parse_config(facts.get("serving_config") or body)
    served.version_policy.specific.versions[:] = [version]
    text = (
        f"# Generated by dcvit-deploy from candidate {(facts.get('source') or {}).get('candidate')}"
        f"; Triton serves version {version} only;\n# facts of version N in N/deploy.json\n"
        f"{config_text(served)}"
    )
    config = model_dir / "config.pbtxt"
    if not config.is_file() or config.read_text(encoding="utf-8") != text:
        atomic_write_text(config, text)
        atomic_write_json(model_dir / "deploy.json", {**facts, "kind": MODEL_KIND})


def publish(
    repo: str | os.PathLike[str],
    model_name: str,
    artifact: Artifact,
    profile: TargetProfile,
    *,
    latency: LatencyStats | Iterable[LatencyStats] | None = None,
    source_candidate: str | None = None,
    run_meta: dict[str, Any] | None = None,
    owner: str | None = None,
    replace: bool = False,
    instance_count: int = 1,
    max_queue_delay_us: int = 0,
) -> Published:
    """Publish ``artifact``, measured under ``profile``, as the served version of ``model_name``.

    * The config carries the measured runtime settings (:func:`serving_settings`);
      ``max_batch_size`` is the profile's largest batch (0 for a static batch dimension).
    * A new model gets version 1, a compatible one N+1, and the config serves that version only;
      a version already holding the artifact with the same settings is served again without a
      copy (``created=False``).
    * :class:`RepositoryConflict` unless ``replace=True``: the model serves a version of another
      ``owner`` (``None`` skips the check), or has another platform, I/O or ``max_batch_size``
      (``replace`` then retires the older versions).
    * :class:`NotServable` for ``torch`` artifacts, :class:`ServingMismatch` for settings
      Triton cannot reproduce. ``latency``, ``source_candidate``, ``run_meta``: ``deploy.json``.
    """
    repo = Path(repo)
    safe_name(model_name, "model name")
    if artifact.backend.lower() != profile.backend.lower():
        raise UserInputError(
            f"artifact of {artifact.candidate} was built by backend {artifact.backend!r} but "
            f"profile {profile.name!r} is for {profile.backend!r}",
            "publish with the profile the artifact was built and measured under",
        )
    platform = platform_for(artifact.backend)  # NotServable for torch, before any work
    stats = (latency,) if isinstance(latency, LatencyStats) else tuple(latency or ())
    if instance_count < 1:
        raise UserInputError("instance_count must be >= 1", "pass instance_count=1 or more")
    src = Path(artifact.path)
    if not src.is_file():
        raise UserInputError(
            f"artifact file {src.name} of candidate {artifact.candidate} is missing",
            "rebuild the candidate's artifact",
        )
    onnx_model = _load_onnx(src) if platform == "onnxruntime_onnx" else None
    if onnx_model is None:
        io = read_engine_io(engine_meta_path(src, artifact.meta))
    else:
        io = read_onnx_io(src, model=onnx_model)
    batch_dynamic = onnx_model is None or all(t.shape and t.shape[0] == -1 for t in io.inputs)
    item = next((t.shape[1:] for t in io.inputs if t.name == artifact.input_name), ())
    settings = serving_settings(
        profile,
        artifact_input=artifact.input_name,
        item_shape=tuple(item) if all(d > 0 for d in item) else (),
    )
    plan = _resolve(
        artifact,
        io,
        onnx_model,
        max_batch_size=profile.max_batch if batch_dynamic else 0,
        preferred_batch_sizes=profile.batch_sizes if batch_dynamic else (),
        cuda_graphs=settings.cuda_graphs,
    )
    digest = _verify_digest(plan.src, artifact)
    source = source_candidate or artifact.candidate
    config = build_config(
        model_name,
        plan.platform,
        plan.io,
        max_batch_size=plan.max_batch_size,
        instance_count=instance_count,
        kind=settings.kind,
        gpus=settings.gpus,
        dynamic_batching=plan.dynamic_batching,
        preferred_batch_sizes=plan.preferred,
        max_queue_delay_us=max_queue_delay_us,
        cuda_graphs=plan.cuda_graphs,
        warmup_batch_sizes=plan.warmups,
        graph_level=settings.graph_level,
        gpu_accelerators=settings.gpu_accelerators,
        parameters=settings.parameters,
    )
    body = config_text(config)  # everything but the comment and the version policy
    new_signature = _signature(config)
    model_dir = repo / model_name

    with _repo_lock(repo):
        old_signature = _existing_signature(model_dir)
        incompatible = old_signature is not None and old_signature != new_signature
        if incompatible and not replace:
            assert old_signature is not None
            raise RepositoryConflict(
                f"Triton model {model_name!r} in {repo} serves another interface "
                f"({_describe_difference(old_signature, new_signature)})",
                "rerun with --triton-replace (retires its versions) or choose another "
                "--triton-model-name",
            )
        versions = _versions(model_dir)
        served = _served(model_dir, versions)
        held = [  # versions that hold this file with these settings (any text layout)
            n
            for n, f in versions.items()
            if not incompatible
            and f.get("sha256") == digest
            and parse_config(f.get("serving_config", body)) == config
        ]
        version = held[-1] if held else _version_number(model_dir)
        theirs = versions.get(served) if served is not None else None
        other = theirs is not None and theirs.get("owner") != owner and served != version
        if owner and other and not replace:  # a rerun never undoes another run's deployment
            raise RepositoryConflict(
                f"Triton model {model_name!r} in {repo} serves version {served}, published by "
                f"{_owner(theirs or {})}",
                "rerun with --triton-replace to serve this run's pick instead, or choose "
                "another --triton-model-name",
            )
        facts = versions[version] if held else {
            "schema": SCHEMA_VERSION,
            "kind": VERSION_KIND,
            "generator": f"dcvit-deploy {__version__}",
            "model_name": model_name,
            "version": version,
            "config": "config.pbtxt",
            "platform": plan.platform,
            "model_file": f"{version}/model{_MODEL_SUFFIX[plan.platform]}",
            "sha256": digest,
            "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "owner": owner,
            "source": {
                "candidate": source,
                "backend": artifact.backend,
                "precision": artifact.precision,
                "file_name": plan.src.name,
                "build_seconds": artifact.build_seconds,
            },
            "profile": to_dict(profile),
            "serving": settings.describe(),
            "serving_config": body,
            **_build_facts(plan, artifact),
            "engine_profile_max_batch": plan.io.max_batch,
            # The engine builder writes one optimisation profile (min/opt/max batch).
            "engine_profiles": 1 if plan.platform == "tensorrt_plan" else None,
            "max_batch_size": plan.max_batch_size,
            "signature": new_signature,
            "inputs": [_tensor_dict(t) for t in plan.io.inputs],
            "outputs": [_tensor_dict(t) for t in plan.io.outputs],
            "latency": [to_dict(s) for s in stats],
            "artifact_meta": artifact.meta,
            "run": run_meta or {},
        }  # fmt: skip
        if not held:
            _write_version(model_dir, version, plan, digest, facts)
        # The config last: for a new model its presence makes the model loadable.
        _serve(model_dir, version, facts, body)
        retired = tuple(n for n in versions if incompatible)
        for n in retired:
            _remove_tree(model_dir / str(n))
    return Published(
        model_name=model_name,
        model_dir=model_dir,
        version=version,
        config_path=model_dir / "config.pbtxt",
        sha256=digest,
        created=not held,
        retired=retired,
        notes=settings.notes,
        settings=settings.describe(),
    )


def _write_version(
    model_dir: Path, version: int, plan: _Plan, digest: str, facts: dict[str, Any]
) -> None:
    """Stage version ``version`` under a hidden name unique to this writer, then rename it
    into place: Triton never sees a half-written version."""
    new_model = not model_dir.exists()
    staging = model_dir / f".staging-{version}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)  # the umask's mode: Triton may run as another user
        dest = staging / f"model{_MODEL_SUFFIX[plan.platform]}"
        shutil.copyfile(plan.src, dest)
        if sha256_file(dest) != digest:
            raise UserInputError(
                f"{plan.src.name} changed while it was being published",
                "publish again once nothing writes to the artifact",
            )
        if plan.platform == "onnxruntime_onnx":
            for location in _external_data_files(plan.onnx_model):
                target = staging / location
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(plan.src.parent / location, target)
        atomic_write_json(staging / "deploy.json", facts)
        os.rename(staging, model_dir / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if new_model:  # no empty model directory left for Triton to trip over
            shutil.rmtree(model_dir, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- stale models


def unpublish(
    repo: str | os.PathLike[str],
    owner: str,
    *,
    run_root: str | os.PathLike[str],
    keep: Iterable[str] = (),
) -> list[str]:
    """Remove the versions ``owner`` published into a run's own repository (inside
    ``run_root``, else :class:`UserInputError`), except in the ``keep`` models; return the models
    touched. A model left with another owner's versions serves the newest of them."""
    repo = Path(repo)
    root = Path(run_root).resolve()
    if not repo.exists():
        return []
    resolved = repo.resolve()
    if resolved != root and root not in resolved.parents:
        raise UserInputError(
            f"refusing to clear {repo}: it is not inside the run directory {root.name}/",
            "only a run's own repository is cleaned; remove models from other repositories by hand",
        )
    touched: list[str] = []
    with _repo_lock(repo):
        for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
            versions = _versions(model_dir)
            mine = [n for n, f in versions.items() if f.get("owner") == owner]
            if model_dir.name.startswith(".") or model_dir.name in set(keep) or not mine:
                continue
            rest = [n for n in versions if n not in mine]
            served = _served(model_dir, versions)
            if not rest:
                _remove_model(model_dir)
            elif served in mine:  # serve the newest version left first, then remove
                assert served is not None
                _serve(model_dir, rest[-1], versions[rest[-1]], versions[served]["serving_config"])
            for n in mine if rest else ():
                _remove_tree(model_dir / str(n))
            touched.append(model_dir.name)
    return touched
