"""Precision as a second axis of the family, on the Fashion-MNIST benchmark teacher (real data,
offline): FP32 and INT8 artifacts of every candidate, measured in the same interleaved rounds on
``cpu-ort``, top-1 of each on the labelled test set.

The whole product pipeline runs, as a user would run it: ``dcvit-deploy compress`` with the
cached teacher (``benchmarks/compression_quality.py``'s ``p7d48``, trained once under
``benchmarks/.cache``), 500 unlabeled few-shot images, ``--eval-data`` = the test set written
as class sub-folders, and no budget (every artifact is measured). Quantization, verification
by ONNX Runtime against PyTorch, the dynamic-vs-static decision and the top-1 per artifact are
the product's. The selections below replay the product's own :func:`dcvit_deploy.selection.decide.decide`
on the measured artifacts, once over the joint family (every precision) and once over the
structure-only family (FP32 artifacts), at relative budgets from 1.1x to 3x.

With ``--methods-study`` the family is also compressed with DC-ViT alone (``dcvit-deploy
family``), to compare its cost with the two-method family (``dcvit,practise``) the main run uses.

Writes ``benchmarks/results/precision_family.json`` (top-level ``summary``) and ``.md``; the
machine's CPU flags (INT8 speed depends on VNNI/AMX) and load are recorded with the figures.
Usage: ``python benchmarks/precision_family.py [--quick] [--methods-study]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fmnist

from dcvit_deploy.export.quantize import structure_of
from dcvit_deploy.reports.writers import load_report, report_outcomes
from dcvit_deploy.selection.decide import decide
from dcvit_deploy.store.atomic import atomic_write_json, atomic_write_text
from dcvit_deploy.store.records import CandidateOutcome, LatencyBudget

RESULTS = Path(__file__).resolve().parent / "results"
ARCH = "p7d48"
TEACHER_TRAIN = {"epochs": 4, "batch": 128, "lr": 1e-3, "warmup_steps": 100}
TARGETS = "10%:50%:5%"
SPEEDUPS = [round(1.1 + i * (3.0 - 1.1) / 9, 3) for i in range(10)]
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    present = set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())
    return [f for f in CPU_FLAGS if f in present]


def eval_folder(root: Path, n: int) -> Path:
    """The first ``n`` test images as 28x28 RGB PNGs in class sub-folders ``0`` .. ``9``."""
    import numpy as np
    from PIL import Image

    folder = root / f"eval-{n}"
    if (folder / "done").is_file():
        return folder
    images, labels = fmnist.load_fmnist("test")
    for i in range(n):
        sub = folder / str(int(labels[i]))
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(images[i][:, :, None], 3, axis=2)).save(sub / f"{i:05d}.png")
    (folder / "done").write_text("")
    return folder


def teacher_checkpoint(args: argparse.Namespace, cache: Path) -> tuple[Path, dict[str, Any]]:
    if args.quick:  # smoke run: an untrained teacher of the same shape
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        path = cache / "quick-untrained.safetensors"
        save_file(fmnist.build_teacher(fmnist.TEACHERS[ARCH]).state_dict(), str(path))
        return path, {"teacher": "untrained (quick)"}
    _, info = fmnist.train_teacher(arch=ARCH, threads=args.threads, **TEACHER_TRAIN)
    return info.weights_path, {"teacher": ARCH, "teacher_test_top1": info.test_top1}


def model_args(weights: Path) -> list[str]:
    kw = {k: v for k, v in fmnist.TEACHERS[ARCH].items() if k != "in_chans"}
    return [
        "--model", fmnist.TEACHER_ARCH, "--checkpoint", str(weights),
        "--model-kwargs", " ".join(f"{k}={v}" for k, v in kw.items()),
        "--mean", ",".join(map(str, fmnist.FMNIST_MEAN)),
        "--std", ",".join(map(str, fmnist.FMNIST_STD)),
        "--img-size", str(kw["img_size"]), "--crop-pct", "1.0", "--interpolation", "bilinear",
    ]  # fmt: skip


def cli(args: list[str]) -> float:
    """Run the product's CLI in this process; return its wall time."""
    from dcvit_deploy.cli import main

    t0 = time.perf_counter()
    try:
        main(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"dcvit-deploy {' '.join(args[:1])} exited {exc.code}") from None
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- the figures


def p50(o: CandidateOutcome) -> float:
    return o.latency_at(1).p50  # type: ignore[union-attr]


def top1(o: CandidateOutcome) -> float:
    assert o.closeness is not None and o.closeness.top1 is not None
    return 100 * o.closeness.top1


