"""Triton test inputs shared by the ``test_triton*`` modules: tiny ONNX classifiers and their
artifacts, a fake TensorRT plan with its engine metadata, CPU/TensorRT profiles, and the
``config.pbtxt`` parser (Triton's own protobuf)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcvit_deploy.store.atomic import sha256_file
from dcvit_deploy.store.records import Artifact, LatencyStats, MeasureSettings, TargetProfile

GOLDEN = Path(__file__).parents[1] / "golden"


def make_onnx(
    path: Path,
    *,
    batch: str | int = "batch",
    in_name: str = "input",
    out_name: str = "logits",
) -> Path:
    """A tiny classifier: [batch, 3, 8, 8] -> Flatten -> MatMul -> [batch, 10]."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((192, 10)).astype(np.float32), "W"
    )
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [in_name], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], [out_name]),
        ],
        "tiny",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, 10])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def onnx_artifact(path: Path, **overrides: Any) -> Artifact:
    fields: dict[str, Any] = {
        "candidate": "c60",
        "backend": "onnxruntime",
        "path": str(path),
        "sha256": sha256_file(path),
        "precision": "fp32",
        "input_name": "input",
        "output_name": "logits",
        "input_shape": (1, 3, 8, 8),
        "build_seconds": 0.5,
    }
    fields.update(overrides)
    return Artifact(**fields)


def fake_engine(
    tmp_path: Path, *, max_batch: int = 16, batch_dim: int = -1, short: bool = False
) -> Artifact:
    """Dummy plan bytes plus the engine metadata JSON the engine builder writes next to it.

    The default layout is the TensorRT backend's (``gpu_name``, profile max in
    ``settings.shape_profile``, TensorRT dtype names); ``short`` uses the documented overrides.
    """
    plan = tmp_path / "c60.plan"
    plan.write_bytes(b"not-a-real-engine\x00" * 64)
    dtype = "float16" if short else "half"
    meta: dict[str, Any] = {
        "tensorrt_version": "10.13.0",
        "compute_capability": "9.0",
        "io": [
            {"name": "input", "mode": "input", "shape": [batch_dim, 3, 8, 8], "dtype": dtype},
            {"name": "logits", "mode": "output", "shape": [batch_dim, 10], "dtype": dtype},
        ],
    }
    if short:
        meta.update(gpu="NVIDIA H100 80GB HBM3", max_batch=max_batch)
    else:
        meta.update(
            gpu_name="NVIDIA H100 80GB HBM3",
            settings={"shape_profile": {"input_name": "input", "min": [1, 3, 8, 8],
                                        "opt": [1, 3, 8, 8], "max": [max_batch, 3, 8, 8]}},
        )  # fmt: skip
    (tmp_path / "c60.plan.json").write_text(json.dumps(meta))
    return Artifact(
        candidate="c60",
        backend="tensorrt",
        path=str(plan),
        sha256=sha256_file(plan),
        precision="fp16",
        input_name="input",
        output_name="logits",
        input_shape=(1, 3, 8, 8),
        build_seconds=12.0,
    )


def parse(text: str) -> Any:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def cpu_profile(**options: Any) -> TargetProfile:
    return TargetProfile(
        name="cpu-ort",
        backend="onnxruntime",
        device="cpu",
        precision="fp32",
        batch_sizes=(1, 4),
        budget_batch_size=1,
        statistic="p50",
        scope="host",
        backend_options={"provider": "cpu", **options},
    )


def trt_profile(
    *, cuda_graphs: bool = True, device_id: int = 0, max_batch: int = 16
) -> TargetProfile:
    return TargetProfile(
        name="h100-trt-fp16",
        backend="tensorrt",
        device="cuda",
        precision="fp16",
        batch_sizes=(1, 8, max_batch),
        budget_batch_size=1,
        statistic="p50",
        scope="device_compute",
        measure=MeasureSettings(cuda_graphs=cuda_graphs),
        backend_options={"device_id": device_id},
    )


STATS = LatencyStats(
    batch_size=1, iterations=50, mean=1.0, std=0.1, cov=0.1, min=0.9, max=1.4, p50=1.0,
    p90=1.1, p95=1.2, p99=1.3, throughput=1000.0, scope="host", timer="perf_counter",
    windows=3, window_medians=(1.0, 1.0, 1.0), stable=True, warmup_iters=10, duration_s=1.0,
)  # fmt: skip


def candidate(tmp_path: Path, name: str, seed: int = 0, **kw: Any) -> Artifact:
    """A tiny ONNX artifact; ``seed`` changes the weights (so the sha256) but not the I/O."""
    src = tmp_path / "artifacts" / name
    src.mkdir(parents=True, exist_ok=True)
    path = make_onnx(src / f"{name}.onnx", **kw)
    if seed:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        w = numpy_helper.to_array(model.graph.initializer[0]) + seed
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
        onnx.save(model, str(path))
    return onnx_artifact(path, candidate=name)
