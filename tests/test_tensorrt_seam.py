"""TensorRT backend through its seam: pure settings, a fake ``tensorrt`` module, real TRT if any."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import fake_tensorrt
from fakes.fake_tensorrt import FakeCudaDevice

import dcvit_deploy.latency.machine
from dcvit_deploy.backends import BuildError, get_backend
from dcvit_deploy.backends import tensorrt as trt_backend
from dcvit_deploy.backends.tensorrt import (
    ShapeProfile,
    TensorRTRunner,
    build_serialized_engine,
    builder_settings,
    check_engine_compatible,
    network_flags,
)
from dcvit_deploy.config.profiles import load_profile, profile_from_dict
from dcvit_deploy.errors import BackendUnavailable, EngineMismatch, ProfileError
from dcvit_deploy.store.records import TargetProfile


def trt_profile(**changes: object) -> TargetProfile:
    data: dict[str, object] = {
        "name": "test-trt",
        "backend": "tensorrt",
        "device": "cuda",
        "precision": "fp32",
        "batch_sizes": [1, 8, 32],
        "budget_batch_size": 8,
        "statistic": "p50",
        "scope": "device_compute",
        "backend_options": {"workspace_mib": 256, "builder_optimization_level": 4},
    }
    data.update(changes)
    return profile_from_dict(data)


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    """A two-node FP32 graph with the project's I/O contract (no torch export needed)."""
    return fake_tensorrt.write_tiny_onnx(tmp_path / "tiny.onnx")


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """One fake GPU: the driver reports it and the backend's CUDA seam is the CPU fake."""
    monkeypatch.setattr(dcvit_deploy.latency.machine, "cuda_device_count", lambda: 1)
    backend = get_backend("tensorrt")
    monkeypatch.setattr(
        backend, "device_factory", lambda index: FakeCudaDevice(sys.modules["tensorrt"], index)
    )
    monkeypatch.setattr(backend, "_runner", None)


# --------------------------------------------------------------------------- pure settings


def test_builder_settings_from_shipped_profile() -> None:
    s = builder_settings(load_profile("h100-trt-fp16"), (3, 224, 224), timing_cache="t.cache")
    assert s.precision == "fp16" and s.strongly_typed
    assert s.workspace_bytes == 8192 * (1 << 20)
    assert s.optimization_level == 3 and s.tf32
    assert s.shape_profile == ShapeProfile(
        "input", (1, 3, 224, 224), (1, 3, 224, 224), (128, 3, 224, 224)
    )
    assert s.timing_cache == "t.cache"


def test_builder_settings_opt_is_the_budget_batch() -> None:
    s = builder_settings(trt_profile(), (3, 32, 32), input_name="pixels")
    assert s.shape_profile.input_name == "pixels"
    assert (s.shape_profile.min[0], s.shape_profile.opt[0], s.shape_profile.max[0]) == (1, 8, 32)
    assert s.workspace_bytes == 256 << 20 and s.optimization_level == 4
    assert s.timing_cache is None


def test_builder_settings_refuse_bad_options_and_precision() -> None:
    with pytest.raises(ProfileError) as err:
        trt_profile(backend_options={"builder_optimization_level": 9})
    assert "builder_optimization_level" in str(err.value) and "<= 5" in str(err.value)
    with pytest.raises(ProfileError) as err:
        trt_profile(backend_options={"fp16": True})
    assert "'fp16'" in str(err.value) and "workspace_mib" in str(err.value)
    with pytest.raises(ProfileError) as err:
        trt_profile(precision="bf16")
    assert "fp32 or fp16" in str(err.value)
    with pytest.raises(ProfileError):
        trt_profile(device="cpu", scope="host")


def test_network_flags_by_version() -> None:
    assert network_flags(fake_tensorrt.make_module(version="10.9.0")) == 1  # 1 << STRONGLY_TYPED
    assert network_flags(fake_tensorrt.make_module(version="11.1.0")) == 0  # always strong


def test_engine_compatibility_check() -> None:
    meta = {
        "candidate": "c3",
        "tensorrt_version": "10.9.0",
        "gpu_name": "NVIDIA L4",
        "compute_capability": "8.9",
    }
    check_engine_compatible(
        meta, tensorrt_version="10.9.0", gpu_name="NVIDIA L4", compute_capability="8.9"
    )
    with pytest.raises(EngineMismatch) as err:
        check_engine_compatible(
            meta, tensorrt_version="10.12.0", gpu_name="NVIDIA L4", compute_capability="8.9"
        )
    assert "10.9.0" in str(err.value) and "10.12.0" in str(err.value)
    assert "rebuild" in str(err.value)
    with pytest.raises(EngineMismatch) as err:
        check_engine_compatible(
            meta, tensorrt_version="10.9.0", gpu_name="NVIDIA H100", compute_capability="9.0"
        )
    assert "NVIDIA H100" in str(err.value)


# --------------------------------------------------------------------------- fake module


