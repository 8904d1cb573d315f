"""Backends for registry tests, loaded through fake entry points."""

from __future__ import annotations

from typing import Any

from dcvit_deploy.backends.base import Availability


class EchoBackend:
    """A minimal plugin backend: available everywhere, builds nothing."""

    name = "echo"
    needs_module = False

    def availability(self, profile: Any = None) -> Availability:
        return Availability(True, "echo is always available")

    def validate_profile(self, profile: Any) -> None:
        return None

    def build(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def measure(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class Incomplete:
    """Lacks most of the protocol: the registry must refuse it."""

    name = "incomplete"


def raises_on_start() -> EchoBackend:
    raise RuntimeError("driver exploded")
