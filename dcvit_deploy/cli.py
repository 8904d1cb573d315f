"""``dcvit-deploy`` command line: parse options, call :mod:`dcvit_deploy.api`, print.

Heavy imports (torch, timm, onnxruntime) happen inside command bodies so ``--help`` is instant.
User errors print one line (problem; fix) to stderr and exit 1 (3: no candidate meets the
budget, 4: regression against a baseline); Ctrl-C leaves a resumable run and exits 130.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

from .errors import DcvitError

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
        "--method", type=click.Choice(["dcvit", "practise"]), default="dcvit", show_default=True
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
        default=True,
        show_default=True,
        help="Rank blocks once and warm-start neighbours.",
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
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Where to finetune.",
    ),
)
BUDGET_OPTIONS = _options(
    click.option(
        "--profile", default="cpu-ort", show_default=True, help="Target profile name or .toml path."
    ),
    click.option("--latency-ms", type=float, help="Latency budget in milliseconds."),
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
)
DEPLOY_OPTIONS = _options(
    click.option(
        "--triton-repo",
        type=click.Path(file_okay=False),
        help="Triton model repository (default: RUN/triton).",
    ),
    click.option(
        "--triton-pareto",
        is_flag=True,
        help="Also write every Pareto-optimal candidate to the repository.",
    ),
    click.option("--opset", type=int, default=17, show_default=True),
    click.option("--no-simplify", is_flag=True, help="Skip ONNX graph simplification."),
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
        from .errors import UserInputError

        raise UserInputError(
            f"--{name} {text!r} is not a comma-separated list of numbers",
            f"write e.g. --{name} 0.5,0.5,0.5",
        ) from exc


def _blocks(text: str | None) -> tuple[int, ...] | None:
    from .errors import UserInputError

    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError as exc:
        raise UserInputError(
            f"--blocks {text!r} is not a block list", "write e.g. --blocks 1-10 or --blocks 2,3,5"
        ) from exc
    return tuple(sorted(set(out)))


def _margin(text: str) -> float:
    from .errors import UserInputError

    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError as exc:
        raise UserInputError(
            f"--margin {text!r} is not a number", "write e.g. --margin 5% or --margin 0.05"
        ) from exc
    if value >= 1 and not t.endswith("%"):
        value /= 100
    return value


def compress_options(kw: dict[str, Any]) -> Any:
    from .options import CompressOptions
    from .compress.plan import parse_targets
    from .data import DataOverrides
    from .models import parse_model_kwargs

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
        targets=tuple(parse_targets(kw["targets"])),
        methods=(kw["method"],),
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
    )


def deploy_options(kw: dict[str, Any]) -> Any:
    from .options import DeployOptions

    return DeployOptions(
        profile=kw.get("profile", "cpu-ort"),
        latency_ms=kw.get("latency_ms"),
        statistic=kw.get("statistic"),
        margin=_margin(kw.get("margin", "0%")),
        batch_size=kw.get("batch_size"),
        search=kw.get("search", "all"),
        triton_repo=kw.get("triton_repo"),
        triton_pareto=kw.get("triton_pareto", False),
        opset=kw.get("opset", 17),
        simplify=not kw.get("no_simplify", False),
    )


def _progress(as_json: bool) -> Any:
    from .progress import ConsoleProgress, quiet

    return quiet if as_json else ConsoleProgress()


def _emit(as_json: bool, payload: dict[str, Any], text: str) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text)


def _result_payload(result: Any) -> dict[str, Any]:
    from .records import to_dict

    sel = result.selection
    return {
        "chosen": sel.chosen if sel else None,
        "selection": to_dict(sel) if sel else None,
        "candidates": [
            {
                "name": o.candidate,
                "status": o.status,
                "retained": o.retained,
                "fidelity": o.fidelity,
                "latency": [to_dict(s) for s in o.latency],
                "error": o.error,
            }
            for o in result.outcomes
        ],
        "reports": {k: str(v) for k, v in result.reports.items()},
        "triton": str(result.triton) if result.triton else None,
    }


def _result_text(result: Any) -> str:
    sel = result.selection
    lines = []
    if sel is not None:
        b = sel.budget
        lines.append(
            f"budget: {b.statistic} x(1+{b.margin:.0%}) <= {b.ms} ms at batch {b.batch_size}"
        )
        lines.append(f"chosen: {sel.chosen}" if sel.chosen else "chosen: none")
        for name, reason in sel.reasons.items():
            lines.append(f"  {name}: {reason}")
    if result.triton:
        lines.append(f"triton repository: {result.triton}")
    for k, v in result.reports.items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def _finish(result: Any, as_json: bool) -> None:
    _emit(as_json, _result_payload(result), _result_text(result))
    if result.infeasible is not None:
        raise result.infeasible


# =========================================================================== commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dcvit-deploy")
def cli() -> None:
    """Compress a ViT with DC-ViT into a dense family, deploy it, and pick the densest
    candidate that meets a measured latency budget."""


@cli.command("compress")
@MODEL_OPTIONS
@DATA_OPTIONS
@COMPRESS_OPTIONS
@BUDGET_OPTIONS
@DEPLOY_OPTIONS
@RUN_OPTIONS
def compress_cmd(**kw: Any) -> None:
    """The whole job: compress, export/verify, build, profile, select, Triton + reports."""
    from .api import run_pipeline

    result = run_pipeline(
        compress_options(kw),
        deploy_options(kw),
        kw["out"],
        overwrite=kw["overwrite"],
        resume=kw["resume"],
        progress=_progress(kw["as_json"]),
    )
    _finish(result, kw["as_json"])


@cli.command("family")
@MODEL_OPTIONS
@DATA_OPTIONS
@COMPRESS_OPTIONS
@RUN_OPTIONS
def family_cmd(**kw: Any) -> None:
    """Compression only: the dense candidate family (safetensors + JSON specs) in RUN/family."""
    from .options import DeployOptions, run_pipeline

    run_pipeline(
        compress_options(kw),
        DeployOptions(),
        kw["out"],
        overwrite=kw["overwrite"],
        resume=kw["resume"],
        progress=_progress(kw["as_json"]),
        stop_after="compress",
    )
    from .compress.family import load_family

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
    from .api import stage_over_run

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
    from .api import select_over_run

    if kw.get("latency_ms") is None:
        from .errors import UserInputError

        raise UserInputError("select needs a budget", "pass --latency-ms MS")
    _finish(select_over_run(kw["out"], deploy_options(kw)), kw["as_json"])


@cli.command("triton")
@OUT_OPTION
@BUDGET_OPTIONS
@DEPLOY_OPTIONS
@JSON_OPTION
def triton_cmd(**kw: Any) -> None:
    """(Re)write the Triton model repository for the candidate selected under the budget."""
    select_cmd.callback(**kw)  # type: ignore[misc]


@cli.command("report")
@OUT_OPTION
@BUDGET_OPTIONS
@DEPLOY_OPTIONS
@JSON_OPTION
def report_cmd(**kw: Any) -> None:
    """Rewrite report.json, candidates.csv, SUMMARY.md and pareto.png from a run's outcomes."""
    from .api import report_over_run

    paths = report_over_run(kw["out"], deploy_options(kw))
    _emit(
        kw["as_json"],
        {k: str(v) for k, v in paths.items()},
        "\n".join(f"{k}: {v}" for k, v in paths.items()),
    )


