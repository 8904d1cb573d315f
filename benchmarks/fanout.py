"""Fan-out: the same dense family built by the local executor and by Ray with two workers on
this machine, then one Ray run deploying it to three CPU targets.

Both family runs use one torch thread per finetune task (``--task-cpus 1``), so their weights
must be byte-identical (checked); the local executor runs the tasks one after another, Ray two
at a time. For context the local executor is also timed with every thread (its family may differ
in the last bits). The Ray cluster (2 CPUs, one ``target:<name>`` resource per CPU target) is
started and its two workers warmed before any timing; both are reported. The family is the
default procedure (shared ranking by re-fit + short finetune, one-shot targets, every
candidate trained: ``--train all``) on a random-init ViT over the bundled photos; family
seconds are the wall time of the job up to the trained family.

Writes ``benchmarks/results/fanout.json`` and ``.md``.
Usage: ``python benchmarks/fanout.py`` (minutes on 2 cores) or ``--smoke`` (a quick check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dcvit_deploy.api import CompressOptions, DeployOptions, run_pipeline
from dcvit_deploy.config.options import targets_from_text
from dcvit_deploy.latency.machine import cpu_model
from dcvit_deploy.model.images import write_demo_images
from dcvit_deploy.pipeline.executor import LocalExecutor, RayExecutor
from dcvit_deploy.store.atomic import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 0.65
PROFILE = """name = "{name}"
description = "ONNX Runtime CPU, {threads} thread(s), batch {batch}"
backend = "onnxruntime"
device = "cpu"
precision = "fp32"
batch_sizes = [{batch}]
budget_batch_size = {batch}
statistic = "p50"
scope = "host"

