"""The TensorRT loaders and runner through the fake runtime and a fake CUDA device (CPU only).

Each test here guards one fault found by reading the backend against TensorRT's documented
behaviour: the per-process logger, the device made current, stream ordering, checked return
values, CUDA graphs owned with their buffers, and I/O dtypes.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from fakes import fake_tensorrt
from fakes.fake_tensorrt import FakeCudaDevice

import dcvit_deploy.latency.machine
from dcvit_deploy.backends import BuildError, get_backend
from dcvit_deploy.backends import tensorrt as trt_backend
from dcvit_deploy.backends.tensorrt import TensorRTRunner
from dcvit_deploy.config.profiles import profile_from_dict
from dcvit_deploy.errors import EngineMismatch, ProfileError, UserInputError
from dcvit_deploy.store.records import Artifact, TargetProfile

FAST_MEASURE = {
    "warmup_iters": 1,
    "warmup_min_s": 0.0,
    "window_iters": 3,
    "min_window_s": 0.0,
    "min_windows": 3,
    "max_windows": 3,
    "min_duration_s": 0.0,
    "stability_tolerance": 0.9,
}


def trt_profile(**changes: Any) -> TargetProfile:
    data: dict[str, Any] = {
        "name": "test-trt",
        "backend": "tensorrt",
        "device": "cuda",
        "precision": "fp32",
        "batch_sizes": [1, 8],
        "budget_batch_size": 8,
        "statistic": "p50",
        "scope": "device_compute",
        "measure": FAST_MEASURE,
        "backend_options": {"workspace_mib": 256},
    }
    data.update(changes)
    return profile_from_dict(data)


Install = Callable[..., ModuleType]


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Install:
    """Install a fake ``tensorrt`` (knobs as keyword arguments) on a machine with one fake GPU."""
    monkeypatch.setattr(dcvit_deploy.latency.machine, "cuda_device_count", lambda: 2)
    # Older layouts asked torch for the GPU's identity; make that fake too.
    monkeypatch.setattr(
        trt_backend, "device_identity", lambda device_id=0: ("Fake GPU", "9.0"), raising=False
    )
    backend = get_backend("tensorrt")
    monkeypatch.setattr(
        backend,
        "device_factory",
        lambda index: FakeCudaDevice(sys.modules["tensorrt"], index),
        raising=False,
    )
    monkeypatch.setattr(backend, "_runner", None, raising=False)

    def install(**knobs: Any) -> ModuleType:
        mod = fake_tensorrt.make_module(**knobs)
        monkeypatch.setitem(sys.modules, "tensorrt", mod)
        return mod

    return install


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    return fake_tensorrt.write_tiny_onnx(tmp_path / "tiny.onnx")


def build(tiny_onnx: Path, out: Path, candidate: str = "c1", **changes: Any) -> Artifact:
    profile = trt_profile(**changes)
    return get_backend("tensorrt").build(tiny_onnx, profile, out, candidate=candidate)


def runner_for(trt: ModuleType, artifact: Artifact, device_id: int = 0) -> TensorRTRunner:
    return TensorRTRunner(artifact, device_id=device_id, device=FakeCudaDevice(trt, device_id))


def expected_logits(x: np.ndarray) -> np.ndarray:
    """What the fake engine computes: mean of each item plus the class index."""
    means = x.reshape(x.shape[0], -1).astype(np.float64).mean(axis=1)
    return (means[:, None] + np.arange(fake_tensorrt.NUM_CLASSES)).astype(np.float32)


# --------------------------------------------------------------------------- logger


def test_build_error_quotes_the_log_while_a_runtime_is_alive(
    fake_trt: Install, tiny_onnx: Path, tmp_path: Path
) -> None:
    """TensorRT keeps the first logger while a runtime lives; a failed build must still quote
    its own error, not 'see the TensorRT log'."""
    fake_trt()
    artifact = build(tiny_onnx, tmp_path)
    trt = fake_trt(build_fails=True)
    backend = get_backend("tensorrt")
    profile = trt_profile()
    out = backend.run(artifact, profile, np.zeros((1, 3, 32, 32), np.float32))  # runtime alive
    assert out.shape == (1, 10)
    assert trt.STATE.owners >= 1  # the runner's Runtime holds the process logger
    with pytest.raises(BuildError) as err:
        backend.build(tiny_onnx, profile, tmp_path, candidate="c2")
    assert "out of workspace memory for layer 7" in str(err.value)
    assert "see the TensorRT log" not in str(err.value)


# --------------------------------------------------------------------------- device


def test_builder_runtime_and_context_are_created_on_the_profile_device(
    fake_trt: Install, tiny_onnx: Path, tmp_path: Path
) -> None:
    trt = fake_trt()
    profile_opts = {"workspace_mib": 256, "device_id": 1}
    artifact = build(tiny_onnx, tmp_path, backend_options=profile_opts)
    assert "Builder(device=1)" in trt.CALLS and "Builder(device=0)" not in trt.CALLS
    assert artifact.meta["device_id"] == 1
    get_backend("tensorrt").run(
        artifact, trt_profile(backend_options=profile_opts), np.zeros((1, 3, 32, 32), np.float32)
    )
    assert "Runtime(device=1)" in trt.CALLS
    assert "create_execution_context(device=1)" in trt.CALLS


# --------------------------------------------------------------------------- streams


def test_inputs_buffers_and_copies_are_ordered_on_the_runner_stream(
    fake_trt: Install, tiny_onnx: Path, tmp_path: Path
) -> None:
    trt = fake_trt()
    artifact = build(tiny_onnx, tmp_path)
    runner = runner_for(trt, artifact)
    stream = runner.stream.cuda_stream
    del trt.CALLS[:]
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32), dtype=np.float32)
    out = runner.infer(x)
    np.testing.assert_allclose(out, expected_logits(x), rtol=1e-5, atol=1e-5)
    calls = trt.CALLS
    # The runner's stream first waits for work already queued by the caller on the current one.
    assert calls[0] == f"stream{stream}.wait_stream(stream0)"
    placed = [c for c in calls if c.startswith(("alloc", "random", "copy"))]
    assert placed and all(c.endswith(f"on stream{stream}") for c in placed), placed
    enqueue = calls.index(f"execute_async_v3(stream={stream})")
    h2d = calls.index(f"copy{x.shape} on stream{stream}")
    d2h = calls.index(f"copy{(8, 10)} on stream{stream}")
    assert h2d < enqueue < d2h < calls.index(f"stream{stream}.synchronize")


def test_measured_step_with_copies_runs_on_the_runner_stream(
    fake_trt: Install, tiny_onnx: Path, tmp_path: Path
) -> None:
    trt = fake_trt()
    runner = runner_for(trt, build(tiny_onnx, tmp_path))
    stream = runner.stream.cuda_stream
    step = runner.step(8, copies=True, cuda_graph=False)
    del trt.CALLS[:]
    step()
    expected = [
        f"copy{(8, 3, 32, 32)} on stream{stream}",
        f"execute_async_v3(stream={stream})",
        f"copy{(8, 10)} on stream{stream}",
    ]
    assert list(trt.CALLS) == expected


# --------------------------------------------------------------------------- return values


def test_refused_timing_cache_builds_without_it_and_says_so(
    fake_trt: Install, tiny_onnx: Path, tmp_path: Path
) -> None:
    fake_trt(refuse_timing_cache=b"foreign")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"foreign-gpu-entries")
    artifact = build(tiny_onnx, tmp_path)  # used to crash after a successful build
    assert Path(artifact.path).read_bytes().startswith(b"PLAN ")
    status = artifact.meta["timing_cache"]
    assert status.startswith("refused") and "another device" in status
    # The refused file is replaced by this device's cache so the next candidate reuses it.
    assert not cache.read_bytes().startswith(b"foreign") and cache.read_bytes()


def test_refused_timing_cache_merge_keeps_this_build(
    fake_trt: Install, tiny_onnx: Path, tmp_path: Path
) -> None:
    fake_trt(refuse_combine=True)
    (tmp_path / "timing.cache").write_bytes(b"entry-a")
    artifact = build(tiny_onnx, tmp_path)
    assert "not merged" in artifact.meta["timing_cache"]
    assert "tactic-" in (tmp_path / "timing.cache").read_text()


def test_failed_deserialize_and_context_quote_the_log(
    fake_trt: Install, tiny_onnx: Path, tmp_path: Path
) -> None:
    trt = fake_trt()
    artifact = build(tiny_onnx, tmp_path)
    Path(artifact.path).write_bytes(b"garbage")
    with pytest.raises(EngineMismatch) as err:
        runner_for(trt, artifact)
    assert "magic tag does not match" in str(err.value)
    trt = fake_trt(context_fails=True)
    artifact = build(tiny_onnx, tmp_path, candidate="c2")
    with pytest.raises(EngineMismatch) as err:
        runner_for(trt, artifact)
    assert "out of device memory for the execution context" in str(err.value)


def test_batch_outside_the_engine_profile_is_refused_with_the_log(
    fake_trt: Install, tiny_onnx: Path, tmp_path: Path
) -> None:
    trt = fake_trt()
    runner = runner_for(trt, build(tiny_onnx, tmp_path))
    with pytest.raises(ProfileError) as err:
        runner.bind(9)
    assert "outside profile" in str(err.value) and "batch size 9" in str(err.value)


# --------------------------------------------------------------------------- CUDA graphs


def graph_count(runner: TensorRTRunner) -> int:
    """CUDA graphs the runner holds (all belong to its current binding)."""
    return len(runner._binding.graphs) if runner._binding is not None else 0


def test_cuda_graphs_are_owned_by_the_runner_and_released_with_their_buffers(
    fake_trt: Install, tiny_onnx: Path, tmp_path: Path
) -> None:
    trt = fake_trt()
    runner = runner_for(trt, build(tiny_onnx, tmp_path))
    replay8 = runner.step(8, copies=False, cuda_graph=True)
    replay8()
    again = runner.step(8, copies=False, cuda_graph=True)  # same buffers: no second capture
    again()
    assert sum(c.startswith("capture on") for c in trt.CALLS) == 1
    assert graph_count(runner) == 1
    replay1 = runner.step(1, copies=False, cuda_graph=True)  # rebinding releases the old graph
    assert "graph.reset" in trt.CALLS and graph_count(runner) == 1
    replay1()
    with pytest.raises(RuntimeError) as err:
        replay8()  # its buffers are gone: refused instead of replaying freed memory
    assert "rebound" in str(err.value)
    # Real inputs after graphs: results come from the freshly bound buffers.
    x = np.ones((1, 3, 32, 32), np.float32)
    np.testing.assert_allclose(runner.infer(x), expected_logits(x))
    runner.close()
    assert graph_count(runner) == 0


# --------------------------------------------------------------------------- dtypes


def test_uint8_and_fp8_io_are_bound_and_packed_types_refused_by_name(
    fake_trt: Install, tiny_onnx: Path, tmp_path: Path
) -> None:
    trt = fake_trt(io_dtypes={"input": "UINT8"})
    runner = runner_for(trt, build(tiny_onnx, tmp_path, "u8"))
    x = np.full((1, 3, 32, 32), 7, np.uint8)
    np.testing.assert_allclose(runner.infer(x), expected_logits(x))
    assert runner.dtypes["input"] == torch.uint8
    trt = fake_trt(io_dtypes={"logits": "FP8"})
    runner = runner_for(trt, build(tiny_onnx, tmp_path, "f8"))
    assert runner.dtypes["logits"] == torch.float8_e4m3fn
    trt = fake_trt(io_dtypes={"input": "INT4"})
    artifact = build(tiny_onnx, tmp_path, "i4")
    with pytest.raises(UserInputError) as err:
        runner_for(trt, artifact)
    assert "'input'" in str(err.value) and "INT4" in str(err.value)


# --------------------------------------------------------------------------- measure


def test_measure_scopes_and_cuda_graphs_through_the_fake(
    fake_trt: Install, tiny_onnx: Path, tmp_path: Path
) -> None:
    trt = fake_trt()
    backend = get_backend("tensorrt")
    artifact = build(tiny_onnx, tmp_path)
    compute = trt_profile(measure={**FAST_MEASURE, "cuda_graphs": True})
    stats = backend.measure(artifact, compute, 8)
    assert stats.timer == "cuda_event" and stats.scope == "device_compute"
    assert "graph.replay" in trt.CALLS
    host = dataclasses.replace(trt_profile(), scope="host")
    assert backend.measure(artifact, host, 1).timer == "host"
    meta = json.loads(Path(artifact.path + ".json").read_text())
    assert meta["io"][0]["dtype"] == "float"


# --------------------------------------------------------------------------- real TensorRT

_TRT_OK, _TRT_WHY = fake_tensorrt.real_tensorrt()  # the shared probe: one reason

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(not _TRT_OK, reason=_TRT_WHY or "tensorrt unavailable")
def test_real_runner_rebinds_graphs_across_batch_sizes(tiny_onnx: Path, tmp_path: Path) -> None:
    """On hardware: graphs at two batch sizes in turn, then real inputs at both, all correct."""
    backend = get_backend("tensorrt")
    profile = trt_profile(
        measure={**FAST_MEASURE, "cuda_graphs": True},
        backend_options={"workspace_mib": 256, "tf32": False},  # exact FP32 for the check
    )
    artifact = backend.build(tiny_onnx, profile, tmp_path, candidate="real")
    assert artifact.meta["timing_cache"] in ("new", "reused")
    for batch in (8, 1, 8):
        assert backend.measure(artifact, profile, batch).p50 > 0
    weight = np.ones((3 * 32 * 32, 10), np.float32)  # the tiny graph: flatten @ ones
    for batch in (1, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32), dtype=np.float32)
        out = backend.run(artifact, profile, x)
        np.testing.assert_allclose(out, x.reshape(batch, -1) @ weight, rtol=1e-3, atol=1e-2)
