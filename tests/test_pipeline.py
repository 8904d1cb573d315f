"""End-to-end: the main command on a tiny ViT with bundled real photos (no download), on CPU
with ONNX Runtime; resume after a kill; bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dcvit_deploy.cli import main

MODEL = [
    "--model",
    "vit_tiny_patch16_224",
    "--random-init",
    "--model-kwargs",
    "img_size=32 patch_size=8 embed_dim=64 depth=4 num_heads=2 num_classes=10",
]
FAST = [
    "--schedule",
    "tiny",
    "--iterations",
    "2",
    "--inversion-iterations",
    "2",
    "--num-samples",
    "4",
    "--holdout",
    "2",
]

FAST_PROFILE = """
name = "test-cpu"
description = "fast CPU profile for tests"
backend = "onnxruntime"
device = "cpu"
precision = "fp32"
batch_sizes = [1, 2]
budget_batch_size = 1
statistic = "p50"
scope = "host"

[measure]
warmup_iters = 2
warmup_min_s = 0.0
window_iters = 5
min_window_s = 0.0
min_windows = 2
max_windows = 3
min_duration_s = 0.0

[backend_options]
intra_op_num_threads = 1
"""


def run_cli(args: list[str]) -> tuple[int, str]:
    """Run the CLI in-process; return (exit code, stderr+stdout text)."""
    import contextlib
    import io

    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main(args)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("profiles") / "test-cpu.toml"
    p.write_text(FAST_PROFILE)
    return p


SPEEDUP, MARGIN = 1.1, 0.02


def main_job(photo_dir: Path, profile_file: Path, out: Path) -> list[str]:
    """The main command as CI runs it: a relative budget, at least 1.1x faster than the original
    measured in the same run, with a 2% guard band. The original misses it by construction;
    whether a smaller candidate fits depends on the machine: this tiny model's candidates
    (~0.2 ms) measured 20% apart on one machine and within noise of each other on another, so
    the tests check the choice against the figures it was made on (exit 3 when none fits)."""
    return ["compress", *MODEL, "--data", str(photo_dir), *FAST, "--targets", "10%,25%",
            "--profile", str(profile_file), "--speedup", str(SPEEDUP),
            "--margin", f"{MARGIN:.0%}", "--out", str(out), "--json"]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, photo_dir, profile_file) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("run") / "r"
    code, text = run_cli(main_job(photo_dir, profile_file, out))
    chosen = json.JSONDecoder().raw_decode(text[text.index("{") :])[0]["chosen"]
    assert code == (0 if chosen else 3), text
    return out, text


def test_main_job_writes_manifest_reports_and_triton_repo(finished_run):
    out, text = finished_run
    payload, _ = json.JSONDecoder().raw_decode(text[text.index("{") :])
    manifest = json.loads((out / "manifest.json").read_text())
    family = manifest["units"]["family"]
    assert manifest["schema"] == 2 and family["status"] == "ok"
    names = [c["name"] for c in family["result"]["candidates"]]
    assert names[0] == "original" and len(names) == 3
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == 1
    assert {c["candidate"] for c in report["candidates"]} == set(names)
    for name in names:
        assert (out / "onnx" / "fp32" / f"{name}.onnx").is_file()
        raw = out / "raw" / "test-cpu"
        assert (raw / f"{name}-b1.json").is_file() and (raw / f"{name}-b2.json").is_file()
        # the built artifact itself was run through its backend and checked against PyTorch
        built = manifest["units"][f"build/test-cpu/{name}"]["result"]
        assert built["verification"]["passed"] and "onnxruntime" in built["verified_with"]
    assert (out / "candidates.csv").read_text().count("\n") == len(names) + 1
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The choice: the densest candidate whose figure x (1+margin) fits the original's figure /
    # speedup, on the figures the decision was made on (the structures'), and that its
    # fresh-process confirmation did not overturn.
    selection = report["selection"]
    budget = selection["budget"]
    assert budget["reference"] == "original" and budget["speedup"] == SPEEDUP
    figures = {
        c["candidate"]: (c["retained"], selection["figures"][c["candidate"]][0])
        for c in report["candidates"]
    }
    assert budget["ms"] == pytest.approx(figures["original"][1] / SPEEDUP)
    fitting = [
        n
        for n, (_, f) in figures.items()
        if f * (1 + MARGIN) <= budget["ms"]
        and not selection["reasons"][n].startswith("confirmation failed")
    ]
    want = max(fitting, key=lambda n: figures[n][0]) if fitting else None
    assert payload["chosen"] == want != "original", selection["reasons"]
    if want is not None:
        assert f"**Chosen: `{want}`**" in (out / "SUMMARY.md").read_text()
        assert (out / "triton" / "dcvit_vit_tiny_patch16_224").is_dir()


def copy_of_run(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the shared run, for a test whose decision rewrites ``triton/`` (a run
    directory is movable: its manifest records paths relative to its root)."""
    out = tmp_path / "r"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns(".lock", ".lock.json"))
    return out


