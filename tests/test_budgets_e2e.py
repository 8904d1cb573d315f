"""Budgets end to end on one mixed family (DC-ViT and block dropping): a relative budget
(``--speedup``), ``--prefer fidelity``, and budgets placed between the run's own measured
figures so the choice is really exercised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_pipeline import run_cli
from test_run_trust import PROFILE, copts, dopts

from dcvit_deploy.api import run_pipeline


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, photo_dir) -> tuple[Path, str, dict[str, float], dict]:
    root = tmp_path_factory.mktemp("mixed")
    profile = root / "trust-cpu.toml"
    profile.write_text(PROFILE)
    out = root / "r"
    result = run_pipeline(
        copts(photo_dir, methods=("dcvit", "practise"), targets=(0.25, 0.45)),
        dopts(str(profile)),
        out,
    )
    figures = {o.candidate: o.latency_at(1).p50 for o in result.outcomes if o.latency_at(1)}
    fidelity = {o.candidate: o.fidelity for o in result.outcomes}
    return out, str(profile), figures, fidelity


def select(out: Path, profile: str, *extra: str) -> dict:
    code, text = run_cli(
        ["select", "--out", str(out), "--profile", profile, "--no-confirm", "--json", *extra]
    )
    assert code in (0, 3), text
    return json.loads(text[text.index("{") :])


def test_mixed_family_holds_both_methods(mixed_run):
    _, _, figures, _ = mixed_run
    methods = {n.split("-")[0] for n in figures}
    assert {"original", "dcvit", "practise"} <= methods


def expected(figures: dict[str, float], retained: dict[str, float], ms: float) -> str | None:
    fitting = [n for n in figures if figures[n] <= ms]
    return max(fitting, key=lambda n: (retained[n], n)) if fitting else None


def retained_of(out: Path) -> dict[str, float]:
    report = json.loads((out / "report.json").read_text())
    return {c["candidate"]: c["retained"] for c in report["candidates"]}


def test_relative_budget_between_measured_figures(mixed_run):
    out, profile, figures, _ = mixed_run
    original = figures["original"]
    faster = sorted(v for n, v in figures.items() if v < original)
    if not faster:
        pytest.skip("no compressed candidate measured faster than the original on this machine")
    # a budget half-way between the original and the fastest compressed candidate
    ms = (original + faster[0]) / 2
    speedup = original / ms
    payload = select(out, profile, "--speedup", f"{speedup:.6f}")
    want = expected(figures, retained_of(out), original / float(f"{speedup:.6f}"))
    assert payload["chosen"] == want and want != "original"
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["budget_basis"]["kind"] == "relative"
    assert report["selection"]["budget"]["ms"] == pytest.approx(original / speedup, rel=1e-5)


def test_prefer_fidelity_picks_the_most_faithful_candidate_that_fits(mixed_run):
    out, profile, figures, fidelity = mixed_run
    generous = max(figures.values()) * 2
    payload = select(out, profile, "--latency-ms", f"{generous:.6f}", "--prefer", "fidelity")
    retained = retained_of(out)
    best = max(
        (n for n in figures if fidelity[n] is not None),
        key=lambda n: (fidelity[n], retained[n]),
    )
    assert payload["chosen"] == best
    capacity = select(out, profile, "--latency-ms", f"{generous:.6f}")
    assert capacity["chosen"] == "original"  # the densest, as before


def test_absolute_budget_between_two_measured_figures(mixed_run):
    out, profile, figures, _ = mixed_run
    ordered = sorted(figures.values())
    ms = (ordered[0] + ordered[1]) / 2
    payload = select(out, profile, "--latency-ms", f"{ms:.6f}")
    assert payload["chosen"] == expected(figures, retained_of(out), float(f"{ms:.6f}"))
