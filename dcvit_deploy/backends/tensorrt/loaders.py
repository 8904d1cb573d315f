"""TensorRT loaders, named for what they make from what: :func:`network_from_onnx_path`,
:func:`engine_bytes_from_network` (with the shared timing cache), :func:`engine_from_bytes`,
:func:`save_engine`; :func:`build_engine` chains the first two. Each takes the ``tensorrt``
module (real or the tests' fake) as an argument. TensorRT uses the logger of the first builder
or runtime while any is alive, so there is one :class:`ProcessLogger` per module, and a build
*captures* what is logged while it runs to quote it when it fails. Every call that reports
failure through its result (``None``, ``False``, a negative index) is checked.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from dcvit_deploy.backends.tensorrt.settings import BuilderSettings, engine_meta_path
from dcvit_deploy.errors import BackendUnavailable, BuildError, EngineMismatch
from dcvit_deploy.store.atomic import atomic_write_bytes, atomic_write_json

log = logging.getLogger("dcvit_deploy.backends.tensorrt")

# TensorRT's ILogger severities: INTERNAL_ERROR = 0, ERROR = 1, WARNING = 2, INFO = 3, VERBOSE = 4.
_ERROR = 1
_WARNING = 2


def import_tensorrt() -> ModuleType:
    """Import ``tensorrt`` or raise :class:`BackendUnavailable` saying how to install it."""
    try:
        return importlib.import_module("tensorrt")
    except Exception as exc:  # ImportError, or OSError from missing libnvinfer/libnvonnxparser
        raise BackendUnavailable(
            f"TensorRT cannot be imported: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            "install TensorRT 10+ for this CUDA version (pip install tensorrt from NVIDIA's "
            "index) on the GPU machine, then check with 'dcvit-deploy doctor'",
        ) from exc


def tensorrt_major(trt: ModuleType) -> int:
    """The major version of a ``tensorrt`` module (0 when unknown)."""
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        return 0


def network_flags(trt: ModuleType) -> int:
    """Network creation flags: STRONGLY_TYPED on TensorRT 10; nothing on 11+ (always strong)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None or tensorrt_major(trt) >= 11:
        return 0
    return 1 << int(flag)


# --------------------------------------------------------------------------- logging


@dataclass
class LogCapture:
    """Messages (severity, text) at WARNING or worse logged while a capture was open."""

    messages: list[tuple[int, str]] = field(default_factory=list)

    def errors(self) -> list[str]:
        return [m for s, m in self.messages if s <= _ERROR]

    def quote(self, default: str = "TensorRT logged no error") -> str:
        """The last few errors (else warnings) as one line, for an error message."""
        chosen = self.errors() or [m for s, m in self.messages if s == _WARNING]
        return "; ".join(chosen[-3:]) or default


class ProcessLogger(Protocol):
    """What the one logger handed to TensorRT offers besides ``log`` (its class subclasses
    ``trt.ILogger`` and is made per module by :func:`process_logger`)."""

    def capture(self) -> contextlib.AbstractContextManager[LogCapture]: ...

    def recent_errors(self) -> str: ...


_LOGGERS: dict[int, tuple[ModuleType, Any]] = {}
_LOGGERS_LOCK = threading.Lock()


def process_logger(trt: ModuleType) -> ProcessLogger:
    """The one thread-safe TensorRT logger of this process for ``trt``: forwards to
    :mod:`logging`, keeps the last errors, and records WARNING-or-worse into open captures."""
    with _LOGGERS_LOCK:
        entry = _LOGGERS.get(id(trt))
        if entry is None or entry[0] is not trt:
            entry = (trt, _make_logger(trt))
            _LOGGERS[id(trt)] = entry
        return entry[1]


