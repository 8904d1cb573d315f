"""Every check that needs the file system, the model or a backend, run before any expensive work.

The option records check their own values on construction (:mod:`.options`); what is left is
checked here, cheapest first, each problem one :class:`~dcvit_deploy.errors.UserInputError`
naming the value and the fix: output folders writable, images present, checkpoint readable and
finite, the model's structure on the ``meta`` device (:func:`check_model`), the plan of every
target (:func:`plan_targets`) and the target profile, budget and backend (:func:`check_profile`).
:func:`validate_run` runs them for a ``compress``/``family`` run and returns what it established
(:class:`Validated`), which the job uses instead of recomputing; :func:`validate_stage` does the
same for a command over an existing run directory.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.config.options import targets_from_text  # noqa: F401  (the CLI imports it here)
from dcvit_deploy.config.profiles import Target, targets_of
from dcvit_deploy.errors import DataError, OptionError, PathNotWritable, UserInputError

if TYPE_CHECKING:
    import torch

    from dcvit_deploy.compress.macs import Geometry
    from dcvit_deploy.config.options import CompressOptions, DeployOptions
    from dcvit_deploy.model.images import ImageList
    from dcvit_deploy.store.records import LatencyBudget, TargetProfile

MAX_BLOCK_INDEX = 4096
"""Block lists name at most this index (no timm ViT is deeper); guards ``--blocks 0-10**12``."""
MIN_FREE_BYTES = 64 * 1024 * 1024
"""An output location with less free space than this is refused as full."""
STAGES = ("compress", "deploy")


@dataclass(frozen=True)
class ModelFacts:
    """What :func:`check_model` learnt without allocating weights: the construction kwargs
    (with what the checkpoint determines), the (C, H, W) the data pipeline feeds, the blocks
    compression may touch and the ``feasible`` (min, max) DC-ViT MAC reduction with them."""

    name: str
    model_kwargs: dict[str, Any]
    depth: int
    geometry: Geometry
    input_size: tuple[int, int, int]
    patch_size: tuple[int, int]
    candidate_blocks: tuple[int, ...]
    feasible: tuple[float, float]


@dataclass(frozen=True)
class PlannedTarget:
    """The structure one target gets: ``n_blocks`` compressed blocks; for DC-ViT each keeps an
    MLP of ``hidden`` units (``None`` for PRACTISE, which drops whole blocks). ``same_as`` names
    an earlier target of the same method that plans to the same structure (it is built once)."""

    method: str
    target: float
    n_blocks: int
    hidden: int | None
    achieved: float
    same_as: float | None = None

    def describe(self) -> str:
        what = (
            f"{self.n_blocks} block(s) -> MLP-only, hidden {self.hidden}"
            if self.hidden is not None
            else f"drop {self.n_blocks} whole block(s)"
        )
        dup = f" (same structure as {self.same_as:.2%})" if self.same_as is not None else ""
        return f"{self.method} {self.target:.2%}: {what}, achieved {self.achieved:.2%} MACs{dup}"


@dataclass(frozen=True)
class Validated:
    """What :func:`validate_run` / :func:`validate_stage` checked and loaded. ``notes`` are
    warnings that do not stop a run (callers print them and record them in the summary)."""

    profile: TargetProfile | None = None
    budget: LatencyBudget | None = None
    images: ImageList | None = None
    image_count: int = 0
    model: ModelFacts | None = None
    plan: tuple[PlannedTarget, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    targets: tuple[Target, ...] = ()
    """Each target of ``--profile a,b``: its profile and the options naming it alone."""
    state_dict: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    """The checkpoint as read once here; the job loads the model from it."""


def check_deploy_options(opts: DeployOptions, *, need_budget: bool = False) -> None:
    """What :class:`DeployOptions` cannot check on itself: ``--eval-data`` holds labelled
    images, ``--opset`` is one torch, onnx and ONNX Runtime here support; ``need_budget``: the
    command selects (``select``, ``triton``), so a budget is required."""
    if need_budget and not opts.has_budget:
        raise OptionError("this command selects a candidate and needs a budget",
                          "pass --latency-ms MS or --speedup X")  # fmt: skip
    if opts.eval_data:
        from dcvit_deploy.model.images import list_images
        from dcvit_deploy.selection.fidelity import eval_folders

        for folder in eval_folders(opts.eval_data):
            list_images(folder)
    from dcvit_deploy.export.onnx import DEFAULT_OPSET, supported_opsets

    if opts.opset != DEFAULT_OPSET:  # every torch and ONNX Runtime this project allows write 17
        lo, hi = supported_opsets()
        if not isinstance(opts.opset, int) or not lo <= opts.opset <= hi:
            raise OptionError(
                f"--opset {opts.opset!r} cannot be exported and run here (torch, onnx and "
                f"ONNX Runtime support opsets {lo}..{hi})",
                f"pass an opset in {lo}..{hi}, e.g. --opset {DEFAULT_OPSET}",
            )


# =========================================================================== file system


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable_dir(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` is, or can be created as, a writable directory on a file system with space.

    Creates nothing that stays: the nearest existing ancestor is probed with a temporary file
    (which catches read-only mounts, ``/proc`` and permission problems that ``os.access`` misses
    when running as root). Returns the absolute path.
    """
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise PathNotWritable(
            f"{flag} {target} exists and is not a directory", f"pass a directory path to {flag}"
        )
    base = _nearest_existing(target)
    if not base.is_dir():
        raise PathNotWritable(
            f"{flag} {target} cannot be created: {base} is a file",
            f"pass a path whose parent folders are directories to {flag}",
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".dcvit-write-check-", dir=base)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        hint = {
            errno.EROFS: "the file system is read-only",
            errno.ENOSPC: "the file system is full",
            errno.EDQUOT: "the disk quota is exhausted",
            errno.ENOENT: "no files can be created there",
        }.get(exc.errno or 0, "")
        raise PathNotWritable(
            f"{flag} {target} is not writable ({base}: {hint or reason})",
            f"pass a writable location to {flag}",
        ) from exc
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        free = None
    if free is not None and free < MIN_FREE_BYTES:
        raise PathNotWritable(
            f"{flag} {target} is on a full file system ({free // (1024 * 1024)} MiB free, "
            f"at least {MIN_FREE_BYTES // (1024 * 1024)} MiB needed)",
            f"free some space or pass another location to {flag}",
        )
    return target


