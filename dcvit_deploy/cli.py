"""``dcvit-deploy`` command line: parse options, call :mod:`dcvit_deploy.api`, print.

Heavy imports (torch, timm, onnxruntime) happen inside command bodies so ``--help`` is instant.
User errors print one line (problem; fix) to stderr and exit 1 (3: no candidate meets the
budget, 4: regression against a baseline, 5: chosen but not published to Triton); Ctrl-C
leaves a resumable run and exits 130.
"""

from __future__ import annotations

import _signal  # the builtin behind `signal`: installing a handler imports nothing
import os
import sys

INTERRUPTED = "interrupted: rerun the same command to resume"


def _interrupted_while_importing(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C while this module is still importing (the first tenth of a second of the
    console script): no traceback, the same line and exit code as later."""
    sys.stderr.write(f"{INTERRUPTED}\n")
    sys.stderr.flush()
    os._exit(130)


# Installed before anything slow is imported, restored at the end of this module.
try:
    _SIGINT_BEFORE_IMPORT: Any = _signal.signal(_signal.SIGINT, _interrupted_while_importing)
except ValueError:  # imported outside the main thread: signals are not ours to handle
    _SIGINT_BEFORE_IMPORT = None

import errno  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any, Literal, TypeVar  # noqa: E402

import click  # noqa: E402

from dcvit_deploy.errors import DcvitError, OptionError, UserInputError  # noqa: E402

F = TypeVar("F", bound=Callable[..., Any])


def _options(*opts: Callable[[F], F]) -> Callable[[F], F]:
    def deco(f: F) -> F:
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


MODEL_OPTIONS = _options(
    click.option("--model", required=True, help="timm model name, e.g. deit_small_patch16_224."),
    click.option(
        "--checkpoint", type=click.Path(dir_okay=False), help="Local .safetensors/.pth weights."
    ),
    click.option(
        "--model-kwargs",
        multiple=True,
        help="timm constructor kwargs, e.g. 'num_classes=10 img_size=32'.",
    ),
    click.option(
        "--pretrained-cache",
        is_flag=True,
        help="Use timm weights from the local hub cache (offline).",
    ),
    click.option(
        "--random-init",
        is_flag=True,
        help="No weights: random init (smoke tests, latency studies).",
    ),
)
DATA_OPTIONS = _options(
    click.option(
        "--data",
        required=True,
        type=click.Path(),
        help="Folder of images (recursive; labels unused).",
    ),
    click.option(
        "--num-samples",
        type=int,
        default=500,
        show_default=True,
        help="Few-shot images sampled (seeded).",
    ),
    click.option(
        "--holdout",
        type=int,
        default=32,
        show_default=True,
        help="Held-out images for verification and fidelity.",
    ),
    click.option("--img-size", type=int, help="Override the model's input size."),
    click.option("--mean", type=str, help="Override normalisation mean, e.g. 0.5,0.5,0.5."),
    click.option("--std", type=str, help="Override normalisation std."),
    click.option(
        "--interpolation", type=str, help="Override resize interpolation (bilinear, bicubic, ...)."
    ),
    click.option("--crop-pct", type=float, help="Override the eval centre-crop fraction."),
)
COMPRESS_OPTIONS = _options(
    click.option(
        "--targets",
        default="5%:40%:5%",
        show_default=True,
        help="MAC reductions: '16.6%,25%' or a range 'start:stop:step'.",
    ),
    click.option(
        "--method",
        default="dcvit",
        show_default=True,
        help="Compression method(s), comma-separated: dcvit, practise, or dcvit,practise.",
    ),
    click.option(
        "--round-to",
        type=int,
        default=1,
        show_default=True,
        help="Round MLP widths to a multiple (e.g. 8, 64).",
    ),
    click.option(
        "--neuron-choice",
        type=click.Choice(["random", "activation", "weight"]),
        default="random",
        show_default=True,
    ),
    click.option(
        "--reuse/--no-reuse",
        default=None,
        help="Warm-start each target from its finetuned neighbour (default: the --schedule "
        "preset's procedure decides).",
    ),
    click.option(
        "--warm-fraction",
        type=float,
        default=0.5,
        show_default=True,
        help="Finetune length of warm-started targets.",
    ),
    click.option(
        "--schedule",
        type=click.Choice(["default", "paper", "tiny"]),
        default="default",
        show_default=True,
    ),
    click.option(
        "--iterations", type=int, help="Finetune steps per stage (overrides the schedule)."
    ),
    click.option(
        "--rank-iterations",
        type=int,
        help="Finetune steps per ranked block (default: same as --iterations).",
    ),
    click.option("--train-batch-size", type=int, help="Finetune batch size (default 64)."),
    click.option("--lr", type=float, help="Finetune learning rate (overrides the schedule)."),
    click.option(
        "--metric-set",
        type=click.Choice(["synthetic", "real"]),
        default="synthetic",
        show_default=True,
        help="Score blocks on model-inverted images or on held-out real images.",
    ),
    click.option(
        "--inversion", type=click.Choice(["paper", "fast"]), default="fast", show_default=True
    ),
    click.option(
        "--inversion-iterations", type=int, help="Model-inversion steps (overrides the preset)."
    ),
    click.option(
        "--blocks",
        type=str,
        help="Candidate blocks, e.g. '1-10' or '2,3,5' (default: all but first and last).",
    ),
    click.option(
        "--no-original", is_flag=True, help="Leave the uncompressed model out of the family."
    ),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option(
        "--train",
        type=click.Choice(["pick", "all"]),
        default="pick",
        show_default=True,
        help="Finetune only what can be chosen (every structure is measured first), or every "
        "candidate first (the paper schedule always does).",
    ),
    click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Where to finetune.",
    ),
)
PRECISION_OPTIONS: dict[str, dict[str, Any]] = {  # the precision axis and the fidelity floors
    "--precisions": {"help": "Precisions to try, comma-separated (default: each profile's list)."},
    "--min-fidelity": {"type": float, "default": 0.0, "help": "Floor on top-1 agreement with the "
                       "original, 0-1 (default 0 = none: 32 held-out images cannot resolve one)."},
    "--eval-data": {"type": click.Path(), "help": "Labelled images (a sub-folder per class, sorted "
                    "= class index): fidelity and top-1 per artifact are measured on them."},
    "--max-accuracy-drop": {"type": float, "help": "Floor: top-1 points an artifact may lose "
                            "against the original (needs --eval-data)."},
}  # fmt: skip

BUDGET_OPTIONS = _options(
    click.option(
        "--profile",
        help="Target profile name or .toml path (default: cpu-ort; select and report: the "
        "profile the run was last measured with).",
    ),
    click.option("--latency-ms", type=float, help="Latency budget in milliseconds."),
    click.option(
        "--speedup",
        type=float,
        help="Relative budget: at least X times faster than the original (e.g. 1.5); "
        "instead of --latency-ms.",
    ),
    click.option(
        "--prefer",
        type=click.Choice(["capacity", "fidelity"]),
        default="capacity",
        show_default=True,
        help="Among candidates that fit: the densest, or the most faithful to the original.",
    ),
    *(click.option(flag, **kw) for flag, kw in PRECISION_OPTIONS.items()),
    click.option(
        "--statistic",
        type=click.Choice(["mean", "p50", "p90", "p95", "p99"]),
        help="Budget statistic (default: the profile's).",
    ),
    click.option(
        "--margin",
        type=str,
        default="0%",
        show_default=True,
        help="Guard band: statistic x (1+margin) <= budget.",
    ),
    click.option(
        "--batch-size", type=int, help="Batch size the budget applies to (default: the profile's)."
    ),
    click.option(
        "--search",
        type=click.Choice(["all", "bisect"]),
        default="all",
        show_default=True,
        help="Measure every candidate, or O(log N) of them by bisection.",
    ),
    click.option(
        "--no-confirm",
        is_flag=True,
        help="Do not re-measure the chosen candidate in a fresh process before deploying it.",
    ),
    click.option(
        "--allow-other-device",
        is_flag=True,
        help="Measure even when this machine's device differs from the profile's.",
    ),
)
DEPLOY_OPTIONS = _options(
    click.option(
        "--triton-repo",
        type=click.Path(file_okay=False),
        help="Triton model repository (default: RUN/triton).",
    ),
    click.option(
        "--triton-model-name",
        help="Model name in the Triton repository (default: derived from --model).",
    ),
    click.option(
        "--triton-replace",
        is_flag=True,
        help="Publish over a Triton model that serves another run's version (this pick is "
        "then served), or whose platform, I/O or max batch size differ (its versions are "
        "retired).",
    ),
    click.option(
        "--triton-pareto",
        is_flag=True,
        help="Also write every Pareto-optimal candidate to the repository.",
    ),
    click.option("--opset", type=int, default=17, show_default=True),
    click.option("--no-simplify", is_flag=True, help="Skip ONNX graph simplification."),
)
EXECUTOR_OPTIONS = _options(
    click.option(
        "--executor",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="Run independent work here, or as Ray tasks (finetunes; each target on its node).",
    ),
    click.option("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else local)."),
    click.option(
        "--task-cpus",
        type=click.IntRange(min=1),
        help="CPUs (torch threads) per finetune task (default: local all, ray 1); the same value "
        "gives the same family on either executor.",
    ),
)
DRY_RUN_OPTION = click.option(
    "--dry-run",
    is_flag=True,
    help="Run every check and print the plan (targets -> structures); do no work.",
)
RUN_OPTIONS = _options(
    click.option(
        "--out",
        default="runs/latest",
        show_default=True,
        type=click.Path(file_okay=False),
        help="Run directory.",
    ),
    click.option(
        "--resume", is_flag=True, help="Require an existing run in --out and continue it."
    ),
    click.option(
        "--overwrite", is_flag=True, help="Move another run found in --out aside and start anew."
    ),
    click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print a JSON result on stdout; no progress display.",
    ),
)
OUT_OPTION = click.option(
    "--out",
    default="runs/latest",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Run directory.",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")


# =========================================================================== option -> api


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise UserInputError(
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
            if "-" in part:
                a, b = (int(v) for v in part.split("-"))
                if a > b:
                    raise OptionError(f"--blocks range {part.strip()!r} is empty", example)
                bounds = (a, b)
            else:
                bounds = (int(part), int(part))
        except ValueError as exc:
            raise OptionError(f"--blocks {text!r} is not a block list", example) from exc
        if bounds[1] > MAX_BLOCK_INDEX:
            raise OptionError(
                f"--blocks {text!r} names block {bounds[1]}; no ViT has that many blocks",
                "use the model's block indices (0 = first block)",
            )
        out.update(range(bounds[0], bounds[1] + 1))
    return tuple(sorted(out))


def _methods(text: str) -> tuple[str, ...]:
    from dcvit_deploy.config.options import METHODS

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
    if value >= 1 and not t.endswith("%"):
        value /= 100
    return value


def compress_options(kw: dict[str, Any]) -> Any:
    """The :class:`~dcvit_deploy.config.options.CompressOptions` of a command's parsed options."""
    from dcvit_deploy.config.options import CompressOptions
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
        model=kw["model"],
        # absolute, so stage commands run later from another directory find the images
        data=str(Path(kw["data"]).expanduser().absolute()),
        checkpoint=kw.get("checkpoint"),
        model_kwargs=parse_model_kwargs(kw.get("model_kwargs") or ()),
        pretrained_cache=kw.get("pretrained_cache", False),
        random_init=kw.get("random_init", False),
        num_samples=kw.get("num_samples"),
        holdout=kw.get("holdout", 32),
        data_overrides=overrides,
        targets=targets_from_text(kw["targets"]),
        methods=_methods(kw["method"]),
        round_to=kw["round_to"],
        neuron_choice=kw["neuron_choice"],
        reuse=kw["reuse"],
        warm_fraction=kw["warm_fraction"],
        schedule=kw["schedule"],
        iterations=kw.get("iterations"),
        rank_iterations=kw.get("rank_iterations"),
        batch_size=kw.get("train_batch_size"),
        lr=kw.get("lr"),
        metric=kw["metric_set"],
        inversion=kw["inversion"],
        inversion_iterations=kw.get("inversion_iterations"),
        candidate_blocks=_blocks(kw.get("blocks")),
        include_original=not kw.get("no_original", False),
        seed=kw["seed"],
        device=kw["device"],
        train=kw.get("train", "pick"),
    )