def test_build_call_sequence_and_timing_cache(tiny_onnx: Path, tmp_path: Path) -> None:
    trt = fake_tensorrt.make_module()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from-earlier-candidate")
    settings = builder_settings(trt_profile(), (3, 32, 32), timing_cache=cache)
    plan, io = build_serialized_engine(trt, tiny_onnx, settings, candidate="c1")
    calls = trt.CALLS
    expected = [
        "Builder(device=0)",
        "create_network(flags=1)",
        "OnnxParser",
        "parse_from_file(tiny.onnx)",
        "create_builder_config",
        f"set_memory_pool_limit(WORKSPACE, {256 << 20})",
        "builder_optimization_level=4",
        "create_timing_cache(22 bytes)",
        "set_timing_cache(ignore_mismatch=False)",
        "create_optimization_profile",
        "set_shape(input, (1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))",
        "add_optimization_profile",
        "build_serialized_network",
    ]
    assert calls[: len(expected)] == expected
    body = json.loads(plan[len(b"PLAN ") :])
    assert body["flags"] == 1 and body["profiles"]["input"][1] == [8, 3, 32, 32]
    assert io[0] == {"name": "input", "mode": "input", "shape": [-1, 3, 32, 32], "dtype": "float"}
    assert io[1]["name"] == "logits" and io[1]["mode"] == "output"
    # The shared cache keeps the earlier entry and gains this build's.
    entries = set(cache.read_bytes().decode().split(","))
    assert "from-earlier-candidate" in entries and len(entries) == 2
    assert not list(tmp_path.glob("*.partial"))


def test_tf32_can_be_disabled(tiny_onnx: Path) -> None:
    trt = fake_tensorrt.make_module()
    settings = builder_settings(trt_profile(backend_options={"tf32": False}), (3, 32, 32))
    build_serialized_engine(trt, tiny_onnx, settings, candidate="c1")
    assert "clear_flag(TF32)" in trt.CALLS
    assert not any(c.startswith("create_timing_cache") for c in trt.CALLS)  # no cache asked


def test_parse_failure_is_a_per_candidate_error(tiny_onnx: Path) -> None:
    trt = fake_tensorrt.make_module(parse_errors=("unsupported attribute mode=cubic",))
    settings = builder_settings(trt_profile(), (3, 32, 32))
    with pytest.raises(BuildError) as err:
        build_serialized_engine(trt, tiny_onnx, settings, candidate="c7")
    message = str(err.value)
    assert "c7" in message and "FancyOp" in message and "mode=cubic" in message
    assert "fix:" in message
    assert "build_serialized_network" not in trt.CALLS  # stopped at the parser


def test_build_failure_reports_the_logged_error(tiny_onnx: Path) -> None:
    trt = fake_tensorrt.make_module(build_fails=True)
    settings = builder_settings(trt_profile(), (3, 32, 32))
    with pytest.raises(BuildError) as err:
        build_serialized_engine(trt, tiny_onnx, settings, candidate="c2")
    assert "out of workspace memory" in str(err.value) and "workspace_mib" in str(err.value)


def test_backend_build_writes_plan_and_metadata(
    monkeypatch: pytest.MonkeyPatch, fake_gpu: None, tiny_onnx: Path, tmp_path: Path
) -> None:
    fake = fake_tensorrt.make_module(version="10.9.0.34")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    backend = get_backend("tensorrt")
    profile = trt_profile()
    assert backend.availability(profile).ok
    out = tmp_path / "engines"
    artifact = backend.build(tiny_onnx, profile, out, candidate="c1")
    plan = Path(artifact.path)
    assert plan == out / "c1.plan" and plan.read_bytes().startswith(b"PLAN")
    meta = json.loads((out / "c1.plan.json").read_text())
    assert meta["tensorrt_version"] == "10.9.0.34"
    assert (meta["gpu_name"], meta["compute_capability"]) == ("Fake GPU", "9.0")
    assert meta["settings"]["shape_profile"]["opt"] == [8, 3, 32, 32]
    assert meta["io"][0]["name"] == "input" and meta["build_seconds"] >= 0
    assert artifact.meta == meta and artifact.input_shape == (3, 32, 32)
    assert (out / "timing.cache").is_file()  # default shared cache in the engine directory
    # A second candidate in the same directory reuses (reads) the same cache.
    backend.build(tiny_onnx, profile, out, candidate="c2")
    assert any(c.startswith("create_timing_cache(") and "(0 bytes)" not in c for c in fake.CALLS)

    fp16 = dataclasses.replace(profile, precision="fp16")
    with pytest.raises(BuildError) as err:
        backend.build(tiny_onnx, fp16, out, candidate="c3")
    assert "graph is fp32" in str(err.value) and "precision='fp16'" in str(err.value)


