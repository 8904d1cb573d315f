"""Measure first, train only what can be chosen: wall time of ``compress`` to a confirmed,
published pick, training every candidate first (``--train all``, the old order) against
measuring every structure first and training the pick (``--train pick``), on the Fashion-MNIST
benchmark teacher (:mod:`compression_quality`'s cached ``p7d48`` teacher and 500-image
few-shot set) with the default procedure and the default ``cpu-ort`` profile.

For each target count (3, 15, 30 by default) both orders run from scratch in their own run
directory, under the same relative budget; the runs are timed end to end and split by unit
(family, train, export, build, profile, select, publish) from their manifests. Then each run is
asked for its choice under every budget of ``--speedups`` (``select`` over the run: no
measurement again; measure-first trains each new pick, training everything trains nothing),
and the choices are compared; where they differ, the report says whether either run had the
choices within noise of the budget.

Writes ``benchmarks/results/latency_first.json`` (top-level ``summary``: ``seconds_eager`` and
``seconds_lazy`` by target count, ``same_choice_fraction``, ``lazy_30_over_lazy_3``, and the
eager/lazy ratio per count) and ``.md``.
Usage: ``python benchmarks/latency_first.py [--quick | --untrained] [--counts 3,15,30]``;
``--quick`` is a smoke run (an untrained teacher, 64 images, the tiny schedule, a short
measurement profile); ``--untrained`` keeps everything but trains no teacher (a timing study:
the cost of a finetune does not depend on the teacher's weights, its choices are less telling).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fmnist
from compression_quality import ARCH, FEWSHOT, MODEL_NAME, TEACHER_TRAIN

from dcvit_deploy.api import run_pipeline, select_over_run
from dcvit_deploy.config.options import CompressOptions, DeployOptions
from dcvit_deploy.model.images import DataOverrides
from dcvit_deploy.store.atomic import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SPEEDUPS = (1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4)
"""Relative budgets (at least this many times faster than the original measured in the same
run): the same budget means the same thing in both runs and on any machine."""
TIMED_SPEEDUP = 1.2
SAME_ROUNDS_UPTO = 15
"""Target counts up to which every structure and trained artifact are measured in the same
rounds (at 30 targets, 124 artifacts: minutes of a diagnostic)."""
TARGET_RANGE = (0.05, 0.35)
QUICK_PROFILE = """
name = "quick-cpu"
backend = "onnxruntime"
device = "cpu"
precision = "fp32"
batch_sizes = [1]
budget_batch_size = 1
statistic = "p50"
scope = "host"
[measure]
warmup_iters = 3
warmup_min_s = 0.0
window_iters = 10
min_window_s = 0.0
min_windows = 2
max_windows = 3
min_duration_s = 0.0
min_rounds = 2
max_rounds = 3
[backend_options]
intra_op_num_threads = 1
"""


def targets_for(n: int) -> tuple[float, ...]:
    lo, hi = TARGET_RANGE
    return tuple(round(lo + i * (hi - lo) / (n - 1), 6) for i in range(n))


def setup(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The teacher as a checkpoint file, the few-shot folder and the compress options' base."""
    from safetensors.torch import save_file

    if args.quick or args.untrained:
        torch.manual_seed(0)
        teacher = fmnist.build_teacher(fmnist.TEACHERS[ARCH])
        # timm initialises biases to exactly 0, and the ONNX simplifier folds x + 0 away: a
        # random structure's graph then lacks Adds its finetuned version has (measured: 15 of
        # 308 nodes, ~6% faster). No trained teacher has zero biases; give this one none either.
        with torch.no_grad():
            for name, p in teacher.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.02)
    else:
        teacher, _info = fmnist.train_teacher(arch=ARCH, threads=args.threads, **TEACHER_TRAIN)
    checkpoint = work / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(checkpoint))
    few = fmnist.CACHE_DIR / f"fewshot-{FEWSHOT}-28"
    if not few.is_dir() or len(list(few.glob("*.png"))) != FEWSHOT:
        fmnist.write_fewshot_folder(few, n=FEWSHOT, seed=0, size=28)
    size = int(fmnist.TEACHERS[ARCH]["img_size"])
    base: dict[str, Any] = {
        "model": MODEL_NAME,
        "data": str(few),
        "checkpoint": str(checkpoint),
        "model_kwargs": dict(fmnist.TEACHERS[ARCH]),
        "num_samples": 64 if args.quick else FEWSHOT,
        "holdout": 32,
        "data_overrides": DataOverrides(
            img_size=size,
            mean=fmnist.FMNIST_MEAN,
            std=fmnist.FMNIST_STD,
            interpolation="bilinear",
            crop_pct=1.0,
        ),
        "schedule": "tiny" if args.quick else "default",
        "inversion_iterations": 5 if args.quick else None,
        "seed": 0,
    }
    if args.quick:
        base["iterations"] = 20
    profile = "cpu-ort"
    if args.quick:
        (work / "quick-cpu.toml").write_text(QUICK_PROFILE)
        profile = str(work / "quick-cpu.toml")
    return {"compress": base, "profile": profile}


