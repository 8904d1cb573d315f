"""publish(): one model, numbered versions, idempotent reruns, conflicts, atomic writers."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest
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

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.store.atomic import sha256_file
from dcvit_deploy.store.records import Artifact, TargetProfile
from dcvit_deploy.triton import (
    NotServable,
    RepositoryConflict,
    clear_stale,
    default_model_name,
    publish,
    publishable,
    validate_config,
    version_dirs,
)

# --------------------------------------------------------------------------- versions


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
    assert first.created and second.created and second.served
    assert [p.name for p in repo.iterdir() if not p.name.startswith(".")] == ["dcvit_tiny"]
    model_dir = repo / "dcvit_tiny"
    assert [p.name for p in version_dirs(model_dir)] == ["1", "2"]
    for text in (text_v1, second.config_path.read_text()):
        config = parse(text)  # Triton's own ModelConfig schema
        assert config.name == "dcvit_tiny"
        assert config.version_policy.latest.num_versions == 1
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
    assert (again.version, again.created, again.served) == (1, False, True)
    assert [p.name for p in version_dirs(repo / "m")] == ["1"]
    assert first.config_path.read_bytes() == config_before


def test_picking_an_older_version_again_publishes_it_as_the_newest(tmp_path: Path) -> None:
    """A pick that only an older version holds becomes version N+1, so Triton serves it (a
    rerun that picks the served version again adds nothing)."""
    repo = tmp_path / "repo"
    a = candidate(tmp_path, "a")
    publish(repo, "m", a, cpu_profile())
    publish(repo, "m", candidate(tmp_path, "b", seed=1), cpu_profile())
    again = publish(repo, "m", a, cpu_profile())
    assert (again.version, again.created, again.served) == (3, True, True)
    assert [p.name for p in version_dirs(repo / "m")] == ["1", "2", "3"]
    rerun = publish(repo, "m", a, cpu_profile())
    assert (rerun.version, rerun.created, rerun.served) == (3, False, True)
    assert [p.name for p in version_dirs(repo / "m")] == ["1", "2", "3"]


def test_changed_runtime_settings_refresh_the_served_config(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    artifact = candidate(tmp_path, "c60")
    publish(repo, "m", artifact, cpu_profile(intra_op_num_threads=2))
    again = publish(repo, "m", artifact, cpu_profile(intra_op_num_threads=8))
    assert not again.created
    config = parse(again.config_path.read_text())
    assert config.parameters["intra_op_thread_count"].string_value == "8"


# --------------------------------------------------------------------------- conflicts


def test_incompatible_model_is_refused_then_replaced(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(repo, "m", candidate(tmp_path, "a"), cpu_profile())
    renamed = candidate(tmp_path, "b", seed=1, in_name="pixels")
    renamed = onnx_artifact(Path(renamed.path), candidate="b", input_name="pixels")
    with pytest.raises(RepositoryConflict) as info:
        publish(repo, "m", renamed, cpu_profile())
    message = str(info.value)
    assert "\n" not in message and "inputs" in message and "fix: pass replace=True" in message
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

    monkeypatch.setattr(repository, "_write_json_unique", broken)
    with pytest.raises(OSError, match="disk full"):
        publish(repo, "m", candidate(tmp_path, "b", seed=1), cpu_profile())
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "config.pbtxt", "deploy.json"]
    with pytest.raises(OSError, match="disk full"):  # a new model: no empty directory left
        publish(repo, "fresh", candidate(tmp_path, "b", seed=1), cpu_profile())
    assert not (repo / "fresh").exists()


# --------------------------------------------------------------------------- stale & torch


def test_clear_stale_removes_only_this_runs_models(tmp_path: Path) -> None:
    run = tmp_path / "run"
    repo = run / "triton"
    publish(repo, "old_pick", candidate(tmp_path, "a"), cpu_profile())
    publish(repo, "kept", candidate(tmp_path, "b", seed=1), cpu_profile())
    foreign = repo / "hand_written"
    (foreign / "1").mkdir(parents=True)
    (foreign / "config.pbtxt").write_text('name: "hand_written"\n')
    assert clear_stale(repo, run_root=run, keep=["kept"]) == ["old_pick"]
    assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == [
        "hand_written",
        "kept",
    ]
    assert clear_stale(repo, run_root=run, keep=["kept"]) == []


def test_clear_stale_never_touches_a_repository_outside_the_run(tmp_path: Path) -> None:
    user_repo = tmp_path / "serving"
    publish(user_repo, "m", candidate(tmp_path, "a"), cpu_profile())
    with pytest.raises(UserInputError, match="not inside the run directory"):
        clear_stale(user_repo, run_root=tmp_path / "run")
    assert (user_repo / "m" / "1" / "model.onnx").is_file()


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
    reason = publishable(profile)
    assert (
        reason is not None and "\n" not in reason and "fix: publish from an onnxruntime" in reason
    )
    with pytest.raises(NotServable, match="no Triton platform that serves them as measured"):
        publish(tmp_path / "repo", "m", artifact, profile)
    assert not (tmp_path / "repo").exists()
    assert publishable(cpu_profile()) is None


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


def test_a_single_version_model_counts_for_idempotency(tmp_path: Path) -> None:
    """A model written by the single-version writer is recognised: same file, no new version."""
    from dcvit_deploy.triton import write_model_repository

    artifact = candidate(tmp_path, "c60")
    write_model_repository(
        tmp_path / "repo", "m", artifact, max_batch_size=4, preferred_batch_sizes=(1, 4),
        kind="KIND_CPU",
    )  # fmt: skip
    again = publish(tmp_path / "repo", "m", artifact, cpu_profile())
    assert (again.version, again.created) == (1, False)
    newer = publish(tmp_path / "repo", "m", candidate(tmp_path, "c40", seed=1), cpu_profile())
    assert newer.version == 2 and validate_config(tmp_path / "repo" / "m").ok


@pytest.mark.parametrize("bad", ["../escape", "", "a b", ".hidden"])
def test_model_names_are_checked_up_front(bad: str) -> None:
    from dcvit_deploy.triton import check_model_name

    with pytest.raises(UserInputError, match="Triton model name"):
        check_model_name(bad)
    check_model_name(default_model_name("deit_small_patch16_224"))