def _make_logger(trt: ModuleType) -> Any:
    """Defined in a function because it subclasses ``trt.ILogger`` (known only after import)."""

    class _Logger(trt.ILogger):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._lock = threading.Lock()
            self._captures: list[LogCapture] = []
            self._recent: deque[str] = deque(maxlen=8)

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= _WARNING:
                with self._lock:
                    for cap in self._captures:
                        cap.messages.append((level, str(msg)))
                    if level <= _ERROR:
                        self._recent.append(str(msg))
            if level <= _ERROR:
                log.error("TensorRT: %s", msg)
            elif level == _WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

        @contextlib.contextmanager
        def capture(self) -> Iterator[LogCapture]:
            cap = LogCapture()
            with self._lock:
                self._captures.append(cap)
            try:
                yield cap
            finally:
                with self._lock:
                    self._captures.remove(cap)

        def recent_errors(self) -> str:
            with self._lock:
                return "; ".join(list(self._recent)[-3:]) or "TensorRT logged no error"

    return _Logger()


# --------------------------------------------------------------------------- loaders


@dataclass
class ParsedNetwork:
    """A parsed network with the builder and parser that must outlive it."""

    builder: Any
    network: Any
    parser: Any
    io: list[dict[str, Any]]


@dataclass(frozen=True)
class EngineBuild:
    """A serialized engine, the network's I/O and what happened to the timing cache."""

    plan: bytes
    io: list[dict[str, Any]]
    timing_cache: str


def _parser_error(err: Any) -> str:
    try:
        return f"node {err.node()} ({err.node_operator()}): {err.desc()}"
    except Exception:
        return str(err)


def network_from_onnx_path(
    trt: ModuleType, onnx_path: Path, *, candidate: str, capture: LogCapture
) -> ParsedNetwork:
    """Builder -> strongly typed network -> ``OnnxParser.parse_from_file`` (finds external
    weights, unlike ``parse(bytes)``); :class:`BuildError` with the parser's messages."""
    logger: Any = process_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise BuildError(
            f"candidate {candidate!r}: TensorRT could not create a builder: {capture.quote()}",
            "check the GPU and driver with 'dcvit-deploy doctor'",
        )
    network = builder.create_network(network_flags(trt))
    if network is None:
        raise BuildError(
            f"candidate {candidate!r}: TensorRT could not create a network: {capture.quote()}",
            "check the TensorRT installation with 'dcvit-deploy doctor'",
        )
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        messages = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(
            f"candidate {candidate!r}: TensorRT could not parse {Path(onnx_path).name}: "
            + ("; ".join(messages) or capture.quote("no parser message")),
            "check that every op is supported by this TensorRT version (see the parser "
            "message), or re-export with another opset",
        )
    return ParsedNetwork(builder, network, parser, network_io(network))


def engine_bytes_from_network(
    trt: ModuleType,
    parsed: ParsedNetwork,
    settings: BuilderSettings,
    *,
    candidate: str,
    capture: LogCapture,
) -> EngineBuild:
    """Configure the builder from ``settings`` and build a serialized engine. The timing cache
    is read and merged under a file lock (parallel builds keep each other's entries); one
    TensorRT refuses (another GPU or version) is replaced by a fresh one (``timing_cache``)."""
    from filelock import FileLock

    def fail(what: str, fix: str) -> BuildError:
        return BuildError(f"candidate {candidate!r}: {what}: {capture.quote()}", fix)

    builder, network = parsed.builder, parsed.network
    config = builder.create_builder_config()
    if config is None:
        raise fail("TensorRT could not create a builder config", "check the GPU with doctor")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    if not settings.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache_path = Path(settings.timing_cache) if settings.timing_cache else None
    lock = FileLock(str(cache_path) + ".lock") if cache_path is not None else None
    status = "none"
    if cache_path is not None and lock is not None:
        status = _attach_timing_cache(config, cache_path, lock, capture)
    shape = settings.shape_profile
    opt_profile = builder.create_optimization_profile()
    if opt_profile is None:
        raise fail("TensorRT could not create an optimisation profile", "check the GPU")
    if opt_profile.set_shape(shape.input_name, shape.min, shape.opt, shape.max) is False:
        raise fail(
            f"TensorRT refused the shapes {shape.min}..{shape.max} for {shape.input_name!r}",
            "check the profile's batch sizes and the model's input shape",
        )
    if config.add_optimization_profile(opt_profile) < 0:
        raise fail(
            "TensorRT refused the optimisation profile",
            "check the profile's batch sizes and the model's input shape",
        )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise fail(
            "TensorRT failed to build an engine",
            "raise [backend_options] workspace_mib, or check the log for unsupported layers",
        )
    if cache_path is not None and lock is not None:
        status = _store_timing_cache(config, cache_path, lock, status, capture)
    return EngineBuild(bytes(serialized), parsed.io, status)


