"""Fidelity that can tell: how close an artifact is to the original, with its 95% interval
(Wilson for an agreement, paired normal for a top-1 drop) and a continuous measure, KL(original
|| artifact) with its standard error, that ranks with far less variance; and the floors. A floor
is decided on the interval; one that straddles it is decided by the estimate and says so."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.errors import DataError
from dcvit_deploy.store.records import Fidelity

if TYPE_CHECKING:
    import numpy as np
    import torch

    from dcvit_deploy.config.options import DeployOptions
    from dcvit_deploy.store.records import CandidateOutcome

Z95 = 1.959964
SMALL = "too few images to decide it (add --holdout images or --eval-data)"


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of ``k`` successes in ``n`` trials."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, Z95**2
    c = (p + z2 / (2 * n)) / (1 + z2 / n)
    h = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, c - h), min(1.0, c + h)


def closeness(
    reference: np.ndarray, logits: np.ndarray, labels: np.ndarray | None = None, *,
    on_training: bool = False,
) -> Fidelity:  # fmt: skip
    """How close ``logits`` are to the original's ``reference`` logits (N, classes)."""
    import numpy as np

    ref, out = np.asarray(reference, np.float64), np.asarray(logits, np.float64)
    n = len(ref)
    agree = ref.argmax(1) == out.argmax(1)
    logp, logq = (x - x.max(1, keepdims=True) for x in (ref, out))
    logp, logq = (x - np.log(np.exp(x).sum(1, keepdims=True)) for x in (logp, logq))
    kl = (np.exp(logp) * (logp - logq)).sum(1)
    finite = bool(np.isfinite(kl).all())
    cos = (ref * out).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1),
                                          1e-12)  # fmt: skip
    drop = None
    if labels is not None:
        d = (ref.argmax(1) == labels).astype(float) - (out.argmax(1) == labels)
        h = Z95 * d.std(ddof=1) / math.sqrt(n) if n > 1 else 1.0
        drop = (float(d.mean()), float(d.mean() - h), float(d.mean() + h))
    return Fidelity(
        agreement=float(agree.mean()),
        interval=wilson(int(agree.sum()), n),
        samples=n,
        kl=float(kl.mean()) if finite else math.inf,
        kl_se=float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 and finite else 0.0,
        cosine=float(np.nan_to_num(cos).mean()),
        on_training=on_training,
        top1=float((out.argmax(1) == labels).mean()) if labels is not None else None,
        top1_drop=drop,
    )


def _judge(value: float, low: float, high: float, limit: float, above: bool) -> str:
    """``pass`` / ``miss`` when ``[low, high]`` is on one side of ``limit`` (a floor when
    ``above``, else a ceiling); else ``pass?`` / ``miss?`` by the estimate."""
    if not above:  # a ceiling: flip the axis
        value, low, high, limit = -value, -high, -low, -limit
    if value >= limit:
        return "pass" if low >= limit else "pass?"
    return "miss" if high < limit else "miss?"


def apply_floors(
    outcomes: list[CandidateOutcome], dopts: DeployOptions
) -> tuple[list[CandidateOutcome], list[str]]:
    """Mark the artifacts under ``--min-fidelity`` / ``--max-accuracy-drop`` ``below_floor``
    (never chosen), saying which floor they missed by how much; notes for the artifacts that
    pass only by an estimate the images cannot decide."""
    out, notes = [], []
    for o in outcomes:
        f, checks = o.closeness, list[tuple[Any, ...]]()
        if f is None or o.status != "ok":
            out.append(o)
            continue
        if dopts.min_fidelity:
            limit, where = 100 * dopts.min_fidelity, "TRAINING" if f.on_training else "held-out"
            shown = (f"agreement {f.agreement:.1%} [{f.interval[0]:.1%}, {f.interval[1]:.1%}] on "
                     f"{f.samples} {where} images, KL {f.kl:.4g} +- {f.kl_se:.2g}")  # fmt: skip
            checks.append((f"--min-fidelity {limit:g}%", shown, 100 * f.agreement,
                           *(100 * v for v in f.interval), limit, True))  # fmt: skip
        if f.top1_drop and dopts.max_accuracy_drop is not None:
            d, lo, hi = (100 * v for v in f.top1_drop)
            shown = f"top-1 {f.top1:.1%}, {d:.2f} [{lo:.2f}, {hi:.2f}] points below the original"
            checks.append((f"--max-accuracy-drop {dopts.max_accuracy_drop:g}", shown, d, lo, hi,
                           dopts.max_accuracy_drop, False))  # fmt: skip
        misses = []
        for flag, shown, value, lo, hi, limit, above in checks:
            verdict = _judge(value, lo, hi, limit, above)
            if verdict.startswith("miss"):
                misses.append(f"{shown} misses {flag} by {abs(value - limit):.2f} points"
                              + ("" if verdict == "miss" else f"; {SMALL}"))  # fmt: skip
            elif verdict == "pass?":
                notes.append(f"{o.candidate}: {shown} meets {flag}, but {SMALL}")
        out.append(replace(o, status="below_floor", error="; ".join(misses)) if misses else o)
    return out, notes


# --------------------------------------------------------------------------- the images


@dataclass(frozen=True)
class FidelitySet:
    """The images fidelity is measured on, the original's logits there, labels if any."""

    images: torch.Tensor
    reference: np.ndarray
    labels: np.ndarray | None
    fingerprint: str
    on_training: bool


def eval_folders(root: str) -> list[Path]:
    """``--eval-data``'s class sub-folders, sorted (= class index); DataError when none."""
    base = Path(root).expanduser()
    subs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not subs:
        raise DataError(f"--eval-data {root} has no class sub-folders",
                        "give a folder with one sub-folder of images per class (sorted = class "
                        "index)")  # fmt: skip
    return subs


def fidelity_set(prep: Any, eval_data: str | None) -> FidelitySet:
    """``--eval-data`` (labelled) when given, else the held-out images; kept on ``prep`` (so a
    target's node, which has no teacher, gets it with the held-out images)."""
    import numpy as np
    import torch

    from dcvit_deploy.model.images import list_images, load_eval_tensor
    from dcvit_deploy.pipeline.context import tensor_fingerprint

    if prep.fidelity is None or prep.fidelity[0] != eval_data:
        labels, images = None, prep.holdout
        if eval_data:
            parts = [load_eval_tensor(list(list_images(d)), prep.data_config)
                     for d in eval_folders(eval_data)]  # fmt: skip
            images = torch.cat(parts)
            labels = np.concatenate([np.full(len(t), i) for i, t in enumerate(parts)])
        with torch.no_grad():
            teacher = prep.teacher.cpu().eval()
            ref = torch.cat([teacher(images[i : i + 64]) for i in range(0, len(images), 64)])
        if labels is not None and ref.shape[1] <= labels.max():
            fix = "give one sub-folder per model class, sorted in class-index order"
            raise DataError(f"--eval-data {eval_data} has {labels.max() + 1} classes; the model "
                            f"has {ref.shape[1]} outputs", fix)  # fmt: skip
        training = prep.holdout_on_training and not eval_data
        fp = tensor_fingerprint(images)
        prep.fidelity = (eval_data, FidelitySet(images, ref.numpy(), labels, fp, training))
    return prep.fidelity[1]