def deploy_options(kw: dict[str, Any]) -> Any:
    """The :class:`~dcvit_deploy.config.options.DeployOptions` of a command's parsed options."""
    from dcvit_deploy.config.options import DeployOptions

    return DeployOptions(
        profile=kw.get("profile") or "cpu-ort",
        latency_ms=kw.get("latency_ms"),
        speedup=kw.get("speedup"),
        statistic=kw.get("statistic"),
        margin=_margin(kw.get("margin", "0%")),
        batch_size=kw.get("batch_size"),
        search=kw.get("search", "all"),
        prefer=kw.get("prefer", "capacity"),
        confirm=not kw.get("no_confirm", False),
        allow_other_device=kw.get("allow_other_device", False),
        triton_repo=kw.get("triton_repo") and str(Path(kw["triton_repo"]).expanduser().absolute()),
        triton_model_name=kw.get("triton_model_name"),
        triton_replace=bool(kw.get("triton_replace", False)),
        triton_pareto=kw.get("triton_pareto", False),
        opset=kw.get("opset", 17),
        simplify=not kw.get("no_simplify", False),
        precisions=tuple(p.strip() for p in kw["precisions"].split(","))
        if kw.get("precisions")
        else None,
        min_fidelity=kw.get("min_fidelity", 0.0),
        eval_data=kw.get("eval_data") and str(Path(kw["eval_data"]).expanduser().absolute()),
        max_accuracy_drop=kw.get("max_accuracy_drop"),
    )