@cli.command("status")
@OUT_OPTION
@JSON_OPTION
def status_cmd(out: str, as_json: bool) -> None:
    """Show the steps and candidates of a run directory and where it stopped."""
    from .api import status

    s = status(out)
    lines = [f"run: {s['run']}  model: {s['identity'].get('model')}"]
    lines += [f"  step {k}: {v}" for k, v in s["steps"].items()]
    for name, stages in s["candidates"].items():
        per_profile = [f"{p}={o[name]}" for p, o in s["outcomes"].items() if name in o]
        lines.append(
            f"  {name:>16}: {', '.join(f'{k}={v}' for k, v in stages.items())}"
            f"  outcome: {', '.join(per_profile) or '-'}"
        )
    _emit(as_json, s, "\n".join(lines))


@cli.command("doctor")
@click.option("--profile", help="Check one profile (default: every backend in general).")
@JSON_OPTION
def doctor_cmd(profile: str | None, as_json: bool) -> None:
    """List backends, whether each can run here, and the exact reason and fix when not."""
    from .backends import doctor
    from .profiles import load_profile

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
    from .profiles import list_profiles, load_profile

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
@JSON_OPTION
def compare_cmd(
    report: str, baseline: str, tolerance: float, out_dir: str | None, as_json: bool
) -> None:
    """CI gate: compare a report with a baseline; exit 4 on a latency or fidelity regression."""
    import dataclasses

    from .report import check_regression

    result = check_regression(
        Path(report),
        Path(baseline),
        tolerance=tolerance,
        out_dir=Path(out_dir) if out_dir else None,
    )
    payload = dataclasses.asdict(result)
    text = [
        f"no regression against {baseline} ({result.statistic} at batch {result.batch_size}, "
        f"tolerance {tolerance:.0%})"
    ]
    text += [f"  note: {n}" for n in result.notes]
    _emit(as_json, payload, "\n".join(text))


@cli.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--count", type=int, default=48, show_default=True)
def demo_data_cmd(out_dir: str, count: int) -> None:
    """Write real photos bundled with scikit-image (plus crops/flips) for a download-free demo."""
    from .data import write_demo_images

    paths = write_demo_images(out_dir, count)
    click.echo(f"wrote {len(paths)} images to {out_dir}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors as one line, exit codes per :mod:`dcvit_deploy.errors`."""
    try:
        cli.main(args=argv, prog_name="dcvit-deploy", standalone_mode=False)
    except DcvitError as exc:
        click.echo(f"error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
