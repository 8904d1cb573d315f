"""Property: any combination of ``compress`` options either passes every check (exit 0, the plan
on stdout) or fails with exactly one line on stderr (exit 1) -- never a traceback.

Driven through ``--dry-run``, which runs all of :mod:`dcvit_deploy.config.validate` and no work, on
the
tiny ViT of ``conftest.py``. Besides option values, the command lines draw model kwargs from
their grammar and the contents of the files the run reads (profile, checkpoint); the files
other commands read (a run's manifest for ``status``/``report``, reports for ``compare``) are
drawn as mutations of real ones. Seeded (``derandomize``) so every run checks the same cases.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
from fakes.runs import FAST_PROFILE, run_cli
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
    "--opset": (["17", "18"], ["0", "1", "16", "999"]),
}  # fmt: skip
FLAGS = ["--no-original", "--no-reuse", "--json", "--triton-pareto", "--no-confirm"]
PATHS: dict[str, tuple[list[str], list[str]]] = {
    "--out": (["{tmp}/run"], ["/proc/x", "{tmp}/file", "{tmp}/file/run"]),
    "--triton-repo": (["{tmp}/triton"], ["/proc/triton", "{tmp}/file"]),
    "--checkpoint": (
        ["{tmp}/good.safetensors"],
        [
            "{tmp}/missing.safetensors",
            "{tmp}/file",
            "{tmp}/empty",
            "{tmp}/overflow.safetensors",
            "{tmp}/cut.safetensors",
        ],
    ),
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


KWARG_VALUES = st.sampled_from(
    [
        "0",
        "-1",
        "1",
        "2",
        "3",
        "8",
        "16",
        "32",
        "64",
        "100",
        "0.5",
        "1e30",
        "True",
        "False",
        "None",
        "'token'",
        "'map'",
        "x",
        "(8, 8)",
    ]
)
KWARGS = ["img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes", "mlp_ratio",
          "class_token", "reg_tokens", "global_pool", "no_embed_class", "qkv_bias", "in_chans",
          "init_values", "dynamic_img_size", "pos_embed", "bogus"]  # fmt: skip


@st.composite
def model_kwargs(draw: st.DrawFn) -> str:
    """The tiny ViT's kwargs with a few keys of timm's ViT constructor set to drawn values."""
    kw = dict(part.split("=") for part in GOOD_KWARGS.split())
    for key in draw(st.lists(st.sampled_from(KWARGS), min_size=1, max_size=3, unique=True)):
        kw[key] = draw(KWARG_VALUES)
    return " ".join(f"{k}={v}" for k, v in kw.items())


PROFILE_EDITS = st.sampled_from([
    ('"test-cpu"', '"../../x"'), ('"test-cpu"', '"my/ort"'), ('"test-cpu"', '""'),
    ('"test-cpu"', "5"), ("[1, 2]", "[1, 99999999999]"), ("[1, 2]", '"1"'), ("[1, 2]", "[]"),
    ("budget_batch_size = 1", "budget_batch_size = 3"), ('"p50"', '"p42"'),
    ("window_iters = 5", 'window_iters = "x"'), ("min_windows = 2", "min_windows = 1e400"),
    ("intra_op_num_threads = 1", "intra_op_num_threads = -4"), ("[measure]", "measure = 5"),
    ('"host"', '"device_compute"'), ("\n", "\n["), ("", ""),
])  # fmt: skip


@st.composite
def profile_files(draw: st.DrawFn) -> str:
    """A profile file (a template path) holding a drawn edit of a valid profile, or raw bytes."""
    if draw(st.integers(0, 5)) == 0:
        blob = draw(st.binary(min_size=1, max_size=64))
    else:
        old, new = draw(PROFILE_EDITS)
        blob = FAST_PROFILE.replace(old, new, 1).encode() if old else FAST_PROFILE.encode()
    name = f"p{hashlib.sha1(blob).hexdigest()[:12]}.toml"
    return f"{{tmp}}/profiles/{name}\0{blob.hex()}"


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
    kwargs = draw(st.one_of(value(OPTIONS["--model-kwargs"]), model_kwargs()))
    if weights in ("checkpoint", "both"):  # the checkpoint sets the rest of the geometry
        kwargs = "embed_dim=64 depth=4 num_heads=2" if "depth=4" in kwargs else kwargs
    groups.append(("--model-kwargs", kwargs))
    groups.append(("--targets", draw(value(OPTIONS["--targets"]))))
    groups.append(("--data", draw(value(PATHS["--data"]))))
    groups.append(("--out", draw(value(PATHS["--out"]))))
    if draw(st.booleans()):
        groups.append(("--triton-repo", draw(value(PATHS["--triton-repo"]))))
    if draw(st.integers(0, 3)) == 0:
        groups.append(("--profile", draw(profile_files())))
    names = sorted(set(OPTIONS) - {"--model-kwargs", "--targets"})
    for name in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)):
        groups.append((name, draw(value(OPTIONS[name]))))
    for flag in draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True)):
        groups.append((flag,))
    return groups


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> dict[str, str]:
    import timm
    import torch
    from fakes.runs import TINY_VIT_KWARGS
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("props")
    (tmp / "empty").mkdir()
    (tmp / "profiles").mkdir()
    (tmp / "file").write_text("not a folder, not a checkpoint")
    sd = timm.create_model("vit_tiny_patch16_224", **TINY_VIT_KWARGS).state_dict()
    save_file(sd, str(tmp / "good.safetensors"))
    (tmp / "cut.safetensors").write_bytes((tmp / "good.safetensors").read_bytes()[:5000])
    sd["blocks.1.mlp.fc1.weight"] = torch.full_like(sd["blocks.1.mlp.fc1.weight"], 3e38)
    save_file(sd, str(tmp / "overflow.safetensors"))  # finite weights, NaN at the first forward
    return {"tmp": str(tmp), "photos": str(photo_dir)}


def materialise(part: str, places: dict[str, str]) -> str:
    """A command-line part; a drawn file (``path\\0hex``) is written first."""
    path, _, blob = part.format(**places).partition("\0")
    if blob:
        Path(path).write_bytes(bytes.fromhex(blob))
    return path


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
        args += [materialise(part, places) for part in group]
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


# ------------------------------------------------------------ files the other commands read

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=2),
    max_leaves=4,
)  # fmt: skip


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    inner = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    return [prefix] + [p for k, v in inner for p in _paths(v, (*prefix, k))]


@st.composite
def mutated(draw: st.DrawFn, base: dict) -> dict:
    """``base`` with one or two nodes replaced by drawn JSON values, or deleted."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from([p for p in _paths(doc) if p]))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
    return doc


