"""What the commands print: a result as text or JSON on stdout, notes on stderr, the progress
display of long work."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from typing import Any

import click

_LIVE: list[Any] = []  # progress displays to close before the command's last lines print


def progress(as_json: bool) -> Any:
    """The progress callback of a command: none with ``--json`` (stdout is the result)."""
    from dcvit_deploy.progress import ConsoleProgress, quiet

    if as_json:
        return quiet
    _LIVE.append(ConsoleProgress())
    return _LIVE[-1]


def close_progress() -> None:
    while _LIVE:
        _LIVE.pop().close()


def emit(as_json: bool, payload: Any, text: str) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str) if as_json else text)


def warn(notes: Iterable[object], shown: Collection[str] = ()) -> None:
    """Notes that do not stop a run, on stderr (stdout stays clean for --json), except those
    already ``shown`` (by the up-front checks)."""
    for line in map(str, notes):
        if line and line not in shown:
            click.echo(f"note: {line}", err=True)


def result_payload(result: Any) -> dict[str, Any]:
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
        "notes": [str(n) for n in result.notes],
        "skipped_images": [str(n) for n in result.skipped_images],
        "fleet": result.fleet,
    }


def _text(result: Any) -> str:
    sel, lines = result.selection, []
    if sel is not None:
        from dcvit_deploy.selection.reasons import budget_summary, render

        lines.append(f"budget: {budget_summary(sel.budget)}")
        lines.append(f"chosen: {sel.chosen or 'none'}")
        lines += [f"  {name}: {render(sel, name)}" for name in sel.reasons]
    lines += [f"{t}: {row['chosen'] or 'none'} ({row['why']})" for t, row in result.fleet.items()]
    if result.triton:
        lines.append(f"triton repository: {result.triton}")
    lines += [f"{k}: {v}" for k, v in result.reports.items()]
    return "\n".join(lines)


def finish(result: Any, as_json: bool, shown: Collection[str] = ()) -> None:
    """Print a job's result and the notes not ``shown`` yet; raise what made it fail: nothing
    fits (3), or the pick was not published (5)."""
    close_progress()
    warn(result.notes, shown)
    emit(as_json, result_payload(result), _text(result))
    for failure in (result.infeasible, result.not_published):
        if failure is not None:
            raise failure
