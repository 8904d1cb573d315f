"""Importing the package and these modules must not import heavy or optional runtimes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

MODULES = [
    "dcvit_deploy",
    "dcvit_deploy.export.onnx",
    "dcvit_deploy.latency.loop",
    "dcvit_deploy.latency.machine",
    "dcvit_deploy.config.profiles",
    "dcvit_deploy.backends",
    "dcvit_deploy.backends.base",
    "dcvit_deploy.backends.onnxruntime",
    "dcvit_deploy.backends.tensorrt",
    "dcvit_deploy.backends.pytorch",
]
HEAVY = ["tensorrt", "onnxruntime", "torch", "onnx", "timm", "pycuda"]


def test_imports_and_light_calls_stay_lazy() -> None:
    script = textwrap.dedent(
        f"""
        import importlib, json, sys
        for name in {MODULES!r}:
            importlib.import_module(name)
        # Light calls used by --help, `profiles` and `doctor` must stay lazy too.
        from dcvit_deploy.config.profiles import list_profiles, load_profile
        from dcvit_deploy.backends import doctor
        from dcvit_deploy.latency.machine import capture_environment
        for name in list_profiles():
            load_profile(name)
        doctor()
        capture_environment(cuda=False)
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"imported eagerly: {loaded}"
