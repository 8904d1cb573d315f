"""Up-front checks (:mod:`dcvit_deploy.config.validate`) and the model loader's refusals: each bad
value
is refused with one line naming it and the fix, before any work."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
from pathlib import Path

import pytest
from fakes.runs import TINY_VIT_KWARGS, model_copts

from dcvit_deploy.config.options import (
    MAX_TARGETS,
    DeployOptions,
    targets_from_text,
)
from dcvit_deploy.config.validate import (
    Validated,
    check_checkpoint,
    check_deploy_options,
    check_manifest,
    check_model,
    check_writable_dir,
    plan_targets,
    validate_run,
    validate_stage,
)
from dcvit_deploy.errors import (
    CheckpointMismatchError,
    OptionError,
    PathNotWritable,
    RunDirError,
    UnsupportedModelError,
    UserInputError,
)

MODEL = "vit_tiny_patch16_224"
GEOMETRY = {"embed_dim": 64, "depth": 4, "num_heads": 2}  # the rest comes from the checkpoint


copts = model_copts


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"iterations": 0}, "--iterations"),
        ({"iterations": -1}, "--iterations"),
        ({"rank_iterations": 0}, "--rank-iterations"),
        ({"lr": -1.0}, "--lr"),
        ({"lr": 0.0}, "--lr"),
        ({"lr": math.nan}, "--lr"),
        ({"lr": math.inf}, "--lr"),
        ({"inversion_iterations": 0}, "--inversion-iterations"),
        ({"batch_size": 0}, "--train-batch-size"),
        ({"num_samples": 0}, "--num-samples"),
        ({"holdout": 0}, "--holdout"),
        ({"round_to": 0}, "--round-to"),
        ({"warm_fraction": -1.0}, "--warm-fraction"),
        ({"warm_fraction": 0.0}, "--warm-fraction"),
        ({"warm_fraction": 1.5}, "--warm-fraction"),
        ({"targets": ()}, "no compression targets"),
        ({"targets": (0.0,)}, "between 0% and 100%"),
        ({"targets": tuple(i / 1000 for i in range(1, 300))}, f"at most {MAX_TARGETS}"),
        ({"methods": ()}, "no compression method"),
        ({"methods": ("nope",)}, "--method"),
        ({"methods": ("dcvit", "dcvit")}, "twice"),
        ({"schedule": "fast"}, "--schedule"),
        ({"metric": "fake"}, "--metric-set"),
        ({"inversion": "slow"}, "--inversion"),
        ({"neuron_choice": "best"}, "--neuron-choice"),
        ({"device": "tpu"}, "--device"),
        ({"seed": -1}, "--seed"),
        ({"seed": 2**40}, "--seed"),
        ({"candidate_blocks": ()}, "--blocks"),
        ({"candidate_blocks": (-1, 2)}, "--blocks"),
        ({"random_init": False}, "exactly one weight source"),
        ({"checkpoint": "w.pth"}, "exactly one weight source"),
    ],
)
def test_compress_option_checks(changes: dict, needle: str) -> None:
    with pytest.raises(OptionError) as info:  # the record refuses itself on construction
        copts(**changes)
    assert needle in info.value.one_line() and "; fix: " in info.value.one_line()


def test_good_compress_options_pass() -> None:
    assert copts().methods == ("dcvit",)
    assert copts(methods=("dcvit", "practise"), num_samples=None, lr=1e-4).lr == 1e-4


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"latency_ms": math.inf}, "--latency-ms"),
        ({"latency_ms": math.nan}, "--latency-ms"),
        ({"latency_ms": 0.0}, "--latency-ms"),
        ({"speedup": 1.0}, "--speedup"),
        ({"speedup": math.inf}, "--speedup"),
        ({"latency_ms": 5.0, "speedup": 2.0}, "both given"),
        ({"margin": 1.0}, "--margin"),
        ({"margin": -0.1}, "--margin"),
        ({"margin": math.nan}, "--margin"),
        ({"batch_size": 0}, "--batch-size"),
        ({"statistic": "p42"}, "--statistic"),
        ({"search": "binary"}, "--search"),
        ({"prefer": "speed"}, "--prefer"),
        ({"opset": 0}, "--opset"),
        ({"triton_model_name": "_x"}, "--triton-model-name"),
        ({"triton_model_name": "a/b"}, "--triton-model-name"),
        ({"triton_model_name": ".."}, "--triton-model-name"),
    ],
)
def test_deploy_option_checks(changes: dict, needle: str) -> None:
    with pytest.raises(OptionError) as info:
        check_deploy_options(dataclasses.replace(DeployOptions(), **changes))  # type: ignore[arg-type]
    assert needle in info.value.one_line()


def test_budget_required_only_where_the_command_selects() -> None:
    check_deploy_options(DeployOptions())
    with pytest.raises(OptionError, match="needs a budget"):
        check_deploy_options(DeployOptions(), need_budget=True)
    check_deploy_options(DeployOptions(speedup=1.5), need_budget=True)


def test_target_ranges_are_capped_before_they_are_expanded() -> None:
    assert targets_from_text("10%:30%:10%") == (0.1, 0.2, 0.3)
    assert targets_from_text("5%:10%:2.5%") == pytest.approx((0.05, 0.075, 0.10))
    assert targets_from_text("5:10:2.5") == pytest.approx((0.05, 0.075, 0.10))
    assert targets_from_text("0.25, 16.6%") == pytest.approx((0.166, 0.25))
    with pytest.raises(OptionError, match="cannot read target 'abc'"):
        targets_from_text("abc")
    with pytest.raises(OptionError, match="cannot read target 'a'"):
        targets_from_text("a:b:c")  # a syntax error, not a traceback
    with pytest.raises(OptionError, match="38001 targets"):
        targets_from_text("0.001%:38.001%:0.001%")
    with pytest.raises(OptionError, match="targets"):  # would allocate 10**12 floats
        targets_from_text("1%:99%:0.0000000001%")
    with pytest.raises(UserInputError, match="between 0% and 100%"):
        targets_from_text("150%")


# --------------------------------------------------------------------------- file system


def test_writable_dir_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nested = tmp_path / "a" / "b"
    assert check_writable_dir(nested, "--out") == nested
    assert not (tmp_path / "a").exists()  # nothing created
    assert not list(tmp_path.iterdir())  # the probe file is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(PathNotWritable, match="not a directory"):
        check_writable_dir(tmp_path / "f", "--out")
    with pytest.raises(PathNotWritable, match=r"cannot be created: .* is a file"):
        check_writable_dir(tmp_path / "f" / "run", "--out")
    with pytest.raises(PathNotWritable, match="--triton-repo /proc/triton is not writable"):
        check_writable_dir("/proc/triton", "--triton-repo")

    import tempfile

    def enospc(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", enospc)
    with pytest.raises(PathNotWritable, match="the file system is full"):
        check_writable_dir(tmp_path / "run", "--out")


def _tiny_state_dict() -> dict:
    import timm

    model = timm.create_model(MODEL, pretrained=False, **TINY_VIT_KWARGS)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_checkpoint_is_refused_naming_the_first_tensor(
    tmp_path: Path, bad: float
) -> None:
    from safetensors.torch import save_file

    sd = _tiny_state_dict()
    sd["blocks.2.attn.qkv.weight"][0, 0] = bad
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        check_checkpoint(path)
    line = info.value.one_line()
    assert "blocks.2.attn.qkv.weight" in line and "1 of" in line
    assert ("NaN" if math.isnan(bad) else "infinite") in line

    from dcvit_deploy.model.loading import load_model

    with pytest.raises(CheckpointMismatchError, match=r"blocks\.2\.attn\.qkv\.weight"):
        load_model(MODEL, checkpoint=path, model_kwargs=GEOMETRY)


def test_checkpoint_directory_and_pickles(tmp_path: Path) -> None:
    import torch

    with pytest.raises(UserInputError, match="is a directory"):
        check_checkpoint(tmp_path)
    path = tmp_path / "full.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a whole pickled module
    with pytest.raises(UserInputError) as info:
        check_checkpoint(path)
    line = info.value.one_line()
    assert "pickled Python objects" in line and "Unsupported global" in line
    assert "torch.nn.modules.linear.Linear" in line and "\n" not in line


def test_manifest_checks(tmp_path: Path) -> None:
    check_manifest(tmp_path)  # no manifest: a new run
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RunDirError, match="corrupt"):
        check_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"steps": []}))
    with pytest.raises(RunDirError, match=r"not a dcvit-deploy manifest .*missing key 'identity'"):
        check_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 2, "identity": {}}))
    check_manifest(tmp_path)


def test_report_file_checks(tmp_path: Path) -> None:
    from fakes.report_inputs import family, write

    from dcvit_deploy.reports.writers import load_report

    path = write(tmp_path, family())["paths"]["json"]
    assert load_report(path)["kind"] == "dcvit-deploy/report"
    data = json.loads(path.read_text())
    data["candidates"][0]["macs"] = "many"
    path.write_text(json.dumps(data))
    with pytest.raises(UserInputError, match=r"report.json is .*not a dcvit-deploy report .*macs"):
        load_report(path)
    with pytest.raises(UserInputError, match=r"missing\.json not found"):
        load_report(tmp_path / "missing.json")


# --------------------------------------------------------------------------- model geometry


def test_model_facts_match_the_planner() -> None:
    from dcvit_deploy.compress.macs import geometry_of
    from dcvit_deploy.compress.plan import feasible_range

    facts = check_model(copts())
    assert facts.depth == 4 and facts.input_size == (3, 32, 32) and facts.patch_size == (8, 8)
    assert facts.candidate_blocks == (1, 2)
    import timm

    real = timm.create_model(MODEL, pretrained=False, **TINY_VIT_KWARGS)
    assert facts.geometry == geometry_of(real)
    assert facts.feasible == feasible_range(geometry_of(real), 4, 2, 1)


@pytest.mark.parametrize(
    ("changes", "error", "needle"),
    [
        ({"model_kwargs": {**TINY_VIT_KWARGS, "num_heads": 3}}, UserInputError, "num_heads=3"),
        ({"model_kwargs": {**TINY_VIT_KWARGS, "bogus": 1}}, UserInputError, "bogus=1"),
        ({"candidate_blocks": tuple(range(100))}, OptionError, "depth 4"),
        ({"round_to": 1024}, OptionError, "wider than the model's MLP"),
        ({"model": "swin_tiny_patch4_window7_224", "model_kwargs": {}},
         UnsupportedModelError, "not a plain ViT"),
    ],
)  # fmt: skip
def test_model_checks(changes: dict, error: type, needle: str) -> None:
    with pytest.raises(error) as info:
        check_model(copts(**changes))
    assert needle in info.value.one_line()


def test_input_size_must_fit_the_patch_embedding() -> None:
    from dcvit_deploy.model.images import DataOverrides

    with pytest.raises(OptionError, match=r"--img-size 64 does not fit .* 32x32"):
        check_model(copts(data_overrides=DataOverrides(img_size=64)))
    with pytest.raises(UserInputError, match="channels"):
        check_model(copts(model_kwargs={**TINY_VIT_KWARGS, "in_chans": 1}))
    dynamic = {**TINY_VIT_KWARGS, "dynamic_img_size": True}
    with pytest.raises(OptionError, match="not a multiple of the patch size"):
        check_model(copts(model_kwargs=dynamic, data_overrides=DataOverrides(img_size=36)))
    assert check_model(
        copts(model_kwargs=dynamic, data_overrides=DataOverrides(img_size=40))
    ).input_size == (3, 40, 40)


def test_checkpoint_shapes_are_checked_on_the_structure() -> None:
    sd = _tiny_state_dict()
    from_file = {"random_init": False, "checkpoint": "w.safetensors"}
    facts = check_model(copts(**from_file, model_kwargs=GEOMETRY), sd)
    assert facts.model_kwargs["num_classes"] == 10 and facts.model_kwargs["img_size"] == 32
    with pytest.raises(CheckpointMismatchError, match="missing"):
        check_model(copts(**from_file, model_kwargs={**GEOMETRY, "depth": 6}), sd)


def test_plan_targets_names_structures_and_duplicates() -> None:
    opts = copts(targets=(0.10, 0.101, 0.25), methods=("dcvit", "practise"))
    plan = plan_targets(opts, check_model(opts))
    dcvit = [p for p in plan if p.method == "dcvit"]
    assert [p.n_blocks for p in dcvit] == [1, 1, 2] and dcvit[0].hidden is not None
    practise = [p for p in plan if p.method == "practise"]
    assert all(p.hidden is None for p in practise)
    assert practise[1].same_as == 0.10 and "drop 1 whole block" in practise[1].describe()
    with pytest.raises(OptionError, match="feasible range"):
        plan_targets(copts(targets=(0.6,)), check_model(copts()))


def test_blocks_option_widens_the_feasible_range() -> None:
    narrow = check_model(copts()).feasible
    wide = check_model(copts(candidate_blocks=(0, 1, 2, 3))).feasible
    assert wide[1] > narrow[1]
    opts = copts(candidate_blocks=(1,), targets=(0.3,))
    with pytest.raises(OptionError, match="allow more --blocks"):
        plan_targets(opts, check_model(opts))


# --------------------------------------------------------------------------- entry points


def test_validate_run_returns_what_it_loaded(tmp_path: Path, photo_dir: Path) -> None:
    opts = copts(data=str(photo_dir), holdout=1000)
    v = validate_run(opts, DeployOptions(latency_ms=5.0), tmp_path / "run")
    assert isinstance(v, Validated) and v.image_count == 6 and v.images is not None
    assert v.profile is not None and v.profile.name == "cpu-ort"
    assert v.budget is not None and v.budget.ms == 5.0
    assert [p.target for p in v.plan] == [0.10, 0.25]
    assert any("--holdout 1000" in n for n in v.notes)
    assert not (tmp_path / "run").exists()
    family_only = validate_run(opts, None, tmp_path / "run", stages=("compress",))
    assert family_only.profile is None and family_only.plan == v.plan


def test_validate_run_refuses_speedup_without_the_original(tmp_path: Path, photo_dir: Path) -> None:
    with pytest.raises(OptionError, match="--no-original"):
        validate_run(copts(data=str(photo_dir), include_original=False),
                     DeployOptions(speedup=1.5), tmp_path / "run")  # fmt: skip


def test_validate_stage(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="needs a budget"):
        validate_stage(tmp_path, DeployOptions(), need_budget=True)
    with pytest.raises(PathNotWritable, match="--triton-repo"):
        validate_stage(tmp_path, DeployOptions(triton_repo="/proc/t"), need_backend=False)
    v = validate_stage(tmp_path, DeployOptions(latency_ms=2.0), need_budget=True)
    assert v.budget is not None and v.budget.batch_size == 1


# --------------------------------------------------------------------------- models.py


def test_unknown_model_suggestions_are_supported_models_only() -> None:
    import timm
    import torch

    from dcvit_deploy.model.loading import (
        check_supported,
        create_model,
        supported_model_suggestions,
    )

    names = supported_model_suggestions("vit_base_patch16_siglp_224")
    assert names and all("siglip_2" not in n or "gap" in n for n in names)
    for name in names:
        with torch.device("meta"):
            check_supported(timm.create_model(name, pretrained=False, depth=1), name)
    with pytest.raises(UserInputError) as info:
        create_model("deit_smal")
    assert "deit_small_patch16_224" in info.value.one_line()


def test_model_kwargs_timm_rejects_are_named() -> None:
    from dcvit_deploy.model.loading import create_model

    with pytest.raises(UserInputError) as info:
        create_model(MODEL, {"embed_dim": 64, "num_heads": 3})
    line = info.value.one_line()
    assert "embed_dim=64 num_heads=3" in line and "AssertionError" in line


def test_a_corrupt_run_can_still_be_overwritten(tmp_path: Path, photo_dir: Path) -> None:
    """validate_run leaves a corrupt manifest to the run directory (``--overwrite`` moves it
    aside); the stage commands, which have no such option, refuse it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{")
    validate_run(copts(data=str(photo_dir)), None, run, stages=("compress",))
    with pytest.raises(RunDirError, match="corrupt"):
        validate_stage(run, DeployOptions(), need_backend=False)


def test_pretrained_cache_must_hold_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from dcvit_deploy.config.validate import check_pretrained_cache

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    with pytest.raises(UserInputError, match=r"not in the local Hugging Face hub cache"):
        check_pretrained_cache("vit_tiny_patch16_224")
    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}"
    )
    check_pretrained_cache("vit_tiny_patch16_224")
