"""A run you can trust: one regression test per defect reproduced on the run directory (the
family as the one source of truth, content fingerprints, the lock, unique names, a seeded
random teacher, repair of missing or corrupted artifacts, dead ends, per-profile reports)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes.runs import (
    FAST,
    FAST_PROFILE,
    MODEL,
    TINY_VIT_KWARGS,
    copts,
    dopts,
    family_names,
    manifest,
)
from fakes.runs import run_cli_text as run_cli

from dcvit_deploy.api import CompressOptions, run_pipeline
from dcvit_deploy.model.images import DataOverrides

# the end-to-end tests' fast profile, at batch 1 only
PROFILE = FAST_PROFILE.replace('"test-cpu"', '"trust-cpu"').replace("[1, 2]", "[1]")


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("prof") / "trust-cpu.toml"
    p.write_text(PROFILE)
    return str(p)


def p50s(result) -> dict[str, float]:
    return {o.candidate: o.latency_at(1).p50 for o in result.outcomes if o.latency_at(1)}


# ----------------------------------------------------------------------------- 1 source of truth


def test_superseded_candidate_is_never_chosen_and_triton_holds_one_model(
    tmp_path, photo_dir, profile
):
    out = tmp_path / "r"
    first = run_pipeline(copts(photo_dir), dopts(profile), out)
    assert "original" in p50s(first)
    second = run_pipeline(
        copts(photo_dir, targets=(0.15,), include_original=False), dopts(profile), out
    )
    assert family_names(out) == [o.candidate for o in second.outcomes]
    assert "original" not in family_names(out)
    only = second.outcomes[0].candidate
    # a budget the superseded original met too: were it still considered, it (the densest)
    # would be the choice
    budget = max(p50s(first)["original"], p50s(second)[only]) * 3
    code, text = run_cli(
        ["select", "--out", str(out), "--profile", profile, "--latency-ms", f"{budget:.6f}",
         "--no-confirm", "--json"]
    )  # fmt: skip
    assert code == 0, text
    payload = json.loads(text[text.index("{") :])
    assert payload["chosen"] == only != "original"
    report = json.loads((out / "report.json").read_text())
    assert [c["candidate"] for c in report["candidates"]] == [only]
    assert "original" in report["run"]["superseded"]
    models = [p.name for p in (out / "triton").iterdir() if not p.name.startswith(".")]
    assert models == ["dcvit_vit_tiny_patch16_224"]


# ----------------------------------------------------------------------------- 2 fingerprints


def test_changed_image_content_redoes_compression(tmp_path, photo_dir, profile):
    import shutil

    from PIL import Image

    data = tmp_path / "imgs"
    shutil.copytree(photo_dir, data)
    out = tmp_path / "r"
    run_pipeline(copts(data, targets=(0.25,)), dopts(profile), out, stop_after="family")
    fp = manifest(out)["units"]["family"]["fingerprint"]
    victim = sorted(data.glob("*.png"))[0]
    img = Image.open(victim).convert("RGB")
    img.rotate(90).save(victim)  # same path, same name, new content
    run_pipeline(copts(data, targets=(0.25,)), dopts(profile), out, stop_after="family")
    assert manifest(out)["units"]["family"]["fingerprint"] != fp


def test_runtime_versions_enter_build_and_profile_but_not_compression(monkeypatch, profile):
    """Upgrading ONNX Runtime keeps the finetuned family (its fingerprint is unchanged) but
    re-measures (the profile unit's basis changes)."""
    import importlib.metadata as md
    from types import SimpleNamespace

    from dcvit_deploy.config.profiles import load_profile
    from dcvit_deploy.pipeline.units.compressing import FamilyUnit
    from dcvit_deploy.pipeline.units.measuring import ProfileUnit
    from dcvit_deploy.store.atomic import fingerprint

    prep = SimpleNamespace(weights_fp="w", model_kwargs={}, input_fp="i", holdout_fp="h",
                           data_config={})  # fmt: skip
    ctx = SimpleNamespace(prep=lambda: prep, copts=copts(Path("imgs")))
    target = ProfileUnit(load_profile(profile), {}, [])
    real = md.version

    def with_ort(v: str):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(md, "version", lambda p: v if p.startswith("onnxruntime") else real(p))
        return fingerprint(FamilyUnit().inputs(ctx)), target.basis()  # type: ignore[arg-type]

    family_old, basis_old = with_ort("1.20.0")
    family_new, basis_new = with_ort("1.31.0")
    assert family_old == family_new
    assert basis_old != basis_new


def weights_of(out: Path) -> dict[str, str]:
    family = manifest(out)["units"]["family"]["result"]["candidates"]
    return {c["name"]: c["weights_sha256"] for c in family}


CHANGES = {  # before -> after, each changes the finetuned weights
    "crop_pct": ({}, {"data_overrides": DataOverrides(crop_pct=0.5)}),
    "interpolation": ({}, {"data_overrides": DataOverrides(interpolation="nearest")}),
    "holdout": ({"neuron_choice": "activation"}, {"neuron_choice": "activation", "holdout": 1}),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_an_option_that_changes_the_weights_rebuilds_them_as_a_fresh_run_does(
    tmp_path, photo_dir, profile, change
):
    before, after = CHANGES[change]

    def family(out: Path, kw: dict) -> dict[str, str]:
        options = copts(photo_dir, targets=(0.25,), **kw)
        run_pipeline(options, dopts(profile), out, stop_after="family")
        return weights_of(out)

    old = family(tmp_path / "rerun", before)
    assert family(tmp_path / "rerun", after) == family(tmp_path / "fresh", after) != old


def test_every_option_changes_the_family_identity_or_is_listed_as_not(photo_dir, tmp_path):
    """A new option cannot be forgotten: each field of the option records either changes the
    candidates' identity or is on the family unit's list of what does not change them."""
    import dataclasses

    from dcvit_deploy.pipeline.context import prepare
    from dcvit_deploy.pipeline.units.compressing import NOT_IDENTITY, family_identity
    from dcvit_deploy.store.atomic import fingerprint

    # another input size needs a model that takes it (the run refuses one that cannot)
    DYNAMIC = {"model_kwargs": {**TINY_VIT_KWARGS, "dynamic_img_size": True}}
    changed = {  # one other value per field (with what it needs to matter)
        "model": "vit_small_patch16_224", "model_kwargs": {**TINY_VIT_KWARGS, "depth": 3},
        "num_samples": 3, "holdout": ({"neuron_choice": "activation"}, 1),
        "targets": (0.3,), "methods": ("practise",), "round_to": 8, "neuron_choice": "weight",
        "reuse": True, "warm_fraction": 0.25, "schedule": "default", "iterations": 3,
        "rank_iterations": 3, "batch_size": 2, "lr": 0.5, "metric": "real",
        "inversion": "paper", "inversion_iterations": 3, "candidate_blocks": (1,),
        "include_original": False, "seed": 1,
        "img_size": (DYNAMIC, 48), "input_size": (DYNAMIC, (3, 48, 48)),
        "mean": (0.4,), "std": (0.4,),
        "interpolation": "nearest", "crop_pct": 0.5, "crop_mode": "squash",
    }  # fmt: skip
    base = copts(photo_dir)

    def identity(o: CompressOptions) -> str:
        return fingerprint(family_identity(o, prepare(o)))

    reference = identity(base)
    fields = [f.name for f in dataclasses.fields(CompressOptions) if f.name != "data_overrides"]
    fields += [f.name for f in dataclasses.fields(DataOverrides)]
    assert set(changed) | set(NOT_IDENTITY) == set(fields)
    for name, value in changed.items():
        extra, value = (
            value if isinstance(value, tuple) and isinstance(value[0], dict) else ({}, value)
        )
        if name in {f.name for f in dataclasses.fields(DataOverrides)}:
            kw = {"data_overrides": DataOverrides(**{name: value})}
        else:
            kw = {name: value}
        start = dataclasses.replace(base, **extra)
        ref = identity(start) if extra else reference
        assert identity(dataclasses.replace(start, **kw)) != ref, name
    # and what is listed does not: the same images elsewhere, the same weights from a file,
    # another device, and the held-out count where nothing but fidelity reads the held-out set
    import torch

    from dcvit_deploy.model.loading import load_model

    data = shutil.copytree(photo_dir, tmp_path / "elsewhere")
    torch.manual_seed(base.seed)
    teacher = load_model(base.model, model_kwargs=base.model_kwargs, random_init=True).model
    torch.save(teacher.state_dict(), tmp_path / "w.pth")
    same = dict(data=str(data), random_init=False, checkpoint=str(tmp_path / "w.pth"))
    for kw in (same, {"device": "cpu"}, {"holdout": 1}):
        assert identity(dataclasses.replace(base, **kw)) == reference, kw


@pytest.fixture(scope="module")
def decided(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path, profile: str) -> Path:
    """A finished run that chose and published a candidate (a budget every candidate meets)."""
    out = tmp_path_factory.mktemp("decided") / "r"
    result = run_pipeline(copts(photo_dir, targets=(0.25,)), dopts(profile, latency_ms=1e3), out)
    assert result.selection is not None and result.selection.chosen == "original"
    return out


def private_copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock", ".lock.json"))
    return dest


def test_a_moved_run_with_moved_images_redoes_nothing(
    decided, photo_dir, profile, tmp_path, monkeypatch
):
    from dcvit_deploy.pipeline import runner

    out = private_copy(decided, tmp_path / "elsewhere" / "r")
    data = shutil.copytree(photo_dir, tmp_path / "images")
    seen: list[str] = []
    real = runner.fingerprint
    monkeypatch.setattr(
        runner, "fingerprint", lambda d: seen.append(json.dumps(d, default=str)) or real(d)
    )
    result = run_pipeline(copts(data, targets=(0.25,)), dopts(profile, latency_ms=1e3), out)
    assert result.selection is not None and result.selection.chosen == "original"
    done = {k: v.get("finished") for k, v in manifest(decided)["units"].items()}
    assert {k: v.get("finished") for k, v in manifest(out)["units"].items()} == done
    places = (str(tmp_path), str(decided.parent), str(photo_dir))
    assert seen and [s for s in seen if any(p in s for p in places)] == []


def test_report_renders_the_recorded_decision_and_never_decides(decided, tmp_path):
    out = private_copy(decided, tmp_path / "r")
    served = {p: p.read_bytes() for p in (out / "triton").rglob("*") if p.is_file()}
    units = manifest(out)["units"]
    code, text = run_cli(["report", "--out", str(out)])
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert report["selection"]["chosen"] == "original"
    assert "**Chosen: `original`**" in (out / "SUMMARY.md").read_text()
    assert any(n.startswith("published original as Triton model") for n in report["run"]["notes"])
    code, text = run_cli(["report", "--out", str(out), "--latency-ms", "0.0001"])
    assert code == 1 and len(text.strip().splitlines()) == 1 and "`dcvit-deploy select" in text
    assert {p: p.read_bytes() for p in (out / "triton").rglob("*") if p.is_file()} == served
    assert manifest(out)["units"] == units
    assert json.loads((out / "report.json").read_text())["selection"]["chosen"] == "original"


def test_out_inside_data_is_left_out_of_the_images_and_a_rerun_keeps_the_family(
    tmp_path, photo_dir
):
    data = shutil.copytree(photo_dir, tmp_path / "imgs")
    out = data / "runs" / "r"
    args = ["family", *MODEL, "--data", str(data), *FAST, "--targets", "25%",
            "--out", str(out), "--json"]  # fmt: skip
    code, text = run_cli(args)
    assert code == 0, text
    finished = manifest(out)["units"]["family"]["finished"]
    shutil.copy(data / "astronaut.png", out / "pareto.png")  # as the reports write one
    for console in (args, args[:-1]):  # said once, with --json and on the console
        code, text = run_cli(console)
        assert code == 0, text
        assert manifest(out)["units"]["family"]["finished"] == finished
        said = [line for line in text.splitlines() if "left out" in line]
        assert len(said) == 1 and said[0].endswith("dcvit-deploy run runs/r"), text


# ----------------------------------------------------------------------------- 3 lock


def test_second_process_is_refused_naming_the_holder_and_first_results_stay(
    tmp_path, photo_dir, profile
):
    out = tmp_path / "r"
    # the family step alone: the lock is taken before any unit runs, deploying adds nothing here
    args = ["family", *MODEL, "--data", str(photo_dir), *FAST, "--iterations", "60",
            "--targets", "10%,25%", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "dcvit_deploy.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / ".lock.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before the second could start"
    # the second process is this one (no start-up delay: the first surely still works)
    code, text = run_cli([*args[:-4], "--targets", "30%", "--out", str(out)])
    assert code == 1, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "in use" in lines[0]
    first_out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, first_out
    assert len(family_names(out)) == 3  # original + the first run's two targets, intact
    assert not list(out.rglob("*.partial"))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from dcvit_deploy.store.rundir import RunDir

    out = tmp_path / "r"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock.json").write_text(json.dumps({"pid": dead.pid, "host": "x"}))
    with RunDir.open(out, {"model": "m", "weights": "w"}) as run:
        assert any(str(dead.pid) in n for n in run.notes)


def test_temporary_files_are_unique_per_writer(tmp_path):
    from dcvit_deploy.store.atomic import atomic_path

    with atomic_path(tmp_path / "x.json") as a, atomic_path(tmp_path / "x.json") as b:
        assert a != b
        a.write_text("first")
        b.write_text("second")
    assert (tmp_path / "x.json").read_text() == "first"  # the last rename wins, both whole


# ----------------------------------------------------------------------------- 4 names


def test_targets_that_collapse_to_one_structure_are_refused_in_one_line(tmp_path, photo_dir):
    code, text = run_cli(
        ["compress", *MODEL, "--data", str(photo_dir), *FAST, "--targets", "20.08%,20.09%",
         "--out", str(tmp_path / "r")]
    )  # fmt: skip
    assert code == 1, text
    assert len(text.strip().splitlines()) == 1 and "same structure" in text and "fix:" in text
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_candidate_names_are_unique_at_fine_target_resolution():
    from dcvit_deploy.compress.procedure import candidate_name, structure_tag

    a = candidate_name("dcvit", 0.0808, structure_tag("dcvit", 1, 200))
    b = candidate_name("dcvit", 0.0809, structure_tag("dcvit", 1, 199))
    assert a != b


# ----------------------------------------------------------------------------- 5 seeded teacher


def test_random_init_is_seeded_and_the_seed_is_part_of_the_identity(photo_dir):
    from dcvit_deploy.pipeline.context import identity_of, prepare

    a, b, c = (copts(photo_dir, seed=s) for s in (0, 0, 1))
    ia, ib, ic = (identity_of(o, prepare(o)) for o in (a, b, c))
    assert ia == ib and ia["weights"] != ic["weights"]


# ----------------------------------------------------------------------------- 6 repair


def test_missing_or_corrupted_artifacts_are_rebuilt_on_rerun(tmp_path, photo_dir, profile):
    from dcvit_deploy.api import status

    out = tmp_path / "r"
    options = copts(photo_dir, targets=(0.25,))
    run_pipeline(options, dopts(profile), out)
    name = family_names(out)[-1]
    weights = out / "family" / f"{name}.safetensors"
    good = weights.read_bytes()
    blob = bytearray(good)
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert "stale" in status(out)["units"]["family"]["status"]
    result = run_pipeline(options, dopts(profile), out)
    assert any(name in n and "rebuilding" in n for n in result.notes)
    rec = manifest(out)["units"]["family"]["result"]["candidates"]
    from dcvit_deploy.store.atomic import sha256_file

    assert sha256_file(weights) == next(c for c in rec if c["name"] == name)["weights_sha256"]
    onnx = out / "onnx" / "fp32" / f"{name}.onnx"
    onnx.unlink()
    weights.unlink()
    result = run_pipeline(options, dopts(profile), out)
    assert onnx.is_file() and weights.is_file()
    assert {o.candidate: o.status for o in result.outcomes}[name] == "ok"


# ----------------------------------------------------------------------------- 7 dead ends


@pytest.mark.parametrize("content", ['{"schema": 2, "ident', "[]"])
def test_corrupt_manifest_one_line_then_overwrite_moves_it_aside(
    tmp_path, photo_dir, profile, content
):
    out = tmp_path / "r"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    code, text = run_cli(["status", "--out", str(out)])
    assert code == 1 and "corrupt" in text and "--overwrite" in text and "Traceback" not in text
    args = ["family", *MODEL, "--data", str(photo_dir), *FAST, "--targets", "25%",
            "--out", str(out)]  # fmt: skip
    code, text = run_cli([*args, "--overwrite"])  # fmt: skip
    assert code == 0, text
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(moved) == 1 and (moved[0] / "manifest.json").read_text() == content


def test_overwrite_moves_nothing_when_the_command_is_invalid(tmp_path, photo_dir, profile):
    out = tmp_path / "r"
    run_pipeline(copts(photo_dir, targets=(0.25,)), dopts(profile), out, stop_after="family")
    code, text = run_cli(
        ["compress", *MODEL, "--data", str(photo_dir), *FAST, "--targets", "25%",
         "--profile", "no-such-profile", "--out", str(out), "--overwrite"]
    )  # fmt: skip
    assert code == 1 and "no-such-profile" in text
    assert (out / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]


def test_mistyped_checkpoint_does_not_lock_the_run_to_it(tmp_path, photo_dir, profile):
    out = tmp_path / "r"
    code, text = run_cli(
        ["compress", "--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "typo.pt"),
         "--model-kwargs", "img_size=32 patch_size=8 embed_dim=64 depth=4 num_heads=2",
         "--data", str(photo_dir), *FAST, "--targets", "25%", "--out", str(out)]
    )  # fmt: skip
    assert code == 1 and "typo.pt" in text
    assert not (out / "manifest.json").exists()
    code, text = run_cli(
        ["family", *MODEL, "--data", str(photo_dir), *FAST, "--targets", "25%", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, text


# ----------------------------------------------------------------------------- 8 per profile


def test_report_without_profile_keeps_the_runs_profile_and_profiles_do_not_clobber(
    tmp_path, photo_dir, profile
):
    out = tmp_path / "r"
    options = copts(photo_dir, targets=(0.25,))
    run_pipeline(options, dopts(profile), out)
    report = json.loads((out / "report.json").read_text())
    assert len(report["candidates"]) == 2
    code, text = run_cli(["report", "--out", str(out)])
    assert code == 0, text
    again = json.loads((out / "report.json").read_text())
    assert again["profile"]["name"] == "trust-cpu" and len(again["candidates"]) == 2

    second = Path(profile).with_name("trust-cpu-2.toml")
    second.write_text(PROFILE.replace('"trust-cpu"', '"trust-cpu-2"'))
    exports = {
        k: v["finished"] for k, v in manifest(out)["units"].items() if k.startswith("export")
    }
    run_pipeline(options, dopts(str(second)), out)
    units = manifest(out)["units"]
    # switching profiles (same precision) reuses the exports; raw files are kept per profile
    assert {k: units[k]["finished"] for k in exports} == exports
    assert (out / "raw" / "trust-cpu").is_dir() and (out / "raw" / "trust-cpu-2").is_dir()
    assert (out / "reports" / "trust-cpu" / "report.json").is_file()


def test_sigterm_marks_the_unit_interrupted_and_the_rerun_resumes(tmp_path, photo_dir, profile):
    out = tmp_path / "r"
    args = ["compress", *MODEL, "--data", str(photo_dir), *FAST, "--iterations", "25",
            "--targets", "10%,20%,30%", "--profile", profile, "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcvit_deploy.cli", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "manifest.json").is_file() and manifest(out)["units"].get("family"):
            break
        time.sleep(0.1)
    time.sleep(1.0)
    assert proc.poll() is None, "the run ended before it could be terminated"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert manifest(out)["units"]["family"]["status"] == "interrupted"
    code, text = run_cli(args)
    assert code == 0, text
    assert manifest(out)["units"]["family"]["status"] == "ok"


def test_a_relative_out_directory_finds_its_artifacts(tmp_path, photo_dir, profile, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_pipeline(copts(photo_dir, targets=(0.25,)), dopts(profile), "runs/rel")
    assert {o.status for o in result.outcomes} == {"ok"}  # built, verified and measured
    assert all(o.latency_at(1) is not None for o in result.outcomes)
    assert (tmp_path / "runs" / "rel" / "report.json").is_file()


def test_profile_naming_another_gpu_is_refused_unless_allowed(monkeypatch):
    import dataclasses

    from dcvit_deploy.config.profiles import load_profile
    from dcvit_deploy.errors import EnvironmentProblem
    from dcvit_deploy.latency import machine as envinfo
    from dcvit_deploy.pipeline import context
    from dcvit_deploy.pipeline.units import measuring as profile

    h100 = load_profile("h100-trt-fp16")
    monkeypatch.setattr(envinfo, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(context, "device_identity", lambda p: {"gpu": "NVIDIA L4"})
    monkeypatch.setattr(profile, "device_identity", lambda p: {"gpu": "NVIDIA L4"})
    with pytest.raises(EnvironmentProblem, match=r"is for NVIDIA H100.*NVIDIA L4.*--allow-other"):
        profile.check_device(h100, allow_other=False)
    note = profile.check_device(h100, allow_other=True)
    assert "measured on NVIDIA L4" in note
    same = dataclasses.replace(h100, gpu="NVIDIA L4")
    assert profile.check_device(same, allow_other=False) == ""


def test_one_compress_loads_the_profile_reads_the_checkpoint_and_plans_once(
    tmp_path, photo_dir, profile, monkeypatch
):
    """Validation establishes the profile, the checkpoint and the plan; the job uses them."""
    import dataclasses

    import torch

    import dcvit_deploy.config.profiles as profiles_mod
    import dcvit_deploy.config.validate as validate_mod
    import dcvit_deploy.model.loading as loading_mod
    from dcvit_deploy.compress import family as family_mod
    from dcvit_deploy.model.loading import load_model

    base = copts(photo_dir, targets=(0.25,))
    torch.manual_seed(0)
    teacher = load_model(base.model, model_kwargs=base.model_kwargs, random_init=True).model
    torch.save(teacher.state_dict(), tmp_path / "w.pth")
    calls: dict[str, int] = {}

    def counted(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(profiles_mod, "load_profile")
    counted(loading_mod, "read_state_dict")
    counted(validate_mod, "plan_targets")
    counted(family_mod, "preview_family")
    options = dataclasses.replace(base, random_init=False, checkpoint=str(tmp_path / "w.pth"))
    result = run_pipeline(options, dopts(profile, latency_ms=1e3), tmp_path / "run")
    assert result.selection is not None and result.selection.chosen == "original"
    # the checks plan once; the family engine builds from its own plan (the job no longer
    # previews the family a third time to refuse colliding targets: the checks do that)
    assert calls == {
        "load_profile": 1,
        "read_state_dict": 1,
        "plan_targets": 1,
        "preview_family": 1,
    }


def test_dry_run_refuses_dc_vit_targets_that_plan_to_one_structure(tmp_path, photo_dir):
    from dcvit_deploy.config.validate import validate_run
    from dcvit_deploy.errors import OptionError

    with pytest.raises(OptionError, match=r"1 DC-ViT target\(s\) plan to the same structure"):
        validate_run(copts(photo_dir, targets=(0.2008, 0.2009)), None, tmp_path / "r")
    assert not (tmp_path / "r").exists()
