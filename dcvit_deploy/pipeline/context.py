"""What the units of one job share: the locked run, the options, the target profile, and the
loaded teacher and images (loaded once, lazily), plus the content fingerprints units declare
as inputs (weights, images, runtime versions, device)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.pipeline.executor import LocalExecutor
from dcvit_deploy.progress import ProgressEvent, ProgressFn, quiet

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dcvit_deploy.config.options import CompressOptions, DeployOptions
    from dcvit_deploy.store.records import TargetProfile
    from dcvit_deploy.store.rundir import RunDir

RUNTIME_PACKAGES = ("onnxruntime", "onnxruntime-gpu", "tensorrt")
"""Runtimes whose version changes a built artifact or a measurement (never a finetune)."""
EXPORT_PACKAGES = ("torch", "onnx", "onnxslim", "onnxscript")
TRAIN_PACKAGES = ("torch", "timm")


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def device_identity(profile: TargetProfile) -> dict[str, Any]:
    """What identifies the device a profile measures on (CPU model and cores; GPU name)."""
    from dcvit_deploy.latency.machine import cpu_model, physical_cores

    ident: dict[str, Any] = {"cpu": cpu_model(), "cores": physical_cores()}
    if profile.device == "cuda":
        from dcvit_deploy.latency.machine import cuda_info

        info = cuda_info(int(profile.backend_options.get("device_id", 0)))
        ident["gpu"] = info.get("name") or info.get("gpu") or ""
    return ident


def tensor_fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's weights (names, shapes, dtypes, bytes): the same for the same
    weights whatever file or source they came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Prepared:
    """Loaded teacher, data and held-out images shared by the units of one process."""

    teacher: nn.Module
    weights_fp: str
    model_kwargs: dict[str, Any]
    data_config: dict[str, Any]
    train_paths: list[Path]
    holdout: torch.Tensor
    holdout_fp: str
    holdout_note: str
    input_fp: str
    images_note: str = ""
    holdout_on_training: bool = False
    fidelity: Any = None  # (--eval-data, FidelitySet): selection.fidelity.fidelity_set


def prepare(
    opts: CompressOptions, state_dict: Mapping[str, torch.Tensor] | None = None
) -> Prepared:
    """Load the model (local weights only; ``--random-init`` seeded by ``--seed``) and the
    few-shot images; split a held-out set."""
    import torch

    from dcvit_deploy.model.images import input_fingerprint as data_fp
    from dcvit_deploy.model.images import (
        list_images,
        load_eval_tensor,
        resolve_data_config,
        sample_images,
        split_holdout,
    )
    from dcvit_deploy.model.loading import check_finite_outputs, geometry_kwargs, load_model

    images = list_images(opts.data)  # fail fast on bad data before loading the model
    torch.manual_seed(opts.seed)  # a random-init teacher is reproducible, hence resumable
    loaded = load_model(
        opts.model,
        checkpoint=opts.checkpoint,
        state_dict=state_dict,
        model_kwargs=opts.model_kwargs,
        pretrained_cache=opts.pretrained_cache,
        random_init=opts.random_init,
    )
    kwargs = {**loaded.model_kwargs, **geometry_kwargs(loaded.model)}
    dcfg = resolve_data_config(loaded.model, opts.data_overrides)
    all_paths = list(images)
    train = sample_images(all_paths, opts.num_samples, opts.seed)
    split = split_holdout(all_paths, train, opts.holdout, opts.seed)
    holdout = load_eval_tensor(list(split.paths), dcfg, max_images=opts.holdout)
    check_finite_outputs(loaded.model, holdout[:1], f"{opts.model} ({loaded.weights_source})")
    return Prepared(
        teacher=loaded.model,
        weights_fp=weights_fingerprint(loaded.model),
        model_kwargs=kwargs,
        data_config=dict(dcfg),
        train_paths=train,
        holdout=holdout,
        holdout_fp=tensor_fingerprint(holdout),
        holdout_note=split.note,
        input_fp=data_fp(train),
        images_note=images.note,
        holdout_on_training=set(split.paths) <= set(train),
    )


def identity_of(opts: CompressOptions, prep: Prepared) -> dict[str, Any]:
    """The run's identity: the model and the *content* of its weights (a random-init teacher
    is identified by its seed through the weights it produces)."""
    return {"model": opts.model, "weights": prep.weights_fp, "model_kwargs": opts.model_kwargs}


def torch_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError(
            "--device cuda was asked for but torch sees no CUDA device", "use --device cpu"
        )
    return name


@dataclass
class JobContext:
    """One job over one locked run directory."""

    run: RunDir
    copts: CompressOptions
    dopts: DeployOptions
    profile: TargetProfile | None = None
    progress: ProgressFn = quiet
    notes: list[str] = field(default_factory=list)
    _prep: Prepared | None = None
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The record each unit had before the runner started redoing it (a unit may reuse parts
    of it, e.g. bisect reuses measurements whose basis is unchanged)."""
    executor: LocalExecutor = field(default_factory=LocalExecutor)
    """Where independent work runs (:mod:`.executor`); only this process writes ``run``."""
    elsewhere: tuple[str, ...] = ()
    """Kinds of unit (:class:`~.ids.UnitId`) that ran elsewhere (a target's node, the head):
    their records stand."""

    def prep(self) -> Prepared:
        if self._prep is None:
            self._prep = prepare(self.copts)
        return self._prep

    def note(self, text: str) -> None:
        """Something the user should see (console and SUMMARY.md), e.g. a unit redone."""
        if text not in self.notes:
            self.notes.append(text)
            self.progress(ProgressEvent(stage="note", message=text))

    def with_profile(self, profile: TargetProfile) -> JobContext:
        return dataclasses.replace(self, profile=profile)
