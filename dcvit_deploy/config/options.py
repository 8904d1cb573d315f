"""The options of a run: what to compress (:class:`CompressOptions`) and where and under which
budget to deploy it (:class:`DeployOptions`).

These frozen records are the contract between the CLI (which parses strings into them) and the
pipeline units (which read them). Each refuses on construction, in one
:class:`~dcvit_deploy.errors.OptionError` naming the option and the fix, what is wrong with its
own values (ranges, names, combinations); what needs files, the model or a backend is checked by
:mod:`dcvit_deploy.config.validate`. Every choice list is derived from its ``Literal`` type. A
field that changes a unit's result is part of that unit's fingerprint; fields that only say
*where* work runs (``device``) are not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from dcvit_deploy.errors import OptionError
from dcvit_deploy.store.records import Statistic, safe_name

if TYPE_CHECKING:
    from dcvit_deploy.model.images import DataOverrides

Schedule = Literal["default", "paper", "tiny"]
MetricSource = Literal["synthetic", "real"]
Method = Literal["dcvit", "practise"]
Preference = Literal["capacity", "fidelity"]
Train = Literal["pick", "all"]
NeuronChoice = Literal["random", "activation", "weight"]
Inversion = Literal["paper", "fast"]
Device = Literal["auto", "cpu", "cuda"]
Search = Literal["all", "bisect"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
METRIC_SOURCES: tuple[str, ...] = get_args(MetricSource)
METHODS: tuple[str, ...] = get_args(Method)
PREFERENCES: tuple[str, ...] = get_args(Preference)
TRAIN: tuple[str, ...] = get_args(Train)

MAX_TARGETS = 200
"""More targets than this are refused: each is a finetuned candidate, exported, built and
measured (a typo such as ``--targets 1%:99%:0.0025%`` asks for 39,201 of them)."""
MAX_SEED = 2**32 - 1
"""Seeds must fit every RNG the run seeds (NumPy's legacy seeding takes 32-bit values)."""
_TOO_MANY = "each is a candidate to finetune, export, build and measure, and at most"
_COARSER = "use a coarser step, e.g. --targets 5%:40%:2.5%"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any, flag: str, example: str, *, optional: bool = True) -> None:
    if (value is not None or not optional) and (not _is_int(value) or value < 1):
        raise OptionError(f"{flag} must be a positive integer, got {value!r}", f"pass {example}")


def _choose(value: Any, flag: str, kind: Any) -> None:
    """``value`` (or each of a tuple of them) is one of the ``Literal`` type ``kind``'s."""
    allowed = get_args(kind)
    for v in value if isinstance(value, tuple) else (value,):
        if v not in allowed:
            raise OptionError(f"unknown {flag} {v!r}", f"use one of {', '.join(allowed)}")


def check_targets(targets: Sequence[float]) -> None:
    """Targets: at least one, at most :data:`MAX_TARGETS`, each a fraction in (0, 1)."""
    if not targets:
        raise OptionError("no compression targets given", "pass e.g. --targets 5%:40%:5%")
    bad = [t for t in targets if not _finite(t) or not 0 < t < 1]
    if bad:
        raise OptionError(
            f"targets must be MAC reductions between 0% and 100%, got {bad[:3]}",
            "pass e.g. --targets 5%:40%:5% or 16.6%,25%",
        )
    if len(targets) > MAX_TARGETS:
        raise OptionError(f"{len(targets)} targets asked for; {_TOO_MANY} {MAX_TARGETS} are "
                          "accepted", _COARSER)  # fmt: skip