def assert_ran_or_one_line(args: list[str], codes: tuple[int, ...] = (0, 1)) -> None:
    code, out, err = run_cli(args)
    assert "Traceback" not in out + err, (args, err)
    assert code in codes, (args, code, err)
    if code == 1:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "fix: " in lines[0], err


FILE_SETTINGS = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])  # fmt: skip


@pytest.fixture(scope="module")
def family_run(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    from fakes.runs import copts

    from dcvit_deploy.api import DeployOptions, run_pipeline

    out = tmp_path_factory.mktemp("family") / "r"
    run_pipeline(copts(photo_dir, targets=(0.25,)), DeployOptions(), out, stop_after="family")
    return out


@FILE_SETTINGS
@given(data=st.data())
def test_any_manifest_is_read_or_refused_in_one_line(data: st.DataObject, family_run: Path) -> None:
    manifest = family_run / "manifest.json"
    base = json.loads(manifest.read_text())
    try:
        manifest.write_text(json.dumps(data.draw(mutated(base))))
        for command in ("status", "report"):
            assert_ran_or_one_line([command, "--out", str(family_run)])
    finally:
        manifest.write_text(json.dumps(base))


@pytest.fixture(scope="module")
def good_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fakes.report_inputs import family, write

    return write(tmp_path_factory.mktemp("report"), family())["paths"]["json"]


@FILE_SETTINGS
@given(data=st.data())
def test_any_report_given_to_compare_is_compared_or_refused_in_one_line(
    data: st.DataObject, good_report: Path
) -> None:
    bad = good_report.with_name("drawn.json")
    bad.write_text(json.dumps(data.draw(mutated(json.loads(good_report.read_text())))))
    for pair in ((bad, good_report), (good_report, bad)):
        assert_ran_or_one_line(["compare", str(pair[0]), "--baseline", str(pair[1])], (0, 1, 4))
