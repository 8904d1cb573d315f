"""A fake ``tensorrt`` module (TensorRT 10.x/11.x Python API surface) and a fake CUDA device.

:func:`make_module` returns a fresh module object whose classes append every call, in order, to
``module.CALLS``. It models the documented semantics the backend relies on:

* **One logger per process.** The logger given to the first ``Builder``/``Runtime`` is used for
  everything while any builder or runtime is alive; a logger passed to a later one is ignored
  (TensorRT treats the logger as a singleton). Builders, parsers, configs, engines and contexts
  log through it.
* **Return values.** ``set_timing_cache``, ``TimingCache.combine``, ``set_input_shape``,
  ``set_tensor_address`` and ``execute_async_v3`` return ``bool``; ``build_serialized_network``,
  ``deserialize_cuda_engine`` and ``create_execution_context`` return ``None`` on failure after
  logging an error; ``get_timing_cache`` returns ``None`` when no cache was accepted.
* **Execution context.** Output shapes stay ``-1`` until every input shape is set;
  ``execute_async_v3`` fails (logs and returns ``False``) unless every input shape and every I/O
  tensor address is set. When the addresses belong to live buffers of :class:`FakeCudaDevice`
  the fake computes ``output[b, j] = mean(input[b]) + j`` through those addresses, so results
  prove which buffers were used.

Knobs of :func:`make_module`: ``parse_errors``, ``build_fails``, ``refuse_timing_cache`` (cache
data starting with this prefix is refused by ``set_timing_cache``), ``refuse_combine``,
``io_dtypes`` (TensorRT ``DataType`` member names per I/O tensor), ``context_fails`` and
``version``. Nothing here touches a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import importlib.machinery
import json
import threading
import types
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

NUM_CLASSES = 10
ITEM_SHAPE = (3, 32, 32)

_NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


def make_module(
    *,
    version: str = "10.9.0.34",
    parse_errors: tuple[str, ...] = (),
    build_fails: bool = False,
    input_name: str = "input",
    refuse_timing_cache: bytes | None = None,
    refuse_combine: bool = False,
    io_dtypes: dict[str, str] | None = None,
    context_fails: bool = False,
) -> types.ModuleType:
    mod = types.ModuleType("tensorrt")
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", loader=None)
    mod.__version__ = version
    calls: list[str] = []
    mod.CALLS = calls  # type: ignore[attr-defined]
    # Shared with FakeCudaDevice: the current device, live buffers, the graph being captured.
    state = types.SimpleNamespace(device=0, buffers={}, capturing=None, logger=None, owners=0)
    mod.STATE = state  # type: ignore[attr-defined]
    dtypes = {input_name: "FLOAT", "logits": "FLOAT", **(io_dtypes or {})}

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self) -> None:
            pass

        def log(self, severity: Any, msg: str) -> None:  # overridden by real loggers
            pass

    ILogger.Severity = Severity  # type: ignore[attr-defined]

    class Logger(ILogger):
        WARNING = Severity.WARNING

        def __init__(self, severity: Any = Severity.WARNING) -> None:
            super().__init__()

    def _log(severity: Severity, msg: str) -> None:
        if state.logger is not None:
            state.logger.log(severity, msg)

    class _LoggerOwner:
        """Builder/Runtime: the first one alive fixes the process logger; later ones reuse it."""

        def _own_logger(self, logger: ILogger) -> None:
            if state.owners == 0:
                state.logger = logger
            state.owners += 1
            weakref.finalize(self, _release_logger)

    def _release_logger() -> None:
        state.owners -= 1
        if state.owners == 0:
            state.logger = None

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 0

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class BuilderFlag(enum.IntEnum):
        TF32 = 1

    class TensorIOMode(enum.IntEnum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class DataType(enum.IntEnum):
        FLOAT = 0
        HALF = 1
        INT8 = 2
        INT32 = 3
        BOOL = 4
        UINT8 = 5
        FP8 = 6
        BF16 = 7
        INT64 = 8
        INT4 = 9
        FP4 = 10

    class Tensor:
        def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
            self.name, self.shape, self.dtype = name, shape, dtype

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self._inputs = [Tensor(input_name, (-1, *ITEM_SHAPE), DataType[dtypes[input_name]])]
            self._outputs = [Tensor("logits", (-1, NUM_CLASSES), DataType[dtypes["logits"]])]

        @property
        def num_inputs(self) -> int:
            return len(self._inputs)

        @property
        def num_outputs(self) -> int:
            return len(self._outputs)

        def get_input(self, i: int) -> Tensor:
            return self._inputs[i]

        def get_output(self, i: int) -> Tensor:
            return self._outputs[i]

    class ParserError:
        def __init__(self, i: int, msg: str) -> None:
            self._i, self._msg = i, msg

        def node(self) -> int:
            return self._i

        def node_operator(self) -> str:
            return "FancyOp"

        def desc(self) -> str:
            return self._msg

    class OnnxParser:
        def __init__(self, network: Network, logger: ILogger) -> None:
            calls.append("OnnxParser")
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            calls.append(f"parse_from_file({path.rsplit('/', 1)[-1]})")
            for msg in parse_errors:
                _log(Severity.ERROR, f"ModelImporter: {msg}")
            return not parse_errors

        def parse(self, data: bytes) -> bool:  # pragma: no cover - the backend uses the file API
            calls.append("parse")
            return not parse_errors

        @property
        def num_errors(self) -> int:
            return len(parse_errors)

        def get_error(self, i: int) -> ParserError:
            return ParserError(i, parse_errors[i])

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.raw = data
            self.entries = set(data.decode().split(",")) - {""}

        def combine(self, other: TimingCache, ignore_mismatch: bool) -> bool:
            calls.append("timing_cache.combine")
            if refuse_combine:
                _log(Severity.ERROR, "timing cache was created on another device")
                return False
            self.entries |= other.entries
            return True

        def serialize(self) -> bytes:
            return ",".join(sorted(self.entries)).encode()

    class OptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[Any, Any, Any]] = {}

        def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:
            calls.append(f"set_shape({name}, {tuple(min)}, {tuple(opt)}, {tuple(max)})")
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class BuilderConfig:
        def __init__(self) -> None:
            self._level = 2
            self.profiles: list[OptimizationProfile] = []
            self.cache: TimingCache | None = None
            self.pool: dict[Any, int] = {}
            self.cleared: list[Any] = []

        def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
            calls.append(f"set_memory_pool_limit({pool.name}, {size})")
            self.pool[pool] = size

        @property
        def builder_optimization_level(self) -> int:
            return self._level

        @builder_optimization_level.setter
        def builder_optimization_level(self, level: int) -> None:
            calls.append(f"builder_optimization_level={level}")
            self._level = level

        def clear_flag(self, flag: BuilderFlag) -> None:
            calls.append(f"clear_flag({flag.name})")
            self.cleared.append(flag)

        def create_timing_cache(self, data: bytes) -> TimingCache:
            calls.append(f"create_timing_cache({len(data)} bytes)")
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            calls.append(f"set_timing_cache(ignore_mismatch={ignore_mismatch})")
            if refuse_timing_cache is not None and cache.raw.startswith(refuse_timing_cache):
                _log(Severity.ERROR, "timing cache mismatch: it was created on another device")
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

        def add_optimization_profile(self, profile: OptimizationProfile) -> int:
            calls.append("add_optimization_profile")
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder(_LoggerOwner):
        def __init__(self, logger: ILogger) -> None:
            calls.append(f"Builder(device={state.device})")
            self._own_logger(logger)

        def create_network(self, flags: int = 0) -> Network:
            calls.append(f"create_network(flags={flags})")
            return Network(flags)

        def create_builder_config(self) -> BuilderConfig:
            calls.append("create_builder_config")
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            calls.append("create_optimization_profile")
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
            calls.append("build_serialized_network")
            if build_fails:
                _log(Severity.ERROR, "out of workspace memory for layer 7")
                return None
            if config.cache is not None:  # a build adds its tactic timings to the cache
                config.cache.entries.add(f"tactic-{len(config.cache.entries)}")
            shapes = {k: v for p in config.profiles for k, v in p.shapes.items()}
            io = [
                {"name": t.name, "mode": mode, "shape": list(t.shape), "dtype": t.dtype.name}
                for mode, ts in (("input", network._inputs), ("output", network._outputs))
                for t in ts
            ]
            body = {"flags": network.flags, "profiles": shapes, "io": io, "device": state.device}
            return b"PLAN " + json.dumps(body).encode()

    class ICudaEngine:
        def __init__(self, body: dict[str, Any]) -> None:
            self._io = body["io"]
            self._profiles = {k: [tuple(s) for s in v] for k, v in body["profiles"].items()}
            self.device = body.get("device", 0)

        @property
        def num_io_tensors(self) -> int:
            return len(self._io)

        @property
        def num_optimization_profiles(self) -> int:
            return 1

        def _tensor(self, name: str) -> dict[str, Any]:
            for t in self._io:
                if t["name"] == name:
                    return t
            raise KeyError(name)

        def get_tensor_name(self, i: int) -> str:
            return str(self._io[i]["name"])

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            t = self._io_or_none(name)
            if t is None:
                return TensorIOMode.NONE
            return TensorIOMode.INPUT if t["mode"] == "input" else TensorIOMode.OUTPUT

        def _io_or_none(self, name: str) -> dict[str, Any] | None:
            return next((t for t in self._io if t["name"] == name), None)

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType[self._tensor(name)["dtype"]]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(self._tensor(name)["shape"])

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            return list(self._profiles[name])

        def create_execution_context(self) -> IExecutionContext | None:
            calls.append(f"create_execution_context(device={state.device})")
            if context_fails:
                _log(Severity.ERROR, "out of device memory for the execution context")
                return None
            return IExecutionContext(self)

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def _inputs(self) -> list[str]:
            return [t["name"] for t in self.engine._io if t["mode"] == "input"]

        def set_input_shape(self, name: str, shape: Any) -> bool:
            shape = tuple(int(d) for d in shape)
            calls.append(f"set_input_shape({name}, {shape})")
            if name not in self._inputs():
                _log(Severity.ERROR, f"{name} is not an input tensor")
                return False
            lo, _, hi = self.engine._profiles[name]
            ok = len(shape) == len(lo) and all(
                a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)
            )
            if not ok:
                _log(Severity.ERROR, f"shape {shape} of {name} is outside profile [{lo}, {hi}]")
                return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            t = self.engine._tensor(name)
            if t["mode"] == "input":
                return self.shapes.get(name, tuple(t["shape"]))
            if all(n in self.shapes for n in self._inputs()):
                batch = self.shapes[self._inputs()[0]][0]
                return (batch, *t["shape"][1:])
            return tuple(t["shape"])  # -1 until every input shape is known

        def set_tensor_address(self, name: str, address: int) -> bool:
            calls.append(f"set_tensor_address({name})")
            if self.engine._io_or_none(name) is None:
                _log(Severity.ERROR, f"{name} is not an I/O tensor of the engine")
                return False
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            calls.append(f"execute_async_v3(stream={stream_handle})")
            for name in self._inputs():
                if name not in self.shapes:
                    _log(Severity.ERROR, f"input shape of {name} is not specified")
                    return False
            for t in self.engine._io:
                if t["name"] not in self.addresses:
                    _log(Severity.ERROR, f"address is not set for tensor {t['name']}")
                    return False
            snapshot = dict(self.addresses)
            if state.capturing is not None:  # recorded into the graph, run on replay
                state.capturing.append((self, snapshot))
                return True
            self._compute(snapshot)
            return True

        def _compute(self, addresses: dict[str, int]) -> None:
            """output[b, j] = mean(input[b]) + j, through the bound addresses (live buffers)."""
            ins = [t for t in self.engine._io if t["mode"] == "input"]
            outs = [t for t in self.engine._io if t["mode"] == "output"]
            if not all(addresses[t["name"]] in state.buffers for t in self.engine._io):
                return  # addresses the fake cannot read: call sequence only
            batch = self.shapes[ins[0]["name"]][0]
            x = _view(addresses[ins[0]["name"]], ins[0]["dtype"], (batch, *ITEM_SHAPE))
            if x is None:
                return
            means = x.reshape(batch, -1).astype(np.float64).mean(axis=1)
            for t in outs:
                y = _view(addresses[t["name"]], t["dtype"], (batch, NUM_CLASSES))
                if y is not None:
                    y[...] = (means[:, None] + np.arange(NUM_CLASSES)).astype(y.dtype)

    class Runtime(_LoggerOwner):
        def __init__(self, logger: ILogger) -> None:
            calls.append(f"Runtime(device={state.device})")
            self._own_logger(logger)

        def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
            calls.append("deserialize_cuda_engine")
            if not bytes(data).startswith(b"PLAN "):
                _log(Severity.ERROR, "Serialization assertion failed: magic tag does not match")
                return None
            return ICudaEngine(json.loads(bytes(data)[5:]))

    for obj in (
        ILogger,
        Logger,
        NetworkDefinitionCreationFlag,
        MemoryPoolType,
        BuilderFlag,
        TensorIOMode,
        DataType,
        OnnxParser,
        Builder,
        Runtime,
        ICudaEngine,
        IExecutionContext,
    ):
        setattr(mod, obj.__name__, obj)
    aliases = {
        "float32": "FLOAT",
        "float16": "HALF",
        "bfloat16": "BF16",
        "int8": "INT8",
        "int32": "INT32",
        "int64": "INT64",
        "bool": "BOOL",
        "uint8": "UINT8",
        "fp8": "FP8",
        "int4": "INT4",
        "fp4": "FP4",
    }
    for alias, member in aliases.items():
        setattr(mod, alias, DataType[member])
    return mod


def _view(address: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """A numpy view of ``shape`` elements at ``address`` (host memory of a fake device buffer)."""
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        return None
    count = int(np.prod(shape))
    raw = (ctypes.c_char * (count * np.dtype(np_dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=np_dtype).reshape(shape)


# --------------------------------------------------------------------------- fake CUDA device


class FakeStream:
    """A stream handle that records what is ordered on it."""

    def __init__(self, handle: int, calls: list[str]) -> None:
        self.cuda_stream = handle
        self._calls = calls

    def synchronize(self) -> None:
        self._calls.append(f"stream{self.cuda_stream}.synchronize")

    def wait_stream(self, other: FakeStream) -> None:
        self._calls.append(f"stream{self.cuda_stream}.wait_stream(stream{other.cuda_stream})")


class FakeGraph:
    """A captured CUDA graph: replays the executions recorded during capture, with the buffer
    addresses they had then; replaying after those buffers were freed raises, as it would
    corrupt memory on a GPU."""

    def __init__(self, trt: types.ModuleType) -> None:
        self._trt = trt
        self.recorded: list[tuple[Any, dict[str, int]]] = []
        self.generations: dict[int, int] = {}
        self.released = False

    def replay(self) -> None:
        self._trt.CALLS.append("graph.replay")
        if self.released:
            raise RuntimeError("replay of a released CUDA graph")
        live = self._trt.STATE.buffers
        for address, generation in self.generations.items():
            if live.get(address) != generation:
                raise RuntimeError(f"CUDA graph replays freed buffer at {address:#x}")
        for context, addresses in self.recorded:
            context._compute(addresses)

    def reset(self) -> None:
        self._trt.CALLS.append("graph.reset")
        self.released = True
        self.recorded.clear()


class FakeCudaDevice:
    """The runner's CUDA seam on CPU: host tensors stand in for device buffers, and every
    operation that orders work (allocation, fill, copy, enqueue, capture) is recorded in the fake
    module's ``CALLS`` together with the stream it ran on."""

    _generation = 0

    def __init__(self, trt: types.ModuleType, index: int = 0) -> None:
        self.index = index
        self.trt = trt
        self.calls: list[str] = trt.CALLS
        self._default = FakeStream(0, self.calls)
        self._current = self._default
        self._streams = 0
        self._lock = threading.Lock()

    def identity(self) -> tuple[str, str]:
        return "Fake GPU", "9.0"

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        state = self.trt.STATE
        previous = state.device
        state.device = self.index
        try:
            yield
        finally:
            state.device = previous

    def new_stream(self) -> FakeStream:
        self._streams += 1
        self.calls.append(f"new_stream -> stream{100 + self._streams}")
        return FakeStream(100 + self._streams, self.calls)

    def current_stream(self) -> FakeStream:
        return self._current

    @contextlib.contextmanager
    def use_stream(self, stream: FakeStream) -> Iterator[None]:
        previous, self._current = self._current, stream
        try:
            yield
        finally:
            self._current = previous

    def _register(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        with self._lock:
            FakeCudaDevice._generation += 1
            generation = FakeCudaDevice._generation
        address = tensor.data_ptr()
        buffers = self.trt.STATE.buffers
        buffers[address] = generation

        def free(address: int = address, generation: int = generation) -> None:
            if buffers.get(address) == generation:
                del buffers[address]

        weakref.finalize(tensor, free)
        self.calls.append(f"{what}{tuple(tensor.shape)} on stream{self._current.cuda_stream}")
        return tensor

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._register(torch.empty(shape, dtype=dtype), "alloc")

    def random(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if dtype.is_floating_point:
            t = torch.randn(shape).to(dtype)
        else:
            t = torch.randint(0, 2 if dtype == torch.bool else 100, shape).to(dtype)
        return self._register(t, "random")

    def empty_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.calls.append(f"copy{tuple(src.shape)} on stream{self._current.cuda_stream}")
        dst.copy_(src.to(dst.dtype))

    def new_graph(self) -> FakeGraph:
        return FakeGraph(self.trt)

    @contextlib.contextmanager
    def capture(self, graph: FakeGraph, stream: FakeStream) -> Iterator[None]:
        self.calls.append(f"capture on stream{stream.cuda_stream}")
        state = self.trt.STATE
        state.capturing = graph.recorded
        previous, self._current = self._current, stream
        try:
            yield
        finally:
            state.capturing = None
            self._current = previous
            graph.generations = {
                address: state.buffers[address]
                for _, addresses in graph.recorded
                for address in addresses.values()
                if address in state.buffers
            }

    def event_timer(self, stream: FakeStream) -> Any:
        from dcvit_deploy.latency.loop import HostTimer

        return HostTimer(sync=stream.synchronize, name="cuda_event")


def write_tiny_onnx(path: Any) -> Any:
    """A two-node FP32 graph with the project's I/O contract (no torch export needed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((3 * 32 * 32, NUM_CLASSES), dtype=np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *ITEM_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=[weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def real_tensorrt() -> tuple[bool, str]:
    """Whether the real ``tensorrt`` package imports here, and if not, why (a skip reason)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt package is not installed"
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # e.g. libnvinfer missing
        return False, f"tensorrt is installed but cannot be imported: {exc}"
    return True, ""
