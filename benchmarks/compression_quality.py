"""Compression-quality benchmark on Fashion-MNIST (real data, offline).

A 12-block ViT teacher is trained (and cached) on the 60k training images; 500 unlabeled
training images are the few-shot set. At ≈8.3%, 16.6%, 25% and 33% MAC reduction it compares,
on the 10k test set (top-1 and agreement with the teacher):

- DC-ViT family with reuse (ranking once, warm-started neighbours),
- DC-ViT compressed independently per target (own ranking, progressive from the teacher),
- PRACTISE-style whole-block dropping at matched MACs,
- DC-ViT surgery without finetuning (same blocks and widths, no training),
- neuron choice (random vs activation vs weight) for surgery without finetuning,

and reports the wall time of each candidate and of each family. Writes
``benchmarks/results/compression_quality.json`` and ``.md``.

Usage: ``python benchmarks/compression_quality.py [--quick]`` (``--quick``: a smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fmnist

from dcvit_deploy.atomic import atomic_write_json, atomic_write_text
from dcvit_deploy.compress.candidate import build_candidate
from dcvit_deploy.compress.family import FamilyConfig, compress_family
from dcvit_deploy.compress.finetune import FinetuneSchedule, train_transform
from dcvit_deploy.compress.macs import geometry_of
from dcvit_deploy.compress.metric_set import InversionSettings, load_or_synthesize
from dcvit_deploy.compress.plan import plan_structure
from dcvit_deploy.compress.surgery import apply_spec, compress_blocks, identity_spec, make_chooser
from dcvit_deploy.data import FewShotImages, input_fingerprint, list_images

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_NAME = fmnist.TEACHER_ARCH


def _targets(teacher: torch.nn.Module) -> list[float]:
    """k whole blocks' worth of MACs for k = 1..4 (8.3%, 16.6%, 25%, 33% on 12 blocks)."""
    g = geometry_of(teacher)
    spec = identity_spec(teacher, MODEL_NAME, {})
    block = g.block_macs(spec.blocks[0])[0]
    total = g.count(spec.blocks).linear_norm
    return [round(k * block / total, 6) for k in (1, 2, 3, 4)]


