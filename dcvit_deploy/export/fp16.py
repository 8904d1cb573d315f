"""FP16 ONNX graphs for strongly typed TensorRT builds, and the check that they are clean.

:func:`convert_to_fp16` makes every float32 tensor float16 except around ``fp32_ops``
(LayerNormalization and Softmax: they overflow or lose accuracy in FP16 ViTs), with one explicit
Cast per tensor and type at each boundary. :func:`check_strongly_typed` stands in for TensorRT's
strongly typed parser: it reports inputs bound to one schema type variable with different
types, fixed-type inputs of another type, declared types (``value_info``, outputs) other than
what the producer makes, and strict type inference failures -- so types change only in Casts.

A converter of our own because ``onnxconverter-common`` 1.16 (LayerNorm and Softmax blocked),
measured against it, fails the check on TorchScript-exported graphs with shared LayerNorm
weights (49 problems; ONNX Runtime refuses the graph) and turns a float32 output into float16
when the last op is blocked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dcvit_deploy.errors import ExportError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import onnx

DEFAULT_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "Softmax")
"""Ops the FP16 variant keeps in FP32: the ones known to overflow or lose accuracy in FP16 ViTs
(norm statistics, attention logits). opset >= 17 exports LayerNorm as one op, so this list
covers it; add ``ReduceMean``/``Pow``/``Sqrt`` for graphs with decomposed norms."""

# Inputs that the ONNX spec fixes to float32 whatever the data type (roi/scales of Resize).
_FP32_ONLY_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}),
    "Upsample": frozenset({1}),
}
_CAST_OPS = frozenset({"Cast", "CastLike"})


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}"[:300] if lines else type(exc).__name__


# --------------------------------------------------------------------------- conversion


def convert_to_fp16(
    model: onnx.ModelProto,
    *,
    fp32_ops: Sequence[str] = DEFAULT_FP32_OPS,
    keep_io_types: bool = True,
    notes: list[str] | None = None,
) -> onnx.ModelProto:
    """FP16 copy of a float32 graph, ``fp32_ops`` kept in FP32 behind Casts, I/O float32 with
    ``keep_io_types``; values beyond FP16 clipped to +/-65504 (counted in ``notes``). The result
    passes the I/O type promise, :func:`check_strongly_typed`, strict inference and the ONNX
    checker, else :class:`ExportError`."""
    import onnx

    out = _convert_graph(model, fp32_ops=fp32_ops, keep_io_types=keep_io_types, notes=notes)
    _check_io_types(model, out, keep_io_types)
    require_strongly_typed(out)  # before anything else reads the (maybe stale) annotations
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
        onnx.checker.check_model(out)
    except Exception as exc:
        raise ExportError(
            f"the FP16 variant of the graph is invalid: {_first_line(exc)}",
            "export with precision='fp32' or add the failing op to fp32_ops",
        ) from exc
    return out


def _convert_graph(
    model: onnx.ModelProto,
    *,
    fp32_ops: Sequence[str] = DEFAULT_FP32_OPS,
    keep_io_types: bool = True,
    notes: list[str] | None = None,
) -> onnx.ModelProto:
    """The conversion itself (see :func:`convert_to_fp16`): every float32 tensor becomes float16
    except the inputs and outputs of ``fp32_ops`` nodes, with Casts at each boundary (shared per
    tensor).

    Initializers are converted in place of a Cast (one copy per precision actually used);
    ``Cast(to=float)``, ``Constant`` and ``ConstantOfShape`` values inside FP16 regions are
    retyped. Float32 values beyond the FP16 range are clipped to +/-65504 (noted). Graphs with
    control-flow subgraphs are refused.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    notes = notes if notes is not None else []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for node in g.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise ExportError(
                f"cannot make an FP16 variant of a graph with control flow ({node.op_type})",
                "export with precision='fp32'",
            )
    del g.value_info[:]  # stale after retyping; re-inferred below
    inferred = onnx.shape_inference.infer_shapes(out)
    types: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for name, t in inits.items():
        types[name] = t.data_type
    keep = frozenset(fp32_ops)
    clipped = 0

    def to_half(t: onnx.TensorProto, name: str) -> onnx.TensorProto:
        nonlocal clipped
        arr = numpy_helper.to_array(t)
        finite = np.isfinite(arr)
        big = finite & (np.abs(arr) > 65504.0)
        clipped += int(big.sum())
        half = np.where(big, np.sign(arr) * 65504.0, arr).astype(np.float16)
        return numpy_helper.from_array(half, name)

    native: dict[str, int] = {}  # float tensor -> its element type after conversion
    for inp in g.input:
        if types.get(inp.name) == FLOAT:
            native[inp.name] = FLOAT if keep_io_types else HALF
            if not keep_io_types:
                inp.type.tensor_type.elem_type = HALF
    for name, t in inits.items():
        if t.data_type == FLOAT:
            native[name] = FLOAT

    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    casts: dict[tuple[str, int], str] = {}

    def want(name: str, dtype: int) -> str:
        if native.get(name, dtype) == dtype:
            return name
        key = (name, dtype)
        if key not in casts:
            suffix = "fp16" if dtype == HALF else "fp32"
            new_name = f"{name}__{suffix}"
            if name in inits:
                new_inits.append(to_half(inits[name], new_name))
            else:
                new_nodes.append(
                    onnx.helper.make_node(
                        "Cast", [name], [new_name], to=dtype, name=f"cast_{new_name}"
                    )
                )
            casts[key] = new_name
        return casts[key]

    for node in g.node:
        target = FLOAT if node.op_type in keep else HALF
        fixed32 = _FP32_ONLY_INPUTS.get(node.op_type, frozenset())
        for i, name in enumerate(node.input):
            if name and types.get(name) == FLOAT:
                node.input[i] = want(name, FLOAT if i in fixed32 else target)
        if target == HALF:
            for attr in node.attribute:
                if (
                    attr.name in ("to", "dtype")
                    and attr.type == onnx.AttributeProto.INT
                    and attr.i == FLOAT
                ):
                    attr.i = HALF
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(to_half(attr.t, attr.t.name))
        new_nodes.append(node)
        for o in node.output:
            if types.get(o) == FLOAT:
                native[o] = target

    # Graph outputs: float32 outside with keep_io_types, float16 without; one final Cast per
    # output whose producer computes in the other type (an FP16 op, or a kept FP32 op).
    wanted = FLOAT if keep_io_types else HALF
    for output in g.output:
        made = native.get(output.name)
        if types.get(output.name) != FLOAT or made is None:
            continue
        output.type.tensor_type.elem_type = wanted
        if made == wanted:
            continue
        inner = f"{output.name}__{'fp16' if made == HALF else 'fp32'}"
        for node in new_nodes:
            for i, name in enumerate(node.input):
                if name == output.name:
                    node.input[i] = inner
            for i, name in enumerate(node.output):
                if name == output.name:
                    node.output[i] = inner
        new_nodes.append(
            onnx.helper.make_node(
                "Cast", [inner], [output.name], to=wanted, name=f"cast_{output.name}"
            )
        )

    del g.node[:]
    g.node.extend(new_nodes)
    used = {name for node in g.node for name in node.input}
    kept_inits = [t for t in g.initializer if t.name in used] + [
        t for t in new_inits if t.name in used
    ]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    if clipped:
        notes.append(f"fp16 conversion clipped {clipped} value(s) beyond +/-65504")
    return out


