"""Backends: ONNX Runtime and PyTorch for real on CPU; registry, plugins and GPU refusals."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dcvit_deploy.backends as registry
from dcvit_deploy.backends import (
    Availability,
    BuildError,
    backend_names,
    doctor,
    get_backend,
    register_backend,
    unregister_backend,
)
from dcvit_deploy.backends.onnxruntime import create_session, provider_list
from dcvit_deploy.config.profiles import load_profile, profile_from_dict
from dcvit_deploy.errors import BackendUnavailable, ProfileError, UserInputError
from dcvit_deploy.export.onnx import export_onnx
from dcvit_deploy.store.records import TargetProfile

FAST_MEASURE = {
    "warmup_iters": 2,
    "warmup_min_s": 0.0,
    "window_iters": 5,
    "min_window_s": 0.0,
    "min_windows": 3,
    "max_windows": 4,
    "min_duration_s": 0.0,
    "stability_tolerance": 0.5,
}


def cpu_profile(backend: str = "onnxruntime", **options: object) -> TargetProfile:
    opts: dict[str, object] = {"intra_op_num_threads": 1} if backend == "onnxruntime" else {}
    opts.update(options)
    return profile_from_dict(
        {
            "name": f"test-{backend}",
            "backend": backend,
            "device": "cpu",
            "precision": "fp32",
            "batch_sizes": [1, 3],
            "statistic": "p50",
            "scope": "host",
            "measure": FAST_MEASURE,
            "backend_options": opts,
        }
    )


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    import timm
    from fakes.runs import TINY_VIT_KWARGS

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT_KWARGS).eval()


@pytest.fixture(scope="module")
def onnx_file(vit: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    # TorchScript tracing: ~10x faster than the dynamo exporter; export itself is tested elsewhere.
    export_onnx(vit, path, input_shape=(3, 32, 32), exporter="torchscript", simplify=False)
    return path


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the driver report no GPU, whatever machine runs the tests."""
    import dcvit_deploy.latency.machine

    monkeypatch.setattr(dcvit_deploy.latency.machine, "cuda_device_count", lambda: 0)


def test_onnxruntime_cpu_build_measure_run(
    vit: torch.nn.Module, onnx_file: Path, tmp_path: Path
) -> None:
    backend = get_backend("onnxruntime")
    profile = cpu_profile()
    artifact = backend.build(onnx_file, profile, tmp_path / "art", candidate="c0")
    assert Path(artifact.path) == tmp_path / "art" / "c0.onnx"
    assert Path(artifact.path).read_bytes() == onnx_file.read_bytes()
    assert (artifact.input_name, artifact.output_name) == ("input", "logits")
    assert artifact.input_shape == (3, 32, 32) and artifact.precision == "fp32"
    assert artifact.build_seconds > 0
    assert artifact.meta["session_providers"] == ["CPUExecutionProvider"]

    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    out = backend.run(artifact, profile, x)
    with torch.inference_mode():
        ref = vit(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)

    raw = tmp_path / "raw.json"
    stats = backend.measure(artifact, profile, 3, raw_path=raw)
    assert stats.batch_size == 3 and stats.scope == "host" and stats.timer == "host"
    assert 3 <= stats.windows <= 4 and stats.iterations == 5 * stats.windows
    assert 0 < stats.min <= stats.p50 <= stats.p99 <= stats.max
    assert stats.throughput == pytest.approx(3000 / stats.mean)
    saved = json.loads(raw.read_text())
    assert len(saved["samples"]) == stats.iterations
    assert saved["meta"]["candidate"] == "c0" and saved["meta"]["batch_size"] == 3

    with pytest.raises(ProfileError) as err:
        backend.measure(artifact, profile, 4)
    assert "batch size 4" in str(err.value)


