"""Target profiles: every shipped file loads; every bad key or value names itself and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from dcvit_deploy.config.profiles import PROFILE_DIR, list_profiles, load_profile, profile_from_dict

from dcvit_deploy.errors import ProfileError

SHIPPED = {
    "cpu-ort",
    "ort-cuda",
    "h100-trt-fp16",
    "a100-trt-fp16",
    "l4-trt-fp16",
    "t4-trt-fp16",
    "orin-trt-fp16",
    "torch-cuda",
}

MINIMAL = """
name = "mine"
backend = "onnxruntime"
device = "cpu"
precision = "fp32"
batch_sizes = [1, 4]
statistic = "p50"
scope = "host"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ProfileError) as err:
        load_profile(write(tmp_path, text))
    message = str(err.value)
    assert "\n" not in message, "user errors are one line"
    assert "fix:" in message
    return message


def test_every_shipped_profile_loads() -> None:
    assert PROFILE_DIR.is_dir()
    assert set(list_profiles()) >= SHIPPED
    for name in list_profiles():
        profile = load_profile(name)
        assert profile.name == name
        assert profile.description
        assert profile.budget_batch_size in profile.batch_sizes
        if profile.device == "cuda":
            assert profile.backend in ("onnxruntime", "tensorrt", "torch")


def test_default_cpu_profile() -> None:
    p = load_profile("cpu-ort")
    assert (p.backend, p.device, p.precision, p.batch_sizes) == ("onnxruntime", "cpu", "fp32", (1,))
    assert (p.statistic, p.scope, p.budget_batch_size) == ("p50", "host", 1)
    assert p.backend_options["provider"] == "cpu"
    assert "intra_op_num_threads" in p.backend_options


def test_gpu_profiles_say_how_they_time() -> None:
    h100 = load_profile("h100-trt-fp16")
    assert (h100.backend, h100.precision, h100.scope, h100.gpu) == (
        "tensorrt",
        "fp16",
        "device_compute",
        "NVIDIA H100",
    )
    assert h100.measure.cuda_graphs and h100.measure.no_copy
    torch_cuda = load_profile("torch-cuda")
    assert torch_cuda.precision in ("bf16", "fp16")


def test_load_by_path_and_defaults(tmp_path: Path) -> None:
    p = load_profile(write(tmp_path, MINIMAL))
    assert p.name == "mine" and p.batch_sizes == (1, 4)
    assert p.budget_batch_size == 1  # defaults to the first batch size
    assert p.measure.window_iters == 50  # MeasureSettings defaults


def test_unknown_top_level_key_lists_allowed_keys(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + 'statistc = "p99"\n')
    assert "'statistc'" in msg and "statistic" in msg and "budget_batch_size" in msg


@pytest.mark.parametrize(
    ("key", "bad", "allowed"),
    [
        ("statistic", '"p42"', "mean, p50, p90, p95, p99"),
        ("device", '"tpu"', "cpu, cuda"),
        ("precision", '"int8"', "fp32, fp16, bf16"),
        ("scope", '"wall"', "host, device_compute, device_with_copies"),
    ],
)
def test_bad_enum_value_names_key_value_and_choices(
    tmp_path: Path, key: str, bad: str, allowed: str
) -> None:
    text = "\n".join(
        ln if not ln.startswith(f"{key} =") else f"{key} = {bad}" for ln in MINIMAL.splitlines()
    )
    msg = error_of(tmp_path, text)
    assert key in msg and bad.strip('"') in msg and allowed in msg


def test_missing_key(tmp_path: Path) -> None:
    text = "\n".join(ln for ln in MINIMAL.splitlines() if not ln.startswith("scope"))
    msg = error_of(tmp_path, text)
    assert "missing key 'scope'" in msg


def test_bad_batch_values(tmp_path: Path) -> None:
    assert "batch_sizes" in error_of(tmp_path, MINIMAL.replace("[1, 4]", "[0, 4]"))
    assert "repeats" in error_of(tmp_path, MINIMAL.replace("[1, 4]", "[4, 4]"))
    msg = error_of(tmp_path, MINIMAL + "budget_batch_size = 8\n")
    assert "budget_batch_size = 8" in msg and "1, 4" in msg


def test_measure_table_is_checked(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "[measure]\nwindow_size = 10\n")
    assert "'window_size'" in msg and "window_iters" in msg and "stability_tolerance" in msg
    msg = error_of(tmp_path, MINIMAL + '[measure]\nwindow_iters = "ten"\n')
    assert "window_iters" in msg and "int" in msg
    msg = error_of(tmp_path, MINIMAL + "[measure]\nwindow_iters = 0\n")
    assert "window_iters must be >= 1" in msg
    msg = error_of(tmp_path, MINIMAL + "[measure]\ncuda_graphs = 1\n")
    assert "cuda_graphs" in msg and "bool" in msg


def test_unknown_backend_lists_known_ones(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL.replace('"onnxruntime"', '"openvino"'))
    assert "openvino" in msg and "onnxruntime" in msg and "tensorrt" in msg and "torch" in msg


def test_backend_options_are_checked_by_the_backend(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "[backend_options]\nthreads = 4\n")
    assert "'threads'" in msg and "intra_op_num_threads" in msg
    msg = error_of(tmp_path, MINIMAL + '[backend_options]\ngraph_optimization_level = "max"\n')
    assert "graph_optimization_level" in msg and "'extended'" in msg
    msg = error_of(tmp_path, MINIMAL + "[backend_options]\nintra_op_num_threads = -1\n")
    assert "intra_op_num_threads" in msg and ">= 0" in msg
    msg = error_of(tmp_path, MINIMAL + '[backend_options]\nprovider = "cuda"\n')
    assert "provider" in msg and "device" in msg


def test_device_and_scope_combinations(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL.replace('scope = "host"', 'scope = "device_compute"'))
    assert "device_compute" in msg and "host" in msg
    trt_on_cpu = MINIMAL.replace('"onnxruntime"', '"tensorrt"')
    assert "cuda" in error_of(tmp_path, trt_on_cpu)
    fp16_torch_cpu = MINIMAL.replace('"onnxruntime"', '"torch"').replace('"fp32"', '"fp16"')
    assert "fp32, bf16" in error_of(tmp_path, fp16_torch_cpu)


def test_unknown_name_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as err:
        load_profile("no-such-profile")
    assert "cpu-ort" in str(err.value)
    with pytest.raises(ProfileError) as err:
        load_profile(tmp_path / "missing.toml")
    assert "does not exist" in str(err.value)
    assert "not valid TOML" in error_of(tmp_path, "name = [unclosed\n")


def test_profile_from_dict_without_backend_check() -> None:
    p = profile_from_dict(
        {
            "name": "plugin",
            "backend": "someplugin",
            "device": "cuda",
            "precision": "fp16",
            "batch_sizes": [8, 1],
            "statistic": "p99",
            "scope": "device_compute",
        },
        check_backend=False,
    )
    assert p.batch_sizes == (1, 8) and p.budget_batch_size == 8 and p.max_batch == 8