def by_kind(out: Path) -> dict[str, float]:
    """Seconds the run's units took, by kind (``family``, ``train``, ``export``, ...)."""
    units = json.loads((out / "manifest.json").read_text())["units"]
    kinds: dict[str, float] = {}
    for uid, rec in units.items():
        kind = uid.split("/")[0]
        kinds[kind] = round(kinds.get(kind, 0.0) + float(rec.get("seconds") or 0.0), 2)
    return kinds


def trained_count(out: Path) -> int:
    units = json.loads((out / "manifest.json").read_text())["units"]
    return sum(1 for u, r in units.items() if u.startswith("train/") and r["status"] == "ok")


ORDERS = {"eager": ("all", "all"), "lazy": ("pick", "all"), "bisect": ("pick", "bisect")}
"""Order -> (``--train``, ``--search``): training everything first; measuring every structure
first and training the pick (the default); the same with ``--search bisect``, which makes and
measures only the structures its O(log N) search per precision reaches."""


def one_run(
    setup_: dict[str, Any], n: int, order: str, work: Path, *, reuse: bool = False
) -> dict[str, Any]:
    """One timed ``compress`` from scratch; its figures are kept next to its run directory, so
    the orders can run as separate processes (``--orders``) and be summarised later
    (``--reuse``)."""
    train, search = ORDERS[order]
    out = work / f"{order}-{n}"
    kept = work / f"{order}-{n}.timing.json"
    if reuse and kept.is_file():
        return json.loads(kept.read_text())
    shutil.rmtree(out, ignore_errors=True)
    copts = CompressOptions(**setup_["compress"], targets=targets_for(n), train=train)  # type: ignore[arg-type]
    dopts = DeployOptions(profile=setup_["profile"], speedup=TIMED_SPEEDUP, search=search)  # type: ignore[arg-type]
    load = os.getloadavg()[0]  # a shared machine: the figures mean little when this is high
    t0 = time.perf_counter()
    result = run_pipeline(copts, dopts, out)
    seconds = time.perf_counter() - t0
    sel = result.selection
    got = {
        "out": str(out),
        "seconds": round(seconds, 1),
        "load_before_after": [round(load, 2), round(os.getloadavg()[0], 2)],
        "units": by_kind(out),
        "candidates": len(result.outcomes),
        "trained": trained_count(out),
        "chosen": sel.chosen if sel else None,
        "published": [m["candidate"] for m in result.published.get("models", [])],
        "commit": _commit(),
    }
    atomic_write_json(kept, got)
    return got