def test_budget_between_measured_figures_picks_the_densest_that_fits(
    finished_run, profile_file, tmp_path
):
    """The original misses a budget set half-way to the fastest smaller candidate; the densest
    candidate whose figure (x 1.05 margin) fits on the figures the decision was made on is
    chosen."""
    out = copy_of_run(finished_run[0], tmp_path)
    report = json.loads((out / "report.json").read_text())
    p50 = {
        c["candidate"]: next(s["p50"] for s in c["latency"] if s["batch_size"] == 1)
        for c in report["candidates"]
    }
    smaller = min(v for n, v in p50.items() if n != "original")
    if p50["original"] <= smaller:
        pytest.skip("the original measured fastest on this machine: no budget separates them")
    ms = float(f"{(p50['original'] + smaller) / 2 * 1.05:.6f}")
    code, text = run_cli(
        ["select", "--out", str(out), "--profile", str(profile_file), "--latency-ms", str(ms),
         "--margin", "5%", "--no-confirm", "--json"]
    )  # fmt: skip
    assert code in (0, 3), text
    payload, _ = json.JSONDecoder().raw_decode(text[text.index("{") :])
    decided = json.loads((out / "report.json").read_text())
    figures = {
        c["candidate"]: (c["retained"], decided["selection"]["figures"][c["candidate"]][0])
        for c in decided["candidates"]
    }
    fitting = [n for n, (_, f) in figures.items() if f * 1.05 <= ms]
    want = max(fitting, key=lambda n: (figures[n][0], n)) if fitting else None
    assert payload["chosen"] == want


def test_triton_repository_parses_and_onnx_matches_pytorch(finished_run, profile_file, tmp_path):
    """What is published is the chosen candidate's verified ONNX, under a config Triton's
    schema accepts. Not a decision test: the budget is twice the slowest measured figure, so
    the densest candidate (the original) is published whatever this machine measured."""
    import onnxruntime as ort
    import torch

    from dcvit_deploy.compress.candidate import load_candidate
    from dcvit_deploy.triton import validate_config

    out = copy_of_run(finished_run[0], tmp_path)
    report = json.loads((out / "report.json").read_text())
    slowest = max(s["p50"] for c in report["candidates"] for s in c["latency"])
    code, text = run_cli(
        ["select", "--out", str(out), "--profile", str(profile_file), "--latency-ms",
         f"{2 * slowest:.6f}", "--no-confirm", "--json"]
    )  # fmt: skip
    assert code == 0, text
    chosen = json.JSONDecoder().raw_decode(text[text.index("{") :])[0]["chosen"]
    assert chosen == "original"
    model_dir = out / "triton" / "dcvit_vit_tiny_patch16_224"  # named for the model, not the pick
    assert [p.name for p in (out / "triton").iterdir() if not p.name.startswith(".")] == [
        model_dir.name
    ]
    check = validate_config(model_dir / "config.pbtxt", model_dir=model_dir)
    assert check.status == "ok", check.messages
    newest = max((v for v in model_dir.iterdir() if v.name.isdigit()), key=lambda v: int(v.name))
    deployed = json.loads((newest / "deploy.json").read_text())
    assert deployed["source"]["candidate"] == chosen
    _, model = load_candidate(out / "family" / f"{chosen}.json")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(newest / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rerun_resumes_without_redoing_work(finished_run, photo_dir, profile_file):
    out, _ = finished_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "family").glob("*.safetensors")}
    raw_before = {p.name: p.stat().st_mtime_ns for p in (out / "raw").rglob("*.json")}
    first = json.JSONDecoder().raw_decode(finished_run[1][finished_run[1].index("{") :])[0]
    code, text = run_cli(main_job(photo_dir, profile_file, out))
    assert code == (0 if first["chosen"] else 3), text
    assert {p.name: p.stat().st_mtime_ns for p in (out / "family").glob("*.safetensors")} == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "raw").rglob("*.json")} == raw_before


