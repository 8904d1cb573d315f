"""Inputs the run trusts: names that become paths, option values that only the real run would
refuse, model kwargs that build but cannot run, files read back, weights that give NaN at the
first forward. Each is refused in one line before any work, and a failing rerun never destroys
what an earlier run computed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fakes.runs import (
    FAST_PROFILE,
    TINY_VIT_KWARGS,
    assert_one_line_error,
    copts,
    dopts,
    manifest,
    run_cli,
)

from dcvit_deploy.api import run_pipeline
from dcvit_deploy.config.options import DeployOptions
from dcvit_deploy.errors import DcvitError, ExportError, OptionError, UserInputError

KWARGS = "img_size=32 patch_size=8 embed_dim=64 depth=4 num_heads=2 num_classes=10"


def dry_run(photo_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", "--model", "vit_tiny_patch16_224", "--data", str(photo_dir),
            "--num-samples", "4", "--holdout", "2", "--targets", "10%,25%",
            "--out", str(out), "--dry-run", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("prof") / "inputs-cpu.toml"
    p.write_text(FAST_PROFILE.replace('"test-cpu"', '"inputs-cpu"').replace("[1, 2]", "[1]"))
    return str(p)


# ----------------------------------------------------------------------------- 2 names -> paths


@pytest.mark.parametrize("name", ["../../x", "my/ort", "", ".", "..", ".hidden", "a" * 300])
def test_a_profile_name_that_is_not_one_path_component_is_refused(
    tmp_path: Path, photo_dir: Path, name: str
) -> None:
    prof = tmp_path / "p.toml"
    prof.write_text(FAST_PROFILE.replace('"test-cpu"', json.dumps(name)))
    out = tmp_path / "deep" / "run"
    code, stdout, err = run_cli([*dry_run(photo_dir, out, "--random-init", "--model-kwargs",
                                           KWARGS, "--profile", str(prof))])  # fmt: skip
    line = assert_one_line_error(code, stdout, err, "p.toml", "name")
    assert "letters, digits" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml"]


def test_the_run_directory_refuses_paths_outside_its_root(tmp_path: Path) -> None:
    from dcvit_deploy.errors import RunDirError
    from dcvit_deploy.store.rundir import RunDir

    with RunDir.open(tmp_path / "run", {"model": "m"}) as run:
        for bad in ("../x", "raw/../../x", "/etc", "raw/../../run2/x"):
            with pytest.raises(RunDirError, match="outside the run directory"):
                run.sub(bad)
            with pytest.raises(RunDirError, match="outside the run directory"):
                run.resolve(bad if not bad.startswith("/") else "../../etc/passwd")
        assert run.sub("raw/p").is_dir() and run.sub("logs/a.log", file=True).parent.is_dir()
        from dcvit_deploy.pipeline.units.compressing import current_family

        entry = {"name": "../../x", "weights_sha256": "0"}
        run.record_unit("family", {"status": "ok", "result": {"candidates": [entry]}})
        with pytest.raises(UserInputError, match=r"manifest\.json: .*candidate name '\.\./\.\./x'"):
            current_family(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ----------------------------------------------------------------------------- 3 opset, reruns


@pytest.mark.parametrize("opset", [1, 16, 999])
def test_an_opset_the_exporter_cannot_write_is_refused_with_the_range(opset: int) -> None:
    from dcvit_deploy.config.validate import check_deploy_options

    with pytest.raises(OptionError) as info:
        check_deploy_options(DeployOptions(opset=opset))
    line = info.value.one_line()
    assert f"--opset {opset}" in line and "17.." in line
    check_deploy_options(DeployOptions(opset=18))


def test_a_failing_rerun_keeps_the_good_work_and_names_the_cause(
    tmp_path: Path, photo_dir: Path, profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r"
    options = copts(photo_dir, targets=(0.25,))
    good = run_pipeline(options, dopts(profile, latency_ms=1000.0), out)
    figures = {o.candidate: o.latency_at(1).p50 for o in good.outcomes}
    assert good.selection and good.selection.chosen and len(figures) == 2
    files = {
        p: p.read_bytes()
        for p in out.rglob("*")
        if p.suffix in (".onnx", ".json")
        and p.parent.name != "reports"
        and p.name not in ("manifest.json", ".lock.json")
    }
    before = (out / "manifest.json").read_bytes()
    # refused up front: nothing changed
    args = ["compress", "--model", "vit_tiny_patch16_224", "--random-init", "--model-kwargs",
            KWARGS, "--data", str(photo_dir), "--out", str(out), "--opset", "999"]  # fmt: skip
    code, stdout, err = run_cli(args)
    assert_one_line_error(code, stdout, err, "--opset 999")
    assert (out / "manifest.json").read_bytes() == before

    import dcvit_deploy.export.onnx

    def broken(*args: object, **kwargs: object) -> None:
        raise ExportError("the exporter broke", "fix the exporter")

    monkeypatch.setattr(dcvit_deploy.export.onnx, "export_onnx", broken)
    with pytest.raises(DcvitError) as info:  # every export fails under a relative budget
        run_pipeline(options, dopts(profile, speedup=1.1, opset=18), out)
    line = info.value.one_line()
    assert "the exporter broke" in line and "--no-original" not in line
    assert all(p.read_bytes() == blob for p, blob in files.items()), "good files were changed"

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the original command redid a unit")

    from dcvit_deploy.pipeline.units import building as build
    from dcvit_deploy.pipeline.units import exporting as export
    from dcvit_deploy.pipeline.units import measuring as profile_unit

    for unit in (export.ExportUnit, build.BuildUnit, profile_unit.ProfileUnit):
        monkeypatch.setattr(unit, "execute", must_not_run)
    again = run_pipeline(options, dopts(profile, latency_ms=1000.0), out)
    assert {o.candidate: o.latency_at(1).p50 for o in again.outcomes} == figures
    assert again.selection and again.selection.chosen == good.selection.chosen
    units = manifest(out)["units"]
    assert all(units[u]["status"] == "ok" for u in units if u.startswith(("export", "profile")))


# ----------------------------------------------------------------------------- 14 model validity


@pytest.mark.parametrize(
    ("changes", "needle"),
    [({"depth": 0}, "depth=0"), ({"patch_size": 64}, "patch_size=64"),
     ({"img_size": 8, "patch_size": 16}, "patch_size=16")],
)  # fmt: skip
def test_model_kwargs_that_build_but_cannot_run_are_refused_in_a_dry_run(
    tmp_path: Path, photo_dir: Path, changes: dict, needle: str
) -> None:
    from fakes.runs import model_copts as model_opts

    from dcvit_deploy.config.validate import check_model

    kwargs = {**TINY_VIT_KWARGS, **changes}
    with pytest.raises(UserInputError, match=needle):
        check_model(model_opts(model_kwargs=kwargs))
    text = " ".join(f"{k}={v}" for k, v in kwargs.items())
    code, stdout, err = run_cli(dry_run(photo_dir, tmp_path / "r", "--random-init",
                                        "--model-kwargs", text))  # fmt: skip
    assert_one_line_error(code, stdout, err, needle)


# ----------------------------------------------------------------------------- 15 files read


def test_a_binary_or_mistyped_profile_is_one_line_naming_the_file(
    tmp_path: Path, photo_dir: Path
) -> None:
    cases = {
        "bin.toml": bytes(range(256)),
        "types.toml": FAST_PROFILE.replace("[1, 2]", "[1, 99999999999]").encode(),
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        code, stdout, err = run_cli(dry_run(photo_dir, tmp_path / "r", "--random-init",
                                            "--model-kwargs", KWARGS, "--profile",
                                            str(tmp_path / name)))  # fmt: skip
        assert_one_line_error(code, stdout, err, name)


MANIFESTS = [
    {"identity": {}, "schema": 2, "units": []},
    {"identity": [], "schema": 2, "units": {}},
    {"identity": {}, "schema": 2, "units": {"family": 5}},
    {"identity": {}, "schema": 2, "units": {"family": {"status": 3}}},
    {"identity": {}, "schema": 2, "units": {"family": {"status": "ok", "result": []}}},
    {"identity": {}, "schema": 2, "units": {}, "inputs": []},
    {"identity": {}, "schema": 2, "units": {}, "inputs": {"profiles": 5}},
    {"identity": {}, "schema": 2, "units": {}, "inputs": {"compress_options": {"bogus": 1}}},
    {"identity": {}, "schema": 1, "units": {}},
]


@pytest.mark.parametrize("data", MANIFESTS)
def test_a_manifest_of_the_wrong_structure_is_one_line_naming_it(tmp_path: Path, data) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(data))
    for args in (["status", "--out", str(out)], ["report", "--out", str(out)]):
        code, stdout, err = run_cli(args)
        assert_one_line_error(code, stdout, err, "manifest.json")


def _report(tmp_path: Path) -> Path:
    from fakes.report_inputs import family, write

    return write(tmp_path, family())["paths"]["json"]


def _mutations() -> list[tuple[str, object]]:
    return [
        ("schema", 99), ("candidates", None), ("candidates", [5]), ("candidates", {}),
        ("candidates.0.status", "weird"), ("candidates.0.macs", None),
        ("candidates.0.latency.0.p50", "fast"), ("budget", "x"), ("budget.ms", -1),
        ("selection", []), ("selection.reasons", 5), ("axis", None), ("axis.batch_size", "1"),
        ("candidates.0.candidate", "../x"),
    ]  # fmt: skip


def _mutate(data: dict, path: str, value: object) -> dict:
    *parents, last = path.split(".")
    node: object = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]  # type: ignore[index]
    if value is None and isinstance(node, dict):
        node.pop(last, None)
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value  # type: ignore[index]
    return data


@pytest.mark.parametrize(("path", "value"), _mutations())
def test_a_report_of_the_wrong_structure_given_to_compare_is_one_line(
    tmp_path: Path, path: str, value: object
) -> None:
    good = _report(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_mutate(json.loads(good.read_text()), path, value)))
    for report, baseline in ((bad, good), (good, bad)):
        code, stdout, err = run_cli(["compare", str(report), "--baseline", str(baseline)])
        assert_one_line_error(code, stdout, err, "bad.json")


def test_family_and_candidate_files_are_checked_on_load(tmp_path: Path) -> None:
    from dcvit_deploy.compress.candidate import read_candidate
    from dcvit_deploy.compress.family import load_family

    fam = tmp_path / "family"
    fam.mkdir()
    for text in ("[]", '{"candidates": 5}', '{"candidates": ["../x.json"]}', "\x00\xff"):
        (fam / "family.json").write_text(text, encoding="latin-1")
        with pytest.raises(UserInputError, match=r"family\.json"):
            load_family(fam)
    for text in ('{"name": 5}', "[1]", "\xff\xfe", '{"schema": 9}'):
        (fam / "c.json").write_text(text, encoding="latin-1")
        with pytest.raises(UserInputError, match=r"c\.json"):
            read_candidate(fam / "c.json")


# ----------------------------------------------------------------------------- 16 NaN at forward


def test_a_checkpoint_whose_first_forward_is_nan_is_named_before_any_work(
    tmp_path: Path, photo_dir: Path
) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT_KWARGS)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"] = torch.full_like(sd["blocks.1.mlp.fc1.weight"], 3e38)
    assert all(bool(torch.isfinite(v).all()) for v in sd.values())
    ckpt = tmp_path / "overflow.safetensors"
    save_file(sd, str(ckpt))
    geometry = "embed_dim=64 depth=4 num_heads=2"
    code, stdout, err = run_cli(dry_run(photo_dir, tmp_path / "r", "--checkpoint", str(ckpt),
                                        "--model-kwargs", geometry))  # fmt: skip
    line = assert_one_line_error(code, stdout, err, "overflow.safetensors")
    assert "lr" not in line and "not finite" in line and "blocks.1.mlp.fc1.weight" in line
    assert math.isfinite(float(sd["blocks.1.mlp.fc1.weight"].max()))
