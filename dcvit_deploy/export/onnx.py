"""ONNX export of (compressed) timm ViTs, an FP16 graph variant, and verification.

:func:`export_onnx` writes one ONNX file with input ``input`` (N, C, H, W) and output ``logits``,
a dynamic batch axis, optional onnxslim simplification, and -- for ``precision="fp16"`` -- an
FP16 graph that keeps chosen ops (LayerNormalization, Softmax by default) in FP32 behind Casts.
Strongly typed TensorRT builds (TensorRT 10 ``STRONGLY_TYPED``, always on in TensorRT 11) take
their precision from the graph, so the FP16 file *is* the FP16 engine's precision spec.

Exporter choice (torch >= 2.9): ``"auto"`` traces the model with the TorchScript exporter and
uses the torch.export-based ("dynamo") exporter when tracing fails or torch no longer ships it,
recording which one ran. Measured on the Fashion-MNIST benchmark ViT (one core): tracing 0.3-0.8
s, dynamo 6-8 s per export, the same compute operators (tracing splits q/k/v with ``Split``, not
``Slice``, and adds a few shape ops), the same ONNX Runtime latency; a dense family exports
every structure, so this is minutes per run. A trace records one path through ``forward``: every
exported graph is verified against PyTorch on real images (:func:`verify_onnx`), which is what
catches a wrong one. The dynamo exporter's lowest native opset is 18; lower requests (the
default 17, the opset TensorRT 8.6+ and every ONNX Runtime >= 1.14 support, with
LayerNormalization as one op) are down-converted by onnx's version converter, and the opset
actually written is reported.

During export the model is switched to timm's exportable mode (``timm.layers.set_exportable``)
and every attention module's ``fused_attn`` flag is turned off. timm fixes ``fused_attn`` when a
module is built, so the switch is applied to the instances and restored afterwards: the explicit
``MatMul -> Softmax -> MatMul`` path gives a smaller graph than the decomposed
``scaled_dot_product_attention``, a pattern TensorRT's attention fusion recognises, and a
Softmax node the FP16 variant can keep in FP32. FFN-only blocks and ``nn.Identity`` blocks are
plain modules and export as they are.

:func:`verify_onnx` runs the file with ONNX Runtime on CPU against the PyTorch model on the same
real images and returns a :class:`~dcvit_deploy.store.records.Verification`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dcvit_deploy.errors import ExportError, UserInputError
from dcvit_deploy.export.fp16 import DEFAULT_FP32_OPS, convert_to_fp16
from dcvit_deploy.store.atomic import atomic_write_bytes, sha256_file
from dcvit_deploy.store.records import Verification

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import onnx
    import torch

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
DEFAULT_OPSET = 17
_META_PRECISION = "dcvit_deploy.precision"
_META_FP32_OPS = "dcvit_deploy.fp32_ops"
_META_EXPORTER = "dcvit_deploy.exporter"

Exporter = Literal["auto", "dynamo", "torchscript"]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how."""

    path: str
    sha256: str
    opset: int
    exporter: str
    precision: Literal["fp32", "fp16"]
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    simplified: bool
    fp32_ops: tuple[str, ...]
    node_count: int
    export_seconds: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tolerances:
    """Pass thresholds of :func:`compare_outputs`: ``max_abs <= atol + rtol * max|ref|``,
    worst per-sample cosine >= ``min_cosine``, top-1 agreement >= ``min_top1``, all finite."""

    rtol: float
    atol: float
    min_cosine: float
    min_top1: float


DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "fp32": Tolerances(rtol=1e-3, atol=1e-4, min_cosine=0.9999, min_top1=0.99),
    # FP16 logits carry ~3 significant digits; argmax may flip on near-ties.
    "fp16": Tolerances(rtol=2e-2, atol=1e-2, min_cosine=0.999, min_top1=0.9),
    # Quantized logits: closeness by cosine; top-1 is judged by the fidelity floors, with intervals.
    **dict.fromkeys(("int8", "fp8"), Tolerances(rtol=1.0, atol=1.0, min_cosine=0.98, min_top1=0)),
}


# --------------------------------------------------------------------------- export