def _check_io_types(source: onnx.ModelProto, out: onnx.ModelProto, keep_io_types: bool) -> None:
    """The converted graph's inputs and outputs must have the types the contract promises."""
    from onnx import TensorProto

    def expected(elem_type: int) -> int:
        if elem_type == TensorProto.FLOAT and not keep_io_types:
            return TensorProto.FLOAT16
        return elem_type

    before = {
        v.name: v.type.tensor_type.elem_type for v in [*source.graph.input, *source.graph.output]
    }
    inits = {t.name for t in source.graph.initializer}
    for value in [*out.graph.input, *out.graph.output]:
        if value.name in inits or value.name not in before:
            continue
        want, got = expected(before[value.name]), value.type.tensor_type.elem_type
        if got != want:
            raise ExportError(
                f"the FP16 graph's I/O tensor {value.name!r} is {_type_name(got)}, expected "
                f"{_type_name(want)} (keep_io_types={keep_io_types})",
                "report this with the model; export with precision='fp32' meanwhile",
            )


# --------------------------------------------------------------------------- strong typing


@dataclass(frozen=True)
class TypeCheck:
    """Result of :func:`check_strongly_typed`: problems (empty when clean) and Cast count."""

    problems: tuple[str, ...]
    casts: int
    nodes: int

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"strongly typed: {self.nodes} nodes, {self.casts} explicit casts"
        more = f" (+{len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        return "; ".join(self.problems[:3]) + more


