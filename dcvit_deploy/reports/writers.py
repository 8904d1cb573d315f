"""Run reports: JSON, CSV, Markdown and a plot.

:func:`write_reports` writes, atomically, into one folder:

``report.json``
    The complete, machine-readable record: schema version, run metadata, environment,
    target profile, budget, every candidate's outcome (``records.to_dict``, so
    ``records.from_dict`` rebuilds them), the selection with its reasons, the Pareto front.
``candidates.csv``
    One row per candidate, densest first (columns: :data:`CSV_COLUMNS`); latency columns are
    at the budget's batch size.
``SUMMARY.md``
    What was chosen and why, the budget definition, and a table of all candidates.
``pareto.png``
    Latency vs retained MACs, fidelity as colour, precision as marker, budget line, chosen
    point highlighted
    (matplotlib, imported lazily, rendered with the Agg canvas -- no display needed).

Comparing two reports for CI lives in :mod:`dcvit_deploy.reports.compare`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dcvit_deploy import __version__
from dcvit_deploy.selection.decide import capacity_order, dominated, infeasible_error, pareto_front
from dcvit_deploy.selection.reasons import render
from dcvit_deploy.store.atomic import atomic_write_text, atomic_write_with
from dcvit_deploy.store.records import (
    SCHEMA_VERSION,
    CandidateOutcome,
    LatencyBudget,
    Selection,
    Statistic,
    from_dict,
    read_json,
    to_dict,
)

__all__ = [
    "CSV_COLUMNS",
    "REPORT_KIND",
    "load_report",
    "report_outcomes",
    "write_reports",
]

REPORT_KIND = "dcvit-deploy/report"

CSV_COLUMNS: tuple[str, ...] = (
    "candidate",
    "method",
    "retained",
    "macs_linear_norm",
    "macs_full",
    "params",
    "precision",
    "status",
    "selectable",
    "fidelity",
    "trained",
    "measured_on",
    "fidelity_low",
    "fidelity_high",
    "kl",
    "top1",
    "verify_passed",
    "max_abs",
    "max_rel",
    "cosine",
    "top1_agreement",
    "finite",
    "batch_size",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "throughput_per_s",
    "cov",
    "stable",
    "chosen",
    "pareto",
    "reason",
)


# --------------------------------------------------------------------------- helpers


def _jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats as ``None``/``"inf"``, unknown objects as ``str``."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def _num(value: float | int | None, digits: int = 6) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "" if math.isnan(value) else str(value)
    return f"{value:.{digits}g}"


def _ms(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _md(text: str) -> str:
    """Make ``text`` safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _stat_of(outcome: CandidateOutcome, batch_size: int, statistic: str) -> float | None:
    stats = outcome.latency_at(batch_size)
    if stats is None:
        return None
    value = stats.stat(statistic)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- what to show


@dataclass(frozen=True)
class _View:
    """The axis every table and plot uses, and the decision (absent without a budget)."""

    batch: int
    statistic: str
    budget: LatencyBudget | None
    selection: Selection | None
    front: frozenset[str]

    @property
    def chosen(self) -> str | None:
        return self.selection.chosen if self.selection else None

    def reason(self, name: str) -> str:
        sel = self.selection
        return render(sel, name) if sel and name in sel.reasons else ""


def _view(
    outcomes: Sequence[CandidateOutcome],
    selection: Selection | None,
    profile: Mapping[str, Any],
) -> _View:
    statistic: str
    if selection is not None:
        batch, statistic = selection.budget.batch_size, selection.budget.statistic
    else:
        measured = sorted({s.batch_size for o in outcomes for s in o.latency})
        batch = int(profile.get("budget_batch_size") or (measured[0] if measured else 1))
        statistic = str(profile.get("statistic") or "p50")
    front = frozenset(o.candidate for o in pareto_front(outcomes, batch, statistic))
    return _View(batch, statistic, selection.budget if selection else None, selection, front)


# --------------------------------------------------------------------------- report.json


def _report_dict(
    run_meta: Mapping[str, Any],
    outcomes: Sequence[CandidateOutcome],
    view: _View,
    profile_dict: Mapping[str, Any],
    env_dict: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "kind": REPORT_KIND,
        "generator": f"dcvit-deploy {__version__}",
        "run": dict(run_meta),
        "environment": dict(env_dict),
        "profile": dict(profile_dict),
        "axis": {"batch_size": view.batch, "statistic": view.statistic},
        "budget": to_dict(view.budget) if view.budget else None,
        "selection": to_dict(view.selection) if view.selection else None,
        "candidates": [to_dict(o) for o in capacity_order(outcomes)],
        "pareto_front": [
            o.candidate for o in capacity_order(outcomes) if o.candidate in view.front
        ],
        "dominated": dominated(outcomes, view.batch, view.statistic),
    }