def _evaluate(
    model: torch.nn.Module, teacher: torch.nn.Module, images: Any, labels: Any
) -> dict[str, float]:
    """Top-1 and agreement on the test set, with the *teacher's* preprocessing for both (a
    candidate rebuilt from its spec carries timm's default config, not the benchmark's)."""
    cfg = fmnist.data_config_of(teacher)
    return {
        "top1": round(100 * fmnist.evaluate(model, images, labels, data_config=cfg), 2),
        "agreement": round(100 * fmnist.agreement(model, teacher, images, data_config=cfg), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny schedules and test subset (smoke run)"
    )
    ap.add_argument("--iterations", type=int, default=100, help="finetune steps per stage")
    ap.add_argument(
        "--rank-iterations", type=int, default=30, help="finetune steps per ranked block"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--inversion-iterations", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--skip", default="", help="comma list of arms to skip: independent,practise,neurons"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = {s for s in args.skip.split(",") if s}
    if args.quick:
        args.iterations, args.rank_iterations, args.inversion_iterations = 4, 2, 4

    t_all = time.perf_counter()
    teacher, info = fmnist.train_teacher()
    teacher.eval()
    test_x, test_y = fmnist.load_fmnist("test")
    if args.quick:
        test_x, test_y = test_x[:500], test_y[:500]
    cache = fmnist.CACHE_DIR
    few_dir = cache / "fewshot-500"
    if not few_dir.is_dir() or len(list(few_dir.glob("*.png"))) != 500:
        fmnist.write_fewshot_folder(few_dir, n=500, seed=0)
    paths = list(list_images(few_dir))
    dcfg = fmnist.data_config_of(teacher)
    teacher_eval = _evaluate(teacher, teacher, test_x, test_y)

    sched = FinetuneSchedule.default(
        len(paths), iterations=args.iterations, batch_size=args.batch_size, lr=args.lr
    )
    rank_sched = dataclasses.replace(
        sched,
        iterations=args.rank_iterations,
        lr_warmup_iterations=min(sched.lr_warmup_iterations, args.rank_iterations),
    )
    data = FewShotImages(paths, train_transform(sched, dcfg))
    data_fp = input_fingerprint(paths)
    teacher_fp = f"fmnist-teacher-{info.config.key()}"
    t0 = time.perf_counter()
    inv = InversionSettings.fast(iterations=args.inversion_iterations)
    metric = load_or_synthesize(
        cache / "metric_set",
        teacher_fp,
        teacher,
        dcfg["input_size"],
        dcfg["mean"],
        dcfg["std"],
        inv,
        seed=0,
    )
    metric_seconds = time.perf_counter() - t0
    targets = _targets(teacher)
    kwargs = fmnist.TEACHER_KWARGS
    tag = "quick" if args.quick else "full"
    work = cache / f"runs-{tag}"
    # Time every family from scratch: candidates resumed from an earlier run would cost nothing.
    shutil.rmtree(work, ignore_errors=True)

    def family(name: str, **cfg: Any) -> tuple[dict[str, Any], Any]:
        t = time.perf_counter()
        config = FamilyConfig(
            schedule=sched,
            rank_schedule=rank_sched,
            targets=tuple(targets),
            include_original=False,
            **cfg,
        )
        res = compress_family(
            teacher,
            model_name=MODEL_NAME,
            model_kwargs=kwargs,
            data=data,
            metric_images=metric.images,
            out_dir=work / name,
            config=config,
            teacher_fingerprint=teacher_fp,
            input_fingerprint=data_fp,
        )
        wall = time.perf_counter() - t
        rows = []
        for c in res.candidates:
            model = build_candidate(c, work / name / c.weights)
            rows.append(
                {
                    "name": c.name,
                    "target": round(100 * c.target_reduction, 2),
                    "reduction": round(100 * c.reduction, 2),
                    "reduction_full": round(100 * (1 - c.macs.full / c.base_macs.full), 2),
                    "params_m": round(c.macs.params / 1e6, 3),
                    "blocks": c.recipe.get("blocks") or c.recipe.get("dropped"),
                    "hidden": c.recipe.get("hidden"),
                    "seconds": c.recipe.get("seconds"),
                    **_evaluate(model, teacher, test_x, test_y),
                }
            )
            print(name, rows[-1], flush=True)
        return {
            "wall_seconds": round(wall, 1),
            "ranking_seconds": {k: round(v, 1) for k, v in res.seconds.items()},
            "finetune_steps": res.finetune_steps,
            "candidates": rows,
        }, res

    arms: dict[str, Any] = {}
    arms["dcvit_reuse"], reuse_res = family("dcvit_reuse", reuse=True)
    if "independent" not in skip:
        arms["dcvit_independent"], _ = family("dcvit_independent", reuse=False)
    if "practise" not in skip:
        arms["practise"], _ = family("practise", method="practise")

    # Surgery without finetuning: the reuse family's ranking and the planned widths, untrained.
    ranking = next(iter(reuse_res.rankings.values()))
    g = geometry_of(teacher)
    base_spec = identity_spec(teacher, MODEL_NAME, kwargs)
    nofin = []
    choices = ("random",) if "neurons" in skip else ("random", "activation", "weight")
    holdout = fmnist.to_model_input(test_x[:256], dcfg) if "neurons" not in skip else None
    for choice in choices:
        chooser = make_chooser(choice, teacher, seed=0, images=holdout)  # type: ignore[arg-type]
        for t in targets:
            plan = plan_structure(g, 12, t, max_blocks=10)
            spec = compress_blocks(base_spec, ranking.order[: plan.n_blocks], plan.hidden, chooser)
            model = apply_spec(teacher, spec)
            nofin.append(
                {
                    "neuron_choice": choice,
                    "target": round(100 * t, 2),
                    "n_blocks": plan.n_blocks,
                    "hidden": plan.hidden,
                    **_evaluate(model, teacher, test_x, test_y),
                }
            )
            print("no-finetune", nofin[-1], flush=True)
    arms["surgery_no_finetune"] = {"candidates": nofin}

    result = {
        "benchmark": "compression_quality",
        "quick": args.quick,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
        },
        "teacher": {
            "arch": MODEL_NAME,
            "kwargs": kwargs,
            **teacher_eval,
            "train_info": info.to_dict(),
        },
        "fewshot_images": len(paths),
        "test_images": len(test_y),
        "schedule": sched.to_dict(),
        "rank_schedule": rank_sched.to_dict(),
        "metric_set": {
            "source": metric.source,
            "iterations": inv.iterations,
            "seconds": round(metric_seconds, 1),
            "teacher_top1_on_targets": metric.teacher_top1_on_targets,
            "from_cache": metric.from_cache,
        },
        "targets_pct": [round(100 * t, 2) for t in targets],
        "arms": arms,
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if not args.quick else "_quick"
    atomic_write_json(RESULTS / f"compression_quality{suffix}.json", result)
    atomic_write_text(RESULTS / f"compression_quality{suffix}.md", render_markdown(result))
    print(render_markdown(result))


def render_markdown(r: dict[str, Any]) -> str:
    """The summary table: per target, top-1 / agreement of each arm, plus costs and checks."""
    t = r["teacher"]
    lines = [
        "# Compression quality — Fashion-MNIST, 12-block ViT teacher",
        "",
        f"Teacher `{t['arch']}` {t['kwargs']}: top-1 **{t['top1']}%** on {r['test_images']} test images. "
        f"Few-shot set: {r['fewshot_images']} unlabeled training images. Finetune per stage: "
        f"{r['schedule']['iterations']} steps, batch {r['schedule']['batch_size']}, lr {r['schedule']['lr']}; "
        f"ranking: {r['rank_schedule']['iterations']} steps per block; metric set: {r['metric_set']['source']} "
        f"({r['metric_set']['iterations']} inversion steps). Machine: {r['machine']}.",
        "",
        "| target MACs ↓ | method | achieved ↓ (linear+norm / full) | params (M) | top-1 % | Δ vs teacher | agreement % | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {
        "dcvit_reuse": "DC-ViT (family, reuse)",
        "dcvit_independent": "DC-ViT (independent)",
        "practise": "PRACTISE block drop",
    }
    for i, target in enumerate(r["targets_pct"]):
        for arm, label in labels.items():
            if arm not in r["arms"]:
                continue
            rows = r["arms"][arm]["candidates"]
            row = rows[min(i, len(rows) - 1)]
            lines.append(
                f"| {target:.1f}% | {label} | {row['reduction']:.1f}% / {row['reduction_full']:.1f}% | {row['params_m']} | "
                f"{row['top1']:.2f} | {row['top1'] - t['top1']:+.2f} | {row['agreement']:.2f} | {row['seconds'] or 0:.0f} |"
            )
        for row in r["arms"]["surgery_no_finetune"]["candidates"]:
            if row["target"] == target and row["neuron_choice"] == "random":
                lines.append(
                    f"| {target:.1f}% | surgery, no finetune | | | {row['top1']:.2f} | "
                    f"{row['top1'] - t['top1']:+.2f} | {row['agreement']:.2f} | 0 |"
                )
    lines += ["", "## Family cost", "", "| family | wall s | finetune steps |", "|---|---|---|"]
    for arm, label in labels.items():
        if arm in r["arms"]:
            a = r["arms"][arm]
            lines.append(f"| {label} | {a['wall_seconds']} | {a['finetune_steps']} |")
    if "dcvit_independent" in r["arms"]:
        ru, ind = r["arms"]["dcvit_reuse"], r["arms"]["dcvit_independent"]
        ratio = ru["wall_seconds"] / ind["wall_seconds"]
        diffs = [
            a["top1"] - b["top1"] for a, b in zip(ru["candidates"], ind["candidates"], strict=False)
        ]
        lines += [
            "",
            f"Reuse / independent wall time: **{ratio:.2f}** (target ≤ 0.40); top-1 difference per target "
            f"(reuse − independent): {', '.join(f'{d:+.2f}' for d in diffs)} (target within ±0.5).",
        ]
    lines += [
        "",
        "## Neuron choice, surgery without finetuning (top-1 %)",
        "",
        "| target | "
        + " | ".join(
            sorted({row["neuron_choice"] for row in r["arms"]["surgery_no_finetune"]["candidates"]})
        )
        + " |",
    ]
    choices = sorted(
        {row["neuron_choice"] for row in r["arms"]["surgery_no_finetune"]["candidates"]}
    )
    lines.append("|---|" + "---|" * len(choices))
    for target in r["targets_pct"]:
        vals = {
            row["neuron_choice"]: row["top1"]
            for row in r["arms"]["surgery_no_finetune"]["candidates"]
            if row["target"] == target
        }
        lines.append(
            f"| {target:.1f}% | "
            + " | ".join(f"{vals.get(c, float('nan')):.2f}" for c in choices)
            + " |"
        )
    lines += ["", f"Total benchmark wall time: {r['total_seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
