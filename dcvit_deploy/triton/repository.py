"""Triton model repositories: publish measured artifacts as numbered versions of one model.

Layout written by :func:`publish`::

    <repo>/<model>/config.pbtxt            one config for the model (written last)
    <repo>/<model>/<N>/model.onnx          (ONNX Runtime) | model.plan (TensorRT)
    <repo>/<model>/<N>/deploy.json         facts of version N: sha256, source candidate,
                                           profile, runtime settings, latency, run metadata
    <repo>/<model>/deploy.json             a copy of the newest version's facts

Publishing into an existing model adds version N+1 beside the older ones, and the config says
``version_policy { latest { num_versions: 1 } }``, so Triton serves the newest version only (the
config, which holds the runtime settings, always describes the version that is served). A
model whose platform, inputs/outputs or ``max_batch_size`` differ is refused unless
``replace=True``, which publishes the new version and then retires the older ones. Publishing
the artifact (same sha256) the served (newest) version holds creates nothing and reports that
version; an artifact only an older version holds is published again as N+1, so it is served.
A version folder is staged under a unique hidden name inside the model directory and renamed
into place, so Triton never sees a half-written version and two writers never share a
temporary path; publishers of one repository take turns through a file lock on
``<repo>/.dcvit-publish.lock``.

:func:`write_model_repository` is the older single-version writer (explicit settings, per-GPU
``configs/<name>.pbtxt``); it writes one fixed version in place and keeps no history.

Size: this module is longer than ~500 lines because publishing is one transaction (resolve the
model, stage a version, check compatibility, lock, rename, retire, clear stale models) whose
steps share private helpers; the single-version writer kept for per-GPU configs sits beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
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
    atomic_write_with,
    sha256_file,
)
from dcvit_deploy.store.records import (
    SCHEMA_VERSION,
    Artifact,
    LatencyStats,
    TargetProfile,
    to_dict,
)
from dcvit_deploy.triton.model_config import (
    _MODEL_SUFFIX,
    _NAME_RE,
    Kind,
    ModelIO,
    Platform,
    TensorSpec,
    _config_dims,
    _external_data_files,
    _load_onnx,
    _schema_check,
    _static_for_warmup,
    engine_meta_path,
    parse_config,
    platform_for,
    read_engine_io,
    read_onnx_io,
    render_config,
    version_dirs,
)
from dcvit_deploy.triton.runtime import ServingSettings, serving_settings

__all__ = [
    "Published",
    "RepositoryConflict",
    "check_model_name",
    "clear_stale",
    "default_model_name",
    "publish",
    "write_model_repository",
]

MODEL_KIND = "dcvit-deploy/triton-model"
VERSION_KIND = "dcvit-deploy/triton-version"
LOCK_NAME = ".dcvit-publish.lock"
LOCK_TIMEOUT_S = 600.0


class RepositoryConflict(UserInputError):
    """The model already in the repository cannot take this artifact as a new version."""


# --------------------------------------------------------------------------- shared checks


def _check_name(value: str, what: str) -> None:
    if not _NAME_RE.match(value) or value in (".", ".."):
        raise UserInputError(
            f"{what} {value!r} is not a valid directory name",
            "use letters, digits, '_', '-' and '.', starting with a letter or digit",
        )


def check_model_name(name: str) -> None:
    """Raise :class:`UserInputError` (one line) unless ``name`` is a usable Triton model name:
    for up-front option checks (``--triton-model-name``) before any work is done."""
    _check_name(name, "Triton model name")


def default_model_name(model: str) -> str:
    """A stable, Triton-legal model name for a base model: ``dcvit_<name>``.

    ``deit_small_patch16_224`` -> ``dcvit_deit_small_patch16_224``;
    ``hf-hub:timm/vit_small_patch16_224.augreg_in21k`` ->
    ``dcvit_vit_small_patch16_224_augreg_in21k``. Lower case letters, digits and ``_`` only, so
    the name is also a safe URL path segment and directory name everywhere.
    """
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


def _copy_atomic(src: Path, dest: Path) -> None:
    def copy(tmp: Path) -> None:
        shutil.copyfile(src, tmp)

    atomic_write_with(dest, copy)


def _write_text_unique(path: Path, text: str) -> None:
    """Atomic write through a temporary file unique to this writer (``mkstemp``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_json_unique(path: Path, obj: Any) -> None:
    _write_text_unique(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
    *,
    kind: Kind,
    instance_count: int,
    max_batch_size: int | None,
    dynamic_batching: bool | None,
    preferred_batch_sizes: Sequence[int],
    cuda_graphs: bool | None,
    warmup_batch_sizes: Sequence[int] | None,
    onnx_model: Any = None,
) -> _Plan:
    """Read the artifact's I/O and decide/check every setting against it (no writes).

    ``onnx_model``: the artifact's already loaded ``onnx.ModelProto`` (loaded here otherwise).
    """
    if instance_count < 1:
        raise UserInputError("instance_count must be >= 1", "pass instance_count=1 or more")
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise UserInputError(f"instance kind {kind!r} is unknown", "use KIND_GPU or KIND_CPU")
    platform = platform_for(artifact.backend)
    src = Path(artifact.path)
    if not src.is_file():
        raise UserInputError(
            f"artifact file {src.name} of candidate {artifact.candidate} is missing",
            "rebuild the candidate's artifact",
        )

    if platform == "tensorrt_plan":
        io = read_engine_io(engine_meta_path(src, artifact.meta))
        if kind == "KIND_CPU":
            raise UserInputError(
                "a TensorRT plan cannot run on KIND_CPU instances", "use kind='KIND_GPU'"
            )
    else:
        if onnx_model is None:
            onnx_model = _load_onnx(src)
        io = read_onnx_io(src, model=onnx_model)

    input_names = [t.name for t in io.inputs]
    output_names = [t.name for t in io.outputs]
    if artifact.input_name not in input_names or artifact.output_name not in output_names:
        raise UserInputError(
            f"artifact of {artifact.candidate} names input {artifact.input_name!r} and output "
            f"{artifact.output_name!r}, but {src.name} has inputs {input_names} and outputs "
            f"{output_names}",
            "rebuild the artifact record from the model file (names must match exactly)",
        )

    preferred = sorted({int(b) for b in preferred_batch_sizes})
    if max_batch_size is None:
        if platform == "tensorrt_plan" and io.max_batch is not None:
            max_batch_size = io.max_batch
        else:
            max_batch_size = max(preferred, default=0)
    if max_batch_size < 0:
        raise UserInputError("max_batch_size must be >= 0", "pass 0 (no batching) or more")
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

    if dynamic_batching is None:
        dynamic_batching = max_batch_size > 0
    if dynamic_batching and max_batch_size == 0:
        raise UserInputError(
            "dynamic batching needs max_batch_size > 0",
            "pass a max_batch_size or dynamic_batching=False",
        )
    too_big = [b for b in preferred if b > max_batch_size]
    if dynamic_batching and too_big:
        raise UserInputError(
            f"preferred batch sizes {too_big} exceed max_batch_size {max_batch_size}",
            "raise max_batch_size or drop those sizes",
        )
    preferred_out = tuple(b for b in preferred if b > 1) if dynamic_batching else ()

    if cuda_graphs is None:
        cuda_graphs = platform == "tensorrt_plan"
    if cuda_graphs and platform != "tensorrt_plan":
        raise UserInputError(
            "Triton's CUDA graph optimisation applies to TensorRT plans only",
            "pass cuda_graphs=False for ONNX models",
        )

    if warmup_batch_sizes is None:
        default = max_batch_size if max_batch_size > 0 else 1
        warmups = [default] if _static_for_warmup(io, max_batch_size) else []
    else:
        warmups = sorted({int(b) for b in warmup_batch_sizes})
        if warmups and not _static_for_warmup(io, max_batch_size):
            raise UserInputError(
                "model warm-up needs static non-batch input dims, but the inputs are "
                f"{[list(t.shape) for t in io.inputs]}",
                "pass warmup_batch_sizes=() or export with static image size",
            )
        bad = [b for b in warmups if b < 1 or (max_batch_size > 0 and b > max_batch_size)]
        if bad:
            raise UserInputError(
                f"warm-up batch sizes {bad} are outside 1..{max(max_batch_size, 1)}",
                "use warm-up sizes within max_batch_size",
            )
    return _Plan(
        platform=platform,
        src=src,
        io=io,
        onnx_model=onnx_model,
        max_batch_size=max_batch_size,
        dynamic_batching=dynamic_batching,
        preferred=preferred_out,
        cuda_graphs=cuda_graphs,
        warmups=tuple(warmups),
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
    """What :func:`publish` did.

    ``created`` is False when a version already held this artifact (same sha256): nothing was
    copied and ``version`` is that version. ``served`` says whether ``version`` is the newest
    version, the one Triton serves under the written ``version_policy``. ``retired`` lists the
    versions removed by ``replace=True``. ``notes`` name measured settings Triton cannot mirror
    (see :mod:`dcvit_deploy.triton.runtime`) and anything the caller should report.
    """

    model_name: str
    model_dir: Path
    version: int
    config_path: Path
    sha256: str
    created: bool
    served: bool
    retired: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)


def _signature_from_parsed(config: Any) -> dict[str, Any]:
    from tritonclient.grpc import model_config_pb2

    def tensors(items: Any) -> list[list[Any]]:
        return [[t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)] for t in items]

    return {
        "platform": config.platform,
        "max_batch_size": config.max_batch_size,
        "inputs": tensors(config.input),
        "outputs": tensors(config.output),
    }


