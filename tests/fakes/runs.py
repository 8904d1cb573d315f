"""What the end-to-end tests share: the tiny model's command line, fast profiles, option
records, and the CLI run in-process."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

TINY_VIT_KWARGS = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 2,
    "num_classes": 10,
}
TINY_KWARGS = " ".join(f"{k}={v}" for k, v in TINY_VIT_KWARGS.items())
MODEL = ["--model", "vit_tiny_patch16_224", "--random-init", "--model-kwargs", TINY_KWARGS]
FAST = ["--schedule", "tiny", "--iterations", "2", "--inversion-iterations", "2",
        "--num-samples", "4", "--holdout", "2"]  # fmt: skip

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

SCRIPTED_PROFILE = FAST_PROFILE.replace('"onnxruntime"', '"scripted"')
"""The fast profile on the scripted backend (``fakes/scripted``): ONNX Runtime CPU artifacts,
latencies from the test's script."""


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from dcvit_deploy.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def run_cli_text(args: list[str]) -> tuple[int, str]:
    """Run the CLI in-process; return (exit code, stderr and stdout as one text, in order)."""
    from dcvit_deploy.cli import main

    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main(args)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, buf.getvalue()


def first_json(text: str) -> Any:
    """The first JSON document in ``text`` (``--json`` output after any progress lines)."""
    return json.JSONDecoder().raw_decode(text[text.index("{") :])[0]


def copts(data: Path, **kw: object) -> Any:
    """CompressOptions for the tiny random-init ViT (two targets, the tiny schedule)."""
    from dcvit_deploy.api import CompressOptions

    base: dict[str, object] = {
        "model": "vit_tiny_patch16_224",
        "data": str(data),
        "random_init": True,
        "model_kwargs": dict(TINY_VIT_KWARGS),
        "num_samples": 4,
        "holdout": 2,
        "targets": (0.10, 0.25),
        "schedule": "tiny",
        "iterations": 2,
        "inversion_iterations": 2,
    }
    base.update(kw)
    return CompressOptions(**base)  # type: ignore[arg-type]


def dopts(profile: str, **kw: object) -> Any:
    """DeployOptions on ``profile`` with no fresh-process confirmation (unless asked)."""
    from dcvit_deploy.api import DeployOptions

    return DeployOptions(**{"profile": profile, "confirm": False, **kw})  # type: ignore[arg-type]


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def family_names(out: Path) -> list[str]:
    return [c["name"] for c in manifest(out)["units"]["family"]["result"]["candidates"]]


def named(out: Path) -> dict[str, str]:
    """Each candidate of the run's family by its short name: ``dcvit-1003`` for
    ``dcvit-1003-n1h221`` (the scripted backend's keys), ``original`` for itself."""
    return {n if n == "original" else n.rsplit("-", 1)[0]: n for n in family_names(out)}


SMALL = ["--num-samples", "4", "--holdout", "2", "--targets", "10%,25%"]


def compress(photo_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", *MODEL, "--data", str(photo_dir), *SMALL, "--out", str(out), *extra]


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 1, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: ") and "; fix: " in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def model_copts(**changes: object) -> Any:
    """Options for up-front checks of the tiny ViT (no images read)."""
    import dataclasses

    from dcvit_deploy.config.options import CompressOptions

    base = CompressOptions(
        model="vit_tiny_patch16_224",
        data="unused",
        random_init=True,
        model_kwargs=dict(TINY_VIT_KWARGS),
        num_samples=4,
        holdout=2,
        targets=(0.10, 0.25),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def copy_of_run(out: Path, tmp_path: Path) -> Path:
    """A private copy of a shared run, for a test whose decision rewrites ``triton/`` (a run
    directory is movable: its manifest records paths relative to its root)."""
    import shutil

    dest = tmp_path / "r"
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns(".lock", ".lock.json"))
    return dest


def served(out: Path, model: str = "dcvit_vit_tiny_patch16_224") -> str:
    """The candidate of the one version ``model``'s ``config.pbtxt`` serves in the run's Triton
    repository (a pick an older version holds is served again, not copied)."""
    import re

    root = out / "triton" / model
    m = re.search(r"versions:\s*(\d+)", (root / "config.pbtxt").read_text())
    assert m is not None, "config.pbtxt serves no specific version"
    return json.loads((root / m.group(1) / "deploy.json").read_text())["source"]["candidate"]
