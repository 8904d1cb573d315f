"""The executor seam: tasks on the shared local Ray cluster (``ray_cluster`` in conftest)
against the local executor."""

from __future__ import annotations

import copy
import os
import signal
import threading
import time

import pytest
import torch
from fakes.fleet import die_once, finetuned, slow_write

from dcvit_deploy.pipeline.executor import LocalExecutor, RayExecutor, Task


def test_a_killed_worker_is_retried_and_the_result_is_unchanged(ray_cluster, tiny_vit, tmp_path):
    student = copy.deepcopy(tiny_vit)
    with torch.no_grad():
        student.blocks[1].mlp.fc2.weight.mul_(0.5)  # something to recover
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    args = (tiny_vit, images, 7)
    local = Task("ft", finetuned, (copy.deepcopy(student), *args), threads=1)
    [(_, expected)] = LocalExecutor(1).map([local])
    marker = tmp_path / "killed"
    task = Task("ft", die_once, (str(marker), finetuned, student, *args), threads=1)
    [(_, weights)] = list(RayExecutor(task_cpus=1).map([task]))
    assert int(marker.read_text()) != os.getpid()  # the first attempt killed its own worker
    assert weights.keys() == expected.keys()
    moved = expected["blocks.1.mlp.fc1.weight"] - student.blocks[1].mlp.fc1.weight
    assert moved.abs().max() > 0  # the finetune did change the weights
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_ctrl_c_on_the_head_cancels_the_tasks(ray_cluster, tmp_path):
    marker = tmp_path / "finished"
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        list(RayExecutor().map([Task("slow", slow_write, (str(marker), 1.5))]))
    time.sleep(4.0)  # it would have finished by now had it not been cancelled
    assert not marker.exists()


def test_the_family_is_bit_identical_on_ray_and_locally(
    ray_cluster, photo_dir, tmp_path, monkeypatch
):
    """Ranking finetunes and one-shot targets ran as Ray tasks: same weights, byte for byte."""
    import json

    sent: list[str] = []
    original = RayExecutor.map

    def spy(self, tasks, **kw):
        sent.extend(t.key for t in tasks)
        return original(self, tasks, **kw)

    monkeypatch.setattr(RayExecutor, "map", spy)

    from dcvit_deploy.api import run_pipeline
    from dcvit_deploy.options import CompressOptions, DeployOptions

    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=10)
    copts = CompressOptions(model="vit_tiny_patch16_224", data=str(photo_dir), random_init=True,
                            model_kwargs=kwargs, schedule="tiny", iterations=2,
                            inversion_iterations=2, num_samples=4, holdout=2,
                            targets=(0.10, 0.25))  # fmt: skip
    sums = []
    for name, ex in (("local", LocalExecutor(1)), ("ray", RayExecutor(task_cpus=1))):
        run_pipeline(copts, DeployOptions(), tmp_path / name, stop_after="family", executor=ex)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        cands = manifest["units"]["family"]["result"]["candidates"]
        sums.append({c["name"]: c["weights_sha256"] for c in cands})
    assert len(sums[0]) == 3 and sums[0] == sums[1]
    ranked = [f"rank block {b}" for b in (1, 2)]  # tiny: blocks 1 and 2 of 4 are candidates
    assert sent == [*ranked, *[n for n in sums[1] if n != "original"]]
