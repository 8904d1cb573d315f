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
    with pytest.raises(KeyboardInterrupt):  # a task started before the Ctrl-C ends 4 s later
        list(RayExecutor().map([Task("slow", slow_write, (str(marker), 4.0))]))
    time.sleep(5.0)  # so it would have finished by now had it not been cancelled
    assert not marker.exists()
