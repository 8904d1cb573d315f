"""Every check that can run before any expensive work, in one place.

A run that fails should fail in the first seconds, not after minutes of metric-set synthesis or
hours of finetuning. Each check raises a :class:`~dcvit_deploy.errors.UserInputError` subclass
whose ``one_line()`` names the value and the fix; the CLI prints it and exits 1.

The checks are grouped by what they need:

* **options only** (pure, instant): :func:`check_compress_options`,
  :func:`check_deploy_options`, :func:`targets_from_text`;
* **the file system**: :func:`check_images` (count images without decoding them),
  :func:`check_writable_dir` (``--out``, ``--triton-repo``: creatable, writable, not full),
  :func:`check_checkpoint` (exists, readable, every tensor finite),
  :func:`check_pretrained_cache`, :func:`check_manifest`;
* **the model's geometry** (cheap: the structure is built on the ``meta`` device, no weights
  are allocated): :func:`check_model` (kwargs timm accepts, supported layout, checkpoint shapes,
  input size vs patch size, candidate blocks) and :func:`plan_targets` (targets within the
  feasible range, the structure each target gets);
* **the target**: :func:`check_profile` (profile, budget, backend available here).

:func:`validate_run` runs all that apply to a ``compress``/``family`` run and returns what it
loaded (:class:`Validated`); :func:`validate_stage` does the same for a command over an existing
run directory (``export``, ``build``, ``profile``, ``select``, ``triton``, ``report``).
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.config.options import METHODS, METRIC_SOURCES, PREFERENCES, SCHEDULES, TRAIN
from dcvit_deploy.config.profiles import Target, targets_of
from dcvit_deploy.errors import (
    OptionError,
    PathNotWritable,
    UserInputError,
)
from dcvit_deploy.store.records import safe_name

if TYPE_CHECKING:
    import torch

    from dcvit_deploy.compress.macs import Geometry
    from dcvit_deploy.config.options import CompressOptions, DeployOptions
    from dcvit_deploy.model.images import ImageList
    from dcvit_deploy.store.records import LatencyBudget, TargetProfile

MAX_TARGETS = 200
"""More targets than this are refused: each is a finetuned candidate, exported, built and
measured (a typo such as ``--targets 1%:99%:0.0025%`` asks for 39,201 of them)."""

MAX_BLOCK_INDEX = 4096
"""Block lists name at most this index (no timm ViT is deeper); guards ``--blocks 0-10**12``."""

MIN_FREE_BYTES = 64 * 1024 * 1024
"""An output location with less free space than this is refused as full."""

MAX_SEED = 2**32 - 1
"""Seeds must fit every RNG the run seeds (NumPy's legacy seeding takes 32-bit values)."""

DEVICES = ("auto", "cpu", "cuda")
INVERSIONS = ("paper", "fast")
NEURON_CHOICES = ("random", "activation", "weight")
SEARCHES = ("all", "bisect")
STAGES = ("compress", "deploy")


# =========================================================================== records


@dataclass(frozen=True)
class ModelFacts:
    """What the up-front model check learnt, without allocating weights.

    ``model_kwargs`` are the construction kwargs including what the checkpoint determines;
    ``input_size`` is the (C, H, W) the data pipeline will feed (after ``--img-size`` etc.);
    ``candidate_blocks`` the blocks compression may touch; ``feasible`` the (min, max) MAC
    reduction DC-ViT can reach with them at this ``round_to``.
    """

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
    """What :func:`validate_run` / :func:`validate_stage` checked and loaded.

    ``notes`` are warnings that do not stop a run (e.g. fewer held-out images than asked for);
    callers print them and record them in the run's summary.
    """

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


# =========================================================================== pure option checks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any, flag: str, example: str, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or value < 1:
        raise OptionError(f"{flag} must be a positive integer, got {value!r}", f"pass {example}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(value: Any, flag: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise OptionError(f"unknown {flag} {value!r}", f"use one of {', '.join(allowed)}")


def check_targets(targets: Sequence[float]) -> None:
    """Targets: at least one, at most :data:`MAX_TARGETS`, each a fraction in (0, 1)."""
    if not targets:
        raise OptionError("no compression targets given", "pass e.g. --targets 5%:40%:5%")
    bad = [t for t in targets if not _finite(t) or not 0 < t < 1]
    if bad:
        raise OptionError(
            f"targets must be MAC reductions between 0% and 100%, got {bad[:3]}",
            "pass e.g. --targets 5%:40%:5% or 16.6%,25%",
        )
    if len(targets) > MAX_TARGETS:
        raise OptionError(
            f"{len(targets)} targets asked for; each is a candidate to finetune, export, build "
            f"and measure, and at most {MAX_TARGETS} are accepted",
            "use a coarser step, e.g. --targets 5%:40%:2.5%",
        )


def targets_from_text(text: str) -> tuple[float, ...]:
    """Parse ``--targets`` (see :func:`~dcvit_deploy.compress.plan.parse_targets`), refusing a
    range that expands to more than :data:`MAX_TARGETS` values *before* expanding it."""
    from dcvit_deploy.compress.plan import parse_targets

    if ":" in text:
        parts = text.split(":")
        if len(parts) == 3:
            try:
                values = [float(p.strip().rstrip("%").strip()) for p in parts]
            except ValueError:
                values = []  # parse_targets words the syntax error
            if len(values) == 3:
                start, stop, step = values
                if step > 0 and stop >= start and math.isfinite((stop - start) / step):
                    count = math.floor((stop - start) / step + 1e-9) + 1
                    if count > MAX_TARGETS:
                        raise OptionError(
                            f"--targets {text} expands to {count} targets; each is a candidate "
                            f"to finetune, export, build and measure, and at most "
                            f"{MAX_TARGETS} are accepted",
                            "use a coarser step, e.g. --targets 5%:40%:2.5%",
                        )
    targets = tuple(parse_targets(text))
    check_targets(targets)
    return targets


def check_compress_options(opts: CompressOptions) -> None:
    """Every :class:`CompressOptions` value on its own (no file, no model): ranges, names,
    contradictions. Raises :class:`OptionError` naming the option and the fix."""
    if not isinstance(opts.model, str) or not opts.model.strip():
        raise OptionError("no model name given", "pass --model, e.g. deit_small_patch16_224")
    sources = [opts.checkpoint is not None, bool(opts.pretrained_cache), bool(opts.random_init)]
    if sum(sources) != 1:
        raise OptionError(
            "give exactly one weight source",
            "pass --checkpoint FILE, or --pretrained-cache, or --random-init",
        )
    _positive_int(opts.num_samples, "--num-samples", "e.g. --num-samples 500")
    _positive_int(opts.holdout, "--holdout", "e.g. --holdout 32", optional=False)
    check_targets(opts.targets)
    if not opts.methods:
        raise OptionError("no compression method given", f"pass --method {METHODS[0]}")
    for m in opts.methods:
        _choice(m, "--method", METHODS)
    if len(set(opts.methods)) != len(opts.methods):
        raise OptionError(
            f"--method lists a method twice: {','.join(opts.methods)}",
            "name each method once, e.g. --method dcvit,practise",
        )
    _positive_int(opts.round_to, "--round-to", "e.g. --round-to 8 (1: no rounding)", optional=False)
    _choice(opts.neuron_choice, "--neuron-choice", NEURON_CHOICES)
    if not _finite(opts.warm_fraction) or not 0 < opts.warm_fraction <= 1:
        raise OptionError(
            f"--warm-fraction must be in (0, 1], got {opts.warm_fraction!r}",
            "pass e.g. --warm-fraction 0.5 (1: warm-started targets train as long as the first)",
        )
    _choice(opts.schedule, "--schedule", SCHEDULES)
    _positive_int(opts.iterations, "--iterations", "e.g. --iterations 300, or omit it")
    _positive_int(opts.rank_iterations, "--rank-iterations", "e.g. --rank-iterations 100")
    _positive_int(opts.batch_size, "--train-batch-size", "e.g. --train-batch-size 64, or omit it")
    if opts.lr is not None and (not _finite(opts.lr) or opts.lr <= 0):
        raise OptionError(
            f"--lr must be a finite number > 0, got {opts.lr!r}", "pass e.g. --lr 1e-4, or omit it"
        )
    _choice(opts.metric, "--metric-set", METRIC_SOURCES)
    _choice(opts.inversion, "--inversion", INVERSIONS)
    _positive_int(
        opts.inversion_iterations, "--inversion-iterations", "e.g. --inversion-iterations 200"
    )
    if opts.candidate_blocks is not None:
        if not opts.candidate_blocks:
            raise OptionError("--blocks names no block", "pass e.g. --blocks 1-10 or 2,3,5")
        bad = [b for b in opts.candidate_blocks if not _is_int(b) or b < 0]
        if bad:
            raise OptionError(
                f"--blocks holds invalid block indices {bad[:3]}",
                "use block indices >= 0, e.g. --blocks 1-10",
            )
    if not _is_int(opts.seed) or not 0 <= opts.seed <= MAX_SEED:
        raise OptionError(
            f"--seed must be an integer in 0..{MAX_SEED}, got {opts.seed!r}", "pass e.g. --seed 0"
        )
    _choice(opts.device, "--device", DEVICES)
    _choice(opts.train, "--train", TRAIN)


def check_deploy_options(opts: DeployOptions, *, need_budget: bool = False) -> None:
    """Every :class:`DeployOptions` value on its own: budget, margin, batch size, names.

    ``need_budget``: the command selects (``select``, ``triton``), so a budget is required.
    """
    from dcvit_deploy.store.records import STATISTICS

    if not isinstance(opts.profile, str) or not opts.profile.strip():
        raise OptionError("no target profile given", "pass e.g. --profile cpu-ort")
    if opts.latency_ms is not None and (not _finite(opts.latency_ms) or opts.latency_ms <= 0):
        raise OptionError(
            f"--latency-ms must be a finite number of milliseconds > 0, got {opts.latency_ms!r}",
            "pass e.g. --latency-ms 5",
        )
    if opts.speedup is not None and (not _finite(opts.speedup) or opts.speedup <= 1):
        raise OptionError(
            f"--speedup must be a finite factor > 1 over the original model, got {opts.speedup!r}",
            "pass e.g. --speedup 1.5 (at least 1.5 times faster than the original)",
        )
    if opts.latency_ms is not None and opts.speedup is not None:
        raise OptionError(
            "--latency-ms and --speedup were both given; a budget is absolute or relative",
            "pass only one of them",
        )
    if need_budget and not opts.has_budget:
        raise OptionError("this command selects a candidate and needs a budget",
                          "pass --latency-ms MS or --speedup X")  # fmt: skip
    if opts.statistic is not None:
        _choice(opts.statistic, "--statistic", STATISTICS)
    if not _finite(opts.margin) or not 0 <= opts.margin < 1:
        raise OptionError(
            f"--margin must be a fraction in [0, 1) (0% to 99.9%), got {opts.margin!r}",
            "pass e.g. --margin 5%",
        )
    _positive_int(opts.batch_size, "--batch-size", "one of the profile's batch sizes, or omit it")
    if not _finite(opts.min_fidelity) or not 0 <= opts.min_fidelity <= 1:
        raise OptionError(f"--min-fidelity must be in [0, 1], got {opts.min_fidelity!r}",
                          "pass e.g. --min-fidelity 0.95 (top-1 agreement)")  # fmt: skip
    drop = opts.max_accuracy_drop
    if drop is not None and not (_finite(drop) and drop >= 0 and opts.eval_data):
        raise OptionError(f"--max-accuracy-drop {drop!r} needs labelled --eval-data and a "
                          "number of top-1 points >= 0",
                          "pass e.g. --eval-data val/ --max-accuracy-drop 1")  # fmt: skip
    if opts.eval_data:
        from dcvit_deploy.model.images import list_images
        from dcvit_deploy.selection.fidelity import eval_folders

        for folder in eval_folders(opts.eval_data):
            list_images(folder)
    _choice(opts.search, "--search", SEARCHES)
    _choice(opts.prefer, "--prefer", PREFERENCES)
    from dcvit_deploy.export.onnx import DEFAULT_OPSET, supported_opsets

    if opts.opset != DEFAULT_OPSET:  # every torch and ONNX Runtime this project allows write 17
        lo, hi = supported_opsets()
        if not _is_int(opts.opset) or not lo <= opts.opset <= hi:
            raise OptionError(
                f"--opset {opts.opset!r} cannot be exported and run here (torch, onnx and "
                f"ONNX Runtime support opsets {lo}..{hi})",
                f"pass an opset in {lo}..{hi}, e.g. --opset {DEFAULT_OPSET}",
            )
    if opts.triton_model_name is not None:
        safe_name(opts.triton_model_name, "--triton-model-name", OptionError)


# =========================================================================== file system


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


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
        from dcvit_deploy.errors import DataError

        raise DataError(
            f"image folder {data} cannot be read ({exc.strerror})",
            "check the folder's permissions",
        ) from exc


def data_notes(images: ImageList, num_samples: int | None, holdout: int) -> list[str]:
    """What to know about the images: run directories left out, the few-shot and held-out
    split."""
    from dcvit_deploy.model.images import holdout_note, sampling_note

    n = len(images)
    notes = (images.note, sampling_note(n, num_samples), holdout_note(n, num_samples, holdout))
    return [x for x in notes if x]


def check_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The checkpoint exists, is readable, holds a state dict and every tensor is finite.

    Returns the state dict (the model check infers geometry from it).
    """
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
                key: tuple[int, int | None] = (p.n_blocks, p.hidden)
                planned = PlannedTarget(method, t, p.n_blocks, p.hidden, p.achieved)
            else:
                base = BlockSpec(kind="attn_mlp", mlp_hidden=geom.base_mlp_hidden)
                total = geom.count([base] * depth).linear_norm
                frac = geom.block_macs(base)[0] / total
                k = blocks_for_target(t, frac, len(facts.candidate_blocks))
                key = (k, None)
                planned = PlannedTarget(method, t, k, None, k * frac)
            if key in seen:
                planned = PlannedTarget(
                    planned.method,
                    planned.target,
                    planned.n_blocks,
                    planned.hidden,
                    planned.achieved,
                    same_as=seen[key],
                )
            else:
                seen[key] = t
            out.append(planned)
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
    """Load the profile; check the budget against it and (``need_backend``) that its backend
    can run here. Returns the profile and the absolute budget (``None`` without
    ``--latency-ms``)."""
    from dcvit_deploy.config.profiles import load_profile
    from dcvit_deploy.store.records import LatencyBudget

    profile = profile or load_profile(opts.profile)
    if opts.batch_size is not None and opts.batch_size not in profile.batch_sizes:
        raise OptionError(
            f"--batch-size {opts.batch_size} is not one of the profile's batch sizes "
            f"{list(profile.batch_sizes)}",
            "pick one of them or edit the profile's batch_sizes",
        )
    budget = None
    if opts.latency_ms is not None:
        try:
            budget = LatencyBudget(
                ms=opts.latency_ms,
                statistic=(opts.statistic or profile.statistic),  # type: ignore[arg-type]
                batch_size=opts.batch_size or profile.budget_batch_size,
                margin=opts.margin,
            )
        except ValueError as exc:
            raise OptionError(
                f"invalid latency budget: {exc}", "see --latency-ms, --statistic, --margin"
            ) from exc
    from dcvit_deploy.export.quantize import check_precisions

    check_precisions(profile, opts, probe=need_backend)
    if need_backend:
        from dcvit_deploy.backends import get_backend

        backend = get_backend(profile.backend)
        backend.validate_profile(profile)
        backend.availability(profile).require(profile.backend)
    return profile, budget


def check_train_device(device: str) -> None:
    """``--device cuda`` needs a CUDA device torch can see."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise OptionError(
            "--device cuda was asked for but torch sees no CUDA device",
            "use --device cpu (or auto)",
        )


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
    check_compress_options(copts)
    deploying = "deploy" in stages and dopts is not None
    if deploying:
        assert dopts is not None
        check_deploy_options(dopts)
        if dopts.speedup is not None and not copts.include_original:
            raise OptionError(
                "--speedup is relative to the original model, but --no-original leaves it out",
                "drop --no-original or give an absolute --latency-ms",
            )
        if dopts.triton_pareto and not copts.trains_all:
            raise OptionError(
                "--triton-pareto publishes every Pareto-optimal candidate, and --train pick "
                "finetunes only the chosen one",
                "add --train all",
            )
    # A corrupt manifest in ``out`` is not refused here: ``--overwrite`` moves such a run aside
    # (RunDir.open refuses it, with that fix, before any work otherwise).
    check_writable_dir(out, "--out")
    if deploying and dopts is not None and dopts.triton_repo:
        check_writable_dir(dopts.triton_repo, "--triton-repo")
    images = check_images(copts.data)
    notes = data_notes(images, copts.num_samples, copts.holdout)
    sd = check_checkpoint(copts.checkpoint) if copts.checkpoint is not None else None
    if copts.pretrained_cache:
        check_pretrained_cache(copts.model)
    facts = check_model(copts, sd)
    if sd is not None:
        check_first_forward(copts, facts, sd, images)
    plan = plan_targets(copts, facts)
    notes += [
        f"block dropping: target {p.target:.4%} gives the same model as a smaller target"
        for p in plan
        if p.same_as is not None
    ]
    check_train_device(copts.device)
    profile = budget = None
    if executor == "ray":
        from dcvit_deploy.pipeline.executor import require_ray

        require_ray()
    targets = targets_of(dopts) if deploying and dopts is not None else []
    for p, one in reversed(targets):  # each profile loaded once, here
        profile, budget = check_profile(one, need_backend=executor == "local", profile=p)
    classes, folders = facts.model_kwargs.get("num_classes"), targets and dopts and dopts.eval_data
    if classes and folders and len([p for p in Path(folders).iterdir() if p.is_dir()]) > classes:
        fix = "give one sub-folder per class of the model"
        raise OptionError(f"--eval-data {folders} has more class sub-folders than the model's "
                          f"{classes} outputs", fix)  # fmt: skip
    return Validated(
        profile=profile,
        budget=budget,
        images=images,
        image_count=len(images),
        model=facts,
        plan=plan,
        notes=tuple(notes),
        state_dict=sd,
        targets=tuple(targets),
    )


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
