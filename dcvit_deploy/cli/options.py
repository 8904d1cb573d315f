"""Every option of every command, declared once, and their conversion into the option records
of :mod:`dcvit_deploy.config.options` (:func:`compress_options`, :func:`deploy_options`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from click import option

from dcvit_deploy.config.options import (
    METHODS,
    METRIC_SOURCES,
    PREFERENCES,
    SCHEDULES,
    TRAIN,
    CompressOptions,
    DeployOptions,
)
from dcvit_deploy.errors import OptionError

F = TypeVar("F", bound=Callable[..., Any])


def stack(*opts: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator applying ``opts`` in order (as if stacked in that order)."""

    def deco(f: F) -> F:
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def flag(name: str, help: str) -> Callable[[F], F]:
    return option(name, is_flag=True, help=help)


def choice(name: str, values: Sequence[str], help: str | None = None, **kw: Any) -> Callable:
    """An option taking one of ``values``; default the first (``default=`` overrides)."""
    kw.setdefault("default", values[0])
    return option(name, type=click.Choice(values), help=help, **kw)


# fmt: off
MODEL = stack(
    option("--model", required=True, help="timm model name, e.g. deit_small_patch16_224."),
    option("--checkpoint", type=click.Path(dir_okay=False),
           help="Local .safetensors/.pth weights."),
    option("--model-kwargs", multiple=True,
           help="timm constructor kwargs, e.g. 'num_classes=10 img_size=32'."),
    flag("--pretrained-cache", "Use timm weights from the local hub cache (offline)."),
    flag("--random-init", "No weights: random init (smoke tests, latency studies)."),
)
DATA = stack(
    option("--data", required=True, type=click.Path(),
           help="Folder of images (recursive; labels unused)."),
    option("--num-samples", default=500, help="Few-shot images sampled (seeded)."),
    option("--holdout", default=32, help="Held-out images for verification and fidelity."),
    option("--img-size", type=int, help="Override the model's input size."),
    option("--mean", help="Override normalisation mean, e.g. 0.5,0.5,0.5."),
    option("--std", help="Override normalisation std."),
    option("--interpolation", help="Override resize interpolation (bilinear, bicubic, ...)."),
    option("--crop-pct", type=float, help="Override the eval centre-crop fraction."),
)
COMPRESS = stack(
    option("--targets", default="5%:40%:5%",
           help="MAC reductions: '16.6%,25%' or a range 'start:stop:step'."),
    option("--method", default="dcvit",
           help="Compression method(s), comma-separated: dcvit, practise, or dcvit,practise."),
    option("--round-to", default=1, help="Round MLP widths to a multiple (e.g. 8, 64)."),
    choice("--neuron-choice", ["random", "activation", "weight"]),
    option("--reuse/--no-reuse", default=None, show_default=False,
           help="Warm-start each target from its finetuned neighbour (default: the --schedule "
           "preset's procedure decides)."),
    option("--warm-fraction", default=0.5, help="Finetune length of warm-started targets."),
    choice("--schedule", SCHEDULES),
    option("--iterations", type=int, help="Finetune steps per stage (overrides the schedule)."),
    option("--rank-iterations", type=int,
           help="Finetune steps per ranked block (default: same as --iterations)."),
    option("--train-batch-size", type=int, help="Finetune batch size (default 64)."),
    option("--lr", type=float, help="Finetune learning rate (overrides the schedule)."),
    choice("--metric-set", METRIC_SOURCES,
           "Score blocks on model-inverted images or on held-out real images."),
    choice("--inversion", ["paper", "fast"], default="fast"),
    option("--inversion-iterations", type=int,
           help="Model-inversion steps (overrides the preset)."),
    option("--blocks",
           help="Candidate blocks, e.g. '1-10' or '2,3,5' (default: all but first and last)."),
    flag("--no-original", "Leave the uncompressed model out of the family."),
    option("--seed", default=0),
    choice("--train", TRAIN, "Finetune only what can be chosen (every structure is measured "
           "first), or every candidate first (the paper schedule always does)."),
    choice("--device", ["auto", "cpu", "cuda"], "Where to finetune."),
)
BUDGET = stack(
    option("--profile", help="Target profile name or .toml path (default: cpu-ort; select and "
           "report: the profile the run was last measured with)."),
    option("--latency-ms", type=float, help="Latency budget in milliseconds."),
    option("--speedup", type=float, help="Relative budget: at least X times faster than the "
           "original (e.g. 1.5); instead of --latency-ms."),
    choice("--prefer", PREFERENCES,
           "Among candidates that fit: the densest, or the most faithful to the original."),
    choice("--statistic", ["mean", "p50", "p90", "p95", "p99"],
           "Budget statistic (default: the profile's).", default=None),
    option("--margin", default="0%", help="Guard band: statistic x (1+margin) <= budget."),
    option("--batch-size", type=int,
           help="Batch size the budget applies to (default: the profile's)."),
    choice("--search", ["all", "bisect"],
           "Measure every candidate, or O(log N) of them by bisection."),
    flag("--no-confirm",
         "Do not re-measure the chosen candidate in a fresh process before deploying it."),
    flag("--allow-other-device",
         "Measure even when this machine's device differs from the profile's."),
    option("--precisions", help="Precisions to try, comma-separated (default: each profile's "
           "list)."),
    option("--min-fidelity", type=float, help="Floor on top-1 agreement with the original, 0-1 "
           "(default 0 = none: 32 held-out images cannot resolve one)."),
    option("--eval-data", type=click.Path(), help="Labelled images (a sub-folder per class, "
           "sorted = class index): fidelity and top-1 per artifact are measured on them."),
    option("--max-accuracy-drop", type=float, help="Floor: top-1 points an artifact may lose "
           "against the original (needs --eval-data)."),
)
DEPLOY = stack(
    option("--triton-repo", type=click.Path(file_okay=False),
           help="Triton model repository (default: RUN/triton)."),
    option("--triton-model-name",
           help="Model name in the Triton repository (default: derived from --model)."),
    flag("--triton-replace", "Publish over a Triton model that serves another run's version "
         "(this pick is then served), or whose platform, I/O or max batch size differ (its "
         "versions are retired)."),
    flag("--triton-pareto", "Also write every Pareto-optimal candidate to the repository."),
    option("--opset", default=17),
    flag("--no-simplify", "Skip ONNX graph simplification."),
)
EXECUTOR = stack(
    choice("--executor", ["local", "ray"],
           "Run independent work here, or as Ray tasks (finetunes; each target on its node)."),
    option("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else local)."),
    option("--task-cpus", type=click.IntRange(min=1), help="CPUs (torch threads) per finetune "
           "task (default: local all, ray 1); the same value gives the same family on either "
           "executor."),
)
DRY_RUN = flag("--dry-run",
               "Run every check and print the plan (targets -> structures); do no work.")
