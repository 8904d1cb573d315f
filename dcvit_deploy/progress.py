"""Progress events shared by every long stage, and the console renderer the CLI uses.

Library code only emits :class:`ProgressEvent`s through a callback; how (or whether) they are
shown is the caller's choice, so ``--json`` runs stay quiet and tests can record events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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


def _line(ev: ProgressEvent, elapsed: float) -> str:
    parts = [ev.stage]
    if ev.items:
        parts.append(f"{ev.item}/{ev.items}")
    if ev.steps:
        parts.append(f"step {ev.step}/{ev.steps}")
    if ev.loss is not None:
        parts.append(f"loss {ev.loss:.4g}")
    if ev.eta_s is not None:
        parts.append(f"ETA {ev.eta_s:,.0f}s")
    parts.append(f"elapsed {elapsed:,.0f}s")
    if ev.message:
        parts.append(ev.message)
    return "  ".join(parts)


class ConsoleProgress:
    """On a terminal: one live line on stderr (rich), redrawn in place, with the current step,
    item, loss and ETA. Without a terminal (CI, a pipe): plain lines, one when a step starts,
    when an item finishes or with a message -- never one line per training step."""

    def __init__(self) -> None:
        from rich.console import Console

        self._console = Console(stderr=True, highlight=False)
        self._t0 = time.monotonic()
        self._key: tuple[str, int] = ("", -1)
        self._live: Any = None
        if self._console.is_terminal:
            from rich.live import Live

            self._live = Live(console=self._console, transient=True, auto_refresh=False)
            self._live.start()

    def __call__(self, ev: ProgressEvent) -> None:
        text = _line(ev, time.monotonic() - self._t0)
        if self._live is not None:
            if ev.message:  # events worth keeping stay on the screen above the live line
                self._live.console.print(text)
            self._live.update(text, refresh=True)
            return
        key = (ev.stage, ev.item)
        done = bool(ev.steps) and ev.step >= ev.steps
        if key != self._key or done or ev.message:
            self._key = key
            self._console.print(text, markup=False)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