@dataclass(frozen=True)
class _Axis:
    batch_size: int
    statistic: Statistic


@dataclass(frozen=True)
class ReportFile:
    """The layout of ``report.json`` its readers rely on, checked whenever one is read."""

    kind: Literal["dcvit-deploy/report"]
    candidates: tuple[CandidateOutcome, ...]
    axis: _Axis
    profile: dict[str, Any]
    environment: dict[str, Any]
    budget: LatencyBudget | None = None
    selection: Selection | None = None


def load_report(
    source: str | os.PathLike[str] | Mapping[str, Any], what: str = "report"
) -> dict[str, Any]:
    """A ``report.json`` as a dict (from a path, a folder holding it, or an already loaded dict),
    checked against :class:`ReportFile`: one :class:`UserInputError` naming the file and the
    problem when it is missing, not a report, of another schema or of another structure
    (``what`` it is for: "report", "baseline report")."""
    if isinstance(source, Mapping):
        from_dict(ReportFile, dict(source))
        return dict(source)
    path = Path(source) / "report.json" if Path(source).is_dir() else Path(source)
    fix = "pass a report.json written by this version of dcvit-deploy"
    return read_json(path, ReportFile, what=what, fix=fix)


def report_outcomes(report: Mapping[str, Any]) -> list[CandidateOutcome]:
    """The candidates' outcomes stored in a report, as records."""
    return [from_dict(CandidateOutcome, c) for c in report["candidates"]]


# --------------------------------------------------------------------------- CSV


def _csv_text(outcomes: Sequence[CandidateOutcome], view: _View) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for o in capacity_order(outcomes):
        v, c = o.verification, o.closeness
        s = o.latency_at(view.batch)
        writer.writerow(
            {
                "candidate": o.candidate,
                "method": o.method,
                "retained": _num(o.retained),
                "macs_linear_norm": o.macs.linear_norm,
                "macs_full": o.macs.full,
                "params": o.macs.params,
                "precision": o.precision,
                "status": o.status,
                "selectable": _num(o.selectable),
                "fidelity": _num(o.fidelity),
                "trained": _num(o.trained),
                "measured_on": o.measured_on,
                "fidelity_low": _num(c.interval[0]) if c else "",
                "fidelity_high": _num(c.interval[1]) if c else "",
                "kl": _num(c.kl) if c else "",
                "top1": _num(c.top1) if c else "",
                "verify_passed": _num(v.passed) if v else "",
                "max_abs": _num(v.max_abs) if v else "",
                "max_rel": _num(v.max_rel) if v else "",
                "cosine": _num(v.cosine) if v else "",
                "top1_agreement": _num(v.top1_agreement) if v else "",
                "finite": _num(v.finite) if v else "",
                "batch_size": view.batch,
                "mean_ms": _num(s.mean) if s else "",
                "p50_ms": _num(s.p50) if s else "",
                "p90_ms": _num(s.p90) if s else "",
                "p95_ms": _num(s.p95) if s else "",
                "p99_ms": _num(s.p99) if s else "",
                "throughput_per_s": _num(s.throughput) if s else "",
                "cov": _num(s.cov) if s else "",
                "stable": _num(s.stable) if s else "",
                "chosen": _num(o.candidate == view.chosen),
                "pareto": _num(o.candidate in view.front),
                "reason": view.reason(o.candidate),
            }
        )
    return buf.getvalue()


# --------------------------------------------------------------------------- SUMMARY.md


def _budget_rows(
    view: _View, profile: Mapping[str, Any], outcomes: Sequence[CandidateOutcome]
) -> list[tuple[str, str]]:
    scopes = sorted({s.scope for o in outcomes for s in o.latency if s.batch_size == view.batch})
    scope = str(profile.get("scope") or (", ".join(scopes) if scopes else "unknown"))
    precisions = sorted({o.artifact.precision for o in outcomes if o.artifact is not None})
    precision = ", ".join(precisions) or str(profile.get("precision") or "unknown")
    budget = view.budget
    rows: list[tuple[str, str]] = []
    if budget is None:
        rows.append(("budget", "none given: candidates measured, nothing selected"))
    else:
        guard = (
            f"{budget.margin * 100:g}% (admit when {budget.statistic} x {1 + budget.margin:.2f} "
            f"<= {_ms(budget.ms)} ms)"
            if budget.margin
            else f"none (admit when {budget.statistic} <= {_ms(budget.ms)} ms)"
        )
        rows.append(("budget", f"{_ms(budget.ms)} ms"))
        rows.append(("margin", guard))
    rows += [
        ("statistic", view.statistic),
        ("batch size", str(view.batch)),
        ("scope", scope),
        ("precision", precision),
    ]
    for key in ("name", "backend", "device", "gpu"):
        if profile.get(key):
            rows.append((f"target {key}", str(profile[key])))
    return rows