def check_images(data: str | os.PathLike[str]) -> ImageList:
    """The image folder exists and holds images (listed by suffix, not decoded)."""
    from dcvit_deploy.model.images import list_images

    try:
        return list_images(data)
    except PermissionError as exc:
        raise DataError(
            f"image folder {data} cannot be read ({exc.strerror})",
            "check the folder's permissions",
        ) from exc


def data_notes(images: ImageList, num_samples: int | None, holdout: int) -> list[str]:
    """What to know about the images: run directories left out, few-shot and held-out split."""
    from dcvit_deploy.model.images import holdout_note, sampling_note

    n = len(images)
    notes = (images.note, sampling_note(n, num_samples), holdout_note(n, num_samples, holdout))
    return [x for x in notes if x]


def check_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict (the model check infers geometry from it): the file exists,
    is readable, holds a state dict and every tensor is finite."""
    from dcvit_deploy.model.loading import check_finite, read_state_dict

    p = Path(path).expanduser()
    if p.is_dir():
        raise UserInputError(
            f"--checkpoint {p} is a directory", "pass the .safetensors or .pth file inside it"
        )
    if p.is_file() and not os.access(p, os.R_OK):
        raise UserInputError(f"--checkpoint {p} is not readable", "check the file's permissions")
    sd = read_state_dict(p)
    check_finite(sd, p.name)
    return sd


def check_pretrained_cache(name: str) -> None:
    """``--pretrained-cache``: the model's Hugging Face weights are in the local hub cache.

    Checked without network and without reading the weights (the loader checks them). Models
    whose weights timm fetches from a plain URL, and timm versions whose config cannot be read,
    are left to the loader.
    """
    try:
        import huggingface_hub
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    except Exception:  # no hub client, or another timm layout: the loader decides
        return
    if not repo:
        return
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        try:
            found = huggingface_hub.try_to_load_from_cache(repo, filename)
        except Exception:  # malformed repo id or cache: the loader decides
            return
        if isinstance(found, str):
            return
    raise UserInputError(
        f"--pretrained-cache: the weights of {name} ({repo}) are not in the local Hugging "
        "Face hub cache, and nothing is downloaded",
        "pass --checkpoint FILE with local weights, or fill the cache on a machine with network",
    )


def check_manifest(out: str | os.PathLike[str]) -> None:
    """An existing run's ``manifest.json`` has the layout of a manifest (a run directory that a
    crash, a full disk or a hand edit left corrupt is named, with the fix)."""
    from dcvit_deploy.store.rundir import MANIFEST, read_manifest

    if (Path(out) / MANIFEST).is_file():
        read_manifest(Path(out) / MANIFEST)


# =========================================================================== model geometry


def check_model(
    opts: CompressOptions, state_dict: Mapping[str, torch.Tensor] | None = None
) -> ModelFacts:
    """Build the model's structure on the ``meta`` device and check it against the options.

    Refuses: kwargs timm rejects (named), layouts DC-ViT surgery cannot handle, a checkpoint
    whose keys/shapes do not match, an input size the patch embedding cannot take, mean/std of
    the wrong length, candidate blocks that do not exist, ``--round-to`` wider than the MLP.
    """

    import torch

    from dcvit_deploy.compress.macs import geometry_of
    from dcvit_deploy.compress.plan import feasible_range
    from dcvit_deploy.compress.recoverability import default_candidate_blocks
    from dcvit_deploy.model.images import resolve_data_config
    from dcvit_deploy.model.loading import (
        check_supported,
        checkpoint_kwargs,
        create_structure,
        matching_state_dict,
    )

    kwargs = dict(opts.model_kwargs)
    if state_dict is not None:
        kwargs, _ = checkpoint_kwargs(state_dict, kwargs)
    model = create_structure(opts.model, kwargs)
    check_supported(model, opts.model)
    if state_dict is not None:
        matching_state_dict(model, state_dict, opts.checkpoint or "checkpoint")
    vit: Any = model
    pe = vit.patch_embed
    patch = tuple(int(v) for v in pe.patch_size)
    patch_size = (patch[0], patch[-1])
    dcfg = resolve_data_config(model, opts.data_overrides)
    channels, height, width = (int(v) for v in dcfg["input_size"])
    in_chans = int(pe.proj.in_channels)
    if channels != in_chans:
        raise OptionError(
            f"the input has {channels} channels but {opts.model} takes {in_chans}",
            "drop the input-size override, or build the model with "
            f"--model-kwargs in_chans={channels}",
        )
    fixed = tuple(int(v) for v in pe.img_size) if getattr(pe, "strict_img_size", False) else None
    if fixed is not None and (height, width) != fixed:
        raise OptionError(
            f"--img-size {height} does not fit {opts.model}, whose patch embedding is fixed to "
            f"{fixed[0]}x{fixed[1]} pixels",
            f"drop --img-size, or build the model at that size with --model-kwargs "
            f"img_size={height} (a checkpoint's position embedding is resampled)",
        )
    nearest = max(1, height // patch_size[0]) * patch_size[0]
    if (
        fixed is None
        and not getattr(pe, "dynamic_img_pad", False)
        and (height % patch_size[0] or width % patch_size[1])
    ):
        raise OptionError(
            f"--img-size {height}x{width} is not a multiple of the patch size "
            f"{patch_size[0]}x{patch_size[1]}",
            f"pass a multiple of {patch_size[0]}, e.g. --img-size {nearest}",
        )
    try:  # kwargs that build but cannot run at this input size (a patch larger than the image)
        with torch.no_grad():
            model(torch.empty(1, channels, height, width, device="meta"))
    except Exception as exc:
        shown = " ".join(f"{k}={v!r}" for k, v in opts.model_kwargs.items()) or "(none)"
        raise UserInputError(
            f"{opts.model} with --model-kwargs {shown} cannot run on a {channels}x{height}x{width}"
            f" input: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
            "fix those --model-kwargs (e.g. patch_size at most img_size) or the input size",
        ) from exc
    depth = len(vit.blocks)
    geom = geometry_of(model)
    blocks = tuple(opts.candidate_blocks or default_candidate_blocks(depth))
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise OptionError(
            f"--blocks names blocks {bad[:5]} that {opts.model} does not have "
            f"(depth {depth}: blocks 0..{depth - 1})",
            f"choose blocks in 0..{depth - 1}, e.g. --blocks 1-{max(1, depth - 2)}",
        )
    if opts.round_to > geom.base_mlp_hidden:
        raise OptionError(
            f"--round-to {opts.round_to} is wider than the model's MLP ({geom.base_mlp_hidden} "
            "hidden units)",
            f"pass a divisor-friendly multiple below {geom.base_mlp_hidden}, e.g. --round-to 8",
        )
    feasible = feasible_range(geom, depth, len(blocks), max(1, opts.round_to))
    return ModelFacts(
        name=opts.model,
        model_kwargs=kwargs,
        depth=depth,
        geometry=geom,
        input_size=(channels, height, width),
        patch_size=patch_size,
        candidate_blocks=blocks,
        feasible=feasible,
    )


def check_first_forward(
    opts: CompressOptions,
    facts: ModelFacts,
    state_dict: Mapping[str, torch.Tensor],
    images: ImageList,
) -> None:
    """One real forward on one image with the checkpoint's weights (assigned to the ``meta``
    structure, not copied): finite weights can still overflow to NaN."""
    from dcvit_deploy.model.images import load_eval_tensor, resolve_data_config
    from dcvit_deploy.model.loading import (
        check_finite_outputs,
        create_structure,
        matching_state_dict,
    )

    path = str(opts.checkpoint)
    model = create_structure(opts.model, facts.model_kwargs)
    model.load_state_dict(matching_state_dict(model, state_dict, path), strict=True, assign=True)
    dcfg = resolve_data_config(model, opts.data_overrides)
    image = load_eval_tensor(images.paths, dcfg, max_images=1)
    check_finite_outputs(model, image, f"checkpoint {Path(path).name}")


def plan_targets(opts: CompressOptions, facts: ModelFacts) -> tuple[PlannedTarget, ...]:
    """The structure each target gets, per method; refuses targets DC-ViT cannot reach with
    the candidate blocks (naming the feasible range and the fix)."""
    from dcvit_deploy.compress.plan import plan_structure
    from dcvit_deploy.compress.practise import blocks_for_target
    from dcvit_deploy.store.records import BlockSpec

    geom, depth = facts.geometry, facts.depth
    lo, hi = facts.feasible
    out: list[PlannedTarget] = []
    for method in opts.methods:
        seen: dict[tuple[int, int | None], float] = {}
        for t in sorted(opts.targets):
            if method == "dcvit":
                if not lo - 1e-9 <= t <= hi + 1e-9:
                    more = "" if opts.candidate_blocks is None else ", or allow more --blocks"
                    raise OptionError(
                        f"target {t:.2%} is outside the feasible range {lo:.2%}..{hi:.2%} "
                        f"of DC-ViT on {opts.model} with {len(facts.candidate_blocks)} "
                        "candidate blocks",
                        f"choose targets between {lo:.2%} and {hi:.2%}{more}",
                    )
                p = plan_structure(
                    geom, depth, t, max_blocks=len(facts.candidate_blocks), round_to=opts.round_to
                )
                n, hidden, achieved = p.n_blocks, p.hidden, p.achieved
            else:
                base = BlockSpec(kind="attn_mlp", mlp_hidden=geom.base_mlp_hidden)
                frac = geom.block_macs(base)[0] / geom.count([base] * depth).linear_norm
                n = blocks_for_target(t, frac, len(facts.candidate_blocks))
                hidden, achieved = None, n * frac
            out.append(PlannedTarget(method, t, n, hidden, achieved, seen.get((n, hidden))))
            seen.setdefault((n, hidden), t)
    same = [p for p in out if p.same_as is not None and p.method == "dcvit"]
    if same:
        shown = ", ".join(f"{p.target:.4%} -> as {p.same_as:.4%}" for p in same[:3])
        raise OptionError(
            f"{len(same)} DC-ViT target(s) plan to the same structure as a smaller target "
            f"({shown}{' ...' if len(same) > 3 else ''})",
            "drop those targets or use a coarser --targets step",
        )
    return tuple(out)


# =========================================================================== target profile


def check_profile(
    opts: DeployOptions, *, need_backend: bool = True, profile: TargetProfile | None = None
) -> tuple[TargetProfile, LatencyBudget | None]:
    """The profile (loaded and checked by its backend unless given), the budget batch size and
    precisions against it and (``need_backend``) that its backend can run here. Returns the
    profile and the absolute budget (``None`` without ``--latency-ms``)."""
    from dcvit_deploy.config.profiles import load_profile
    from dcvit_deploy.export.quantize import check_precisions
    from dcvit_deploy.pipeline.units.selecting import budget_batch
    from dcvit_deploy.store.records import LatencyBudget

    profile = profile or load_profile(opts.profile)
    batch = budget_batch(profile, opts)
    statistic = opts.statistic or profile.statistic
    ms = opts.latency_ms
    budget = None if ms is None else LatencyBudget(ms, statistic, batch, opts.margin)
    check_precisions(profile, opts, probe=need_backend)
    if need_backend:
        from dcvit_deploy.backends import get_backend

        get_backend(profile.backend).availability(profile).require(profile.backend)
    return profile, budget


# =========================================================================== entry points


def validate_run(
    copts: CompressOptions,
    dopts: DeployOptions | None,
    out: str | os.PathLike[str],
    *,
    stages: Collection[str] = STAGES,
    executor: str = "local",
) -> Validated:
    """Everything a ``compress`` run (``stages`` = both) or a ``family`` run (``("compress",)``)
    can check before it opens the run directory: options, run and Triton directories writable,
    images present, checkpoint readable and finite, model structure, targets and blocks,
    profile, budget and backend (each target of ``--profile a,b``; with ``executor="ray"`` a
    target's backend is checked on its node instead). Call it first; it raises the first
    problem found.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; use {STAGES}")
    dep = dopts if "deploy" in stages else None
    if dep is not None:
        check_deploy_options(dep)
        if dep.speedup is not None and not copts.include_original:
            raise OptionError(
                "--speedup is relative to the original model, but --no-original leaves it out",
                "drop --no-original or give an absolute --latency-ms",
            )
        if dep.triton_pareto and not copts.trains_all:
            raise OptionError(
                "--triton-pareto publishes every Pareto-optimal candidate, and --train pick "
                "finetunes only the chosen one",
                "add --train all",
            )
    # A corrupt manifest in ``out`` is not refused here: ``--overwrite`` moves such a run aside
    # (RunDir.open refuses it, with that fix, before any work otherwise).
    check_writable_dir(out, "--out")
    if dep is not None and dep.triton_repo:
        check_writable_dir(dep.triton_repo, "--triton-repo")
    images = check_images(copts.data)
    notes = data_notes(images, copts.num_samples, copts.holdout)
    sd = check_checkpoint(copts.checkpoint) if copts.checkpoint is not None else None
    if copts.pretrained_cache:
        check_pretrained_cache(copts.model)
    facts = check_model(copts, sd)
    if sd is not None:
        check_first_forward(copts, facts, sd, images)
    plan = plan_targets(copts, facts)
    notes += [f"block dropping: target {p.target:.4%} gives the same model as a smaller target"
              for p in plan if p.same_as is not None]  # fmt: skip
    from dcvit_deploy.pipeline.context import torch_device

    torch_device(copts.device)  # --device cuda needs a CUDA device torch can see
    profile = budget = None
    if executor == "ray":
        from dcvit_deploy.pipeline.executor import require_ray

        require_ray()
    targets = targets_of(dep) if dep is not None else []
    for p, one in reversed(targets):  # each profile loaded once, here
        profile, budget = check_profile(one, need_backend=executor == "local", profile=p)
    classes, folders = facts.model_kwargs.get("num_classes"), dep and dep.eval_data
    if classes and folders and len([p for p in Path(folders).iterdir() if p.is_dir()]) > classes:
        fix = "give one sub-folder per class of the model"
        raise OptionError(f"--eval-data {folders} has more class sub-folders than the model's "
                          f"{classes} outputs", fix)  # fmt: skip
    return Validated(profile, budget, images, len(images), facts, plan, tuple(notes),
                     tuple(targets), sd)  # fmt: skip


def validate_stage(
    out: str | os.PathLike[str],
    dopts: DeployOptions,
    *,
    need_budget: bool = False,
    need_backend: bool = True,
) -> Validated:
    """Checks for a command over an existing run (``export``, ``build``, ``profile``,
    ``select``, ``triton``, ``report``): options, a readable manifest, writable run and Triton
    directories, profile, budget and (``need_backend``) the backend."""
    check_deploy_options(dopts, need_budget=need_budget)
    if "," in dopts.profile:
        raise OptionError(f"this command works on one target, not --profile {dopts.profile}",
                          "run it once per target, e.g. --profile cpu-ort")  # fmt: skip
    check_manifest(out)
    if (Path(out) / "manifest.json").is_file():
        check_writable_dir(out, "--out")
    if dopts.triton_repo:
        check_writable_dir(dopts.triton_repo, "--triton-repo")
    profile, budget = check_profile(dopts, need_backend=need_backend)
    return Validated(profile=profile, budget=budget)
