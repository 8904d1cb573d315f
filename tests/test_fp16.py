"""FP16 graphs: FP32 islands behind explicit casts, and the strongly-typed check.

Small hand-made graphs (no torch export) keep these fast; the exported ViT is covered in
test_export.py, which verifies the FP16 file against PyTorch on real photos.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from dcvit_deploy.export.fp16 import check_strongly_typed, convert_to_fp16
from onnx import TensorProto, helper, numpy_helper

from dcvit_deploy.errors import ExportError

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def block_graph(weight_scale: float = 1.0) -> onnx.ModelProto:
    """input -> MatMul(w) -> LayerNormalization -> Softmax -> logits: one ViT-like block."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 8)) * weight_scale).astype(np.float32)
    w[0, 0] = 1e-9  # below the smallest FP16 subnormal
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["h"], name="fc"),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], name="norm"),
        helper.make_node("Softmax", ["n"], ["logits"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("input", FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", FLOAT, ["batch", 8])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def types_of(model: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_fp16_keeps_norm_and_softmax_in_fp32_behind_explicit_casts() -> None:
    source = block_graph()
    notes: list[str] = []
    out = convert_to_fp16(source, notes=notes)
    assert source.graph.initializer[0].data_type == FLOAT  # the input model is untouched
    types = types_of(out)
    by_name = {n.name: n for n in out.graph.node}
    assert types[by_name["fc"].input[1]] == HALF  # weights in FP16
    for kept in ("norm", "softmax"):
        node = by_name[kept]
        assert all(types[i] == FLOAT for i in node.input if i), kept
    assert types["input"] == FLOAT and types["logits"] == FLOAT  # keep_io_types
    check = check_strongly_typed(out)
    assert check.ok, check.problems
    assert check.casts >= 2 and "explicit casts" in check.summary()
    assert not notes  # nothing clipped
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, x), run(source, x), atol=2e-3)


def test_fp16_clips_values_beyond_the_fp16_range_and_says_so() -> None:
    notes: list[str] = []
    out = convert_to_fp16(block_graph(weight_scale=1e5), notes=notes)
    assert any("clipped" in n and "65504" in n for n in notes)
    w = next(t for t in out.graph.initializer if t.data_type == HALF and t.dims == [8, 8])
    assert np.isfinite(numpy_helper.to_array(w)).all()


def test_fp16_without_io_casts_has_fp16_boundaries() -> None:
    out = convert_to_fp16(block_graph(), keep_io_types=False)
    types = types_of(out)
    assert types["input"] == HALF and types["logits"] == HALF
    assert check_strongly_typed(out).ok


def test_check_flags_mixed_type_edges() -> None:
    """An FP16 activation meeting an FP32 weight in one MatMul: TensorRT 11 rejects it."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mixed")],
        "mixed",
        [helper.make_tensor_value_info("x", HALF, [2, 4])],
        [helper.make_tensor_value_info("y", HALF, [2, 4])],
        initializer=[numpy_helper.from_array(np.ones((4, 4), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    check = check_strongly_typed(model)
    assert not check.ok
    assert any("'mixed'" in p and "x float16" in p and "w float" in p for p in check.problems)


def test_check_flags_stale_declared_types_and_accepts_explicit_casts() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=HALF, name="to_half"),
        helper.make_node("Relu", ["x16"], ["r"], name="relu"),
        helper.make_node("Cast", ["r"], ["y"], to=FLOAT, name="to_float"),
    ]
    graph = helper.make_graph(
        nodes,
        "casts",
        [helper.make_tensor_value_info("x", FLOAT, [2])],
        [helper.make_tensor_value_info("y", FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    clean = check_strongly_typed(model)
    assert clean.ok and clean.casts == 2
    # A leftover annotation that says the Relu output is float32 while Relu makes float16.
    model.graph.value_info.append(helper.make_tensor_value_info("r", FLOAT, [2]))
    stale = check_strongly_typed(model)
    assert not stale.ok
    assert any("'r' is declared float but node 'relu'" in p for p in stale.problems)


def test_weights_shared_through_identity_stay_strongly_typed() -> None:
    """TorchScript exports share weights through Identity nodes; here one bias feeds a kept
    LayerNorm (FP32) and, through an Identity, an FP16 Add. onnxconverter-common 1.16 leaves
    such a bias float32 on the FP16 side (a mixed Add that ONNX Runtime refuses to load)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Identity", ["bias"], ["bias_shared"], name="share"),
        helper.make_node("MatMul", ["input", "w"], ["h"], name="fc"),
        helper.make_node("Add", ["h", "bias_shared"], ["a"], name="add_bias"),
        helper.make_node("LayerNormalization", ["a", "gamma", "bias"], ["logits"], name="norm"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("input", FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", FLOAT, ["batch", 8])],
        initializer=inits,
    )
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    out = convert_to_fp16(source)
    assert check_strongly_typed(out).ok
    types = types_of(out)
    add = next(n for n in out.graph.node if n.name == "add_bias")
    assert {types[i] for i in add.input} == {HALF}
    x = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, x), run(source, x), atol=2e-2)


def test_converter_output_that_is_not_strongly_typed_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dcvit_deploy.export.fp16 as fp16

    def sloppy(model: onnx.ModelProto, **_: object) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.value_info.append(helper.make_tensor_value_info("h", HALF, ["batch", 8]))
        return out  # unconverted, with a stale annotation

    monkeypatch.setattr(fp16, "_convert_graph", sloppy)
    with pytest.raises(ExportError) as err:
        convert_to_fp16(block_graph())
    assert "not strongly typed" in str(err.value) and "'h'" in str(err.value)
