"""Triton serves what was measured: each runtime setting of a profile lands in config.pbtxt."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from fakes.triton_inputs import candidate, cpu_profile, fake_engine, parse, trt_profile
from triton_rules import validate_config

from dcvit_deploy.errors import ProfileError
from dcvit_deploy.store.records import MeasureSettings, TargetProfile
from dcvit_deploy.triton import ServingMismatch, publish, serving_settings


def gpu_ort_profile(*, cuda_graphs: bool = False, **options: Any) -> TargetProfile:
    return TargetProfile(
        name="ort-gpu",
        backend="onnxruntime",
        device="cuda",
        precision="fp32",
        batch_sizes=(1, 2, 4),
        budget_batch_size=2,
        statistic="p50",
        scope="host",
        measure=MeasureSettings(cuda_graphs=cuda_graphs),
        backend_options=options,
    )


def published_config(tmp_path: Path, profile: TargetProfile) -> Any:
    if profile.backend == "tensorrt":
        artifact = fake_engine(tmp_path, max_batch=profile.max_batch)
    else:
        artifact = candidate(tmp_path, "c60")
    result = publish(tmp_path / "repo", "m", artifact, profile)
    check = validate_config(result.model_dir)
    assert check.status == "ok", check.messages
    return parse(result.config_path.read_text())


# --------------------------------------------------------------------------- ONNX Runtime


def test_ort_thread_counts_are_written(tmp_path: Path) -> None:
    config = published_config(tmp_path, cpu_profile(intra_op_num_threads=3, inter_op_num_threads=2))
    assert config.parameters["intra_op_thread_count"].string_value == "3"
    assert config.parameters["inter_op_thread_count"].string_value == "2"


def test_ort_default_threads_are_written_as_zero(tmp_path: Path) -> None:
    """0 is ONNX Runtime's own default in both the measuring session and Triton's backend."""
    config = published_config(tmp_path, cpu_profile())
    assert config.parameters["intra_op_thread_count"].string_value == "0"
    assert config.parameters["inter_op_thread_count"].string_value == "0"


def test_ort_spinning_off_cannot_be_mirrored_and_says_so(tmp_path: Path) -> None:
    settings = serving_settings(cpu_profile(allow_spinning=False))
    assert any("spinning off" in n for n in settings.notes)
    assert not any("spinning" in n for n in serving_settings(cpu_profile()).notes)


@pytest.mark.parametrize(("mode", "value"), [("sequential", "0"), ("parallel", "1")])
def test_ort_execution_mode(tmp_path: Path, mode: str, value: str) -> None:
    config = published_config(tmp_path, cpu_profile(execution_mode=mode))
    assert config.parameters["execution_mode"].string_value == value


@pytest.mark.parametrize(
    ("level", "expected"), [("basic", -1), ("extended", 1), ("disable", 2), ("all", None)]
)
def test_ort_graph_optimization_level(tmp_path: Path, level: str, expected: int | None) -> None:
    config = published_config(tmp_path, cpu_profile(graph_optimization_level=level))
    if expected is None:  # "all" is the backend's default: no graph block at all
        assert not config.optimization.HasField("graph")
    else:
        assert config.optimization.graph.level == expected


def test_ort_cpu_runs_on_cpu_instances(tmp_path: Path) -> None:
    config = published_config(tmp_path, cpu_profile())
    (group,) = config.instance_group
    assert config.instance_group[0].kind == type(group).Kind.Value("KIND_CPU")
    assert list(group.gpus) == []
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator


def test_ort_cuda_runs_on_the_measured_gpu(tmp_path: Path) -> None:
    config = published_config(tmp_path, gpu_ort_profile(provider="cuda", device_id=1))
    (group,) = config.instance_group
    assert group.kind == type(group).Kind.Value("KIND_GPU")
    assert list(group.gpus) == [1]
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    assert not config.optimization.cuda.graphs


def test_ort_tensorrt_provider_options_are_written(tmp_path: Path) -> None:
    profile = gpu_ort_profile(
        provider="tensorrt", trt_workspace_mib=2048, trt_builder_optimization_level=5
    )
    config = published_config(tmp_path, profile)
    (acc,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt"
    assert dict(acc.parameters) == {
        "max_workspace_size_bytes": str(2048 << 20),
        "trt_builder_optimization_level": "5",
        "trt_profile_min_shapes": "input:1x3x8x8",
        "trt_profile_opt_shapes": "input:2x3x8x8",
        "trt_profile_max_shapes": "input:4x3x8x8",
    }


def test_ort_cuda_graph_measurement_is_refused(tmp_path: Path) -> None:
    profile = gpu_ort_profile(provider="cuda", cuda_graphs=True)
    with pytest.raises(ServingMismatch) as info:
        publish(tmp_path / "repo", "m", candidate(tmp_path, "c60"), profile)
    assert "\n" not in str(info.value) and "cuda_graphs = false" in str(info.value)
    assert not (tmp_path / "repo" / "m").exists()


def test_ort_cuda_graphs_without_io_binding_are_the_backends_profile_error() -> None:
    """The backend refuses to measure graphs without bound buffers: nothing to publish."""
    with pytest.raises(ProfileError, match="cuda_graphs"):
        serving_settings(gpu_ort_profile(provider="cuda", cuda_graphs=True, io_binding=False))


@pytest.mark.parametrize("graphs", [True, False])
def test_ort_tensorrt_provider_cuda_graphs_exactly_when_measured(
    tmp_path: Path, graphs: bool
) -> None:
    config = published_config(tmp_path, gpu_ort_profile(provider="tensorrt", cuda_graphs=graphs))
    (acc,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert ("trt_cuda_graph_enable" in acc.parameters) is graphs
    if graphs:
        assert acc.parameters["trt_cuda_graph_enable"] == "1"
    assert not config.optimization.cuda.graphs  # the TensorRT backend's switch, not ORT's


def test_bad_backend_option_is_the_profile_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError):
        serving_settings(cpu_profile(graph_optimization_level="max"))


# --------------------------------------------------------------------------- TensorRT


@pytest.mark.parametrize("graphs", [True, False])
def test_tensorrt_cuda_graphs_exactly_when_measured(tmp_path: Path, graphs: bool) -> None:
    config = published_config(tmp_path, trt_profile(cuda_graphs=graphs))
    assert config.optimization.cuda.graphs is graphs


def test_tensorrt_runs_on_the_measured_gpu(tmp_path: Path) -> None:
    config = published_config(tmp_path, trt_profile(device_id=2))
    (group,) = config.instance_group
    assert group.kind == type(group).Kind.Value("KIND_GPU")
    assert list(group.gpus) == [2]
    assert config.max_batch_size == 16
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert not config.parameters  # onnxruntime parameters never reach a plan


def test_tensorrt_profile_larger_than_the_engine_is_refused(tmp_path: Path) -> None:
    profile = dataclasses.replace(trt_profile(), batch_sizes=(1, 8, 32))
    with pytest.raises(Exception, match="batches up to 16, but max_batch_size is 32"):
        publish(tmp_path / "repo", "m", fake_engine(tmp_path, max_batch=16), profile)


def test_notes_name_what_triton_cannot_mirror(tmp_path: Path) -> None:
    settings = serving_settings(trt_profile())
    assert any("copies" in n for n in settings.notes)
    assert serving_settings(cpu_profile()).notes == ()
