"""Measure first, train only what can be chosen: the whole family is measured as structures
(surgery + closed-form re-fit, no finetune), only the pick is finetuned, and the pick is
confirmed and published as its trained artifact. Latency is scripted by structure
(:func:`fakes.latency.scripted_latency`) so each decision is known in advance; the models, their
training, ONNX export, ONNX Runtime builds and verification are real."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from fakes.latency import scripted_latency
from fakes.runs import FAST_PROFILE, copts, dopts, manifest

from dcvit_deploy.api import run_pipeline, select_over_run
from dcvit_deploy.selection.reasons import render

PROFILE = FAST_PROFILE.replace('"test-cpu"', '"trust-cpu"').replace("[1, 2]", "[1]")
TARGETS = (0.10, 0.20, 0.30)  # dcvit-1003-..., dcvit-2000-..., dcvit-3004-...


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("prof") / "trust-cpu.toml"
    p.write_text(PROFILE)
    return str(p)


@pytest.fixture(scope="module")
def structures(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    """A run holding the family's structures only (ranking, surgery, re-fit: no finetune)."""
    out = tmp_path_factory.mktemp("structures") / "r"
    run_pipeline(copts(photo_dir, targets=TARGETS), dopts("cpu-ort"), out, stop_after="family")
    return out


@pytest.fixture
def finetunes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The candidates finetuned in this test (ranking finetunes are not candidates')."""
    from dcvit_deploy.compress import family

    calls: list[str] = []
    real = family.feature_mimic

    def counting(*a: Any, **k: Any) -> Any:
        calls.append("finetune")
        return real(*a, **k)

    monkeypatch.setattr(family, "feature_mimic", counting)
    return calls


@pytest.fixture
def script() -> Iterator[Any]:
    with scripted_latency() as s:
        yield s


def copy_of(run: Path, tmp_path: Path, name: str = "r") -> Path:
    out = tmp_path / name
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".lock", ".lock.json"))
    return out


def names(out: Path) -> list[str]:
    return [c["name"] for c in manifest(out)["units"]["family"]["result"]["candidates"]]


def trained(out: Path) -> dict[str, str]:
    """Trained candidate -> trained weights' checksum, as the train units recorded them."""
    units = manifest(out)["units"]
    return {
        u.split("/", 1)[1]: r["result"]["weights_sha256"]
        for u, r in units.items()
        if u.startswith("train/") and r["status"] == "ok"
    }


def job(photo_dir: Path, profile: str, **budget: Any) -> tuple[Any, Any]:
    train = budget.pop("train", "pick")
    return copts(photo_dir, targets=TARGETS, train=train), dopts(profile, **budget)


BUDGETS = (0.95, 0.85, 1.5, 0.5)  # ms; p50 = retained MACs


def test_measure_first_picks_what_training_everything_picks_and_trains_only_the_pick(
    structures, photo_dir, profile, script, finetunes, tmp_path
):
    lazy = copy_of(structures, tmp_path, "lazy")
    c10, c20, c30 = names(lazy)[1:]
    first = run_pipeline(*job(photo_dir, profile, latency_ms=BUDGETS[0]), lazy)
    assert first.selection.chosen == c10 and len(finetunes) == 1  # the pick, nothing else
    assert set(trained(lazy)) == {c10}
    on = {o.candidate: (o.measured_on, o.trained) for o in first.outcomes}
    assert on == {"original": ("trained", True), c10: ("trained", True),
                  **{c: ("structure", False) for c in (c20, c30)}}  # fmt: skip
    report = json.loads((lazy / "report.json").read_text())
    assert {c["candidate"]: c["measured_on"] for c in report["candidates"]}[c10] == "trained"
    deployed = next((lazy / "triton").rglob("deploy.json"))
    assert json.loads(deployed.read_text())["source"]["file_name"] == f"{c10}.trained.onnx"
    first_train = manifest(lazy)["units"][f"train/{c10}"]
    # what was measured is what ships, node for node: the structure's graph is the trained one's
    # (a random teacher's zero biases used to fold away in the structure's graph only)
    ops = [Counter(n.op_type for n in onnx.load(lazy / "onnx" / "fp32" / f).graph.node)
           for f in (f"{c10}.onnx", f"{c10}.trained.onnx")]  # fmt: skip
    assert ops[0] == ops[1]

    # another budget: exactly one more candidate is trained; the first is reused as it is
    second = select_over_run(lazy, dopts(profile, latency_ms=BUDGETS[1]))
    assert second.selection.chosen == c20 and len(finetunes) == 2
    assert manifest(lazy)["units"][f"train/{c10}"] == first_train
    assert set(trained(lazy)) == {c10, c20}
    lazy_choice = {BUDGETS[0]: c10, BUDGETS[1]: c20}
    for ms in BUDGETS[2:]:
        lazy_choice[ms] = select_over_run(lazy, dopts(profile, latency_ms=ms)).selection.chosen
    assert len(finetunes) == len(set(lazy_choice.values()) - {None, "original"})

    eager = copy_of(structures, tmp_path, "eager")
    before = len(finetunes)
    result = run_pipeline(*job(photo_dir, profile, latency_ms=BUDGETS[0], train="all"), eager)
    assert len(finetunes) - before == len(TARGETS)  # today's behaviour: every candidate,
    assert {o.measured_on for o in result.outcomes} == {"trained"}  # measured trained
    eager_choice = {
        ms: select_over_run(eager, dopts(profile, latency_ms=ms)).selection.chosen for ms in BUDGETS
    }
    assert eager_choice == lazy_choice
    assert lazy_choice[1.5] == "original" and lazy_choice[0.5] is None
    # one procedure, so the pick's trained weights are the same weights either way
    assert {n: trained(eager)[n] for n in trained(lazy)} == trained(lazy)


