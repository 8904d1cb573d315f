"""The quantization unit: one candidate's FP32 graph to an INT8 / FP8 graph for one profile,
verified with ONNX Runtime (CPU) against the candidate's PyTorch module. Its inputs (the graph,
``[quantize]``, the calibration images' bytes: a seeded sample of the few-shot images) are its
own: changing them redoes quantization and what follows, never the family. On a CPU ``auto``
measures a dynamic and a static graph of the first candidate once and records the faster."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import TYPE_CHECKING, Any

from dcvit_deploy.export.quantize import artifact_name
from dcvit_deploy.pipeline.context import device_identity, tensor_fingerprint, versions
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.unit import UnitOutput
from dcvit_deploy.store.atomic import sha256_file
from dcvit_deploy.store.records import to_dict

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import torch

    from dcvit_deploy.pipeline.context import JobContext
    from dcvit_deploy.pipeline.runner import Runner
    from dcvit_deploy.pipeline.units.compressing import Family
    from dcvit_deploy.store.records import Candidate, TargetProfile


def artifact_plan(
    family: Family, profile: TargetProfile, precisions: tuple[str, ...]
) -> Iterator[tuple[Candidate, str, str]]:
    """(candidate, precision, artifact name) of every artifact, candidates in family order."""
    for cand in family.candidates:
        for p in precisions:
            yield cand, p, artifact_name(cand.name, p, profile.precision)


def quantized(
    runner: Runner, cand: Candidate, precision: str, profile: TargetProfile, source: Path,
    methods: dict[str, str],
) -> Path | None:  # fmt: skip
    """Quantize ``source`` (verified FP32) for (``cand``, ``precision``) and return the verified
    graph, or ``None`` (recorded); ``methods`` keeps the CPU's measured method per precision."""
    res = runner.run(QuantizeUnit(cand, precision, profile, source, methods.get(precision)))
    if not res.ok or not res.result["verification"]["passed"]:
        return None
    methods.setdefault(precision, str(res.result["method"]))
    return runner.ctx.run.resolve(res.result["path"])


@functools.lru_cache(maxsize=4)
def _calibration(paths: tuple[Path, ...], count: int, seed: int, config: str) -> torch.Tensor:
    from dcvit_deploy.model.images import load_eval_tensor, sample_images

    chosen = sample_images(list(paths), min(count, len(paths)), seed)
    return load_eval_tensor(chosen, json.loads(config))


class QuantizeUnit:
    """Quantize and verify one candidate (``RUN/onnx/<precision>/<profile>/<name>.onnx``)."""

    optional = True

    def __init__(self, cand: Candidate, precision: str, profile: TargetProfile, source: Path,
                 method: str | None) -> None:  # fmt: skip
        self.candidate, self.precision, self.profile, self.source = cand, precision, profile, source
        static = profile.device != "cpu" or precision == "fp8"  # Q/DQ graphs off the CPU
        self.method = "static" if static else method or profile.quantize.method
        self.id = str(UnitId("quantize", profile.name, precision, cand.key))

    def calibration(self, ctx: JobContext) -> torch.Tensor:
        prep, n = ctx.prep(), self.profile.quantize.calibration_images
        cfg = json.dumps(prep.data_config, default=str, sort_keys=True)
        return _calibration(tuple(prep.train_paths), n, ctx.copts.seed, cfg)

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        return {
            "onnx": sha256_file(self.source),
            "precision": self.precision,
            "method": self.method,
            "settings": to_dict(self.profile.quantize),
            "calibration": tensor_fingerprint(self.calibration(ctx)),
            "holdout": ctx.prep().holdout_fp,
            "versions": versions(("onnx", "onnxruntime", "onnxruntime-gpu")),
            "device": device_identity(self.profile) if self.method == "auto" else {},
        }

    def execute(self, ctx: JobContext) -> UnitOutput:
        from dcvit_deploy.compress.candidate import build_candidate
        from dcvit_deploy.export.onnx import verify_onnx
        from dcvit_deploy.export.quantize import quantize_graph

        cand, run = self.candidate, ctx.run
        calib = self.calibration(ctx).numpy()
        path = run.sub(f"onnx/{self.precision}/{self.profile.name}") / f"{cand.key}.onnx"
        method, timing = self.method, dict[str, float]()
        if method == "auto":
            method, timing = self._faster(ctx, calib, path)
        s = self.profile.quantize
        info = quantize_graph(self.source, path, self.precision, s, method, calib)
        model = build_candidate(cand, run.family_dir / cand.weights)
        verification = verify_onnx(model, path, ctx.prep().holdout)
        return UnitOutput(
            result={**info, "path": run.rel(path), "verification": to_dict(verification),
                    "method_timing_ms": timing},
            files=(path,),
        )  # fmt: skip

    def _faster(self, ctx: JobContext, calib: Any, path: Path) -> tuple[str, dict[str, float]]:
        """Quantize both ways, measure both in the same interleaved rounds at the budget batch
        size on this profile, keep the faster (the decision is recorded)."""
        from dcvit_deploy.backends import get_backend
        from dcvit_deploy.export.quantize import quantize_graph
        from dcvit_deploy.latency.rounds import measure_rounds

        backend = get_backend(self.profile.backend)
        profile = dataclasses.replace(self.profile, precision=self.precision)  # type: ignore[arg-type]
        batch = profile.budget_batch_size
        graphs = {m: path.with_name(f".{path.stem}.{m}.onnx") for m in ("dynamic", "static")}
        try:
            arts = {}
            for m, graph in graphs.items():  # built in place: the graph is the ORT artifact
                quantize_graph(self.source, graph, self.precision, profile.quantize, m, calib)
                arts[m] = backend.build(graph, profile, graph.parent, candidate=graph.stem)
            result = measure_rounds(backend, arts, profile, [batch], seed=ctx.copts.seed)
        finally:
            for graph in graphs.values():
                graph.unlink(missing_ok=True)
        timing = {m: result.at(m, batch).stat(profile.statistic) for m in arts}
        return min(timing, key=lambda m: timing[m]), timing