[backend_options]
intra_op_num_threads = {threads}
"""
TARGETS = {"ort-1t": (1, 1), "ort-2t": (2, 1), "ort-1t-b4": (1, 4)}  # name: (threads, batch)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def family(copts: CompressOptions, out: Path, executor: Any) -> dict[str, Any]:
    before = load()
    t0 = time.perf_counter()
    run_pipeline(copts, DeployOptions(), out, stop_after="family", executor=executor)
    wall = time.perf_counter() - t0
    units = json.loads((out / "manifest.json").read_text())["units"]
    trains = {u[len("train/") :]: r for u, r in units.items() if u.startswith("train/")}
    return {  # the family: its structures, then every one trained (the job stops after it)
        "family_seconds": round(wall, 1),
        "structures_seconds": units["family"]["seconds"],
        "load_before": before,
        "load_after": load(),
        "checksums": {n: r["result"]["weights_sha256"] for n, r in trains.items()},
    }


def warm_workers(ray: Any, n: int) -> float:
    """Start ``n`` workers with torch imported (a long-lived cluster has them already)."""
    t0 = time.perf_counter()

    @ray.remote(num_cpus=1)
    def ready() -> int:
        import torch

        time.sleep(1.0)  # hold the CPU so the next task starts a second worker
        return torch.get_num_threads()

    ray.get([ready.remote() for _ in range(n)])
    return round(time.perf_counter() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--targets", default="10%:40%:10%")
    ap.add_argument("--iterations", type=int, default=200, help="finetune steps per target")
    ap.add_argument("--rank-iterations", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="finetune batch size")
    ap.add_argument("--metric-set", choices=["synthetic", "real"], default="synthetic")
    ap.add_argument("--inversion-iterations", type=int, help="default: the product's (fast)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: checks, not timings")
    args = ap.parse_args()
    if args.smoke:
        args.depth, args.img_size, args.targets = 4, 32, "10%,25%"
        args.iterations, args.rank_iterations, args.batch, args.inversion_iterations = 4, 2, 4, 2
    import ray

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo_images(root / "imgs", 48)
        copts = CompressOptions(
            model="vit_tiny_patch16_224",
            data=str(root / "imgs"),
            random_init=True,
            model_kwargs={
                "img_size": args.img_size,
                "patch_size": 8,
                "depth": args.depth,
                "num_classes": 10,
            },
            num_samples=32,
            holdout=8,
            targets=targets_from_text(args.targets),
            schedule="default",
            iterations=args.iterations,
            rank_iterations=args.rank_iterations,
            batch_size=args.batch,
            metric=args.metric_set,
            inversion_iterations=args.inversion_iterations,
            train="all",  # the whole family is trained: the fan-out is of its finetunes
        )
        profiles = []
        for name, (threads, batch) in TARGETS.items():
            path = root / f"{name}.toml"
            path.write_text(PROFILE.format(name=name, threads=threads, batch=batch))
            profiles.append(str(path))
        t_ray = time.perf_counter()
        ray.init(
            num_cpus=2,
            resources={f"target:{n}": 1 for n in TARGETS},
            include_dashboard=False,
            log_to_driver=False,
        )
        start_s = round(time.perf_counter() - t_ray, 1)
        warm_s = warm_workers(ray, 2)
        runs = {
            "local": family(copts, root / "local", LocalExecutor(task_cpus=1)),
            "ray_2workers": family(copts, root / "ray", RayExecutor(task_cpus=1)),
            "local_all_threads": family(copts, root / "local-all", LocalExecutor()),
        }
        t_fleet = time.perf_counter()
        fleet = run_pipeline(
            copts,
            DeployOptions(profile=",".join(profiles), speedup=1.2),
            root / "ray",
            executor=RayExecutor(task_cpus=1),
        ).fleet
        fleet_s = round(time.perf_counter() - t_fleet, 1)
        ray.shutdown()
    local, remote = runs["local"], runs["ray_2workers"]
    same = local["checksums"] == remote["checksums"]
    ratio = remote["family_seconds"] / local["family_seconds"]
    summary = {
        "family_seconds_local": local["family_seconds"],
        "family_seconds_ray_2workers": remote["family_seconds"],
        "ratio_ray_over_local": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "target_met": same and ratio <= TARGET_RATIO,
        "checksums_identical": same,
        "family_seconds_local_all_threads": runs["local_all_threads"]["family_seconds"],
        "checksums_identical_all_threads": runs["local_all_threads"]["checksums"]
        == local["checksums"],
        "candidates": len(local["checksums"]),
        "targets_measured": sum(1 for r in fleet.values() if r["measured"]),
        "ray_start_seconds": start_s,
        "ray_warm_workers_seconds": warm_s,
        "fleet_seconds": fleet_s,
    }
    result = {
        "benchmark": "fanout",
        "smoke": args.smoke,
        "settings": {k: v for k, v in vars(args).items() if k != "smoke"},
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count()},
        "summary": summary,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "checksums"} for k, v in runs.items()},
        "checksums": local["checksums"],
        "fleet": fleet,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "fanout.json", result)
    s = summary
    md = [
        "# Fan-out: one family locally and on Ray (2 workers), one fleet of CPU targets",
        "",
        f"{'SMOKE RUN (tiny settings: checks only, not timings). ' if args.smoke else ''}"
        f"ViT depth {args.depth}, {args.img_size}px, targets {args.targets} ({s['candidates']} candidates), "
        f"default procedure, {args.iterations} finetune steps per target, {args.rank_iterations} per ranked block, "
        f"batch {args.batch}, {args.metric_set} metric set; {result['machine']['cpu']}, {result['machine']['cpus']} CPUs.",
        "",
        "| run | family s | of which structures s | load before -> after | weights |",
        "|---|---|---|---|---|",
        *[
            f"| {k} | {v['family_seconds']:.1f} | {v['structures_seconds']:.1f} | {v['load_before']} -> {v['load_after']} | "
            f"{'identical to local' if v['checksums'] == local['checksums'] else 'differ from local'} |"
            for k, v in runs.items()
        ],
        "",
        f"- Ray / local (same task threads): **{s['ratio_ray_over_local']:.2f}x** (target <= {TARGET_RATIO}x: "
        f"{'met' if s['target_met'] else 'NOT met'}); weights identical: {'yes' if same else 'NO'}",
        f"- Ray cluster start {start_s} s and two warm workers {warm_s} s, not counted above",
        f"- fleet on Ray ({fleet_s} s, family reused): {s['targets_measured']} of {len(fleet)} targets measured",
        "",
        "| target | chosen | figure ms | spread ms | why |",
        "|---|---|---|---|---|",
        *[
            f"| {t} | {r['chosen']} | {r['figure_ms'] if r.get('figure_ms') is None else round(r['figure_ms'], 4)} | "
            f"{r['spread_ms'] if r.get('spread_ms') is None else round(r['spread_ms'], 4)} | {r['why']} |"
            for t, r in fleet.items()
        ],
        "",
    ]
    atomic_write_text(RESULTS / "fanout.md", "\n".join(md))
    print("\n".join(md))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