def targets_from_text(text: str) -> tuple[float, ...]:
    """Parse ``--targets``: ``"16.6%,25%"``, ``"0.1,0.2"`` or a range ``"5%:50%:2.5%"``. Percent
    signs are optional on a range/list when values are > 1 (``"5:50:2.5"``); a bare value <= 1
    is a fraction. A range that expands to more than :data:`MAX_TARGETS` values is refused
    *before* it is expanded. Returns sorted unique fractions."""
    text = text.strip()
    if not text:
        raise OptionError("empty --targets", "write e.g. --targets 5%:50%:2.5% or 16.6%,25%")

    def read(tok: str) -> tuple[float, bool]:
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%?)", tok.strip())
        if not m:
            raise OptionError(f"cannot read target {tok.strip()!r}",
                              "write percentages like 16.6% or fractions like 0.166")  # fmt: skip
        return float(m.group(1)), bool(m.group(2))

    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise OptionError(f"range {text!r} needs start:stop:step", "write e.g. 5%:50%:2.5%")
        read_parts = [read(p) for p in parts]
        pct = any(p or v > 1 for v, p in read_parts)
        start, stop, step = (v / 100.0 if pct else v for v, _ in read_parts)
        if step <= 0 or stop < start:
            raise OptionError(f"range {text!r} is empty", "use start <= stop and a positive step")
        span = (stop - start) / step
        count = math.floor(span + 1e-9) + 1 if math.isfinite(span) else math.inf
        if count > MAX_TARGETS:
            raise OptionError(f"--targets {text} expands to {count} targets; {_TOO_MANY} "
                              f"{MAX_TARGETS} are accepted", _COARSER)  # fmt: skip
        values = [round(start + i * step, 10) for i in range(int(count))]
    else:
        read_parts = [read(p) for p in text.split(",") if p.strip()]
        values = [v / 100.0 if p or v > 1 else v for v, p in read_parts]
    targets = tuple(sorted(set(values)))
    check_targets(targets)
    return targets


@dataclass(frozen=True)
class CompressOptions:
    """What to compress and how (the inputs of the family unit).

    ``methods`` may hold both ``dcvit`` and ``practise``: the family then holds candidates of
    both methods. ``seed`` also seeds ``random_init`` weights, so a random teacher is
    reproducible and part of the run's identity.
    """

    model: str
    data: str
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained_cache: bool = False
    random_init: bool = False
    num_samples: int | None = 500
    holdout: int = 32
    data_overrides: DataOverrides | None = None
    targets: tuple[float, ...] = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40)
    methods: tuple[str, ...] = ("dcvit",)
    round_to: int = 1
    neuron_choice: NeuronChoice = "random"
    reuse: bool | None = None  # None: the schedule preset's procedure decides
    warm_fraction: float = 0.5
    schedule: Schedule = "default"
    iterations: int | None = None
    rank_iterations: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    metric: MetricSource = "synthetic"
    inversion: Inversion = "fast"
    inversion_iterations: int | None = None
    candidate_blocks: tuple[int, ...] | None = None
    include_original: bool = True
    seed: int = 0
    device: Device = "auto"
    # "pick": measure every structure, finetune only what selection picks; "all": finetune
    # every candidate first (a procedure whose targets chain always does)
    train: Train = "pick"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise OptionError("no model name given", "pass --model, e.g. deit_small_patch16_224")
        sources = (self.checkpoint is not None, self.pretrained_cache, self.random_init)
        if sum(map(bool, sources)) != 1:
            fix = "pass --checkpoint FILE, or --pretrained-cache, or --random-init"
            raise OptionError("give exactly one weight source", fix)
        _positive(self.num_samples, "--num-samples", "e.g. --num-samples 500")
        _positive(self.holdout, "--holdout", "e.g. --holdout 32", optional=False)
        check_targets(self.targets)
        if not self.methods:
            raise OptionError("no compression method given", f"pass --method {METHODS[0]}")
        _choose(self.methods, "--method", Method)
        if len(set(self.methods)) != len(self.methods):
            raise OptionError(f"--method lists a method twice: {','.join(self.methods)}",
                              "name each method once, e.g. --method dcvit,practise")  # fmt: skip
        _positive(self.round_to, "--round-to", "e.g. --round-to 8 (1: no rounding)", optional=False)
        _choose(self.neuron_choice, "--neuron-choice", NeuronChoice)
        warm = self.warm_fraction
        if not _finite(warm) or not 0 < warm <= 1:
            raise OptionError(f"--warm-fraction must be in (0, 1], got {warm!r}", "pass e.g. "
                              "--warm-fraction 0.5 (1: warm-started targets train as long as the "
                              "first)")  # fmt: skip
        _choose(self.schedule, "--schedule", Schedule)
        _positive(self.iterations, "--iterations", "e.g. --iterations 300, or omit it")
        _positive(self.rank_iterations, "--rank-iterations", "e.g. --rank-iterations 100")
        _positive(self.batch_size, "--train-batch-size", "e.g. --train-batch-size 64, or omit it")
        if self.lr is not None and (not _finite(self.lr) or self.lr <= 0):
            raise OptionError(f"--lr must be a finite number > 0, got {self.lr!r}",
                              "pass e.g. --lr 1e-4, or omit it")  # fmt: skip
        _choose(self.metric, "--metric-set", MetricSource)
        _choose(self.inversion, "--inversion", Inversion)
        _positive(self.inversion_iterations, "--inversion-iterations",
                  "e.g. --inversion-iterations 200")  # fmt: skip
        if self.candidate_blocks is not None and not self.candidate_blocks:
            raise OptionError("--blocks names no block", "pass e.g. --blocks 1-10 or 2,3,5")
        bad = [b for b in self.candidate_blocks or () if not _is_int(b) or b < 0]
        if bad:
            raise OptionError(f"--blocks holds invalid block indices {bad[:3]}",
                              "use block indices >= 0, e.g. --blocks 1-10")  # fmt: skip
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise OptionError(f"--seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}",
                              "pass e.g. --seed 0")  # fmt: skip
        _choose(self.device, "--device", Device)
        _choose(self.train, "--train", Train)

    @property
    def trains_all(self) -> bool:
        """Every candidate is finetuned before any is measured: ``--train all``, or a procedure
        whose targets chain (the paper's progressive compression, ``--reuse``)."""
        return self.train == "all" or self.schedule == "paper" or bool(self.reuse)


