"""Budget selection on a busy machine: interleaved rounds + uncertainty + confirmation vs today.

One dense family of a DeiT-Tiny-sized ViT at 224x224 (random init: latency does not depend on
weights; no finetuning) is planned and cut with :mod:`dcvit_deploy.compress` (DC-ViT's
closed-form structure plan, FFN-only blocks at width h'), exported with
:func:`dcvit_deploy.export.onnx.export_onnx` and built for the ``cpu-ort`` profile. Then:

1. **Thread spinning check**: the original under ONNX Runtime with 1 thread, 2 threads
   (``session.intra_op.allow_spinning`` on, ONNX Runtime's default) and 2 threads with
   spinning off -- without and with the background load -- interleaved.
2. **Quiet reference**: every candidate in many interleaved rounds.
3. For each phase, *quiet* and *loaded* (a CPU-burning subprocess pinned to one core, started
   and stopped by this script), and for >= 10 budgets spread across the family's latency
   range (midpoints between neighbouring reference figures, plus one below the fastest and
   one above the slowest):

   * **today**: one measurement per candidate, one after the other (the previous profile's
     loop settings, no dispersion rule), today's decision rule (a candidate not faster than a
     larger sibling is dominated), no confirmation of the choice (its choice is still
     re-measured in a fresh process here, to count how often it would have missed);
   * **new**: :func:`dcvit_deploy.latency.rounds.measure_rounds` with early stop on
     :func:`dcvit_deploy.selection.decide.decisions_clear` for all budgets, more rounds for the
     candidates :func:`~dcvit_deploy.selection.decide.needs_remeasure` names, then
     :func:`~dcvit_deploy.selection.decide.select_confirmed` with a fresh-process confirmation
     (:class:`dcvit_deploy.latency.confirm.FreshProcessConfirm`).

Reported per phase and method: agreement of the choice with the quiet reference, chosen
models whose fresh-process re-measurement meets the budget, candidates wrongly marked dominated
(the reference shows them faster than the sibling named), measurement time.

Writes ``benchmarks/results/selection_under_load.json`` (top-level ``summary``) and ``.md``.
Usage: ``python benchmarks/selection_under_load.py [--work DIR] [--reference-rounds 7]``.
The machine this runs on may be shared: the "quiet" phase is only as quiet as the other
users allow; load averages are recorded for every phase.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from dcvit_deploy.store.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from dcvit_deploy.store.records import (  # noqa: E402
    Artifact,
    CandidateOutcome,
    LatencyBudget,
    LatencyStats,
    MacCount,
    MeasureSettings,
    TargetProfile,
    to_dict,
)

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = (0.07, 0.14, 0.21, 0.28, 0.35, 0.42, 0.49, 0.56)
# The cpu-ort [measure] settings before issue 11 (one pass per candidate, no dispersion rule).
TODAY = MeasureSettings(
    warmup_iters=10,
    warmup_min_s=0.2,
    window_iters=50,
    min_window_s=0.2,
    max_windows=10,
    min_windows=3,
    stability_tolerance=0.10,
    min_duration_s=1.0,
    max_cov=1e9,
)


def latest_for(confirm: Any, name: str, anchor: str) -> LatencyStats:
    """``anchor``'s stats from the latest fresh process that measured ``name`` with it."""
    for group in reversed(confirm.groups):
        if name in group and anchor in group:
            return group[anchor]
    raise KeyError(f"{name!r} and {anchor!r} were never confirmed together")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------- family