def _attach_timing_cache(config: Any, path: Path, lock: Any, capture: LogCapture) -> str:
    with lock:
        data = path.read_bytes() if path.is_file() else b""
    seen = len(capture.messages)
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):  # never mix GPUs
        return "reused" if data else "new"
    why = LogCapture(capture.messages[seen:]).quote("no reason logged")
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, False):
        return f"refused ({why}); built without a timing cache"
    log.warning("timing cache %s refused (%s); starting a new one for this device", path, why)
    return f"refused ({why}); started a new cache for this device"


def _store_timing_cache(
    config: Any, path: Path, lock: Any, status: str, capture: LogCapture
) -> str:
    built = config.get_timing_cache()
    if built is None:
        return status + "; no cache to save"
    with lock:
        # Merge whatever other builds wrote meanwhile, then replace the file atomically. A file
        # that was refused belongs to another device: it is replaced, not merged.
        if path.is_file() and not status.startswith("refused"):
            seen = len(capture.messages)
            disk = config.create_timing_cache(path.read_bytes())
            if disk is None or not built.combine(disk, False):
                why = LogCapture(capture.messages[seen:]).quote("no reason logged")
                log.warning("timing cache %s not merged (%s); keeping this build's", path, why)
                status += f"; the file's entries were not merged ({why})"
        atomic_write_bytes(path, bytes(built.serialize()))
    return status


def build_engine(
    trt: ModuleType, onnx_path: Path, settings: BuilderSettings, *, candidate: str
) -> EngineBuild:
    """:func:`network_from_onnx_path` then :func:`engine_bytes_from_network`, with this build's
    TensorRT messages captured and quoted in any :class:`BuildError`. The caller makes the
    target device current first."""
    with process_logger(trt).capture() as capture:
        parsed = network_from_onnx_path(trt, onnx_path, candidate=candidate, capture=capture)
        return engine_bytes_from_network(
            trt, parsed, settings, candidate=candidate, capture=capture
        )


def build_serialized_engine(
    trt: ModuleType,
    onnx_path: Path,
    settings: BuilderSettings,
    *,
    candidate: str,
) -> tuple[bytes, list[dict[str, Any]]]:
    """The plan bytes and the network's I/O (name, shape with -1 for dynamic axes, dtype)."""
    build = build_engine(trt, onnx_path, settings, candidate=candidate)
    return build.plan, build.io


def engine_from_bytes(runtime: Any, plan: bytes, *, name: str, capture: LogCapture) -> Any:
    """Deserialize a plan with ``runtime``; :class:`EngineMismatch` quoting TensorRT's reason."""
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineMismatch(
            f"TensorRT could not deserialize {name}: {capture.quote('unknown error')}",
            "rebuild the engine on this machine",
        )
    return engine


def save_engine(plan_path: Path, plan: bytes, meta: dict[str, Any]) -> None:
    """Write ``<candidate>.plan`` and its ``.plan.json`` metadata, each atomically."""
    atomic_write_bytes(plan_path, plan)
    atomic_write_json(engine_meta_path(plan_path), meta)


def network_io(network: Any) -> list[dict[str, Any]]:
    """The network's inputs and outputs: name, mode, shape (-1 for dynamic axes), dtype."""
    out = []
    for mode, count, get in (
        ("input", network.num_inputs, network.get_input),
        ("output", network.num_outputs, network.get_output),
    ):
        for i in range(count):
            t = get(i)
            out.append(
                {
                    "name": str(t.name),
                    "mode": mode,
                    "shape": [int(d) for d in t.shape],
                    "dtype": dtype_name(t.dtype).lower(),
                }
            )
    return out


def dtype_name(dtype: Any) -> str:
    """``trt.DataType.HALF`` -> ``'HALF'`` (pybind enums have ``name``; str() is the fallback)."""
    name = getattr(dtype, "name", None)
    return str(name or str(dtype).split(".")[-1]).upper()
