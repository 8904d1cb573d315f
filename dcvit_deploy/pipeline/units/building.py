"""The build unit: one candidate's artifact for one target profile, verified through its own
backend.

After the backend builds the artifact (an ONNX Runtime session file, a TensorRT engine, a
PyTorch module), the artifact itself is run through that backend on the held-out images and
compared with the candidate's PyTorch module (the same metrics as ONNX verification), so what
ships is what was checked. A failing artifact is recorded and never selectable.

Inputs: the exported graph's checksum, the profile's content, the runtime versions, and for GPU
profiles the device -- a runtime upgrade rebuilds, a finetune never depends on it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from dcvit_deploy.pipeline.context import RUNTIME_PACKAGES, device_identity, versions
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.unit import UnitOutput
from dcvit_deploy.selection.fidelity import closeness, fidelity_set
from dcvit_deploy.store.atomic import sha256_file
from dcvit_deploy.store.records import (
    Artifact,
    QuantizeSettings,
    Verification,
    to_dict,
)

if TYPE_CHECKING:
    from pathlib import Path

    from dcvit_deploy.pipeline.context import JobContext
    from dcvit_deploy.store.records import Candidate, TargetProfile


def verify_artifact(
    backend: Any, artifact: Artifact, profile: TargetProfile, model: Any, images: Any
) -> Verification:
    """Run ``artifact`` through ``backend`` on ``images`` and compare with ``model`` (PyTorch)."""
    import torch

    from dcvit_deploy.export.onnx import DEFAULT_TOLERANCES, compare_outputs

    with torch.inference_mode():
        reference = model.eval()(images.float()).float().cpu().numpy()
    tol = DEFAULT_TOLERANCES.get(artifact.precision, DEFAULT_TOLERANCES["fp16"])
    try:
        outputs = backend.run(artifact, profile, images.cpu().numpy())
    except Exception as exc:  # a runtime that cannot run its own artifact: not shippable
        return Verification(
            max_abs=float("inf"),
            max_rel=float("inf"),
            cosine=float("nan"),
            top1_agreement=0.0,
            finite=False,
            passed=False,
            samples=int(images.shape[0]),
            reason=f"{profile.backend} could not run the built artifact: {exc}"[:300],
        )
    return compare_outputs(reference, outputs, tolerances=tol)


class BuildUnit:
    """Build and verify one candidate's artifact ``name`` (default: the candidate's) for
    ``profile`` (at the artifact's precision), and measure its fidelity to the original on the
    held-out (or ``--eval-data``) images."""

    optional = True

    def __init__(
        self, candidate: Candidate, profile: TargetProfile, onnx_path: Path, name: str = ""
    ) -> None:
        self.candidate = candidate
        self.profile = profile
        self.onnx_path = onnx_path
        self.name = name or candidate.key
        self.id = str(UnitId("build", profile=profile.name, name=self.name))

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        return {
            "onnx": sha256_file(self.onnx_path),
            "weights": self.candidate.weights_sha256,
            # the quantized graph's checksum carries [quantize]; the precision list is no input
            "profile": to_dict(
                dataclasses.replace(self.profile, precisions=(), quantize=QuantizeSettings())
            ),
            "runtime": versions(RUNTIME_PACKAGES),
            "device": device_identity(self.profile) if self.profile.device == "cuda" else {},
            "holdout": ctx.prep().holdout_fp,
            "fidelity": fidelity_set(ctx.prep(), ctx.dopts.eval_data).fingerprint,
        }

    def execute(self, ctx: JobContext) -> UnitOutput:
        import numpy as np

        from dcvit_deploy.backends import get_backend
        from dcvit_deploy.compress.candidate import build_candidate

        run = ctx.run
        cand = self.candidate
        backend = get_backend(self.profile.backend)
        model = build_candidate(cand, run.family_dir / cand.weights)
        artifact = backend.build(
            self.onnx_path,
            self.profile,
            run.sub(f"artifacts/{self.profile.name}"),
            candidate=self.name,
            timing_cache=run.root / "artifacts" / f"{self.profile.name}.timing.cache",
            model=model if getattr(backend, "needs_module", False) else None,
        )
        verification = verify_artifact(backend, artifact, self.profile, model, ctx.prep().holdout)
        close, fs = None, fidelity_set(ctx.prep(), ctx.dopts.eval_data)
        if verification.passed:  # an engine runs at most its profile's largest batch
            x, step = fs.images.numpy(), self.profile.max_batch
            out = np.concatenate([backend.run(artifact, self.profile, x[i : i + step])
                                  for i in range(0, len(x), step)])  # fmt: skip
            close = closeness(fs.reference, out, fs.labels, on_training=fs.on_training)
        path = run.resolve(artifact.path)
        files = [path] if path.is_file() else []
        # recorded relative to the run, so a moved run still finds its artifacts
        stored = dataclasses.replace(artifact, path=run.rel(path))
        return UnitOutput(
            result={
                "artifact": to_dict(stored),
                "verification": to_dict(verification),
                "verified_with": f"{self.profile.backend} ({self.profile.name})",
                "closeness": close and to_dict(close),
            },
            files=tuple(files),
        )
