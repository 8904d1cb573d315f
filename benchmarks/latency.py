"""Measured latency of a small ViT family on a target profile, with two self-checks.

Builds a DeiT-Tiny-sized ViT (random init: latency does not depend on weight values) and a few
narrowed variants -- smaller MLP ratios, fewer blocks, FFN-only blocks like DC-ViT's -- exports
each to ONNX with :func:`dcvit_deploy.export.onnx.export_onnx`, builds and measures them with the
profile's backend through the shared timing loop, and writes::

    benchmarks/results/latency_<profile>.json   every statistic, MACs, environment, checks
    benchmarks/results/latency_<profile>.md     latency vs MACs and speed-up vs the original

Two checks, measured in the same run and reported as ratios (pass: within ``--tolerance``):

* **cross-process**: the original model's ONNX file measured by two separate processes, one
  after the other; p50(second) / p50(first).
* **independent loop**: our ONNX Runtime timing against a minimal loop written without the
  project's code (``time.perf_counter`` around ``session.run``, median of N); p50(ours) /
  median(independent), on the same file and session options.

CPU only for the checks (they use ONNX Runtime). Usage::

    python benchmarks/latency.py                      # cpu-ort, 1 intra-op thread, 224x224
    python benchmarks/latency.py --threads 0          # ONNX Runtime's default threads
    python benchmarks/latency.py --img-size 64 --quick   # a fast smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from dcvit_deploy.store.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from dcvit_deploy.store.records import TargetProfile, to_dict  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- the model family


def make_family(img_size: int, quick: bool) -> dict[str, Any]:
    """name -> module: the DeiT-Tiny-sized original and narrowed variants (random init)."""
    import timm
    import torch
    from torch import nn

    class FFNOnly(nn.Module):
        """A block with its attention branch removed (DC-ViT's FFN-only block)."""

        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.norm2, self.mlp, self.ls2 = block.norm2, block.mlp, block.ls2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.ls2(self.mlp(self.norm2(x)))

    def vit(**kw: Any) -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=img_size, **kw
        ).eval()

    family: dict[str, Any] = {"original": vit()}
    family["mlp_ratio_3"] = vit(mlp_ratio=3.0)
    family["mlp_ratio_2"] = vit(mlp_ratio=2.0)
    if not quick:
        family["depth_9"] = vit(depth=9)
        ffn = vit()
        for i in (8, 9, 10, 11):  # DC-ViT removes attention in late blocks first
            ffn.blocks[i] = FFNOnly(ffn.blocks[i])
        family["ffn_only_4"] = ffn
        family["mlp_ratio_2_depth_9"] = vit(mlp_ratio=2.0, depth=9)
    return family


def count_macs(model: Any, img_size: int) -> dict[str, int]:
    """Per-image MACs: Linear and Conv layers by forward hooks, plus the attention matmuls
    (QK^T and AV: 2 x tokens^2 x dim per attention module still present)."""
    import torch
    from torch import nn

    linear = 0

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal linear
        if isinstance(module, nn.Linear):
            linear += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            linear += output.numel() * module.in_channels // module.groups * k

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    with torch.inference_mode():
        tokens = model.patch_embed(torch.zeros(1, 3, img_size, img_size)).shape[1] + 1
        linear = 0
        model(torch.zeros(1, 3, img_size, img_size))
    for h in handles:
        h.remove()
    attention = sum(
        2 * tokens * tokens * m.qkv.in_features for m in model.modules() if hasattr(m, "qkv")
    )
    params = sum(p.numel() for p in model.parameters())
    return {"linear_conv": linear, "full": linear + attention, "params": params}


# --------------------------------------------------------------------------- measurement


def benchmark_profile(name: str, threads: int) -> TargetProfile:
    from dcvit_deploy.config.profiles import load_profile

    profile = load_profile(name)
    if profile.backend == "onnxruntime" and threads >= 0:
        options = {**profile.backend_options, "intra_op_num_threads": threads}
        profile = dataclasses.replace(profile, backend_options=options)
    return profile


