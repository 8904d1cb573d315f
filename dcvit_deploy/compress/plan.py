"""Structure planner: from a MAC-reduction target to (n blocks, MLP width h') in closed form.

For a target reduction ΔM (reference convention) the DC-ViT rule is
``n = ceil(ΔM / (M_attn + M_mlp))`` and ``r' = 4·(1 − (ΔM/n − M_attn)/M_mlp)``, ``h' = int(d·r')``
(written here with the model's own base width instead of the constant 4·d).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dcvit_deploy.compress.macs import Geometry
from dcvit_deploy.errors import UserInputError


@dataclass(frozen=True)
class StructurePlan:
    """Closed-form structure for one target: compress ``n_blocks`` blocks to width ``hidden``."""

    target: float
    n_blocks: int
    hidden: int
    hidden_unrounded: int
    round_to: int
    achieved: float  # reduction under the reference convention, after rounding
    achieved_full: float  # reduction counting attention matmuls too


def feasible_range(
    geom: Geometry, depth: int, max_blocks: int, round_to: int = 1
) -> tuple[float, float]:
    """(min, max) reduction the planner can meet with at most ``max_blocks`` blocks.

    The minimum removes one attention branch; the maximum narrows ``max_blocks`` blocks to the
    smallest width allowed (``round_to``, at least 1 unit).
    """
    from dcvit_deploy.store.records import BlockSpec

    total = geom.count(
        [BlockSpec(kind="attn_mlp", mlp_hidden=geom.base_mlp_hidden)] * depth
    ).linear_norm
    return _range(geom, total, max_blocks, round_to)


def plan_structure(
    geom: Geometry, depth: int, target: float, *, max_blocks: int, round_to: int = 1
) -> StructurePlan:
    """Closed-form plan for one reduction target (fraction of the reference-convention MACs).

    Raises :class:`UserInputError` naming the feasible range when ``target`` is outside it.
    ``round_to`` > 1 rounds h' to the nearest multiple (never to 0); the effect on the achieved
    reduction is recorded in the plan.
    """
    from dcvit_deploy.store.records import BlockSpec

    base = [BlockSpec(kind="attn_mlp", mlp_hidden=geom.base_mlp_hidden)] * depth
    total = geom.count(base).linear_norm
    lo, hi = _range(geom, total, max_blocks, round_to)
    if not lo - 1e-9 <= target <= hi + 1e-9:
        raise UserInputError(
            f"MAC reduction target {target:.2%} is outside the feasible range "
            f"{lo:.2%}..{hi:.2%} for this model ({max_blocks} compressible blocks)",
            f"choose targets between {lo:.2%} and {hi:.2%}, or allow more blocks",
        )
    m_attn, m_mlp = geom.attn_linear_norm, geom.m_mlp
    delta = target * total
    n = max(1, math.ceil(delta / (m_attn + m_mlp) - 1e-12))
    ratio = 1.0 - (delta / n - m_attn) / m_mlp
    hidden_raw = int(geom.base_mlp_hidden * ratio)
    hidden_raw = min(max(hidden_raw, 1), geom.base_mlp_hidden)
    hidden = hidden_raw
    if round_to > 1:
        hidden = max(round_to, round(hidden_raw / round_to) * round_to)
        hidden = min(hidden, geom.base_mlp_hidden)
    spec = [BlockSpec(kind="mlp", mlp_hidden=hidden)] * n + base[n:]
    counted = geom.count(spec)
    full_base = geom.count(base).full
    return StructurePlan(
        target=target,
        n_blocks=n,
        hidden=hidden,
        hidden_unrounded=hidden_raw,
        round_to=round_to,
        achieved=1.0 - counted.linear_norm / total,
        achieved_full=1.0 - counted.full / full_base,
    )


def _range(geom: Geometry, total: int, max_blocks: int, round_to: int) -> tuple[float, float]:
    m_attn, m_mlp = geom.attn_linear_norm, geom.m_mlp
    lo = m_attn / total
    per_block = m_attn + m_mlp - geom.mlp_linear(max(1, round_to))
    return lo, max_blocks * per_block / total


def plan_family(
    geom: Geometry, depth: int, targets: Sequence[float], *, max_blocks: int, round_to: int = 1
) -> list[StructurePlan]:
    """Plans for many targets (all validated first, so one bad target fails before any work)."""
    return [
        plan_structure(geom, depth, t, max_blocks=max_blocks, round_to=round_to) for t in targets
    ]
