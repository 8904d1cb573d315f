"""CI comparison of a run's ``report.json`` against a stored baseline: a relative latency
tolerance and a fidelity threshold, never exact numbers; :func:`check_regression` raises
:class:`~dcvit_deploy.errors.RegressionDetected` (exit 4) and writes ``COMPARISON.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcvit_deploy.errors import RegressionDetected, UserInputError
from dcvit_deploy.reports.writers import (
    _md,
    _ms,
    _stat_of,
    _write_json,
    load_report,
    report_outcomes,
)
from dcvit_deploy.selection.decide import capacity_order
from dcvit_deploy.store.atomic import atomic_write_text
from dcvit_deploy.store.records import (
    STATISTICS,
    CandidateOutcome,
    LatencyBudget,
    from_dict,
    to_dict,
)

__all__ = [
    "COMPARISON_KIND",
    "CandidateDelta",
    "ComparisonResult",
    "check_regression",
    "check_same_target",
    "compare_to_baseline",
    "target_of",
    "write_comparison",
]

COMPARISON_KIND = "dcvit-deploy/comparison"


# --------------------------------------------------------------------------- baseline comparison


@dataclass(frozen=True)
class CandidateDelta:
    """One candidate present in both reports: latency ratio and fidelity change."""

    candidate: str
    status: str
    baseline_status: str
    latency_ms: float | None
    baseline_ms: float | None
    ratio: float | None
    fidelity: float | None
    baseline_fidelity: float | None
    fidelity_delta: float | None
    regressed: bool
    note: str = ""


@dataclass(frozen=True)
class ComparisonResult:
    """A report compared to a baseline; ``regressions`` are one-line messages."""

    statistic: str
    batch_size: int
    tolerance: float
    fidelity_tolerance: float
    deltas: tuple[CandidateDelta, ...]
    new: tuple[str, ...]
    missing: tuple[str, ...]
    chosen: str | None
    baseline_chosen: str | None
    regressions: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def regressed(self) -> bool:
        return bool(self.regressions)


def _outcome_stat(o: CandidateOutcome, batch: int, statistic: str) -> float | None:
    return _stat_of(o, batch, statistic) if o.selectable else None


_RUNTIMES = ("onnxruntime", "tensorrt", "torch")


def target_of(report: Mapping[str, Any]) -> dict[str, Any]:
    """What a report's latencies were measured on: the profile (name, backend, precision,
    device), the device (CPU model, GPU name) and the runtime versions."""

    def table(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    env = table(report.get("environment"))
    prof = table(report.get("profile"))
    cuda = table(env.get("cuda"))
    packages = table(env.get("packages"))
    cpu = env.get("cpu")
    return {
        "profile": prof.get("name"),
        "backend": prof.get("backend"),
        "precision": prof.get("precision"),
        "device": prof.get("device"),
        "cpu": table(cpu).get("model") if isinstance(cpu, Mapping) else cpu,
        "gpu": cuda.get("name") if prof.get("device") == "cuda" else None,
        "runtime": {k: packages.get(k) for k in _RUNTIMES if packages.get(k)},
    }


def check_same_target(current: Mapping[str, Any], base: Mapping[str, Any]) -> None:
    """Refuse to compare latencies measured on different targets (one line naming the
    difference); :class:`UserInputError`."""
    now, before = target_of(current), target_of(base)
    diff = [k for k in now if now[k] != before[k]]
    if diff:
        shown = "; ".join(f"{k}: {before[k]} -> {now[k]}" for k in diff[:3])
        raise UserInputError(
            f"the baseline was measured on another target ({shown})",
            "compare reports of the same profile, device and runtime, or pass "
            "--allow-other-device to compare anyway",
        )


def _asked(report: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """The budget a run asked for (``--speedup``, never the milliseconds it derived from its own
    original, or ``--latency-ms``; statistic, batch, margin) and its preference."""
    b = from_dict(LatencyBudget, report["budget"]) if report.get("budget") else None
    asked = () if b is None else (b.speedup, b.reference) if b.relative else (b.ms,)
    prefer = (report.get("selection") or {}).get("prefer")
    return None if b is None else (*asked, b.statistic, b.batch_size, b.margin, prefer)


def compare_to_baseline(
    report: str | os.PathLike[str] | Mapping[str, Any],
    baseline_report: str | os.PathLike[str] | Mapping[str, Any],
    *,
    tolerance: float = 0.10,
    statistic: str | None = None,
    batch_size: int | None = None,
    fidelity_tolerance: float = 0.01,
    allow_other_device: bool = False,
) -> ComparisonResult:
    """Compare ``report`` with ``baseline_report`` (paths, folders or dicts) on the current
    report's statistic and batch (unless given). A candidate regresses when its latency ratio
    exceeds ``1 + tolerance``, its fidelity drops by more than ``fidelity_tolerance``, or it is
    no longer selectable; under the same budget (the same ``--speedup``, not the derived ms),
    choosing nothing or a less dense (``prefer=fidelity``: less faithful) pick regresses too.
    Other changes are notes. Another profile, device or runtime is refused unless
    ``allow_other_device`` (then noted)."""
    if tolerance <= 0 or fidelity_tolerance < 0:
        raise UserInputError(
            "the comparison tolerance must be > 0 and the fidelity tolerance >= 0",
            "pass e.g. --tolerance 0.10",
        )
    current = load_report(report)
    base = load_report(baseline_report)
    target_note = ""
    if allow_other_device:
        try:
            check_same_target(current, base)
        except UserInputError as exc:
            target_note = exc.problem + " (compared anyway: --allow-other-device)"
    else:
        check_same_target(current, base)
    budget, base_budget = _asked(current), _asked(base)
    axis = current.get("axis") or {}
    statistic = statistic or str(axis.get("statistic") or "p50")
    batch = batch_size if batch_size is not None else int(axis.get("batch_size") or 1)
    if statistic not in STATISTICS:
        raise UserInputError(
            f"unknown statistic {statistic!r}", f"use one of {', '.join(STATISTICS)}"
        )
    now = {o.candidate: o for o in report_outcomes(current)}
    before = {o.candidate: o for o in report_outcomes(base)}

    deltas: list[CandidateDelta] = []
    regressions: list[str] = []
    notes: list[str] = []
    for name in [o.candidate for o in capacity_order(now.values())]:
        if name not in before:
            continue
        o, b = now[name], before[name]
        lat, blat = _outcome_stat(o, batch, statistic), _outcome_stat(b, batch, statistic)
        ratio = lat / blat if lat is not None and blat is not None and blat > 0 else None
        fdelta = (
            o.fidelity - b.fidelity if o.fidelity is not None and b.fidelity is not None else None
        )
        problems: list[str] = []
        note = ""
        if b.selectable and not o.selectable:
            problems.append(f"{name}: now {o.status}" + (f" ({o.error})" if o.error else "")
                            + f", was {b.status}")  # fmt: skip
        if ratio is not None and ratio > 1 + tolerance:
            problems.append(
                f"{name}: {statistic} {_ms(lat)} ms vs baseline {_ms(blat)} ms "
                f"(+{(ratio - 1) * 100:.1f}% > {tolerance * 100:g}%)"
            )
        elif ratio is not None and ratio < 1 - tolerance:
            note = f"faster by {(1 - ratio) * 100:.1f}%"
        if fdelta is not None and fdelta < -fidelity_tolerance:
            problems.append(
                f"{name}: fidelity {o.fidelity:.2%} vs baseline {b.fidelity:.2%} "
                f"({fdelta * 100:+.2f} points, limit -{fidelity_tolerance * 100:g})"
            )
        regressions += problems
        deltas.append(
            CandidateDelta(
                candidate=name,
                status=o.status,
                baseline_status=b.status,
                latency_ms=lat,
                baseline_ms=blat,
                ratio=ratio,
                fidelity=o.fidelity,
                baseline_fidelity=b.fidelity,
                fidelity_delta=fdelta,
                regressed=bool(problems),
                note=note,
            )
        )
    new = tuple(sorted(set(now) - set(before)))
    missing = tuple(sorted(set(before) - set(now)))
    if new:
        notes.append(f"new candidates: {', '.join(new)}")
    if missing:
        notes.append(f"candidates missing from this run: {', '.join(missing)}")
    chosen = (current.get("selection") or {}).get("chosen")
    base_chosen = (base.get("selection") or {}).get("chosen")
    same_budget = budget == base_budget
    worse = ""  # under the same budget: nothing chosen, or a pick worse by the preference
    if chosen != base_chosen and same_budget and budget is not None and base_chosen is not None:
        what = "fidelity" if budget[-1] == "fidelity" else "retained"  # the preference
        slack = fidelity_tolerance if what == "fidelity" else 0.0
        b, c = before[base_chosen], now.get(chosen or "")
        if c is None:
            worse = f"no candidate meets the budget any more (the baseline chose {base_chosen})"
        elif (getattr(c, what) or 0.0) < (getattr(b, what) or 0.0) - slack:
            worse = (
                f"chose {chosen} ({what} {getattr(c, what) or 0:.1%}) where the baseline chose "
                f"{base_chosen} ({getattr(b, what) or 0:.1%})"
            )
    if worse:
        regressions.append(worse)
    elif chosen != base_chosen:
        notes.append(f"chosen candidate changed: {base_chosen} -> {chosen}")
    if not same_budget:
        notes.append("the budgets differ between the reports; the choices are not comparable")
    if target_note:
        notes.append(target_note)
    if (statistic, batch) != (axis.get("statistic"), axis.get("batch_size")):
        notes.append(f"compared {statistic} at batch {batch} (not the report's own axis)")
    return ComparisonResult(
        statistic=statistic,
        batch_size=batch,
        tolerance=tolerance,
        fidelity_tolerance=fidelity_tolerance,
        deltas=tuple(deltas),
        new=new,
        missing=missing,
        chosen=chosen,
        baseline_chosen=base_chosen,
        regressions=tuple(regressions),
        notes=tuple(notes),
    )


def _comparison_md(result: ComparisonResult) -> str:
    verdict = (
        f"**REGRESSION** ({len(result.regressions)} finding(s))"
        if result.regressed
        else "**OK**: no regression"
    )
    lines = [
        "# Comparison against baseline",
        "",
        verdict,
        "",
        f"Statistic {result.statistic} at batch {result.batch_size}; latency tolerance "
        f"{result.tolerance * 100:g}%, fidelity tolerance {result.fidelity_tolerance * 100:g} "
        f"points. Chosen: {result.baseline_chosen} -> {result.chosen}.",
    ]
    if result.regressions:
        lines += ["", "## Regressions", ""] + [f"- {_md(r)}" for r in result.regressions]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {_md(n)}" for n in result.notes]
    lines += [
        "",
        "## Candidates",
        "",
        "| candidate | baseline ms | ms | ratio | baseline fidelity | fidelity | status "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in result.deltas:
        fid = [f"{f:.2%}" if f is not None else "-" for f in (d.baseline_fidelity, d.fidelity)]
        verdict_cell = "regressed" if d.regressed else (d.note or "ok")
        lines.append(
            f"| {d.candidate} | {_ms(d.baseline_ms)} | {_ms(d.latency_ms)} | "
            f"{f'{d.ratio:.3f}' if d.ratio is not None else '-'} | {fid[0]} | {fid[1]} | "
            f"{d.baseline_status} -> {d.status} | {verdict_cell} |"
        )
    return "\n".join(lines) + "\n"


def write_comparison(out_dir: str | os.PathLike[str], result: ComparisonResult) -> dict[str, Path]:
    """Write ``comparison.json`` and ``COMPARISON.md`` atomically; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "comparison.json", "markdown": out / "COMPARISON.md"}
    data = to_dict(result)
    data.update(kind=COMPARISON_KIND, regressed=result.regressed)
    _write_json(paths["json"], data)
    atomic_write_text(paths["markdown"], _comparison_md(result))
    return paths


def check_regression(
    report: str | os.PathLike[str] | Mapping[str, Any],
    baseline_report: str | os.PathLike[str] | Mapping[str, Any],
    *,
    tolerance: float = 0.10,
    statistic: str | None = None,
    batch_size: int | None = None,
    fidelity_tolerance: float = 0.01,
    out_dir: str | os.PathLike[str] | None = None,
    allow_other_device: bool = False,
) -> ComparisonResult:
    """CI entry point: compare, write the comparison (when ``out_dir``), and raise
    :class:`RegressionDetected` listing the first findings on a regression."""
    result = compare_to_baseline(
        report,
        baseline_report,
        tolerance=tolerance,
        statistic=statistic,
        batch_size=batch_size,
        fidelity_tolerance=fidelity_tolerance,
        allow_other_device=allow_other_device,
    )
    if out_dir is not None:
        write_comparison(out_dir, result)
    if result.regressed:
        shown = "; ".join(result.regressions[:3])
        more = len(result.regressions) - 3
        if more > 0:
            shown += f"; and {more} more"
        raise RegressionDetected(
            f"{len(result.regressions)} regression(s) against the baseline: {shown}",
            "inspect COMPARISON.md; if the change is intended, replace the baseline with this "
            "report.json",
        )
    return result
