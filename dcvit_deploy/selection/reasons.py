"""The one place a :class:`~dcvit_deploy.store.records.Reason` and a budget become words, for
the reports and the console; the decision only builds the records (:func:`failure` here for an
outcome that cannot be selected at all).

A reason starts with its kind's stable prefix (:data:`LABELS`). A figure reads
``p50 4.70 ms +- 0.08 (5 rounds)``, with a margin ``p50 6.10 ms x1.05 = 6.41``; a fit within
noise of the budget ends with ``; within noise of the budget``."""

from __future__ import annotations

import math
from typing import cast

from dcvit_deploy.store.records import (
    CandidateOutcome,
    LatencyBudget,
    Reason,
    ReasonKind,
    Selection,
)

LABELS = {
    "chosen": "chosen", "fits": "fits", "over": "over budget",
    "confirmation_failed": "confirmation failed", "not_confirmed": "not confirmed",
    "not_deployable": "not deployable", "export_failed": "export failed",
    "verify_failed": "verification failed", "build_failed": "build failed",
    "profile_failed": "profile failed", "below_floor": "below floor",
    "not_measured": "not measured", "not_searched": "not measured (bisect)", "recorded": "",
}  # fmt: skip


def ms(value: float) -> str:
    return f"{value:.{2 if abs(value) >= 1.0 else 3}f}"


def ceil_ms(value: float) -> str:
    """``value`` rounded *up* at the precision :func:`ms` prints, so the text still admits it."""
    d = 2 if abs(value) >= 1.0 else 3
    return f"{math.ceil(value * 10**d - 1e-9) / 10**d:.{d}f}"


def figure_text(budget: LatencyBudget, value: float, spread: float = 0.0, rounds: int = 1) -> str:
    """``p50 6.10 ms +- 0.08 (5 rounds) x1.05 = 6.41`` (parts shown when they apply)."""
    text = f"{budget.statistic} {ms(value)} ms"
    if spread > 0 or rounds > 1:
        text += f" +- {ms(spread)}" + (f" ({rounds} rounds)" if rounds > 1 else "")
    if budget.margin > 0:
        text += f" x{1.0 + budget.margin:.2f} = {ms(value * (1.0 + budget.margin))}"
    return text


def budget_text(budget: LatencyBudget) -> str:
    """``5.00 ms`` or, relative, ``5.00 ms (original 6.50 ms / 1.3)``."""
    if budget.relative and budget.reference_ms is not None:
        ref = f"{budget.reference} {ms(budget.reference_ms)} ms / {budget.speedup:g}"
        return f"{ms(budget.ms)} ms ({ref})"
    return f"{ms(budget.ms)} ms"


def budget_summary(budget: LatencyBudget) -> str:
    """``p50 x(1+5%) <= 5.00 ms at batch 1`` (a relative budget names its reference)."""
    return (
        f"{budget.statistic} x(1+{budget.margin * 100:g}%) <= {budget_text(budget)} "
        f"at batch {budget.batch_size}"
    )


def failure(outcome: CandidateOutcome, batch_size: int) -> Reason | None:
    """The reason of an outcome that cannot be selected at all, else ``None``."""
    detail, v, status = outcome.error.strip(), outcome.verification, outcome.status
    if status not in ("ok", "verify_failed"):
        default = "" if status == "not_measured" else "no details"
        return Reason(cast(ReasonKind, status), detail=detail or default)
    if status == "verify_failed" or (v is not None and not v.passed):
        return Reason("verify_failed", detail=detail or (v.reason if v else "") or "no details")
    if outcome.latency_at(batch_size) is None:
        measured = sorted(s.batch_size for s in outcome.latency)
        return Reason("not_measured", values={"batch": batch_size}, detail=str(measured or "none"))
    return None


def render(selection: Selection, name: str) -> str:
    """The words for ``name``'s reason in ``selection``."""
    r = selection.reasons[name]
    v, label = r.values, LABELS[r.kind]
    if r.kind == "recorded":
        return r.detail
    if r.figure is None:
        if r.kind == "not_measured" and "batch" in v:
            text = f"not measured at batch {int(v['batch'])} (measured batches: {r.detail})"
        elif r.kind == "not_confirmed":
            n = int(v["confirmations"])
            text = f"{label}: the search stopped after {n} failed confirmation(s)"
        else:
            text = f"{label}: {r.detail}" if r.detail else label
        return text + (f"; warning: {r.warning}" if r.warning else "")
    budget = r.budget or selection.budget
    expr, limit = figure_text(budget, *r.figure), budget_text(budget)
    if r.kind == "chosen":
        why = f"densest verified candidate within budget (retained {v['retained']:.1%} MACs)"
        if selection.prefer == "fidelity":
            fid = f"fidelity {v['fidelity']:.1%}" if "fidelity" in v else "no fidelity"
            fid += f", KL {v['kl']:.3g}" if "kl" in v else ""
            why = f"highest-fidelity verified candidate within budget ({fid}, retained "
            why += f"{v['retained']:.1%} MACs)"
        text = f"chosen: {why}; {expr} <= {limit}"
        if r.versus:
            text += (f"; {int(v['samples'])} images cannot separate it from {r.versus} (KL "
                     f"{v['kl']:.3g} +- {v['kl_se']:.2g} vs {v['versus_kl']:.3g} +- "
                     f"{v['versus_kl_se']:.2g}): add --holdout images or --eval-data")  # fmt: skip
    elif r.kind == "confirmation_failed":
        text = (f"confirmation failed: re-measured in a fresh process at {expr} > {limit}; "
                "the search continued with the next candidate")  # fmt: skip
    elif r.kind == "fits":
        versus = f"fits, but {r.relation} than chosen {r.versus}" if r.versus else "fits"
        text = f"{versus} ({expr} <= {limit})"
    else:
        text = f"over budget: {expr} > {limit}"
    text += "; within noise of the budget" if r.noise else ""
    if r.dominated_by:
        lat, spr, sib, sib_spr = r.figure[0], r.figure[1], v["sibling_ms"], v["sibling_spread"]
        both = f" beyond both spreads (+-{ms(spr)}, +-{ms(sib_spr)})" if spr or sib_spr else ""
        text = (f"dominated: not faster than larger sibling {r.dominated_by} ({budget.statistic} "
                f"{ms(lat)} ms vs {ms(sib)} ms{both}); {text}")  # fmt: skip
    return text + (f"; warning: {r.warning}" if r.warning else "")