def test_infeasible_budget_exits_3_naming_fastest(finished_run, profile_file, tmp_path):
    out = copy_of_run(finished_run[0], tmp_path)
    code, text = run_cli(
        ["select", "--out", str(out), "--profile", str(profile_file), "--latency-ms", "0.0001"]
    )
    assert code == 3
    assert "no candidate meets p50" in text and "the fastest" in text and "would admit it" in text


def test_status_lists_steps(finished_run):
    out, _ = finished_run
    code, text = run_cli(["status", "--out", str(out), "--json"])
    assert code == 0
    s = json.loads(text)
    assert s["steps"]["family"] == "ok" and set(s["outcomes"]["test-cpu"].values()) == {"ok"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "vit_nope", "--random-init"], "unknown timm model 'vit_nope'"),
        ([*MODEL, "--checkpoint", "w.safetensors"], "give exactly one weight source"),
        ([*MODEL, "--profile", "no-such-profile"], "unknown profile 'no-such-profile'"),
        ([*MODEL, "--targets", "150%"], "between 0% and 100%"),
        ([*MODEL, "--targets", "99%"], "outside the feasible range"),
    ],
)
def test_bad_input_is_one_line_with_fix(tmp_path, photo_dir, args, message):
    data = ["--data", str(photo_dir)]
    feasible = ["--targets", "10%,25%"]  # the cases' own --targets come later and win
    code, text = run_cli(["compress", *feasible, *args, *data, *FAST, "--out", str(tmp_path / "r")])
    assert code == 1, text
    line = text.strip().splitlines()[-1]
    assert line.startswith("error: ") and message in line and "fix:" in line
    assert "Traceback" not in text


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    code, text = run_cli(
        ["compress", *MODEL, "--data", str(tmp_path / "empty"), *FAST, "--out", str(tmp_path / "r")]
    )
    assert code == 1 and "no images" in text and "fix:" in text


def test_output_dir_of_another_run_is_refused(finished_run, photo_dir):
    out, _ = finished_run
    other = [
        "--model",
        "vit_tiny_patch16_224",
        "--random-init",
        "--model-kwargs",
        "img_size=32 patch_size=8 embed_dim=64 depth=2 num_heads=2 num_classes=10",
    ]
    code, text = run_cli(
        ["compress", *other, "--data", str(photo_dir), *FAST, "--targets", "20%", "--out", str(out)]
    )
    assert code == 1 and "holds a run of another model" in text and "--overwrite" in text


