"""Report test inputs shared by the report, CLI and validation tests: a family of outcomes
(one dominated, one failing verification, one not exported, one unstable) and its reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dcvit_deploy.reports.writers import write_reports
from dcvit_deploy.selection.decide import decide
from dcvit_deploy.store.records import (
    Artifact,
    CandidateOutcome,
    LatencyBudget,
    LatencyStats,
    MacCount,
    Verification,
)

BUDGET = LatencyBudget(ms=5.0, statistic="p50", batch_size=1, margin=0.05)
PROFILE = {
    "name": "cpu-ort",
    "backend": "onnxruntime",
    "device": "cpu",
    "precision": "fp32",
    "scope": "host",
    "statistic": "p50",
    "budget_batch_size": 1,
}
ENV = {"python": "3.11.9", "cpu": "test cpu", "gpu": {"name": "none"}}


def stats(batch: int, p50: float, *, stable: bool = True) -> LatencyStats:
    return LatencyStats(
        batch_size=batch, iterations=200, mean=p50 * 1.01, std=p50 * 0.03, cov=0.03,
        min=p50 * 0.9, max=p50 * 1.5, p50=p50, p90=p50 * 1.04, p95=p50 * 1.06, p99=p50 * 1.1,
        throughput=1000.0 * batch / p50, scope="host", timer="perf_counter", windows=3,
        window_medians=(p50, p50, p50), stable=stable, warmup_iters=10, duration_s=1.2,
        warnings=() if stable else ("windows disagree by 14%",),
    )  # fmt: skip


def outcome(
    name: str,
    retained: float,
    p50: float | None,
    *,
    fidelity: float | None = 0.95,
    status: str = "ok",
    passed: bool = True,
    stable: bool = True,
) -> CandidateOutcome:
    macs = int(4.6e9 * retained)
    return CandidateOutcome(
        candidate=name,
        method="dcvit" if retained < 1 else "original",
        retained=retained,
        macs=MacCount(linear_norm=macs, full=int(macs * 1.04), params=int(22e6 * retained)),
        status=status,  # type: ignore[arg-type]
        verification=Verification(
            max_abs=2e-5 if passed else 0.4, max_rel=1e-4, cosine=0.99999 if passed else 0.7,
            top1_agreement=1.0 if passed else 0.5, finite=True, passed=passed, samples=16,
            reason="" if passed else "cosine 0.7000 < 0.9990",
        )
        if status in ("ok", "verify_failed")
        else None,
        latency=(stats(1, p50, stable=stable), stats(8, p50 * 5)) if p50 is not None else (),
        fidelity=fidelity,
        artifact=Artifact(
            candidate=name, backend="onnxruntime", path=f"{name}.onnx", sha256="ab" * 32,
            precision="fp32", input_name="input", output_name="logits",
            input_shape=(1, 3, 224, 224), build_seconds=1.5, meta={"opset": 17},
        )
        if p50 is not None
        else None,
        error="" if status == "ok" else "synthetic failure",
    )  # fmt: skip


def family() -> list[CandidateOutcome]:
    return [
        outcome("c100", 1.0, 6.10, fidelity=1.0),
        outcome("c80", 0.8, 4.70, fidelity=0.97, stable=False),
        outcome("c70", 0.7, 4.90, fidelity=0.96),  # dominated by c80
        outcome("c60", 0.6, 1.0, fidelity=0.93, passed=False),
        outcome("c50", 0.5, None, fidelity=None, status="export_failed"),
        outcome("c40", 0.4, 3.00, fidelity=0.88),
    ]


def write(
    tmp: Path,
    outs: list[CandidateOutcome],
    budget: LatencyBudget = BUDGET,
    prefer: str = "capacity",
) -> dict[str, Any]:
    selection = decide(outs, budget, prefer=prefer)  # type: ignore[arg-type]
    paths = write_reports(
        tmp, run_meta={"name": "demo", "seed": 0}, outcomes=outs, selection=selection,
        profile_dict=PROFILE, env_dict=ENV,
    )  # fmt: skip
    return {"paths": paths, "selection": selection}
