"""Precision as a second axis of the family: which precisions a target tries, and post-training
quantization of an FP32 graph with ``onnxruntime.quantization``: only the profile's ``ops``
(MatMul, Gemm), symmetric per-channel INT8 (or FP8 E4M3) weights, in static graphs symmetric
activations with Q/DQ on the inputs only; the attention MatMuls stay float unless
``attention``, and LayerNorm, Softmax, GELU and the residual Adds always. ``dynamic`` graphs are
for CPUs; TensorRT gets a static QDQ graph, built strongly typed with no precision flag.
NVIDIA ModelOpt's ONNX PTQ was not adopted: its ``[onnx]`` extra pins ``onnx~=1.21``,
``onnxruntime-gpu~=1.24`` and ``cupy-cuda12x`` (ours: 1.23, 1.31, CUDA 13), and its INT8 path
is ONNX Runtime's ``quantize_static`` plus Q/DQ placement and FP16 elsewhere (README)."""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.errors import ExportError, UserInputError

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from dcvit_deploy.config.options import DeployOptions
    from dcvit_deploy.store.records import QuantizeSettings, TargetProfile

QUANTIZED = ("int8", "fp8")
FP8_CAPABILITY = 8.9
_GPU_CAPABILITY = {"H100": 9.0, "H200": 9.0, "L4": 8.9, "A100": 8.0, "A10": 8.6, "T4": 7.5,
                   "Orin": 8.7, "V100": 7.0}  # fmt: skip  # first match wins: A100 before A10


def artifact_name(candidate: str, precision: str, reference: str) -> str:
    """``dcvit-1655-n3h123.int8``; the profile's reference precision keeps the bare name."""
    return candidate if precision == reference else f"{candidate}.{precision}"


def structure_of(name: str) -> str:
    """The candidate an artifact name belongs to (candidate names hold no dot)."""
    return name.split(".", 1)[0]


def _capability(profile: TargetProfile, probe: bool) -> float | None:
    """The GPU's compute capability: this machine's (``probe``, when it has one), else the
    profile's named GPU's."""
    from dcvit_deploy.latency.machine import cuda_device_count, cuda_info

    if probe and cuda_device_count() > 0:
        cap = cuda_info(int(profile.backend_options.get("device_id", 0)))["compute_capability"]
        with contextlib.suppress(ValueError):
            return float(cap)
    return next((c for g, c in _GPU_CAPABILITY.items() if g.lower() in profile.gpu.lower()), None)


def check_precisions(
    profile: TargetProfile, dopts: DeployOptions | None = None, *, probe: bool = False
) -> tuple[str, ...]:
    """The precisions a run tries on ``profile`` (``--precisions`` narrows its list), reference
    first; refuses in one line what cannot run (``probe``: this machine's GPU, if it has one).
    Whether the backend runs each listed precision is checked when the profile loads."""
    listed = profile.precisions or (profile.precision,)
    where = f"profile {profile.name}"
    if profile.precision in QUANTIZED:
        fix = f"use one of fp32, fp16, bf16 and list {profile.precision} in precisions"
        raise UserInputError(f"{where}: precision = {profile.precision!r} must be a float", fix)
    asked = dopts.precisions if dopts else None
    wanted = tuple(dict.fromkeys(asked or listed))
    for p in wanted:
        if p == "fp8" and profile.device != "cuda":
            raise UserInputError(f"{where}: fp8 cannot run on the CPU",
                                 "use int8 on CPU; fp8 needs TensorRT on H100 or L4")  # fmt: skip
        if p not in listed:
            raise UserInputError(
                f"{where} does not try {p} (it lists {', '.join(listed)})",
                f"pass --precisions from {', '.join(listed)}, or add {p} to its precisions",
            )
        cap = _capability(profile, probe) if p == "fp8" else None
        if cap is not None and cap < FP8_CAPABILITY:
            raise UserInputError(
                f"{where}: fp8 needs compute capability >= {FP8_CAPABILITY}; the GPU has {cap}",
                "use int8 or fp16 on this GPU",
            )
    if dopts and dopts.speedup is not None and profile.precision not in wanted:
        raise UserInputError(
            f"--speedup is relative to the original at {profile.precision}, which --precisions "
            "leaves out",
            f"add {profile.precision} to --precisions or use --latency-ms",
        )
    return tuple(sorted(wanted, key=lambda p: p != profile.precision))


