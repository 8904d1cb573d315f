"""Precision as a second axis of the family: quantized graphs (Q/DQ only where intended, runnable
on ONNX Runtime CPU), fidelity with intervals and floors, selection over both axes, refusals of
impossible precisions, and TensorRT Q/DQ builds through the fake runtime."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fakes import fake_tensorrt
from fakes.latency import fake_stats as stats
from fakes.runs import FAST, FAST_PROFILE, MODEL, run_cli_text

from dcvit_deploy.config.options import DeployOptions
from dcvit_deploy.config.profiles import load_profile, profile_from_dict
from dcvit_deploy.errors import ExportError, UserInputError
from dcvit_deploy.export.onnx import export_onnx, onnx_precision
from dcvit_deploy.export.quantize import (
    attention_matmuls,
    check_precisions,
    quantize_graph,
    quantized_ops,
)
from dcvit_deploy.selection.decide import decide
from dcvit_deploy.selection.fidelity import apply_floors, closeness, wilson
from dcvit_deploy.selection.reasons import render
from dcvit_deploy.store.records import (
    CandidateOutcome,
    Fidelity,
    LatencyBudget,
    MacCount,
    QuantizeSettings,
)

SETTINGS = QuantizeSettings()
FLOAT_OPS = {"LayerNormalization", "Softmax", "Erf", "Add", "Mul", "Div"}


def ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.fixture(scope="module")
def trained(trained_tiny_vit, tmp_path_factory):
    """The trained tiny ViT exported to FP32 ONNX, calibration images and held-out images."""
    folder = tmp_path_factory.mktemp("quantize")
    export_onnx(trained_tiny_vit.model, folder / "fp32.onnx", input_shape=(3, 32, 32))
    calib, _ = trained_tiny_vit.images(32, torch.Generator().manual_seed(2))
    held, labels = trained_tiny_vit.images(300, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = trained_tiny_vit.model(held).numpy()
    return folder, calib.numpy(), held, labels.numpy(), ref


def test_int8_graphs_quantize_only_weight_matmuls_and_run_on_ort_cpu(trained) -> None:
    folder, calib, held, _, ref = trained
    fp32 = onnx.load(str(folder / "fp32.onnx"))
    attention = attention_matmuls(fp32)
    weights = sum(n.op_type == "MatMul" for n in fp32.graph.node) - len(attention)
    assert len(attention) == 8 and weights == 16  # 4 blocks: QK^T and AV; qkv, proj, fc1, fc2
    expect = {"static": {"MatMul": 16, "Gemm": 1}, "dynamic": {"MatMulInteger": 17}}
    for method, expected in expect.items():
        path = folder / f"{method}.onnx"
        info = quantize_graph(folder / "fp32.onnx", path, "int8", SETTINGS, method, calib)
        q = onnx.load(str(path))
        # Q/DQ (or integer MatMuls) only on the weight MatMuls and the head: LayerNorm, Softmax,
        # GELU (Erf/Mul/Div), the residual Adds and both attention MatMuls stay float.
        assert quantized_ops(q) == expected == info["quantized_ops"]
        assert not FLOAT_OPS & set(quantized_ops(q)) and info["float_attention"] == 8
        dq = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        kept = [n for n in q.graph.node if n.name in attention]
        assert len(kept) == 8 and all(n.op_type == "MatMul" and not dq & set(n.input) for n in kept)
        assert onnx_precision(path) == "int8"
        out = ort_logits(path, held)
        assert np.isfinite(out).all()
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.97


def test_trained_model_stays_above_the_floor_and_broken_calibration_is_kept_out(trained) -> None:
    folder, calib, held, labels, ref = trained
    floors = DeployOptions(min_fidelity=0.9, eval_data="labels", max_accuracy_drop=2.0)
    judged = {}
    # The patch embedding quantized too; broken: calibrated on images 1000x too faint (a
    # preprocessing slip), so real pixels saturate its INT8 input (LayerNorm hides the slip from
    # every later MatMul).
    settings = QuantizeSettings(ops=("MatMul", "Gemm", "Conv"))
    for name, images in (("good", calib), ("broken", calib * 1e-3)):
        path = folder / f"{name}.onnx"
        quantize_graph(folder / "fp32.onnx", path, "int8", settings, "static", images)
        fid = closeness(ref, ort_logits(path, held), labels)
        o = CandidateOutcome(name, "original", 1.0, MacCount(1, 1, 1), "ok", precision="int8",
                             fidelity=fid.agreement, closeness=fid)  # fmt: skip
        judged[name] = apply_floors([o], floors)[0][0]
    good, broken = judged["good"], judged["broken"]
    assert good.status == "ok" and good.closeness.interval[0] >= 0.9  # decided, not by noise
    assert good.closeness.top1 >= 0.95 and good.closeness.top1_drop[2] <= 2.0
    assert broken.status == "below_floor" and broken.closeness.interval[1] < 0.9
    miss = 90 - 100 * broken.closeness.agreement
    assert f"misses --min-fidelity 90% by {miss:.2f} points" in broken.error
    assert "300 held-out images" in broken.error and "misses --max-accuracy-drop 2" in broken.error


def test_non_finite_calibration_fails_the_artifact_with_its_reason(trained) -> None:
    folder, calib, *_ = trained
    bad = calib.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ExportError, match=r"int8 calibration images hold NaN/Inf values"):
        quantize_graph(folder / "fp32.onnx", folder / "nan.onnx", "int8", SETTINGS, "static", bad)
    assert not (folder / "nan.onnx").exists()


def test_fidelity_intervals_and_undecided_floors() -> None:
    lo, hi = wilson(32, 32)
    assert hi == 1.0 and lo == pytest.approx(0.8928, abs=1e-3)  # 32 images cannot show 95%
    ref = np.eye(4)[[0, 1, 2, 3] * 8] * 5.0
    same = closeness(ref, ref, np.array([0, 1, 2, 3] * 8))
    assert (same.agreement, same.kl, same.top1_drop) == (1.0, 0.0, (0.0, 0.0, 0.0))
    flipped = ref.copy()
    flipped[:2] = np.eye(4)[[1, 0]] * 5.0  # two of 32 images change their top-1
    f = closeness(ref, flipped)
    assert f.agreement == 30 / 32 and f.kl > 0 and f.kl_se > 0
    o = CandidateOutcome("x.int8", "dcvit", 0.8, MacCount(1, 1, 1), "ok", closeness=f)
    # 93.8% [79.9, 98.3]: under a 95% floor by its estimate, but the interval straddles it
    (out,), notes = apply_floors([o], DeployOptions(min_fidelity=0.95))
    assert out.status == "below_floor" and "by 1.25 points" in out.error
    assert "too few images to decide it" in out.error
    (out,), notes = apply_floors([o], DeployOptions(min_fidelity=0.92))
    assert out.status == "ok" and "too few images to decide it" in notes[0]
    assert apply_floors([o], DeployOptions())[0] == [o]  # the default floor (0) admits all


# --------------------------------------------------------------------------- selection


def art(name: str, retained: float, p50: float, precision: str, kl: float = 0.0,
        agreement: float = 1.0, kl_se: float = 0.001) -> CandidateOutcome:  # fmt: skip
    fid = Fidelity(agreement, wilson(round(agreement * 1000), 1000), 1000, kl, kl_se, 1.0)
    return CandidateOutcome(name, "dcvit", retained, MacCount(1, 1, 1), "ok",
                            latency=(stats(1, p50),), fidelity=agreement, precision=precision,
                            closeness=fid)  # fmt: skip


FAMILY = [
    art("original", 1.0, 10.0, "fp32"),
    art("original.int8", 1.0, 5.5, "int8", kl=0.02, agreement=0.99),
    art("dcvit-2500", 0.75, 7.5, "fp32", kl=0.05, agreement=0.97),
    art("dcvit-2500.int8", 0.75, 4.0, "int8", kl=0.06, agreement=0.955),
]


def budget(ms: float) -> LatencyBudget:
    return LatencyBudget(ms=ms, statistic="p50", batch_size=1)


def test_selection_over_both_axes() -> None:
    # FP32 original misses, INT8 original fits: the densest artifact that fits is the INT8 one.
    assert decide(FAMILY, budget(6.0)).chosen == "original.int8"
    floor = DeployOptions(min_fidelity=0.95)
    assert decide(apply_floors(FAMILY, floor)[0], budget(6.0)).chosen == "original.int8"
    # ... unless the INT8 artifact is under the floor: then the densest that meets it.
    broken = [FAMILY[0], art("original.int8", 1.0, 5.5, "int8", kl=0.4, agreement=0.8), *FAMILY[2:]]
    sel = decide(apply_floors(broken, floor)[0], budget(8.0))
    assert sel.chosen == "dcvit-2500"
    assert render(sel, "original.int8").startswith(
        "below floor: agreement 80.0% [77.4%, 82.4%] on 1000 held-out images"
    )
    assert "misses --min-fidelity 95% by 15.00 points" in render(sel, "original.int8")
    # Both precisions of the original fit: same size, so the higher precision wins.
    sel = decide(FAMILY, budget(11.0))
    assert sel.chosen == "original"
    assert render(sel, "original.int8").startswith("fits, but lower precision than chosen original")
    # Sizes within the tie tolerance (half a point of MACs) are one size: precision decides.
    near = [art("a", 0.7510, 5.0, "int8"), art("b", 0.7490, 5.0, "fp32")]
    assert decide(near, budget(6.0)).chosen == "b"
    # --prefer fidelity: the lowest KL that fits, and it says when the images cannot tell.
    sel = decide(FAMILY, budget(8.0), prefer="fidelity")
    assert sel.chosen == "original.int8" and "cannot separate" not in render(sel, sel.chosen)
    close = [art("p", 0.8, 5.0, "fp32", kl=0.050, kl_se=0.01), art("q", 0.7, 5.0, "fp32", kl=0.055)]
    sel = decide(close, budget(8.0), prefer="fidelity")
    assert sel.chosen == "p" and "1000 images cannot separate it from q" in render(sel, "p")


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("profile", "precisions", "message"),
    [
        ("cpu-ort", ("fp8",), "profile cpu-ort: fp8 cannot run on the CPU"),
        ("cpu-ort", ("fp16",), "profile cpu-ort does not try fp16 (it lists fp32, int8)"),
        ("a100-trt-fp16", ("fp8",), "profile a100-trt-fp16 does not try fp8"),
        ("cpu-ort", ("fp32", "int8", "int4"), "does not try int4"),
    ],
)
def test_impossible_precisions_are_refused_in_one_line(profile, precisions, message) -> None:
    with pytest.raises(UserInputError) as err:
        check_precisions(load_profile(profile), DeployOptions(precisions=precisions))
    assert message in err.value.one_line() and "\n" not in err.value.one_line()


def test_fp8_on_a_gpu_without_it_is_refused_when_the_profile_loads() -> None:
    data = dict(name="a100-fp8", backend="tensorrt", device="cuda", gpu="NVIDIA A100",
                precision="fp16", precisions=["fp16", "int8", "fp8"], batch_sizes=[1],
                statistic="p50", scope="device_compute")  # fmt: skip
    with pytest.raises(
        UserInputError, match=r"fp8 needs compute capability >= 8.9; the GPU has 8.0"
    ):
        profile_from_dict(data)
    h100 = check_precisions(load_profile("h100-trt-fp16"))
    assert h100 == ("fp16", "int8", "fp8")
    # bisect searches each precision on its own (size orders latency within one, not across)
    assert check_precisions(load_profile("cpu-ort"), DeployOptions(search="bisect")) == (
        "fp32",
        "int8",
    )
    with pytest.raises(UserInputError, match="--speedup is relative to the original at fp32"):
        check_precisions(load_profile("cpu-ort"), DeployOptions(precisions=("int8",), speedup=1.2))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"ops": "MatMul"}, "quantize.ops: expected a list, got 'MatMul'"),
        ({"method": "fast"}, "quantize.method: expected one of auto, dynamic, static, got 'fast'"),
        ({"calibration_images": 0}, "quantize: calibration_images must be >= 1"),
        ({"bits": 4}, "unknown [quantize] key 'bits'"),
    ],
)
def test_bad_quantize_settings_are_named_when_the_profile_loads(table, message) -> None:
    data = dict(name="q", backend="onnxruntime", device="cpu", precision="fp32",
                precisions=["fp32", "int8"], batch_sizes=[1], statistic="p50", scope="host",
                quantize=table)  # fmt: skip
    with pytest.raises(UserInputError) as err:
        profile_from_dict(data)
    assert message in err.value.one_line()


def test_eval_data_and_floor_options_are_checked_up_front(tmp_path) -> None:
    from dcvit_deploy.config.validate import check_deploy_options

    def problem(**kw: object) -> str:
        with pytest.raises(UserInputError) as err:
            check_deploy_options(DeployOptions(**kw))  # type: ignore[arg-type]
        return err.value.one_line()

    assert "has no class sub-folders" in problem(eval_data=str(tmp_path))
    (tmp_path / "0").mkdir()
    assert f"no images found under {tmp_path / '0'}" in problem(eval_data=str(tmp_path))
    assert "--max-accuracy-drop 1.0 needs labelled --eval-data" in problem(max_accuracy_drop=1.0)
    assert "--min-fidelity must be in [0, 1]" in problem(min_fidelity=95.0)


# --------------------------------------------------------------------------- TensorRT


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_builds_qdq_graphs_strongly_typed_without_precision_flags(
    precision: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import dcvit_deploy.latency.machine
    from dcvit_deploy.backends import get_backend

    src = fake_tensorrt.write_tiny_onnx(tmp_path / "tiny.onnx")
    tiny = onnx.load(str(src))
    tiny.ir_version = 10  # what our exports write; ONNX Runtime 1.31 reads up to 13
    onnx.save(tiny, str(src))  # its weights are all ones: FP8's std-based weight scale is 0
    calib = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    qdq = tmp_path / f"tiny.{precision}.onnx"
    if precision == "fp8":
        with pytest.raises(ExportError, match=r"non-finite or zero scale \(w_scale\)"):
            quantize_graph(src, qdq, precision, SETTINGS, "static", calib)
        w = np.random.default_rng(1).standard_normal((3 * 32 * 32, 10)).astype(np.float32)
        tiny.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "w"))
        onnx.save(tiny, str(src))
    quantize_graph(src, qdq, precision, SETTINGS, "static", calib)
    assert quantized_ops(onnx.load(str(qdq))) == {"MatMul": 1}
    fake = fake_tensorrt.make_module(version="10.9.0.34")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(dcvit_deploy.latency.machine, "cuda_device_count", lambda: 1)
    backend = get_backend("tensorrt")
    monkeypatch.setattr(backend, "device_factory", lambda i: fake_tensorrt.FakeCudaDevice(fake, i))
    profile = dataclasses.replace(load_profile("h100-trt-fp16"), precision=precision)
    artifact = backend.build(qdq, profile, tmp_path / "engines", candidate=f"c.{precision}")
    assert artifact.precision == precision and artifact.meta["settings"]["precision"] == precision
    assert "create_network(flags=1)" in fake.CALLS  # 1 << STRONGLY_TYPED
    flags = [c for c in fake.CALLS if "flag" in c.lower() and not c.startswith("create_network")]
    assert flags == []  # no FP16/INT8/FP8 builder flag (TensorRT 11 has none)
    assert artifact.meta["settings"]["strongly_typed"] is True


# --------------------------------------------------------------------------- the pipeline

PROFILE = (
    FAST_PROFILE.replace('"test-cpu"', '"test-int8"')
    .replace('precision = "fp32"\n', 'precision = "fp32"\nprecisions = ["fp32", "int8"]\n')
    .replace("batch_sizes = [1, 2]", "batch_sizes = [1]")
    + '\n[quantize]\ncalibration_images = {n}\nmethod = "{method}"\n'
)


def test_each_candidate_and_precision_is_an_artifact_end_to_end(photo_dir, tmp_path) -> None:
    """Quantized, built, verified by its own backend, measured with the others, selectable and
    published under a name that shows both axes; the calibration settings redo quantization
    and what follows only."""
    import json

    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE.format(n=4, method="auto"))
    out = tmp_path / "run"
    args = ["--profile", str(profile), "--out", str(out), "--json"]
    code, text = run_cli_text(["compress", *MODEL, "--data", str(photo_dir), *FAST, "--targets",
                               "25%", *args])  # fmt: skip
    assert code == 0, text
    units = json.loads((out / "manifest.json").read_text())["units"]
    names = ["original", "original.int8", "dcvit-2505-n2h180", "dcvit-2505-n2h180.int8"]
    for name in names:
        built = units[f"build/test-int8/{name}"]["result"]
        assert built["verification"]["passed"] and "onnxruntime" in built["verified_with"]
        assert 0 <= built["closeness"]["agreement"] <= 1 and built["closeness"]["samples"] == 2
    assert (out / "artifacts" / "test-int8" / "original.int8.onnx").is_file()
    assert set(units["profile/test-int8"]["result"]["latency"]) == set(names)  # same rounds
    # CPU: the first candidate measured a dynamic and a static graph once; the rest follow it.
    first = units["quantize/test-int8/int8/original"]["result"]
    timing = first["method_timing_ms"]
    assert set(timing) == {"dynamic", "static"} and first["method"] == min(timing, key=timing.get)
    later = units["quantize/test-int8/int8/dcvit-2505-n2h180"]["result"]
    assert later["method"] == first["method"] and later["method_timing_ms"] == {}
    measured = [k for k, u in units.items() if k.startswith("quantize/")
                and u["status"] == "ok" and u["result"]["method_timing_ms"]]  # fmt: skip
    assert measured == ["quantize/test-int8/int8/original"], measured  # the trained pick follows
    from dcvit_deploy.pipeline.view import RunView
    from dcvit_deploy.store.rundir import RunDir

    with RunDir.load(out, lock=False) as run:  # what a later maker (the trained pick's) follows
        assert RunView(run).quantize_methods("test-int8") == {"int8": first["method"]}
    report = json.loads((out / "report.json").read_text())
    assert {(c["candidate"], c["precision"]) for c in report["candidates"]} == {
        (n, "int8" if n.endswith(".int8") else "fp32") for n in names
    }
    assert report["run"]["superseded"] == []  # an INT8 artifact is not a lost candidate
    from dcvit_deploy.api import status

    assert status(out)["candidates"]["original.int8"] == {
        "quantize:test-int8": "ok",
        "build:test-int8": "ok",
    }
    csv = (out / "candidates.csv").read_text().splitlines()
    assert "precision" in csv[0].split(",") and len(csv) == 5
    # The INT8 artifact, chosen, is published as measured: its quantized graph on Triton's ORT.
    code, text = run_cli_text(["select", "--out", str(out), "--profile", str(profile),
                               "--precisions", "int8", "--latency-ms", "1000", "--no-confirm",
                               "--json"])  # fmt: skip
    assert code == 0 and json.loads(text[text.index("{") :])["chosen"] == "original.int8", text
    model = out / "triton" / "dcvit_vit_tiny_patch16_224"
    version = max((v for v in model.iterdir() if v.name.isdigit()), key=lambda v: int(v.name))
    assert json.loads((version / "deploy.json").read_text())["source"]["candidate"] == (
        "original.int8"
    )
    graph = version / "model.onnx"
    quantized = out / "onnx" / "int8" / "test-int8" / "original.onnx"
    assert graph.read_bytes() == quantized.read_bytes() and quantized_ops(onnx.load(str(graph)))
    assert 'platform: "onnxruntime_onnx"' in (model / "config.pbtxt").read_text()
    # Other calibration settings: quantization and what follows are redone, not the family
    # (static: a dynamic graph, which the auto decision may have kept, ignores calibration).
    before = json.loads((out / "manifest.json").read_text())["units"]
    profile.write_text(PROFILE.format(n=3, method="static"))
    code, text = run_cli_text(["build", "--out", str(out), "--profile", str(profile)])
    assert code == 0, text
    after = json.loads((out / "manifest.json").read_text())["units"]
    for uid in ("family", "export/fp32/original", "build/test-int8/original"):
        assert after[uid] == before[uid], uid  # the same record: not redone
    for uid in ("quantize/test-int8/int8/original", "build/test-int8/original.int8"):
        # redone on other inputs (not a timestamp: both can finish within the same second)
        assert after[uid]["fingerprint"] != before[uid]["fingerprint"], uid
        assert after[uid]["status"] == "ok", uid


def test_impossible_precision_is_refused_before_any_work(photo_dir, tmp_path) -> None:
    out = tmp_path / "run"
    code, text = run_cli_text(["compress", *MODEL, "--data", str(photo_dir), *FAST, "--targets",
                               "25%", "--precisions", "fp32,fp8", "--out", str(out)])  # fmt: skip
    assert code == 1 and not out.exists()
    assert text.strip() == (
        "error: profile cpu-ort: fp8 cannot run on the CPU; fix: use int8 on CPU; fp8 needs "
        "TensorRT on H100 or L4"
    )
