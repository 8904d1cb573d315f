"""The command line fails early and clearly: every mistake a user can make is one line on stderr
(problem; fix) and exit 1, before any work; ``--dry-run`` prints the plan; Ctrl-C is exit 130
without a traceback; internal bugs keep theirs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes.runs import MODEL, SMALL, TINY_VIT_KWARGS, assert_one_line_error, compress, run_cli

from dcvit_deploy import api
from dcvit_deploy.cli import main

# --------------------------------------------------------------------------- the cases

REFUSED_BEFORE_ANY_WORK = [
    # tracebacks on the old main
    (["--model-kwargs", "img_size=32 patch_size=8 embed_dim=64 num_heads=3"],
     ("embed_dim=64", "num_heads=3", "divisible")),
    (["--iterations", "0"], ("--iterations", "got 0")),
    (["--iterations", "-1"], ("--iterations", "got -1")),
    (["--lr", "-1"], ("--lr", "got -1.0")),
    (["--inversion-iterations", "0"], ("--inversion-iterations", "got 0")),
    (["--img-size", "64"], ("--img-size 64", "32x32")),
    (["--out", "/proc/x"], ("--out /proc/x", "not writable")),
    (["--triton-repo", "/proc/triton"], ("--triton-repo /proc/triton", "not writable")),
    # accepted silently on the old main
    (["--batch-size", "0"], ("--batch-size", "got 0")),
    (["--train-batch-size", "0"], ("--train-batch-size", "got 0")),
    (["--latency-ms", "inf"], ("--latency-ms", "inf")),
    (["--latency-ms", "nan"], ("--latency-ms", "nan")),
    (["--targets", "0.001%:38.001%:0.001%"], ("38001 targets", "at most 200")),
    # rejected only after minutes of work on the old main
    (["--targets", "60%"], ("60.00%", "feasible range")),
    (["--round-to", "0"], ("--round-to", "got 0")),
    (["--blocks", "0-99"], ("--blocks", "depth 4")),
    (["--warm-fraction", "-1"], ("--warm-fraction", "got -1.0")),
    (["--num-samples", "0"], ("--num-samples", "got 0")),
    # more of the same family
    (["--speedup", "1.0"], ("--speedup",)),
    (["--latency-ms", "5", "--speedup", "2"], ("--latency-ms and --speedup",)),
    (["--margin", "100%"], ("--margin",)),
    (["--seed", "-1"], ("--seed",)),
    (["--holdout", "0"], ("--holdout",)),
    (["--blocks", "5-3"], ("--blocks", "empty")),
    (["--blocks", "0-99999999999"], ("--blocks",)),
    (["--method", "dcvit,nope"], ("--method 'nope'",)),
    (["--round-to", "100000"], ("--round-to 100000", "wider")),
    (["--triton-model-name", "a/b"], ("--triton-model-name",)),
    (["--triton-pareto"], ("--triton-pareto", "--train pick", "add --train all")),
    (["--schedule", "nope"], ("'nope' is not one of",)),  # a usage error: one line, exit 1
    (["--no-such-option"], ("No such option",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "needles"),
    REFUSED_BEFORE_ANY_WORK,
    ids=[" ".join(e) for e, _ in REFUSED_BEFORE_ANY_WORK],
)
def test_bad_input_is_refused_in_one_line_before_any_work(
    tmp_path: Path, photo_dir: Path, extra: list[str], needles: tuple[str, ...]
) -> None:
    out = tmp_path / "run"
    code, stdout, err = run_cli(compress(photo_dir, out, *extra))
    assert_one_line_error(code, stdout, err, *needles)
    assert not out.exists(), "the run directory was created before the input was checked"


def test_read_only_and_full_file_systems_are_refused_up_front(
    tmp_path: Path, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import tempfile

    from dcvit_deploy.config import validate

    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        code, out, err = run_cli(compress(photo_dir, tmp_path / "ro"))
    assert_one_line_error(code, out, err, "read-only", "--out")

    usage = shutil.disk_usage(tmp_path)
    full = type(usage)(usage.total, usage.total, 1024)
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda path: full)
    code, out, err = run_cli(compress(photo_dir, tmp_path / "full"))
    assert_one_line_error(code, out, err, "full file system", "--out")
    assert not (tmp_path / "ro").exists() and not (tmp_path / "full").exists()


def test_nan_checkpoint_is_refused_naming_the_tensor(tmp_path: Path, photo_dir: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT_KWARGS)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"] = torch.full_like(sd["blocks.1.mlp.fc1.weight"], float("nan"))
    ckpt = tmp_path / "nan.safetensors"
    save_file(sd, str(ckpt))
    args = ["compress", "--model", "vit_tiny_patch16_224", "--checkpoint", str(ckpt),
            "--model-kwargs", "embed_dim=64 depth=4 num_heads=2", "--data", str(photo_dir),
            *SMALL, "--out", str(tmp_path / "run")]  # fmt: skip
    t0 = time.perf_counter()
    code, out, err = run_cli(args)
    assert_one_line_error(code, out, err, "NaN", "blocks.1.mlp.fc1.weight")
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "run").exists()


def test_pickled_checkpoint_refusal_keeps_torchs_explanation(
    tmp_path: Path, photo_dir: Path
) -> None:
    import torch

    ckpt = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "opt": Path("x")}, ckpt)
    args = ["compress", "--model", "vit_tiny_patch16_224", "--checkpoint", str(ckpt),
            "--data", str(photo_dir), *SMALL, "--out", str(tmp_path / "run")]  # fmt: skip
    code, out, err = run_cli(args)
    line = assert_one_line_error(code, out, err, "pickled", "Unsupported global")
    assert "PosixPath" in line or "Path" in line  # torch names the refused global
    assert "\x1b[" not in line


def test_unknown_model_suggestions_are_all_supported(tmp_path: Path, photo_dir: Path) -> None:
    import timm
    import torch

    from dcvit_deploy.model.loading import check_supported

    args = ["compress", "--model", "swin_tiny_patch4", "--random-init", "--data",
            str(photo_dir), *SMALL, "--out", str(tmp_path / "run")]  # fmt: skip
    code, out, err = run_cli(args)
    line = assert_one_line_error(code, out, err, "unknown timm model")
    names = line.split("e.g. ", 1)[1].split(", ")
    assert names and not any(n.startswith("swin") for n in names)
    for name in names:
        with torch.device("meta"):
            check_supported(timm.create_model(name, pretrained=False, depth=1), name)


def test_holdout_larger_than_the_images_is_said_on_the_console(
    tmp_path: Path, photo_dir: Path
) -> None:
    code, _out, err = run_cli(
        compress(photo_dir, tmp_path / "run", "--holdout", "1000", "--dry-run")
    )
    assert code == 0, err
    assert "note: --holdout 1000" in err and "using 2" in err
    code, _out, err = run_cli(
        compress(photo_dir, tmp_path / "run", "--num-samples", "6", "--dry-run")
    )
    assert code == 0, err
    assert "no images left over for a held-out set" in err


def test_dry_run_prints_the_plan_and_does_nothing(tmp_path: Path, photo_dir: Path) -> None:
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        compress(photo_dir, out, "--dry-run", "--latency-ms", "5", "--method", "dcvit,practise")
    )
    assert code == 0, err
    assert "dry run" in stdout and "dcvit 10.00%: 1 block(s)" in stdout
    assert "practise 25.00%: drop" in stdout and "p50 x(1+0%) <= 5.00 ms" in stdout
    assert not out.exists()
    code, stdout, err = run_cli(compress(photo_dir, out, "--dry-run", "--json"))
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["dry_run"] is True and [p["target"] for p in payload["plan"]] == [0.1, 0.25]
    assert payload["model"]["depth"] == 4 and payload["images"] == 6
    assert not out.exists()


def test_family_dry_run_needs_no_budget(tmp_path: Path, photo_dir: Path) -> None:
    args = ["family", *MODEL, "--data", str(photo_dir), *SMALL, "--out", str(tmp_path / "r"),
            "--dry-run"]  # fmt: skip
    code, out, err = run_cli(args)
    assert code == 0, err
    assert "plan (target -> structure)" in out and "profile:" not in out


def test_new_options_reach_the_option_records() -> None:
    from dcvit_deploy.cli.options import compress_options, deploy_options

    kw = {
        "model": "m", "data": "d", "random_init": True, "targets": "10%",
        "method": "dcvit,practise", "round_to": 1,
        "neuron_choice": "random", "reuse": True, "warm_fraction": 0.5, "schedule": "tiny",
        "metric_set": "synthetic", "inversion": "fast", "seed": 0, "device": "cpu",
        "speedup": 1.5, "prefer": "fidelity", "no_confirm": True, "allow_other_device": True,
        "triton_model_name": "vit_s", "margin": "5%",
    }  # fmt: skip
    copts, dopts = compress_options(kw), deploy_options(kw)
    assert copts.methods == ("dcvit", "practise")
    assert dopts.speedup == 1.5 and dopts.prefer == "fidelity" and dopts.confirm is False
    assert dopts.allow_other_device is True and dopts.triton_model_name == "vit_s"
    assert dopts.margin == pytest.approx(0.05)


# --------------------------------------------------------------------------- run directories


@pytest.mark.parametrize("command", ["status", "select", "report", "export"])
def test_corrupt_manifest_is_one_line(tmp_path: Path, command: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"schema": 1, "identity": {')
    args = [command, "--out", str(run)] + (["--latency-ms", "5"] if command == "select" else [])
    code, out, err = run_cli(args)
    assert_one_line_error(code, out, err, "manifest.json", "corrupt")


def test_manifest_of_the_wrong_shape_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("[1, 2, 3]")
    code, out, err = run_cli(["status", "--out", str(tmp_path)])
    assert_one_line_error(code, out, err, "not a dcvit-deploy manifest")


def test_select_without_budget_is_one_line(tmp_path: Path) -> None:
    code, out, err = run_cli(["select", "--out", str(tmp_path)])
    assert_one_line_error(code, out, err, "needs a budget", "--latency-ms")


API_CALLS_WITH_BAD_OPTIONS = {
    "select without a budget": (lambda out, d: api.select_over_run(out, d()), "needs a budget"),
    "select under a NaN budget": (
        lambda out, d: api.select_over_run(out, d(latency_ms=float("nan"))), "--latency-ms"),
    "export on two targets": (
        lambda out, d: api.stage_over_run(out, d(profile="cpu-ort,ort-cuda"), until="export"),
        "one target"),
    "report of an unknown profile": (
        lambda out, d: api.report_over_run(out, "no-such-profile"), "unknown profile"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(API_CALLS_WITH_BAD_OPTIONS))
def test_the_api_over_a_run_checks_its_options_first_like_the_cli(
    tmp_path: Path, case: str
) -> None:
    """The Python API refuses what the commands refuse, before it reads the run (a select
    without a budget was accepted and rewrote the reports)."""
    from dcvit_deploy.api import DeployOptions
    from dcvit_deploy.errors import UserInputError

    call, needle = API_CALLS_WITH_BAD_OPTIONS[case]
    with pytest.raises(UserInputError, match=needle):
        call(tmp_path, DeployOptions)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- compare


def _reports(tmp_path: Path) -> tuple[Path, Path]:
    """A report and a baseline twice as fast (a latency regression)."""
    from fakes.report_inputs import family, write

    current = write(tmp_path / "cur", family())["paths"]["json"]
    data = json.loads(current.read_text())
    for cand in data["candidates"]:
        for s in cand["latency"]:
            for k in ("mean", "min", "max", "p50", "p90", "p95", "p99"):
                s[k] = s[k] / 2
    base = tmp_path / "base.json"
    base.write_text(json.dumps(data))
    return current, base


def test_compare_points_at_comparison_md_only_when_it_wrote_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    current, base = _reports(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _out, err = run_cli(["compare", str(current), "--baseline", str(base)])
    assert code == 4, err
    assert "inspect COMPARISON.md" not in err
    assert "rerun with --out DIR" in err and not list(tmp_path.rglob("COMPARISON.md"))
    code, _out, err = run_cli(
        ["compare", str(current), "--baseline", str(base), "--out", str(tmp_path / "cmp")]
    )
    assert code == 4, err
    written = tmp_path / "cmp" / "COMPARISON.md"
    assert written.is_file() and f"inspect {written}" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d["candidates"][0].pop("macs"),
        lambda d: d.__setitem__("candidates", {"a": 1}),
        lambda d: d["candidates"][0].__setitem__("latency", ["fast"]),
        lambda d: d.__setitem__("budget", {"ms": "soon"}),
    ],
    ids=["missing-field", "candidates-not-a-list", "latency-of-strings", "bad-budget"],
)
def test_compare_with_a_structurally_wrong_baseline_is_one_line(tmp_path: Path, damage) -> None:
    current, base = _reports(tmp_path)
    data = json.loads(base.read_text())
    damage(data)
    base.write_text(json.dumps(data))
    code, out, err = run_cli(["compare", str(current), "--baseline", str(base)])
    assert_one_line_error(code, out, err, "baseline", str(base))


# --------------------------------------------------------------------------- error mapping


def test_os_errors_from_the_environment_are_one_line(
    tmp_path: Path, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x"))

    monkeypatch.setattr(api, "run_pipeline", disk_full)
    code, out, err = run_cli(compress(photo_dir, tmp_path / "run"))
    assert_one_line_error(code, out, err, "No space left on device", "x")


def test_interrupt_hidden_in_another_exception_exits_130(
    tmp_path: Path, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted_import(*args: object, **kwargs: object) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("partially initialized module 'torch'") from None

    monkeypatch.setattr(api, "run_pipeline", interrupted_import)
    code, _out, err = run_cli(compress(photo_dir, tmp_path / "run"))
    assert code == 130 and err.strip() == "interrupted: rerun the same command to resume"


def test_internal_bugs_keep_their_traceback(
    tmp_path: Path, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(api, "run_pipeline", bug)
    with pytest.raises(ZeroDivisionError):
        main(compress(photo_dir, tmp_path / "run"))


def test_result_notes_are_printed_once(
    tmp_path: Path, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipped images and a missing held-out set come back from the API as data; the CLI prints
    each note once, after the ones the up-front checks printed."""

    def fake(*args: object, **kwargs: object) -> api.JobResult:
        return api.JobResult(
            selection=None, outcomes=[],
            notes=["2 of 8 images could not be used and were skipped (a.jpg: broken)",
                   "no images left over for a held-out set: fidelity and verification use "
                   "training images (add images or lower --num-samples)"],
        )  # fmt: skip

    monkeypatch.setattr(api, "run_pipeline", fake)
    code, _out, err = run_cli(compress(photo_dir, tmp_path / "run", "--num-samples", "6"))
    assert code == 0, err
    assert err.count("no images left over") == 1 and "a.jpg: broken" in err