def build_family(work: Path, profile: TargetProfile) -> tuple[dict[str, Artifact], dict[str, Any]]:
    """Original + one DC-ViT candidate per target; returns artifacts and per-candidate facts."""
    import timm
    import torch

    from dcvit_deploy.backends import get_backend
    from dcvit_deploy.compress.macs import geometry_of
    from dcvit_deploy.compress.plan import plan_structure
    from dcvit_deploy.compress.recoverability import default_candidate_blocks
    from dcvit_deploy.compress.surgery import (
        apply_spec,
        choose_random,
        compress_blocks,
        identity_spec,
    )
    from dcvit_deploy.export.onnx import export_onnx

    torch.manual_seed(0)
    name = "deit_tiny_patch16_224"
    teacher = timm.create_model(name, pretrained=False).eval()
    geom = geometry_of(teacher)
    base = identity_spec(teacher, name, {})
    depth = base.depth
    blocks = default_candidate_blocks(depth)
    hidden_base = base.base_mlp_hidden
    models: dict[str, Any] = {"original": teacher}
    specs = {"original": base}
    for t in TARGETS:
        plan = plan_structure(geom, depth, t, max_blocks=len(blocks))
        chosen = blocks[len(blocks) - plan.n_blocks :]  # late blocks first, as DC-ViT tends to

        def chooser(b: int, h: int) -> tuple[int, ...]:
            return choose_random(hidden_base, h, seed=0, block=b)

        spec = compress_blocks(base, chosen, plan.hidden, chooser)
        models[f"dcvit-{round(t * 1000):04d}"] = apply_spec(teacher, spec).eval()
        specs[f"dcvit-{round(t * 1000):04d}"] = spec
    backend = get_backend(profile.backend)
    artifacts: dict[str, Artifact] = {}
    facts: dict[str, Any] = {}
    base_macs = geom.count(base.blocks)
    for cand, model in models.items():
        onnx_path = work / f"{cand}.onnx"
        if not onnx_path.is_file():
            t0 = time.perf_counter()
            export_onnx(model, onnx_path, input_shape=(3, 224, 224))
            log(f"exported {cand} in {time.perf_counter() - t0:.1f} s")
        artifacts[cand] = backend.build(onnx_path, profile, work / "artifacts", candidate=cand)
        macs: MacCount = geom.count(specs[cand].blocks)  # equal to the built model's count
        facts[cand] = {
            "macs": dataclasses.asdict(macs),
            "retained": macs.linear_norm / base_macs.linear_norm,
        }
    return artifacts, facts


def outcome(name: str, facts: dict[str, Any], stats: LatencyStats) -> CandidateOutcome:
    macs = MacCount(**facts[name]["macs"])
    return CandidateOutcome(
        candidate=name,
        method="original" if name == "original" else "dcvit",
        retained=facts[name]["retained"],
        macs=macs,
        status="ok",
        latency=(stats,),
    )


# --------------------------------------------------------------------------- background load