def _fidelity_cell(o: CandidateOutcome) -> str:
    c = o.closeness
    if c is None:
        return f"{o.fidelity:.1%}" if o.fidelity is not None else "-"
    top1 = f"; top-1 {c.top1:.1%}" if c.top1 is not None else ""
    return f"{c.agreement:.1%} [{c.interval[0]:.1%}, {c.interval[1]:.1%}], KL {c.kl:.3g}{top1}"


def _headline(outcomes: Sequence[CandidateOutcome], view: _View) -> list[str]:
    if view.selection is None or view.budget is None:
        return ["**No latency budget was given**: every candidate was measured; none selected."]
    budget = view.budget
    chosen = next((o for o in outcomes if o.candidate == view.chosen), None)
    if chosen is None:
        return [
            "**No candidate meets the budget.**",
            "",
            infeasible_error(view.selection, outcomes).one_line(),
        ]
    lat = _stat_of(chosen, view.batch, view.statistic)
    fidelity = f", fidelity {_fidelity_cell(chosen)}" if chosen.fidelity is not None else ""
    return [
        f"**Chosen: `{chosen.candidate}`** ({chosen.method}, {chosen.precision or '-'}) -- "
        f"retains {chosen.retained:.1%} of the original MACs{fidelity}; {view.statistic} "
        f"{_ms(lat)} ms at batch {view.batch} against a budget of {_ms(budget.ms)} ms.",
        "",
        f"Why: {view.reason(chosen.candidate)}",
    ]