@functools.cache
def supported_opsets() -> tuple[int, int]:
    """The opsets :func:`export_onnx` writes as asked: from 17 (LayerNormalization as one op;
    the dynamo exporter writes 18 for anything lower) to the newest that the installed torch
    exporter, onnx and ONNX Runtime (probed with a one-node graph) all support."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from torch.onnx import _constants

    hi = min(getattr(_constants, "ONNX_MAX_OPSET", DEFAULT_OPSET), onnx.defs.onnx_opset_version())
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    for opset in range(hi, DEFAULT_OPSET, -1):
        ids = [helper.make_opsetid("", opset)]
        model = helper.make_model(
            graph, opset_imports=ids, ir_version=helper.find_min_ir_version_for(ids)
        )
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return DEFAULT_OPSET, opset
        except Exception:  # this ONNX Runtime does not know that opset
            continue
    return DEFAULT_OPSET, DEFAULT_OPSET


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    *,
    input_shape: tuple[int, int, int] = (3, 224, 224),
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    simplify: bool = True,
    precision: Literal["fp32", "fp16"] = "fp32",
    fp32_ops: Sequence[str] = DEFAULT_FP32_OPS,
    keep_io_types: bool = True,
    exporter: Exporter = "auto",
) -> ExportResult:
    """Export ``model`` (float32, any device) to ``path`` atomically.

    ``input_shape`` is one image's (C, H, W). With ``dynamic_batch`` the batch axis is named
    ``batch``; otherwise it is fixed to 1. ``precision="fp16"`` converts the graph to FP16
    except ``fp32_ops``; ``keep_io_types`` keeps the input and output float32 (Casts inside).
    Raises :class:`ExportError` with a fix when the model cannot be exported.
    """
    import onnx
    import torch

    if precision not in ("fp32", "fp16"):
        raise UserInputError(f"unknown export precision {precision!r}", "use 'fp32' or 'fp16'")
    if len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise UserInputError(
            f"input_shape {input_shape!r} is not one image's (C, H, W)", "e.g. (3, 224, 224)"
        )
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if params and any(p.dtype != torch.float32 for p in params):
        raise ExportError(
            "export_onnx expects a float32 model (the FP16 variant is made from the FP32 graph)",
            "call model.float() before exporting",
        )
    notes: list[str] = []
    t0 = time.perf_counter()
    batch = 2 if dynamic_batch else 1  # a batch of 1 would be specialised away by torch.export
    example = torch.randn(batch, *input_shape, device=device)
    with _export_mode(model):
        proto, used = _export_graph(model, example, opset, dynamic_batch, exporter, notes)
    _check_io(proto)
    simplified = False
    if simplify:
        proto, simplified = _simplify(proto, notes)
    kept: tuple[str, ...] = ()
    if precision == "fp16":
        kept = tuple(fp32_ops)
        proto = convert_to_fp16(proto, fp32_ops=kept, keep_io_types=keep_io_types, notes=notes)
    _set_meta(
        proto, {_META_PRECISION: precision, _META_FP32_OPS: ",".join(kept), _META_EXPORTER: used}
    )
    proto.producer_name = "dcvit-deploy"
    try:
        onnx.checker.check_model(proto)
        blob = proto.SerializeToString()
    except (ValueError, onnx.checker.ValidationError) as exc:
        raise ExportError(
            f"the exported ONNX graph is invalid: {_first_line(exc)}",
            "report this with the model; try exporter='dynamo' or another opset",
        ) from exc
    atomic_write_bytes(path, blob)
    actual_opset = _opset(proto)
    if actual_opset != opset:
        notes.append(f"requested opset {opset}, wrote opset {actual_opset}")
    return ExportResult(
        path=str(path),
        sha256=sha256_file(path),
        opset=actual_opset,
        exporter=used,
        precision=precision,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        input_shape=tuple(input_shape),
        dynamic_batch=dynamic_batch,
        simplified=simplified,
        fp32_ops=kept,
        node_count=len(proto.graph.node),
        export_seconds=time.perf_counter() - t0,
        warnings=tuple(notes),
    )


@contextlib.contextmanager
def _export_mode(model: torch.nn.Module) -> Iterator[None]:
    """eval(), timm exportable mode, explicit (non-fused) attention; all restored afterwards."""
    from timm.layers import set_exportable

    was_training = model.training
    fused: list[tuple[Any, bool]] = [
        (m, bool(m.fused_attn)) for m in model.modules() if hasattr(m, "fused_attn")
    ]
    model.eval()
    try:
        for m, _ in fused:
            m.fused_attn = False
        with set_exportable(True):
            yield
    finally:
        for m, flag in fused:
            m.fused_attn = flag
        model.train(was_training)


def _export_graph(
    model: torch.nn.Module,
    example: torch.Tensor,
    opset: int,
    dynamic_batch: bool,
    exporter: Exporter,
    notes: list[str],
) -> tuple[onnx.ModelProto, str]:
    order = {"auto": ("torchscript", "dynamo"), "dynamo": ("dynamo",),
             "torchscript": ("torchscript",)}[exporter]  # fmt: skip
    errors: list[str] = []
    for name in order:
        try:
            proto = (_by_tracing if name == "torchscript" else _by_dynamo)(
                model, example, opset, dynamic_batch
            )
        except Exception as exc:
            errors.append(f"{name} exporter failed ({_first_line(exc)})")
            if exporter != "auto":
                raise ExportError(
                    f"torch.onnx ({name}) could not export the model: {_first_line(exc)}",
                    "use exporter='auto' to try the other exporter, or remove data-dependent "
                    "Python control flow from forward()",
                ) from exc
            continue
        if errors:
            notes.append(f"{errors[0]}; used the {name} exporter")
        return proto, name
    raise ExportError(
        "the model could not be exported to ONNX (" + "; ".join(errors) + ")",
        "check that forward() takes one image tensor and returns logits; try another opset",
    )


def _io_names(opset: int) -> dict[str, Any]:
    """What both exporters are told: the opset and the graph's input and output names."""
    return {"opset_version": opset, "input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}


def _by_dynamo(
    model: torch.nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool
) -> onnx.ModelProto:
    import torch

    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM, min=1)},) if dynamic_batch else None
    with _quiet():
        program = torch.onnx.export(
            model,
            (example,),
            None,
            dynamo=True,
            **_io_names(opset),
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    if program is None:  # pragma: no cover - torch contract
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto


def _by_tracing(
    model: torch.nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool
) -> onnx.ModelProto:
    import tempfile

    import onnx
    import torch

    axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            str(target),
            dynamo=False,
            **_io_names(opset),
            dynamic_axes=axes,
            do_constant_folding=True,
        )
        return onnx.load(str(target))


