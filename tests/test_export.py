"""ONNX export of a compressed tiny ViT and its verification on real photos."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from dcvit_deploy.errors import ExportError, UserInputError
from dcvit_deploy.export.fp16 import check_strongly_typed
from dcvit_deploy.export.onnx import (
    DEFAULT_TOLERANCES,
    ExportResult,
    Tolerances,
    compare_outputs,
    export_onnx,
    onnx_io,
    onnx_precision,
    verify_onnx,
)


class FFNOnly(nn.Module):
    """A block with its attention branch removed: ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm2, self.mlp, self.ls2 = block.norm2, block.mlp, block.ls2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls2(self.mlp(self.norm2(x)))


@pytest.fixture(scope="module")
def compressed_vit() -> nn.Module:
    """The tiny ViT of conftest with block 1 FFN-only and block 2 dropped."""
    import timm
    from fakes.runs import TINY_VIT_KWARGS

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT_KWARGS)
    model.blocks[1] = FFNOnly(model.blocks[1])
    model.blocks[2] = nn.Identity()
    return model.eval()


@pytest.fixture(scope="module")
def photos(photo_dir: Path) -> torch.Tensor:
    """Six real photos, resized to 32x32 and normalised like ImageNet."""
    from PIL import Image

    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    arrays = []
    for path in sorted(photo_dir.rglob("*.png")):
        img = Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR)
        arrays.append(((np.asarray(img, dtype=np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
    assert len(arrays) == 6
    return torch.from_numpy(np.stack(arrays))


@pytest.fixture(scope="module")
def exported(
    compressed_vit: nn.Module, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ExportResult]]:
    out = tmp_path_factory.mktemp("onnx")
    yield {
        prec: export_onnx(
            compressed_vit, out / f"vit_{prec}.onnx", input_shape=(3, 32, 32), precision=prec
        )
        for prec in ("fp32", "fp16")
    }


def ort_run(path: str, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_fp32_export_matches_pytorch_on_photos(
    exported: dict[str, ExportResult], compressed_vit: nn.Module, photos: torch.Tensor
) -> None:
    result = exported["fp32"]
    assert result.exporter == "torchscript" and result.opset == 17  # "auto" traces first
    assert (result.input_name, result.output_name) == ("input", "logits")
    assert result.simplified and result.precision == "fp32"
    assert Path(result.path).is_file() and not Path(result.path + ".partial").exists()
    v = verify_onnx(compressed_vit, result.path, photos)
    assert v.passed, v.reason
    assert v.samples == 6 and v.finite
    assert v.max_abs < 1e-4 and v.cosine > 0.99999 and v.top1_agreement == 1.0


def test_dynamic_batch_runs_at_1_and_3(
    exported: dict[str, ExportResult], compressed_vit: nn.Module, photos: torch.Tensor
) -> None:
    io = onnx_io(exported["fp32"].path)
    assert io["input_shape"] == ["batch", 3, 32, 32]
    assert io["outputs"][0]["shape"] == ["batch", 10]
    for n in (1, 3):
        x = photos[:n]
        with torch.inference_mode():
            ref = compressed_vit(x).numpy()
        out = ort_run(exported["fp32"].path, x.numpy())
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_graph_keeps_the_surgery(exported: dict[str, ExportResult]) -> None:
    """Two attention blocks remain (one Softmax each); four FFNs, so four fc1 MatMul+Erf."""
    graph = onnx.load(exported["fp32"].path).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Softmax") == 2
    assert ops.count("Erf") == 3  # blocks 0, 1 (FFN-only) and 3; block 2 is Identity


def test_fp16_variant_keeps_norms_and_softmax_in_fp32(
    exported: dict[str, ExportResult], compressed_vit: nn.Module, photos: torch.Tensor
) -> None:
    result = exported["fp16"]
    assert result.fp32_ops == ("LayerNormalization", "Softmax")
    assert onnx_precision(result.path) == "fp16" and onnx_precision(exported["fp32"].path) == "fp32"
    model = onnx.shape_inference.infer_shapes(onnx.load(result.path))
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    kept = [n for n in g.node if n.op_type in ("LayerNormalization", "Softmax")]
    # 2 Softmax; LayerNorms: norm1+norm2 of the 2 attention blocks, the FFN block's, the final.
    assert len(kept) == 2 + 4 + 1 + 1
    for node in kept:
        assert all(types[i] == fp32 for i in node.input if i), node.name
        assert all(types[o] == fp32 for o in node.output if o), node.name
    matmul_weights = [n.input[1] for n in g.node if n.op_type in ("MatMul", "Gemm")]
    assert any(types[w] == fp16 for w in matmul_weights if w in types)
    # keep_io_types: float32 at the boundary, FP16 inside.
    assert types["input"] == fp32 and types["logits"] == fp32
    # What TensorRT's strongly typed parser needs: one type per edge, every change a Cast.
    check = check_strongly_typed(onnx.load(result.path))
    assert check.ok, check.problems
    assert check.casts >= len(kept)
    v = verify_onnx(compressed_vit, result.path, photos)
    assert v.passed, v.reason
    assert 0 < v.max_abs < 0.05 and v.cosine > 0.999


def test_fp16_without_io_casts_through_dynamo_when_tracing_fails(
    compressed_vit: nn.Module, photos: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dcvit_deploy.export.onnx as onnx_export

    def no_tracing(*_args: object) -> None:
        raise RuntimeError("tracing is gone")

    monkeypatch.setattr(onnx_export, "_by_tracing", no_tracing)
    r = export_onnx(
        compressed_vit,
        tmp_path / "io16.onnx",
        input_shape=(3, 32, 32),
        precision="fp16",
        keep_io_types=False,
    )
    assert r.exporter == "dynamo" and r.opset == 17  # down-converted from the dynamo's 18
    assert any("torchscript exporter failed" in w and "tracing is gone" in w for w in r.warnings)
    io = onnx_io(r.path)
    assert io["inputs"][0]["dtype"] == "float16" and io["outputs"][0]["dtype"] == "float16"
    out = ort_run(r.path, photos.numpy().astype(np.float16))
    assert out.dtype == np.float16 and np.isfinite(out).all()


def test_verification_flags_mismatch(
    exported: dict[str, ExportResult], compressed_vit: nn.Module, photos: torch.Tensor
) -> None:
    other = copy.deepcopy(compressed_vit)
    with torch.no_grad():
        other.head.bias += 1.0
        other.head.weight.mul_(-1.0)
    v = verify_onnx(other, exported["fp32"].path, photos)
    assert not v.passed
    assert "max abs error" in v.reason and "cosine" in v.reason


def test_compare_outputs_flags_nan_and_shape() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=np.float32)
    tol = DEFAULT_TOLERANCES["fp32"]
    assert compare_outputs(ref, ref.copy(), tolerances=tol).passed
    bad = ref.copy()
    bad[1, 1] = np.nan
    v = compare_outputs(ref, bad, tolerances=tol)
    assert not v.passed and not v.finite and "NaN/Inf" in v.reason
    v = compare_outputs(ref, ref[:, :2], tolerances=tol)
    assert not v.passed and "shape" in v.reason
    flipped = ref[:, ::-1].copy()
    v = compare_outputs(ref, flipped, tolerances=Tolerances(1.0, 10.0, 0.0, 1.0))
    assert v.top1_agreement == 0.0 and "top-1 agreement" in v.reason


def test_export_failure_is_one_line_with_fix(tmp_path: Path) -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom inside forward")

    target = tmp_path / "broken.onnx"
    with pytest.raises(ExportError) as err:
        export_onnx(Broken(), target, input_shape=(3, 8, 8), exporter="torchscript")
    assert "boom inside forward" in str(err.value) and "fix:" in str(err.value)
    assert "\n" not in str(err.value)
    assert not target.exists() and not list(tmp_path.glob("*.partial"))


def test_export_refuses_bad_arguments(compressed_vit: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(UserInputError):
        export_onnx(compressed_vit, tmp_path / "x.onnx", input_shape=(32, 32))  # type: ignore[arg-type]
    with pytest.raises(UserInputError):
        export_onnx(compressed_vit, tmp_path / "x.onnx", precision="int8")  # type: ignore[arg-type]
    half = copy.deepcopy(compressed_vit).half()
    with pytest.raises(ExportError) as err:
        export_onnx(half, tmp_path / "x.onnx", input_shape=(3, 32, 32))
    assert "model.float()" in str(err.value)


def test_export_restores_model_state(compressed_vit: nn.Module, tmp_path: Path) -> None:
    """Exporting switches attention to the explicit path and eval mode only temporarily."""
    flags = [m.fused_attn for m in compressed_vit.modules() if hasattr(m, "fused_attn")]
    assert flags and not compressed_vit.training
    model = copy.deepcopy(compressed_vit).train()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    export_onnx(model, tmp_path / "again.onnx", input_shape=(3, 32, 32), exporter="torchscript")
    assert model.training
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
