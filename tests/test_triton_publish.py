"""publish(): one model, numbered versions, idempotent reruns, conflicts, atomic writers,
ownership; runs that share a repository, publish failures and the stage commands (CLI)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from fakes.runs import FAST_PROFILE, copts, dopts, family_names
from fakes.runs import run_cli_text as run_cli
from fakes.triton_inputs import (
    GOLDEN,
    STATS,
    candidate,
    cpu_profile,
    fake_engine,
    onnx_artifact,
    parse,
    trt_profile,
)
from google.protobuf import text_format
from triton_rules import validate_config

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.store.atomic import sha256_file
from dcvit_deploy.store.records import Artifact, TargetProfile
from dcvit_deploy.triton import (
    NotServable,
    RepositoryConflict,
    default_model_name,
    publish,
    unpublish,
    version_dirs,
)

# --------------------------------------------------------------------------- versions

PROFILE = FAST_PROFILE.replace('"test-cpu"', '"trust-cpu"').replace("[1, 2]", "[1]")


def test_publishing_twice_gives_one_model_with_versions_1_and_2(tmp_path: Path) -> None:
    """Done-when of the issue: two picks, one model, versions 1 and 2, both valid configs."""
    repo = tmp_path / "repo"
    first = publish(
        repo, "dcvit_tiny", candidate(tmp_path, "c60"), cpu_profile(),
        latency=STATS, source_candidate="c60", run_meta={"run": "a"},
    )  # fmt: skip
    text_v1 = first.config_path.read_text()
    second = publish(
        repo, "dcvit_tiny", candidate(tmp_path, "c40", seed=1), cpu_profile(),
        latency=STATS, source_candidate="c40", run_meta={"run": "b"},
    )  # fmt: skip

    assert (first.version, second.version) == (1, 2)
    assert first.created and second.created
    assert [p.name for p in repo.iterdir() if not p.name.startswith(".")] == ["dcvit_tiny"]
    model_dir = repo / "dcvit_tiny"
    assert [p.name for p in version_dirs(model_dir)] == ["1", "2"]
    for version, text in ((1, text_v1), (2, second.config_path.read_text())):
        config = parse(text)  # Triton's own ModelConfig schema
        assert config.name == "dcvit_tiny"
        assert list(config.version_policy.specific.versions) == [version]  # the pick, only
    assert validate_config(model_dir).status == "ok"  # both versions agree with the config
    v1 = json.loads((model_dir / "1" / "deploy.json").read_text())
    v2 = json.loads((model_dir / "2" / "deploy.json").read_text())
    assert (v1["source"]["candidate"], v2["source"]["candidate"]) == ("c60", "c40")
    assert v2["run"] == {"run": "b"} and v2["latency"][0]["p50"] == 1.0
    assert v2["sha256"] == sha256_file(model_dir / "2" / "model.onnx")
    assert json.loads((model_dir / "deploy.json").read_text())["version"] == 2
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".staging")]


def test_publish_golden_config(tmp_path: Path) -> None:
    published = publish(
        tmp_path / "repo", "dcvit_tiny", candidate(tmp_path, "c60"),
        cpu_profile(intra_op_num_threads=4, inter_op_num_threads=1),
    )  # fmt: skip
    text = published.config_path.read_text()
    assert text == (GOLDEN / "publish_cpu_ort.config.pbtxt").read_text()


def test_same_artifact_again_is_idempotent(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    artifact = candidate(tmp_path, "c60")
    first = publish(repo, "m", artifact, cpu_profile())
    config_before = first.config_path.read_bytes()
    again = publish(repo, "m", artifact, cpu_profile())
    assert (again.version, again.created) == (1, False)
    assert [p.name for p in version_dirs(repo / "m")] == ["1"]
    assert first.config_path.read_bytes() == config_before


def test_a_version_is_matched_by_its_settings_not_their_text_layout(tmp_path: Path) -> None:
    """A version whose recorded config has another text layout (one line, as older releases
    wrote it) but the same settings is served again, not copied."""
    repo = tmp_path / "repo"
    artifact = candidate(tmp_path, "c60")
    publish(repo, "m", artifact, cpu_profile())
    facts_path = repo / "m" / "1" / "deploy.json"
    facts = json.loads(facts_path.read_text())
    config = parse(facts["serving_config"])
    facts["serving_config"] = text_format.MessageToString(config, as_one_line=True)
    facts_path.write_text(json.dumps(facts))
    again = publish(repo, "m", artifact, cpu_profile())
    assert (again.version, again.created) == (1, False)
    changed = publish(repo, "m", artifact, cpu_profile(), instance_count=2)
    assert (changed.version, changed.created) == (2, True)


def test_picking_an_older_version_again_serves_it_without_a_copy(tmp_path: Path) -> None:
    """A pick that a version already holds (same artifact, same settings) adds nothing: the
    config serves that version (a rerun that picks the served version again changes nothing)."""
    repo = tmp_path / "repo"
    a = candidate(tmp_path, "a")
    publish(repo, "m", a, cpu_profile())
    publish(repo, "m", candidate(tmp_path, "b", seed=1), cpu_profile())
    again = publish(repo, "m", a, cpu_profile())
    assert (again.version, again.created) == (1, False)
    assert [p.name for p in version_dirs(repo / "m")] == ["1", "2"]
    assert list(parse(again.config_path.read_text()).version_policy.specific.versions) == [1]
    assert validate_config(repo / "m").ok
    before = again.config_path.read_bytes()
    rerun = publish(repo, "m", a, cpu_profile())
    assert (rerun.version, rerun.created) == (1, False)
    assert [p.name for p in version_dirs(repo / "m")] == ["1", "2"]
    assert rerun.config_path.read_bytes() == before


def test_changed_runtime_settings_are_a_new_version(tmp_path: Path) -> None:
    """A version is an artifact with the settings it was measured with: the same file measured
    with other settings is a new version, and each version's facts hold its own settings."""
    repo = tmp_path / "repo"
    artifact = candidate(tmp_path, "c60")
    publish(repo, "m", artifact, cpu_profile(intra_op_num_threads=2))
    again = publish(repo, "m", artifact, cpu_profile(intra_op_num_threads=8))
    assert (again.version, again.created) == (2, True)
    config = parse(again.config_path.read_text())
    assert config.parameters["intra_op_thread_count"].string_value == "8"
    v1 = json.loads((repo / "m" / "1" / "deploy.json").read_text())
    assert v1["serving"]["parameters"]["intra_op_thread_count"] == "2"


