"""One family, several targets, and the executor seam: Ray on one local 2-CPU cluster shared by
every Ray test (``ray_cluster`` in conftest) against the local executor."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fakes.fleet import FIGURES_ENV, install_scripted_figures
from fakes.runs import FAST_PROFILE, assert_one_line_error, compress, run_cli

from dcvit_deploy.api import run_pipeline
from dcvit_deploy.config.options import CompressOptions, DeployOptions
from dcvit_deploy.config.profiles import load_profile
from dcvit_deploy.pipeline.executor import LocalExecutor, RayExecutor
from dcvit_deploy.pipeline.fleet import resources_for

PROFILE = (  # the shared fast test profile, at batch 1, with the target's thread count
    FAST_PROFILE.replace('"test-cpu"', '"{name}"')
    .replace("[1, 2]", "[1]")
    .replace("intra_op_num_threads = 1", "intra_op_num_threads = {threads}")
)
LIGHT, SMALL, GONE = "cpu-ort-1t", "cpu-ort-2t", "cpu-ort-gone"
CANDIDATES = ("original", "dcvit-1003-n1h221", "dcvit-2505-n2h180")
# Scripted per target so the 1000 ms budget lies between measured figures on each, and each
# target has its own answer: dcvit-1003 on cpu-ort-2t, dcvit-2505 on cpu-ort-1t.
SCRIPT = {
    SMALL: dict(zip(CANDIDATES, (1500.0, 900.0, 600.0), strict=True)),
    LIGHT: dict(zip(CANDIDATES, (1300.0, 1100.0, 700.0), strict=True)),
}
MODEL_NAME = "dcvit_vit_tiny_patch16_224"


def compress_options(photo_dir: Path) -> CompressOptions:
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=10)
    return CompressOptions(model="vit_tiny_patch16_224", data=str(photo_dir), random_init=True,
                           model_kwargs=kwargs, schedule="tiny", iterations=2,
                           inversion_iterations=2, num_samples=4, holdout=2,
                           targets=(0.10, 0.25))  # fmt: skip


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("fleet-profiles")
    for name, threads in ((LIGHT, 1), (SMALL, 2), (GONE, 1)):
        (folder / f"{name}.toml").write_text(PROFILE.format(name=name, threads=threads))
    return {n: str(folder / f"{n}.toml") for n in (LIGHT, SMALL, GONE)}


def fleet(profiles: dict[str, str], *names: str) -> DeployOptions:
    return DeployOptions(profile=",".join(profiles[n] for n in names), latency_ms=1000.0,
                         confirm=False)  # fmt: skip


@pytest.fixture(scope="module")
def ray_run(ray_cluster, photo_dir, profiles, tmp_path_factory):
    """The whole job on Ray: two targets the node carries and one no node offers."""
    Path(os.environ[FIGURES_ENV]).write_text(json.dumps(SCRIPT))
    out = tmp_path_factory.mktemp("fleet") / "ray"
    executor = RayExecutor(task_cpus=1, placement_wait_s=1.0)
    opts, sent = fleet(profiles, LIGHT, SMALL, GONE), []
    original = RayExecutor.map

    def spy(ex, tasks, **kw):  # record what went to Ray
        sent.extend(t.key for t in tasks)
        return original(ex, tasks, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RayExecutor, "map", spy)
        result = run_pipeline(compress_options(photo_dir), opts, out, executor=executor)
    return out, result, opts, sent


@pytest.fixture(scope="module")
def local_run(ray_run, photo_dir, profiles, tmp_path_factory):
    """A family of its own with the local executor (same task threads), and the two targets
    with the local executor on a copy of the Ray run's family and exports."""
    base = tmp_path_factory.mktemp("fleet-local")
    copts = compress_options(photo_dir)
    run_pipeline(copts, DeployOptions(), base / "family", stop_after="family",
                 executor=LocalExecutor(task_cpus=1))  # fmt: skip
    out = base / "fleet"
    shutil.copytree(ray_run[0], out, ignore=shutil.ignore_patterns("artifacts", "raw", "triton"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["units"] = {u: r for u, r in manifest["units"].items() if u.split("/")[0] in
                         ("family", "export")}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.MonkeyPatch.context() as mp:
        from dcvit_deploy.pipeline.units.measuring import ProfileUnit

        mp.setattr(ProfileUnit, "measure", ProfileUnit.measure)  # undone after this run
        install_scripted_figures()
        result = run_pipeline(copts, fleet(profiles, LIGHT, SMALL), out, executor=LocalExecutor(1))
    return base / "family", out, result


def family_checksums(run: Path) -> dict[str, str]:
    manifest = json.loads((run / "manifest.json").read_text())
    return {
        c["name"]: c["weights_sha256"] for c in manifest["units"]["family"]["result"]["candidates"]
    }


def test_the_family_is_bit_identical_on_ray_and_locally(ray_run, local_run):
    """Ranking finetunes and one-shot targets ran as Ray tasks: same weights, byte for byte."""
    assert tuple(family_checksums(ray_run[0])) == CANDIDATES
    assert family_checksums(ray_run[0]) == family_checksums(local_run[0])
    ranked = ["rank block 1", "rank block 2"]  # the tiny ViT's candidate blocks
    # measure first: the targets' structures are measured before anything is finetuned; the
    # union of their picks is trained (as tasks) and the targets that chose them sent again
    assert ray_run[3] == [*ranked, LIGHT, SMALL, GONE, *CANDIDATES[1:], LIGHT, SMALL]


def test_each_target_is_chosen_on_its_own_figures_as_the_local_executor_chooses(ray_run, local_run):
    out, result = ray_run[:2]
    for res in (result, local_run[2]):
        assert res.fleet[LIGHT]["chosen"] == "dcvit-2505-n2h180"  # 1100 misses 1000, 700 fits
        assert res.fleet[SMALL]["chosen"] == "dcvit-1003-n1h221"  # scripted: the original misses
        assert res.fleet[SMALL]["figure_ms"] == 900.0 and res.fleet[SMALL]["measured"]
    for target, chosen in ((LIGHT, "dcvit-2505-n2h180"), (SMALL, "dcvit-1003-n1h221")):
        report = json.loads((out / "reports" / target / "report.json").read_text())
        assert report["selection"]["chosen"] == chosen
        # one Triton repository per target, the same stable model name in each, version 1
        served = out / "triton" / target / MODEL_NAME / "1" / "model.onnx"
        key = chosen if chosen == "original" else f"{chosen}.trained"  # the pick, trained
        assert served.read_bytes() == (out / "artifacts" / target / f"{key}.onnx").read_bytes()
    summary = json.loads((out / "fleet.json").read_text())["targets"]
    assert summary == json.loads(json.dumps(result.fleet))
    table = (out / "SUMMARY.md").read_text()
    assert f"| {SMALL} | dcvit-1003-n1h221 | 900 | 0 |" in table
    assert not (out / "report.json").exists()  # the top level is the fleet's


def test_a_target_no_node_offers_is_reported_while_the_others_complete(ray_run):
    out, result = ray_run[:2]
    assert result.fleet[GONE] == {
        "chosen": None,
        "why": f"not measured: no node offers target:{GONE}",
        "measured": False,
    }
    assert result.infeasible is not None and result.infeasible.exit_code == 1
    assert f"1 of 3 targets were not measured: {GONE}" in result.infeasible.one_line()
    assert not (out / "triton" / GONE).exists()


def test_a_rerun_on_ray_redoes_nothing_that_is_still_valid(ray_run, photo_dir):
    out, opts = ray_run[0], ray_run[2]
    before = json.loads((out / "manifest.json").read_text())["units"]
    result = run_pipeline(compress_options(photo_dir), opts, out,
                          executor=RayExecutor(task_cpus=1, placement_wait_s=1.0))  # fmt: skip
    after = json.loads((out / "manifest.json").read_text())["units"]
    kept = [u for u in before if u.split("/")[0] in ("family", "build", "profile", "select")]
    assert len(kept) == 1 + 2 * (len(CANDIDATES) + 1) + 2 + 2  # + each target's trained pick
    assert {u: after[u] for u in kept} == {u: before[u] for u in kept}  # same records, not redone
    assert result.fleet[SMALL]["chosen"] == "dcvit-1003-n1h221"


def test_a_gpu_target_asks_for_one_gpu_of_its_type_on_a_node_that_carries_it():
    assert resources_for(load_profile("t4-trt-fp16")).demand() == {
        "CPU": 1,
        "GPU": 1,
        "accelerator_type:T4": 0.001,
        "target:t4-trt-fp16": 1.0,
    }
    assert resources_for(load_profile("h100-trt-fp16")).accelerator_type == "H100"


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--profile", "cpu-ort,cpu-ort"], "--profile names target 'cpu-ort' twice"),
        (["--profile", "cpu-ort,"], "has an empty entry"),
        (["--ray-address", "auto"], "--ray-address needs --executor ray"),
    ],
)
def test_bad_fleet_options_are_one_line_before_any_work(tmp_path, photo_dir, extra, needle):
    code, out, err = run_cli([*compress(photo_dir, tmp_path / "r", *extra), "--dry-run"])
    assert_one_line_error(code, out, err, needle)
    assert not (tmp_path / "r").exists()