def _warn(lines: Any) -> None:
    """Notes that do not stop a run, on stderr (stdout stays clean for --json)."""
    for line in lines:
        if line:
            click.echo(f"note: {line}", err=True)


def _result_notes(result: Any, shown: set[str]) -> list[str]:
    """The data notes a pipeline result carries (skipped images, a short held-out set), minus
    those already printed by the up-front checks."""
    notes = [str(n) for n in getattr(result, "notes", ()) or ()]
    return [n for n in notes if n and n not in shown]


def _plan_payload(v: Any, copts: Any, dopts: Any, out: str) -> dict[str, Any]:
    import dataclasses

    facts = v.model
    return {
        "dry_run": True,
        "out": str(Path(out).expanduser().absolute()),
        "model": {
            "name": facts.name,
            "model_kwargs": facts.model_kwargs,
            "depth": facts.depth,
            "input_size": list(facts.input_size),
            "patch_size": list(facts.patch_size),
            "candidate_blocks": list(facts.candidate_blocks),
            "feasible": list(facts.feasible),
        },
        "images": v.image_count,
        "profile": v.profile.name if v.profile else None,
        "budget": dataclasses.asdict(v.budget) if v.budget else None,
        "speedup": getattr(dopts, "speedup", None) if dopts else None,
        "plan": [dataclasses.asdict(p) for p in v.plan],
        "notes": list(v.notes),
    }