def _commit() -> str:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def choices(out: Path, profile: str, search: str = "all") -> list[dict[str, Any]]:
    """The run's choice under every budget of :data:`SPEEDUPS`, with what it was made on: the
    decision after re-measuring what is within noise of that budget, measure-first training
    each new pick, without the fresh-process confirmation (about 20 s a budget; the timed runs
    confirm)."""
    rows = []
    for s in SPEEDUPS:
        t0 = time.perf_counter()
        dopts = DeployOptions(profile=profile, speedup=s, search=search, confirm=False)  # type: ignore[arg-type]
        res = select_over_run(out, dopts)
        sel = res.selection
        assert sel is not None
        chosen = sel.chosen
        rows.append(
            {
                "speedup": s,
                "budget_ms": round(sel.budget.ms, 4),
                "budget_spread_ms": round(sel.budget.spread_ms, 4),
                "chosen": chosen,
                "figure": sel.figures.get(chosen) if chosen else None,
                "uncertain": list(sel.uncertain),
                "seconds": round(time.perf_counter() - t0, 1),
                "trained": trained_count(out),
            }
        )
    return rows


def compare(
    eager: list[dict[str, Any]], lazy: list[dict[str, Any]], bisect: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    rows = []
    for i, (e, z) in enumerate(zip(eager, lazy, strict=True)):
        same = e["chosen"] == z["chosen"]
        noisy = sorted({*e["uncertain"], *z["uncertain"]} & {e["chosen"], z["chosen"]} - {None})
        rows.append(
            {
                "speedup": e["speedup"],
                "eager": e["chosen"],
                "lazy": z["chosen"],
                "same": same,
                "within_noise": noisy if not same else [],
                **(_bisect_row(e, bisect[i]) if bisect else {}),
            }
        )
    return rows


def _bisect_row(e: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    same = e["chosen"] == b["chosen"]
    noisy = sorted({*e["uncertain"], *b["uncertain"]} & {e["chosen"], b["chosen"]} - {None})
    return {"bisect": b["chosen"], "bisect_same": same,
            "bisect_within_noise": noisy if not same else []}  # fmt: skip


def same_rounds(eager: Path, lazy: Path, profile: str) -> dict[str, Any]:
    """Every structure (from the measure-first run) and every trained artifact (from the
    train-everything run) measured in the same interleaved rounds, and the choice each set of
    figures gives under every budget: what the weights alone change, without the drift
    between two runs measured at different times."""
    import dataclasses

    from dcvit_deploy.backends import get_backend
    from dcvit_deploy.config.profiles import load_profile
    from dcvit_deploy.latency.rounds import measure_rounds
    from dcvit_deploy.pipeline.outcomes import outcomes_for
    from dcvit_deploy.pipeline.units.compressing import current_family
    from dcvit_deploy.selection.decide import decide, relative_budget
    from dcvit_deploy.store.rundir import RunDir

    prof = load_profile(profile)
    outcomes: dict[str, list[Any]] = {}
    for tag, out in (("trained", eager), ("structure", lazy)):
        with RunDir.load(out, lock=False) as run:
            outcomes[tag] = [o for o in outcomes_for(run, current_family(run), prof) if o.artifact]
    arts = {f"{o.candidate}@{t}": o.artifact for t, outs in outcomes.items() for o in outs}
    res = measure_rounds(get_backend(prof.backend), arts, prof, [1], seed=7)
    figures = {k: [round(res.at(k, 1).p50, 5), round(res.at(k, 1).spread("p50"), 5)] for k in arts}
    rows = []
    for sp in SPEEDUPS:
        chosen = {}
        for t, outs in outcomes.items():
            measured = [
                dataclasses.replace(o, latency=(res.at(f"{o.candidate}@{t}", 1),)) for o in outs
            ]
            ref = next(o for o in measured if o.candidate == "original").latency[0]
            budget = relative_budget(sp, ref, statistic="p50", batch_size=1)
            chosen[t] = decide(measured, budget).chosen
        rows.append({"speedup": sp, **chosen, "same": chosen["trained"] == chosen["structure"]})
    apart = [
        n.split("@")[0]
        for n, (f, sp) in figures.items()
        if n.endswith("@structure")
        and abs(f - figures[n.replace("@structure", "@trained")][0])
        > sp + figures[n.replace("@structure", "@trained")][1]
    ]
    return {"rounds": res.rounds, "figures": figures, "choices": rows, "apart": apart}


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    runs = r["runs"]
    eager = {n: v["eager"]["seconds"] for n, v in runs.items() if "eager" in v}
    lazy = {n: v["lazy"]["seconds"] for n, v in runs.items()}
    cmp_rows = [row for v in runs.values() for row in v.get("choices", [])]
    same = sum(row["same"] for row in cmp_rows)
    counts = sorted(eager, key=int)
    out: dict[str, Any] = {
        "seconds_eager": eager,
        "seconds_lazy": lazy,
        "eager_over_lazy": {n: round(eager[n] / lazy[n], 2) for n in counts},
        "same_choice_fraction": round(same / len(cmp_rows), 3) if cmp_rows else None,
        "same_choice_fraction_same_rounds": _fraction(
            [
                row["same"]
                for v in runs.values()
                for row in v.get("same_rounds", {}).get("choices", [])
            ]
        ),
        "structure_vs_trained_apart": {
            n: len(runs[n]["same_rounds"]["apart"]) for n in counts if "same_rounds" in runs[n]
        },
        "budgets": len(SPEEDUPS),
        "compared": len(cmp_rows),
        "finetunes_eager": {n: runs[n]["eager"]["trained"] for n in counts},
        "finetunes_lazy": {n: v["lazy"]["trained"] for n, v in runs.items()},
    }
    if "3" in lazy and "30" in lazy:
        out["lazy_30_over_lazy_3"] = round(lazy["30"] / lazy["3"], 2)
    bisect = {n: v["bisect"]["seconds"] for n, v in runs.items() if "bisect" in v}
    if bisect:
        rows = [row for row in cmp_rows if "bisect" in row]
        out["seconds_bisect"] = bisect
        out["eager_over_bisect"] = {
            n: round(eager[n] / bisect[n], 2) for n in counts if n in bisect
        }
        out["finetunes_bisect"] = {n: runs[n]["bisect"]["trained"] for n in bisect}
        out["same_choice_fraction_bisect"] = _fraction([row["bisect_same"] for row in rows])
        if "3" in bisect and "30" in bisect:
            out["bisect_30_over_bisect_3"] = round(bisect["30"] / bisect["3"], 2)
    return out


def _fraction(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 3) if flags else None


def render(r: dict[str, Any]) -> str:
    s = r["summary"]
    lines = [
        "# Measure first, train only what can be chosen",
        "",
        f"{r['setup']}",
        "",
        "## Summary",
        "",
        "| key | value |",
        "|---|---|",
        *[f"| `{k}` | {json.dumps(v)} |" for k, v in s.items()],
        "",
        "## Wall time of `compress` to a confirmed, published pick (s), and where it went",
        "",
        "| targets | order | seconds | finetunes | chosen | family | train | export | build "
        "| profile | select | publish | report | load before, after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, v in sorted(r["runs"].items(), key=lambda kv: int(kv[0])):
        for order in [o for o in ORDERS if o in v]:
            run = v[order]
            u = run["units"]
            cells = [u.get(k, 0) for k in ("family", "train", "export", "build", "profile",
                                           "select", "publish", "report")]  # fmt: skip
            lines.append(
                f"| {n} | {order} | {run['seconds']} | {run['trained']} | {run['chosen']} | "
                + " | ".join(str(c) for c in cells)
                + f" | {run.get('load_before_after', '-')} |"
            )
    lines += ["", "## Choices per budget (at least X times faster than the original)", ""]
    for n, v in sorted(r["runs"].items(), key=lambda kv: int(kv[0])):
        lines += [f"### {n} targets", "", "| speedup | eager | lazy | same | within noise "
                  "| bisect | same | within noise |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in v.get("choices", []):
            lines.append(
                f"| {row['speedup']} | {row['eager']} | {row['lazy']} | "
                f"{'yes' if row['same'] else '**no**'} | {', '.join(row['within_noise']) or '-'} | "
                f"{row.get('bisect', '-')} | "
                f"{'-' if 'bisect' not in row else 'yes' if row['bisect_same'] else '**no**'} | "
                f"{', '.join(row.get('bisect_within_noise', [])) or '-'} |"
            )
        lines.append("")
    lines += [
        "## Structures and trained artifacts in the same rounds",
        "",
        "Every structure and every trained artifact measured together (interleaved rounds), and "
        "the choice each set of figures gives (decision only: no re-measurement, no "
        "confirmation):",
        "",
    ]
    for n, v in sorted(r["runs"].items(), key=lambda kv: int(kv[0])):
        sr = v.get("same_rounds")
        if sr is None:
            continue
        same = sum(row["same"] for row in sr["choices"])
        lines.append(
            f"- {n} targets ({sr['rounds']} rounds): same choice for {same} of "
            f"{len(sr['choices'])} budgets; structure and trained figure apart beyond both "
            f"spreads for {len(sr['apart'])} of {len(sr['figures']) // 2} candidates"
            + (f" ({', '.join(sr['apart'])})" if sr["apart"] else "")
            + "; "
            + ", ".join(
                f"{row['speedup']}x: {row['structure']}"
                + ("" if row["same"] else f" vs trained {row['trained']}")
                for row in sr["choices"]
            )
        )
    lines += [
        "",
        "For measure-first, `select` includes the units of the pick's training, export and build "
        "(they ran inside it), which are also counted in their own columns.",
        "",
        "## Findings",
        "",
        *[f"- {f}" for f in findings(r)],
        "",
    ]
    return "\n".join(lines)


def findings(r: dict[str, Any]) -> list[str]:
    s, runs = r["summary"], r["runs"]
    out = []
    for n in sorted(runs, key=int):
        e, z = runs[n].get("eager"), runs[n]["lazy"]
        if e is None:
            out.append(f"{n} targets: measuring first {z['seconds']} s ({z['trained']} "
                       "finetune(s)); training everything was not run at this count.")  # fmt: skip
            continue
        fixed = sum(z["units"].get(k, 0) for k in ("family", "profile"))
        out.append(
            f"{n} targets: training everything took {e['seconds']} s ({e['trained']} finetunes, "
            f"{e['units'].get('train', 0)} s of them), measuring first {z['seconds']} s "
            f"({z['trained']} finetune(s)): {s['eager_over_lazy'][n]}x. Both orders pay the "
            f"family (ranking, structures) and the export, build and measurement of every "
            f"candidate (measure-first: family + profile {round(fixed, 1)} s, export "
            f"{z['units'].get('export', 0)} s)."
        )
    if "15" in s["eager_over_lazy"]:
        met = s["eager_over_lazy"]["15"] >= 5
        out.append(
            f"Target 'measure-first at least 5x cheaper at 15 targets': {'met' if met else 'NOT met'}."
        )
    if "lazy_30_over_lazy_3" in s:
        met = s["lazy_30_over_lazy_3"] <= 1.3
        out.append(
            f"Target '30 targets at most 1.3x of 3' (measure-first): {s['lazy_30_over_lazy_3']}x, "
            f"{'met' if met else 'NOT met'}."
        )
    rows = [(n, row) for n in sorted(runs, key=int) for row in runs[n].get("choices", [])]
    differ = [f"{n} targets at {row['speedup']}x: eager {row['eager']}, lazy {row['lazy']}"
              + (f" (within noise: {', '.join(row['within_noise'])})" if row["within_noise"]
                 else " (not flagged within noise)") for n, row in rows if not row["same"]]  # fmt: skip
    out.append(
        f"Same choice for {sum(row['same'] for _, row in rows)} of {len(rows)} budgets "
        f"({s['same_choice_fraction']}; target >= 0.9: "
        f"{'met' if (s['same_choice_fraction'] or 0) >= 0.9 else 'NOT met'})"
        + (": " + "; ".join(differ) if differ else ".")
    )
    if "seconds_bisect" in s:
        b = s["seconds_bisect"]
        out.append(
            f"With --search bisect (measure-first, only what the search reaches is made and "
            f"measured): {b} s; eager/bisect {s['eager_over_bisect']}; 30/3 targets "
            f"{s.get('bisect_30_over_bisect_3')}x; same choice as training everything for "
            f"{s['same_choice_fraction_bisect']} of budgets."
        )
    return out


def merge(files: list[Path], stem: Path) -> None:
    """One results file from invocations that ran other target counts (e.g. at the same time,
    each with its own ``--work``): their runs side by side, summarised again."""
    parts = [json.loads(f.read_text()) for f in files]
    r = {**parts[0], "runs": {n: v for p in parts for n, v in p["runs"].items()}}
    r["setup"] += (
        " Merged from separate invocations: "
        + "; ".join(
            f"{f.name} (targets {', '.join(p['runs'])})" for f, p in zip(files, parts, strict=True)
        )
        + "."
    )
    r["summary"] = summarize(r)
    atomic_write_json(Path(f"{stem}.json"), r)
    atomic_write_text(Path(f"{stem}.md"), render(r))
    print(json.dumps(r["summary"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (untrained teacher)")
    ap.add_argument("--untrained", action="store_true", help="timing study: no teacher training")
    ap.add_argument("--counts", default="3,15,30", help="target counts, e.g. 3,15,30")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (teacher training)")
    ap.add_argument("--out", type=Path, default=None, help="results file stem")
    ap.add_argument("--work", type=Path, default=None,
                    help="run directories (default: under benchmarks/.cache)")  # fmt: skip
    ap.add_argument("--orders", default="eager,lazy,bisect",
                    help="run only these orders (eager, lazy, bisect)")  # fmt: skip
    ap.add_argument("--reuse", action="store_true",
                    help="take the timed runs kept by an earlier invocation; run the rest")  # fmt: skip
    ap.add_argument("--timings-only", action="store_true",
                    help="summarise the timed runs only, without the choices under other budgets")  # fmt: skip
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="combine the results files of separate invocations (other counts)")  # fmt: skip
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out or RESULTS / "latency_first")
        return
    torch.set_num_threads(args.threads)
    work = args.work or fmnist.CACHE_DIR / (
        "latency-first-quick" if args.quick else "latency-first"
    )
    work.mkdir(parents=True, exist_ok=True)
    s = setup(args, work)
    counts = [int(c) for c in args.counts.split(",")]
    r: dict[str, Any] = {
        "setup": (
            f"Teacher {ARCH} ({'trained, cached' if not (args.quick or args.untrained) else 'untrained'}), "
            f"{s['compress']['num_samples']} few-shot images, schedule "
            f"{s['compress']['schedule']}, profile {Path(s['profile']).stem}, targets "
            f"{TARGET_RANGE[0]:.0%}..{TARGET_RANGE[1]:.0%} evenly spaced, timed budget "
            f"--speedup {TIMED_SPEEDUP}; {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}."
        ),
        "quick": args.quick,
        "runs": {},
    }
    name = "latency_first" + ("_quick" if args.quick else "_untrained" if args.untrained else "")
    stem = args.out or RESULTS / name
    for n in counts:
        run: dict[str, Any] = {}
        for order in ORDERS:
            if order in args.orders.split(","):
                run[order] = one_run(s, n, order, work, reuse=args.reuse)
                print(f"{n} targets, {order}: {run[order]['seconds']} s", flush=True)
        if "lazy" not in run:  # training everything alone: kept for a later --reuse
            continue
        if args.timings_only or "eager" not in run:  # the timed runs alone (the choices take
            r["runs"][str(n)] = run  # long), or measure-first alone
            r["summary"] = summarize(r)
            atomic_write_json(Path(f"{stem}.json"), r)
            atomic_write_text(Path(f"{stem}.md"), render(r))
            continue
        picks = {o: choices(Path(run[o]["out"]), s["profile"], ORDERS[o][1]) for o in run}
        run["choices"] = compare(picks["eager"], picks["lazy"], picks.get("bisect"))
        run["picks"] = picks
        if n <= SAME_ROUNDS_UPTO:
            run["same_rounds"] = same_rounds(
                Path(run["eager"]["out"]), Path(run["lazy"]["out"]), s["profile"]
            )
        r["runs"][str(n)] = run
        r["summary"] = summarize(r)
        atomic_write_json(Path(f"{stem}.json"), r)
        atomic_write_text(Path(f"{stem}.md"), render(r))
    print(json.dumps(r.get("summary", {}), indent=1))


if __name__ == "__main__":
    main()