class Burner:
    """A bounded CPU-burning subprocess pinned to one core (the last usable one)."""

    def __init__(self, seconds: float) -> None:
        cores = sorted(os.sched_getaffinity(0))
        self.core = cores[-1]
        code = (
            "import os, time\n"
            f"os.sched_setaffinity(0, {{{self.core}}})\n"
            f"end = time.time() + {seconds}\n"
            f"parent = {os.getpid()}\n"
            "x = 0\n"
            "while time.time() < end and os.getppid() == parent:  # bounded; dies with us\n"
            "    x = (x * 3 + 1) % 1000003\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(1.0)  # let it start burning before anything is measured

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- spinning check


def spinning_check(
    onnx_path: Path, seconds_per: float = 1.0, rounds: int = 5
) -> list[dict[str, Any]]:
    """Median latency of the original with 1 thread, 2 spinning, 2 not spinning, quiet and
    loaded; configurations interleaved in ``rounds`` rounds, each a fresh session."""
    import numpy as np
    import onnxruntime as ort

    configs = [
        ("1 thread", 1, True),
        ("2 threads, spinning", 2, True),
        ("2 threads, no spin", 2, False),
    ]
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    rows = []
    for loaded in (False, True):
        burner = Burner(120) if loaded else None
        try:
            per: dict[str, list[float]] = {c[0]: [] for c in configs}
            samples: dict[str, list[float]] = {c[0]: [] for c in configs}
            load_start = load1()
            for r in range(rounds):
                for label, threads, spin in configs[r % 3 :] + configs[: r % 3]:
                    so = ort.SessionOptions()
                    so.intra_op_num_threads = threads
                    so.inter_op_num_threads = 1
                    so.add_session_config_entry(
                        "session.intra_op.allow_spinning", "1" if spin else "0"
                    )
                    sess = ort.InferenceSession(
                        str(onnx_path), so, providers=["CPUExecutionProvider"]
                    )
                    name = sess.get_inputs()[0].name
                    for _ in range(5):
                        sess.run(None, {name: x})
                    ts: list[float] = []
                    t_end = time.perf_counter() + seconds_per
                    while time.perf_counter() < t_end or len(ts) < 10:
                        t0 = time.perf_counter()
                        sess.run(None, {name: x})
                        ts.append((time.perf_counter() - t0) * 1000.0)
                    per[label].append(statistics.median(ts))
                    samples[label].extend(ts)
            for label, threads, spin in configs:
                xs = samples[label]
                mean = statistics.fmean(xs)
                rows.append(
                    {
                        "load": "background burner on 1 core" if loaded else "no burner",
                        "config": label,
                        "intra_op_num_threads": threads,
                        "allow_spinning": spin,
                        "median_ms": round(statistics.median(per[label]), 3),
                        "round_medians_ms": [round(v, 3) for v in per[label]],
                        "cov": round(statistics.pstdev(xs) / mean, 3),
                        "load_avg_1min": [load_start, load1()],
                    }
                )
                log(f"spin check {rows[-1]}")
        finally:
            if burner is not None:
                burner.stop()
    return rows


# --------------------------------------------------------------------------- methods


def order_violations(p50: dict[str, float], retained: dict[str, float]) -> list[tuple[str, str]]:
    """Pairs ``(denser, smaller)`` where the smaller candidate measured slower (of the 36
    pairs of 9 candidates): every cut in this family removes work, so a sound measurement
    has none, or only near-ties."""
    order = sorted(p50, key=lambda n: -retained[n])
    return [(a, b) for i, a in enumerate(order) for b in order[i + 1 :] if p50[b] > p50[a]]


def old_dominated(outs: Sequence[CandidateOutcome]) -> dict[str, str]:
    """Today's rule: dominated when not faster than the fastest strictly larger sibling."""
    from dcvit_deploy.selection.decide import capacity_order

    out: dict[str, str] = {}
    best: tuple[float, str] | None = None
    for o in capacity_order(outs):
        lat = o.latency[0].p50
        if best is not None and best[0] <= lat:
            out[o.candidate] = best[1]
        if best is None or lat < best[0]:
            best = (lat, o.candidate)
    return out


def wrongly_dominated(marked: dict[str, str], ref: dict[str, float]) -> list[str]:
    """Marked dominated although the reference shows them faster than the named sibling."""
    return sorted(n for n, sib in marked.items() if ref[n] < ref[sib])


def today_single_pass(
    backend: Any, artifacts: dict[str, Artifact], profile: TargetProfile, order: Sequence[str]
) -> tuple[dict[str, LatencyStats], float]:
    prof = dataclasses.replace(profile, measure=TODAY)
    t0 = time.perf_counter()
    out = {}
    for name in order:
        out[name] = backend.measure(artifacts[name], prof, 1)
        log(
            f"  today {name}: p50 {out[name].p50:.3f} ms, CoV {out[name].cov:.1%}, stable {out[name].stable}"
        )
    return out, time.perf_counter() - t0


def new_method(
    backend: Any,
    artifacts: dict[str, Artifact],
    profile: TargetProfile,
    facts: dict[str, Any],
    specs: Sequence[BudgetSpec],
    raw_dir: Path,
    seed: int,
) -> tuple[dict[str, LatencyStats], float, dict[str, Any]]:
    from dcvit_deploy.latency.rounds import measure_rounds
    from dcvit_deploy.selection.decide import needs_remeasure

    base = [outcome(n, facts, _placeholder()) for n in artifacts]

    def budgets(outs: Sequence[CandidateOutcome]) -> list[LatencyBudget]:
        return [make_budget(spec, outs) for spec in specs]

    def with_latency(table: dict[str, tuple[LatencyStats, ...]]) -> list[CandidateOutcome]:
        return [
            dataclasses.replace(o, latency=table[o.candidate]) if o.candidate in table else o
            for o in base
        ]

    t0 = time.perf_counter()
    result = measure_rounds(backend, artifacts, profile, raw_dir=raw_dir, seed=seed)
    first_rounds = result.rounds
    table = result.estimates()
    outs = with_latency(table)
    noisy = sorted({n for b in budgets(outs) for n in needs_remeasure(outs, b)})
    if noisy:  # as the select unit does: the within-noise candidates again, max_rounds rounds
        log(f"  re-measuring within noise: {noisy}")
        again = measure_rounds(
            backend,
            {n: artifacts[n] for n in noisy},
            profile,
            seed=seed + 1,
            min_rounds=profile.measure.max_rounds,
            max_rounds=profile.measure.max_rounds,
        )
        table.update(again.estimates())
    seconds = time.perf_counter() - t0
    info = {
        "first_pass_rounds": first_rounds,
        "stopped_early": result.stopped_early,
        "remeasured": noisy,
        "remeasure_rounds": profile.measure.max_rounds if noisy else 0,
    }
    return {n: table[n][0] for n in artifacts}, seconds, info


@dataclasses.dataclass(frozen=True)
class BudgetSpec:
    """``absolute``: ``value`` ms. ``relative``: ``value`` is the speed-up over the original
    as measured by the method itself in the same phase (``--speedup``)."""

    kind: str
    value: float


def make_budget(spec: BudgetSpec, outs: Sequence[CandidateOutcome]) -> LatencyBudget:
    from dcvit_deploy.selection.decide import relative_budget

    if spec.kind == "absolute":
        return LatencyBudget(ms=spec.value, statistic="p50", batch_size=1)
    original = next(o for o in outs if o.candidate == "original").latency[0]
    return relative_budget(spec.value, original, statistic="p50", batch_size=1)


def _placeholder() -> LatencyStats:
    from dcvit_deploy.latency.loop import summarize

    return summarize([1.0], batch_size=1, scope="host", timer="none")


def run_phase(
    label: str,
    backend: Any,
    artifacts: dict[str, Artifact],
    profile: TargetProfile,
    facts: dict[str, Any],
    specs: Sequence[BudgetSpec],
    reference: Sequence[str | None],
    ref_p50: dict[str, float],
    raw_dir: Path,
    seed: int,
) -> dict[str, Any]:
    from dcvit_deploy.latency.confirm import FreshProcessConfirm
    from dcvit_deploy.selection.decide import capacity_order, decide, dominated, select_confirmed

    load_start = load1()
    order = [
        o.candidate for o in capacity_order([outcome(n, facts, _placeholder()) for n in artifacts])
    ]
    log(f"{label}: today's single pass")
    today_stats, today_s = today_single_pass(backend, artifacts, profile, order)
    log(f"{label}: interleaved rounds")
    new_stats, new_s, info = new_method(
        backend, artifacts, profile, facts, specs, raw_dir / label, seed
    )
    confirm = FreshProcessConfirm(
        artifacts, profile, 1, anchor="original", min_rounds=3, max_rounds=3
    )
    today_outs = [
        outcome(n, facts, dataclasses.replace(today_stats[n], window_medians=())) for n in order
    ]
    new_outs = [outcome(n, facts, new_stats[n]) for n in order]
    rows = []
    for spec, ref_choice in zip(specs, reference, strict=True):
        tb = make_budget(spec, today_outs)
        nb = make_budget(spec, new_outs)
        # Today: the densest candidate that fits, no re-measurement, no confirmation (its
        # choice is re-measured in a fresh process here only to count misses).
        t_sel = decide(today_outs, tb)
        t_conf = None
        t_check = tb
        if t_sel.chosen is not None:
            # Judged like the new method's confirmation: a relative budget is re-derived from
            # the original re-measured in the same fresh process.
            asked = [t_sel.chosen] + (["original"] if spec.kind == "relative" else [])
            got = confirm(asked)
            t_conf = got[t_sel.chosen].p50
            if spec.kind == "relative":
                t_check = make_budget(spec, [outcome(n, facts, st) for n, st in got.items()])
        first = decide(new_outs, nb)
        sel = select_confirmed(new_outs, nb, confirm)
        n_conf = sel.confirmed[sel.chosen][0] if sel.chosen is not None else None
        n_check = nb
        if spec.kind == "relative" and "original" in sel.confirmed and sel.chosen is not None:
            n_check = make_budget(
                spec, [outcome("original", facts, latest_for(confirm, sel.chosen, "original"))]
            )
        rows.append(
            {
                "kind": spec.kind,
                "value": round(spec.value, 4),
                "reference": ref_choice,
                "today_budget_ms": round(tb.ms, 3),
                "today": t_sel.chosen,
                "today_confirmed_ms": t_conf,
                "today_meets": None if t_conf is None else t_conf <= t_check.ms,
                "today_confirm_budget_ms": round(t_check.ms, 3),
                "new_budget_ms": round(nb.ms, 3),
                "new_first": first.chosen,
                "new": sel.chosen,
                "new_confirmed_ms": n_conf,
                "new_meets": None if n_conf is None else n_conf <= n_check.ms,
                "new_confirm_budget_ms": round(n_check.ms, 3),
                "uncertain": list(first.uncertain),
                "notes": list(sel.notes),
            }
        )
        log(
            f"  {spec.kind} {spec.value:.3f}: ref {ref_choice} today {t_sel.chosen} "
            f"new {first.chosen} -> {sel.chosen}"
        )
    today_dom = old_dominated(today_outs)
    new_dom = dominated(new_outs, 1, "p50")

    def agree(key: str, kind: str) -> float:
        sub = [r for r in rows if r["kind"] == kind]
        return sum(r[key] == r["reference"] for r in sub) / len(sub)

    def frac(key: str, meets: str, kind: str) -> float:
        chosen = [r for r in rows if r["kind"] == kind and r[key] is not None]
        return sum(1 for r in chosen if r[meets]) / len(chosen) if chosen else 1.0

    return {
        "label": label,
        "load_avg_1min": {"start": load_start, "end": load1()},
        "today": {
            "p50_ms": {n: round(s.p50, 4) for n, s in today_stats.items()},
            "cov": {n: round(s.cov, 3) for n, s in today_stats.items()},
            "stable": {n: s.stable for n, s in today_stats.items()},
            "seconds": round(today_s, 1),
            "agreement": {k: agree("today", k) for k in KINDS},
            "confirmed_fraction": {k: frac("today", "today_meets", k) for k in KINDS},
            "dominated": today_dom,
            "wrongly_dominated": wrongly_dominated(today_dom, ref_p50),
        },
        "new": {
            "p50_ms": {n: round(s.p50, 4) for n, s in new_stats.items()},
            "spread_ms": {n: round(s.spread_ms, 4) for n, s in new_stats.items()},
            "rounds": {n: s.rounds for n, s in new_stats.items()},
            "cov": {n: round(s.cov, 3) for n, s in new_stats.items()},
            "stable": {n: s.stable for n, s in new_stats.items()},
            "measure_seconds": round(new_s, 1),
            "confirm_seconds": round(confirm.seconds, 1),
            "confirm_processes": confirm.calls,
            "confirmed_p50_ms": {n: round(s.p50, 4) for n, s in confirm.latest.items()},
            "confirm_groups": [{n: round(s.p50, 4) for n, s in g.items()} for g in confirm.groups],
            **info,
            "agreement": {k: agree("new", k) for k in KINDS},
            "first_choice_agreement": {k: agree("new_first", k) for k in KINDS},
            "confirmed_fraction": {k: frac("new", "new_meets", k) for k in KINDS},
            "dominated": new_dom,
            "wrongly_dominated": wrongly_dominated(new_dom, ref_p50),
            "time_vs_today": round(new_s / today_s, 2) if today_s > 0 else math.inf,
        },
        "budgets": rows,
    }


KINDS = ("relative", "absolute")


def report_parts(ref_p50: dict[str, float], phases: dict[str, Any]) -> dict[str, dict[str, float]]:
    parts = {"reference": ref_p50}
    for key, label in (("quiet", "quiet"), ("loaded", "under_load")):
        parts[f"today_{label}"] = phases[key]["today"]["p50_ms"]
        parts[f"new_{label}"] = phases[key]["new"]["p50_ms"]
    return parts


def add_order_violations(
    summary: dict[str, Any], parts: dict[str, dict[str, float]], retained: dict[str, float]
) -> None:
    """``order_violations_<part>``: candidate pairs whose figures contradict capacity order."""
    for name, p50 in parts.items():
        summary[f"order_violations_{name}"] = len(order_violations(p50, retained))


# --------------------------------------------------------------------------- report


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    s = report["summary"]
    ref = report["reference"]
    lines = [
        "# Budget selection under load (CPU ONNX Runtime, DeiT-Tiny-sized family at 224)",
        "",
        f"{report['family']['description']}. Profile `cpu-ort` "
        f"({report['profile']['backend_options'].get('intra_op_num_threads')} intra-op thread, "
        f"p50 at batch 1). CPU: {report['environment']['cpu']['model']}, "
        f"{report['environment']['cpu']['count_usable']} usable cores.",
        "",
        "Budgets: 10 relative ones (`--speedup`: the original's figure *measured by the method "
        "itself in the same phase* divided by a speed-up) and the same 10 as absolute "
        "milliseconds, both derived from the quiet reference (midpoints between neighbouring "
        "candidates, one below the fastest, one above the slowest). On a shared machine whose "
        "speed drifts by tens of percent over minutes, absolute budgets mostly test the drift; "
        "relative ones test the ordering bias issue 11 is about.",
        "",
        "**The machine was shared** with other users' tests and benchmarks while this ran: the "
        '"quiet" phase is only the phase without *our* burner; 1-minute load averages are '
        "listed per phase. Honest numbers from a noisy machine, not a lab.",
        "",
        "## Summary",
        "",
        "| | target | today (single pass) | new (rounds + uncertainty + confirmation) |",
        "|---|---|---:|---:|",
        f"| agreement with quiet reference, quiet (relative budgets) | - | "
        f"{s['today_agreement_quiet']:.0%} | {s['agreement_quiet']:.0%} |",
        f"| agreement with quiet reference, under load (relative budgets) | >= 90% | "
        f"{s['today_agreement_under_load']:.0%} | **{s['agreement_under_load']:.0%}** |",
        f"| agreement, quiet / under load, absolute budgets (ms) | - | "
        f"{s['today_agreement_quiet_absolute']:.0%} / "
        f"{s['today_agreement_under_load_absolute']:.0%} | "
        f"{s['agreement_quiet_absolute']:.0%} / {s['agreement_under_load_absolute']:.0%} |",
        f"| chosen models meeting the budget in a fresh process, quiet | all | "
        f"{s['today_confirmed_fraction_quiet']:.0%} | {s['confirmed_fraction_quiet']:.0%} |",
        f"| chosen models meeting the budget in a fresh process, under load | all | "
        f"{s['today_confirmed_fraction_under_load']:.0%} | "
        f"**{s['confirmed_fraction_under_load']:.0%}** |",
        f"| wrongly marked dominated (quiet / load) | 0 | {s['today_wrongly_dominated_quiet']} / "
        f"{s['today_wrongly_dominated_under_load']} | {s['wrongly_dominated_quiet']} / "
        f"{s['wrongly_dominated_under_load']} |",
        f"| candidate pairs measured in the wrong order, of 36 (quiet / load; reference: "
        f"{s.get('order_violations_reference', '-')}) | - | "
        f"{s.get('order_violations_today_quiet', '-')} / "
        f"{s.get('order_violations_today_under_load', '-')} | "
        f"{s.get('order_violations_new_quiet', '-')} / "
        f"{s.get('order_violations_new_under_load', '-')} |",
        f"| measurement time, quiet (s) | <= 2x today | {s['today_seconds_quiet']} | "
        f"{s['new_seconds_quiet']} ({s['time_ratio_quiet']}x) |",
        f"| measurement time, under load (s) | <= 2x today | {s['today_seconds_under_load']} | "
        f"{s['new_seconds_under_load']} ({s['time_ratio_under_load']}x) |",
        f"| fresh-process confirmation time, quiet / load (s) | - | - | "
        f"{s['confirm_seconds_quiet']} / {s['confirm_seconds_under_load']} |",
        "",
        f"Targets met: {', '.join(k for k, v in s['targets_met'].items() if v) or 'none'}; "
        f"missed: {', '.join(k for k, v in s['targets_met'].items() if not v) or 'none'}.",
        "",
        "## Quiet reference",
        "",
        f"{ref['rounds']} interleaved rounds per candidate ({ref['seconds']} s, load "
        f"{ref['load_avg_1min']['start']} -> {ref['load_avg_1min']['end']}).",
        "",
        "| candidate | retained MACs | reference p50 ms | spread | quiet: today | quiet: new | "
        "load: today | load: new (spread, rounds) | load: fresh process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    q, ld = report["phases"]["quiet"], report["phases"]["loaded"]
    for n in ref["p50_ms"]:
        lines.append(
            f"| {n} | {report['family']['retained'][n]:.1%} | {ref['p50_ms'][n]:.2f} | "
            f"{ref['spread_ms'][n]:.2f} | {q['today']['p50_ms'][n]:.2f} | "
            f"{q['new']['p50_ms'][n]:.2f} | {ld['today']['p50_ms'][n]:.2f} | "
            f"{ld['new']['p50_ms'][n]:.2f} (+-{ld['new']['spread_ms'][n]:.2f}, "
            f"{ld['new']['rounds'][n]}) | "
            + (
                f"{ld['new']['confirmed_p50_ms'][n]:.2f}"
                if n in ld["new"]["confirmed_p50_ms"]
                else "-"
            )
            + " |"
        )
    for key in ("quiet", "loaded"):
        ph = report["phases"][key]
        lines += [
            "",
            f"## Phase: {key} (load {ph['load_avg_1min']['start']} -> {ph['load_avg_1min']['end']})",
            "",
            f"Today: {ph['today']['seconds']} s, dominated {ph['today']['dominated'] or '{}'} "
            f"(wrong: {ph['today']['wrongly_dominated'] or 'none'}). New: "
            f"{ph['new']['first_pass_rounds']} rounds (stopped early: {ph['new']['stopped_early']}), "
            f"re-measured {ph['new']['remeasured'] or 'none'}, {ph['new']['measure_seconds']} s "
            f"+ {ph['new']['confirm_seconds']} s in {ph['new']['confirm_processes']} fresh "
            f"process(es); dominated {ph['new']['dominated'] or '{}'} "
            f"(wrong: {ph['new']['wrongly_dominated'] or 'none'}).",
            "",
            "| budget | reference | today: budget ms, choice, in fresh process | "
            "new: budget ms, first choice -> confirmed choice, in fresh process | within noise |",
            "|---|---|---|---|---|",
        ]
        for r in ph["budgets"]:

            def ms(v: float | None, ok: bool | None) -> str:
                return "-" if v is None else f"{v:.2f} {'ok' if ok else 'MISS'}"

            lines.append(
                f"| {'x' if r['kind'] == 'relative' else ''}{r['value']:.3g}"
                f"{'' if r['kind'] == 'relative' else ' ms'} | {r['reference']} | "
                f"{r['today_budget_ms']:.1f}: {r['today']}, "
                f"{ms(r['today_confirmed_ms'], r['today_meets'])} | "
                f"{r['new_budget_ms']:.1f}: {r['new_first']} -> {r['new']}, "
                f"{ms(r['new_confirmed_ms'], r['new_meets'])} | "
                f"{', '.join(r['uncertain']) or '-'} |"
            )
    spin = report["spinning"]
    if spin:
        lines += [
            "",
            "## ONNX Runtime threads and spinning (the original, interleaved rounds)",
            "",
            "| load | configuration | median ms | per round | CoV |",
            "|---|---|---:|---|---:|",
        ]
        for r in spin:
            lines.append(
                f"| {r['load']} | {r['config']} | {r['median_ms']:.2f} | "
                f"{', '.join(f'{v:.2f}' for v in r['round_medians_ms'])} | {r['cov']:.1%} |"
            )
    if report.get("discussion"):
        lines += ["", "## Discussion", ""] + [f"- {item}" for item in report["discussion"]]
    lines += [
        "",
        f"Generated by `benchmarks/selection_under_load.py` in {report['wall_seconds']:.0f} s.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="keep ONNX files here (reused)")
    ap.add_argument("--reference-rounds", type=int, default=14)
    ap.add_argument("--skip-spinning", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the JSON")
    args = ap.parse_args(argv)
    if args.markdown_only:
        import json

        path = args.out / "selection_under_load.json"
        report = json.loads(path.read_text())
        retained = report["family"]["retained"]
        parts = report_parts(report["reference"]["p50_ms"], report["phases"])
        add_order_violations(report["summary"], parts, retained)
        atomic_write_json(path, report)
        write_markdown(args.out / "selection_under_load.md", report)
        return 0

    import torch

    torch.set_num_threads(1)
    from dcvit_deploy.backends import get_backend
    from dcvit_deploy.config.profiles import load_profile
    from dcvit_deploy.latency.machine import capture_environment
    from dcvit_deploy.latency.rounds import measure_rounds
    from dcvit_deploy.selection.decide import decide

    t_start = time.perf_counter()
    profile = load_profile("cpu-ort")
    backend = get_backend(profile.backend)
    tmp = tempfile.TemporaryDirectory(prefix="dcvit-sul-")
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    raw_dir = Path(tmp.name) / "raw"
    log(f"building the family (load {load1()})")
    artifacts, facts = build_family(work, profile)

    spinning = [] if args.skip_spinning else spinning_check(work / "original.onnx")

    log(f"quiet reference: {args.reference_rounds} rounds (load {load1()})")
    ref_load = load1()
    ref_prof = dataclasses.replace(
        profile, measure=dataclasses.replace(profile.measure, round_windows=1)
    )
    ref = measure_rounds(
        backend,
        artifacts,
        ref_prof,
        raw_dir=raw_dir / "reference",
        seed=args.seed + 100,
        min_rounds=args.reference_rounds,
        max_rounds=args.reference_rounds,
        progress=log,
    )
    ref_stats = {n: ref.at(n, 1) for n in artifacts}
    ref_p50 = {n: s.p50 for n, s in ref_stats.items()}
    lat = sorted(set(ref_p50.values()))
    cuts = [lat[0] * 0.97] + [(a + b) / 2 for a, b in itertools.pairwise(lat)] + [lat[-1] * 1.03]
    ref_orig = ref_p50["original"]
    specs = [BudgetSpec("relative", ref_orig / c) for c in cuts] + [
        BudgetSpec("absolute", c) for c in cuts
    ]
    ref_outs = [outcome(n, facts, s) for n, s in ref_stats.items()]
    reference = [decide(ref_outs, make_budget(spec, ref_outs)).chosen for spec in specs]

    phases: dict[str, Any] = {}
    phases["quiet"] = run_phase(
        "quiet", backend, artifacts, profile, facts, specs, reference, ref_p50, raw_dir, args.seed
    )
    burner = Burner(1800)
    try:
        phases["loaded"] = run_phase(
            "loaded",
            backend,
            artifacts,
            profile,
            facts,
            specs,
            reference,
            ref_p50,
            raw_dir,
            args.seed + 1,
        )
    finally:
        burner.stop()

    q, ld = phases["quiet"], phases["loaded"]
    R, A = "relative", "absolute"
    summary = {
        # Primary figures: budgets relative to the original measured in the same phase
        # (--speedup), the way a CI job on a shared runner states its budget.
        "agreement_under_load": ld["new"]["agreement"][R],
        "confirmed_fraction_under_load": ld["new"]["confirmed_fraction"][R],
        "agreement_quiet": q["new"]["agreement"][R],
        "confirmed_fraction_quiet": q["new"]["confirmed_fraction"][R],
        "first_choice_agreement_under_load": ld["new"]["first_choice_agreement"][R],
        # The same with absolute budgets (ms from the reference): machine drift included.
        "agreement_under_load_absolute": ld["new"]["agreement"][A],
        "agreement_quiet_absolute": q["new"]["agreement"][A],
        "confirmed_fraction_under_load_absolute": ld["new"]["confirmed_fraction"][A],
        "confirmed_fraction_quiet_absolute": q["new"]["confirmed_fraction"][A],
        "wrongly_dominated_quiet": len(q["new"]["wrongly_dominated"]),
        "wrongly_dominated_under_load": len(ld["new"]["wrongly_dominated"]),
        "new_seconds_quiet": q["new"]["measure_seconds"],
        "new_seconds_under_load": ld["new"]["measure_seconds"],
        "confirm_seconds_quiet": q["new"]["confirm_seconds"],
        "confirm_seconds_under_load": ld["new"]["confirm_seconds"],
        "today_seconds_quiet": q["today"]["seconds"],
        "today_seconds_under_load": ld["today"]["seconds"],
        "time_ratio_quiet": q["new"]["time_vs_today"],
        "time_ratio_under_load": ld["new"]["time_vs_today"],
        "today_agreement_quiet": q["today"]["agreement"][R],
        "today_agreement_under_load": ld["today"]["agreement"][R],
        "today_agreement_quiet_absolute": q["today"]["agreement"][A],
        "today_agreement_under_load_absolute": ld["today"]["agreement"][A],
        "today_confirmed_fraction_quiet": q["today"]["confirmed_fraction"][R],
        "today_confirmed_fraction_under_load": ld["today"]["confirmed_fraction"][R],
        "today_wrongly_dominated_quiet": len(q["today"]["wrongly_dominated"]),
        "today_wrongly_dominated_under_load": len(ld["today"]["wrongly_dominated"]),
        "budgets_per_kind": len(cuts),
        "candidates": len(artifacts),
    }
    retained = {n: f["retained"] for n, f in facts.items()}
    add_order_violations(summary, report_parts(ref_p50, phases), retained)
    summary["targets_met"] = {
        "agreement_under_load>=0.9": summary["agreement_under_load"] >= 0.9,
        "every_confirmed_choice_meets_budget": summary["confirmed_fraction_under_load"] == 1.0
        and summary["confirmed_fraction_quiet"] == 1.0,
        "no_wrongly_dominated": summary["wrongly_dominated_quiet"] == 0
        and summary["wrongly_dominated_under_load"] == 0,
        "time<=2x_today": summary["time_ratio_quiet"] <= 2.0
        and summary["time_ratio_under_load"] <= 2.0,
    }
    report = {
        "schema": 1,
        "benchmark": "selection_under_load",
        "summary": summary,
        "family": {
            "description": f"deit_tiny_patch16_224 (random init, 224x224) + DC-ViT candidates at "
            f"MAC-reduction targets {', '.join(f'{t:.0%}' for t in TARGETS)} (FFN-only late "
            "blocks at the planned width, no finetuning)",
            "retained": {n: f["retained"] for n, f in facts.items()},
            "macs": {n: f["macs"] for n, f in facts.items()},
        },
        "profile": to_dict(profile),
        "today_settings": to_dict(TODAY),
        "reference": {
            "rounds": ref.rounds,
            "round_windows": 1,
            "seconds": round(ref.seconds, 1),
            "load_avg_1min": {"start": ref_load, "end": load1()},
            "p50_ms": {n: round(s.p50, 4) for n, s in ref_stats.items()},
            "spread_ms": {n: round(s.spread_ms, 4) for n, s in ref_stats.items()},
            "round_p50_ms": {
                n: [round(v, 3) for v in s.round_medians] for n, s in ref_stats.items()
            },
            "budgets": [dataclasses.asdict(spec) for spec in specs],
            "choices": list(reference),
        },
        "phases": phases,
        "spinning": spinning,
        "burner": "python busy loop pinned to one core (sched_setaffinity), started and stopped by this script",
        "environment": capture_environment(cuda=False),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "selection_under_load.json", report)
    write_markdown(args.out / "selection_under_load.md", report)
    log(f"wrote {args.out / 'selection_under_load.json'} and .md")
    tmp.cleanup()
    return 0 if all(summary["targets_met"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
