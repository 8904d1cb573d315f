"""Budgets end to end on one mixed family (DC-ViT and block dropping), on the scripted backend:
real artifacts and verification, scripted figures, so every budget and every choice is exact.
A relative budget (``--speedup``), ``--prefer fidelity``, absolute budgets between the figures,
Triton versions, and the fresh-process confirmation overturning a pick."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fakes.runs import (
    SCRIPTED_PROFILE,
    copts,
    copy_of_run,
    dopts,
    first_json,
    named,
    served,
)
from fakes.runs import run_cli_text as run_cli

from dcvit_deploy.api import run_pipeline

# p50 at batch 1 (ms). Densest first: original, practise-2359 (1 block dropped), dcvit-2505,
# dcvit-4512, practise-4718 (2 blocks dropped).
RUN = {
    "original": 5.0,
    "practise-2359": 4.2,
    "dcvit-2505": 3.6,
    "dcvit-4512": 3.0,
    "practise-4718": 2.4,
}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, photo_dir, latency_script) -> tuple[Path, str]:
    latency_script.write(RUN)
    root = tmp_path_factory.mktemp("mixed")
    profile = root / "test-cpu.toml"
    profile.write_text(SCRIPTED_PROFILE.replace("[1, 2]", "[1]"))
    out = root / "r"
    run_pipeline(
        copts(photo_dir, methods=("dcvit", "practise"), targets=(0.25, 0.45)),
        dopts(str(profile)),
        out,
    )
    return out, str(profile)


def select(out: Path, profile: str, *extra: str, code: int = 0, confirm: bool = False) -> dict:
    """``select --json`` on the run; asserts the exit code; the JSON payload."""
    flags = [] if confirm else ["--no-confirm"]
    got, text = run_cli(["select", "--out", str(out), "--profile", profile, "--json", *flags,
                         *extra])  # fmt: skip
    assert got == code, text
    return first_json(text)


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_mixed_family_holds_both_methods_at_the_scripted_figures(mixed_run):
    out, _ = mixed_run
    short = named(out)
    assert set(short) == set(RUN)
    by_retained = sorted(report(out)["candidates"], key=lambda c: -c["retained"])
    assert [c["candidate"] for c in by_retained] == [short[k] for k in RUN]  # densest first
    figures = {c["candidate"]: c["latency"][0]["p50"] for c in report(out)["candidates"]}
    assert figures == {short[k]: v for k, v in RUN.items()}


def test_relative_budget_between_measured_figures(mixed_run):
    """--speedup 1.25: 5.0 / 1.25 = 4.0 ms; practise-2359 (4.2) misses, dcvit-2505 (3.6), the
    densest of those that fit, is chosen."""
    out, profile = mixed_run
    payload = select(out, profile, "--speedup", "1.25")
    assert payload["chosen"] == named(out)["dcvit-2505"]
    rep = report(out)
    assert rep["run"]["budget_basis"]["kind"] == "relative"
    budget = rep["selection"]["budget"]
    assert budget["reference"] == "original" and budget["reference_ms"] == 5.0
    assert budget["ms"] == pytest.approx(4.0, rel=1e-12)


def test_prefer_fidelity_picks_the_most_faithful_candidate_that_fits(mixed_run):
    """The most faithful: the lowest KL to the original of the built artifact's outputs."""
    out, profile = mixed_run
    rep = report(out)
    fidelity = {c["candidate"]: -c["closeness"]["kl"] for c in rep["candidates"]}
    retained = {c["candidate"]: c["retained"] for c in rep["candidates"]}
    payload = select(out, profile, "--latency-ms", "10", "--prefer", "fidelity")
    assert payload["chosen"] == max(fidelity, key=lambda n: (fidelity[n], retained[n]))
    # 3.3 ms admits only the two smallest: the more faithful of them
    small = [named(out)["dcvit-4512"], named(out)["practise-4718"]]
    payload = select(out, profile, "--latency-ms", "3.3", "--prefer", "fidelity")
    assert payload["chosen"] == max(small, key=lambda n: (fidelity[n], retained[n]))