# --------------------------------------------------------------------------- conflicts


def test_incompatible_model_is_refused_then_replaced(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(repo, "m", candidate(tmp_path, "a"), cpu_profile())
    renamed = candidate(tmp_path, "b", seed=1, in_name="pixels")
    renamed = onnx_artifact(Path(renamed.path), candidate="b", input_name="pixels")
    with pytest.raises(RepositoryConflict) as info:
        publish(repo, "m", renamed, cpu_profile())
    message = str(info.value)
    assert (
        "\n" not in message
        and "inputs" in message
        and "fix: rerun with --triton-replace" in message
    )
    assert "replace=True" not in message
    assert [p.name for p in version_dirs(repo / "m")] == ["1"]  # nothing written

    replaced = publish(repo, "m", renamed, cpu_profile(), replace=True)
    assert (replaced.version, replaced.retired) == (2, (1,))
    assert [p.name for p in version_dirs(repo / "m")] == ["2"]
    assert validate_config(repo / "m").status == "ok"


def test_other_max_batch_size_is_a_conflict(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(repo, "m", candidate(tmp_path, "a"), cpu_profile())
    bigger = dataclasses.replace(cpu_profile(), batch_sizes=(1, 32))
    with pytest.raises(RepositoryConflict, match=r"max_batch_size 4 -> 32"):
        publish(repo, "m", candidate(tmp_path, "b", seed=1), bigger)


def test_other_platform_is_a_conflict(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(repo, "m", candidate(tmp_path, "a"), cpu_profile())
    with pytest.raises(RepositoryConflict, match="platform onnxruntime_onnx -> tensorrt_plan"):
        publish(repo, "m", fake_engine(tmp_path), trt_profile())


def test_artifact_and_profile_backends_must_match(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="publish with the profile the artifact was built"):
        publish(tmp_path / "repo", "m", fake_engine(tmp_path), cpu_profile())


def test_changed_artifact_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    artifact = onnx_artifact(Path(candidate(tmp_path, "a").path), sha256="0" * 64)
    with pytest.raises(UserInputError, match="changed since candidate"):
        publish(tmp_path / "repo", "m", artifact, cpu_profile())
    assert not (tmp_path / "repo" / "m").exists()


# --------------------------------------------------------------------------- atomicity


def test_two_writers_get_distinct_versions(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    artifacts = [candidate(tmp_path, f"c{i}", seed=i) for i in range(4)]
    errors: list[BaseException] = []
    results: list[int] = []

    def run(artifact: Artifact) -> None:
        try:
            results.append(publish(repo, "m", artifact, cpu_profile()).version)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in artifacts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [1, 2, 3, 4]
    shas = {json.loads((v / "deploy.json").read_text())["sha256"] for v in version_dirs(repo / "m")}
    assert shas == {a.sha256 for a in artifacts}
    leftovers = [p.name for p in (repo / "m").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_failed_copy_leaves_no_version_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dcvit_deploy.triton.repository as repository

    repo = tmp_path / "repo"
    publish(repo, "m", candidate(tmp_path, "a"), cpu_profile())

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(repository, "atomic_write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        publish(repo, "m", candidate(tmp_path, "b", seed=1), cpu_profile())
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "config.pbtxt", "deploy.json"]
    with pytest.raises(OSError, match="disk full"):  # a new model: no empty directory left
        publish(repo, "fresh", candidate(tmp_path, "b", seed=1), cpu_profile())
    assert not (repo / "fresh").exists()


# --------------------------------------------------------------------------- stale & torch


def test_unpublish_removes_only_the_owners_versions(tmp_path: Path) -> None:
    """A run removes the versions it published into its own repository, nothing else: another
    run's models and versions stay, and a model whose served version was removed serves the
    newest version left, with that version's own settings."""
    run = tmp_path / "run"
    repo = run / "triton"
    publish(repo, "old_pick", candidate(tmp_path, "a"), cpu_profile(), owner="A")
    publish(repo, "kept", candidate(tmp_path, "b", seed=1), cpu_profile(), owner="A")
    publish(repo, "prod_model", candidate(tmp_path, "c", seed=2), cpu_profile(), owner="B")
    shared = candidate(tmp_path, "d", seed=3)
    publish(repo, "shared", shared, cpu_profile(intra_op_num_threads=3), owner="B")
    publish(repo, "shared", candidate(tmp_path, "e", seed=4), cpu_profile(), owner="A",
            replace=True)  # fmt: skip
    foreign = repo / "hand_written"
    (foreign / "1").mkdir(parents=True)
    (foreign / "config.pbtxt").write_text('name: "hand_written"\n')
    assert unpublish(repo, "A", run_root=run, keep=["kept"]) == ["old_pick", "shared"]
    assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == [
        "hand_written",
        "kept",
        "prod_model",
        "shared",
    ]
    assert [p.name for p in version_dirs(repo / "shared")] == ["1"]
    config = parse((repo / "shared" / "config.pbtxt").read_text())
    assert list(config.version_policy.specific.versions) == [1]
    assert config.parameters["intra_op_thread_count"].string_value == "3"
    assert json.loads((repo / "shared" / "deploy.json").read_text())["sha256"] == shared.sha256
    assert validate_config(repo / "shared").ok
    assert unpublish(repo, "A", run_root=run, keep=["kept"]) == []


def test_unpublish_never_touches_a_repository_outside_the_run(tmp_path: Path) -> None:
    user_repo = tmp_path / "serving"
    publish(user_repo, "m", candidate(tmp_path, "a"), cpu_profile(), owner="A")
    with pytest.raises(UserInputError, match="not inside the run directory"):
        unpublish(user_repo, "A", run_root=tmp_path / "run")
    assert (user_repo / "m" / "1" / "model.onnx").is_file()


def test_a_publisher_never_replaces_another_publishers_served_version(tmp_path: Path) -> None:
    """The served version of another owner is refused in one line naming that owner's run and
    the CLI flag; ``replace`` publishes over it, and a version the owner already holds is then
    served again only with ``replace`` (never a silent rollback)."""
    repo = tmp_path / "repo"
    mine, theirs = candidate(tmp_path, "a"), candidate(tmp_path, "b", seed=1)
    publish(repo, "m", mine, cpu_profile(), owner="A", run_meta={"run": "/runs/a"})
    publish(repo, "m", mine, cpu_profile(), owner="A")  # its own served version: nothing new
    with pytest.raises(RepositoryConflict) as info:
        publish(repo, "m", theirs, cpu_profile(), owner="B")
    line = str(info.value)
    assert "\n" not in line and "/runs/a" in line and "--triton-replace" in line
    assert "replace=True" not in line
    assert [p.name for p in version_dirs(repo / "m")] == ["1"]
    taken = publish(repo, "m", theirs, cpu_profile(), owner="B", replace=True)
    assert (taken.version, taken.created, taken.retired) == (2, True, ())
    with pytest.raises(RepositoryConflict, match="serves version 2"):
        publish(repo, "m", mine, cpu_profile(), owner="A")
    same = publish(repo, "m", theirs, cpu_profile(), owner="A")  # already served: no change
    assert (same.version, same.created) == (2, False)
    assert [p.name for p in version_dirs(repo / "m")] == ["1", "2"]
    back = publish(repo, "m", mine, cpu_profile(), owner="A", replace=True)
    assert (back.version, back.created) == (1, False)
    assert [p.name for p in version_dirs(repo / "m")] == ["1", "2"]


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_published_files_follow_the_umask(
    tmp_path: Path, umask: int, file_mode: int, dir_mode: int
) -> None:
    """Triton often runs as another user: published files get the umask's mode, like any
    other tool's files, also when written atomically through a temporary file."""
    from dcvit_deploy.store.atomic import atomic_write_with

    previous = os.umask(umask)
    try:
        published = publish(tmp_path / "repo", "m", candidate(tmp_path, "a"), cpu_profile())
        private = tmp_path / "private.txt"

        def writer(tmp: Path) -> None:  # a writer that creates its file private (like mkstemp)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))

        atomic_write_with(private, writer)
    finally:
        os.umask(previous)
    model_dir = published.model_dir
    files = [model_dir / "config.pbtxt", model_dir / "deploy.json", private]
    files += [model_dir / "1" / "deploy.json", model_dir / "1" / "model.onnx"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: oct(file_mode) for p in files
    }
    assert oct((model_dir / "1").stat().st_mode & 0o777) == oct(dir_mode)


def test_torch_profile_is_refused_with_one_line(tmp_path: Path) -> None:
    profile = TargetProfile(
        name="torch-cuda", backend="torch", device="cuda", precision="bf16",
        batch_sizes=(1, 8), budget_batch_size=1, statistic="p50", scope="device_compute",
    )  # fmt: skip
    pt2 = tmp_path / "c60.pt2"
    pt2.write_bytes(b"not a program")
    artifact = Artifact(
        candidate="c60", backend="torch", path=str(pt2), sha256=sha256_file(pt2),
        precision="bf16", input_name="input", output_name="logits", input_shape=(3, 8, 8),
        build_seconds=1.0,
    )  # fmt: skip
    with pytest.raises(NotServable, match="no Triton platform that serves them as measured"):
        publish(tmp_path / "repo", "m", artifact, profile)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("deit_small_patch16_224", "dcvit_deit_small_patch16_224"),
        ("vit_small_patch16_224.augreg_in21k", "dcvit_vit_small_patch16_224_augreg_in21k"),
        ("hf-hub:timm/ViT-Tiny--x", "dcvit_vit_tiny_x"),
    ],
)
def test_default_model_name(model: str, name: str) -> None:
    assert default_model_name(model) == name


def test_default_model_name_needs_something() -> None:
    with pytest.raises(UserInputError, match="cannot derive a Triton model name"):
        default_model_name("hf-hub:timm/...")


def test_static_batch_artifact_is_published_without_batching(tmp_path: Path) -> None:
    artifact = candidate(tmp_path, "c60", batch=1)
    profile = dataclasses.replace(cpu_profile(), batch_sizes=(1,))
    published = publish(tmp_path / "repo", "m", artifact, profile)
    config = parse(published.config_path.read_text())
    assert config.max_batch_size == 0 and "max_batch_size: 0\n" in published.config_path.read_text()
    assert list(config.input[0].dims) == [1, 3, 8, 8]
    assert not config.HasField("dynamic_batching")
    assert validate_config(published.model_dir).ok


# --------------------------------------------------------------------------- runs (CLI)

MODEL_NAME = "dcvit_vit_tiny_patch16_224"
GENEROUS = ["--no-confirm", "--latency-ms", "1000"]  # every candidate of the tiny model fits
NOTHING = ["--no-confirm", "--latency-ms", "0.00001"]  # no candidate fits


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    """One measured run (the original and one compressed candidate, profile ``trust-cpu``),
    copied by each test below (:func:`new_run`)."""
    from dcvit_deploy.api import run_pipeline

    root = tmp_path_factory.mktemp("measured")
    profile = root / "trust-cpu.toml"
    profile.write_text(PROFILE)
    out = root / "run"
    run_pipeline(copts(photo_dir, targets=(0.25,)), dopts(str(profile)), out)
    return out


def new_run(measured: Path, dest: Path, figures: dict[str, float] | None = None) -> Path:
    """A run of its own made from ``measured``: a copy without its Triton repository, its
    decisions or its run id (a second run of the same model). ``figures``: fixed p50 (every
    statistic) for the named candidates, so a decision does not depend on timing luck."""
    shutil.copytree(measured, dest, ignore=shutil.ignore_patterns(".lock", ".lock.json", "triton"))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.pop("run_id", None)
    for uid in [u for u in manifest["units"] if u.split("/")[0] in ("select", "publish")]:
        del manifest["units"][uid]
    latency = manifest["units"]["profile/trust-cpu"]["result"]["latency"]
    for name, ms in (figures or {}).items():
        for stats in latency[name]:
            stats.update({k: ms for k in ("mean", "min", "max", "p50", "p90", "p95", "p99")})
            stats["round_figures"] = {k: [ms] * len(v) for k, v in stats["round_figures"].items()}
            stats.update(round_medians=[ms] * stats["rounds"], spread_ms=0.0, std=0.0)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def models(repo: Path) -> list[str]:
    return (
        sorted(p.name for p in repo.iterdir() if not p.name.startswith("."))
        if repo.is_dir()
        else []
    )


def served(model_dir: Path) -> tuple[list[str], int, str]:
    """(version folders, the version the config serves, that version's candidate)."""
    policy = parse((model_dir / "config.pbtxt").read_text()).version_policy
    versions = [p.name for p in version_dirs(model_dir)]
    version = next(iter(policy.specific.versions), 0) or int(versions[-1])
    facts = json.loads((model_dir / str(version) / "deploy.json").read_text())
    return versions, version, facts["source"]["candidate"]


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_a_run_that_picks_nothing_removes_only_its_own_models(measured_run, tmp_path):
    """Issue 16, case 1: run B publishes into run A's repository; A, rerun with a budget it
    cannot meet, removes its own model and leaves B's."""
    a, b = new_run(measured_run, tmp_path / "a"), new_run(measured_run, tmp_path / "b")
    assert run_cli(["select", "--out", str(a), *GENEROUS])[0] == 0
    code, text = run_cli(
        ["select", "--out", str(b), *GENEROUS, "--triton-repo", str(a / "triton"),
         "--triton-model-name", "prod_model"]
    )  # fmt: skip
    assert code == 0, text
    assert models(a / "triton") == [MODEL_NAME, "prod_model"]
    code, text = run_cli(["select", "--out", str(a), *NOTHING])
    assert code == 3, text
    assert models(a / "triton") == ["prod_model"]
    assert served(a / "triton" / "prod_model") == (["1"], 1, "original")


def test_a_rerun_never_rolls_back_another_runs_deployment(measured_run, tmp_path):
    """Issue 16, case 6: runs A and B share one model. A is refused over B's served version in
    one line (the owner and the flag) with exit 5; with --triton-replace it is served; B,
    rerun unchanged, then adds nothing and notes nothing."""
    repo = tmp_path / "serving"
    shared = ["--triton-repo", str(repo), "--triton-model-name", "m"]
    a = new_run(measured_run, tmp_path / "a")
    b = new_run(measured_run, tmp_path / "b", figures={"original": 100.0})
    compressed = family_names(b)[-1]
    b_select = ["select", "--out", str(b), "--no-confirm", "--latency-ms", "50", *shared]
    code, text = run_cli(b_select)
    assert code == 0, text
    assert served(repo / "m") == (["1"], 1, compressed)
    code, text = run_cli(["select", "--out", str(a), *GENEROUS, *shared])
    assert code == 5, text
    line = last_line(text)
    assert line.startswith("error: original was chosen but not published")
    assert str(b) in line and "--triton-replace" in line and "replace=True" not in text
    assert served(repo / "m") == (["1"], 1, compressed)
    code, text = run_cli(["select", "--out", str(a), *GENEROUS, *shared, "--triton-replace"])
    assert code == 0, text
    assert served(repo / "m") == (["1", "2"], 2, "original")
    code, text = run_cli(b_select)  # B unchanged: A's deployment stays
    assert code == 0, text
    assert "changed or corrupted" not in text and "not published" not in text
    assert served(repo / "m") == (["1", "2"], 2, "original")


def test_a_failed_publish_exits_5_in_one_line(measured_run, tmp_path, monkeypatch):
    """Issue 16, case 7: a full disk, or a model of another interface in the repository, is a
    failure of its own (exit 5) with one line naming the problem and the CLI fix; the reports
    are still written."""
    import errno

    a = new_run(measured_run, tmp_path / "a")
    existing = publish(a / "triton", MODEL_NAME, candidate(tmp_path, "x"), cpu_profile())
    code, text = run_cli(["select", "--out", str(a), *GENEROUS])
    assert code == 5, text
    line = last_line(text)
    assert line.startswith("error: original was chosen but not published")
    assert "max_batch_size 4 -> 1" in line and "fix: rerun with --triton-replace" in line
    assert "replace=True" not in text and "Traceback" not in text
    assert "chosen: original" in text and (a / "report.json").is_file()
    assert [p.name for p in version_dirs(existing.model_dir)] == ["1"]

    copy = shutil.copyfile

    def full(src: str, dst: str, **kwargs: object) -> object:  # the repository's disk is full
        if "triton" in Path(dst).parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        return copy(src, dst, **kwargs)

    b = new_run(measured_run, tmp_path / "b")
    monkeypatch.setattr(shutil, "copyfile", full)
    code, text = run_cli(["select", "--out", str(b), *GENEROUS])
    assert code == 5, text
    line = last_line(text)
    assert line.startswith("error: original was chosen but not published")
    assert "No space left on device" in line and "fix:" in line and "Traceback" not in text
    assert models(b / "triton") == []


def test_a_corrupted_artifact_is_refused_before_it_is_chosen(measured_run, tmp_path):
    """Issue 16, case 7: a built artifact changed after it was measured is named in one line
    before anything is decided, confirmed or published."""
    a = new_run(measured_run, tmp_path / "a")
    artifact = a / "artifacts" / "trust-cpu" / "original.onnx"
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    artifact.write_bytes(bytes(blob))
    code, text = run_cli(["select", "--out", str(a), "--latency-ms", "1000"])
    assert code == 1, text
    assert len(text.strip().splitlines()) == 1
    line = last_line(text)
    assert "original.onnx" in line and "dcvit-deploy profile" in line
    assert models(a / "triton") == []


def test_the_triton_stage_publishes_where_the_run_was_deployed(measured_run, tmp_path):
    """Issue 16, case 8: ``triton --out RUN`` publishes to the repository and model name the
    run was deployed with (``compress --triton-repo R --triton-model-name N``)."""
    a = new_run(measured_run, tmp_path / "a")
    repo = tmp_path / "serving"
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["inputs"]["deploy_options"].update(triton_repo=str(repo), triton_model_name="vit_s")
    (a / "manifest.json").write_text(json.dumps(manifest))
    code, text = run_cli(["triton", "--out", str(a), *GENEROUS])
    assert code == 0, text
    assert models(repo) == ["vit_s"] and models(a / "triton") == []
    assert served(repo / "vit_s") == (["1"], 1, "original")


def test_served_settings_are_the_measured_ones(measured_run, tmp_path):
    """Issue 16, case 9: a profile file named like the measured profile but with other
    settings is refused in one line; the run's own profile file edited after measuring does
    not change what is served (config.pbtxt has the settings that were measured)."""
    a = new_run(measured_run, tmp_path / "a")
    edited = tmp_path / "edited" / "trust-cpu.toml"
    edited.parent.mkdir()
    edited.write_text(PROFILE.replace("intra_op_num_threads = 1", "intra_op_num_threads = 2"))
    code, text = run_cli(["select", "--out", str(a), *GENEROUS, "--profile", str(edited)])
    assert code == 1, text
    line = last_line(text)
    assert len(text.strip().splitlines()) == 1
    assert "trust-cpu" in line and "backend_options" in line and "dcvit-deploy profile" in line
    assert models(a / "triton") == []
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["inputs"]["profile_sources"]["trust-cpu"] = str(edited)
    (a / "manifest.json").write_text(json.dumps(manifest))
    code, text = run_cli(["select", "--out", str(a), *GENEROUS])
    assert code == 0, text
    config = parse((a / "triton" / MODEL_NAME / "config.pbtxt").read_text())
    assert config.parameters["intra_op_thread_count"].string_value == "1"


def test_retargeted_family_is_not_measured_until_profiled(measured_run, tmp_path, photo_dir):
    """Issue 16, case 13: after ``family`` is rerun with other targets, ``select`` says the new
    candidates were never measured (exit 1, run ``profile``) and keeps the published model;
    ``status`` lists the new candidates as not measured and the old ones as superseded."""
    from dcvit_deploy.api import run_pipeline, status

    a = new_run(measured_run, tmp_path / "a")
    old = family_names(a)[-1]
    assert run_cli(["select", "--out", str(a), *GENEROUS])[0] == 0
    run_pipeline(copts(photo_dir, targets=(0.15,)), dopts("cpu-ort"), a, stop_after="family")
    new = family_names(a)[-1]
    assert new != old
    code, text = run_cli(["select", "--out", str(a), *NOTHING])
    assert code == 1, text
    line = last_line(text)
    assert new in line and "never measured" in line and "dcvit-deploy profile" in line
    assert served(a / "triton" / MODEL_NAME) == (["1"], 1, "original")
    s = status(a)
    assert s["candidates"][new] == {"status": "not measured"}
    assert s["candidates"][old] == {"status": "superseded"}
    assert s["outcomes"]["trust-cpu"] == {"original": "ok", new: "not_measured"}


def test_a_pick_triton_cannot_serve_exits_5_after_the_reports(measured_run, tmp_path):
    """Issue 16, case 7: a pick measured with the torch backend is chosen, reported and not
    published: exit 5, one line with the fix."""
    a = new_run(measured_run, tmp_path / "a")
    torch_cpu = tmp_path / "torch-cpu.toml"
    torch_cpu.write_text(
        PROFILE.replace('"trust-cpu"', '"torch-cpu"')
        .replace('"onnxruntime"', '"torch"')
        .replace("[backend_options]\nintra_op_num_threads = 1\n", "")
    )
    code, text = run_cli(["profile", "--out", str(a), "--profile", str(torch_cpu), *GENEROUS])
    assert code == 5, text
    line = last_line(text)
    assert line.startswith("error: original was chosen but not published to Triton")
    assert "fix: publish from an onnxruntime or tensorrt profile" in line
    assert "chosen: original" in text and (a / "reports" / "torch-cpu" / "report.json").is_file()
    assert models(a / "triton") == []
