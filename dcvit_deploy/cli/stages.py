"""The commands over an existing run (``--out``): ``export``, ``build``, ``profile``,
``select`` / ``triton`` and ``report``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import click

from dcvit_deploy.cli import cli
from dcvit_deploy.cli import options as opt
from dcvit_deploy.cli.console import close_progress, emit, finish, progress, result_payload
from dcvit_deploy.errors import OptionError


def _outcome_line(o: Any) -> str:
    v = o.verification
    check = (
        f"cosine {v.cosine:.6f} top-1 {v.top1_agreement:.1%} max|d| {v.max_abs:.2e}" if v else ""
    )
    built = f"artifact {Path(o.artifact.path).name}" if o.artifact else ""
    status = "exported" if o.status == "not_measured" else o.status
    return f"{o.candidate:>16}  {status}  {check}  {built}  {o.error}".rstrip()


def _stage_command(until: Literal["export", "build", "profile"], doc: str) -> None:
    @cli.command(until, help=doc)
    @opt.STAGE
    def command(**kw: Any) -> None:
        from dcvit_deploy.api import stage_over_run

        dopts, console = opt.deploy_options(kw), progress(kw["as_json"])
        result = stage_over_run(kw["out"], dopts, until=until, progress=console)
        if until == "profile" and result.selection is not None:
            finish(result, kw["as_json"])
            return
        close_progress()
        lines = "\n".join(_outcome_line(o) for o in result.outcomes)
        emit(kw["as_json"], result_payload(result), lines)


_stage_command("export", "Export every candidate of a run to ONNX and verify it against PyTorch.")
_stage_command(
    "build", "Build the profile's artifact (TensorRT engine / ORT session) for every candidate."
)
_stage_command(
    "profile",
    "Measure every candidate's latency on the profile (and select if --latency-ms is given).",
)


def _select(**kw: Any) -> None:
    from dcvit_deploy.api import select_over_run

    given = kw["profile"] is not None
    result = select_over_run(kw["out"], opt.deploy_options(kw), profile_given=given)
    finish(result, kw["as_json"])


cli.command(
    "select",
    help="Select from measured outcomes under a budget; write the Triton repository and reports.",
)(opt.STAGE(_select))
cli.command(
    "triton",
    help="(Re)write the Triton model repository for the candidate selected under the budget.",
)(opt.STAGE(_select))


@cli.command("report", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@opt.OUT
@click.option("--profile", help="Whose reports (default: the profile last measured).")
@opt.JSON
@click.pass_context
def report_cmd(ctx: click.Context, out: str, profile: str | None, as_json: bool) -> None:
    """Rewrite report.json, candidates.csv, SUMMARY.md and pareto.png from what a run recorded
    (its outcomes, choice and publication); decides and publishes nothing."""
    from dcvit_deploy.api import report_over_run

    if ctx.args:
        raise OptionError(
            f"`report` only writes the reports of what the run recorded; it takes no {ctx.args[0]}",
            "decide under a budget with `dcvit-deploy select --out RUN ...` (it writes them too)",
        )
    paths = {k: str(v) for k, v in report_over_run(out, profile).items()}
    emit(as_json, paths, "\n".join(f"{k}: {v}" for k, v in paths.items()))
