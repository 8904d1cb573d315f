"""The options of a run: what to compress (:class:`CompressOptions`) and where and under which
budget to deploy it (:class:`DeployOptions`).

These frozen records are the contract between the CLI (which parses strings into them), the
up-front checks in :mod:`dcvit_deploy.config.validate` (which refuse bad values before any work) and
the pipeline units (which read them). A field that changes a unit's result is part of that
unit's fingerprint; fields that only say *where* work runs (``device``) are not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dcvit_deploy.model.images import DataOverrides

SCHEDULES = ("default", "paper", "tiny")
METRIC_SOURCES = ("synthetic", "real")
METHODS = ("dcvit", "practise")
PREFERENCES = ("capacity", "fidelity")
TRAIN = ("pick", "all")


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
    neuron_choice: str = "random"
    reuse: bool | None = None  # None: the schedule preset's procedure decides
    warm_fraction: float = 0.5
    schedule: str = "default"
    iterations: int | None = None
    rank_iterations: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    metric: Literal["synthetic", "real"] = "synthetic"
    inversion: Literal["paper", "fast"] = "fast"
    inversion_iterations: int | None = None
    candidate_blocks: tuple[int, ...] | None = None
    include_original: bool = True
    seed: int = 0
    device: str = "auto"
    # "pick": measure every structure, finetune only what selection picks; "all": finetune
    # every candidate first (a procedure whose targets chain always does)
    train: Literal["pick", "all"] = "pick"

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
    statistic: str | None = None
    margin: float = 0.0
    batch_size: int | None = None
    search: Literal["all", "bisect"] = "all"
    prefer: Literal["capacity", "fidelity"] = "capacity"
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

    @property
    def has_budget(self) -> bool:
        return self.latency_ms is not None or self.speedup is not None