def attention_matmuls(proto: onnx.ModelProto) -> list[str]:
    """Names of the MatMuls whose inputs are both activations (Q.K^T and attention x V)."""
    consts = {t.name for t in proto.graph.initializer}
    consts |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in proto.graph.node
            if n.op_type == "MatMul" and not any(i in consts for i in n.input)]  # fmt: skip


def quantized_ops(proto: onnx.ModelProto) -> dict[str, int]:
    """Op types that compute on quantized data: consumers of a DequantizeLinear output
    (``Shape`` only reads a shape) and the integer ops of a dynamic graph."""
    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    skip = {"QuantizeLinear", "DequantizeLinear", "Shape"}
    return dict(Counter(
        n.op_type for n in proto.graph.node
        if (n.op_type not in skip and any(i in dq for i in n.input))
        or n.op_type in ("MatMulInteger", "ConvInteger")
    ))  # fmt: skip


def quantize_graph(
    source: Path,
    dest: Path,
    precision: str,
    settings: QuantizeSettings,
    method: str,
    calibration: np.ndarray,
) -> dict[str, Any]:
    """Quantize the FP32 graph ``source`` into ``dest`` (atomically): ``dynamic`` or static QDQ
    ``int8``/``fp8``, calibrated on ``calibration`` (N, C, H, W). :class:`ExportError` with the
    reason when the calibration images hold NaN/Inf, the quantizer fails, or a scale comes out
    non-finite or zero. Returns what was quantized."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnxruntime import quantization as oq

    from dcvit_deploy.export.onnx import _quiet, _set_meta
    from dcvit_deploy.store.atomic import atomic_write_bytes

    if not np.isfinite(calibration).all():
        fix = "check the few-shot images and their preprocessing"
        raise ExportError(f"{precision} calibration images hold NaN/Inf values", fix)
    proto = onnx.load(str(source))
    for i, node in enumerate(proto.graph.node):
        node.name = node.name or f"node_{i}"
    keep = [] if settings.attention else attention_matmuls(proto)
    common = {"op_types_to_quantize": list(settings.ops), "nodes_to_exclude": keep,
              "per_channel": True}  # fmt: skip
    qtype = oq.QuantType.QFLOAT8E4M3FN if precision == "fp8" else oq.QuantType.QInt8
    calib = "Distribution" if precision == "fp8" else settings.calibration  # ORT: FP8 by it only
    static = {
        "quant_format": oq.QuantFormat.QDQ,
        "activation_type": qtype,
        "weight_type": qtype,
        "calibrate_method": oq.CalibrationMethod[{"minmax": "MinMax"}.get(calib, calib.title())],
        # symmetric, Q/DQ on the inputs of quantized ops only (outputs float), as TensorRT wants
        "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True,
                          "OpTypesToExcludeOutputQuantization": list(settings.ops)},
    }  # fmt: skip
    batches = iter([{"input": calibration[i : i + 8]} for i in range(0, len(calibration), 8)])

    class Reader(oq.CalibrationDataReader):
        def get_next(self) -> dict[str, Any] | None:
            return next(batches, None)

    with tempfile.TemporaryDirectory() as tmp, _quiet(root=True):
        src, out = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(proto, str(src))
        try:
            if method == "dynamic":
                oq.quantize_dynamic(src, out, weight_type=oq.QuantType.QInt8, **common)
            else:
                oq.quantize_static(src, out, Reader(), **static, **common)
        except Exception as exc:  # ONNX Runtime's quantizer asserts on degenerate ranges
            raise ExportError(
                f"{precision} quantization failed: {type(exc).__name__}: {exc}",
                "check the calibration images and the [quantize] settings",
            ) from exc
        q = onnx.load(str(out))
    for t in q.graph.initializer:
        v = numpy_helper.to_array(t) if t.name.endswith("scale") else None
        if v is not None and not (np.isfinite(v).all() and (v > 0).all()):
            fix = "check the calibration images (blank images?)"
            raise ExportError(f"{precision} calibration gave a non-finite or zero scale ({t.name})",
                              fix)  # fmt: skip
    _set_meta(q, {"dcvit_deploy.precision": precision, "dcvit_deploy.quantization": method})
    atomic_write_bytes(dest, q.SerializeToString())
    return {"method": method, "quantized_ops": quantized_ops(q), "float_attention": len(keep)}