def _plan_text(v: Any, copts: Any, dopts: Any, out: str) -> str:
    facts = v.model
    c, h, w = facts.input_size
    lo, hi = facts.feasible
    lines = [
        "dry run: every check passed; nothing was done",
        f"model: {facts.name} (depth {facts.depth}, input {c}x{h}x{w}, "
        f"patch {facts.patch_size[0]}x{facts.patch_size[1]})",
        f"images: {v.image_count} in {copts.data}",
        f"candidate blocks: {', '.join(map(str, facts.candidate_blocks))} "
        f"(DC-ViT reaches {lo:.2%}..{hi:.2%} MAC reduction)",
    ]
    if v.profile is not None:
        b = v.budget
        if b is not None:
            from dcvit_deploy.selection.reasons import budget_summary

            budget = budget_summary(b)
        elif dopts is not None and dopts.speedup is not None:
            budget = f"at least {dopts.speedup}x faster than the original"
        else:
            budget = "none (measure only)"
        lines.append(f"profile: {v.profile.name}; budget: {budget}")
    lines.append(f"run directory: {Path(out).expanduser().absolute()}")
    lines.append("plan (target -> structure):")
    lines += [f"  {p.describe()}" for p in v.plan]
    return "\n".join(lines)


_LIVE: list[Any] = []  # progress displays to close before the command's last lines print


def _progress(as_json: bool) -> Any:
    from dcvit_deploy.progress import ConsoleProgress, quiet

    if as_json:
        return quiet
    _LIVE.append(ConsoleProgress())
    return _LIVE[-1]


def _close_progress() -> None:
    while _LIVE:
        _LIVE.pop().close()


def _emit(as_json: bool, payload: dict[str, Any], text: str) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text)


def _result_payload(result: Any) -> dict[str, Any]:
    from dcvit_deploy.store.records import to_dict

    sel = result.selection
    return {
        "chosen": sel.chosen if sel else None,
        "selection": to_dict(sel) if sel else None,
        "candidates": [
            {
                "name": o.candidate,
                "status": o.status,
                "retained": o.retained,
                "precision": o.precision,
                "fidelity": o.fidelity,
                "top1": o.closeness.top1 if o.closeness else None,
                "latency": [to_dict(s) for s in o.latency],
                "error": o.error,
            }
            for o in result.outcomes
        ],
        "reports": {k: str(v) for k, v in result.reports.items()},
        "triton": str(result.triton) if result.triton else None,
        "notes": [str(n) for n in getattr(result, "notes", ()) or ()],
        "skipped_images": [str(n) for n in getattr(result, "skipped_images", ()) or ()],
        "fleet": getattr(result, "fleet", {}),
    }


