"""Progress events shared by every long stage, and the console renderer the CLI uses.

Library code only emits :class:`ProgressEvent`s through a callback; how (or whether) they are
shown is the caller's choice, so ``--json`` runs stay quiet and tests can record events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """``stage`` (e.g. ``rank``, ``finetune``), item ``item``/``items`` of the stage (1-based),
    inner ``step``/``steps`` of that item, latest ``loss``, and an ETA for the item in seconds."""

    stage: str
    item: int = 0
    items: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None
    eta_s: float | None = None
    message: str = ""


ProgressFn = Callable[[ProgressEvent], None]


def quiet(_: ProgressEvent) -> None:
    """A progress callback that shows nothing."""


class ConsoleProgress:
    """Renders events on one updating line of stderr (rich), throttled to ~5 updates/s."""

    def __init__(self) -> None:
        from rich.console import Console

        self._console = Console(stderr=True)
        self._last = 0.0
        self._last_stage = ""

    def __call__(self, ev: ProgressEvent) -> None:
        now = time.monotonic()
        final = ev.steps and ev.step >= ev.steps
        if ev.stage == self._last_stage and not final and not ev.message and now - self._last < 0.2:
            return
        self._last, self._last_stage = now, ev.stage
        parts = [f"[bold]{ev.stage}[/bold]"]
        if ev.items:
            parts.append(f"{ev.item}/{ev.items}")
        if ev.steps:
            parts.append(f"step {ev.step}/{ev.steps}")
        if ev.loss is not None:
            parts.append(f"loss {ev.loss:.4g}")
        if ev.eta_s is not None:
            parts.append(f"ETA {ev.eta_s:,.0f}s")
        if ev.message:
            parts.append(ev.message)
        self._console.print("  ".join(parts), highlight=False)