def test_units_that_ran_elsewhere_are_taken_from_their_records_never_rerun(tmp_path):
    """The head never re-measures what a node selected; a node never re-exports."""
    from dcvit_deploy.pipeline.context import JobContext
    from dcvit_deploy.pipeline.runner import Runner
    from dcvit_deploy.store.rundir import RunDir

    class Measure:
        id, optional = "select/cpu-ort-1t", False

        def inputs(self, ctx):
            raise AssertionError("fingerprinted on the head")

        def execute(self, ctx):
            raise AssertionError("measured on the head")

    with RunDir.open(tmp_path / "run", {"model": "m"}) as run:
        run.record_unit(Measure.id, {"status": "ok", "result": {"selection": None}})
        ctx = JobContext(run, None, None, elsewhere=("select",))  # type: ignore[arg-type]
        done = Runner(ctx).run(Measure())
        assert (done.status, done.result, done.reused) == ("ok", {"selection": None}, True)
        ctx.elsewhere = ("export",)
        with pytest.raises(AssertionError, match="fingerprinted on the head"):
            Runner(ctx).run(Measure())


def test_a_command_over_one_target_refuses_a_list_in_one_line(tmp_path):
    code, out, err = run_cli(["select", "--out", str(tmp_path), "--profile", "cpu-ort,t4-trt-fp16",
                              "--latency-ms", "5"])  # fmt: skip
    assert_one_line_error(code, out, err, "works on one target", "--profile cpu-ort")
