"""Confirmation in a fresh process: a real child on CPU ONNX Runtime with tiny ONNX models."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from dcvit_deploy.latency.confirm import (
    ConfirmationError,
    FreshProcessConfirm,
    confirm_artifacts,
    confirm_in_fresh_process,
)
from dcvit_deploy.store.records import Artifact, LatencyStats, MeasureSettings, TargetProfile

pytest.importorskip("onnxruntime")

FAST = MeasureSettings(
    warmup_iters=3,
    warmup_min_s=0.0,
    window_iters=10,
    min_window_s=0.01,
    min_windows=1,
    max_windows=3,
    min_duration_s=0.0,
    min_rounds=2,
    max_rounds=2,
    round_windows=1,
)


def tiny_onnx(path: Path, hidden: int) -> Path:
    """A tiny image classifier graph (Flatten -> MatMul -> Relu -> MatMul), dynamic batch.

    Built directly with onnx.helper: the test is about the fresh process, not the exporter,
    and exporting even a tiny ViT takes longer than the whole confirmation."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((192, hidden)).astype("float32"), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype("float32"), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["output"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Artifact], TargetProfile]:
    from dcvit_deploy.config.profiles import load_profile

    from dcvit_deploy.backends import get_backend

    out = tmp_path_factory.mktemp("confirm")
    profile = dataclasses.replace(load_profile("cpu-ort"), measure=FAST)
    backend = get_backend("onnxruntime")
    artifacts = {}
    for name, hidden in (("dense", 256), ("small", 32)):
        onnx_path = tiny_onnx(out / f"{name}.onnx", hidden)
        artifacts[name] = backend.build(onnx_path, profile, out / "artifacts", candidate=name)
    return artifacts, profile


def test_confirm_measures_in_a_fresh_process(
    built: tuple[dict[str, Artifact], TargetProfile], tmp_path: Path
) -> None:
    artifacts, profile = built
    stats = confirm_artifacts(artifacts, profile, 1, raw_dir=tmp_path, timeout_s=120)
    assert set(stats) == {"dense", "small"}
    for name, s in stats.items():
        assert isinstance(s, LatencyStats) and s.rounds == 2 and s.p50 > 0
        note = s.actions[-1]
        assert note.startswith("confirmed in a fresh process (pid ")
        assert f"(pid {os.getpid()})" not in note  # really another process
        assert (tmp_path / profile.name / f"{name}-b1.json").is_file()
        assert s.machine["threads"]["intra_op_num_threads"] == 1
    one = confirm_in_fresh_process(artifacts["small"], profile, 1, timeout_s=120)
    assert one.rounds == 2 and one.batch_size == 1


def test_confirm_failure_and_timeout_raise(
    built: tuple[dict[str, Artifact], TargetProfile], tmp_path: Path
) -> None:
    artifacts, profile = built
    missing = dataclasses.replace(artifacts["small"], path=str(tmp_path / "gone.onnx"))
    with pytest.raises(ConfirmationError, match="failed with exit code"):
        confirm_artifacts({"small": missing}, profile, 1, timeout_s=120)
    with pytest.raises(ConfirmationError, match="ran past"):
        confirm_artifacts(artifacts, profile, 1, timeout_s=0.05)
    assert confirm_artifacts({}, profile, 1) == {}


def test_fresh_process_confirm_measures_each_candidate_once(
    monkeypatch: pytest.MonkeyPatch, built: tuple[dict[str, Artifact], TargetProfile]
) -> None:
    artifacts, profile = built
    calls: list[tuple[str, ...]] = []
    fake = LatencyStats(
        batch_size=1, iterations=1, mean=1.0, std=0.0, cov=0.0, min=1.0, max=1.0, p50=1.0,
        p90=1.0, p95=1.0, p99=1.0, throughput=1.0, scope="host", timer="host", windows=1,
        window_medians=(1.0,), stable=True, warmup_iters=0, duration_s=0.0,
    )  # fmt: skip

    def fake_confirm(
        todo: Mapping[str, Artifact], profile: TargetProfile, batch: int, **kw: object
    ) -> dict[str, LatencyStats]:
        calls.append(tuple(todo))
        return {n: fake for n in todo}

    monkeypatch.setattr("dcvit_deploy.latency.confirm.confirm_artifacts", fake_confirm)
    confirm = FreshProcessConfirm(artifacts, profile, 1)
    names: Sequence[str] = ["small", "dense"]
    assert set(confirm(names)) == {"small", "dense"}
    assert set(confirm(["dense"])) == {"dense"}
    assert calls == [("small", "dense")] and confirm.calls == 1


def test_fresh_process_confirm_with_rounds_measures_anew_with_exactly_those_rounds(
    built: tuple[dict[str, Artifact], TargetProfile],
) -> None:
    """A re-confirmation asks for more rounds: a new process runs exactly that many, and is
    never answered from the earlier measurement of the same pair."""
    artifacts, profile = built
    confirm = FreshProcessConfirm(artifacts, profile, 1, anchor="dense", timeout_s=120)
    first = confirm(["small", "dense"])
    assert first["small"].rounds == 2 and confirm.calls == 1
    again = confirm(["small", "dense"], rounds=5)
    assert confirm.calls == 2
    assert again["small"].rounds == 5 and again["dense"].rounds == 5
    assert again["small"].actions[-1] != first["small"].actions[-1]  # another process
    assert confirm(["small", "dense"])["small"].rounds == 5  # the latest pair answers later