def _result_text(result: Any) -> str:
    sel = result.selection
    lines = []
    if sel is not None:
        from dcvit_deploy.selection.reasons import budget_summary, render

        lines.append(f"budget: {budget_summary(sel.budget)}")
        lines.append(f"chosen: {sel.chosen}" if sel.chosen else "chosen: none")
        for name in sel.reasons:
            lines.append(f"  {name}: {render(sel, name)}")
    for target, row in getattr(result, "fleet", {}).items():
        lines.append(f"{target}: {row['chosen'] or 'none'} ({row['why']})")
    if result.triton:
        lines.append(f"triton repository: {result.triton}")
    for k, v in result.reports.items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def _finish(result: Any, as_json: bool, shown: set[str] | None = None) -> None:
    """Print the result (and the notes not ``shown`` yet); raise what made it fail: nothing
    fits (3), or the pick was not published (5)."""
    _close_progress()
    _warn(_result_notes(result, shown or set()))
    _emit(as_json, _result_payload(result), _result_text(result))
    for failure in (result.infeasible, result.not_published):
        if failure is not None:
            raise failure


# =========================================================================== commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dcvit-deploy")
def cli() -> None:
    """Compress a ViT with DC-ViT into a dense family, deploy it, and pick the densest
    candidate that meets a measured latency budget.

    Exit codes: 0 ok; 1 user or environment error; 3 no candidate meets the budget; 4 a
    regression in `compare`; 5 a candidate was chosen but not published to Triton; 130
    interrupted."""


@cli.command("compress")
@MODEL_OPTIONS
@DATA_OPTIONS
@COMPRESS_OPTIONS
@BUDGET_OPTIONS
@DEPLOY_OPTIONS
@RUN_OPTIONS
@EXECUTOR_OPTIONS
@DRY_RUN_OPTION
def compress_cmd(**kw: Any) -> None:
    """The whole job: compress, export/verify, build, profile, select, Triton + reports."""
    _compress_or_family(kw, stages=("compress", "deploy"))


def _compress_or_family(kw: dict[str, Any], stages: tuple[str, ...]) -> None:
    """Check everything up front (:func:`dcvit_deploy.config.validate.validate_run`), then run, or
    with ``--dry-run`` print the plan and stop."""
    from dcvit_deploy.config.options import DeployOptions
    from dcvit_deploy.config.validate import validate_run

    copts = compress_options(kw)
    dopts = deploy_options(kw) if "deploy" in stages else DeployOptions()
    if kw["ray_address"] and kw["executor"] != "ray":
        raise OptionError("--ray-address needs --executor ray", "add --executor ray or drop it")
    checked = validate_run(copts, dopts, kw["out"], stages=stages, executor=kw["executor"])
    if kw.get("dry_run"):
        if not kw["as_json"]:
            _warn(checked.notes)
        _emit(
            kw["as_json"],
            _plan_payload(checked, copts, dopts, kw["out"]),
            _plan_text(checked, copts, dopts, kw["out"]),
        )
        return
    _warn(checked.notes)
    from dcvit_deploy.api import run_pipeline
    from dcvit_deploy.pipeline.executor import make_executor

    console = _progress(kw["as_json"])  # notes are said once, at the end
    result = run_pipeline(
        copts,
        dopts,
        kw["out"],
        overwrite=kw["overwrite"],
        resume=kw["resume"],
        progress=lambda ev: None if ev.stage == "note" else console(ev),
        stop_after="deploy" if "deploy" in stages else "compress",
        checked=checked,  # what validate_run established: nothing is loaded or planned twice
        executor=make_executor(kw["executor"], kw["ray_address"], kw["task_cpus"]),
    )
    if "deploy" in stages:
        _finish(result, kw["as_json"], set(checked.notes))
        return
    _warn(_result_notes(result, set(checked.notes)))
    _family_listing(kw)


@cli.command("family")
@MODEL_OPTIONS
@DATA_OPTIONS
@COMPRESS_OPTIONS
@RUN_OPTIONS
@EXECUTOR_OPTIONS
@DRY_RUN_OPTION
def family_cmd(**kw: Any) -> None:
    """Compression only: the dense candidate family (safetensors + JSON specs) in RUN/family."""
    _compress_or_family(kw, stages=("compress",))


def _family_listing(kw: dict[str, Any]) -> None:
    from dcvit_deploy.compress.family import load_family

    fam = load_family(Path(kw["out"]) / "family")
    rows: list[dict[str, Any]] = [
        {
            "name": c.name,
            "reduction": round(c.reduction, 4),
            "macs": c.macs.linear_norm,
            "macs_full": c.macs.full,
            "params": c.macs.params,
        }
        for c in fam
    ]
    _emit(
        kw["as_json"],
        {"family": rows},
        "\n".join(
            f"{r['name']:>16}  -{r['reduction']:6.1%} MACs  {r['macs'] / 1e6:9.1f} M"
            f"  {r['params'] / 1e6:7.2f} M params"
            for r in rows
        ),
    )