def below_the_floor(monkeypatch: pytest.MonkeyPatch, name: str) -> str:
    """Make the fidelity floors set ``name``'s trained artifact aside; the reason given."""
    from dcvit_deploy.selection import fidelity

    real, miss = fidelity.apply_floors, "agreement 40.0% misses --min-fidelity 60%"

    def floor(outcomes: Any, d: Any) -> Any:
        got, notes = real(outcomes, d)
        return [dataclasses.replace(o, status="below_floor", error=miss)
                if o.candidate == name else o for o in got], notes  # fmt: skip

    monkeypatch.setattr(fidelity, "apply_floors", floor)
    return miss


def test_a_pick_that_misses_the_fidelity_floor_makes_the_next_one_train(
    structures, photo_dir, profile, script, finetunes, tmp_path, monkeypatch
):
    out = copy_of(structures, tmp_path)
    c10, c20 = names(out)[1:3]
    miss = below_the_floor(monkeypatch, c10)
    result = run_pipeline(*job(photo_dir, profile, latency_ms=0.95), out)
    assert result.selection.chosen == c20 and len(finetunes) == 2
    assert result.selection.reasons[c10].kind == "not_deployable"
    why = render(result.selection, c10)
    assert why == f"not deployable: trained artifact below the floor: {miss}"
    assert set(trained(out)) == {c10, c20}
    assert result.published["models"][0]["candidate"] == c20


