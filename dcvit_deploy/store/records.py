"""Frozen, validated records that cross module boundaries and go to disk; their fields are
their file format (:mod:`dcvit_deploy.store.serde` writes and reads them)."""

from __future__ import annotations

import statistics
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from dcvit_deploy.store.serde import (  # noqa: F401  (re-exported: records are read with them)
    SCHEMA_VERSION,
    from_dict,
    read_json,
    safe_name,
    to_dict,
)

Statistic = Literal["mean", "p50", "p90", "p95", "p99"]
STATISTICS: tuple[str, ...] = typing.get_args(Statistic)
Precision = Literal["fp32", "fp16", "bf16", "int8", "fp8"]
PRECISION_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "fp8": 8}
BlockKind = Literal["attn_mlp", "mlp", "identity"]
Scope = Literal["host", "device_compute", "device_with_copies"]
WeightsState = Literal["structure", "trained"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class BlockSpec:
    """One transformer block of a (compressed) ViT: ``attn_mlp`` the original, ``mlp`` FFN-only
    (``x + ls2(mlp(norm2(x)))``), ``identity`` dropped. ``kept``: the original fc1 rows / fc2
    columns kept, in order (``None``: all)."""

    kind: BlockKind
    mlp_hidden: int
    kept: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check(self.kind in typing.get_args(BlockKind), f"unknown block kind {self.kind!r}")
        _check(self.mlp_hidden >= 0, "mlp_hidden must be >= 0")
        if self.kind == "identity":
            _check(self.mlp_hidden == 0, "an identity block has mlp_hidden 0")
        if self.kept is not None:
            _check(len(self.kept) == self.mlp_hidden, "kept must list mlp_hidden neurons")
            _check(len(set(self.kept)) == len(self.kept), "kept neurons must be distinct")


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to rebuild a candidate's module from the base timm model name: its
    construction ``model_kwargs`` and one :class:`BlockSpec` per original block."""

    model_name: str
    model_kwargs: dict[str, Any]
    embed_dim: int
    num_heads: int
    base_mlp_hidden: int
    blocks: tuple[BlockSpec, ...]

    def __post_init__(self) -> None:
        _check(len(self.blocks) > 0, "an ArchSpec needs at least one block")
        kept = [k for b in self.blocks for k in b.kept or ()]
        _check(all(0 <= k < self.base_mlp_hidden for k in kept), "kept neuron index out of range")

    @property
    def depth(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class MacCount:
    """Per-image multiply-accumulates and parameters. ``linear_norm``: the reference code's
    convention (linear layers without bias, LayerNorm, patch embedding, head); ``full`` adds the
    QK^T and AV products of every attention branch still present."""

    linear_norm: int
    full: int
    params: int


@dataclass(frozen=True)
class Candidate:
    """One compressed (or original) model: structure, cost, how it was made, and its
    ``weights`` (a safetensors file next to its JSON). ``state``: ``structure`` (surgery and
    closed-form re-fit, not finetuned) or ``trained`` (final; the original is trained as it is)."""

    name: str
    method: str
    target_reduction: float
    arch: ArchSpec
    macs: MacCount
    base_macs: MacCount
    recipe: dict[str, Any]
    seed: int
    input_fingerprint: str
    weights: str
    weights_sha256: str
    state: WeightsState = "trained"

    @property
    def key(self) -> str:
        """The file stem of this record and its artifacts: ``<name>`` or ``<name>.trained``."""
        return self.weights.removesuffix(".safetensors")

    def __post_init__(self) -> None:
        safe_name(self.name, "candidate name")

    @property
    def reduction(self) -> float:
        """Achieved MAC reduction under the reference convention (0 for the original)."""
        return 1.0 - self.macs.linear_norm / self.base_macs.linear_norm

    @property
    def retained(self) -> float:
        return self.macs.linear_norm / self.base_macs.linear_norm


# --------------------------------------------------------------------------- targets & measurement


@dataclass(frozen=True)
class MeasureSettings:
    """How the shared timing loop (:mod:`dcvit_deploy.latency.loop`) measures. A run is
    ``stable`` when its window medians agree within ``stability_tolerance`` and its samples' CoV
    is at most ``max_cov`` (a bimodal run can have agreeing medians and a CoV of 40 %). Rounds
    interleave candidates (:mod:`dcvit_deploy.latency.rounds`): ``min_rounds`` to ``max_rounds``
    of them, each a warm-up and ``round_windows`` windows per candidate."""

    warmup_iters: int = 10
    warmup_min_s: float = 0.2
    window_iters: int = 50
    min_window_s: float = 0.2
    max_windows: int = 10
    min_windows: int = 3
    stability_tolerance: float = 0.10
    min_duration_s: float = 1.0
    cuda_graphs: bool = False
    no_copy: bool = True
    max_cov: float = 0.25
    min_rounds: int = 3
    max_rounds: int = 7
    round_windows: int = 2

    def __post_init__(self) -> None:
        _check(self.warmup_iters >= 0, "warmup_iters must be >= 0")
        _check(self.max_cov > 0, "max_cov must be > 0")
        _check(self.min_rounds >= 1, "min_rounds must be >= 1")
        _check(self.max_rounds >= self.min_rounds, "max_rounds must be >= min_rounds")
        _check(self.round_windows >= 1, "round_windows must be >= 1")
        _check(self.window_iters >= 1, "window_iters must be >= 1")
        _check(self.min_windows >= 1, "min_windows must be >= 1")
        _check(self.max_windows >= self.min_windows, "max_windows must be >= min_windows")
        _check(0 < self.stability_tolerance < 1, "stability_tolerance must be in (0, 1)")
        _check(self.min_duration_s >= 0, "min_duration_s must be >= 0")


@dataclass(frozen=True)
class QuantizeSettings:
    """A profile's ``[quantize]`` (:mod:`dcvit_deploy.export.quantize`): ``auto`` measures the
    ``dynamic`` and ``static`` methods once on a CPU; ``ops`` are the op types quantized;
    ``attention`` quantizes the attention MatMuls too (for targets that fuse them)."""

    method: Literal["auto", "dynamic", "static"] = "auto"
    calibration_images: int = 32
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    ops: tuple[str, ...] = ("MatMul", "Gemm")
    attention: bool = False

    def __post_init__(self) -> None:
        _check(self.calibration_images >= 1, "calibration_images must be >= 1")


@dataclass(frozen=True)
class TargetProfile:
    """A deployment target: runtime, device, precision, shapes, budget statistic, measurement.

    ``precision`` is the reference (a float one; its artifacts keep the bare candidate name),
    ``precisions`` every precision the profile tries (empty: the reference alone)."""

    name: str
    backend: str
    device: Literal["cpu", "cuda"]
    precision: Precision
    batch_sizes: tuple[int, ...]
    budget_batch_size: int
    statistic: Statistic
    scope: Scope
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    backend_options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    gpu: str = ""
    precisions: tuple[Precision, ...] = ()
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)

    def __post_init__(self) -> None:
        listed = not self.precisions or self.precision in self.precisions
        _check(listed, f"precisions = {list(self.precisions)} leaves out {self.precision!r}")
        _check(len(self.batch_sizes) > 0, "batch_sizes must not be empty")
        _check(all(b >= 1 for b in self.batch_sizes), "batch_sizes must be >= 1")
        _check(
            self.budget_batch_size in self.batch_sizes,
            f"budget_batch_size = {self.budget_batch_size} must be one of batch_sizes "
            f"{list(self.batch_sizes)}",
        )

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)


@dataclass(frozen=True)
class LatencyStats:
    """Per-iteration latency (ms) of one artifact at one batch size. Measured in interleaved
    rounds (:mod:`dcvit_deploy.latency.rounds`), each statistic is the median of its per-round
    values (``round_figures``; ``round_medians``: each round's p50, ``spread_ms`` their spread,
    see :meth:`spread`). ``settle_windows``: leading windows left out as not yet settled;
    ``machine``: load, CPU governor, runtime threads
    (:func:`dcvit_deploy.latency.machine.machine_state`); ``actions``: what was done about
    instability, in order."""

    batch_size: int
    iterations: int
    mean: float
    std: float
    cov: float
    min: float
    max: float
    p50: float
    p90: float
    p95: float
    p99: float
    throughput: float
    scope: Scope
    timer: str
    windows: int
    window_medians: tuple[float, ...]
    stable: bool
    warmup_iters: int
    duration_s: float
    warnings: tuple[str, ...] = ()
    settle_windows: int = 0
    rounds: int = 1
    round_medians: tuple[float, ...] = ()
    round_figures: dict[str, tuple[float, ...]] = field(default_factory=dict)
    spread_ms: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    actions: tuple[str, ...] = ()

    def stat(self, name: str) -> float:
        _check(name in STATISTICS, f"unknown statistic {name!r}; use one of {STATISTICS}")
        return float(getattr(self, name))

    def spread(self, name: str) -> float:
        """Uncertainty (ms) of statistic ``name``: the interquartile range of its per-round
        values when measured in rounds, else of the settled window medians (scaled from p50 to
        the statistic) -- 0 when only one value exists. Decisions treat
        ``stat(name) +- spread(name)`` as "within noise"."""
        _check(name in STATISTICS, f"unknown statistic {name!r}; use one of {STATISTICS}")
        values = self.round_figures.get(name)
        if values is None and name == "p50" and self.round_medians:
            values = self.round_medians
        settled = self.window_medians[self.settle_windows :]
        if values is None and self.rounds <= 1 and settled:
            # Window medians scale with the statistic: the spread is relative to p50.
            scale = self.stat(name) / self.p50 if self.p50 > 0 else 1.0
            values = tuple(m * scale for m in settled)
        if not values or len(values) < 2:
            return self.spread_ms if name == "p50" else 0.0
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")  # numpy's interpolation
        return q3 - q1


@dataclass(frozen=True)
class Verification:
    """Agreement of an artifact's outputs with the PyTorch model on the same real inputs."""

    max_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float
    finite: bool
    passed: bool
    samples: int
    reason: str = ""


@dataclass(frozen=True)
class Fidelity:
    """Closeness of an artifact's outputs to the original's (FP32) on ``samples`` images: top-1
    ``agreement`` and its 95% Wilson ``interval``, mean KL(original || artifact) and its standard
    error, mean logit cosine; with labels ``top1`` and ``top1_drop`` (the original's top-1 minus
    this one, with its paired 95% interval). See :mod:`dcvit_deploy.selection.fidelity`."""

    agreement: float
    interval: tuple[float, float]
    samples: int
    kl: float
    kl_se: float
    cosine: float
    on_training: bool = False
    top1: float | None = None
    top1_drop: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class Artifact:
    """A built, runnable artifact (an ONNX file, a TensorRT plan...) and its build facts."""

    candidate: str
    backend: str
    path: str
    sha256: str
    precision: Precision
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    build_seconds: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LatencyBudget:
    """``statistic`` of latency at ``batch_size``, plus ``margin`` (a fraction), must be <= ms.
    A relative budget (:func:`dcvit_deploy.selection.decide.relative_budget`) is ``reference_ms
    / speedup``, ``reference_ms`` being candidate ``reference``'s figure in the same run, whose
    round-to-round ``reference_spread_ms`` makes the budget uncertain by ``spread / speedup``."""

    ms: float
    statistic: Statistic
    batch_size: int
    margin: float = 0.0
    speedup: float | None = None
    reference: str = ""
    reference_ms: float | None = None
    reference_spread_ms: float = 0.0

    def __post_init__(self) -> None:
        _check(self.ms > 0, "the latency budget must be > 0 ms")
        _check(0 <= self.margin < 1, "the margin must be a fraction in [0, 1)")
        _check(self.statistic in STATISTICS, f"statistic must be one of {STATISTICS}")
        if self.speedup is not None:
            _check(self.speedup > 0, "speedup must be > 0")
            _check(bool(self.reference), "a relative budget names its reference candidate")
            _check(self.reference_ms is not None, "a relative budget records reference_ms")
        _check(self.reference_spread_ms >= 0, "reference_spread_ms must be >= 0")

    @property
    def relative(self) -> bool:
        return self.speedup is not None

    @property
    def spread_ms(self) -> float:
        """Uncertainty of ``ms`` itself: 0 for an absolute budget."""
        return self.reference_spread_ms / self.speedup if self.speedup else 0.0

    def admits(self, stats: LatencyStats) -> bool:
        """``figure x (1 + margin) <= ms``, up to float rounding (1e-9 relative): 3.0 ms with a
        5% margin fits 3.15 ms although ``3.0 * 1.05`` is ``3.1500000000000004``."""
        return stats.stat(self.statistic) * (1.0 + self.margin) <= self.ms * (1.0 + 1e-9)


# --------------------------------------------------------------------------- outcomes & selection

OutcomeStatus = Literal["ok", "export_failed", "verify_failed", "build_failed", "profile_failed",
                        "not_measured", "below_floor"]  # fmt: skip


@dataclass(frozen=True)
class CandidateOutcome:
    """What happened to one artifact (``<candidate>.<precision>`` off the reference precision)
    on one target: verification, latency per batch size, or the failure. ``fidelity``: top-1
    agreement with the original on held-out images (``closeness``: the full :class:`Fidelity`);
    ``measured_on``: the weights its figures had; ``trained``: whether the candidate has been
    finetuned (a structure is measured before, and unless, it is chosen)."""

    candidate: str
    method: str
    retained: float
    macs: MacCount
    status: OutcomeStatus
    verification: Verification | None = None
    latency: tuple[LatencyStats, ...] = ()
    fidelity: float | None = None
    artifact: Artifact | None = None
    error: str = ""
    measured_on: WeightsState = "trained"
    trained: bool = True
    precision: str = ""
    closeness: Fidelity | None = None

    def __post_init__(self) -> None:
        safe_name(self.candidate, "candidate name")

    def latency_at(self, batch_size: int) -> LatencyStats | None:
        for s in self.latency:
            if s.batch_size == batch_size:
                return s
        return None

    @property
    def selectable(self) -> bool:
        return self.status == "ok" and (self.verification is None or self.verification.passed)


ReasonKind = Literal["chosen", "fits", "over", "confirmation_failed", "not_confirmed",
                     "not_deployable", "export_failed", "verify_failed", "build_failed",
                     "profile_failed", "below_floor", "not_measured", "not_searched",
                     "recorded"]  # fmt: skip
Relation = Literal["", "smaller", "lower precision", "lower fidelity"]


@dataclass(frozen=True)
class Reason:
    """Why a candidate was (not) chosen, as data; :func:`dcvit_deploy.selection.reasons.render`
    words it. ``figure``: ``(ms, spread, rounds)`` of the budget statistic judged against
    ``budget`` (``None``: the selection's); ``noise``: that fit is within noise of the budget;
    ``versus``: the chosen candidate (``fits``, with ``relation``) or the runner-up the images
    cannot separate it from (``chosen``); ``dominated_by``: a larger, faster sibling; ``values``:
    the other figures decided on; ``detail``: free text (a failure); ``recorded``: text from a
    run of an earlier version."""

    kind: ReasonKind
    figure: tuple[float, float, int] | None = None
    budget: LatencyBudget | None = None
    noise: bool = False
    versus: str = ""
    relation: Relation = ""
    dominated_by: str = ""
    values: dict[str, float] = field(default_factory=dict)
    detail: str = ""
    warning: str = ""


@dataclass(frozen=True)
class Selection:
    """The budget decision: the chosen candidate (or none) and a :class:`Reason` for every
    candidate, densest first. ``figures`` / ``confirmed``: ``(figure ms, spread ms, rounds)`` per
    measured candidate, in the rounds / re-measured in a fresh process; ``uncertain``: within
    noise of the budget; ``notes``: what was done, in order."""

    budget: LatencyBudget
    chosen: str | None
    reasons: dict[str, Reason]
    search: Literal["all", "bisect"]
    measured: tuple[str, ...]
    prefer: Literal["capacity", "fidelity"] = "capacity"
    figures: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    uncertain: tuple[str, ...] = ()
    confirmed: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