def _stage(kw: dict[str, Any], until: Literal["export", "build", "profile"]) -> None:
    from dcvit_deploy.api import stage_over_run
    from dcvit_deploy.config.validate import validate_stage

    validate_stage(kw["out"], deploy_options(kw), need_backend=until != "export")
    result = stage_over_run(
        kw["out"], deploy_options(kw), until=until, progress=_progress(kw["as_json"])
    )
    if until == "profile" and result.selection is not None:
        _finish(result, kw["as_json"])
        return
    _emit(
        kw["as_json"],
        _result_payload(result),
        "\n".join(_outcome_line(o) for o in result.outcomes),
    )


def _outcome_line(o: Any) -> str:
    v = o.verification
    check = (
        f"cosine {v.cosine:.6f} top-1 {v.top1_agreement:.1%} max|d| {v.max_abs:.2e}" if v else ""
    )
    built = f"artifact {Path(o.artifact.path).name}" if o.artifact else ""
    status = "exported" if o.status == "not_measured" else o.status
    return f"{o.candidate:>16}  {status}  {check}  {built}  {o.error}".rstrip()


@cli.command("export")
@OUT_OPTION
@BUDGET_OPTIONS
@DEPLOY_OPTIONS
@JSON_OPTION
def export_cmd(**kw: Any) -> None:
    """Export every candidate of a run to ONNX and verify it against PyTorch."""
    _stage(kw, "export")


@cli.command("build")
@OUT_OPTION
@BUDGET_OPTIONS
@DEPLOY_OPTIONS
@JSON_OPTION
def build_cmd(**kw: Any) -> None:
    """Build the profile's artifact (TensorRT engine / ORT session) for every candidate."""
    _stage(kw, "build")


@cli.command("profile")
@OUT_OPTION
@BUDGET_OPTIONS
@DEPLOY_OPTIONS
@JSON_OPTION
def profile_cmd(**kw: Any) -> None:
    """Measure every candidate's latency on the profile (and select if --latency-ms is given)."""
    _stage(kw, "profile")


@cli.command("select")
@OUT_OPTION
@BUDGET_OPTIONS
@DEPLOY_OPTIONS
@JSON_OPTION
def select_cmd(**kw: Any) -> None:
    """Select from measured outcomes under a budget; write the Triton repository and reports."""
    from dcvit_deploy.api import select_over_run
    from dcvit_deploy.config.validate import validate_stage

    dopts = deploy_options(kw)
    validate_stage(kw["out"], dopts, need_budget=True, need_backend=False)
    given = kw.get("profile") is not None
    _finish(select_over_run(kw["out"], dopts, profile_given=given), kw["as_json"])


@cli.command("triton")
@OUT_OPTION
@BUDGET_OPTIONS
@DEPLOY_OPTIONS
@JSON_OPTION
def triton_cmd(**kw: Any) -> None:
    """(Re)write the Triton model repository for the candidate selected under the budget."""
    select_cmd.callback(**kw)  # type: ignore[misc]