@dataclass(frozen=True)
class DeployOptions:
    """Where and under which budget the family is deployed (export, build, profile, select,
    publish).

    The budget is either absolute (``latency_ms``) or relative to the original model measured
    in the same run (``speedup``: the chosen candidate must be at least that many times faster
    than the original, e.g. 1.3), never both. ``precisions`` narrows the profiles' lists;
    ``min_fidelity`` (top-1 agreement with the original, a fraction; 0 = no floor) and, with
    labelled ``eval_data``, ``max_accuracy_drop`` (top-1 points) are the floors an artifact
    must meet (:mod:`dcvit_deploy.selection.fidelity`).
    """

    profile: str = "cpu-ort"
    latency_ms: float | None = None
    speedup: float | None = None
    statistic: Statistic | None = None
    margin: float = 0.0
    batch_size: int | None = None
    search: Search = "all"
    prefer: Preference = "capacity"
    confirm: bool = True
    allow_other_device: bool = False
    triton_repo: str | None = None
    triton_model_name: str | None = None
    triton_replace: bool = False
    triton_pareto: bool = False
    opset: int = 17
    simplify: bool = True
    precisions: tuple[str, ...] | None = None
    min_fidelity: float = 0.0
    eval_data: str | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.profile, str) or not self.profile.strip():
            raise OptionError("no target profile given", "pass e.g. --profile cpu-ort")
        ms, speedup = self.latency_ms, self.speedup
        if ms is not None and (not _finite(ms) or ms <= 0):
            raise OptionError(f"--latency-ms must be a finite number of milliseconds > 0, got "
                              f"{ms!r}", "pass e.g. --latency-ms 5")  # fmt: skip
        if speedup is not None and (not _finite(speedup) or speedup <= 1):
            raise OptionError(
                f"--speedup must be a finite factor > 1 over the original model, got {speedup!r}",
                "pass e.g. --speedup 1.5 (at least 1.5 times faster than the original)",
            )
        if ms is not None and speedup is not None:
            raise OptionError("--latency-ms and --speedup were both given; a budget is absolute "
                              "or relative", "pass only one of them")  # fmt: skip
        if self.statistic is not None:
            _choose(self.statistic, "--statistic", Statistic)
        if not _finite(self.margin) or not 0 <= self.margin < 1:
            raise OptionError(f"--margin must be a fraction in [0, 1) (0% to 99.9%), got "
                              f"{self.margin!r}", "pass e.g. --margin 5%")  # fmt: skip
        _positive(self.batch_size, "--batch-size", "one of the profile's batch sizes, or omit it")
        if not _finite(self.min_fidelity) or not 0 <= self.min_fidelity <= 1:
            raise OptionError(f"--min-fidelity must be in [0, 1], got {self.min_fidelity!r}",
                              "pass e.g. --min-fidelity 0.95 (top-1 agreement)")  # fmt: skip
        drop = self.max_accuracy_drop
        if drop is not None and not (_finite(drop) and drop >= 0 and self.eval_data):
            raise OptionError(f"--max-accuracy-drop {drop!r} needs labelled --eval-data and a "
                              "number of top-1 points >= 0",
                              "pass e.g. --eval-data val/ --max-accuracy-drop 1")  # fmt: skip
        _choose(self.search, "--search", Search)
        _choose(self.prefer, "--prefer", Preference)
        if self.triton_model_name is not None:
            safe_name(self.triton_model_name, "--triton-model-name", OptionError)

    @property
    def has_budget(self) -> bool:
        return self.latency_ms is not None or self.speedup is not None
