"""The commands that read and change nothing of a run: ``status``, ``doctor``, ``profiles`` and
``compare`` (the CI gate)."""

from __future__ import annotations

from pathlib import Path

import click

from dcvit_deploy.cli import cli
from dcvit_deploy.cli import options as opt
from dcvit_deploy.cli.console import emit
from dcvit_deploy.errors import OptionError, UserInputError


@cli.command("status")
@opt.OUT
@opt.JSON
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
    emit(as_json, s, "\n".join(lines))


@cli.command("doctor")
@click.option("--profile", help="Check one profile (default: every backend in general).")
@opt.JSON
def doctor_cmd(profile: str | None, as_json: bool) -> None:
    """List backends, whether each can run here, and the exact reason and fix when not."""
    from dcvit_deploy.backends import doctor
    from dcvit_deploy.config.profiles import load_profile

    rows = doctor(load_profile(profile) if profile else None)
    text = "\n".join(
        f"{name:>12}: {'ok' if a.ok else 'unavailable'}  {a.reason}"
        + (f"  (fix: {a.fix})" if a.fix and not a.ok else "")
        for name, a in rows
    )
    emit(as_json, {name: {"ok": a.ok, "reason": a.reason, "fix": a.fix} for name, a in rows}, text)


@cli.command("profiles")
@opt.JSON
def profiles_cmd(as_json: bool) -> None:
    """List the built-in target profiles."""
    from dcvit_deploy.config.profiles import list_profiles, load_profile

    rows = []
    for name in list_profiles():
        p = load_profile(name)
        keys = ("backend", "device", "precision", "batch_sizes", "statistic", "description")
        rows.append({"name": name, **{k: getattr(p, k) for k in keys}})
    text = "\n".join(
        f"{r['name']:>16}  {r['backend']:<12} {r['device']:<5} {r['precision']:<5} "
        f"batches {list(r['batch_sizes'])}  {r['description']}"
        for r in rows
    )
    emit(as_json, {"profiles": rows}, text)


@cli.command("compare")
@click.argument("report", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--baseline",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A stored report.json.",
)
@click.option("--tolerance", default=0.10, help="Allowed latency increase (fraction).")
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), help="Write comparison.json/.md here."
)
@click.option(
    "--allow-other-device",
    is_flag=True,
    help="Compare even when the baseline was measured on another profile, device or runtime.",
)
@opt.JSON
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

    if not 0 < tolerance < float("inf"):
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
    text = [
        f"no regression against {baseline} ({result.statistic} at batch {result.batch_size}, "
        f"tolerance {tolerance:.0%})",
        *(f"  note: {n}" for n in result.notes),
    ]
    emit(as_json, dataclasses.asdict(result), "\n".join(text))