@cli.command("report", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@OUT_OPTION
@click.option("--profile", help="Whose reports (default: the profile last measured).")
@JSON_OPTION
@click.pass_context
def report_cmd(ctx: click.Context, out: str, profile: str | None, as_json: bool) -> None:
    """Rewrite report.json, candidates.csv, SUMMARY.md and pareto.png from what a run recorded
    (its outcomes, choice and publication); decides and publishes nothing."""
    from dcvit_deploy.api import report_over_run
    from dcvit_deploy.config.options import DeployOptions
    from dcvit_deploy.config.validate import validate_stage

    if ctx.args:
        raise OptionError(
            f"`report` only writes the reports of what the run recorded; it takes no {ctx.args[0]}",
            "decide under a budget with `dcvit-deploy select --out RUN ...` (it writes them too)",
        )
    validate_stage(out, DeployOptions(profile=profile or "cpu-ort"), need_backend=False)
    paths = report_over_run(out, profile)
    _emit(
        as_json,
        {k: str(v) for k, v in paths.items()},
        "\n".join(f"{k}: {v}" for k, v in paths.items()),
    )


@cli.command("status")
@OUT_OPTION
@JSON_OPTION
def status_cmd(out: str, as_json: bool) -> None:
    """Show the steps and candidates of a run directory and where it stopped."""
    from dcvit_deploy.api import status

    s = status(out)
    lines = [f"run: {s['run']}  model: {s['identity'].get('model')}"]
    lines += [f"  step {k}: {v}" for k, v in s["steps"].items()]
    for name, stages in s["candidates"].items():
        on = {p: f" on {m[name]}" for p, m in s["measured_on"].items() if name in m}
        per_profile = [
            f"{p}={o[name]}{on.get(p, '')}" for p, o in s["outcomes"].items() if name in o
        ]
        lines.append(
            f"  {name:>16}: {', '.join(f'{k}={v}' for k, v in stages.items())}"
            f"  outcome: {', '.join(per_profile) or '-'}"
            + ("  (trained)" if name in s["trained"] else "")
        )
    _emit(as_json, s, "\n".join(lines))


@cli.command("doctor")
@click.option("--profile", help="Check one profile (default: every backend in general).")
@JSON_OPTION
def doctor_cmd(profile: str | None, as_json: bool) -> None:
    """List backends, whether each can run here, and the exact reason and fix when not."""
    from dcvit_deploy.backends import doctor
    from dcvit_deploy.config.profiles import load_profile

    prof = load_profile(profile) if profile else None
    rows = doctor(prof)
    payload = {name: {"ok": a.ok, "reason": a.reason, "fix": a.fix} for name, a in rows}
    text = "\n".join(
        f"{name:>12}: {'ok' if a.ok else 'unavailable'}  {a.reason}"
        + (f"  (fix: {a.fix})" if a.fix and not a.ok else "")
        for name, a in rows
    )
    _emit(as_json, payload, text)


@cli.command("profiles")
@JSON_OPTION
def profiles_cmd(as_json: bool) -> None:
    """List the built-in target profiles."""
    from dcvit_deploy.config.profiles import list_profiles, load_profile

    rows = []
    for name in list_profiles():
        p = load_profile(name)
        rows.append(
            {
                "name": name,
                "backend": p.backend,
                "device": p.device,
                "precision": p.precision,
                "batch_sizes": list(p.batch_sizes),
                "statistic": p.statistic,
                "description": p.description,
            }
        )
    _emit(
        as_json,
        {"profiles": rows},
        "\n".join(
            f"{r['name']:>16}  {r['backend']:<12} {r['device']:<5} {r['precision']:<5} "
            f"batches {r['batch_sizes']}  {r['description']}"
            for r in rows
        ),
    )


@cli.command("compare")
@click.argument("report", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--baseline",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A stored report.json.",
)
@click.option(
    "--tolerance",
    type=float,
    default=0.10,
    show_default=True,
    help="Allowed latency increase (fraction).",
)
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), help="Write comparison.json/.md here."
)
@click.option(
    "--allow-other-device",
    is_flag=True,
    help="Compare even when the baseline was measured on another profile, device or runtime.",
)
@JSON_OPTION
def compare_cmd(
    report: str,
    baseline: str,
    tolerance: float,
    out_dir: str | None,
    as_json: bool,
    allow_other_device: bool,
) -> None:
    """CI gate: compare a report with a baseline; exit 4 on a latency or fidelity regression."""
    import dataclasses

    from dcvit_deploy.config.validate import check_writable_dir
    from dcvit_deploy.errors import RegressionDetected
    from dcvit_deploy.reports.compare import check_regression
    from dcvit_deploy.reports.writers import load_report

    if not tolerance > 0 or tolerance != tolerance or tolerance == float("inf"):
        raise OptionError(
            f"--tolerance must be a finite fraction > 0, got {tolerance!r}",
            "pass e.g. --tolerance 0.10 (10%)",
        )
    load_report(report)
    load_report(baseline, "baseline report")
    if out_dir:
        check_writable_dir(out_dir, "--out")
    try:
        result = check_regression(
            Path(report),
            Path(baseline),
            tolerance=tolerance,
            out_dir=Path(out_dir) if out_dir else None,
            allow_other_device=allow_other_device,
        )
    except RegressionDetected as exc:
        # Point at the comparison only where this command wrote one.
        where = (
            f"inspect {Path(out_dir) / 'COMPARISON.md'}"
            if out_dir
            else "rerun with --out DIR to write COMPARISON.md with every finding"
        )
        raise RegressionDetected(
            exc.problem,
            f"{where}; if the change is intended, replace the baseline with this report.json",
        ) from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserInputError(
            f"cannot compare {report} with the baseline {baseline}: the reports differ in "
            f"structure ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
            "regenerate both reports with this version of dcvit-deploy",
        ) from exc
    payload = dataclasses.asdict(result)
    text = [
        f"no regression against {baseline} ({result.statistic} at batch {result.batch_size}, "
        f"tolerance {tolerance:.0%})"
    ]
    text += [f"  note: {n}" for n in result.notes]
    _emit(as_json, payload, "\n".join(text))


DEMO_ARGS = (
    "--model", "vit_tiny_patch16_224", "--random-init",
    "--model-kwargs", "img_size=64 patch_size=16 depth=6 num_classes=10",
    "--data", "runs/demo-images", "--num-samples", "32", "--targets", "10%:40%:10%",
    "--schedule", "tiny", "--iterations", "10", "--inversion-iterations", "20",
    "--speedup", "1.15", "--out", "runs/demo",
)  # fmt: skip
"""The demo's settings: a seeded random-init tiny ViT on bundled photos, CPU ONNX Runtime, a
budget relative to the original measured in the same run (so it picks on any machine)."""