def test_interrupting_the_training_of_the_pick_resumes_it(
    structures, photo_dir, profile, script, finetunes, tmp_path, monkeypatch
):
    from dcvit_deploy.compress import family

    out = copy_of(structures, tmp_path)
    c10 = names(out)[1]
    counting = family.feature_mimic

    def interrupted(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(family, "feature_mimic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(*job(photo_dir, profile, latency_ms=0.95), out)
    units = manifest(out)["units"]
    assert units[f"train/{c10}"]["status"] == "interrupted"
    measured = units["profile/trust-cpu"]
    structures_written = {p.name: p.stat().st_mtime_ns for p in (out / "family").iterdir()}
    monkeypatch.setattr(family, "feature_mimic", counting)
    result = run_pipeline(*job(photo_dir, profile, latency_ms=0.95), out)
    assert result.selection.chosen == c10 and len(finetunes) == 1  # the pick's training only
    assert manifest(out)["units"]["profile/trust-cpu"] == measured  # nothing measured again
    for name, mtime in structures_written.items():
        assert (out / "family" / name).stat().st_mtime_ns == mtime
    assert set(trained(out)) == {c10}


def test_a_new_schedule_trains_the_pick_again_though_its_structure_is_the_same(
    structures, photo_dir, profile, script, finetunes, tmp_path
):
    """The structure's bytes, and so every measurement, do not depend on the finetune
    schedule; the trained pick does: it is trained again, and that is what is published."""
    out = copy_of(structures, tmp_path)
    c10 = names(out)[1]
    c, d = job(photo_dir, profile, latency_ms=0.95)
    c = dataclasses.replace(c, rank_iterations=2)  # the ranking does not follow --iterations
    run_pipeline(c, d, out)
    before, measured = trained(out)[c10], manifest(out)["units"]["profile/trust-cpu"]
    result = run_pipeline(dataclasses.replace(c, iterations=3), d, out)
    assert result.selection.chosen == c10 and len(finetunes) == 2
    assert trained(out)[c10] != before
    assert manifest(out)["units"]["profile/trust-cpu"] == measured  # nothing measured again
    built = manifest(out)["units"][f"build/trust-cpu/{c10}.trained"]["result"]["artifact"]
    versions = [p for p in (out / "triton").rglob("deploy.json") if p.parent.name.isdigit()]
    newest = max(versions, key=lambda p: int(p.parent.name))
    assert json.loads(newest.read_text())["sha256"] == built["sha256"]


def test_the_confirmation_measures_the_trained_artifact(
    structures, photo_dir, profile, script, finetunes, tmp_path
):
    """A trained artifact scripted 0.02 ms slower than its structure: the confirmation sees the
    trained artifact, says the figures differ, and the published figure is the trained one; at
    0.06 ms slower the trained pick misses the budget and the next candidate is trained."""
    out = copy_of(structures, tmp_path)
    c10, c20 = names(out)[1:3]
    script.trained_offset = 0.02
    result = run_pipeline(*job(photo_dir, profile, latency_ms=0.95, confirm=True), out)
    assert result.selection.chosen == c10
    confirmed = script.confirmed[0][c10]
    built = manifest(out)["units"][f"build/trust-cpu/{c10}.trained"]["result"]["artifact"]
    assert confirmed.candidate == f"{c10}.trained" and confirmed.sha256 == built["sha256"]
    structure_ms, trained_ms = 1 - int(c10.split("-")[1]) / 1e4, 1.02 - int(c10.split("-")[1]) / 1e4
    assert result.selection.figures[c10][0] == pytest.approx(structure_ms)
    assert result.selection.confirmed[c10][0] == pytest.approx(trained_ms)
    assert any("differ beyond both spreads" in n for n in result.selection.notes)
    chosen = next(o for o in result.outcomes if o.candidate == c10)
    assert chosen.latency_at(1).p50 == pytest.approx(trained_ms) and chosen.measured_on == "trained"
    deployed = json.loads(next((out / "triton").rglob("deploy.json")).read_text())
    assert deployed["latency"][0]["p50"] == pytest.approx(trained_ms)

    script.trained_offset = 0.06  # now the trained c10 no longer fits 0.95 ms
    again = select_over_run(out, dopts(profile, latency_ms=0.951, confirm=True))
    assert again.selection.chosen == c20 and len(finetunes) == 2
    assert again.selection.reasons[c10].kind == "confirmation_failed"


def test_prefer_fidelity_trains_a_bounded_set(
    structures, photo_dir, profile, script, finetunes, tmp_path
):
    """Every candidate fits: --prefer fidelity compares the COMPARE_TOP_K densest (the original
    needs no training), chooses the most faithful of them, and never trains the rest."""
    from dcvit_deploy.selection.decide import COMPARE_TOP_K

    out = copy_of(structures, tmp_path)
    result = run_pipeline(*job(photo_dir, profile, latency_ms=1.5, prefer="fidelity"), out)
    family = names(out)
    assert len(family) > COMPARE_TOP_K and set(trained(out)) == set(family[1:COMPARE_TOP_K])
    assert len(finetunes) == COMPARE_TOP_K - 1
    fidelity = {o.candidate: o.fidelity for o in result.outcomes if o.trained}
    best = max(fidelity.values())
    assert result.selection.chosen == next(n for n in family if fidelity.get(n) == best)


def test_bisect_makes_only_the_artifacts_it_measures(
    photo_dir, profile, script, finetunes, tmp_path
):
    """A dense family under ``--search bisect``: each precision is searched on its own and only
    what the search reaches is exported, quantized and built; it chooses what deciding over
    every artifact would, and a later run with the same budget reuses the search."""
    from dcvit_deploy.config.profiles import load_profile
    from dcvit_deploy.pipeline.outcomes import outcomes_for
    from dcvit_deploy.pipeline.units.compressing import current_family
    from dcvit_deploy.selection.decide import decide
    from dcvit_deploy.store.records import LatencyBudget
    from dcvit_deploy.store.rundir import RunDir

    prof = Path(profile).with_name("bisect-cpu.toml")
    two = 'precision = "fp32"\nprecisions = ["fp32", "int8"]'
    prof.write_text(
        PROFILE.replace('"trust-cpu"', '"bisect-cpu"').replace('precision = "fp32"', two)
    )
    targets = (0.08, 0.12, 0.16, 0.20, 0.24, 0.28, 0.32, 0.36, 0.40)
    out = tmp_path / "r"
    budget = {"latency_ms": 0.62, "margin": 0.0}  # only the 40% structure fits (0.60 ms)
    got = run_pipeline(
        copts(photo_dir, targets=targets), dopts(str(prof), search="bisect", **budget), out
    )
    units = manifest(out)["units"]
    family = names(out)
    made = {u.split("/")[-1] for u in units if u.startswith("build/bisect-cpu/")}
    built_structures = {n for n in made if not n.endswith(".trained") and ".trained." not in n}
    assert got.selection.chosen == family[-1] and got.selection.search == "bisect"
    assert len(built_structures) <= len(family), sorted(made)  # half the 2 x 10 artifacts
    assert family[-1] in built_structures and "original" not in built_structures  # ms budget
    assert got.selection.reasons[family[1]].kind == "not_searched"  # said so, not "failed"
    assert any(n.endswith(".int8") for n in built_structures)  # the int8 chain has its own search
    exports = [u for u in units if u.startswith("export/") and not u.endswith(".trained")]
    assert len(exports) == len({n.split(".")[0] for n in built_structures})
    assert set(trained(out)) == {family[-1]} and len(finetunes) == 1
    # the CPU's INT8 method was measured once; the trained pick's INT8 graph followed it
    quantized = {u: r["result"] for u, r in units.items() if u.startswith("quantize/")}
    assert f"quantize/bisect-cpu/int8/{family[-1]}.trained" in quantized
    assert sum(bool(r["method_timing_ms"]) for r in quantized.values()) == 1, quantized
    # the same choice as deciding over every artifact's (scripted) figure
    every = {n: 1.0 if n == "original" else 1.0 - int(n.split("-")[1]) / 10000 for n in family}
    assert min((n for n in family if every[n] <= 0.62), key=every.get) == family[-1]
    with RunDir.load(out, lock=False) as run:
        outs = outcomes_for(run, current_family(run), load_profile(str(prof)))
    left = [o for o in outs if o.status == "not_measured"]
    assert left and all(o.artifact is None for o in left)  # unmade, not failed
    assert decide(outs, LatencyBudget(ms=0.62, statistic="p50", batch_size=1)).chosen == family[-1]
    before = dict(units)
    again = run_pipeline(
        copts(photo_dir, targets=targets), dopts(str(prof), search="bisect", **budget), out
    )
    assert again.selection.chosen == family[-1] and len(finetunes) == 1
    assert manifest(out)["units"]["profile/bisect-cpu"] == before["profile/bisect-cpu"]  # reused
    # another budget: `select --search bisect` searches again, making what it now reaches
    assert f"build/bisect-cpu/{family[3]}" not in before
    wider = select_over_run(out, dopts(str(prof), search="bisect", latency_ms=0.85, margin=0.0))
    assert wider.selection.chosen == family[3]  # 0.8395 ms; 1204's 0.8796 is over
    assert f"build/bisect-cpu/{family[3]}" in manifest(out)["units"] and len(finetunes) == 2


def test_on_a_remote_executor_the_head_trains_what_the_target_chooses(
    structures, photo_dir, profile, script, finetunes, tmp_path, monkeypatch
):
    """The remote path (a node per target, which never trains) in this process: the node's
    choice goes back to the head untrained, the head trains it and sends the target again; a
    trained pick below the floor makes the next choice train the same way."""
    from dcvit_deploy.pipeline.executor import LocalExecutor

    class Remote(LocalExecutor):
        name, remote = "in-process nodes", True

        def map(self, tasks: Any, allow_unplaceable: bool = False) -> Any:
            sent.extend(t.key for t in tasks)
            return super().map(tasks)

    sent: list[str] = []
    out = copy_of(structures, tmp_path)
    c10, c20 = names(out)[1:3]
    miss = below_the_floor(monkeypatch, c10)
    result = run_pipeline(*job(photo_dir, profile, latency_ms=0.95), out, executor=Remote())
    assert (
        render(result.selection, c10) == f"not deployable: trained artifact below the floor: {miss}"
    )
    assert result.selection.chosen == c20 and len(finetunes) == 2
    # the target measures and chooses c10; the head trains it; the target finds it below the
    # floor and chooses c20; the head trains it; the target confirms it
    assert sent == ["trust-cpu", c10, "trust-cpu", c20, "trust-cpu"]
    assert set(trained(out)) == {c10, c20}
    assert result.published["models"][0]["candidate"] == c20
    assert result.selection.reasons[c10].kind == "not_deployable"