def test_kill_during_the_training_of_the_pick_then_resume(tmp_path, photo_dir, profile_file):
    """SIGKILL the CLI while it finetunes its pick (every structure is measured by then); the
    rerun finishes the pick's training without measuring or rebuilding anything again, and the
    pick's trained weights are those of an uninterrupted run."""
    out = tmp_path / "killed"
    args = ["compress", *MODEL, "--data", str(photo_dir), *FAST, "--iterations", "25",
            "--targets", "10%,25%", "--no-original", "--profile", str(profile_file),
            "--latency-ms", "1000", "--no-confirm", "--out", str(out), "--json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcvit_deploy.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def units(run: Path) -> dict:
        try:
            return json.loads((run / "manifest.json").read_text())["units"]
        except (OSError, ValueError):
            return {}

    def training() -> bool:
        return any(
            k.startswith("train/") and v["status"] == "running" for k, v in units(out).items()
        )

    deadline = time.monotonic() + 300
    while not training() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {
        p: p.stat().st_mtime_ns for p in [*(out / "family").iterdir(), *(out / "raw").rglob("*")]
    }

    code, text = run_cli(args)
    assert code == 0, text
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # nothing redone but the pick
    code, text = run_cli([*args[:-3], "--out", str(tmp_path / "straight"), "--json"])
    assert code == 0, text

    def trained(run: Path) -> dict[str, str]:
        return {
            k: v["result"]["weights_sha256"]
            for k, v in units(run).items()
            if k.startswith("train/")
        }

    assert len(trained(out)) == 1 and trained(out) == trained(tmp_path / "straight")


def test_compare_gate_passes_on_itself_and_fails_on_a_slower_run(finished_run, tmp_path):
    out, _ = finished_run
    report = json.loads((out / "report.json").read_text())
    code, text = run_cli(
        ["compare", str(out / "report.json"), "--baseline", str(out / "report.json")]
    )
    assert code == 0 and "no regression" in text
    for cand in report["candidates"]:  # a baseline twice as fast as this run
        for s in cand["latency"]:
            for k in ("mean", "min", "max", "p50", "p90", "p95", "p99"):
                s[k] = s[k] / 2
    fast = tmp_path / "baseline.json"
    fast.write_text(json.dumps(report))
    code, text = run_cli(
        [
            "compare",
            str(out / "report.json"),
            "--baseline",
            str(fast),
            "--out",
            str(tmp_path / "cmp"),
        ]
    )
    assert code == 4, text
    assert "error:" in text and "fix:" in text
    assert (tmp_path / "cmp" / "comparison.json").is_file()


def test_bisect_search_through_the_pipeline_matches_exhaustive(
    finished_run, photo_dir, profile_file, tmp_path
):
    """Same family, budget placed between two measured candidates: bisect picks what exhaustive
    selection picks on the same stored measurements, and records what it did not measure."""
    from dcvit_deploy.config.profiles import load_profile
    from dcvit_deploy.pipeline.outcomes import outcomes_for
    from dcvit_deploy.pipeline.units.compressing import current_family
    from dcvit_deploy.selection.decide import decide
    from dcvit_deploy.store.records import LatencyBudget
    from dcvit_deploy.store.rundir import RunDir

    out, _text = finished_run
    profile = load_profile(profile_file)
    with RunDir.load(out) as run:
        outcomes = outcomes_for(run, current_family(run), profile)
    p50 = {o.candidate: o.latency_at(1).p50 for o in outcomes}
    first, second = sorted(p50.values())[:2]
    budget = (first + second) / 2
    want = decide(outcomes, LatencyBudget(ms=float(f"{budget:.6f}"), statistic="p50",
                                          batch_size=1)).chosen  # fmt: skip
    assert want is not None
    args = main_job(photo_dir, profile_file, out)
    args[args.index("--speedup") : args.index("--speedup") + 2] = ["--latency-ms", f"{budget:.6f}"]
    args[args.index("--margin") + 1] = "0%"
    code, text_b = run_cli([*args, "--no-confirm", "--search", "bisect"])
    assert code == 0, text_b
    payload = json.loads(text_b[text_b.index("{") :])
    assert payload["chosen"] == want
    assert payload["selection"]["search"] == "bisect"