def _type_name(elem_type: int) -> str:
    import onnx

    try:
        return str(onnx.TensorProto.DataType.Name(elem_type)).lower()
    except ValueError:
        return f"type {elem_type}"


def check_strongly_typed(model: onnx.ModelProto) -> TypeCheck:
    """Check that every edge of ``model`` has one element type, as TensorRT's strongly typed
    mode requires (see the module docstring). Pure; does not modify ``model``."""
    import onnx

    problems: list[str] = []
    opset = next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    for out in bare.graph.output:  # outputs too: infer what their producers make
        out.type.tensor_type.elem_type = 0
    try:
        inferred = onnx.shape_inference.infer_shapes(bare)
    except Exception as exc:  # pragma: no cover - non-strict inference rarely raises
        return TypeCheck((f"type inference failed: {_first_line(exc)}",), 0, len(model.graph.node))
    g = inferred.graph
    made: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.tensor_type.elem_type:
            made[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        made[init.name] = init.data_type
    producer = {o: n for n in model.graph.node for o in n.output if o}

    # Declared types must be what the producer makes.
    for vi in [*model.graph.value_info, *model.graph.output]:
        declared = vi.type.tensor_type.elem_type
        actual = made.get(vi.name)
        if declared and actual and declared != actual:
            node = producer.get(vi.name)
            by = f"node {node.name or node.op_type!r} ({node.op_type})" if node else "its producer"
            problems.append(
                f"tensor {vi.name!r} is declared {_type_name(declared)} but {by} makes "
                f"{_type_name(actual)}"
            )

    # Inputs sharing a type variable must agree; fixed-type inputs must match.
    for node in model.graph.node:
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        except Exception:
            continue  # custom domain: nothing to check against
        variables = {c.type_param_str for c in schema.type_constraints}
        formal = list(schema.inputs)
        bound: dict[str, list[tuple[str, int]]] = {}
        for i, name in enumerate(node.input):
            if not name or name not in made or not formal:
                continue
            param = formal[min(i, len(formal) - 1)]
            if i >= len(formal) and param.option != param.option.Variadic:
                continue
            bound.setdefault(param.type_str, []).append((name, made[name]))
        label = f"node {node.name or node.op_type!r} ({node.op_type})"
        for type_str, seen in bound.items():
            kinds = {t for _, t in seen}
            if type_str in variables:
                if len(kinds) > 1:
                    listed = ", ".join(f"{n} {_type_name(t)}" for n, t in seen)
                    problems.append(f"{label}: inputs of type {type_str} disagree ({listed})")
            elif type_str.startswith("tensor(") and len(kinds) >= 1:
                want = type_str[len("tensor(") : -1]
                for n, t in seen:
                    if _type_name(t) != want:
                        problems.append(
                            f"{label}: input {n} is {_type_name(t)} but the op takes {want}"
                        )
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        problems.append(f"strict type inference fails: {_first_line(exc)}")
    casts = sum(n.op_type in _CAST_OPS for n in model.graph.node)
    return TypeCheck(tuple(dict.fromkeys(problems)), casts, len(model.graph.node))


def require_strongly_typed(model: onnx.ModelProto) -> TypeCheck:
    """:func:`check_strongly_typed`, raising :class:`ExportError` when it finds a problem."""
    result = check_strongly_typed(model)
    if not result.ok:
        raise ExportError(
            f"the FP16 graph is not strongly typed (TensorRT would reject it): {result.summary()}",
            "export with precision='fp32' or add the offending op to fp32_ops",
        )
    return result
