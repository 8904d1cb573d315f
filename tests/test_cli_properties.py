"""Property: any combination of ``compress`` options either passes every check (exit 0, the plan
on stdout) or fails with exactly one line on stderr (exit 1) -- never a traceback.

Driven through ``--dry-run``, which runs all of :mod:`dcvit_deploy.config.validate` and no work, on
the
tiny ViT of ``conftest.py``. Seeded (``derandomize``) so every run checks the same cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes.runs import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GOOD_KWARGS = "img_size=32 patch_size=8 embed_dim=64 depth=4 num_heads=2 num_classes=10"

# Each option: (good values, bad values), the cases among the bad ones. Good values are
# drawn about 6 times in 7, so many command lines get past the first checks and the later ones
# (model structure, targets against the feasible range, profile and budget) are exercised too.
OPTIONS: dict[str, tuple[list[str], list[str]]] = {
    "--model-kwargs": (
        [GOOD_KWARGS, "img_size=32 patch_size=8 embed_dim=64 depth=2 num_heads=2"],
        ["img_size=32 patch_size=8 embed_dim=64 num_heads=3 depth=4",  # timm asserts
         "img_size=32 patch_size=8 embed_dim=64 depth=4 num_heads=2 bogus=1",  # TypeError
         "img_size=30 patch_size=8 embed_dim=64 depth=4 num_heads=2",
         "depth",  # not key=value
         "img_size=32 patch_size=0 embed_dim=64 depth=4 num_heads=2"],
    ),
    "--iterations": (["1", "3"], ["0", "-1", "x"]),
    "--rank-iterations": (["2"], ["0"]),
    "--lr": (["1e-3", "0.5"], ["-1", "0", "nan", "inf", "abc"]),
    "--inversion-iterations": (["2"], ["0", "-5"]),
    "--train-batch-size": (["4", "1"], ["0", "-2"]),
    "--batch-size": (["1"], ["0", "2", "-1"]),
    "--num-samples": (["1", "4", "6", "1000"], ["0", "-1"]),
    "--holdout": (["1", "2", "1000"], ["0", "-3"]),
    "--targets": (
        ["10%,25%", "10%:40%:5%", "0.1,0.2", "30%", "8%:46%:0.25%"],
        ["99%", "0%", "150%", "5%:40%:5%", "0.001%:38.001%:0.001%", "", "abc", "10%:5%:1%",
         "1:2", "5%:40%:0%", "nan", "1e-3", "1%:99%:0.0000001%"],
    ),
    "--round-to": (["1", "8", "64"], ["0", "-1", "100000"]),
    "--warm-fraction": (["0.5", "1"], ["-1", "0", "1.5", "nan"]),
    "--blocks": (["1-2", "1,2", "0-3", "2"], ["0-99", "5-3", "x", "-1", "1--2",
                                            "0-99999999999999", ""]),
    "--img-size": (["32"], ["64", "0", "-8", "33"]),
    "--mean": (["0.5", "0.5,0.5,0.5"], ["0.5,0.5", "a", "nan"]),
    "--std": (["0.2", "0.2,0.2,0.2"], ["0", "-1", "0.2,0.2,0.2,0.2"]),
    "--crop-pct": (["0.9", "1"], ["0", "2", "nan"]),
    "--interpolation": (["bicubic"], ["nope"]),
    "--latency-ms": (["5", "1e-9", "1e308"], ["inf", "nan", "-1", "0"]),
    "--speedup": (["1.3"], ["1", "0.5", "inf", "nan"]),
    "--margin": (["5%", "0.5", "99"], ["-1", "100%", "abc", "nan"]),
    "--statistic": (["p50", "p99"], ["p42"]),
    "--method": (["dcvit", "practise", "dcvit,practise"], ["nope", "dcvit,dcvit", ""]),
    "--schedule": (["tiny", "default", "paper"], ["nope"]),
    "--metric-set": (["real", "synthetic"], ["nope"]),
    "--inversion": (["paper", "fast"], ["nope"]),
    "--neuron-choice": (["weight", "activation"], ["nope"]),
    "--seed": (["0", "7", "4294967295"], ["-1", "4294967296"]),
    "--device": (["cpu", "auto"], ["gpu", "cuda"]),
    "--profile": (["cpu-ort"], ["no-such-profile", "missing/file.toml", "{tmp}/file"]),
    "--search": (["all", "bisect"], ["binary"]),
    "--prefer": (["capacity", "fidelity"], ["speed"]),
    "--triton-model-name": (["vit_s", "model.v2"], ["a/b", "..", ""]),
    "--opset": (["17"], ["0"]),
}  # fmt: skip
FLAGS = ["--no-original", "--no-reuse", "--json", "--triton-pareto", "--no-confirm"]
PATHS: dict[str, tuple[list[str], list[str]]] = {
    "--out": (["{tmp}/run"], ["/proc/x", "{tmp}/file", "{tmp}/file/run"]),
    "--triton-repo": (["{tmp}/triton"], ["/proc/triton", "{tmp}/file"]),
    "--checkpoint": ([], ["{tmp}/missing.safetensors", "{tmp}/file", "{tmp}/empty"]),
    "--data": (["{photos}"], ["{tmp}/missing", "{tmp}/empty", "{tmp}/file"]),
}
MODELS = (["vit_tiny_patch16_224"], ["vit_nope", "swin_tiny_patch4_window7_224"])


def value(pair: tuple[list[str], list[str]]) -> st.SearchStrategy[str]:
    """A good value about 6 times in 7, else a bad one."""
    good, bad = pair
    if not good:
        return st.sampled_from(bad)
    weight = max(1, -(-6 * len(bad) // len(good)))
    return st.sampled_from(good * weight + bad)


@st.composite
def command_lines(draw: st.DrawFn) -> list[tuple[str, ...]]:
    """A ``compress`` command line as (option, value...) groups; paths are templates."""
    groups: list[tuple[str, ...]] = [("--model", draw(value(MODELS)))]
    weights = draw(st.sampled_from(["random"] * 12 + ["checkpoint", "both", "none", "cache"]))
    if weights in ("random", "both"):
        groups.append(("--random-init",))
    if weights == "cache":  # nothing is in this machine's hub cache: refused up front
        groups.append(("--pretrained-cache",))
    if weights in ("checkpoint", "both"):
        groups.append(("--checkpoint", draw(value(PATHS["--checkpoint"]))))
    # the default targets (5%:40%:5%) start below what the tiny ViT can reach: always given
    groups.append(("--model-kwargs", draw(value(OPTIONS["--model-kwargs"]))))
    groups.append(("--targets", draw(value(OPTIONS["--targets"]))))
    groups.append(("--data", draw(value(PATHS["--data"]))))
    groups.append(("--out", draw(value(PATHS["--out"]))))
    if draw(st.booleans()):
        groups.append(("--triton-repo", draw(value(PATHS["--triton-repo"]))))
    names = sorted(set(OPTIONS) - {"--model-kwargs", "--targets"})
    for name in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)):
        groups.append((name, draw(value(OPTIONS[name]))))
    for flag in draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True)):
        groups.append((flag,))
    return groups


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("props")
    (tmp / "empty").mkdir()
    (tmp / "file").write_text("not a folder, not a checkpoint")
    return {"tmp": str(tmp), "photos": str(photo_dir)}


@settings(
    max_examples=220,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(groups=command_lines())
def test_any_option_combination_runs_or_fails_in_one_line(
    groups: list[tuple[str, ...]], places: dict[str, str]
) -> None:
    args = ["compress", "--dry-run"]
    for group in groups:
        args += [part.format(**places) for part in group]
    code, out, err = run_cli(args)
    assert "Traceback" not in out + err, (args, err)
    assert code in (0, 1), (args, code, err)
    if code == 1:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert "fix: " in lines[0], (args, err)
    else:
        assert "dry run" in out or '"dry_run": true' in out, (args, out)
        assert not (Path(places["tmp"]) / "run").exists(), "a dry run created the run directory"