def test_runner_refuses_engine_from_another_version(
    monkeypatch: pytest.MonkeyPatch, fake_gpu: None, tiny_onnx: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make_module(version="10.9.0.34"))
    artifact = get_backend("tensorrt").build(tiny_onnx, trt_profile(), tmp_path, candidate="c1")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make_module(version="10.13.0.1"))
    with pytest.raises(EngineMismatch) as err:
        TensorRTRunner(artifact, device=FakeCudaDevice(sys.modules["tensorrt"]))
    assert "10.9.0.34" in str(err.value) and "10.13.0.1" in str(err.value)


def test_unavailable_without_tensorrt_or_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = get_backend("tensorrt")
    monkeypatch.setattr(trt_backend, "module_found", lambda name: False)
    a = backend.availability(trt_profile())
    assert not a.ok and "not installed" in a.reason and "pip install tensorrt" in a.fix
    monkeypatch.setattr(trt_backend, "module_found", lambda name: True)
    monkeypatch.setattr(dcvit_deploy.latency.machine, "cuda_device_count", lambda: 0)
    a = backend.availability(trt_profile())
    assert not a.ok and "CUDA GPU" in a.reason


def test_import_failure_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(BackendUnavailable) as err:
        trt_backend.import_tensorrt()
    assert "TensorRT cannot be imported" in str(err.value) and "doctor" in str(err.value)


def test_fake_runtime_keeps_the_documented_semantics() -> None:
    """The fake is only worth testing against if it behaves like TensorRT where it matters."""
    trt = fake_tensorrt.make_module()
    seen: list[str] = []

    class First(trt.ILogger):  # type: ignore[name-defined]
        def log(self, severity: object, msg: str) -> None:
            seen.append(msg)

    runtime = trt.Runtime(First())
    second = trt.Builder(trt.Logger())  # a second logger while the runtime lives: ignored
    assert isinstance(trt.STATE.logger, First)
    del second
    assert runtime.deserialize_cuda_engine(b"junk") is None and "magic tag" in seen[-1]
    body = {
        "io": [
            {"name": "input", "mode": "input", "shape": [-1, 3, 32, 32], "dtype": "FLOAT"},
            {"name": "logits", "mode": "output", "shape": [-1, 10], "dtype": "FLOAT"},
        ],
        "profiles": {"input": [[1, 3, 32, 32], [1, 3, 32, 32], [4, 3, 32, 32]]},
    }
    engine = runtime.deserialize_cuda_engine(b"PLAN " + json.dumps(body).encode())
    context = engine.create_execution_context()
    assert tuple(context.get_tensor_shape("logits")) == (-1, 10)  # input shape not set yet
    assert not context.execute_async_v3(0) and "not specified" in seen[-1]
    assert not context.set_input_shape("input", (5, 3, 32, 32))  # outside the profile
    assert context.set_input_shape("input", (2, 3, 32, 32))
    assert tuple(context.get_tensor_shape("logits")) == (2, 10)
    assert not context.execute_async_v3(0) and "address is not set" in seen[-1]
    assert context.set_tensor_address("input", 1) and context.set_tensor_address("logits", 2)
    assert context.execute_async_v3(0)
    assert not context.set_tensor_address("nope", 3)


# --------------------------------------------------------------------------- real TensorRT


_TRT_OK, _TRT_WHY = fake_tensorrt.real_tensorrt()
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(not _TRT_OK, reason=_TRT_WHY or "tensorrt unavailable")  # checked first
def test_real_tensorrt_fp16_engine_matches_pytorch(tiny_vit, tmp_path: Path) -> None:
    from dcvit_deploy.export.onnx import DEFAULT_TOLERANCES, compare_outputs, export_onnx

    onnx_path = tmp_path / "vit.fp16.onnx"
    export_onnx(tiny_vit, onnx_path, input_shape=(3, 32, 32), precision="fp16")
    profile = trt_profile(
        precision="fp16",
        measure={"window_iters": 50, "min_duration_s": 0.2, "cuda_graphs": True},
    )
    backend = get_backend("tensorrt")
    artifact = backend.build(onnx_path, profile, tmp_path / "engines", candidate="vit")
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        ref = tiny_vit(torch.from_numpy(x)).numpy()
    v = compare_outputs(
        ref, backend.run(artifact, profile, x), tolerances=DEFAULT_TOLERANCES["fp16"]
    )
    assert v.passed, v.reason
    stats = backend.measure(artifact, profile, 8)
    assert stats.timer == "cuda_event" and stats.p50 > 0


@pytest.mark.gpu
@needs_gpu
def test_cuda_event_timer_times_gpu_work() -> None:
    from dcvit_deploy.latency.loop import CudaEventTimer, measure
    from dcvit_deploy.store.records import MeasureSettings

    stream = torch.cuda.Stream()
    a = torch.randn(1024, 1024, device="cuda")

    def step() -> None:
        with torch.cuda.stream(stream):
            a @ a

    stats, raw = measure(
        step,
        settings=MeasureSettings(warmup_iters=5, window_iters=20, min_duration_s=0.1),
        batch_size=1,
        scope="device_compute",
        timer=CudaEventTimer(stream),
    )
    assert stats.timer == "cuda_event" and all(t > 0 for t in raw)
