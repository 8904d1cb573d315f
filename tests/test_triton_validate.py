"""Config validation, with cases modelled on Triton's own model-config tests.

Each hand-written config below breaks one rule Triton enforces when it loads a model (batching,
instance groups, data types, dims, optimisation profiles, version policy, backend settings);
the validator must reject it with a message that names the rule. Configs we write must pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes.triton_inputs import candidate, cpu_profile, fake_engine, parse, trt_profile
from triton_rules import validate_config

from dcvit_deploy.triton import publish

BASE = """name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "input" data_type: TYPE_FP32 dims: [ 3, 8, 8 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]
"""


VALID = {
    "plain": BASE,
    "dynamic batching with delay": BASE
    + "dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }\n",
    "two instance groups": BASE
    + "instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] },"
    + " { count: 1 kind: KIND_CPU } ]\n",
    "specific versions": BASE + "version_policy { specific { versions: [ 1, 3 ] } }\n",
    "no batching, full dims": BASE.replace("max_batch_size: 8", "max_batch_size: 0").replace(
        "dims: [ 3, 8, 8 ]", "dims: [ -1, 3, 8, 8 ]"
    ),
    "onnxruntime settings": BASE
    + "optimization { graph { level: 1 } }\n"
    + 'parameters { key: "intra_op_thread_count" value { string_value: "4" } }\n'
    + 'parameters { key: "execution_mode" value { string_value: "1" } }\n',
}


@pytest.mark.parametrize("name", list(VALID))
def test_hand_written_valid_configs_pass(name: str) -> None:
    check = validate_config(VALID[name])
    assert check.status == "ok", check.messages


INVALID = [
    ("negative max batch", BASE.replace("max_batch_size: 8", "max_batch_size: -1"),
     "max_batch_size must be >= 0, not -1"),
    ("batching without max batch",
     BASE.replace("max_batch_size: 8", "max_batch_size: 0") + "dynamic_batching { }\n",
     "dynamic_batching needs max_batch_size > 0"),
    ("preferred above max", BASE + "dynamic_batching { preferred_batch_size: [ 16 ] }\n",
     "preferred_batch_size [16] exceeds max_batch_size 8"),
    ("missing data type", BASE.replace(" data_type: TYPE_FP32 dims: [ 3", " dims: [ 3"),
     "model input 'input' must specify data_type"),
    ("zero dim", BASE.replace("dims: [ 10 ]", "dims: [ 0 ]"),
     "model output 'logits' has invalid dims [0]: each must be >= 1 or -1"),
    ("dims below -1", BASE.replace("dims: [ 3, 8, 8 ]", "dims: [ 3, -2, 8 ]"),
     "model input 'input' has invalid dims [3, -2, 8]"),
    ("no dims", BASE.replace(" dims: [ 10 ]", ""), "model output 'logits' must specify dims"),
    ("duplicate input",
     BASE.replace("input [ {", 'input [ { name: "input" data_type: TYPE_FP32 dims: [ 1 ] }, {'),
     "model input 'input' is declared more than once"),
    ("cpu group with gpus", BASE + "instance_group [ { kind: KIND_CPU gpus: [ 0 ] } ]\n",
     "instance group m_0 has kind KIND_CPU but lists gpus"),
    ("negative gpu", BASE + "instance_group [ { kind: KIND_GPU gpus: [ -1 ] } ]\n",
     "instance group m_0 lists invalid gpu ids [-1]"),
    ("plan on cpu",
     BASE.replace("onnxruntime_onnx", "tensorrt_plan")
     + "instance_group [ { name: \"cpu\" kind: KIND_CPU } ]\n",
     "instance group cpu: a TensorRT plan cannot run on KIND_CPU"),
    ("named profile", BASE.replace("onnxruntime_onnx", "tensorrt_plan")
     + 'instance_group [ { kind: KIND_GPU profile: [ "max" ] } ]\n',
     "names optimisation profile 'max'"),
    ("profiles on onnx", BASE + 'instance_group [ { kind: KIND_GPU profile: [ "0" ] } ]\n',
     "selects engine profiles on onnxruntime_onnx"),
    ("cuda graphs on onnx", BASE + "optimization { cuda { graphs: true } }\n",
     "optimization.cuda.graphs is only honoured by Triton's TensorRT backend"),
    ("graph level on a plan", BASE.replace("onnxruntime_onnx", "tensorrt_plan")
     + "optimization { graph { level: 1 } }\n",
     "optimization.graph.level is an onnxruntime setting"),
    ("unknown graph level", BASE + "optimization { graph { level: 5 } }\n",
     "optimization.graph.level 5 is not -1"),
    ("unknown accelerator",
     BASE + 'optimization { execution_accelerators { gpu_execution_accelerator [ '
     '{ name: "openvino" } ] } }\n',
     "unknown gpu_execution_accelerator 'openvino'"),
    ("gpu accelerator on cpu instances",
     BASE + 'instance_group [ { kind: KIND_CPU } ]\n'
     'optimization { execution_accelerators { gpu_execution_accelerator [ '
     '{ name: "tensorrt" } ] } }\n',
     "gpu_execution_accelerator given but every instance group is KIND_CPU"),
    ("threads not a number",
     BASE + 'parameters { key: "intra_op_thread_count" value { string_value: "four" } }\n',
     "parameter intra_op_thread_count must be a non-negative integer, not 'four'"),
    ("bad execution mode",
     BASE + 'parameters { key: "execution_mode" value { string_value: "2" } }\n',
     "parameter execution_mode must be 0 or 1, not '2'"),
    ("zero latest versions", BASE + "version_policy { latest { num_versions: 0 } }\n",
     "version_policy latest needs num_versions >= 1"),
    ("version zero", BASE + "version_policy { specific { versions: [ 0 ] } }\n",
     "version_policy specific versions [0] < 1"),
    ("warm-up above max batch",
     BASE + 'model_warmup [ { name: "w" batch_size: 16 inputs { key: "input" value { '
     "data_type: TYPE_FP32 dims: [ 3, 8, 8 ] zero_data: true } } } ]\n",
     "warm-up 'w' batch_size 16 not in 1..8"),
    ("unknown platform", BASE.replace("onnxruntime_onnx", "pytorch_libtorch"),
     "platform 'pytorch_libtorch' is not onnxruntime_onnx or tensorrt_plan"),
    ("not a ModelConfig", BASE + "max_batch: 8\n", "not a valid Triton ModelConfig"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_hand_written_invalid_configs_are_rejected(text: str, message: str) -> None:
    check = validate_config(text)
    assert check.status == "failed"
    assert any(message in m for m in check.messages), check.messages


# --------------------------------------------------------------------------- with model files


def test_engine_optimisation_profiles_must_exist(tmp_path: Path) -> None:
    """Instance groups may pin engine optimisation profiles; ours have exactly one."""
    published = publish(tmp_path / "repo", "m", fake_engine(tmp_path), trt_profile())
    good = published.config_path.read_text()
    assert validate_config(published.model_dir).ok
    published.config_path.write_text(
        good.replace("  kind: KIND_GPU", '  kind: KIND_GPU\n  profile: [ "0" ]')
    )
    assert validate_config(published.model_dir).ok
    published.config_path.write_text(
        good.replace("  kind: KIND_GPU", '  kind: KIND_GPU\n  profile: [ "0", "1" ]')
    )
    check = validate_config(published.model_dir)
    assert check.status == "failed"
    assert any("optimisation profiles ['1'], but 1/model.plan has 1 profile(s)" in m
               for m in check.messages)  # fmt: skip


def test_max_batch_above_the_engine_profile_is_rejected(tmp_path: Path) -> None:
    published = publish(tmp_path / "repo", "m", fake_engine(tmp_path), trt_profile())
    text = published.config_path.read_text().replace("max_batch_size: 16", "max_batch_size: 32")
    published.config_path.write_text(text.replace("batch_size: 16", "batch_size: 8"))
    check = validate_config(published.model_dir)
    assert any("max_batch_size 32 exceeds the engine profile max 16" in m for m in check.messages)


def test_every_version_is_checked_against_the_config(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(repo, "m", candidate(tmp_path, "a"), cpu_profile())
    publish(repo, "m", candidate(tmp_path, "b", seed=1), cpu_profile())
    assert validate_config(repo / "m").ok
    # a version folder someone dropped in by hand, with another input name
    other = candidate(tmp_path, "c", in_name="pixels")
    (repo / "m" / "3").mkdir()
    (repo / "m" / "3" / "model.onnx").write_bytes(Path(other.path).read_bytes())
    check = validate_config(repo / "m")
    assert check.status == "failed"
    assert any(m.startswith("input names ['input'] != 3/model.onnx inputs ['pixels']")
               for m in check.messages)  # fmt: skip


def test_written_configs_parse_in_triton_schema(tmp_path: Path) -> None:
    published = publish(tmp_path / "repo", "m", fake_engine(tmp_path), trt_profile())
    config = parse(published.config_path.read_text())
    assert list(config.version_policy.specific.versions) == [published.version]
    assert config.instance_group[0].gpus == [0]
