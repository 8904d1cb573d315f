"""Where independent work runs: in this process (``local``) or as Ray tasks (``ray``).

A :class:`Task` is a pure, picklable call with the resources it needs: CPUs (also its torch
threads, so a result does not depend on where it ran), GPUs, an accelerator type and custom
resources a node advertises (``target:<profile>``). Tasks seed themselves from their own
identity and *return* their results (weights, records, file bytes): only the head writes the
run directory, so its lock and fingerprints mean the same whichever executor ran the work.

Inputs reach Ray workers through Ray's object store, not a shared path: the nodes of a fleet
rarely share a file system with the head, the store needs nothing beyond the cluster, and an
argument several tasks share (the teacher, the images, the exported graphs) is put once.
A worker that dies mid-task is retried by Ray (``retries``); a task no node can place is
reported as :class:`Unplaceable` after ``placement_wait_s`` while the others go on; Ctrl-C on
the head (or any error) cancels every task still pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import EnvironmentProblem


@dataclass(frozen=True)
class Resources:
    """What a task needs from the node it runs on (Ray's own resource names)."""

    num_cpus: float = 1
    num_gpus: float = 0
    accelerator_type: str | None = None
    custom: dict[str, float] = field(default_factory=dict)

    def demand(self) -> dict[str, float]:
        d = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.custom}
        if self.accelerator_type:
            d[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return {k: v for k, v in d.items() if v}


@dataclass(frozen=True)
class Task:
    """``fn(*args)`` run with ``threads`` torch threads (``None``: leave them as they are)."""

    key: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    threads: int | None = None
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class Unplaceable:
    """No node of the cluster offers what the task needs (``reason``)."""

    reason: str


def call(fn: Callable[..., Any], threads: int | None, *args: Any) -> Any:
    """``fn(*args)`` with ``threads`` torch threads (what every executor runs)."""
    if not threads:
        return fn(*args)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


class LocalExecutor:
    """Runs each task in this process, in order (progress callbacks work: nothing is pickled)."""

    name = "local"
    remote = False

    def __init__(self, task_cpus: int | None = None) -> None:
        self.task_cpus = task_cpus  # None: the process's torch threads, as without executor

    def task(self, key: str, fn: Callable[..., Any], args: tuple[Any, ...], gpu: bool) -> Task:
        """A compute task (a finetune) with this executor's threads and one GPU if ``gpu``."""
        cpus = self.task_cpus
        return Task(key, fn, args, cpus, Resources(num_cpus=cpus or 1, num_gpus=int(gpu)))

    def map(
        self, tasks: Sequence[Task], *, allow_unplaceable: bool = False
    ) -> Iterator[tuple[Task, Any]]:
        """``(task, result)`` as each task finishes (here: in order)."""
        for t in tasks:
            yield t, call(t.fn, t.threads, *t.args)


def require_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise EnvironmentProblem(
            "--executor ray needs Ray, which is not installed",
            "pip install 'dcvit-deploy[ray]'",
        ) from exc
    return ray


class RayExecutor(LocalExecutor):
    """Runs tasks on a Ray cluster (joined at ``address``; none: a local one, or RAY_ADDRESS)."""

    name = "ray"
    remote = True

    def __init__(
        self,
        address: str | None = None,
        task_cpus: int | None = 1,
        *,
        retries: int = 3,
        placement_wait_s: float = 120.0,
        poll_s: float = 0.5,
    ) -> None:
        super().__init__(task_cpus or 1)
        self.retries, self.placement_wait_s, self.poll_s = retries, placement_wait_s, poll_s
        ray = require_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise EnvironmentProblem(
                    f"cannot join the Ray cluster at {address or 'this machine'}: "
                    + " ".join(str(exc).split())[:200],
                    "start it with `ray start --head` (see README, Running on a fleet) or "
                    "check --ray-address",
                ) from exc

    @staticmethod
    def _missing(nodes: list[dict[str, float]], demand: dict[str, float]) -> str | None:
        """The resource no alive node has enough of (``None``: some node can run the task)."""
        if any(all(n.get(k, 0) >= v for k, v in demand.items()) for n in nodes):
            return None
        short = [k for k, v in demand.items() if not any(n.get(k, 0) >= v for n in nodes)]
        return " and ".join(short) or " + ".join(demand) + " on one node"

    def map(
        self, tasks: Sequence[Task], *, allow_unplaceable: bool = False
    ) -> Iterator[tuple[Task, Any]]:
        ray = require_ray()
        uses: dict[int, int] = {}
        for t in tasks:
            for a in t.args:
                uses[id(a)] = uses.get(id(a), 0) + 1
        put: dict[int, Any] = {}

        def arg(a: Any) -> Any:  # put a shared argument once, not once per task
            if uses[id(a)] < 2 or isinstance(a, (int, float, str, bool, type(None))):
                return a
            if id(a) not in put:
                put[id(a)] = ray.put(a)
            return put[id(a)]

        fn, wait = ray.remote(call), self.placement_wait_s
        pending: dict[Any, tuple[Task, float]] = {}
        try:
            for t in tasks:
                r = t.resources
                opts: dict[str, Any] = {
                    "num_cpus": r.num_cpus,
                    "num_gpus": r.num_gpus,
                    "max_retries": self.retries,
                    "name": t.key,
                }
                if r.custom:
                    opts["resources"] = dict(r.custom)
                if r.accelerator_type:
                    opts["accelerator_type"] = r.accelerator_type
                ref = fn.options(**opts).remote(t.fn, t.threads, *map(arg, t.args))
                pending[ref] = (t, time.monotonic())
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=self.poll_s)
                for ref in done:
                    yield pending.pop(ref)[0], ray.get(ref)
                late = [(r, t) for r, (t, s) in pending.items() if time.monotonic() - s > wait]
                nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")] if late else []
                for ref, t in late:
                    missing = self._missing(nodes, t.resources.demand())
                    if missing is None:
                        continue
                    ray.cancel(ref, force=True)
                    del pending[ref]
                    if not allow_unplaceable:
                        raise EnvironmentProblem(
                            f"{t.key}: no node of the Ray cluster offers {missing}",
                            "add a node that does, or run with --device cpu / --executor local",
                        )
                    yield t, Unplaceable(f"no node offers {missing}")
        except BaseException:  # Ctrl-C, a task's error, the caller stopping early
            for ref in pending:
                ray.cancel(ref, force=True)
            raise


def make_executor(
    name: str, address: str | None = None, task_cpus: int | None = None
) -> LocalExecutor:
    """The executor ``--executor`` names (``ray`` joins or starts the cluster now)."""
    return RayExecutor(address, task_cpus) if name == "ray" else LocalExecutor(task_cpus)
