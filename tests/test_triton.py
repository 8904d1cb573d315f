"""Triton configs from the artifact's own I/O and the measured profile: golden text, schema,
errors; shared helpers (tiny ONNX models, fake engines, profiles) for the Triton tests."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fakes.triton_inputs import (
    GOLDEN,
    cpu_profile,
    fake_engine,
    make_onnx,
    onnx_artifact,
    parse,
    trt_profile,
)
from triton_rules import validate_config

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.store.atomic import sha256_file
from dcvit_deploy.store.records import LatencyStats
from dcvit_deploy.triton import (
    publish,
    read_onnx_io,
)


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    return make_onnx(src / "c60.onnx")


# --------------------------------------------------------------------------- ONNX


def test_onnx_repository_matches_golden_and_triton_schema(tiny_onnx: Path, tmp_path: Path) -> None:
    stats = LatencyStats(
        batch_size=8, iterations=50, mean=1.0, std=0.1, cov=0.1, min=0.9, max=1.4, p50=1.0,
        p90=1.1, p95=1.2, p99=1.3, throughput=8000.0, scope="host", timer="perf_counter",
        windows=3, window_medians=(1.0, 1.0, 1.0), stable=True, warmup_iters=10, duration_s=1.0,
    )  # fmt: skip
    repo = tmp_path / "repo"
    profile = dataclasses.replace(cpu_profile(), batch_sizes=(1, 4, 8))
    model_dir = publish(
        repo, "vit_small_dcvit", onnx_artifact(tiny_onnx), profile, latency=[stats],
        instance_count=2, max_queue_delay_us=100,
    ).model_dir  # fmt: skip
    assert model_dir == repo / "vit_small_dcvit"
    text = (model_dir / "config.pbtxt").read_text()
    assert text == (GOLDEN / "onnx_batched.config.pbtxt").read_text()

    config = parse(text)
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8  # the profile's largest batch
    assert [i.name for i in config.input] == ["input"]
    assert list(config.input[0].dims) == [3, 8, 8]  # batch dim owned by Triton
    assert list(config.output[0].dims) == [10]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.instance_group[0].count == 2
    assert not config.optimization.cuda.graphs
    assert config.model_warmup[0].batch_size == 8

    shipped = model_dir / "1" / "model.onnx"
    assert sha256_file(shipped) == sha256_file(tiny_onnx)
    deploy = json.loads((model_dir / "deploy.json").read_text())
    assert deploy["sha256"] == sha256_file(tiny_onnx)
    assert deploy["source"]["candidate"] == "c60"
    assert deploy["platform"] == "onnxruntime_onnx"
    assert deploy["latency"][0]["p50"] == 1.0
    assert deploy["inputs"] == [{"name": "input", "data_type": "TYPE_FP32", "shape": [-1, 3, 8, 8]}]
    assert not list(repo.rglob("*.partial"))
    assert validate_config(model_dir).status == "ok"


def test_shipped_onnx_runs_with_the_config_shapes(tiny_onnx: Path, tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    published = publish(tmp_path / "repo", "tiny", onnx_artifact(tiny_onnx), cpu_profile())
    model_dir = published.model_dir
    config = parse((model_dir / "config.pbtxt").read_text())
    session = ort.InferenceSession(
        str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feed = {config.input[0].name: np.zeros((4, *config.input[0].dims), np.float32)}
    (out,) = session.run([config.output[0].name], feed)
    assert out.shape == (4, *config.output[0].dims)


def test_io_is_read_from_the_onnx_file(tmp_path: Path) -> None:
    path = make_onnx(tmp_path / "m.onnx", in_name="pixels", out_name="scores", batch="N")
    io = read_onnx_io(path)
    assert [(t.name, t.data_type, t.shape) for t in io.inputs] == [
        ("pixels", "TYPE_FP32", (-1, 3, 8, 8))
    ]
    assert [t.name for t in io.outputs] == ["scores"]  # the initializer W is not an input


def test_mismatched_names_and_bad_model_names_are_one_line(tiny_onnx: Path, tmp_path: Path) -> None:
    renamed = onnx_artifact(tiny_onnx, input_name="pixels")
    with pytest.raises(UserInputError, match="names input 'pixels'"):
        publish(tmp_path / "repo", "m", renamed, cpu_profile())
    with pytest.raises(UserInputError, match="not a usable file or folder name"):
        publish(tmp_path, "../escape", onnx_artifact(tiny_onnx), cpu_profile())
    with pytest.raises(UserInputError, match="instance_count must be >= 1"):
        publish(tmp_path / "repo", "m", onnx_artifact(tiny_onnx), cpu_profile(), instance_count=0)
    assert not (tmp_path / "repo").exists()


# --------------------------------------------------------------------------- TensorRT


@pytest.mark.parametrize("short", [False, True], ids=["backend-layout", "short-layout"])
def test_tensorrt_config_matches_golden(tmp_path: Path, short: bool) -> None:
    artifact = fake_engine(tmp_path, short=short)
    model_dir = publish(tmp_path / "repo", "vit_small_dcvit", artifact, trt_profile()).model_dir
    text = (model_dir / "config.pbtxt").read_text()
    assert text == (GOLDEN / "trt_h100.config.pbtxt").read_text()
    config = parse(text)
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 16  # the profile's largest batch, covered by the engine
    assert config.optimization.cuda.graphs  # measured with CUDA graphs
    from tritonclient.grpc import model_config_pb2

    # FP16, as the engine metadata says (the ONNX tests show FP32 comes through too)
    assert config.input[0].data_type == model_config_pb2.TYPE_FP16
    assert (model_dir / "1" / "model.plan").read_bytes() == Path(artifact.path).read_bytes()
    deploy = json.loads((model_dir / "1" / "deploy.json").read_text())
    assert deploy["tensorrt_version"] == "10.13.0"
    assert deploy["gpu"] == "NVIDIA H100 80GB HBM3"
    assert deploy["compute_capability"] == "9.0"
    assert deploy["engine_profile_max_batch"] == 16
    assert validate_config(model_dir).ok


@pytest.mark.parametrize("short", [False, True])
def test_engine_profile_must_cover_max_batch_size(tmp_path: Path, short: bool) -> None:
    artifact = fake_engine(tmp_path, max_batch=4, short=short)
    with pytest.raises(UserInputError, match="batches up to 4, but max_batch_size is 8"):
        publish(tmp_path / "repo", "m", artifact, trt_profile(max_batch=8))


def test_engine_errors(tmp_path: Path) -> None:
    artifact = fake_engine(tmp_path)
    on_cpu = dataclasses.replace(trt_profile(), device="cpu")
    with pytest.raises(UserInputError, match="device = 'cpu' cannot run backend 'tensorrt'"):
        publish(tmp_path / "repo", "m", artifact, on_cpu)
    static = fake_engine(tmp_path, batch_dim=8)
    with pytest.raises(UserInputError, match="static batch dimension"):
        publish(tmp_path / "repo", "m", static, trt_profile())
    Path(artifact.path + ".json").unlink()
    with pytest.raises(UserInputError, match=r"engine metadata c60\.plan\.json not found"):
        publish(tmp_path / "repo", "m", artifact, trt_profile())


# --------------------------------------------------------------------------- validation


def test_validate_config_cross_checks_the_model_files(tiny_onnx: Path, tmp_path: Path) -> None:
    model_dir = publish(tmp_path / "repo", "m", onnx_artifact(tiny_onnx), cpu_profile()).model_dir
    good = (model_dir / "config.pbtxt").read_text()
    cfg = model_dir / "config.pbtxt"

    cfg.write_text(
        good.replace('name: "input"', 'name: "pixels"').replace('key: "input"', 'key: "pixels"')
    )
    check = validate_config(model_dir)
    assert check.status == "failed"
    assert any("input names ['pixels']" in m for m in check.messages)

    cfg.write_text(good.replace("dims: 8\n  dims: 8\n}", "dims: 16\n  dims: 16\n}", 1))
    assert any("do not match" in m for m in validate_config(model_dir).messages)

    cfg.write_text(good.replace("TYPE_FP32", "TYPE_FP16"))
    assert any("data_type TYPE_FP16 != TYPE_FP32" in m for m in validate_config(model_dir).messages)

    cfg.write_text(good.replace('name: "m"', 'name: "other"'))
    assert any("!= model directory" in m for m in validate_config(model_dir).messages)

    cfg.write_text(good)
    assert validate_config(model_dir).ok
    (model_dir / "1" / "model.onnx").unlink()
    assert any("1/model.onnx is missing" in m for m in validate_config(model_dir).messages)


def test_validate_config_text_schema_errors() -> None:
    check = validate_config(
        'name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 2\nbogus: 1\n'
    )
    assert check.status == "failed" and "not a valid Triton ModelConfig" in check.messages[0]
    check = validate_config(
        'name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [{ name: "x" data_type: TYPE_FP32 dims: [ 1 ] }]\n'
        'output [{ name: "y" data_type: TYPE_FP32 dims: [ 1 ] }]\n'
        "dynamic_batching { }\n"
    )
    assert check.status == "failed"
    assert check.messages == ("dynamic_batching needs max_batch_size > 0",)


def test_importing_writers_stays_cheap() -> None:
    code = (
        "import sys, dcvit_deploy.selection.decide, dcvit_deploy.triton\n"
        "import dcvit_deploy.reports.writers\n"
        "import dcvit_deploy.triton.model_config, dcvit_deploy.triton.repository\n"
        "import dcvit_deploy.triton.runtime\n"
        "heavy = ('onnx', 'matplotlib', 'tritonclient', 'torch', 'onnxruntime')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