@contextlib.contextmanager
def _quiet(root: bool = False) -> Iterator[None]:
    """Silence exporter chatter (progress prints, tracer/deprecation warnings) on success;
    ``root``: the root logger too (ONNX Runtime's quantizer logs there)."""
    import logging

    # "torch" covers torch.onnx/torch.export/torch.fx, whose failures dump whole graphs.
    names = ("torch", "onnxscript", "onnx_ir", "onnxslim", *([""] if root else []))
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            # torch.export prints a failed graph to stderr; the error we raise names the cause.
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _check_io(proto: onnx.ModelProto) -> None:
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or not outputs or outputs[0] != OUTPUT_NAME:
        raise ExportError(
            f"the exported graph has inputs {inputs} and outputs {outputs}; "
            f"expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}, ...]",
            "make forward() take one image tensor and return a logits tensor",
        )


def _simplify(proto: onnx.ModelProto, notes: list[str]) -> tuple[onnx.ModelProto, bool]:
    try:
        import onnxslim

        with _quiet():
            slim = onnxslim.slim(proto)
        if slim is None:  # pragma: no cover - onnxslim contract
            raise RuntimeError("onnxslim returned nothing")
        _check_io(slim)
        return slim, True
    except Exception as exc:  # simplification is an optimisation, never a reason to fail
        notes.append(f"onnxslim simplification skipped: {_first_line(exc)}")
        return proto, False


def _set_meta(proto: onnx.ModelProto, entries: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            prop = proto.metadata_props.add()
            prop.key, prop.value = key, value


def _opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _first_line(exc: BaseException) -> str:
    """The first line of the root cause (exporters wrap the informative error), no ANSI codes."""
    import re

    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(root))
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return f"{type(root).__name__}: {first}"[:300] if first else type(root).__name__


# --------------------------------------------------------------------------- inspection


