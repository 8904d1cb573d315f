"""Run reports (JSON/CSV/Markdown/PNG) and CI baseline comparison."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from fakes.report_inputs import BUDGET, ENV, PROFILE, family, outcome, write

from dcvit_deploy.errors import RegressionDetected, UserInputError
from dcvit_deploy.reports.compare import check_regression, compare_to_baseline, write_comparison
from dcvit_deploy.reports.writers import (
    CSV_COLUMNS,
    load_report,
    report_outcomes,
    write_reports,
)
from dcvit_deploy.selection.decide import decide
from dcvit_deploy.store.records import CandidateOutcome, LatencyBudget, Selection, from_dict

# --------------------------------------------------------------------------- write_reports


def test_reports_are_complete_and_round_trip(tmp_path: Path) -> None:
    outs = family()
    res = write(tmp_path, outs)
    paths = res["paths"]
    assert set(paths) == {"json", "csv", "summary", "plot"}
    assert all(p.is_file() and p.parent == tmp_path for p in paths.values())
    assert not list(tmp_path.glob("*.partial"))

    report = load_report(paths["json"])
    assert report["schema"] == 1 and report["kind"] == "dcvit-deploy/report"
    assert report["run"] == {"name": "demo", "seed": 0}
    assert report["environment"] == ENV and report["profile"] == PROFILE
    assert report["budget"]["ms"] == 5.0 and report["budget"]["margin"] == 0.05
    assert report_outcomes(report) == sorted(outs, key=lambda o: -o.retained)
    assert from_dict(Selection, report["selection"]) == res["selection"]
    assert report["selection"]["chosen"] == "c80"
    assert report["pareto_front"] == ["c100", "c80", "c40"]
    assert report["dominated"] == {"c70": "c80"}


def test_csv_has_one_row_per_candidate(tmp_path: Path) -> None:
    outs = family()
    paths = write(tmp_path, outs)["paths"]
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    assert [r["candidate"] for r in rows] == ["c100", "c80", "c70", "c60", "c50", "c40"]
    by = {r["candidate"]: r for r in rows}
    assert by["c80"]["chosen"] == "true" and by["c100"]["chosen"] == "false"
    assert float(by["c80"]["p50_ms"]) == pytest.approx(4.70)
    assert float(by["c80"]["p99_ms"]) == pytest.approx(4.70 * 1.1)
    assert by["c80"]["stable"] == "false"
    assert int(by["c80"]["macs_linear_norm"]) == int(4.6e9 * 0.8)
    assert by["c60"]["verify_passed"] == "false"
    assert by["c60"]["reason"].startswith("verification failed")
    assert by["c50"]["status"] == "export_failed" and by["c50"]["p50_ms"] == ""
    assert by["c70"]["reason"].startswith("dominated")
    assert {r["batch_size"] for r in rows} == {"1"}


def test_pareto_png_is_a_real_image(tmp_path: Path) -> None:
    from PIL import Image

    png = write(tmp_path, family())["paths"]["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 15_000
    with Image.open(png) as img:
        assert img.size[0] >= 600 and img.size[1] >= 400
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # drawn content, not a blank canvas


def test_summary_explains_choice_and_budget(tmp_path: Path) -> None:
    text = write(tmp_path, family())["paths"]["summary"].read_text()
    assert "**Chosen: `c80`**" in text
    assert "Why: chosen: densest verified candidate within budget" in text
    for row in (
        "| budget | 5.00 ms |",
        "| statistic | p50 |",
        "| batch size | 1 |",
        "| scope | host |",
        "| precision | fp32 |",
    ):
        assert row in text
    assert "5% (admit when p50 x 1.05 <= 5.00 ms)" in text
    section = text.split("## Candidates (densest first)")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # skip header
    names = [row.split("|")[1].split()[0].strip("*") for row in rows]
    assert names == ["c100", "c80", "c70", "c60", "c50", "c40"]
    assert "**c80** (pareto)" in rows[1] and "(pareto)" not in rows[2]
    assert "## Warnings" in text and "windows disagree by 14%" in text


def test_infeasible_and_budgetless_reports(tmp_path: Path) -> None:
    tight = LatencyBudget(ms=2.0, statistic="p50", batch_size=1, margin=0.05)
    res = write(tmp_path / "tight", family(), tight)
    text = res["paths"]["summary"].read_text()
    assert "**No candidate meets the budget.**" in text
    assert "the fastest, c40, measures 3.00 ms; a budget of at least 3.15 ms" in text
    assert load_report(res["paths"]["json"])["selection"]["chosen"] is None

    paths = write_reports(
        tmp_path / "none", run_meta={}, outcomes=family(), selection=None, profile_dict=PROFILE,
        env_dict={}, plot=False,
    )  # fmt: skip
    assert "plot" not in paths and not (tmp_path / "none" / "pareto.png").exists()
    report = load_report(paths["json"])
    assert report["selection"] is None and report["budget"] is None
    assert report["axis"] == {"batch_size": 1, "statistic": "p50"}
    assert "No latency budget was given" in paths["summary"].read_text()


def test_reasons_are_data_worded_only_by_the_reports(tmp_path: Path) -> None:
    """The summary found selection warnings by searching the reason text, so a failure whose
    own message says "warning:" was listed as one; a reason is data (kind, figures, warning)
    and only its ``warning`` field is a warning."""
    outs = family()
    outs[4] = dataclasses.replace(outs[4], error="exporter warning: opset 18 is newer")
    res = write(tmp_path, outs)
    text = res["paths"]["summary"].read_text()
    assert "export failed: exporter warning: opset 18 is newer" in text  # the table says it
    assert "opset" not in text.split("## Warnings")[1].split("\n## ")[0]
    reasons = load_report(res["paths"]["json"])["selection"]["reasons"]
    assert reasons["c80"]["kind"] == "chosen" and reasons["c80"]["figure"] == [4.70, 0.0, 1]
    assert reasons["c80"]["values"] == {"retained": 0.8}
    assert (reasons["c40"]["kind"], reasons["c40"]["versus"]) == ("fits", "c80")
    assert reasons["c50"] == {**reasons["c50"], "kind": "export_failed", "figure": None}
    sel = res["selection"]
    warned = dict(sel.reasons, c40=dataclasses.replace(sel.reasons["c40"], warning="not monotone"))
    paths = write_reports(
        tmp_path / "w", run_meta={}, outcomes=outs, selection=dataclasses.replace(sel,
        reasons=warned), profile_dict=PROFILE, env_dict=ENV, plot=False,
    )  # fmt: skip
    summary = paths["summary"].read_text()
    assert "- `c40`: warning: not monotone" in summary
    assert "fits, but smaller than chosen c80 (p50 3.00 ms x1.05 = 3.15 <= 5.00 ms); warning: " \
        "not monotone" in summary  # fmt: skip


def test_inconsistent_selection_is_a_caller_bug(tmp_path: Path) -> None:
    outs = family()
    selection = decide(outs[:3], BUDGET)  # no reasons for the others
    with pytest.raises(ValueError, match="no reason for"):
        write_reports(tmp_path, run_meta={}, outcomes=outs, selection=selection,
                      profile_dict={}, env_dict={})  # fmt: skip


# --------------------------------------------------------------------------- baseline comparison


def slower(outs: list[CandidateOutcome], name: str, factor: float) -> list[CandidateOutcome]:
    out = []
    for o in outs:
        if o.candidate == name:
            latency = tuple(
                dataclasses.replace(s, p50=s.p50 * factor, mean=s.mean * factor) for s in o.latency
            )
            o = dataclasses.replace(o, latency=latency)
        out.append(o)
    return out


def test_no_regression_against_itself_or_within_tolerance(tmp_path: Path) -> None:
    base = write(tmp_path / "base", family())["paths"]["json"]
    same = compare_to_baseline(base, base)
    assert not same.regressed and same.regressions == ()
    assert all(d.ratio == pytest.approx(1.0) for d in same.deltas if d.ratio is not None)

    noisy = write(tmp_path / "noisy", slower(family(), "c40", 1.08))["paths"]["json"]
    result = check_regression(noisy, base, tolerance=0.10)  # +8 % is within 10 %
    assert not result.regressed


def test_latency_regression_raises_exit_4(tmp_path: Path) -> None:
    base = write(tmp_path / "base", family())["paths"]["json"]
    cur = write(tmp_path / "cur", slower(family(), "c40", 1.2))["paths"]["json"]
    with pytest.raises(RegressionDetected) as info:
        check_regression(cur, base, tolerance=0.10, out_dir=tmp_path / "cmp")
    err = info.value
    assert err.exit_code == 4
    assert "c40: p50 3.60 ms vs baseline 3.00 ms (+20.0% > 10%)" in err.problem
    assert "\n" not in str(err)
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert data["regressed"] is True and data["kind"] == "dcvit-deploy/comparison"
    assert "REGRESSION" in (tmp_path / "cmp" / "COMPARISON.md").read_text()
    # The other direction is a speed-up: a note, not a regression.
    reverse = compare_to_baseline(base, cur, tolerance=0.10)
    assert not reverse.regressed
    assert next(d for d in reverse.deltas if d.candidate == "c40").note.startswith("faster")


def test_fidelity_and_status_regressions(tmp_path: Path) -> None:
    base = write(tmp_path / "base", family())["paths"]["json"]
    worse = [
        dataclasses.replace(o, fidelity=0.90) if o.candidate == "c100" else o for o in family()
    ]
    worse = [
        outcome("c40", 0.4, None, status="build_failed") if o.candidate == "c40" else o
        for o in worse
    ]
    result = compare_to_baseline(
        write(tmp_path / "cur", worse)["paths"]["json"], base, fidelity_tolerance=0.01
    )
    assert result.regressed
    text = " ".join(result.regressions)
    assert "c100: fidelity 90.00% vs baseline 100.00%" in text
    assert "c40: now build_failed" in text
    regressed = {d.candidate for d in result.deltas if d.regressed}
    assert regressed == {"c100", "c40"}


def test_new_missing_and_lost_choice(tmp_path: Path) -> None:
    base = write(tmp_path / "base", family())["paths"]["json"]
    changed = [o for o in family() if o.candidate != "c70"] + [outcome("c30", 0.3, 2.5)]
    result = compare_to_baseline(write(tmp_path / "cur", changed)["paths"]["json"], base)
    assert result.new == ("c30",) and result.missing == ("c70",)
    assert not result.regressed
    assert any("missing" in n for n in result.notes)

    # Same budget, but now nothing fits: that is a regression even if each change is small.
    all_slow = [o for o in family() if o.candidate != "c80" and o.candidate != "c70"]
    all_slow = slower(slower(all_slow, "c40", 1.0), "c40", 1.0)
    gone = write(tmp_path / "gone", [o for o in all_slow if o.candidate != "c40"])["paths"]
    result = compare_to_baseline(gone["json"], base)
    assert any("no candidate meets the budget any more" in r for r in result.regressions)
    paths = write_comparison(tmp_path / "cmp", result)
    assert json.loads(paths["json"].read_text())["missing"] == ["c40", "c70", "c80"]


def test_bad_baseline_is_a_user_error(tmp_path: Path) -> None:
    bogus = tmp_path / "baseline.json"
    bogus.write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserInputError, match="not a dcvit-deploy report"):
        load_report(bogus)
    with pytest.raises(UserInputError, match="not found"):
        load_report(tmp_path / "absent.json")
    base = write(tmp_path / "base", family())["paths"]["json"]
    with pytest.raises(UserInputError, match="unknown statistic"):
        compare_to_baseline(base, base, statistic="p42")


def test_baseline_from_another_device_or_runtime_is_refused_unless_allowed(tmp_path: Path) -> None:
    base = load_report(write(tmp_path / "base", family())["paths"]["json"])
    base["environment"] = {"cpu": {"model": "CPU A"}, "packages": {"onnxruntime": "1.20.0"}}
    other = json.loads(json.dumps(base))
    other["environment"] = {"cpu": {"model": "CPU B"}, "packages": {"onnxruntime": "1.31.0"}}
    with pytest.raises(UserInputError, match=r"another target \(cpu: CPU A -> CPU B; runtime"):
        compare_to_baseline(other, base)
    allowed = compare_to_baseline(other, base, allow_other_device=True)
    assert any("--allow-other-device" in n for n in allowed.notes)
    other_profile = json.loads(json.dumps(base))
    other_profile["profile"] = {**base["profile"], "name": "h100-trt-fp16"}
    with pytest.raises(UserInputError, match="profile"):
        compare_to_baseline(other_profile, base)


def relative(outs: list[CandidateOutcome], speedup: float) -> LatencyBudget:
    """``--speedup`` against c100 (the original) as measured in ``outs``."""
    from dcvit_deploy.selection.decide import relative_budget

    ref = next(o for o in outs if o.candidate == "c100").latency_at(1)
    assert ref is not None
    return relative_budget(speedup, ref, statistic="p50", batch_size=1, reference_name="c100")


def test_the_same_speedup_is_the_same_budget_whatever_it_derived(tmp_path: Path) -> None:
    """Both runs asked for 1.25x the original; the original measured 3% slower in one: the
    derived milliseconds differ, the budget does not."""
    base_outs, cur_outs = family(), slower(family(), "c100", 1.03)
    base = write(tmp_path / "base", base_outs, relative(base_outs, 1.25))["paths"]["json"]
    cur = write(tmp_path / "cur", cur_outs, relative(cur_outs, 1.25))["paths"]["json"]
    result = check_regression(cur, base)
    assert result.chosen == result.baseline_chosen == "c80"
    assert not any("budgets differ" in n for n in result.notes), result.notes
    other = write(tmp_path / "other", base_outs, relative(base_outs, 1.5))["paths"]["json"]
    assert any("budgets differ" in n for n in compare_to_baseline(other, base).notes)


RELATIVE_REGRESSIONS = {  # the current run's outcomes (baseline: family()) -> the finding
    "nothing fits": (lambda: slower(family(), "c100", 0.5), "no candidate meets the budget"),
    "less dense pick": (
        lambda: slower(family(), "c80", 1.07),  # within tolerance, but no longer fits
        "chose c40 (retained 40.0%) where the baseline chose c80 (80.0%)",
    ),
    "less faithful pick (--prefer fidelity)": (
        lambda: slower(family(), "c80", 1.07),
        "chose c40 (fidelity 88.0%) where the baseline chose c80 (97.0%)",
    ),
    "pick slower": (lambda: slower(family(), "c80", 1.2), "c80: p50 5.64 ms vs baseline 4.70"),
    "pick less faithful": (
        lambda: [
            dataclasses.replace(o, fidelity=0.9 if o.candidate == "c80" else o.fidelity)
            for o in family()
        ],
        "c80: fidelity 90.00% vs baseline 97.00%",
    ),
}


@pytest.mark.parametrize("case", sorted(RELATIVE_REGRESSIONS))
def test_regressions_under_the_same_speedup_exit_4_in_one_line(tmp_path: Path, case: str) -> None:
    from fakes.runs import run_cli

    make, finding = RELATIVE_REGRESSIONS[case]
    speedup = 1.05 if case == "pick slower" else 1.25  # the slower pick still fits 1.05x
    base_outs, cur_outs = family(), make()
    prefer = "fidelity" if "fidelity" in case else "capacity"
    base = write(tmp_path / "base", base_outs, relative(base_outs, speedup), prefer)
    cur = write(tmp_path / "cur", cur_outs, relative(cur_outs, speedup), prefer)
    base, cur = base["paths"]["json"], cur["paths"]["json"]
    code, out, err = run_cli(["compare", str(cur), "--baseline", str(base)])
    assert code == 4 and len(err.strip().splitlines()) == 1, (out, err)
    assert finding in err, err