def _signature(plan: _Plan) -> dict[str, Any]:
    mbs = plan.max_batch_size

    def tensors(specs: Iterable[TensorSpec], what: str) -> list[list[Any]]:
        return [[t.name, t.data_type, list(_config_dims(t, mbs, what))] for t in specs]

    return {
        "platform": plan.platform,
        "max_batch_size": mbs,
        "inputs": tensors(plan.io.inputs, "input"),
        "outputs": tensors(plan.io.outputs, "output"),
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
        parsed = parse_config(config.read_text(encoding="utf-8"))
        if parsed is not None:
            return _signature_from_parsed(parsed)
    facts = _read_json(model_dir / "deploy.json")
    if facts and isinstance(facts.get("signature"), dict):
        return dict(facts["signature"])
    if config.is_file() or version_dirs(model_dir):
        raise RepositoryConflict(
            f"Triton model {model_dir.name!r} exists but its interface cannot be read "
            "(no tritonclient to parse config.pbtxt, no deploy.json from dcvit-deploy)",
            "pip install 'tritonclient[grpc]', or pass replace=True / another model name",
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


def _version_sha256(model_dir: Path, vdir: Path) -> str | None:
    """The sha256 recorded for a version: ``<N>/deploy.json``, or for a model written by
    :func:`write_model_repository` (no per-version facts) the model's ``deploy.json``."""
    facts = _read_json(vdir / "deploy.json")
    if facts is None:
        facts = _read_json(model_dir / "deploy.json")
        if not facts or str(facts.get("version")) != vdir.name:
            return None
    sha = facts.get("sha256")
    return sha if isinstance(sha, str) else None


def _version_number(model_dir: Path) -> int:
    """The next version: one past every numeric entry (folders Triton would read included)."""
    numbers = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    return max(numbers, default=0) + 1


def publish(
    repo: str | os.PathLike[str],
    model_name: str,
    artifact: Artifact,
    profile: TargetProfile,
    *,
    latency: LatencyStats | Iterable[LatencyStats] | None = None,
    source_candidate: str | None = None,
    run_meta: dict[str, Any] | None = None,
    replace: bool = False,
    instance_count: int = 1,
    max_queue_delay_us: int = 0,
) -> Published:
    """Publish ``artifact``, measured under ``profile``, as the next version of ``model_name``.

    * The config's runtime settings are the measured ones (:func:`serving_settings`): instance
      kind and GPU id, ONNX Runtime threads / execution mode / graph level / TensorRT provider
      options, CUDA graphs exactly when a TensorRT profile measured with them.
    * ``max_batch_size`` is the profile's largest batch (0 when the artifact's batch dimension
      is static), with dynamic batching preferring the profile's batch sizes.
    * Versions: a new model gets version 1; an existing compatible model gets N+1 and Triton
      serves the newest (``version_policy latest 1``). Same sha256 as the newest version:
      nothing new is written (the config is refreshed when its settings changed) and that
      version is reported with ``created=False``; same sha256 as an older version only: it is
      published again as N+1, so the pick is what Triton serves.
    * Refused with :class:`RepositoryConflict` (one line: problem; fix) when the existing model
      has another platform, I/O or ``max_batch_size``, unless ``replace=True``: then the new
      version is published and the older versions are retired.
    * Refused with :class:`~dcvit_deploy.triton.model_config.NotServable` for ``torch`` artifacts
    and
      :class:`~dcvit_deploy.triton.runtime.ServingMismatch` for measured settings Triton cannot
      reproduce; ``artifact.backend`` must be ``profile.backend``.

    ``latency`` (one or several batch sizes), ``source_candidate`` (default
    ``artifact.candidate``) and ``run_meta`` (the run's identity, inputs, anything JSON) go to
    ``<N>/deploy.json``. Every written config is validated against Triton's ModelConfig schema
    when tritonclient is installed.
    """
    repo = Path(repo)
    _check_name(model_name, "model name")
    if artifact.backend.lower() != profile.backend.lower():
        raise UserInputError(
            f"artifact of {artifact.candidate} was built by backend {artifact.backend!r} but "
            f"profile {profile.name!r} is for {profile.backend!r}",
            "publish with the profile the artifact was built and measured under",
        )
    platform = platform_for(artifact.backend)  # NotServable for torch, before any work
    stats: tuple[LatencyStats, ...]
    if latency is None:
        stats = ()
    elif isinstance(latency, LatencyStats):
        stats = (latency,)
    else:
        stats = tuple(latency)

    src = Path(artifact.path)
    onnx_model: Any = None
    if platform == "onnxruntime_onnx" and src.is_file():
        onnx_model = _load_onnx(src)
        head = read_onnx_io(src, model=onnx_model)
        batch_dynamic = all(t.shape and t.shape[0] == -1 for t in head.inputs)
        item = next((t.shape[1:] for t in head.inputs if t.name == artifact.input_name), ())
    else:
        batch_dynamic, item = True, ()
    settings = serving_settings(
        profile,
        artifact_input=artifact.input_name,
        item_shape=tuple(item) if all(d > 0 for d in item) else (),
    )
    plan = _resolve(
        artifact,
        kind=settings.kind,
        instance_count=instance_count,
        max_batch_size=profile.max_batch if batch_dynamic else 0,
        dynamic_batching=None,
        preferred_batch_sizes=profile.batch_sizes if batch_dynamic else (),
        cuda_graphs=settings.cuda_graphs,
        warmup_batch_sizes=None,
        onnx_model=onnx_model,
    )
    digest = _verify_digest(plan.src, artifact)
    source = source_candidate or artifact.candidate
    text = _render_published(model_name, plan, settings, instance_count, max_queue_delay_us, source)
    check = _schema_check(text)
    if check.status == "failed":
        raise RuntimeError(f"generated an invalid Triton config: {'; '.join(check.messages)}")
    new_signature = _signature(plan)
    model_dir = repo / model_name

    with _repo_lock(repo):
        old_signature = _existing_signature(model_dir)
        incompatible = old_signature is not None and old_signature != new_signature
        if incompatible and not replace:
            assert old_signature is not None
            raise RepositoryConflict(
                f"Triton model {model_name!r} in {repo.name}/ serves another interface "
                f"({_describe_difference(old_signature, new_signature)})",
                "pass replace=True (retires its versions) or publish under another model name",
            )
        versions = version_dirs(model_dir)
        latest = int(versions[-1].name) if versions else None
        if not incompatible and versions and _version_sha256(model_dir, versions[-1]) == digest:
            # The served version already holds this artifact: an idempotent rerun. An artifact
            # that only an *older* version holds is published again as N+1, so that the pick
            # is what Triton serves (versions are immutable; serving one means being newest).
            assert latest is not None
            return _republished(model_name, model_dir, latest, text, digest, settings)

        new_model = not model_dir.exists()
        model_dir.mkdir(parents=True, exist_ok=True)
        version = _version_number(model_dir)
        model_file = f"model{_MODEL_SUFFIX[plan.platform]}"
        facts = {
            "schema": SCHEMA_VERSION,
            "kind": VERSION_KIND,
            "generator": f"dcvit-deploy {__version__}",
            "model_name": model_name,
            "version": version,
            "config": "config.pbtxt",
            "platform": plan.platform,
            "model_file": f"{version}/{model_file}",
            "sha256": digest,
            "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {
                "candidate": source,
                "backend": artifact.backend,
                "precision": artifact.precision,
                "file_name": plan.src.name,
                "build_seconds": artifact.build_seconds,
            },
            "profile": to_dict(profile),
            "serving": settings.describe(),
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
        }
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
        try:
            dest = staging / model_file
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
            _write_json_unique(staging / "deploy.json", facts)
            os.chmod(staging, 0o755)  # mkdtemp makes it private; Triton may run as another user
            os.rename(staging, model_dir / str(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if new_model:  # no empty model directory left for Triton to trip over
                shutil.rmtree(model_dir, ignore_errors=True)
            raise
        # The config last: for a new model its presence makes the model loadable.
        config_path = model_dir / "config.pbtxt"
        _write_text_unique(config_path, text)
        _write_json_unique(model_dir / "deploy.json", {**facts, "kind": MODEL_KIND})
        retired: list[int] = []
        if incompatible:
            for vdir in versions:
                _remove_tree(vdir)
                retired.append(int(vdir.name))
    return Published(
        model_name=model_name,
        model_dir=model_dir,
        version=version,
        config_path=config_path,
        sha256=digest,
        created=True,
        served=True,
        retired=tuple(retired),
        notes=settings.notes,
        settings=settings.describe(),
    )


def _render_published(
    model_name: str,
    plan: _Plan,
    settings: ServingSettings,
    instance_count: int,
    max_queue_delay_us: int,
    source: str,
) -> str:
    return render_config(
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
        latest_versions=1,
        graph_level=settings.graph_level,
        gpu_accelerators=settings.gpu_accelerators,
        parameters=settings.parameters,
        comment=f"Generated by dcvit-deploy from candidate {source}; Triton serves the newest "
        "version;\nfacts of version N in N/deploy.json",
    )


def _republished(
    model_name: str,
    model_dir: Path,
    version: int,
    text: str,
    digest: str,
    settings: ServingSettings,
) -> Published:
    """The served ``version`` already holds the artifact: write nothing new, but refresh the
    config when the measured runtime settings changed."""
    config_path = model_dir / "config.pbtxt"
    notes = list(settings.notes)
    current = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    # Same artifact, same interface; only the comment or runtime settings can differ.
    if current is not None and _strip_comments(current) != _strip_comments(text):
        _write_text_unique(config_path, text)
        notes.append("runtime settings changed since that version was published; "
                     "config.pbtxt now has the ones just measured")  # fmt: skip
    return Published(
        model_name=model_name,
        model_dir=model_dir,
        version=version,
        config_path=config_path,
        sha256=digest,
        created=False,
        served=True,
        notes=tuple(notes),
        settings=settings.describe(),
    )


def _strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


# --------------------------------------------------------------------------- stale models


def clear_stale(
    repo: str | os.PathLike[str],
    *,
    run_root: str | os.PathLike[str],
    keep: Iterable[str] = (),
) -> list[str]:
    """Remove the models a run published into its own run-local repository; return their names.

    For a rerun that picks nothing (or picks under another model name): call it on the run's
    own repository (``RUN/triton``) so no stale model stays behind to be served. ``keep`` names
    models to leave in place (the ones this run publishes).

    Never deletes: anything when ``repo`` is not inside ``run_root`` (a user's ``--triton-repo``
    is refused with :class:`UserInputError`, so models published there are never removed by a
    later run); model directories not written by dcvit-deploy (no ``deploy.json`` of ours);
    files at the repository's top level. A removed model's version folders are hidden first
    (renamed to non-numeric names, which Triton ignores), so Triton never loads a half-deleted
    version.
    """
    repo = Path(repo)
    root = Path(run_root).resolve()
    if not repo.exists():
        return []
    resolved = repo.resolve()
    if resolved != root and root not in resolved.parents:
        raise UserInputError(
            f"refusing to clear {repo}: it is not inside the run directory {root.name}/",
            "clear_stale only cleans a run's own repository; remove models from other "
            "repositories by hand",
        )
    kept = set(keep)
    removed: list[str] = []
    with _repo_lock(repo):
        for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
            if model_dir.name.startswith(".") or model_dir.name in kept:
                continue
            facts = _read_json(model_dir / "deploy.json")
            if not facts or facts.get("kind") != MODEL_KIND:
                continue
            _remove_model(model_dir)
            removed.append(model_dir.name)
    return removed


# --------------------------------------------------------------------------- single version


def write_model_repository(
    repo_dir: str | os.PathLike[str],
    model_name: str,
    artifact: Artifact,
    *,
    max_batch_size: int | None = None,
    instance_count: int = 1,
    kind: Kind = "KIND_GPU",
    gpus: Sequence[int] = (),
    dynamic_batching: bool | None = None,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 0,
    cuda_graphs: bool | None = None,
    warmup_batch_sizes: Sequence[int] | None = None,
    version: int = 1,
    config_name: str | None = None,
    latency: LatencyStats | Iterable[LatencyStats] | None = None,
    source_candidate: str | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write one fixed version of one model from explicit settings; return the model dir.

    Prefer :func:`publish`, which takes the settings from the measured target profile and
    keeps version history. This writer overwrites ``version`` in place.

    * platform: from ``artifact.backend`` (``onnxruntime`` -> ``onnxruntime_onnx``,
      ``tensorrt`` -> ``tensorrt_plan``).
    * ``max_batch_size``: ``None`` means the engine profile's max batch for a plan, and
      ``max(preferred_batch_sizes)`` (or 0 without them) for ONNX; it must be covered by the
      engine profile and needs a dynamic batch dimension when > 0.
    * ``dynamic_batching``: ``None`` means on iff ``max_batch_size > 0``; preferred sizes
      (typically the profile's batch sizes) > 1 are written, each must be <= max_batch_size.
    * ``cuda_graphs``: ``None`` means on for TensorRT plans; not available for ONNX.
    * ``warmup_batch_sizes``: ``None`` means one warm-up at ``max_batch_size`` (or 1) when all
      non-batch input dims are static; ``()`` disables warm-up.
    * ``config_name``: write a per-GPU ``configs/<config_name>.pbtxt`` whose
      ``default_model_filename`` points at ``<version>/model_<config_name>.<ext>``, selected at
      serve time with ``--model-config-name``; deploy facts go to
      ``configs/<config_name>.deploy.json``.
    * ``latency``: the measured stats (one or several batch sizes) recorded in the deploy
      facts; ``source_candidate`` defaults to ``artifact.candidate``.

    The model file is copied atomically and its sha256 checked against ``artifact.sha256``;
    the config is written last (and validated against Triton's schema when tritonclient is
    installed). Raises :class:`UserInputError` (one line with a fix) for every mismatch between
    the request and the artifact.
    """
    _check_name(model_name, "model name")
    stats: tuple[LatencyStats, ...]
    if latency is None:
        stats = ()
    elif isinstance(latency, LatencyStats):
        stats = (latency,)
    else:
        stats = tuple(latency)
    if config_name is not None:
        _check_name(config_name, "config name")
    if version < 1:
        raise UserInputError(f"model version {version} is invalid", "use a version >= 1")
    plan = _resolve(
        artifact,
        kind=kind,
        instance_count=instance_count,
        max_batch_size=max_batch_size,
        dynamic_batching=dynamic_batching,
        preferred_batch_sizes=preferred_batch_sizes,
        cuda_graphs=cuda_graphs,
        warmup_batch_sizes=warmup_batch_sizes,
    )
    src, io, platform = plan.src, plan.io, plan.platform

    model_dir = Path(repo_dir) / model_name
    suffix = _MODEL_SUFFIX[platform]
    model_file = f"model_{config_name}{suffix}" if config_name else f"model{suffix}"
    dest = model_dir / str(version) / model_file

    # 1. the model file (and any ONNX external data), byte-identical to what was measured
    _verify_digest(src, artifact)
    _copy_atomic(src, dest)
    digest = sha256_file(dest)
    if artifact.sha256 and digest != artifact.sha256:
        dest.unlink(missing_ok=True)
        raise UserInputError(
            f"{src.name} changed since candidate {artifact.candidate} was built and measured "
            f"(sha256 {digest[:12]} != {artifact.sha256[:12]})",
            "rebuild and re-measure the candidate so the shipped file is the measured one",
        )
    if platform == "onnxruntime_onnx":
        for location in _external_data_files(plan.onnx_model):
            _copy_atomic(src.parent / location, dest.parent / location)

    # 2. deploy facts
    source = source_candidate or artifact.candidate
    if config_name:
        config_rel = f"configs/{config_name}.pbtxt"
        deploy_path = model_dir / "configs" / f"{config_name}.deploy.json"
    else:
        config_rel = "config.pbtxt"
        deploy_path = model_dir / "deploy.json"
    deploy = {
        "schema": SCHEMA_VERSION,
        "kind": MODEL_KIND,
        "generator": f"dcvit-deploy {__version__}",
        "model_name": model_name,
        "version": version,
        "config": config_rel,
        "platform": platform,
        "model_file": f"{version}/{model_file}",
        "sha256": digest,
        "source": {
            "candidate": source,
            "backend": artifact.backend,
            "precision": artifact.precision,
            "file_name": src.name,
            "build_seconds": artifact.build_seconds,
        },
        **_build_facts(plan, artifact),
        "engine_profile_max_batch": io.max_batch,
        "max_batch_size": plan.max_batch_size,
        "inputs": [_tensor_dict(t) for t in io.inputs],
        "outputs": [_tensor_dict(t) for t in io.outputs],
        "latency": [to_dict(s) for s in stats],
        "artifact_meta": artifact.meta,
        "extra": extra_meta or {},
    }
    atomic_write_json(deploy_path, deploy)

    # 3. the config, last: Triton treats a model directory with a config as ready
    text = render_config(
        model_name,
        platform,
        io,
        max_batch_size=plan.max_batch_size,
        instance_count=instance_count,
        kind=kind,
        gpus=gpus,
        dynamic_batching=plan.dynamic_batching,
        preferred_batch_sizes=plan.preferred,
        max_queue_delay_us=max_queue_delay_us,
        cuda_graphs=plan.cuda_graphs,
        warmup_batch_sizes=plan.warmups,
        default_model_filename=model_file if config_name else None,
        comment=f"Generated by dcvit-deploy from candidate {source}; "
        f"build facts in {deploy_path.name}",
    )
    check = _schema_check(text)
    if check.status == "failed":
        raise RuntimeError(f"generated an invalid Triton config: {'; '.join(check.messages)}")
    atomic_write_text(model_dir / config_rel, text)
    return model_dir
