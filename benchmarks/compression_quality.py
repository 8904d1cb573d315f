"""Compression-quality benchmark on Fashion-MNIST (real data, offline): DC-ViT vs block dropping.

Teacher: a 12-block ViT whose blocks matter (28x28 inputs without padding, width 48, no
stochastic depth, trained for longer; :data:`fmnist.SMALL_KWARGS`: patch 7, 17 tokens -- the
50-token :data:`fmnist.DENSE_KWARGS` did not fit the time available on a shared 2-core machine),
trained once and cached. Few-shot set: 500
unlabeled training images. Everything is scored on the test set (top-1, agreement with the
teacher). Sections, each timed:

1. ``sensitivity`` -- per block, without finetuning: drop the block; remove its attention only
   (surgery); remove its attention and re-fit its fc2 in closed form.
2. ``refit`` -- at 16.6/25/33% MACs: surgery only vs re-fit (calibration: plain few-shot views,
   or one pass of augmented views), before any finetune.
3. ``main`` -- at 16.6/25/33%, the same finetune steps per stage: DC-ViT under the paper's
   procedure (ranking by finetune, progressive, no re-fit), DC-ViT re-fit + one-shot + one
   finetune, block dropping training everything (PRACTISE) and training blocks 0..deepest+1.
4. ``ranking`` -- at the 25% width: full ranking (finetune per block) vs fewer steps, local loss,
   re-fit alone, re-fit + few steps: Spearman with the full ranking, time, and the top-1 of the
   candidate each ranking yields (same downstream recipe).
5. ``curve`` -- at 25%: top-1 against finetune steps for DC-ViT (re-fit and surgery only) and
   block dropping.
6. ``augment`` -- at 25%, DC-ViT re-fit + finetune: paper augmentation (random resized crop +
   RandAugment m9) vs none vs light (flip + 2 px shift), and a fixed bank of cached teacher
   features.
7. ``family`` -- the default procedure over >= 15 targets, wall time; and the measured cost of
   one candidate under the paper schedule (measured step time x the paper's step count).

Writes ``benchmarks/results/compression_quality.json`` (top-level ``summary``) and ``.md``.
Usage: ``python benchmarks/compression_quality.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fmnist

from dcvit_deploy.compress.candidate import build_candidate
from dcvit_deploy.compress.family import compress_family
from dcvit_deploy.compress.finetune import (
    FinetuneSchedule,
    feature_mimic,
    iterations_for_epochs,
    train_transform,
)
from dcvit_deploy.compress.macs import geometry_of
from dcvit_deploy.compress.metric_set import InversionSettings, load_or_synthesize
from dcvit_deploy.compress.plan import plan_structure
from dcvit_deploy.compress.procedure import PROCEDURES, FamilyConfig
from dcvit_deploy.compress.recoverability import rank_blocks
from dcvit_deploy.compress.refit import refit_blocks
from dcvit_deploy.compress.surgery import apply_spec, compress_blocks, identity_spec, make_chooser
from dcvit_deploy.model.images import FewShotImages, input_fingerprint, list_images
from dcvit_deploy.store.atomic import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_NAME = fmnist.TEACHER_ARCH
ARCH = "p7d48"
TEACHER_TRAIN = {"epochs": 4, "batch": 128, "lr": 1e-3, "warmup_steps": 100}
FEWSHOT = 500
REFIT_RANK: dict[str, Any] = {
    "rank_criterion": "refit",
    "rank_iterations": None,
    "shared_ranking": False,
    "refit": True,
    "progressive": False,
    "reuse": False,
    "bank_views": 0,
}
"""The first cheap procedure measured (the ``dcvit_fast`` arm, curve and augmentation study):
rank by the re-fit alone, at each candidate's width; one-shot re-fit; one finetune."""


