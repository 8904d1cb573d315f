"""The export unit: one candidate to ONNX at one precision, verified against PyTorch.

The graph is verified with ONNX Runtime (CPU) against the candidate's PyTorch module on the
held-out images (each built artifact's fidelity to the original is measured by the build
unit). Inputs: the candidate's weights checksum and structure, opset, simplification,
precision, the held-out images' content and the exporter versions -- never the target profile
beyond its precision, so switching between profiles of one precision reuses the export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dcvit_deploy.pipeline.context import EXPORT_PACKAGES, versions
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.unit import UnitOutput
from dcvit_deploy.store.records import to_dict

if TYPE_CHECKING:
    from dcvit_deploy.pipeline.context import JobContext
    from dcvit_deploy.store.records import Candidate


def onnx_precision_for(profile_precision: str) -> str:
    """The ONNX graph a profile deploys: FP16 graphs for FP16 profiles, FP32 otherwise (bf16
    profiles run the PyTorch module; int8/fp8 graphs are quantized from the FP32 one)."""
    return "fp16" if profile_precision == "fp16" else "fp32"


class ExportUnit:
    """Export and verify one candidate (``RUN/onnx/<precision>/<name>.onnx``)."""

    optional = True

    def __init__(self, candidate: Candidate, precision: str) -> None:
        self.candidate = candidate
        self.precision = precision
        self.id = str(UnitId("export", precision=precision, name=candidate.key))

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        return {
            "weights": self.candidate.weights_sha256,
            "arch": to_dict(self.candidate.arch),
            "precision": self.precision,
            "opset": ctx.dopts.opset,
            "simplify": ctx.dopts.simplify,
            "holdout": ctx.prep().holdout_fp,
            "versions": versions(EXPORT_PACKAGES),
        }

    def execute(self, ctx: JobContext) -> UnitOutput:
        from dcvit_deploy.compress.candidate import build_candidate
        from dcvit_deploy.export.onnx import export_onnx, verify_onnx

        run = ctx.run
        cand = self.candidate
        images = ctx.prep().holdout
        model = build_candidate(cand, run.family_dir / cand.weights)
        common: dict[str, Any] = {
            "input_shape": tuple(int(v) for v in images.shape[1:]),
            "opset": ctx.dopts.opset,
            "simplify": ctx.dopts.simplify,
        }
        path = run.sub(f"onnx/{self.precision}/{cand.key}.onnx", file=True)
        export_onnx(model, path, precision="fp16" if self.precision == "fp16" else "fp32", **common)
        verification = verify_onnx(model, path, images)
        return UnitOutput(
            result={"path": run.rel(path), "verification": to_dict(verification)}, files=(path,)
        )
