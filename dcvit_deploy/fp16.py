"""FP16 ONNX graphs for strongly typed TensorRT builds, and the check that they are clean.

:func:`convert_to_fp16` makes the FP16 variant of an exported float32 graph with a maintained
converter, ``onnxconverter-common``'s ``float16.convert_float_to_float16``: every float tensor
becomes float16 except around the ops in ``fp32_ops`` (LayerNormalization and Softmax by
default: norm statistics and attention logits overflow or lose accuracy in FP16 ViTs) and the
converter's own block list, with explicit Casts at each boundary. It replaced ~150 hand-written
lines after both were compared on this project's exported ViTs: same verification numbers on
real photos, both strongly-typed-clean, the library one Cast more (it does not share the input's
Cast between consumers).

:func:`check_strongly_typed` is the ONNX-level stand-in for TensorRT's strongly typed parser,
which is not available here: TensorRT 11 (and TensorRT 10 with ``STRONGLY_TYPED``) takes every
tensor's type from the graph and rejects an edge whose producer and consumer disagree. It
reports, per node and tensor:

* inputs bound to one type variable of the op's schema (``T`` of MatMul, Add, LayerNormalization,
  ...) that carry different element types, and inputs of a fixed type that carry another;
* declared types (``value_info``, graph outputs) that differ from the type the producing node
  makes -- the stale annotation a consumer would read;
* graphs whose type inference fails in strict mode.

So type changes can only happen in explicit ``Cast``/``CastLike`` nodes, which it counts. Every
FP16 graph :func:`convert_to_fp16` returns has passed it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ExportError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import onnx

DEFAULT_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "Softmax")
"""Ops the FP16 variant keeps in FP32: the ones known to overflow or lose accuracy in FP16 ViTs
(norm statistics, attention logits). opset >= 17 exports LayerNorm as one op, so this list
covers it; add ``ReduceMean``/``Pow``/``Sqrt`` for graphs with decomposed norms."""

FP16_MAX = 65504.0
"""The largest finite float16; float32 weights beyond it are clipped to it."""
FP16_MIN_SUBNORMAL = 2.0**-24
"""The smallest positive float16; smaller non-zero weights are raised to it (not flushed)."""
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
    """FP16 copy of a float32 graph, ``fp32_ops`` kept in FP32 behind explicit Casts.

    Made by ``onnxconverter_common.float16.convert_float_to_float16`` with ``fp32_ops`` added to
    its default block list (ops it never converts, e.g. Resize, TopK, Range) and the FP16 range
    as its clipping bounds; ``keep_io_types`` keeps the graph's inputs and outputs float32. The
    result must pass the ONNX checker, strict type inference and :func:`check_strongly_typed`,
    else :class:`ExportError`. Float32 weights beyond +/-65504 are clipped and non-zero ones
    below the smallest FP16 subnormal raised to it (both counted in ``notes``). ``model`` is
    not modified.
    """
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ExportError(
            f"the FP16 converter is not installed: {_first_line(exc)}",
            "pip install onnxconverter-common (a dependency of dcvit-deploy)",
        ) from exc
    notes = notes if notes is not None else []
    source = onnx.ModelProto()
    source.CopyFrom(model)
    clipped, tiny = _outside_fp16(source)
    block = list(dict.fromkeys([*float16.DEFAULT_OP_BLOCK_LIST, *fp32_ops]))
    try:
        # The converter warns per tensor it clips; those are counted in the notes instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = float16.convert_float_to_float16(
                source,
                keep_io_types=keep_io_types,
                op_block_list=block,
                min_positive_val=FP16_MIN_SUBNORMAL,
                max_finite_val=FP16_MAX,
            )
    except Exception as exc:
        raise ExportError(
            f"the FP16 converter failed on this graph: {_first_line(exc)}",
            "export with precision='fp32' or add the failing op to fp32_ops",
        ) from exc
    if clipped:
        notes.append(f"fp16 conversion clipped {clipped} value(s) beyond +/-{FP16_MAX:g}")
    if tiny > 0:
        notes.append(f"fp16 conversion raised {tiny} tiny value(s) to +/-{FP16_MIN_SUBNORMAL:.3g}")
    if keep_io_types:
        _restore_float_outputs(source, out, notes)
    _check_io_types(source, out, keep_io_types)
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


def _restore_float_outputs(source: onnx.ModelProto, out: onnx.ModelProto, notes: list[str]) -> None:
    """Give back float32 graph outputs the converter turned into float16.

    onnxconverter-common 1.16 does that, despite ``keep_io_types``, when an output is made by
    a blocked (FP32) op: it appends ``Cast(to=float16)`` and declares the output float16. The
    FP32 result is handed out directly instead (the Cast removed); any other float16 output
    gets a final ``Cast(to=float)``.
    """
    import onnx
    from onnx import TensorProto

    wanted = {o.name: o.type.tensor_type.elem_type for o in source.graph.output}
    graph = out.graph
    inferred = onnx.shape_inference.infer_shapes(out).graph
    made = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*inferred.input, *inferred.value_info, *inferred.output]
    }
    for output in graph.output:
        tensor_type = output.type.tensor_type
        if (
            wanted.get(output.name) != TensorProto.FLOAT
            or tensor_type.elem_type != TensorProto.FLOAT16
        ):
            continue
        producer = next((n for n in graph.node if output.name in n.output), None)
        if (
            producer is not None
            and producer.op_type == "Cast"
            and made.get(producer.input[0]) == TensorProto.FLOAT
        ):
            inner = producer.input[0]
            graph.node.remove(producer)
            _rename(graph, inner, output.name)
        else:
            inner = f"{output.name}_fp16"
            _rename(graph, output.name, inner)
            graph.node.append(
                onnx.helper.make_node(
                    "Cast", [inner], [output.name], to=TensorProto.FLOAT, name=f"{inner}_to_fp32"
                )
            )
        tensor_type.elem_type = TensorProto.FLOAT
        notes.append(f"fp16 conversion: output {output.name!r} kept float32")
    used = {name for n in graph.node for name in (*n.input, *n.output)}
    kept = [vi for vi in graph.value_info if vi.name in used]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for vi in graph.value_info:
        if vi.name == old:
            vi.name = new


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


def _outside_fp16(model: onnx.ModelProto) -> tuple[int, int]:
    """Float32 initializer/Constant values the conversion changes: (finite values beyond the
    FP16 range, clipped to it; non-zero values below its smallest subnormal, raised to it)."""
    import numpy as np
    from onnx import AttributeProto, TensorProto, numpy_helper

    tensors = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                tensors.append(attr.t)
    big = tiny = 0
    for t in tensors:
        magnitude = np.abs(numpy_helper.to_array(t))
        big += int((np.isfinite(magnitude) & (magnitude > FP16_MAX)).sum())
        tiny += int(((magnitude > 0) & (magnitude < FP16_MIN_SUBNORMAL)).sum())
    return big, tiny


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
                    if _np_name(t) != want:
                        problems.append(
                            f"{label}: input {n} is {_type_name(t)} but the op takes {want}"
                        )
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        problems.append(f"strict type inference fails: {_first_line(exc)}")
    casts = sum(n.op_type in _CAST_OPS for n in model.graph.node)
    return TypeCheck(tuple(dict.fromkeys(problems)), casts, len(model.graph.node))


def _np_name(elem_type: int) -> str:
    """ONNX schema spelling of an element type (``tensor(float16)`` -> ``float16``)."""
    import onnx

    names: dict[int, str] = {
        onnx.TensorProto.FLOAT: "float",
        onnx.TensorProto.FLOAT16: "float16",
        onnx.TensorProto.BFLOAT16: "bfloat16",
        onnx.TensorProto.DOUBLE: "double",
        onnx.TensorProto.INT64: "int64",
        onnx.TensorProto.INT32: "int32",
        onnx.TensorProto.BOOL: "bool",
    }
    return names.get(elem_type, _type_name(elem_type))


def require_strongly_typed(model: onnx.ModelProto) -> TypeCheck:
    """:func:`check_strongly_typed`, raising :class:`ExportError` when it finds a problem."""
    result = check_strongly_typed(model)
    if not result.ok:
        raise ExportError(
            f"the FP16 graph is not strongly typed (TensorRT would reject it): {result.summary()}",
            "export with precision='fp32' or add the offending op to fp32_ops",
        )
    return result