def measure_file(onnx_path: Path, profile: TargetProfile, out_dir: Path, name: str) -> Any:
    from dcvit_deploy.backends import get_backend

    backend = get_backend(profile.backend)
    artifact = backend.build(onnx_path, profile, out_dir, candidate=name)
    return artifact, backend.measure(artifact, profile, profile.budget_batch_size)


def independent_loop_ms(onnx_path: Path, threads: int, iters: int, warmup: int) -> float:
    """Median of a plain perf_counter loop around session.run -- no project code involved."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((1, *inp.shape[1:]), dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


def measure_in_subprocess(onnx_path: Path, profile_name: str, threads: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure-one",
        str(onnx_path),
        "--profile",
        profile_name,
        "--threads",
        str(threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed: {done.stderr.strip()[-500:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def ratio_check(a: float, b: float, tolerance: float) -> dict[str, Any]:
    ratio = b / a
    return {"first_ms": a, "second_ms": b, "ratio": ratio, "passed": abs(ratio - 1.0) <= tolerance}


# --------------------------------------------------------------------------- reports


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    env = report["environment"]
    prof = report["profile"]
    lines = [
        f"# Latency on `{prof['name']}`",
        "",
        f"{prof['description']}. Batch {prof['budget_batch_size']}, statistic "
        f"{prof['statistic']}, scope {prof['scope']}, intra-op threads {report['threads']}, "
        f"input {report['img_size']}x{report['img_size']}.",
        f"CPU: {env['cpu']['model']} ({env['cpu']['count_usable']} usable cores); "
        f"onnxruntime {env['packages']['onnxruntime']}, torch {env['packages']['torch']}. "
        f"1-min load average {report['load_average_1min']['start']} at the start, "
        f"{report['load_average_1min']['end']} at the end.",
        "Random-init weights (latency does not depend on values). MACs per image: Linear/Conv "
        "layers plus attention matmuls.",
        "",
        f"Each model was measured in {report['rounds']} rounds over the whole family; the table "
        "shows its median round (all rounds' p50 in the JSON).",
        "",
        "| model | params (M) | MACs (G) | MACs vs original | p50 ms | p90 ms | p99 ms | CoV | "
        "stable | speed-up (p50) | 1 / MAC ratio | p50 of each round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---|",
    ]
    for m in report["models"]:
        s = m["stats"]
        lines.append(
            f"| {m['name']} | {m['macs']['params'] / 1e6:.2f} | {m['macs']['full'] / 1e9:.3f} | "
            f"{m['macs_ratio']:.2f} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} | "
            f"{s['cov']:.1%} | {'yes' if s['stable'] else 'NO'} | {m['speedup']:.2f}x | "
            f"{1 / m['macs_ratio']:.2f}x | {', '.join(f'{v:.2f}' for v in m['p50_rounds'])} |"
        )
    checks = report["checks"]
    cp, il = checks["cross_process"], checks["independent_loop"]
    tol = checks["tolerance"]
    lines += [
        "",
        f"Across the family, p50 latency vs MACs has Pearson r = "
        f"{report['macs_latency_correlation']:.3f}; the measured speed-up differs from the MAC "
        f"ratio's prediction by up to {_max_deviation(report['models']):.0%} on this CPU "
        "(a single-threaded CPU run is close to compute-bound; other targets need their own "
        "measurement).",
        "",
        f"## Checks (pass within {tol:.0%})",
        "",
        "| check | first | second | ratio | result |",
        "|---|---:|---:|---:|:---:|",
        f"| same ONNX file, two processes (p50) | {cp['first_ms']:.3f} ms | "
        f"{cp['second_ms']:.3f} ms | {cp['ratio']:.3f} | {'pass' if cp['passed'] else 'FAIL'} |",
        f"| independent perf_counter loop (median) vs ours (p50) | {il['first_ms']:.3f} ms | "
        f"{il['second_ms']:.3f} ms | {il['ratio']:.3f} | {'pass' if il['passed'] else 'FAIL'} |",
        "",
        f"Generated by `benchmarks/latency.py` in {report['wall_seconds']:.0f} s.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _max_deviation(models: list[dict[str, Any]]) -> float:
    return max(abs(m["speedup"] * m["macs_ratio"] - 1.0) for m in models)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def pearson(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    return float(statistics.correlation(xs, ys))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu-ort")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0: default)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--quick", action="store_true", help="three models only")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3, help="measurements per model (median)")
    parser.add_argument("--independent-iters", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--measure-one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(max(args.threads, 1))
    profile = benchmark_profile(args.profile, args.threads)

    if args.measure_one is not None:  # child process of the cross-process check
        with tempfile.TemporaryDirectory() as tmp:
            _, stats = measure_file(args.measure_one, profile, Path(tmp), "child")
        print(json.dumps(to_dict(stats)))
        return 0

    from dcvit_deploy.export.onnx import export_onnx
    from dcvit_deploy.latency.machine import capture_environment

    t_start = time.perf_counter()
    load_start = _load_average()
    models: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        family = make_family(args.img_size, args.quick)
        original_onnx = work / "original.onnx"  # the first family member
        for name, model in family.items():
            onnx_path = work / f"{name}.onnx"
            exported = export_onnx(model, onnx_path, input_shape=(3, args.img_size, args.img_size))
            models.append(
                {
                    "name": name,
                    "macs": count_macs(model, args.img_size),
                    "onnx_sha256": exported.sha256,
                    "export_seconds": round(exported.export_seconds, 2),
                    "exporter": exported.exporter,
                    "path": onnx_path,
                    "rounds": [],
                }
            )
        # Rounds over the whole family: a burst of load from other processes then hits one
        # round of a model, not all of its numbers; each model reports its median round.
        for r in range(args.rounds):
            for m in models:
                artifact, stats = measure_file(m["path"], profile, work / "artifacts", m["name"])
                m["build_seconds"] = round(artifact.build_seconds, 3)
                m["rounds"].append(stats)
                print(
                    f"round {r + 1} {m['name']:>20}: {m['macs']['full'] / 1e9:6.3f} GMACs  "
                    f"p50 {stats.p50:7.3f} ms  cov {stats.cov:5.1%}  windows {stats.windows}  "
                    f"stable {stats.stable}",
                    flush=True,
                )
        for m in models:
            rounds = sorted(m.pop("rounds"), key=lambda s: s.p50)
            m["stats"] = to_dict(rounds[(len(rounds) - 1) // 2])
            m["p50_rounds"] = [round(s.p50, 4) for s in rounds]
            del m["path"]
        base = models[0]
        for m in models:
            m["macs_ratio"] = m["macs"]["full"] / base["macs"]["full"]
            m["speedup"] = base["stats"]["p50"] / m["stats"]["p50"]

        # Check 1: the same file in two separate processes, run one after the other.
        first = measure_in_subprocess(original_onnx, args.profile, args.threads)
        second = measure_in_subprocess(original_onnx, args.profile, args.threads)
        cross = ratio_check(first["p50"], second["p50"], args.tolerance)
        # Check 2: ours vs a minimal independent loop, back to back in this process.
        _, ours = measure_file(original_onnx, profile, work / "check", "original")
        plain = independent_loop_ms(
            original_onnx, args.threads, iters=args.independent_iters, warmup=20
        )
        loop = ratio_check(plain, ours.p50, args.tolerance)
        print(f"cross-process p50 ratio {cross['ratio']:.3f}; ours/independent {loop['ratio']:.3f}")

    report = {
        "schema": 1,
        "profile": to_dict(profile),
        "threads": args.threads,
        "rounds": args.rounds,
        "img_size": args.img_size,
        "models": models,
        "macs_latency_correlation": pearson(
            [m["macs"]["full"] for m in models], [m["stats"]["p50"] for m in models]
        ),
        "checks": {"tolerance": args.tolerance, "cross_process": cross, "independent_loop": loop},
        "environment": capture_environment(),
        # Other processes on the machine are the main source of CPU timing noise: record them.
        "load_average_1min": {"start": load_start, "end": _load_average()},
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out: Path = args.out
    atomic_write_json(out / f"latency_{profile.name}.json", report)
    write_markdown(out / f"latency_{profile.name}.md", report)
    print(f"wrote {out / f'latency_{profile.name}.json'} and .md")
    return 0 if cross["passed"] and loop["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
