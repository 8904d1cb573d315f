"""Where independent work runs: in this process (``local``) or as Ray tasks (``ray``).

A :class:`Task` is a pure, picklable call with the resources it needs (CPUs = its torch threads,
so a result does not depend on where it ran; GPUs; an accelerator type; resources a node
advertises, ``target:<profile>``). Tasks seed themselves from their own identity and *return*
their results: only the head writes the run, so its lock and fingerprints keep their meaning.
Inputs reach workers through Ray's object store, not a shared path (fleet nodes rarely share a
file system with the head); an argument several tasks share is put once. Ray retries a task
whose worker died; a task no node can place is :class:`Unplaceable` after ``placement_wait_s``
while the others go on; Ctrl-C on the head (or any error) cancels every pending task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dcvit_deploy.errors import EnvironmentProblem


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
    """``fn(*args)`` with ``threads`` torch threads (``None``: leave them as they are)."""

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

    name, remote = "local", False

    def __init__(self, task_cpus: int | None = None) -> None:
        self.task_cpus = task_cpus  # None: the process's torch threads, as without executor

    def task(self, key: str, fn: Callable[..., Any], args: tuple[Any, ...], gpu: bool) -> Task:
        """A compute task (a finetune) with this executor's threads and one GPU if ``gpu``."""
        cpus = self.task_cpus
        return Task(key, fn, args, cpus, Resources(num_cpus=cpus or 1, num_gpus=int(gpu)))

    def map(self, tasks: Sequence[Task], allow_unplaceable: bool = False) -> Iterator[Any]:
        """``(task, result)`` as each task finishes (here: in order)."""
        for t in tasks:
            yield t, call(t.fn, t.threads, *t.args)


def require_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        fix = "pip install 'dcvit-deploy[ray]'"
        raise EnvironmentProblem("--executor ray needs Ray, which is not installed", fix) from exc
    return ray


class RayExecutor(LocalExecutor):
    """Runs tasks on a Ray cluster (joined at ``address``; none: RAY_ADDRESS, else a local one)."""

    name, remote = "ray", True

    def __init__(
        self, address: str | None = None, task_cpus: int | None = 1, *, retries: int = 3,
        placement_wait_s: float = 120.0, poll_s: float = 0.5,
    ) -> None:  # fmt: skip
        super().__init__(task_cpus or 1)
        self.retries, self.placement_wait_s, self.poll_s = retries, placement_wait_s, poll_s
        ray = require_ray()
        try:
            if not ray.is_initialized():
                ray.init(address=address, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EnvironmentProblem(
                f"cannot join the Ray cluster at {address or 'this machine'}: {exc}"[:300],
                "start it (README: Running on a fleet) or check --ray-address",
            ) from exc

    def map(self, tasks: Sequence[Task], allow_unplaceable: bool = False) -> Iterator[Any]:
        ray = require_ray()
        uses: dict[int, int] = {}
        for a in (a for t in tasks for a in t.args):
            uses[id(a)] = uses.get(id(a), 0) + 1
        put: dict[int, Any] = {}

        def arg(a: Any) -> Any:  # put an argument several tasks share once
            if uses[id(a)] < 2 or isinstance(a, (int, float, str, type(None))):
                return a
            if id(a) not in put:
                put[id(a)] = ray.put(a)
            return put[id(a)]

        pending: dict[Any, tuple[Task, float]] = {}
        remote = ray.remote(call)
        try:
            for t in tasks:
                r = t.resources
                ref = remote.options(
                    name=t.key, num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=r.custom,
                    accelerator_type=r.accelerator_type, max_retries=self.retries,
                )  # fmt: skip
                pending[ref.remote(t.fn, t.threads, *map(arg, t.args))] = (t, time.monotonic())
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=self.poll_s)
                for ref in done:
                    yield pending.pop(ref)[0], ray.get(ref)
                since = time.monotonic() - self.placement_wait_s
                late = [(ref, t) for ref, (t, t0) in pending.items() if t0 < since]
                nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")] if late else []
                for ref, t in late:
                    need = t.resources.demand()
                    if any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
                        continue  # placeable, just busy
                    short = [k for k, v in need.items() if all(n.get(k, 0) < v for n in nodes)]
                    why = f"no node offers {' and '.join(short) or ' + '.join(need)}"
                    ray.cancel(ref, force=True)
                    del pending[ref]
                    if not allow_unplaceable:
                        fix = "add such a node, or use --executor local"
                        raise EnvironmentProblem(f"{t.key}: {why} in the Ray cluster", fix)
                    yield t, Unplaceable(why)
        except BaseException:  # Ctrl-C, a task's error, the caller stopping early
            for ref in pending:
                ray.cancel(ref, force=True)
            raise


def make_executor(
    name: str, address: str | None = None, task_cpus: int | None = None
) -> LocalExecutor:
    """The executor ``--executor`` names (``ray`` joins or starts the cluster now)."""
    return RayExecutor(address, task_cpus) if name == "ray" else LocalExecutor(task_cpus)