OUT = option("--out", default="runs/latest", type=click.Path(file_okay=False),
             help="Run directory.")
JSON = option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
RUN = stack(
    OUT,
    flag("--resume", "Require an existing run in --out and continue it."),
    flag("--overwrite", "Move another run found in --out aside and start anew."),
    option("--json", "as_json", is_flag=True,
           help="Print a JSON result on stdout; no progress display."),
)
# fmt: on
STAGE = stack(OUT, BUDGET, DEPLOY, JSON)
"""The options of a command over an existing run (``export`` ... ``triton``)."""


# =========================================================================== option -> record


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    try:
        return None if text is None else tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise OptionError(
            f"--{name} {text!r} is not a comma-separated list of numbers",
            f"write e.g. --{name} 0.5,0.5,0.5",
        ) from exc


def _blocks(text: str | None) -> tuple[int, ...] | None:
    """``--blocks 1-10`` / ``2,3,5`` / ``1-3,7``; ``None`` when not given (the default set)."""
    from dcvit_deploy.config.validate import MAX_BLOCK_INDEX

    if text is None:
        return None
    out: set[int] = set()
    example = "write e.g. --blocks 1-10 or --blocks 2,3,5"
    for part in text.split(","):
        try:
            lo, hi = (int(v) for v in part.split("-")) if "-" in part else (int(part),) * 2
        except ValueError as exc:
            raise OptionError(f"--blocks {text!r} is not a block list", example) from exc
        if lo > hi:
            raise OptionError(f"--blocks range {part.strip()!r} is empty", example)
        if hi > MAX_BLOCK_INDEX:
            raise OptionError(
                f"--blocks {text!r} names block {hi}; no ViT has that many blocks",
                "use the model's block indices (0 = first block)",
            )
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(","))
    for m in names:
        if m not in METHODS:
            raise OptionError(
                f"unknown --method {m!r}",
                f"use {', '.join(METHODS)}, or both comma-separated (dcvit,practise)",
            )
    return names