def onnx_io(path: str | Path) -> dict[str, Any]:
    """Names, shapes (ints, or the dim name for dynamic axes) and dtypes of an ONNX file's I/O."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(
            f"cannot parse ONNX file {Path(path).name}: {_first_line(exc)}", "re-export it"
        ) from exc
    init_names = {t.name for t in proto.graph.initializer}

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            if v.name in init_names:
                continue
            tt = v.type.tensor_type
            shape = [
                d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                for d in tt.shape.dim
            ]
            out.append(
                {
                    "name": v.name,
                    "shape": shape,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                }
            )
        return out

    inputs = describe(proto.graph.input)
    outputs = describe(proto.graph.output)
    if not inputs or not outputs:
        raise ExportError(f"ONNX file {Path(path).name} has no inputs or outputs", "re-export it")
    return {
        "input_name": inputs[0]["name"],
        "output_name": outputs[0]["name"],
        "input_shape": inputs[0]["shape"],
        "inputs": inputs,
        "outputs": outputs,
    }


def onnx_precision(path: str | Path) -> str:
    """Our metadata's precision (``int8``/``fp8`` for quantized graphs), else ``fp16`` when the
    graph computes in float16 (its weights), else fp32."""
    import onnx
    from onnx import TensorProto

    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == _META_PRECISION and prop.value in DEFAULT_TOLERANCES:
            return prop.value
    halves = sum(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer)
    floats = sum(t.data_type == TensorProto.FLOAT for t in proto.graph.initializer)
    return "fp16" if halves > floats else "fp32"


# --------------------------------------------------------------------------- verification


def compare_outputs(
    reference: np.ndarray,
    outputs: np.ndarray,
    *,
    tolerances: Tolerances,
) -> Verification:
    """Agreement of ``outputs`` with ``reference`` logits (N, classes); pure numpy."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(outputs, dtype=np.float64)
    n = int(ref.shape[0]) if ref.ndim else 1
    if ref.shape != out.shape:
        return Verification(
            max_abs=float("inf"),
            max_rel=float("inf"),
            cosine=float("nan"),
            top1_agreement=0.0,
            finite=bool(np.isfinite(out).all()),
            passed=False,
            samples=n,
            reason=f"output shape {tuple(out.shape)} differs from reference {tuple(ref.shape)}",
        )
    finite_mask = np.isfinite(out)
    finite = bool(finite_mask.all())
    safe = np.where(finite_mask, out, 0.0)
    diff = np.abs(safe - ref)
    max_abs = float(diff.max()) if finite else float("inf")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    r2 = ref.reshape(n, -1)
    o2 = safe.reshape(n, -1)
    norms = np.linalg.norm(r2, axis=1) * np.linalg.norm(o2, axis=1)
    dots = (r2 * o2).sum(axis=1)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
    cosine = float(cos.min()) if n else 1.0
    top1 = float((r2.argmax(axis=1) == o2.argmax(axis=1)).mean()) if n else 1.0
    reasons: list[str] = []
    if not finite:
        bad = int((~finite_mask).sum())
        reasons.append(f"{bad} non-finite output value(s) (NaN/Inf)")
    limit = tolerances.atol + tolerances.rtol * scale
    if finite and max_abs > limit:
        reasons.append(
            f"max abs error {max_abs:.3g} > {limit:.3g} (atol {tolerances.atol:g} + rtol "
            f"{tolerances.rtol:g} x max|ref| {scale:.3g})"
        )
    if cosine < tolerances.min_cosine:
        reasons.append(f"cosine similarity {cosine:.6f} < {tolerances.min_cosine}")
    if top1 < tolerances.min_top1:
        reasons.append(f"top-1 agreement {top1:.1%} < {tolerances.min_top1:.0%}")
    return Verification(
        max_abs=max_abs,
        max_rel=max_rel,
        cosine=cosine,
        top1_agreement=top1,
        finite=finite,
        passed=not reasons,
        samples=n,
        reason="; ".join(reasons),
    )


def verify_onnx(
    model: torch.nn.Module,
    onnx_path: str | Path,
    images: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    min_cosine: float | None = None,
    min_top1: float | None = None,
    intra_op_threads: int = 1,
) -> Verification:
    """Run ``onnx_path`` with ONNX Runtime (CPU) and ``model`` on the same ``images`` (N,C,H,W).

    Thresholds left ``None`` come from :data:`DEFAULT_TOLERANCES` for the file's precision.
    Raises :class:`ExportError` when the file cannot be loaded or run.
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    precision = onnx_precision(onnx_path)
    base = DEFAULT_TOLERANCES[precision]
    tol = Tolerances(
        rtol=base.rtol if rtol is None else rtol,
        atol=base.atol if atol is None else atol,
        min_cosine=base.min_cosine if min_cosine is None else min_cosine,
        min_top1=base.min_top1 if min_top1 is None else min_top1,
    )
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            reference = model(images.to(device=device, dtype=torch.float32)).float().cpu().numpy()
    finally:
        model.train(was_training)
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.log_severity_level = 3
    if precision == "fp8":  # ORT's CPU fusions take only int8 Q/DQ; run fp8 Q/DQ as written
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(
            str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"]
        )
        inp = session.get_inputs()[0]
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        x = images.detach().cpu().numpy().astype(dtype)
        static = inp.shape[0] if isinstance(inp.shape[0], int) else None
        if static is not None and static != x.shape[0]:
            chunks = [
                session.run(None, {inp.name: x[i : i + static]})[0]
                for i in range(0, x.shape[0], static)
            ]
            outputs = np.concatenate(chunks, axis=0)
        else:
            outputs = session.run(None, {inp.name: x})[0]
    except Exception as exc:
        raise ExportError(
            f"ONNX Runtime could not run {Path(onnx_path).name}: {_first_line(exc)}",
            "re-export the candidate; check the export warnings",
        ) from exc
    return compare_outputs(reference, outputs.astype(np.float32), tolerances=tol)