@pytest.mark.parametrize(
    ("ms", "want"),
    [("2.5", "practise-4718"), ("4.5", "practise-2359")],
)
def test_absolute_budget_between_two_measured_figures(mixed_run, ms, want):
    """Each budget lies between two scripted figures: the densest candidate under it, whichever
    method made it (3.8 ms, dcvit-2505, and 10 ms, the original, are checked with the Triton
    versions below)."""
    out, profile = mixed_run
    assert select(out, profile, "--latency-ms", ms)["chosen"] == named(out)[want]


def test_new_picks_become_new_versions_of_one_model_and_no_pick_leaves_none(mixed_run, tmp_path):
    from fakes.triton_inputs import parse
    from triton_rules import validate_config

    out = copy_of_run(mixed_run[0], tmp_path)
    profile = mixed_run[1]
    model = out / "triton" / "dcvit_vit_tiny_patch16_224"

    def versions() -> dict[int, str]:
        return {
            int(v.name): json.loads((v / "deploy.json").read_text())["source"]["candidate"]
            for v in model.iterdir()
            if v.is_dir() and v.name.isdigit()
        }

    def serving() -> str:
        """The candidate of the version the config serves."""
        policy = parse((model / "config.pbtxt").read_text()).version_policy
        return versions()[next(iter(policy.specific.versions))]

    assert select(out, profile, "--latency-ms", "10")["chosen"] == "original"
    assert serving() == "original"
    served = versions()
    select(out, profile, "--latency-ms", "10")  # the same pick again adds nothing
    assert versions() == served
    smaller = named(out)["dcvit-2505"]
    assert select(out, profile, "--latency-ms", "3.8")["chosen"] == smaller
    # every pick is a numbered version of the one model, and the served one is the latest pick
    assert [p.name for p in (out / "triton").iterdir() if not p.name.startswith(".")] == [
        model.name
    ]
    now = versions()
    assert serving() == smaller
    assert len(now) == len(served) + (smaller not in served.values())
    assert list(now.values()).count(smaller) == 1
    check = validate_config(model / "config.pbtxt", model_dir=model)
    assert check.status == "ok", check.messages
    # a pick an older version holds is what Triton serves again, without a new copy
    assert select(out, profile, "--latency-ms", "10")["chosen"] == "original"
    assert serving() == "original" and versions() == now
    # a budget nothing meets: exit 3, and the run's own repository serves nothing stale
    assert select(out, profile, "--latency-ms", "2", code=3)["chosen"] is None
    assert not [p for p in (out / "triton").iterdir() if not p.name.startswith(".")]


def test_confirmation_over_the_budget_moves_the_search_on(mixed_run, latency_script, tmp_path):
    """--speedup 1.25 picks dcvit-2505 on the rounds (3.6 <= 5.0 / 1.25 = 4.0 ms). The fresh
    process measures the original at 6.5 ms, so the budget there is 6.5 / 1.25 = 5.2 ms:
    dcvit-2505 at 5.3 ms misses it and is set aside; dcvit-4512 at 4.5 ms fits it (not the
    run's 4.0) and is confirmed, chosen and published."""
    out = copy_of_run(mixed_run[0], tmp_path)
    short = named(out)
    with latency_script.fresh({"original": 6.5, "dcvit-2505": 5.3, "dcvit-4512": 4.5}):
        payload = select(out, mixed_run[1], "--speedup", "1.25", confirm=True)
    chosen = short["dcvit-4512"]
    assert payload["chosen"] == chosen
    confirmed = report(out)["selection"]["confirmed"]
    assert confirmed[short["dcvit-2505"]][0] == 5.3 and confirmed[chosen][0] == 4.5
    assert confirmed["original"][0] == 6.5
    fresh = [e for e in latency_script.log() if e["process"] == "fresh"]
    assert fresh and os.getpid() not in {e["pid"] for e in fresh}  # another process
    measured = [e["candidate"] for e in fresh]  # each pick confirmed as its trained artifact
    assert measured.index(f"{short['dcvit-2505']}.trained") < measured.index(f"{chosen}.trained")
    assert served(out) == chosen
