"""Triton model repository writer: configs from the artifact's own I/O, golden text, schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fakes.triton_inputs import GOLDEN, fake_engine, make_onnx, onnx_artifact, parse

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.store.atomic import sha256_file
from dcvit_deploy.triton import (
    read_onnx_io,
    validate_config,
    write_model_repository,
)


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    return make_onnx(src / "c60.onnx")


# --------------------------------------------------------------------------- ONNX


def test_onnx_repository_matches_golden_and_triton_schema(tiny_onnx: Path, tmp_path: Path) -> None:
    from dcvit_deploy.store.records import LatencyStats

    stats = LatencyStats(
        batch_size=8, iterations=50, mean=1.0, std=0.1, cov=0.1, min=0.9, max=1.4, p50=1.0,
        p90=1.1, p95=1.2, p99=1.3, throughput=8000.0, scope="host", timer="perf_counter",
        windows=3, window_medians=(1.0, 1.0, 1.0), stable=True, warmup_iters=10, duration_s=1.0,
    )  # fmt: skip
    repo = tmp_path / "repo"
    model_dir = write_model_repository(
        repo,
        "vit_small_dcvit",
        onnx_artifact(tiny_onnx),
        max_batch_size=8,
        instance_count=2,
        preferred_batch_sizes=(1, 4, 8),
        max_queue_delay_us=100,
        latency=[stats],
    )
    assert model_dir == repo / "vit_small_dcvit"
    text = (model_dir / "config.pbtxt").read_text()
    assert text == (GOLDEN / "onnx_batched.config.pbtxt").read_text()

    config = parse(text)
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert [i.name for i in config.input] == ["input"]
    assert list(config.input[0].dims) == [3, 8, 8]  # batch dim owned by Triton
    assert list(config.output[0].dims) == [10]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
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


def test_max_batch_size_zero_is_written_explicitly(tiny_onnx: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(
        tmp_path / "repo", "tiny", onnx_artifact(tiny_onnx), max_batch_size=0, kind="KIND_CPU"
    )
    text = (model_dir / "config.pbtxt").read_text()
    assert text == (GOLDEN / "onnx_unbatched.config.pbtxt").read_text()
    assert "max_batch_size: 0\n" in text
    config = parse(text)
    assert list(config.input[0].dims) == [-1, 3, 8, 8]  # full shape without Triton batching
    assert not config.HasField("dynamic_batching")
    assert validate_config(model_dir / "config.pbtxt").ok


def test_shipped_onnx_runs_with_the_config_shapes(tiny_onnx: Path, tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    model_dir = write_model_repository(
        tmp_path / "repo", "tiny", onnx_artifact(tiny_onnx), max_batch_size=4
    )
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


def test_static_batch_with_batching_is_a_clear_error(tmp_path: Path) -> None:
    path = make_onnx(tmp_path / "static.onnx", batch=1)
    with pytest.raises(UserInputError, match="static batch dimension") as info:
        write_model_repository(tmp_path / "repo", "m", onnx_artifact(path), max_batch_size=8)
    assert "\n" not in str(info.value) and "fix: re-export with a dynamic batch axis" in str(
        info.value
    )
    assert not (tmp_path / "repo").exists()  # nothing half-written
    model_dir = write_model_repository(
        tmp_path / "repo", "m", onnx_artifact(path), max_batch_size=0
    )
    assert list(parse((model_dir / "config.pbtxt").read_text()).input[0].dims) == [1, 3, 8, 8]


def test_mismatched_names_are_rejected(tiny_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="names input 'pixels'"):
        write_model_repository(
            tmp_path / "repo", "m", onnx_artifact(tiny_onnx, input_name="pixels"), max_batch_size=1
        )


def test_changed_artifact_is_rejected(tiny_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="changed since candidate c60"):
        write_model_repository(
            tmp_path / "repo", "m", onnx_artifact(tiny_onnx, sha256="0" * 64), max_batch_size=1
        )
    assert not (tmp_path / "repo" / "m" / "1" / "model.onnx").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_batch_size": 0, "dynamic_batching": True}, "dynamic batching needs"),
        ({"max_batch_size": 4, "preferred_batch_sizes": (8,)}, "exceed max_batch_size 4"),
        ({"max_batch_size": 4, "cuda_graphs": True}, "TensorRT plans only"),
        ({"max_batch_size": 4, "warmup_batch_sizes": (16,)}, "outside 1..4"),
        ({"max_batch_size": 4, "kind": "KIND_TPU"}, "unknown"),
    ],
)
def test_bad_settings_are_user_errors(
    tiny_onnx: Path, tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(UserInputError, match=match):
        write_model_repository(tmp_path / "repo", "m", onnx_artifact(tiny_onnx), **kwargs)


def test_bad_model_name_and_backend(tiny_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="not a valid directory name"):
        write_model_repository(tmp_path, "../escape", onnx_artifact(tiny_onnx))
    with pytest.raises(UserInputError, match="backend 'torch' artifacts") as info:
        write_model_repository(tmp_path, "m", onnx_artifact(tiny_onnx, backend="torch"))
    assert "fix: publish from an onnxruntime or tensorrt profile" in str(info.value)


# --------------------------------------------------------------------------- TensorRT


@pytest.mark.parametrize("short", [False, True], ids=["backend-layout", "short-layout"])
def test_tensorrt_per_gpu_config_matches_golden(tmp_path: Path, short: bool) -> None:
    artifact = fake_engine(tmp_path, short=short)
    model_dir = write_model_repository(
        tmp_path / "repo", "vit_small_dcvit", artifact, preferred_batch_sizes=(1, 8, 16),
        config_name="h100",
    )  # fmt: skip
    text = (model_dir / "configs" / "h100.pbtxt").read_text()
    assert text == (GOLDEN / "trt_h100.config.pbtxt").read_text()
    config = parse(text)
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 16  # the engine profile's max, by default
    assert config.optimization.cuda.graphs
    assert config.default_model_filename == "model_h100.plan"
    from tritonclient.grpc import model_config_pb2

    # FP16, as the engine metadata says (the ONNX tests show FP32 comes through too)
    assert config.input[0].data_type == model_config_pb2.TYPE_FP16
    assert (model_dir / "1" / "model_h100.plan").read_bytes() == Path(artifact.path).read_bytes()
    deploy = json.loads((model_dir / "configs" / "h100.deploy.json").read_text())
    assert deploy["tensorrt_version"] == "10.13.0"
    assert deploy["gpu"] == "NVIDIA H100 80GB HBM3"
    assert deploy["compute_capability"] == "9.0"
    assert deploy["engine_profile_max_batch"] == 16
    assert validate_config(model_dir / "configs" / "h100.pbtxt").ok


@pytest.mark.parametrize("short", [False, True])
def test_engine_profile_must_cover_max_batch_size(tmp_path: Path, short: bool) -> None:
    artifact = fake_engine(tmp_path, max_batch=4, short=short)
    with pytest.raises(UserInputError, match="batches up to 4, but max_batch_size is 8"):
        write_model_repository(tmp_path / "repo", "m", artifact, max_batch_size=8)


def test_engine_errors(tmp_path: Path) -> None:
    artifact = fake_engine(tmp_path)
    with pytest.raises(UserInputError, match="KIND_CPU"):
        write_model_repository(tmp_path / "repo", "m", artifact, kind="KIND_CPU")
    static = fake_engine(tmp_path, batch_dim=8)
    with pytest.raises(UserInputError, match="static batch dimension"):
        write_model_repository(tmp_path / "repo", "m", static, max_batch_size=8)
    Path(artifact.path + ".json").unlink()
    with pytest.raises(UserInputError, match=r"engine metadata c60\.plan\.json not found"):
        write_model_repository(tmp_path / "repo", "m", artifact)


# --------------------------------------------------------------------------- validation


def test_validate_config_cross_checks_the_model_files(tiny_onnx: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(
        tmp_path / "repo", "m", onnx_artifact(tiny_onnx), max_batch_size=4
    )
    good = (model_dir / "config.pbtxt").read_text()
    cfg = model_dir / "config.pbtxt"

    cfg.write_text(
        good.replace('name: "input"', 'name: "pixels"').replace('key: "input"', 'key: "pixels"')
    )
    check = validate_config(model_dir)
    assert check.status == "failed"
    assert any("input names ['pixels']" in m for m in check.messages)

    cfg.write_text(good.replace("dims: [ 3, 8, 8 ]", "dims: [ 3, 16, 16 ]"))
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


def test_validate_config_is_skipped_without_tritonclient(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = write_model_repository(
        tmp_path / "repo", "m", onnx_artifact(tiny_onnx), max_batch_size=4
    )
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    monkeypatch.setitem(sys.modules, "tritonclient.grpc.model_config_pb2", None)
    check = validate_config(model_dir)
    assert check.status == "skipped" and not check.ok
    assert check.messages[0].startswith("skipped: tritonclient not installed")


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