# --------------------------------------------------------------------------- Ctrl-C


# Where the child sends itself SIGINT: an audit event and its first argument.
INTERRUPT_POINTS = {
    "while the CLI module imports click": ("import", "click"),
    "while the command imports torch": ("import", "torch"),
    "during the checks (listing the images)": ("os.scandir", "DATA"),
}


@pytest.mark.parametrize("where", list(INTERRUPT_POINTS))
def test_ctrl_c_in_the_first_second_is_one_line_exit_130(
    tmp_path: Path, photo_dir: Path, where: str
) -> None:
    """SIGINT while the CLI module imports click, while the command imports torch, or during
    the checks: exit 130, one line, no traceback. The child raises the signal itself
    from an audit hook at that exact point (once the CLI module has started), so it lands
    there on any machine, never after the command finished."""
    event, arg = INTERRUPT_POINTS[where]
    script = (
        "import signal, sys\n"
        "event, arg = sys.argv[1], sys.argv[2]\n"
        "def hook(name, args):\n"
        "    if name == event and args and str(args[0]) == arg and 'dcvit_deploy.cli' in "
        "sys.modules and not getattr(hook, 'sent', False):\n"
        "        hook.sent = True\n"
        "        sys.stdout.write(f'SIGINT at {name} {arg}\\n'); sys.stdout.flush()\n"
        "        signal.raise_signal(signal.SIGINT)\n"
        "sys.addaudithook(hook)\n"
        "from dcvit_deploy.cli import main\n"
        "main(sys.argv[3:])\n"
    )
    args = compress(photo_dir, tmp_path / "run", "--dry-run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, event, str(photo_dir) if arg == "DATA" else arg, *args],
        capture_output=True,
        env=env,
        text=True,
        timeout=120,
    )
    assert done.stdout.startswith("SIGINT at "), (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines() == ["interrupted: rerun the same command to resume"]
    assert "dry run" not in done.stdout


def test_demo_data_into_an_unwritable_folder_is_one_line() -> None:
    code, out, err = run_cli(["demo-data", "/proc/demo"])
    assert_one_line_error(code, out, err, "/proc/demo", "not writable")


def test_usage_errors_are_one_line_exit_1() -> None:
    code, out, err = run_cli(["compare", "missing.json", "--baseline", "missing.json"])
    line = assert_one_line_error(code, out, err, "does not exist", "dcvit-deploy compare --help")
    assert ".;" not in line


def test_demo_writes_the_photos_and_runs_compress_with_overridable_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["demo", "--dry-run", "--targets", "15%,30%", "--out", "runs/other"])
    assert code == 0, err
    assert len(list((tmp_path / "runs" / "demo-images").iterdir())) == 64
    assert "wrote 64 bundled photos to runs/demo-images" in err
    assert "dry run: every check passed" in out
    assert "dcvit 15.00%" in out and "dcvit 30.00%" in out and "dcvit 10.00%" not in out
    assert str(tmp_path / "runs" / "other") in out and not (tmp_path / "runs" / "demo").exists()
    assert "at least 1.15x faster than the original" in out
    code, _, err = run_cli(["demo", "--dry-run"])  # the photos are there: not written again
    assert code == 0 and "bundled photos" not in err