class Bench:
    """Shared state: teacher, data, evaluation on cached test inputs, timers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        if args.quick:  # smoke run: an untrained teacher of the same shape
            torch.manual_seed(0)
            self.teacher = fmnist.build_teacher(
                fmnist.TEACHERS[getattr(args, "arch", None) or ARCH]
            )
            self.teacher_fp, self.train_seconds = "quick-untrained", 0.0
        else:
            arch = getattr(args, "arch", None) or ARCH
            train = {**TEACHER_TRAIN, **getattr(args, "teacher_train", {})}
            self.teacher, info = fmnist.train_teacher(arch=arch, threads=args.threads, **train)
            self.teacher_fp = f"fmnist-teacher-{info.config.key()}"
            self.train_seconds = info.train_seconds
        self.teacher.eval()
        self.arch = getattr(args, "arch", None) or ARCH
        self.kwargs = fmnist.TEACHERS[self.arch]
        self.dcfg = fmnist.data_config_of(self.teacher)
        test_x, test_y = fmnist.load_fmnist("test")
        n = args.test_images
        self.test_x = fmnist.to_model_input(test_x[:n], self.dcfg)
        self.test_y = torch.as_tensor(test_y[:n])
        self.teacher_pred = self._logits(self.teacher, self.test_x).argmax(1)
        cache = fmnist.CACHE_DIR
        few_dir = cache / f"fewshot-{FEWSHOT}-28"
        if not few_dir.is_dir() or len(list(few_dir.glob("*.png"))) != FEWSHOT:
            fmnist.write_fewshot_folder(few_dir, n=FEWSHOT, seed=0, size=28)
        self.paths = list(list_images(few_dir))
        self.data_fp = input_fingerprint(self.paths)
        plain = FinetuneSchedule.tiny()
        self.plain_images = torch.stack(
            list(FewShotImages(self.paths, train_transform(plain, self.dcfg)))
        )
        self.datasets: dict[str, Any] = {}
        inv = InversionSettings.fast(iterations=args.inversion_iterations)
        t0 = time.perf_counter()
        self.metric = load_or_synthesize(
            cache / ("metric_set-quick" if args.quick else f"metric_set-{self.arch}"),
            self.teacher_fp,
            self.teacher,
            self.dcfg["input_size"],
            self.dcfg["mean"],
            self.dcfg["std"],
            inv,
            seed=0,
        )
        self.metric_seconds = time.perf_counter() - t0
        self.geom = geometry_of(self.teacher)
        self.base_spec = identity_spec(self.teacher, MODEL_NAME, self.kwargs)
        block = self.geom.block_macs(self.base_spec.blocks[0])[0]
        total = self.geom.count(self.base_spec.blocks).linear_norm
        self.targets = [round(k * block / total, 6) for k in (2, 3, 4)]  # 16.6%, 25%, 33%
        self.work = cache / ("bench-quick" if args.quick else "bench")
        if self.arch != ARCH:
            self.work = cache / f"bench-{self.arch}"
        if not getattr(args, "ablation_only", False):
            shutil.rmtree(self.work, ignore_errors=True)  # time everything from scratch
        self.chooser = make_chooser("random", self.teacher, seed=0)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def _logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        model.eval()
        return torch.cat([model(c).float() for c in x.split(500)])

    def eval(self, model: torch.nn.Module, n: int | None = None) -> dict[str, float]:
        x = self.test_x if n is None else self.test_x[:n]
        pred = self._logits(model, x).argmax(1)
        k = len(pred)
        return {
            "top1": round(100 * float((pred == self.test_y[:k]).float().mean()), 2),
            "agreement": round(100 * float((pred == self.teacher_pred[:k]).float().mean()), 2),
        }

    # ------------------------------------------------------------------ data / schedules

    def schedule(self, steps: int, **changes: Any) -> FinetuneSchedule:
        s = FinetuneSchedule.default(
            FEWSHOT, iterations=steps, batch_size=self.args.batch_size, lr=self.args.lr
        )
        return dataclasses.replace(s, **changes) if changes else s

    def dataset(self, aug: str) -> Any:
        if aug not in self.datasets:
            if aug == "paper":
                tf = train_transform(self.schedule(10), self.dcfg)
            elif aug == "none":
                tf = train_transform(FinetuneSchedule.tiny(), self.dcfg)
            else:  # light: flip + up to 2 px shift, the way the 28x28 images vary
                from torchvision import transforms as T

                tf = T.Compose(
                    [
                        T.RandomCrop(28, padding=2),
                        T.RandomHorizontalFlip(),
                        T.ToTensor(),
                        T.Normalize(self.dcfg["mean"], self.dcfg["std"]),
                    ]
                )
            self.datasets[aug] = FewShotImages(self.paths, tf)
        return self.datasets[aug]

    def family(self, name: str, aug: str = "paper", **cfg: Any) -> dict[str, Any]:
        """Run ``compress_family`` into ``work/name`` and evaluate every candidate."""
        out = self.work / name
        cfg.setdefault("include_original", False)
        cfg.setdefault("practise_adaptor_steps", 2 if self.args.quick else self.args.adaptor_steps)
        config = FamilyConfig(**cfg)
        t0 = time.perf_counter()
        res = compress_family(
            self.teacher,
            model_name=MODEL_NAME,
            model_kwargs=self.kwargs,
            data=self.dataset(aug),
            metric_images=self.metric.images,
            out_dir=out,
            config=config,
            teacher_fingerprint=self.teacher_fp,
            input_fingerprint=self.data_fp,
            calibration_images=self.plain_images,
        )
        wall = time.perf_counter() - t0
        rows = []
        for c in res.candidates:
            model = build_candidate(c, out / c.weights)
            rows.append(
                {
                    "name": c.name,
                    "method": c.method,
                    "target": round(100 * c.target_reduction, 2),
                    "reduction": round(100 * c.reduction, 2),
                    "reduction_full": round(100 * (1 - c.macs.full / c.base_macs.full), 2),
                    "params_m": round(c.macs.params / 1e6, 4),
                    "blocks": c.recipe.get("blocks") or c.recipe.get("dropped"),
                    "hidden": c.recipe.get("hidden"),
                    "steps": sum(st["steps"] for st in c.recipe["finetune"]),
                    "seconds": c.recipe.get("seconds"),
                    **self.eval(model),
                }
            )
            print(name, rows[-1], flush=True)
        return {
            "wall_seconds": round(wall, 1),
            "seconds": {k: round(v, 1) for k, v in res.seconds.items()},
            "finetune_steps": res.finetune_steps,
            "rankings": {
                str(w): {"order": list(r.order), "scores": r.scores, "seconds": round(r.seconds, 1)}
                for w, r in res.rankings.items()
            },
            "candidates": rows,
        }


def _spearman(a: list[int], b: list[int]) -> float:
    """Spearman rank correlation of two orderings of the same items."""
    n = len(a)
    ra = {x: i for i, x in enumerate(a)}
    rb = {x: i for i, x in enumerate(b)}
    d2 = sum((ra[x] - rb[x]) ** 2 for x in a)
    return round(1 - 6 * d2 / (n * (n * n - 1)), 3)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 1)


# --------------------------------------------------------------------------- sections


def sensitivity(b: Bench) -> dict[str, Any]:
    n = b.args.sensitivity_images
    rows = []
    calib = b.plain_images
    for blk in range(12):
        drop = apply_spec(b.teacher, compress_blocks(b.base_spec, [blk], 0, kind="identity"))
        ffn_spec = compress_blocks(b.base_spec, [blk], b.base_spec.base_mlp_hidden)
        ffn = apply_spec(b.teacher, ffn_spec)
        row = {
            "block": blk,
            "drop": b.eval(drop, n)["top1"],
            "no_attention": b.eval(ffn, n)["top1"],
        }
        refit_blocks(ffn, b.teacher, calib, [blk])
        row["no_attention_refit"] = b.eval(ffn, n)["top1"]
        rows.append(row)
        print("sensitivity", row, flush=True)
    return {"test_images": n, "teacher_top1": b.eval(b.teacher, n)["top1"], "rows": rows}


def refit_study(b: Bench, order: list[int]) -> list[dict[str, Any]]:
    """Surgery only vs re-fit, before finetuning, with the blocks of a given ranking."""
    aug_calib = torch.stack([b.dataset("paper")[i] for i in range(FEWSHOT)])
    rows = []
    for t in b.targets:
        plan = plan_structure(b.geom, 12, t, max_blocks=10)
        spec = compress_blocks(b.base_spec, order[: plan.n_blocks], plan.hidden, b.chooser)
        model = apply_spec(b.teacher, spec)
        row: dict[str, Any] = {"target": round(100 * t, 2), "surgery": b.eval(model)}
        for label, calib in (("refit_plain", b.plain_images), ("refit_augmented", aug_calib)):
            m = copy.deepcopy(model)
            _, sec = _timed(lambda m=m, calib=calib: refit_blocks(m, b.teacher, calib))
            row[label] = {**b.eval(m), "seconds": sec}
        rows.append(row)
        print("refit", row, flush=True)
    return rows


def ranking_study(b: Bench, ref: dict[str, Any], steps: int) -> dict[str, Any]:
    """Cheaper rankings at the 25% width vs the reference (finetune) ranking."""
    plan = plan_structure(b.geom, 12, b.targets[1], max_blocks=10)
    ref_order = ref["order"]
    out: dict[str, Any] = {
        "width": plan.hidden,
        "reference": {"criterion": f"finetune-{b.args.rank_steps}", **ref},
    }
    few = max(1, b.args.rank_steps // 3)
    variants = [
        (f"finetune-{few}", "finetune", few),
        (f"refit_finetune-{few}", "refit_finetune", few),
        (f"local-{b.args.rank_steps}", "local", b.args.rank_steps),
        ("refit", "refit", 1),
    ]
    rows = []
    for label, crit, it in variants:
        sched = b.schedule(it, lr_warmup_iterations=min(it, round(0.05 * it)))
        r, sec = _timed(
            lambda crit=crit, sched=sched: rank_blocks(
                b.teacher,
                b.base_spec,
                b.dataset("paper"),
                b.metric.images,
                candidates=tuple(range(1, 11)),
                hidden=plan.hidden,
                chooser=b.chooser,
                schedule=sched,
                seed=0,
                criterion=crit,
                calibration=b.plain_images,
            )
        )
        rows.append(
            {
                "criterion": label,
                "order": list(r.order),
                "spearman": _spearman(list(r.order), ref_order),
                "top4_same": sorted(r.order[:4]) == sorted(ref_order[:4]),
                "seconds": sec,
            }
        )
        print("ranking", rows[-1], flush=True)
    # the candidate each distinct top-n yields, under the same downstream recipe
    yields: dict[str, dict[str, Any]] = {}
    for order in [ref_order] + [r["order"] for r in rows]:
        key = ",".join(map(str, sorted(order[: plan.n_blocks])))
        if key in yields:
            continue
        spec = compress_blocks(b.base_spec, order[: plan.n_blocks], plan.hidden, b.chooser)
        model = apply_spec(b.teacher, spec)
        refit_blocks(model, b.teacher, b.plain_images)
        feature_mimic(
            model,
            b.teacher,
            b.dataset("paper"),
            b.schedule(steps),
            trainable_upto=max(order[: plan.n_blocks]),
            seed=1,
        )
        yields[key] = b.eval(model)
        print("ranking yield", key, yields[key], flush=True)
    for row in [out["reference"], *rows]:
        key = ",".join(map(str, sorted(row["order"][: plan.n_blocks])))
        row["final"] = yields[key]
    out["variants"] = rows
    out["downstream"] = f"re-fit + one-shot + {steps}-step finetune"
    return out


def paper_step_seconds(b: Bench, n: int = 12) -> float:
    """Seconds per step of the paper's finetune (batch 64, live RandAugment, blocks 0..b+1)."""
    spec = compress_blocks(b.base_spec, [6], 96, b.chooser)
    model = apply_spec(b.teacher, spec)
    sched = dataclasses.replace(FinetuneSchedule.paper(FEWSHOT), iterations=n)
    res = feature_mimic(model, b.teacher, b.dataset("paper"), sched, trainable_upto=6)
    return res.seconds / n


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny schedules (smoke run)")
    ap.add_argument("--steps", type=int, default=200, help="finetune steps per stage")
    ap.add_argument("--rank-steps", type=int, default=60, help="reference ranking steps/block")
    ap.add_argument("--curve", default="100,400", help="extra step counts for the curve")
    ap.add_argument("--family-targets", default="5:40:2.5", help="start:stop:step in percent")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--bank-views", type=int, default=8)
    ap.add_argument("--inversion-iterations", type=int, default=150)
    ap.add_argument("--test-images", type=int, default=4000)
    ap.add_argument("--sensitivity-images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adaptor-steps", type=int, default=50)
    ap.add_argument("--paper-stage-steps", type=int, default=100, help="paper arm, per stage")
    ap.add_argument("--family-steps", type=int, default=200)
    ap.add_argument(
        "--probe",
        default="",
        help="ARCH:EPOCHS -- add a short probe of another teacher (sensitivity, block dropping "
        "and DC-ViT default at 2 blocks' worth of MACs) to an existing results file",
    )
    ap.add_argument(
        "--curve-plain",
        default="",
        help="comma list of step counts: add a plain-view steps curve (default DC-ViT procedure "
        "and block dropping, 24.5%%) to an existing results file",
    )
    ap.add_argument(
        "--family-only",
        action="store_true",
        help="re-run only the default-family section into an existing results file",
    )
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    ap.add_argument(
        "--ablation-only",
        action="store_true",
        help="add the attention-only ablation and two procedure variants to an existing results "
        "file (needs its main arms)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ablation_only:
        ablation_only(args)
        return
    if args.family_only:
        family_only(args)
        return
    if args.probe:
        probe(args)
        return
    if args.curve_plain:
        curve_plain(args)
        return
    skip = {s for s in args.skip.split(",") if s}
    if args.quick:
        args.steps, args.rank_steps, args.inversion_iterations = 4, 3, 4
        args.curve, args.family_targets = "2", "5:15:5"
        args.paper_stage_steps = args.family_steps = 3
        args.test_images, args.sensitivity_images = 500, 200
    t_all = time.perf_counter()
    b, setup_s = _timed(lambda: Bench(args))
    r: dict[str, Any] = {
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
            "kwargs": b.kwargs,
            "train": TEACHER_TRAIN,
            **b.eval(b.teacher),
            "train_seconds": round(b.train_seconds, 1),
        },
        "fewshot_images": FEWSHOT,
        "test_images": len(b.test_y),
        "targets_pct": [round(100 * t, 2) for t in b.targets],
        "args": vars(args),
        "setup_seconds": setup_s,
        "metric_set": {"source": b.metric.source, "seconds": round(b.metric_seconds, 1)},
        "sections": {},
    }
    sec = r["sections"]

    def save() -> None:
        r["total_seconds"] = round(time.perf_counter() - t_all, 1)
        r["summary"] = summarize(r)
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = "_quick" if args.quick else ""
        atomic_write_json(RESULTS / f"compression_quality{suffix}.json", r)
        atomic_write_text(RESULTS / f"compression_quality{suffix}.md", render_markdown(r))

    if "sensitivity" not in skip:
        sec["sensitivity"], s = _timed(lambda: sensitivity(b))
        sec["sensitivity"]["seconds"] = s
        save()

    S = args.steps
    rank_sched = b.schedule(args.rank_steps)
    main_arms: dict[str, Any] = {}
    sec["main"] = {
        "steps_per_stage": S,
        "paper_stage_steps": args.paper_stage_steps,
        "rank_steps": args.rank_steps,
        "arms": main_arms,
    }
    common = {"schedule": b.schedule(S), "targets": tuple(b.targets)}
    # Block dropping first: its adaptor ranking is shared by both trainable ranges.
    main_arms["blockdrop_all"] = b.family(
        "blockdrop_all", method="practise", trainable="all", **common
    )
    save()
    drop_rank = next((b.work / "blockdrop_all").glob("ranking-practise-*.json"))

    def share_drop_rank(name: str) -> None:
        (b.work / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(drop_rank, b.work / name / drop_rank.name)

    share_drop_rank("blockdrop_dcvit")
    main_arms["blockdrop_dcvit"] = b.family(
        "blockdrop_dcvit", method="practise", trainable="dcvit", **common
    )
    save()
    main_arms["dcvit_fast"] = b.family("dcvit_fast", **REFIT_RANK, **common)
    save()
    fast_rank = main_arms["dcvit_fast"]["rankings"][
        str(main_arms["dcvit_fast"]["candidates"][1]["hidden"])
    ]
    if "refit" not in skip:
        sec["refit"] = refit_study(b, fast_rank["order"])
        save()
    if "paper" not in skip:
        main_arms["dcvit_paper"] = b.family(
            "dcvit_paper",
            **{**PROCEDURES["paper"], "shared_ranking": True},
            rank_schedule=rank_sched,
            schedule=b.schedule(args.paper_stage_steps),
            targets=tuple(b.targets),
        )
        save()

    if "family" not in skip:
        sec["family"] = family_section(b, args)
        save()

    if "ranking" not in skip and "dcvit_paper" in main_arms:
        ref_rank = next(iter(main_arms["dcvit_paper"]["rankings"].values()))
        sec["ranking"] = ranking_study(b, ref_rank, S)
        save()

    t25 = (b.targets[1],)
    if "curve" not in skip:
        curve: dict[str, list[dict[str, Any]]] = {
            "dcvit_refit": [],
            "dcvit_surgery": [],
            "blockdrop_all": [],
        }
        sec["curve"] = {"target": round(100 * t25[0], 2), "arms": curve}
        if "refit" in sec:
            curve["dcvit_refit"].append({"steps": 0, **sec["refit"][1]["refit_plain"]})
            curve["dcvit_surgery"].append({"steps": 0, **sec["refit"][1]["surgery"]})
        curve["dcvit_refit"].append({"steps": S, **main_arms["dcvit_fast"]["candidates"][1]})
        curve["blockdrop_all"].append({"steps": S, **main_arms["blockdrop_all"]["candidates"][1]})
        for steps in sorted(int(x) for x in args.curve.split(",") if x):
            one = {"schedule": b.schedule(steps), "targets": t25}
            if steps < S:
                row = b.family(f"curve_surgery_{steps}", **{**REFIT_RANK, "refit": False}, **one)[
                    "candidates"
                ][0]
                curve["dcvit_surgery"].append({"steps": steps, **row})
            row = b.family(f"curve_refit_{steps}", **REFIT_RANK, **one)["candidates"][0]
            curve["dcvit_refit"].append({"steps": steps, **row})
            share_drop_rank(f"curve_bd_{steps}")
            row = b.family(f"curve_bd_{steps}", method="practise", trainable="all", **one)[
                "candidates"
            ][0]
            curve["blockdrop_all"].append({"steps": steps, **row})
            for v in curve.values():
                v.sort(key=lambda row: row["steps"])
            save()
        one = {"schedule": b.schedule(S), "targets": t25}
        row = b.family(f"curve_surgery_{S}", **{**REFIT_RANK, "refit": False}, **one)["candidates"]
        curve["dcvit_surgery"].append({"steps": S, **row[0]})
        curve["dcvit_surgery"].sort(key=lambda row: row["steps"])
        save()

    if "augment" not in skip:
        aug: dict[str, Any] = {"paper": main_arms["dcvit_fast"]["candidates"][1]}
        sec["augment"] = aug
        one = {"schedule": b.schedule(S), "targets": t25}
        for a in ("none", "light"):
            aug[a] = b.family(f"aug_{a}", aug=a, **REFIT_RANK, **one)["candidates"][0]
            save()
        aug[f"paper_bank{args.bank_views}"] = b.family(
            "aug_bank", **{**REFIT_RANK, "bank_views": args.bank_views}, **one
        )["candidates"][0]
        save()
    save()
    if "variants" not in skip and not args.quick:
        args.ablation_only = True  # keep the work folders: the variants reuse a ranking file
        ablation_only(args)
    print((RESULTS / "compression_quality.md").read_text() if not args.quick else "")


def family_section(b: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """The product's default procedure over >= 15 targets, and the paper candidate's cost."""
    start, stop, step = (float(x) / 100 for x in args.family_targets.split(":"))
    n = round((stop - start) / step) + 1
    targets = tuple(round(start + i * step, 6) for i in range(n))
    fam = b.family(
        "default_family",
        aug="none",
        **PROCEDURES["default"],
        schedule=b.schedule(args.family_steps),
        targets=targets,
    )
    step_s = paper_step_seconds(b)
    paper_steps = iterations_for_epochs(2000, FEWSHOT, 64)
    n_stages = plan_structure(b.geom, 12, b.targets[1], max_blocks=10).n_blocks
    return {
        **fam,
        "procedure": {k: v for k, v in PROCEDURES["default"].items()},
        "steps": args.family_steps,
        "targets": len(targets),
        "paper_step_seconds": round(step_s, 4),
        "paper_iterations_per_finetune": paper_steps,
        "paper_finetunes_per_candidate": 10 + n_stages,
        "paper_candidate_seconds": round(step_s * paper_steps * (10 + n_stages), 0),
    }


def probe(args: argparse.Namespace) -> None:
    """Is another teacher less redundant? Per-block sensitivity, then block dropping and the
    default DC-ViT procedure at 2 blocks' worth of MACs (plain views, same steps)."""
    import json

    path = RESULTS / "compression_quality.json"
    r = json.loads(path.read_text())
    arch, epochs = args.probe.split(":")
    args.arch, args.teacher_train = arch, {"epochs": int(epochs)}
    args.test_images = r["test_images"]
    args.ablation_only = True
    t0 = time.perf_counter()
    b = Bench(args)
    S = r["sections"]["main"]["steps_per_stage"]
    one = {"schedule": b.schedule(S), "targets": (b.targets[0],)}
    out: dict[str, Any] = {
        "arch": arch,
        "kwargs": b.kwargs,
        "train": {**TEACHER_TRAIN, "epochs": int(epochs)},
        "teacher": b.eval(b.teacher),
        "sensitivity": sensitivity(b),
    }
    bd = b.family("probe_blockdrop", aug="none", method="practise", trainable="all", **one)
    dc = b.family("probe_dcvit", aug="none", **PROCEDURES["default"], **one)
    out["blockdrop"] = {**bd["candidates"][0], "wall_seconds": bd["wall_seconds"]}
    out["dcvit_default"] = {**dc["candidates"][0], "wall_seconds": dc["wall_seconds"]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    r["sections"][f"probe_{arch}"] = out
    r["total_seconds"] = round(r["total_seconds"] + out["seconds"], 1)
    _write(r)


def curve_plain(args: argparse.Namespace) -> None:
    """Top-1 against finetune steps on plain views for the default DC-ViT procedure and block
    dropping (train all) at 3 blocks' worth of MACs, reusing the main run's rankings."""
    import json

    path = RESULTS / "compression_quality.json"
    r = json.loads(path.read_text())
    args.test_images = r["test_images"]
    args.ablation_only = True
    t0 = time.perf_counter()
    b = Bench(args)
    arms = r["sections"]["main"]["arms"]
    S = r["sections"]["main"]["steps_per_stage"]
    curve: dict[str, list[dict[str, Any]]] = {
        "dcvit_default": [{"steps": S, **arms["dcvit_rankft_oneshot"]["candidates"][1]}],
        "blockdrop_all": [{"steps": S, **arms["blockdrop_all_noaug"]["candidates"][1]}],
    }
    r["sections"]["curve_plain"] = {"target": round(100 * b.targets[1], 2), "arms": curve}
    ranks = {
        "dcvit_default": next((b.work / "dcvit_rankft_oneshot").glob("ranking-dcvit-*.json")),
        "blockdrop_all": next((b.work / "blockdrop_all").glob("ranking-practise-*.json")),
    }
    for steps in sorted(int(x) for x in args.curve_plain.split(",") if x):
        one = {"schedule": b.schedule(steps), "targets": (b.targets[1],)}
        for arm, cfg in (
            ("dcvit_default", PROCEDURES["default"]),
            ("blockdrop_all", {"method": "practise", "trainable": "all"}),
        ):
            name = f"curve_plain_{arm}_{steps}"
            (b.work / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(ranks[arm], b.work / name / ranks[arm].name)
            row = b.family(name, aug="none", **cfg, **one)["candidates"][0]
            curve[arm].append({"steps": steps, **row})
            curve[arm].sort(key=lambda x: x["steps"])
            _write(r)
    r["total_seconds"] = round(r["total_seconds"] + time.perf_counter() - t0, 1)
    _write(r)


def family_only(args: argparse.Namespace) -> None:
    """Re-run the default-family section (e.g. after the default procedure changed); the
    previous family section is kept as ``family_previous``."""
    import json

    path = RESULTS / "compression_quality.json"
    r = json.loads(path.read_text())
    args.test_images = r["test_images"]
    args.ablation_only = True  # keep the other sections' work folders
    t0 = time.perf_counter()
    b = Bench(args)
    if "family" in r["sections"]:
        r["sections"]["family_previous"] = r["sections"].pop("family")
    shutil.rmtree(b.work / "default_family", ignore_errors=True)
    r["sections"]["family"] = family_section(b, args)
    r["total_seconds"] = round(r["total_seconds"] + time.perf_counter() - t0, 1)
    _write(r)


def ablation_only(args: argparse.Namespace) -> None:
    """Does keeping a block's MLP help at all, once its attention is gone?

    On exactly the blocks block dropping removed, remove only the attention (MLP kept at full
    width, re-fitted) and finetune as block dropping did: if this costs as much as dropping the
    blocks, their MLPs carry nothing the finetune cannot restore, and no MAC-matched DC-ViT
    candidate (which removes the attention of one block more) can beat block dropping here.
    """
    import json

    path = RESULTS / "compression_quality.json"
    r = json.loads(path.read_text())
    args.test_images = r["test_images"]
    t0 = time.perf_counter()
    b = Bench(args)
    S = r["sections"]["main"]["steps_per_stage"]
    rows = []
    for drop_row in r["sections"]["main"]["arms"]["blockdrop_dcvit"]["candidates"]:
        blocks = list(drop_row["blocks"])
        spec = compress_blocks(b.base_spec, blocks, b.base_spec.base_mlp_hidden)
        model = apply_spec(b.teacher, spec)
        refit_blocks(model, b.teacher, b.plain_images)
        before = b.eval(model)
        res = feature_mimic(
            model,
            b.teacher,
            b.dataset("paper"),
            b.schedule(S),
            trainable_upto=max(blocks),
            seed=1,
        )
        macs = b.geom.count(spec.blocks).linear_norm / b.geom.count(b.base_spec.blocks).linear_norm
        rows.append(
            {
                "blocks": blocks,
                "reduction": round(100 * (1 - macs), 2),
                "refit_only": before,
                "finetuned": b.eval(model),
                "steps": S,
                "seconds": round(res.seconds, 1),
                "blockdrop_top1": drop_row["top1"],
            }
        )
        print("ablation", rows[-1], flush=True)
    r["sections"]["attention_only"] = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    r["total_seconds"] = round(r["total_seconds"] + r["sections"]["attention_only"]["seconds"], 1)
    _write(r)
    # Procedure variants suggested by the ranking study: a short finetune ranking (re-fit first),
    # once at the middle width, then one-shot or progressive compression with re-fits.
    t1 = time.perf_counter()
    main = r["sections"]["main"]
    few = max(1, main["rank_steps"] // 3)
    common = {
        "targets": tuple(b.targets),
        "rank_criterion": "refit_finetune",
        "rank_schedule": b.schedule(few, lr_warmup_iterations=1),
        "shared_ranking": True,
        "refit": True,
        "reuse": False,
    }
    # The augmentation study found RandAugment + random resized crop hurt feature mimicking on
    # 28x28 inputs, so these variants (and a block-dropping arm, for fairness) use plain views.
    main["arms"]["dcvit_rankft_oneshot"] = b.family(
        "dcvit_rankft_oneshot", aug="none", progressive=False, schedule=b.schedule(S), **common
    )
    _write(r)
    main["arms"]["dcvit_rankft_progressive"] = b.family(
        "dcvit_rankft_progressive",
        aug="none",
        progressive=True,
        schedule=b.schedule(main["paper_stage_steps"]),
        **common,
    )
    _write(r)
    drop_rank = next((b.work / "blockdrop_all").glob("ranking-practise-*.json"))
    (b.work / "blockdrop_all_noaug").mkdir(parents=True, exist_ok=True)
    shutil.copy(drop_rank, b.work / "blockdrop_all_noaug" / drop_rank.name)
    main["arms"]["blockdrop_all_noaug"] = b.family(
        "blockdrop_all_noaug",
        aug="none",
        method="practise",
        trainable="all",
        schedule=b.schedule(S),
        targets=tuple(b.targets),
    )
    r["total_seconds"] = round(r["total_seconds"] + time.perf_counter() - t1, 1)
    _write(r)


def _write(r: dict[str, Any]) -> None:
    r["summary"] = summarize(r)
    atomic_write_json(RESULTS / "compression_quality.json", r)
    atomic_write_text(RESULTS / "compression_quality.md", render_markdown(r))


# --------------------------------------------------------------------------- report


def _row(arm: dict[str, Any], i: int) -> dict[str, Any]:
    return arm["candidates"][i]


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    t = r["teacher"]["top1"]
    s: dict[str, Any] = {"teacher_top1": t}
    sec = r["sections"]
    arms = sec.get("main", {}).get("arms", {})
    if "blockdrop_all" in arms:
        bd = [a for a in arms if a.startswith("blockdrop")]
        best_bd = [max(_row(arms[a], i)["top1"] for a in bd) for i in range(3)]
        s["blockdrop_sensitivity_16"] = round(t - best_bd[0], 2)
        dc = [a for a in arms if a.startswith("dcvit")]
        if dc:
            best_dc = [max(_row(arms[a], i)["top1"] for a in dc) for i in range(3)]
            for i, pct in enumerate(("16", "25", "33")):
                s[f"dcvit_minus_blockdrop_{pct}"] = round(best_dc[i] - best_bd[i], 2)
            s["best_dcvit_arm"] = [
                max(dc, key=lambda a: _row(arms[a], i)["top1"]) for i in range(3)
            ]
            s["best_blockdrop_top1"] = best_bd
            if "dcvit_paper" in arms:
                s["dcvit_minus_paper_setting"] = {
                    a: [
                        round(_row(arms[a], i)["top1"] - _row(arms["dcvit_paper"], i)["top1"], 2)
                        for i in range(3)
                    ]
                    for a in dc
                    if a != "dcvit_paper"
                }
    if "family" in sec:
        f = sec["family"]
        s["family_candidates"] = len(f["candidates"])
        s["family_seconds"] = f["wall_seconds"]
        s["paper_candidate_seconds"] = f["paper_candidate_seconds"]
        s["paper_candidate_seconds_is_extrapolated"] = True
        s["family_over_paper_candidate"] = round(
            f["wall_seconds"] / f["paper_candidate_seconds"], 4
        )
    if "ranking" in sec:
        s["ranking_spearman"] = {v["criterion"]: v["spearman"] for v in sec["ranking"]["variants"]}
    return s


def findings(r: dict[str, Any]) -> list[str]:
    """What the numbers say, against the issue's targets (computed, so a rerun stays honest)."""
    s, sec = r["summary"], r["sections"]
    bd16 = s["blockdrop_sensitivity_16"]
    att = sec["attention_only"]["rows"]
    rf = sec["refit"]
    aug = sec["augment"]
    rk = sec["ranking"]
    ref_final = rk["reference"]["final"]["top1"]
    cheap = {v["criterion"]: v for v in rk["variants"]}
    fam = sec["family"]
    paper_gap = s["dcvit_minus_paper_setting"].get("dcvit_rankft_oneshot", [])
    se = sec["sensitivity"]
    costs = sorted((se["teacher_top1"] - row["drop"], row["block"]) for row in se["rows"])
    cheap_blocks = sum(c < 1.5 for c, _ in costs)
    return [
        "",
        "## Findings",
        "",
        f"- **The testbed is still redundant.** Best block dropping loses {bd16} point(s) at "
        f"{r['targets_pct'][0]}% after the same finetune (target: >= 1.5 — missed). Without any "
        f"finetune, dropping one block costs < 1.5 points for {cheap_blocks} of 12 blocks (worst: "
        f"block {costs[-1][1]}, {costs[-1][0]:.1f} points). A 12-block, width-48 ViT trained 4 epochs on Fashion-MNIST "
        "has spare depth. The 50-token teacher the issue suggests did not fit the time for the "
        "full benchmark on this shared machine (`fmnist.DENSE_KWARGS`); its short probe (last "
        "finding) has blocks that matter before finetuning but not after it: on Fashion-MNIST "
        "a 200-step feature-mimicking finetune on 500 images restores dropped blocks almost "
        "fully.",
        f"- **DC-ViT does not beat block dropping here**: best DC-ViT minus best block dropping "
        f"is {s['dcvit_minus_blockdrop_16']:+.2f} / {s['dcvit_minus_blockdrop_25']:+.2f} / "
        f"{s['dcvit_minus_blockdrop_33']:+.2f} points at the three targets (target: >= +2 at "
        "25% and 33% — missed). **Ablation that explains it** (attention-only table): removing "
        "only the attention of the blocks block dropping removes, keeping their MLPs at full "
        "width (re-fitted, same finetune), scores "
        + " / ".join(f"{a['finetuned']['top1']:.2f}" for a in att)
        + " vs "
        + " / ".join(f"{a['blockdrop_top1']:.2f}" for a in att)
        + " for dropping the whole blocks. Once a block's attention is gone its MLP carries "
        "nothing the finetune cannot restore, and at equal MACs DC-ViT removes the attention of "
        "one block more than block dropping does (n = k + 1), so it must lose on such a teacher. "
        "The per-block sensitivity table says the same before finetuning: removing attention "
        "costs about as much as dropping the block. A plausible reason the paper sees the "
        "opposite on ImageNet DeiT-B (not tested here): there the MLPs hold knowledge a "
        "few-shot finetune cannot recreate.",
        "- **Re-fit** (closed-form fc2) before finetuning: "
        + ", ".join(f"{x['surgery']['top1']:.2f} -> {x['refit_plain']['top1']:.2f}" for x in rf)
        + " top-1 (surgery only -> re-fit on plain few-shot views) in < 1 s; fitted on "
        "RandAugment views it gains almost nothing ("
        + ", ".join(f"{x['refit_augmented']['top1']:.2f}" for x in rf)
        + ").",
        f"- **Ranking**: the re-fit alone ({cheap['refit']['seconds']} s) and the local loss "
        f"pick a different top-4 than the paper's finetune ranking ({rk['reference']['seconds']} "
        f"s) and cost {ref_final - cheap['refit']['final']['top1']:.2f} point downstream; a "
        "20-step finetune per block (with or without a re-fit first) picks the same top-4 in "
        f"{cheap[next(k for k in cheap if k.startswith('refit_finetune'))]['seconds']} s.",
        f"- **Augmentation**: on 28x28 inputs the paper's random resized crop + RandAugment m9 "
        f"cost {aug['none']['top1'] - aug['paper']['top1']:.2f} point against plain views "
        f"({aug['paper']['top1']:.2f} vs {aug['none']['top1']:.2f}; light flip+shift "
        f"{aug['light']['top1']:.2f}); with plain views the teacher's features are cached "
        "exactly (a one-view bank), which removes a quarter of every step.",
        "- **Default procedure** (rank once by re-fit + 20-step finetune, one-shot re-fit, one "
        "200-step finetune on plain views): "
        + " / ".join(f"{g:+.2f}" for g in paper_gap)
        + " points against the paper procedure at the three targets (within 0.3 or better; the "
        "paper arm keeps the paper's RandAugment and is scaled down to 100 steps per stage and 60 "
        "per ranked block), at a fraction of its time. Its "
        f"{s['family_candidates']}-candidate family took "
        f"{fam['wall_seconds']} s; one candidate under the paper schedule "
        f"(2000 epochs per finetune, {fam['paper_finetunes_per_candidate']} finetunes) is "
        f"{fam['paper_candidate_seconds']:.0f} s by measured step time "
        f"({s['family_over_paper_candidate']:.4f}x; target <= 2x — met).",
        "- Block dropping trains equally well with either trainable range (all vs blocks "
        "0..deepest+1).",
        *_curve_findings(sec),
        *_probe_findings(sec),
    ]


def _curve_findings(sec: dict[str, Any]) -> list[str]:
    if "curve_plain" not in sec:
        return []
    c = sec["curve_plain"]["arms"]

    def fmt(rows: list[dict[str, Any]]) -> str:
        return ", ".join(f"{row['steps']}: {row['top1']:.2f}" for row in rows)

    return [
        "- **Steps curve on plain views** (the default's setting, "
        f"{sec['curve_plain']['target']}%): DC-ViT default {fmt(c['dcvit_default'])}; block "
        f"dropping {fmt(c['blockdrop_all'])}. The gap to block dropping does not close with "
        "more steps. 100 steps is also within 0.3 point of the paper procedure at this target, "
        "but was not measured at the other two; the default keeps 200."
    ]


def _probe_findings(sec: dict[str, Any]) -> list[str]:
    out = []
    for key, pr in sec.items():
        if not key.startswith("probe_"):
            continue
        bd, dc, t = pr["blockdrop"], pr["dcvit_default"], pr["teacher"]["top1"]
        out.append(
            f"- **Probe, 50-token teacher** (`{pr['arch']}`, {pr['train']['epochs']} epochs, "
            f"top-1 {t:.2f}): at {bd['target']}% MACs block dropping loses "
            f"{t - bd['top1']:.2f} point(s) and the default DC-ViT {t - dc['top1']:.2f} "
            f"(DC-ViT minus block dropping {dc['top1'] - bd['top1']:+.2f}); see its section. "
            "Too short a run to replace the main teacher."
        )
    return out


def render_markdown(r: dict[str, Any]) -> str:
    t = r["teacher"]
    s = r["summary"]
    sec = r["sections"]
    L = [
        "# Compression quality — Fashion-MNIST, 12-block ViT teacher: DC-ViT vs block dropping",
        "",
        f"Teacher `{t['arch']}` {t['kwargs']}, trained {t['train']} : top-1 **{t['top1']}%** on "
        f"{r['test_images']} test images. Few-shot set: {r['fewshot_images']} unlabeled training "
        f"images. Finetunes: AdamW lr {r['args']['lr']}, batch {r['args']['batch_size']}, feature "
        f"mimicking; metric set: {r['metric_set']['source']}. Machine: {r['machine']} (shared with "
        "other jobs: wall times are upper bounds).",
        "",
        "## Summary",
        "",
        "| quantity | value |",
        "|---|---|",
    ]
    for k, v in s.items():
        L.append(f"| `{k}` | {v} |")
    with contextlib.suppress(KeyError, IndexError, ValueError, StopIteration):
        L += findings(r)  # a partial run has no findings paragraph
    if "sensitivity" in sec:
        se = sec["sensitivity"]
        L += [
            "",
            f"## Per-block sensitivity, no finetuning (top-1 %, first {se['test_images']} test "
            f"images; teacher {se['teacher_top1']})",
            "",
            "| block | drop block | remove attention | remove attention + re-fit fc2 |",
            "|---|---|---|---|",
        ]
        for row in se["rows"]:
            L.append(
                f"| {row['block']} | {row['drop']:.2f} | {row['no_attention']:.2f} | "
                f"{row['no_attention_refit']:.2f} |"
            )
    if "main" in sec:
        m = sec["main"]
        labels = {
            "dcvit_paper": "DC-ViT, paper procedure (finetune ranking, progressive, no re-fit)",
            "dcvit_fast": "DC-ViT, re-fit ranking + one-shot re-fit + one finetune",
            "blockdrop_all": "block dropping, train all (PRACTISE setting)",
            "blockdrop_dcvit": "block dropping, train blocks 0..deepest+1 (DC-ViT setting)",
            "blockdrop_all_noaug": "block dropping, train all, plain views (no augmentation)",
            "dcvit_rankft_oneshot": "DC-ViT, re-fit + short-finetune ranking, one-shot re-fit + one finetune, plain views",
            "dcvit_rankft_progressive": "DC-ViT, re-fit + short-finetune ranking, progressive with re-fits, plain views",
        }
        L += [
            "",
            f"## Main comparison ({m['steps_per_stage']} finetune steps per candidate; the paper "
            f"procedure: {m['paper_stage_steps']} per stage, {m['rank_steps']} per ranked block)",
            "",
            "| target | method | achieved (lin+norm / full) | params M | blocks | steps | top-1 % | Δ teacher | agreement % | s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, target in enumerate(r["targets_pct"]):
            for arm, label in labels.items():
                if arm not in m["arms"]:
                    continue
                row = _row(m["arms"][arm], i)
                L.append(
                    f"| {target:.1f}% | {label} | {row['reduction']:.1f}% / {row['reduction_full']:.1f}% | "
                    f"{row['params_m']} | {row['blocks']} | {row['steps']} | {row['top1']:.2f} | "
                    f"{row['top1'] - t['top1']:+.2f} | {row['agreement']:.2f} | {row['seconds'] or 0:.0f} |"
                )
        L += ["", "| arm | wall s | finetune steps |", "|---|---|---|"]
        for arm, a in m["arms"].items():
            L.append(f"| {arm} | {a['wall_seconds']} | {a['finetune_steps']} |")
    if "refit" in sec:
        L += [
            "",
            "## Re-fit before finetuning (top-1 %, no training)",
            "",
            "| target | surgery only | re-fit (plain views) | re-fit (augmented views) |",
            "|---|---|---|---|",
        ]
        for row in sec["refit"]:
            L.append(
                f"| {row['target']:.1f}% | {row['surgery']['top1']:.2f} | "
                f"{row['refit_plain']['top1']:.2f} | {row['refit_augmented']['top1']:.2f} |"
            )
    if "ranking" in sec:
        rk = sec["ranking"]
        ref = rk["reference"]
        L += [
            "",
            f"## Ranking (width {rk['width']}, 25% plan; downstream: {rk['downstream']})",
            "",
            "| criterion | order | Spearman vs reference | same top-4 | s | final top-1 % |",
            "|---|---|---|---|---|---|",
            f"| {ref['criterion']} (reference) | {ref['order']} | 1 | yes | {ref['seconds']} | {ref['final']['top1']:.2f} |",
        ]
        for v in rk["variants"]:
            L.append(
                f"| {v['criterion']} | {v['order']} | {v['spearman']} | {'yes' if v['top4_same'] else 'no'} | "
                f"{v['seconds']} | {v['final']['top1']:.2f} |"
            )
    if "curve" in sec:
        c = sec["curve"]
        steps = sorted({row["steps"] for v in c["arms"].values() for row in v})
        L += [
            "",
            f"## Top-1 against finetune steps ({c['target']:.1f}% MACs)",
            "",
            "| arm | " + " | ".join(str(x) for x in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for arm, rows in c["arms"].items():
            by = {row["steps"]: row["top1"] for row in rows}
            L.append(
                f"| {arm} | " + " | ".join(f"{by[x]:.2f}" if x in by else "" for x in steps) + " |"
            )
    if "curve_plain" in sec:
        c = sec["curve_plain"]
        steps = sorted({row["steps"] for v in c["arms"].values() for row in v})
        L += [
            "",
            f"## Top-1 against finetune steps, plain views ({c['target']:.1f}% MACs)",
            "",
            "| arm | " + " | ".join(str(x) for x in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for arm, rows in c["arms"].items():
            by = {row["steps"]: row["top1"] for row in rows}
            L.append(
                f"| {arm} | " + " | ".join(f"{by[x]:.2f}" if x in by else "" for x in steps) + " |"
            )
    if "augment" in sec:
        L += [
            "",
            "## Augmentation (DC-ViT re-fit + finetune, 25%)",
            "",
            "| views | top-1 % | agreement % | s |",
            "|---|---|---|---|",
        ]
        for k, row in sec["augment"].items():
            L.append(
                f"| {k} | {row['top1']:.2f} | {row['agreement']:.2f} | {row['seconds'] or 0:.0f} |"
            )
    if "attention_only" in sec:
        L += [
            "",
            "## Ablation: remove only the attention of the blocks block dropping removed",
            "",
            "MLPs kept at full width and re-fitted, then the same finetune as block dropping "
            "(blocks 0..deepest+1). If this is no better than dropping the blocks, their MLPs "
            "carry nothing a finetune cannot restore.",
            "",
            "| blocks | MACs ↓ | re-fit only | finetuned | block dropping (same blocks) |",
            "|---|---|---|---|---|",
        ]
        for row in sec["attention_only"]["rows"]:
            L.append(
                f"| {row['blocks']} | {row['reduction']:.1f}% | {row['refit_only']['top1']:.2f} | "
                f"{row['finetuned']['top1']:.2f} | {row['blockdrop_top1']:.2f} |"
            )
    for key, pr in sec.items():
        if not key.startswith("probe_"):
            continue
        se = pr["sensitivity"]
        worst = sorted(se["teacher_top1"] - row["drop"] for row in se["rows"])
        L += [
            "",
            f"## Probe: teacher `{pr['arch']}` {pr['kwargs']}, trained {pr['train']}",
            "",
            f"Teacher top-1 {pr['teacher']['top1']:.2f}. Dropping one block without finetuning "
            f"costs {worst[0]:.1f} to {worst[-1]:.1f} points ({se['test_images']} images; "
            f"blocks costing >= 1.5: {sum(w >= 1.5 for w in worst)} of 12). At "
            f"{pr['blockdrop']['target']}% MACs, {pr['blockdrop']['steps']} steps, plain views: "
            f"block dropping {pr['blockdrop']['top1']:.2f} "
            f"({pr['blockdrop']['top1'] - pr['teacher']['top1']:+.2f}), DC-ViT default "
            f"{pr['dcvit_default']['top1']:.2f} "
            f"({pr['dcvit_default']['top1'] - pr['teacher']['top1']:+.2f}); "
            f"{pr['seconds']} s in all.",
        ]
    if "family" in sec:
        f = sec["family"]
        L += [
            "",
            f"## Default family ({f['targets']} targets, {len(f['candidates'])} candidates)",
            "",
            f"Procedure: {f.get('procedure')}, {f.get('steps')} finetune steps per candidate, "
            "plain views.",
            "",
            f"Wall time **{f['wall_seconds']} s** ({f['finetune_steps']} finetune steps; detail {f['seconds']}). "
            f"One candidate under the paper schedule: {f['paper_finetunes_per_candidate']} finetunes × "
            f"{f['paper_iterations_per_finetune']} steps × {f['paper_step_seconds']} s/step (measured) = "
            f"**{f['paper_candidate_seconds']:.0f} s**.",
            "",
            "| candidate | achieved | top-1 % | agreement % | s |",
            "|---|---|---|---|---|",
        ]
        for row in f["candidates"]:
            L.append(
                f"| {row['name']} | {row['reduction']:.1f}% | {row['top1']:.2f} | {row['agreement']:.2f} | {row['seconds'] or 0:.0f} |"
            )
    if "family_previous" in sec:
        f = sec["family_previous"]
        tops = ", ".join(f"{row['top1']:.2f}" for row in f["candidates"])
        L += [
            "",
            f"Earlier default (re-fit ranking at every width, 100 steps, RandAugment views in a "
            f"bank of 8): {len(f['candidates'])} candidates in {f['wall_seconds']} s; top-1 {tops}.",
        ]
    L += [
        "",
        f"Total benchmark wall time: {r.get('total_seconds')} s.",
        "",
        "Reproduce: `nice -n 10 python benchmarks/compression_quality.py --threads 1` (trains and "
        "caches the teacher under `benchmarks/.cache/` first; then every section, the "
        "attention-only ablation and the two plain-view variants). The committed file was "
        "produced in three steps on a shared 2-core machine: the main run, then "
        "`--ablation-only` (ablation + variants + the plain-view block-dropping arm), then "
        "`--family-only` after the default procedure was changed to the winning variant (the "
        "earlier default's family is kept above for comparison); the probe section comes from "
        "`--probe p4d48:2`, the plain-view curve from `--curve-plain 50,100,400,1000`.",
        "",
    ]
    return "\n".join(L)


if __name__ == "__main__":
    main()