def summarize(outcomes: list[CandidateOutcome]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    ok = [o for o in outcomes if o.status == "ok" and o.latency_at(1) and o.closeness]
    by = {(structure_of(o.candidate), o.precision): o for o in ok}
    original = by[("original", "fp32")]
    ref_ms, ref_top1 = p50(original), top1(original)
    structures = sorted({s for s, _ in by}, key=lambda s: -by[(s, "fp32")].retained)
    pairs = [s for s in structures if (s, "int8") in by]
    rows = [
        {
            "artifact": o.candidate, "structure": structure_of(o.candidate), "method": o.method,
            "precision": o.precision, "retained": round(o.retained, 4),
            "p50_ms": round(p50(o), 4), "speedup": round(ref_ms / p50(o), 3),
            "top1": round(top1(o), 2), "top1_drop": round(ref_top1 - top1(o), 2),
            "agreement": round(100 * o.closeness.agreement, 2),  # type: ignore[union-attr]
            "kl": o.closeness.kl,  # type: ignore[union-attr]
        }
        for o in sorted(ok, key=lambda o: (-o.retained, o.precision))
    ]  # fmt: skip

    def fastest_within(pool: list[CandidateOutcome], points: float) -> float | None:
        fits = [ref_ms / p50(o) for o in pool if ref_top1 - top1(o) <= points]
        return round(max(fits), 3) if fits else None

    fp32 = [o for o in ok if o.precision == "fp32"]

    def replay(prefer: str) -> tuple[list[float | None], list[dict[str, Any]]]:
        """The product's choice at each budget, joint and structure-only, and top-1 minus."""
        diffs: list[float | None] = []
        choices = []
        for s in SPEEDUPS:
            budget = LatencyBudget(ms=ref_ms / s, statistic="p50", batch_size=1)
            joint = decide(ok, budget, prefer=prefer).chosen  # type: ignore[arg-type]
            alone = decide(fp32, budget, prefer=prefer).chosen  # type: ignore[arg-type]
            tj = round(top1(next(o for o in ok if o.candidate == joint)), 2) if joint else None
            ts = round(top1(next(o for o in ok if o.candidate == alone)), 2) if alone else None
            diffs.append(round(tj - ts, 2) if tj is not None and ts is not None else None)
            choices.append({"speedup": s, "joint": joint, "joint_top1": tj,
                            "structure_only": alone, "structure_only_top1": ts})  # fmt: skip
        return diffs, choices

    diffs, choices = replay("capacity")
    by_fidelity, fidelity_choices = replay("fidelity")
    numeric = [d for d in diffs if d is not None]
    numeric_f = [d for d in by_fidelity if d is not None]
    summary = {
        "int8_speedup_cpu": round(
            statistics.median(p50(by[(s, "fp32")]) / p50(by[(s, "int8")]) for s in pairs), 3
        ),
        "int8_top1_drop": {s: round(top1(by[(s, "fp32")]) - top1(by[(s, "int8")]), 2) for s in pairs},
        "joint_speedup_at_1pt": fastest_within(ok, 1.0),
        "structure_only_speedup_at_1pt": fastest_within(fp32, 1.0),
        "joint_minus_structure_only": diffs,
        "joint_minus_structure_only_min": min(numeric) if numeric else None,
        "joint_minus_structure_only_prefer_fidelity": by_fidelity,
        "joint_minus_structure_only_prefer_fidelity_min": min(numeric_f) if numeric_f else None,
        "budgets": SPEEDUPS,
        "choices": choices,
        "choices_prefer_fidelity": fidelity_choices,
        "original_p50_ms": round(ref_ms, 4),
        "original_top1": round(ref_top1, 2),
    }  # fmt: skip
    return summary, rows


def targets_met(s: dict[str, Any]) -> dict[str, bool | None]:
    drops = list(s["int8_top1_drop"].values())
    return {
        "int8_speedup_cpu >= 1.5": s["int8_speedup_cpu"] >= 1.5,
        "int8_top1_drop <= 0.5 (every structure)": max(drops) <= 0.5 if drops else None,
        "joint_speedup_at_1pt >= 2.5": (s["joint_speedup_at_1pt"] or 0) >= 2.5,
        "joint_minus_structure_only_min >= 0": (
            None
            if s["joint_minus_structure_only_min"] is None
            else s["joint_minus_structure_only_min"] >= 0
        ),
    }


def render(r: dict[str, Any]) -> str:
    s = r["summary"]
    lines = [
        "# Precision as a second axis: FP32 and INT8 artifacts of one family (Fashion-MNIST)",
        "",
        f"Machine: {r['machine']['cpu']} ({r['machine']['cores']} cores; flags "
        f"{', '.join(r['machine']['cpu_flags']) or 'none'}); load before/after "
        f"{r['machine']['load_before']} / {r['machine']['load_after']}.",
        f"Teacher: {r['setup']['teacher']}; {r['setup']['eval_images']} labelled test images; "
        f"targets {r['setup']['targets']}, methods {r['setup']['methods']}; profile cpu-ort "
        f"(1 thread). Run wall time {r['seconds']['compress']:.0f} s.",
        "",
        "## Summary",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    met = r["targets_met"]
    drops = s["int8_top1_drop"]
    worst = max(drops.values()) if drops else None
    lines += [
        f"| int8_speedup_cpu (median FP32/INT8 p50, DeiT-Tiny-sized family at 224) | "
        f"{s['int8_speedup_cpu']} | >= 1.5 | {met['int8_speedup_cpu >= 1.5']} |",
        f"| int8_speedup_cpu on the Fashion-MNIST teacher's family (48 wide, 17 tokens) | "
        f"{s['int8_speedup_cpu_fmnist_teacher']} | - | - |",
        f"| int8_top1_drop (worst structure, points) | {worst} | <= 0.5 | "
        f"{met['int8_top1_drop <= 0.5 (every structure)']} |",
        f"| joint_speedup_at_1pt | {s['joint_speedup_at_1pt']} | >= 2.5 | "
        f"{met['joint_speedup_at_1pt >= 2.5']} |",
        f"| structure_only_speedup_at_1pt | {s['structure_only_speedup_at_1pt']} | - | - |",
        f"| joint_minus_structure_only_min (points) | {s['joint_minus_structure_only_min']} | "
        f">= 0 | {met['joint_minus_structure_only_min >= 0']} |",
        "",
        f"INT8 method decided by measurement (Fashion-MNIST teacher): {r['int8_method']}; "
        f"DeiT-Tiny-sized: {r['deit_tiny']['int8_method']}. DeiT-Tiny-sized FP32/INT8 per "
        f"structure: {r['deit_tiny']['int8_speedup']}.",
        "",
        "## Budgets (product selection: densest artifact that fits)",
        "",
        "| speedup | joint choice | top-1 | structure-only choice | top-1 | joint - structure |",
        "|---|---|---|---|---|---|",
    ]
    for c, d in zip(s["choices"], s["joint_minus_structure_only"], strict=True):
        lines.append(f"| {c['speedup']} | {c['joint']} | {c['joint_top1']} | "
                     f"{c['structure_only']} | {c['structure_only_top1']} | {d} |")  # fmt: skip
    if "choices_prefer_fidelity" in s:
        lines += ["", "Same budgets with `--prefer fidelity` (lowest KL that fits): "
                  f"joint - structure {s['joint_minus_structure_only_prefer_fidelity']}, min "
                  f"{s['joint_minus_structure_only_prefer_fidelity_min']}; joint choices "
                  f"{[c['joint'] for c in s['choices_prefer_fidelity']]}."]  # fmt: skip
    lines += ["", "## Artifacts", "", "| artifact | method | precision | retained | p50 ms | "
              "speedup | top-1 | drop | agreement | KL |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for a in r["artifacts"]:
        lines.append(f"| {a['artifact']} | {a['method']} | {a['precision']} | "
                     f"{a['retained']:.1%} | {a['p50_ms']} | {a['speedup']} | {a['top1']} | "
                     f"{a['top1_drop']} | {a['agreement']} | {a['kl']:.3g} |")  # fmt: skip
    fp32 = [a for a in r["artifacts"] if a["precision"] == "fp32"]
    pairs = [(p, min((d for d in fp32 if d["method"] == "dcvit"),
                     key=lambda d: abs(d["retained"] - p["retained"]), default=None))
             for p in fp32 if p["method"] == "practise"]  # fmt: skip
    if pairs:
        lines += ["", "Block dropping vs the DC-ViT candidate of the nearest size (FP32 top-1): "
                  + "; ".join(f"{p['artifact']} {p['top1']} vs {d['artifact']} {d['top1']}"
                              for p, d in pairs if d)]  # fmt: skip
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    if "methods_study" in r:
        m = r["methods_study"]
        lines += ["", "## Methods", "", f"Family cost: DC-ViT alone {m['dcvit_s']:.0f} s, "
                  f"DC-ViT + block dropping {m['both_s']:.0f} s ({m['ratio']:.2f}x; keep both "
                  f"as the default if <= 1.5x)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def deit_tiny_latency(few: Path, targets: str, cache: Path, quick: bool) -> dict[str, Any]:
    """FP32 and INT8 p50 of a DeiT-Tiny-sized family at 224 on ``cpu-ort``, same rounds (random
    init: latency does not depend on the weights; the Fashion-MNIST teacher's 48-wide, 17-token
    matrices are too small for INT8 kernels to pay for their quantize steps)."""
    run = cache / ("precision-deit-tiny-quick" if quick else "precision-deit-tiny")
    kwargs = "num_classes=10" + (" img_size=64 depth=6" if quick else "")
    seconds = cli(["compress", "--model", "vit_tiny_patch16_224", "--random-init",
                   "--model-kwargs", kwargs, "--data", str(few), "--num-samples", "32",
                   "--schedule", "tiny", "--iterations", "2", "--inversion-iterations", "2",
                   "--targets", targets, "--profile", "cpu-ort", "--out", str(run),
                   "--overwrite"])  # fmt: skip
    ok = [o for o in report_outcomes(load_report(run / "report.json")) if o.status == "ok"]
    ms = {(structure_of(o.candidate), o.precision): p50(o) for o in ok if o.latency_at(1)}
    ratios = {s: round(ms[s, "fp32"] / t, 3) for (s, p), t in ms.items() if p == "int8"}
    units = json.loads((run / "manifest.json").read_text())["units"]
    decision = units.get("quantize/cpu-ort/int8/original", {}).get("result", {})
    return {
        "model": f"vit_tiny_patch16_224 ({kwargs}), random init",
        "int8_speedup": ratios,
        "median": round(statistics.median(ratios.values()), 3) if ratios else None,
        "fp32_p50_ms": {s: round(t, 3) for (s, p), t in ms.items() if p == "fp32"},
        "int8_method": {k: decision.get(k) for k in ("method", "method_timing_ms")},
        "seconds": round(seconds, 1),
    }


def main() -> None:
    if sys.argv[1:2] == ["--render"]:  # rewrite the Markdown from a results JSON
        path = Path(sys.argv[2])
        atomic_write_text(path.with_suffix(".md"), render(json.loads(path.read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: untrained teacher, 2 targets")
    ap.add_argument("--methods-study", action="store_true")
    ap.add_argument("--eval-images", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    cache = fmnist.CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    weights, setup = teacher_checkpoint(args, cache)
    few = cache / "fewshot-532-28"  # 500 few-shot images + 32 held out for verification
    if not few.is_dir() or len(list(few.glob("*.png"))) != 532:
        fmnist.write_fewshot_folder(few, n=532, seed=0, size=28)
    n_eval = 300 if args.quick else args.eval_images
    evals = eval_folder(cache, n_eval)
    targets = "20%,40%" if args.quick else TARGETS
    methods = "dcvit" if args.quick else "dcvit,practise"
    quick = ["--schedule", "tiny", "--iterations", "5", "--inversion-iterations", "5",
             "--num-samples", "100"]  # fmt: skip
    fast = quick if args.quick else ["--num-samples", "500"]
    run = cache / ("precision-quick" if args.quick else "precision")
    for old in cache.glob("precision*"):  # measure everything afresh (a resumed run reuses)
        shutil.rmtree(old)
    common = [*model_args(weights), "--data", str(few), *fast, "--targets", targets,
              "--overwrite"]  # fmt: skip
    load_before = os.getloadavg()
    seconds = {"compress": cli(["compress", *common, "--method", methods, "--profile", "cpu-ort",
                                "--eval-data", str(evals), "--out", str(run)])}  # fmt: skip
    load_after = os.getloadavg()
    outcomes = report_outcomes(load_report(run / "report.json"))
    summary, rows = summarize(outcomes)
    units = json.loads((run / "manifest.json").read_text())["units"]
    decision = units.get("quantize/cpu-ort/int8/original", {}).get("result", {})
    from dcvit_deploy.latency.machine import cpu_model, physical_cores

    r: dict[str, Any] = {
        "summary": summary,
        "setup": {
            **setup,
            "eval_images": n_eval,
            "targets": targets,
            "methods": methods,
            "quick": args.quick,
        },
        "machine": {
            "cpu": cpu_model(),
            "cores": physical_cores(),
            "cpu_flags": cpu_flags(),
            "load_before": [round(v, 2) for v in load_before],
            "load_after": [round(v, 2) for v in load_after],
            "python": platform.python_version(),
        },
        "int8_method": {k: decision.get(k) for k in ("method", "method_timing_ms")},
        "seconds": seconds,
        "artifacts": rows,
    }
    if args.methods_study:
        only = cache / "precision-dcvit-only"
        alone = cli(["family", *common, "--method", "dcvit", "--out", str(only)])
        both = cli(["family", *common, "--method", methods, "--out", str(only) + "-both"])
        r["methods_study"] = {"dcvit_s": alone, "both_s": both, "ratio": both / alone}
    r["deit_tiny"] = deit_tiny_latency(few, targets, cache, args.quick)
    summary["int8_speedup_cpu_fmnist_teacher"] = summary["int8_speedup_cpu"]
    summary["int8_speedup_cpu"] = r["deit_tiny"]["median"]
    r["targets_met"] = targets_met(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "precision_family-quick" if args.quick else "precision_family"
    atomic_write_json(args.out / f"{name}.json", r)
    atomic_write_text(args.out / f"{name}.md", render(r))
    print(json.dumps(r["summary"], indent=2, default=str))


if __name__ == "__main__":
    main()