def test_onnxruntime_rounds_keep_one_session_per_candidate_open(
    onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interleaved rounds time warm sessions opened once per candidate (not a new session
    and warm-up every round, which the one-slot cache forced), and spinning is configurable."""
    import dataclasses

    import dcvit_deploy.backends.onnxruntime as ortb
    from dcvit_deploy.latency.rounds import measure_rounds

    backend = get_backend("onnxruntime")
    profile = cpu_profile()
    arts = {n: backend.build(onnx_file, profile, tmp_path / "art", candidate=n) for n in ("a", "b")}
    created: list[dict] = []
    real = ortb.create_session

    def counting(path, **kw):  # type: ignore[no-untyped-def]
        session = real(path, **kw)
        created.append(
            {"spin": session.get_session_options().get_session_config_entry(
                "session.intra_op.allow_spinning")}
        )  # fmt: skip
        return session

    monkeypatch.setattr(ortb, "create_session", counting)
    quiet = dataclasses.replace(
        profile, backend_options={**profile.backend_options, "allow_spinning": False}
    )
    result = measure_rounds(backend, arts, quiet, [1], min_rounds=3, max_rounds=3)
    assert result.rounds == 3 and set(result.stats) == {"a", "b"}
    assert len(created) == 2  # one session per candidate for all three rounds
    assert {c["spin"] for c in created} == {"0"}


def test_onnxruntime_refuses_precision_mismatch(vit: torch.nn.Module, tmp_path: Path) -> None:
    fp16 = tmp_path / "fp16.onnx"
    export_onnx(
        vit, fp16, input_shape=(3, 32, 32), precision="fp16", exporter="torchscript", simplify=False
    )
    with pytest.raises(BuildError) as err:
        get_backend("onnxruntime").build(fp16, cpu_profile(), tmp_path / "art", candidate="c16")
    assert "fp16" in str(err.value) and "precision='fp32'" in str(err.value)


def test_build_without_onnx_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError) as err:
        get_backend("onnxruntime").build(
            tmp_path / "missing.onnx", cpu_profile(), tmp_path, candidate="c"
        )
    assert "export the candidate first" in str(err.value)


def test_torch_backend_builds_from_the_module(vit: torch.nn.Module, tmp_path: Path) -> None:
    backend = get_backend("torch")
    assert backend.needs_module is True
    profile = cpu_profile("torch", num_threads=1)
    with pytest.raises(UserInputError) as err:
        backend.build(None, profile, tmp_path, candidate="c0")
    assert "model=" in str(err.value)
    artifact = backend.build(None, profile, tmp_path, candidate="c0", model=vit)
    assert artifact.path.endswith("c0.pt2") and artifact.input_shape == (3, 32, 32)
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        ref = vit(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(backend.run(artifact, profile, x), ref, atol=1e-5, rtol=1e-5)
    threads = torch.get_num_threads()
    stats = backend.measure(artifact, profile, 1)
    assert stats.iterations >= 15 and stats.p50 > 0 and torch.get_num_threads() == threads
    ready = backend.open_measurement(artifact, profile, 2)  # its own module, same step and timer
    assert torch.get_num_threads() == 1 and ready.timer.name == "host"
    ready.step()
    ready.close()
    assert torch.get_num_threads() == threads


def test_gpu_profile_without_gpu_is_refused_with_fix(
    no_gpu: None, onnx_file: Path, tmp_path: Path
) -> None:
    profile = load_profile("ort-cuda")
    backend = get_backend("onnxruntime")
    availability = backend.availability(profile)
    assert not availability.ok and "CUDA GPU" in availability.reason
    with pytest.raises(BackendUnavailable) as err:
        backend.build(onnx_file, profile, tmp_path, candidate="c0")
    message = str(err.value)
    assert "ort-cuda" in message and "fix:" in message and "cpu-ort" in message
    for name in ("h100-trt-fp16", "torch-cuda"):
        gpu_profile = load_profile(name)
        assert not get_backend(gpu_profile.backend).availability(gpu_profile).ok


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot run")
def test_silent_cpu_fallback_is_detected(onnx_file: Path) -> None:
    """onnxruntime-gpu falls back to CPU with only a log line; we must refuse, not measure CPU."""
    with pytest.raises(BackendUnavailable) as err:
        create_session(onnx_file, provider="cuda", options={"log_severity_level": 4})
    assert "fell back to CPUExecutionProvider" in str(err.value)


def test_provider_list_for_tensorrt_uses_profile_shapes() -> None:
    profile = load_profile("ort-cuda")
    providers = provider_list(
        "tensorrt",
        {"trt_workspace_mib": 512, "device_id": 1},
        profile=profile,
        input_shape=(3, 224, 224),
        cache_dir=Path("/cache"),
    )
    name, opts = providers[0]
    assert name == "TensorrtExecutionProvider"
    assert opts["trt_profile_min_shapes"] == "input:1x3x224x224"
    assert opts["trt_profile_opt_shapes"] == "input:1x3x224x224"
    assert opts["trt_profile_max_shapes"] == "input:32x3x224x224"
    assert opts["trt_max_workspace_size"] == str(512 << 20) and opts["device_id"] == "1"
    assert opts["trt_engine_cache_path"] == "/cache/ort_trt_cache"
    assert providers[1][0] == "CUDAExecutionProvider" and providers[-1] == "CPUExecutionProvider"
    cuda = provider_list("cuda", {}, cuda_graph=True)
    assert cuda[0][1]["enable_cuda_graph"] == "1"
    assert provider_list("cpu", {}) == ["CPUExecutionProvider"]


# --------------------------------------------------------------------------- registry


def test_registry_knows_builtins_and_rejects_unknown() -> None:
    assert {"onnxruntime", "tensorrt", "torch"} <= set(backend_names())
    with pytest.raises(UserInputError) as err:
        get_backend("openvino")
    assert "openvino" in str(err.value) and "onnxruntime, tensorrt, torch" in str(err.value)


def test_register_backend_rejects_duplicates() -> None:
    from fakes.fake_backend import EchoBackend

    with pytest.raises(UserInputError) as err:
        register_backend("onnxruntime", EchoBackend)
    assert "already registered" in str(err.value)
    register_backend("echo", EchoBackend)
    try:
        assert get_backend("echo").availability().ok
        with pytest.raises(UserInputError):
            register_backend("echo", EchoBackend)
    finally:
        unregister_backend("echo")
    assert "echo" not in backend_names()


def _entry_points(monkeypatch: pytest.MonkeyPatch, *pairs: tuple[str, str]) -> None:
    eps = [
        importlib.metadata.EntryPoint(name=n, value=v, group=registry.ENTRY_POINT_GROUP)
        for n, v in pairs
    ]
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    monkeypatch.setattr(registry, "_INSTANCES", {})


def test_entry_point_plugin_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, ("echo", "fakes.fake_backend:EchoBackend"))
    assert "echo" in backend_names()
    backend = get_backend("echo")
    assert backend.name == "echo" and backend.availability().ok
    names = [name for name, _ in doctor()]
    assert names == sorted(["echo", "onnxruntime", "tensorrt", "torch"])


def test_entry_point_duplicates_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, ("tensorrt", "fakes.fake_backend:EchoBackend"))
    with pytest.raises(UserInputError) as err:
        backend_names()
    assert "registered twice" in str(err.value) and "fakes.fake_backend:EchoBackend" in str(
        err.value
    )
    _entry_points(
        monkeypatch, ("echo", "fakes.fake_backend:EchoBackend"), ("echo", "other.pkg:Echo")
    )
    with pytest.raises(UserInputError):
        get_backend("echo")
    rows = doctor()  # doctor reports instead of raising
    assert rows[0][0] == "registry" and not rows[0][1].ok


def test_broken_plugins_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(
        monkeypatch,
        ("missing", "no_such_package.mod:Backend"),
        ("incomplete", "fakes.fake_backend:Incomplete"),
        ("exploding", "fakes.fake_backend:raises_on_start"),
        ("misnamed", "fakes.fake_backend:EchoBackend"),
    )
    with pytest.raises(BackendUnavailable) as err:
        get_backend("missing")
    assert "no_such_package" in str(err.value)
    with pytest.raises(BackendUnavailable) as err:
        get_backend("incomplete")
    assert "does not implement" in str(err.value) and "build" in str(err.value)
    with pytest.raises(BackendUnavailable) as err:
        get_backend("exploding")
    assert "driver exploded" in str(err.value)
    with pytest.raises(BackendUnavailable) as err:
        get_backend("misnamed")
    assert "calls itself 'echo'" in str(err.value)
    rows = dict(doctor())
    assert not rows["missing"].ok and not rows["exploding"].ok
    assert rows["onnxruntime"].ok


def test_doctor_reports_every_builtin(no_gpu: None) -> None:
    rows = dict(doctor())
    assert isinstance(rows["onnxruntime"], Availability) and rows["onnxruntime"].ok
    assert rows["torch"].ok
    trt = rows["tensorrt"]
    assert not trt.ok and trt.fix  # no TensorRT or no GPU here: says how to fix it
    gpu_rows = dict(doctor(load_profile("ort-cuda")))
    assert not gpu_rows["onnxruntime"].ok and "CUDA GPU" in gpu_rows["onnxruntime"].reason


# --------------------------------------------------------------------------- on a GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


@pytest.mark.gpu
@needs_gpu
def test_onnxruntime_cuda_with_io_binding(vit: torch.nn.Module, onnx_file: Path, tmp_path: Path):
    profile = profile_from_dict(
        {
            "name": "test-ort-cuda",
            "backend": "onnxruntime",
            "device": "cuda",
            "precision": "fp32",
            "batch_sizes": [1, 3],
            "statistic": "p50",
            "scope": "host",
            "measure": {**FAST_MEASURE, "no_copy": True, "cuda_graphs": True},
        }
    )
    backend = get_backend("onnxruntime")
    artifact = backend.build(onnx_file, profile, tmp_path, candidate="c0")
    assert artifact.meta["session_providers"][0] == "CUDAExecutionProvider"
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        ref = vit(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(backend.run(artifact, profile, x), ref, atol=1e-3, rtol=1e-3)
    for batch in (3, 1, 3):  # a graph (session) per batch size, measured in turn
        assert backend.measure(artifact, profile, batch).p50 > 0


@pytest.mark.gpu
@needs_gpu
def test_torch_backend_cuda_graphs(vit: torch.nn.Module, tmp_path: Path) -> None:
    profile = load_profile("torch-cuda")
    profile = profile_from_dict(
        {
            "name": "test-torch-cuda",
            "backend": "torch",
            "device": "cuda",
            "precision": profile.precision,
            "batch_sizes": [1, 8],
            "statistic": "p50",
            "scope": "device_compute",
            "measure": {**FAST_MEASURE, "cuda_graphs": True},
        }
    )
    backend = get_backend("torch")
    artifact = backend.build(None, profile, tmp_path, candidate="c0", model=vit)
    stats = backend.measure(artifact, profile, 8)
    assert stats.timer == "cuda_event" and stats.p50 > 0
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        ref = vit(torch.from_numpy(x)).numpy()
    out = backend.run(artifact, profile, x)
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99


def test_availability_reports_a_broken_probe_instead_of_raising(monkeypatch) -> None:
    from dcvit_deploy.backends import get_backend

    backend = get_backend("onnxruntime")

    def broken(profile):
        raise OSError("libonnxruntime.so: cannot open shared object file")

    monkeypatch.setattr(backend, "_probe", broken)
    a = backend.availability(None)
    assert not a.ok and "availability check failed: libonnxruntime.so" in a.reason and a.fix


# --------------------------------------------------------------------------- ORT GPU paths, mocked


class _FakeValue:
    """An OrtValue on a fake device: a shape and a unique address."""

    _next = 0x1000

    def __init__(self, shape: tuple[int, ...]) -> None:
        _FakeValue._next += 0x1000
        self._shape, self.address = tuple(shape), _FakeValue._next

    def shape(self) -> list[int]:
        return list(self._shape)

    def data_ptr(self) -> int:
        return self.address


class _FakeArg:
    def __init__(self, name: str, shape: list[object]) -> None:
        self.name, self.type, self.shape = name, "tensor(float)", shape


class _FakeBinding:
    def __init__(self) -> None:
        self.inputs: dict[str, _FakeValue] = {}
        self.outputs: dict[str, _FakeValue] = {}

    def bind_ortvalue_input(self, name: str, value: _FakeValue) -> None:
        self.inputs[name] = value

    def bind_ortvalue_output(self, name: str, value: _FakeValue) -> None:
        self.outputs[name] = value


class _FakeCudaGraphSession:
    """ONNX Runtime's CUDA-graph contract: per graph id, a few regular runs, then one capture
    with the bound buffers; every later run replays that capture whatever is bound now."""

    WARMUP_RUNS = 2

    def __init__(self, provider: str, cuda_graph: bool) -> None:
        self.provider, self.cuda_graph = provider, cuda_graph
        self.runs: dict[int, int] = {}
        self.graphs: dict[int, tuple[int, ...]] = {}
        self.wrong_replays: list[str] = []

    def get_providers(self) -> list[str]:
        return [PROVIDERS_BY_KEY[self.provider], "CPUExecutionProvider"]

    def get_inputs(self) -> list[_FakeArg]:
        return [_FakeArg("input", ["batch", 3, 32, 32])]

    def get_outputs(self) -> list[_FakeArg]:
        return [_FakeArg("logits", ["batch", 10])]

    def io_binding(self) -> _FakeBinding:
        return _FakeBinding()

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.zeros((feed["input"].shape[0], 10), np.float32)]

    def run_with_iobinding(self, binding: _FakeBinding, run_options: object = None) -> None:
        graph_id = 0
        if run_options is not None:
            entry = run_options.get_run_config_entry("gpu_graph_id")  # type: ignore[attr-defined]
            graph_id = int(entry) if entry else 0
        bound = (
            binding.inputs["input"]._shape[0],
            binding.inputs["input"].address,
            binding.outputs["logits"].address,
        )
        if not self.cuda_graph or graph_id == -1:
            return
        if graph_id in self.graphs:
            if self.graphs[graph_id] != bound:
                self.wrong_replays.append(f"graph {graph_id} captured {self.graphs[graph_id]}")
            return
        self.runs[graph_id] = self.runs.get(graph_id, 0) + 1
        if self.runs[graph_id] > self.WARMUP_RUNS:
            self.graphs[graph_id] = bound


PROVIDERS_BY_KEY = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


@pytest.fixture
def fake_ort_gpu(monkeypatch: pytest.MonkeyPatch) -> list[_FakeCudaGraphSession]:
    """A GPU machine as far as the ONNX Runtime backend can tell: sessions come from the fake."""
    import onnxruntime as ort

    import dcvit_deploy.backends.onnxruntime as ortb
    import dcvit_deploy.latency.machine

    sessions: list[_FakeCudaGraphSession] = []

    def create_session(path: Path, *, provider: str, cuda_graph: bool = False, **_: object):
        sessions.append(_FakeCudaGraphSession(provider, cuda_graph))
        return sessions[-1]

    monkeypatch.setattr(dcvit_deploy.latency.machine, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(ortb, "package_version", lambda name: "1.31.1")
    monkeypatch.setattr(ortb, "_tensorrt_libraries_found", lambda: True)
    monkeypatch.setattr(ortb, "create_session", create_session)
    monkeypatch.setattr(
        ort.OrtValue,
        "ortvalue_from_numpy",
        staticmethod(lambda x, device="cpu", device_id=0: _FakeValue(x.shape)),
    )
    monkeypatch.setattr(
        ort.OrtValue,
        "ortvalue_from_shape_and_type",
        staticmethod(lambda shape, dtype, device="cpu", device_id=0: _FakeValue(tuple(shape))),
    )
    backend = get_backend("onnxruntime")
    for attr in ("_cache_key", "_cache_session"):
        monkeypatch.setattr(backend, attr, None, raising=False)
    return sessions


def ort_gpu_profile(**changes: object) -> TargetProfile:
    data: dict[str, object] = {
        "name": "test-ort-gpu",
        "backend": "onnxruntime",
        "device": "cuda",
        "precision": "fp32",
        "batch_sizes": [1, 3],
        "statistic": "p50",
        "scope": "host",
        "measure": {**FAST_MEASURE, "no_copy": True, "cuda_graphs": True},
        "backend_options": {"provider": "cuda"},
    }
    data.update(changes)
    return profile_from_dict(data)


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_ort_cuda_graph_replays_the_capture_of_the_measured_batch(
    fake_ort_gpu: list[_FakeCudaGraphSession], tmp_path: Path, provider: str
) -> None:
    from fakes.fake_tensorrt import write_tiny_onnx

    backend = get_backend("onnxruntime")
    profile = ort_gpu_profile(backend_options={"provider": provider})
    artifact = backend.build(write_tiny_onnx(tmp_path / "t.onnx"), profile, tmp_path, candidate="c")
    for batch in (1, 3, 1, 3):  # measured in turn, as rounds across batch sizes do
        assert backend.measure(artifact, profile, batch).p50 >= 0
    graph_sessions = [s for s in fake_ort_gpu if s.cuda_graph]
    assert graph_sessions, "cuda_graphs was dropped for this provider"
    assert all(s.provider == provider for s in graph_sessions)
    wrong = [w for s in graph_sessions for w in s.wrong_replays]
    assert not wrong, wrong
    captured = {g[0] for s in graph_sessions for g in s.graphs.values()}
    assert captured == {1, 3}


def test_ort_refuses_scopes_it_cannot_time() -> None:
    with pytest.raises(ProfileError) as err:
        ort_gpu_profile(scope="device_with_copies")
    assert "device_with_copies" in str(err.value) and "host" in str(err.value)
    with pytest.raises(ProfileError) as err:
        ort_gpu_profile(backend_options={"provider": "cuda", "io_binding": False})
    assert "cuda_graphs" in str(err.value) and "io_binding" in str(err.value)


def test_provider_list_keeps_cuda_graphs_for_the_tensorrt_provider() -> None:
    trt = provider_list("tensorrt", {}, cuda_graph=True)
    assert trt[0][1]["trt_cuda_graph_enable"] == "True"
    assert "trt_cuda_graph_enable" not in provider_list("tensorrt", {})[0][1]