def _margin(text: str) -> float:
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError as exc:
        raise OptionError(
            f"--margin {text!r} is not a number", "write e.g. --margin 5% or --margin 0.05"
        ) from exc
    return value / 100 if value >= 1 and not t.endswith("%") else value


SAME_COMPRESS = ("model", "checkpoint", "pretrained_cache", "random_init", "num_samples", "holdout",
                 "round_to", "neuron_choice", "reuse", "warm_fraction", "schedule", "iterations",
                 "rank_iterations", "lr", "inversion", "inversion_iterations", "seed", "device",
                 "train")  # fmt: skip
SAME_DEPLOY = ("profile", "latency_ms", "speedup", "statistic", "batch_size", "search", "prefer",
               "allow_other_device", "triton_model_name", "triton_replace", "triton_pareto",
               "opset", "min_fidelity", "max_accuracy_drop")  # fmt: skip
"""The options named like their record field (the others are converted below)."""


def _given(kw: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The options named like their record field that were given (else: the record's default)."""
    return {k: kw[k] for k in names if kw.get(k) is not None}


def compress_options(kw: dict[str, Any]) -> CompressOptions:
    """The :class:`~dcvit_deploy.config.options.CompressOptions` of a command's parsed options."""
    from dcvit_deploy.config.validate import targets_from_text
    from dcvit_deploy.model.images import DataOverrides
    from dcvit_deploy.model.loading import parse_model_kwargs

    overrides = None
    if any(kw.get(k) is not None for k in ("img_size", "mean", "std", "interpolation", "crop_pct")):
        overrides = DataOverrides(
            img_size=kw.get("img_size"),
            mean=_floats(kw.get("mean"), "mean"),
            std=_floats(kw.get("std"), "std"),
            interpolation=kw.get("interpolation"),
            crop_pct=kw.get("crop_pct"),
        )
    return CompressOptions(
        **_given(kw, SAME_COMPRESS),
        # absolute, so stage commands run later from another directory find the images
        data=str(Path(kw["data"]).expanduser().absolute()),
        model_kwargs=parse_model_kwargs(kw.get("model_kwargs") or ()),
        data_overrides=overrides,
        targets=targets_from_text(kw["targets"]),
        methods=_methods(kw["method"]),
        batch_size=kw.get("train_batch_size"),
        metric=kw["metric_set"],
        candidate_blocks=_blocks(kw.get("blocks")),
        include_original=not kw.get("no_original", False),
    )


def deploy_options(kw: dict[str, Any]) -> DeployOptions:
    """The :class:`~dcvit_deploy.config.options.DeployOptions` of a command's parsed options."""
    return DeployOptions(
        **_given(kw, SAME_DEPLOY),
        margin=_margin(kw.get("margin", "0%")),
        confirm=not kw.get("no_confirm", False),
        triton_repo=kw.get("triton_repo") and str(Path(kw["triton_repo"]).expanduser().absolute()),
        simplify=not kw.get("no_simplify", False),
        precisions=tuple(p.strip() for p in kw["precisions"].split(","))
        if kw.get("precisions")
        else None,
        eval_data=kw.get("eval_data") and str(Path(kw["eval_data"]).expanduser().absolute()),
    )