def _summary_text(
    run_meta: Mapping[str, Any],
    outcomes: Sequence[CandidateOutcome],
    view: _View,
    profile: Mapping[str, Any],
    env: Mapping[str, Any],
    files: Iterable[str],
) -> str:
    title = run_meta.get("name") or run_meta.get("model") or run_meta.get("run_dir") or "run"
    lines = [f"# dcvit-deploy report: {title}", "", *_headline(outcomes, view)]
    if any(o.closeness is not None and o.closeness.on_training for o in outcomes):
        lines[2:2] = ["**Fidelity was measured on TRAINING images** (none was left out).", ""]
    if view.selection is not None:
        lines += [
            "",
            f"Search: {view.selection.search} ({len(view.selection.measured)} of "
            f"{len(outcomes)} candidates measured).",
        ]
    lines += ["", "## Budget", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_md(v)} |" for k, v in _budget_rows(view, profile, outcomes)]
    lines += [
        "",
        "## Candidates (densest first)",
        "",
        "| candidate | method | precision | retained MACs | GMACs (linear+norm / full) "
        f"| params (M) | status | fidelity [95%] | trained | {view.statistic} ms measured on "
        "| p99 ms | throughput/s | stable | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in capacity_order(outcomes):
        s = o.latency_at(view.batch)
        name = f"**{o.candidate}**" if o.candidate == view.chosen else o.candidate
        if o.candidate in view.front:
            name += " (pareto)"
        cells = [
            name,
            _md(o.method),
            o.precision or "-",
            f"{o.retained:.1%}",
            f"{o.macs.linear_norm / 1e9:.3f} / {o.macs.full / 1e9:.3f}",
            f"{o.macs.params / 1e6:.2f}",
            o.status,
            _fidelity_cell(o),
            "yes" if o.trained else "no",
            f"{_ms(s.stat(view.statistic))} ({o.measured_on})" if s else "-",
            _ms(s.p99) if s else "-",
            f"{s.throughput:.1f}" if s else "-",
            ("yes" if s.stable else "**no**") if s else "-",
            _md(view.reason(o.candidate)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    warnings: list[str] = []
    for o in capacity_order(outcomes):
        for s in o.latency:
            parts = ([] if s.stable else ["unstable measurement"]) + list(s.warnings)
            if parts:
                warnings.append(f"`{o.candidate}` batch {s.batch_size}: {'; '.join(parts)}")
    if view.selection is not None:
        for name, reason in view.selection.reasons.items():
            if reason.warning:
                warnings.append(f"`{name}`: warning: {reason.warning}")
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {_md(w)}" for w in warnings]
    notes = [str(n) for n in run_meta.get("notes") or ()]
    superseded = list(run_meta.get("superseded") or ())
    if superseded:
        notes.append(
            "superseded (no longer in the family, never selectable): " + ", ".join(superseded)
        )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {_md(n)}" for n in notes]
    env_rows = [(k, v) for k, v in env.items() if isinstance(v, (str, int, float, bool))]
    if env_rows:
        lines += ["", "## Environment", "", "| key | value |", "|---|---|"]
        lines += [f"| {_md(str(k))} | {_md(str(v))} |" for k, v in env_rows]
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- pareto.png


def _plot(path: Path, outcomes: Sequence[CandidateOutcome], view: _View) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [
        (o.retained * 100, v, o)
        for o in capacity_order(outcomes)
        if o.selectable and (v := _stat_of(o, view.batch, view.statistic)) is not None
    ]
    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlabel("retained MACs (% of original, linear+norm)")
    ax.set_ylabel(f"{view.statistic} latency at batch {view.batch} (ms)")
    hidden = len(outcomes) - len(points)
    ax.set_title(
        f"{view.statistic} latency vs capacity"
        + (f" ({hidden} failed/unmeasured not shown)" if hidden else "")
    )
    scored = [(x, y, o) for x, y, o in points if o.fidelity is not None]
    unscored = [(x, y) for x, y, o in points if o.fidelity is None]
    sc = None
    for i, prec in enumerate(sorted({o.precision for _, _, o in scored})):  # a marker each
        pts = [(x, y, o.fidelity or 0.0) for x, y, o in scored if o.precision == prec]
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts],
                        cmap="viridis", vmin=0, vmax=1, s=36, zorder=3, marker="os^Dv"[i % 5],
                        edgecolors="k", linewidths=0.4, label=prec or None)  # fmt: skip
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="fidelity (top-1 agreement)")
    if unscored:
        ax.scatter([p[0] for p in unscored], [p[1] for p in unscored], c="0.5", s=36, zorder=3)
    front = [(x, y) for x, y, o in points if o.candidate in view.front]
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", c="0.3", lw=1, zorder=2,
                label="Pareto front")  # fmt: skip
    label_all = len(points) <= 30
    for x, y, o in points:
        if label_all or o.candidate in view.front or o.candidate == view.chosen:
            text = o.candidate + (f" ({o.fidelity:.0%})" if o.fidelity is not None else "")
            ax.annotate(text, (x, y), xytext=(7, 6), textcoords="offset points", fontsize=7)
        if o.candidate == view.chosen:
            ax.scatter([x], [y], s=260, facecolors="none", edgecolors="crimson", linewidths=2,
                       zorder=4, label=f"chosen: {o.candidate}")  # fmt: skip
    if not points:
        ax.text(0.5, 0.5, "no measured candidate", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    budget = view.budget
    if budget is not None:
        ax.axhline(budget.ms, color="crimson", lw=1, label=f"budget {_ms(budget.ms)} ms")
        if budget.margin:
            ax.axhline(budget.ms / (1 + budget.margin), color="crimson", ls="--", lw=1,
                       label=f"admit threshold (margin {budget.margin * 100:g}%)")  # fmt: skip
    ax.margins(x=0.12, y=0.1)  # room for the labels of the extreme points
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


# --------------------------------------------------------------------------- write_reports


def write_reports(
    out_dir: str | os.PathLike[str],
    *,
    run_meta: Mapping[str, Any],
    outcomes: Iterable[CandidateOutcome],
    selection: Selection | None,
    profile_dict: Mapping[str, Any],
    env_dict: Mapping[str, Any],
    plot: bool = True,
) -> dict[str, Path]:
    """Write ``report.json``, ``candidates.csv``, ``SUMMARY.md`` and ``pareto.png``.

    Returns ``{"json", "csv", "summary", "plot"}`` -> path (``plot`` absent when
    ``plot=False``). Every file is written atomically. An infeasible selection
    (``chosen=None``) is reported, not raised; ``selection=None`` (no budget) reports the
    measurements at the profile's ``budget_batch_size``/``statistic``. Raises ``ValueError``
    (a caller bug) for duplicate names, a selection without a reason for some outcome, or a
    chosen candidate that is not among the outcomes.
    """
    items = list(outcomes)
    names = {o.candidate for o in items}
    if len(names) != len(items):
        raise ValueError("write_reports needs unique candidate names")
    if selection is not None:
        missing = names - set(selection.reasons)
        if missing:
            raise ValueError(f"the selection has no reason for {sorted(missing)}")
        if selection.chosen is not None and selection.chosen not in names:
            raise ValueError(f"chosen candidate {selection.chosen!r} is not among the outcomes")
    view = _view(items, selection, profile_dict)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "csv": out / "candidates.csv",
        "summary": out / "SUMMARY.md",
    }
    if plot:
        paths["plot"] = out / "pareto.png"
    _write_json(paths["json"], _report_dict(run_meta, items, view, profile_dict, env_dict))
    atomic_write_text(paths["csv"], _csv_text(items, view))
    if plot:
        _plot(paths["plot"], items, view)
    files = [p.name for p in paths.values()]
    summary = _summary_text(run_meta, items, view, profile_dict, env_dict, files)
    atomic_write_text(paths["summary"], summary)
    return paths