@cli.command("demo", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def demo_cmd(ctx: click.Context) -> None:
    """The main job on an embedded default, no download: writes the bundled photos to
    runs/demo-images when missing, then runs `compress` with the demo's settings into
    runs/demo. Any `compress` option overrides them (e.g. `demo --speedup 1.3 --out runs/d2`)."""
    args = [*DEMO_ARGS, *ctx.args]
    data = Path(args[len(args) - 1 - args[::-1].index("--data") + 1])
    if not data.is_dir() or not any(data.iterdir()):
        from dcvit_deploy.config.validate import check_writable_dir
        from dcvit_deploy.model.images import write_demo_images

        check_writable_dir(str(data), "--data")
        click.echo(f"wrote {len(write_demo_images(data, 64))} bundled photos to {data}", err=True)
    compress_cmd.main(args=args, prog_name="dcvit-deploy demo", standalone_mode=False)


demo_cmd.help = f"{demo_cmd.help}\n\nThe demo's settings: {' '.join(DEMO_ARGS)}"


@cli.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--count", type=int, default=48, show_default=True)
def demo_data_cmd(out_dir: str, count: int) -> None:
    """Write real photos bundled with scikit-image (plus crops/flips) for a download-free demo."""
    from dcvit_deploy.config.validate import check_writable_dir
    from dcvit_deploy.model.images import write_demo_images

    check_writable_dir(out_dir, "demo-data DIR")
    paths = write_demo_images(out_dir, count)
    click.echo(f"wrote {len(paths)} images to {out_dir}")


ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOTDIR", "EISDIR",
                 "ENAMETOOLONG", "EMFILE", "ENFILE", "EFBIG", "ELOOP", "EXDEV")
    if hasattr(errno, name)
)  # fmt: skip
"""OSErrors a user or their machine causes (permissions, read-only or full disks, bad paths):
printed as one line. Any other OSError is a bug here and keeps its traceback."""


def _caused_by_interrupt(exc: BaseException) -> bool:
    """True when ``exc`` is, or was raised while handling, a Ctrl-C (e.g. an ImportError left
    behind by an interrupted ``import torch``)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (KeyboardInterrupt, click.exceptions.Abort)):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _fail(message: str, code: int) -> None:
    """Print ``message`` as the one line on stderr and exit with ``code`` (a second Ctrl-C
    while printing is ignored, so the line and the code are always what the user gets)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        previous = None
    try:
        click.echo(" ".join(message.split()), err=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors as one line, exit codes per :mod:`dcvit_deploy.errors`.

    0 ok; 1 a user or environment error, including command-line usage errors (one line:
    problem; fix); 3 no candidate meets the budget; 4 a regression in ``compare``; 5 a
    candidate was chosen but not published; 130 interrupted. Anything else is a bug and keeps
    its traceback.
    """
    interrupts: list[int] = []

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        # Remember the Ctrl-C: a C extension interrupted while it imports (numpy under torch)
        # can swallow the KeyboardInterrupt and fail with an unrelated ImportError instead.
        interrupts.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        _main(argv, interrupts)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str] | None, interrupts: list[int]) -> None:
    try:
        try:
            cli.main(args=argv, prog_name="dcvit-deploy", standalone_mode=False)
        finally:
            _close_progress()
    except click.exceptions.Exit as exc:  # --help, --version
        sys.exit(exc.exit_code)
    except DcvitError as exc:
        _fail(f"error: {exc.one_line()}", exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "dcvit-deploy"
        _fail(f"error: {exc.format_message().rstrip('.')}; fix: see `{command} --help`", 1)
    except click.ClickException as exc:
        _fail(f"error: {exc.format_message().rstrip('.')}", 1)
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            if interrupts or _caused_by_interrupt(exc):
                _fail(INTERRUPTED, 130)
            raise
        where = f": {exc.filename}" if exc.filename else ""
        _fail(
            f"error: {exc.strerror or exc}{where}; fix: check that the path exists, is "
            "writable and that its file system has free space",
            1,
        )
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        if interrupts or _caused_by_interrupt(exc):
            _fail(INTERRUPTED, 130)
        raise


if _SIGINT_BEFORE_IMPORT is not None:  # the import is over: Ctrl-C is main()'s to handle
    signal.signal(signal.SIGINT, _SIGINT_BEFORE_IMPORT)

if __name__ == "__main__":
    main()
