"""The commands that start a run: ``compress`` (the whole job), ``family`` (compression only),
``demo`` (``compress`` on the embedded default) and ``demo-data``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dcvit_deploy.cli import cli
from dcvit_deploy.cli import options as opt
from dcvit_deploy.cli.console import emit, finish, progress, warn
from dcvit_deploy.errors import OptionError


@cli.command("compress")
@opt.MODEL
@opt.DATA
@opt.COMPRESS
@opt.BUDGET
@opt.DEPLOY
@opt.RUN
@opt.EXECUTOR
@opt.DRY_RUN
def compress_cmd(**kw: Any) -> None:
    """The whole job: compress, export/verify, build, profile, select, Triton + reports."""
    _compress_or_family(kw, deploy=True)


@cli.command("family")
@opt.MODEL
@opt.DATA
@opt.COMPRESS
@opt.RUN
@opt.EXECUTOR
@opt.DRY_RUN
def family_cmd(**kw: Any) -> None:
    """Compression only: the dense candidate family (safetensors + JSON specs) in RUN/family."""
    _compress_or_family(kw, deploy=False)


def _compress_or_family(kw: dict[str, Any], *, deploy: bool) -> None:
    """Check everything up front (:func:`dcvit_deploy.config.validate.validate_run`), then run, or
    with ``--dry-run`` print the plan and stop."""
    from dcvit_deploy.config.options import DeployOptions
    from dcvit_deploy.config.validate import validate_run

    copts = opt.compress_options(kw)
    dopts = opt.deploy_options(kw) if deploy else DeployOptions()
    out, as_json = kw["out"], kw["as_json"]
    if kw["ray_address"] and kw["executor"] != "ray":
        raise OptionError("--ray-address needs --executor ray", "add --executor ray or drop it")
    stages = ("compress", "deploy") if deploy else ("compress",)
    checked = validate_run(copts, dopts, out, stages=stages, executor=kw["executor"])
    if not (kw["dry_run"] and as_json):
        warn(checked.notes)
    if kw["dry_run"]:
        _print_plan(checked, copts.data, dopts.speedup, out, as_json)
        return
    from dcvit_deploy import api
    from dcvit_deploy.pipeline.executor import make_executor

    console = progress(as_json)  # notes are said once, at the end
    result = api.run_pipeline(
        copts,
        dopts,
        out,
        overwrite=kw["overwrite"],
        resume=kw["resume"],
        progress=lambda ev: None if ev.stage == "note" else console(ev),
        stop_after="deploy" if deploy else "family",
        checked=checked,  # what validate_run established: nothing is loaded or planned twice
        executor=make_executor(kw["executor"], kw["ray_address"], kw["task_cpus"]),
    )
    if deploy:
        finish(result, as_json, checked.notes)
        return
    warn(result.notes, checked.notes)
    from dcvit_deploy.compress.family import load_family

    rows: list[dict[str, Any]] = [
        {"name": c.name, "reduction": round(c.reduction, 4), "macs": c.macs.linear_norm,
         "macs_full": c.macs.full, "params": c.macs.params}
        for c in load_family(Path(out) / "family")
    ]  # fmt: skip
    text = [
        f"{r['name']:>16}  -{r['reduction']:6.1%} MACs  {r['macs'] / 1e6:9.1f} M"
        f"  {r['params'] / 1e6:7.2f} M params"
        for r in rows
    ]
    emit(as_json, {"family": rows}, "\n".join(text))


def _print_plan(v: Any, data: str, speedup: float | None, out: str, as_json: bool) -> None:
    """What ``--dry-run`` established: the model, images, profile, budget and plan."""
    import dataclasses

    facts, where = v.model, Path(out).expanduser().absolute()
    model = ("name", "model_kwargs", "depth", "input_size", "patch_size", "candidate_blocks",
             "feasible")  # fmt: skip
    payload = {
        "dry_run": True,
        "out": str(where),
        "model": {k: getattr(facts, k) for k in model},
        "images": v.image_count,
        "profile": v.profile.name if v.profile else None,
        "budget": dataclasses.asdict(v.budget) if v.budget else None,
        "speedup": speedup,
        "plan": [dataclasses.asdict(p) for p in v.plan],
        "notes": list(v.notes),
    }
    (c, h, w), (lo, hi) = facts.input_size, facts.feasible
    lines = [
        "dry run: every check passed; nothing was done",
        f"model: {facts.name} (depth {facts.depth}, input {c}x{h}x{w}, "
        f"patch {facts.patch_size[0]}x{facts.patch_size[1]})",
        f"images: {v.image_count} in {data}",
        f"candidate blocks: {', '.join(map(str, facts.candidate_blocks))} "
        f"(DC-ViT reaches {lo:.2%}..{hi:.2%} MAC reduction)",
    ]
    if v.profile is not None:
        from dcvit_deploy.selection.reasons import budget_summary

        budget = "none (measure only)"
        if v.budget is not None:
            budget = budget_summary(v.budget)
        elif speedup is not None:
            budget = f"at least {speedup}x faster than the original"
        lines.append(f"profile: {v.profile.name}; budget: {budget}")
    lines += [f"run directory: {where}", "plan (target -> structure):"]
    emit(as_json, payload, "\n".join([*lines, *(f"  {p.describe()}" for p in v.plan)]))


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
    compress_cmd.main(args, "dcvit-deploy demo", standalone_mode=False, show_default=True)


demo_cmd.help = f"{demo_cmd.help}\n\nThe demo's settings: {' '.join(DEMO_ARGS)}"


@cli.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--count", default=48)
def demo_data_cmd(out_dir: str, count: int) -> None:
    """Write real photos bundled with scikit-image (plus crops/flips) for a download-free demo."""
    from dcvit_deploy.config.validate import check_writable_dir
    from dcvit_deploy.model.images import write_demo_images

    check_writable_dir(out_dir, "demo-data DIR")
    click.echo(f"wrote {len(write_demo_images(out_dir, count))} images to {out_dir}")
