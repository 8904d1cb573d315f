"""The TensorRT runner: one engine, one execution context, one stream, owned buffers and graphs.

CUDA comes through the :class:`CudaDevice` seam (:class:`TorchCudaDevice`: torch, no pycuda; the
tests use a CPU fake). The rules, each guarded by a test: the device is current around every
use; buffers, copies and enqueues run on the runner's own stream, which first waits for the
caller's queued work; every TensorRT call result is checked and failures quote TensorRT; CUDA
graphs belong to the :class:`Binding` they were captured over and are reset before its buffers
are released; every I/O dtype maps to a torch dtype or is refused by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dcvit_deploy.backends.tensorrt.loaders import (
    dtype_name,
    engine_from_bytes,
    import_tensorrt,
    process_logger,
)
from dcvit_deploy.backends.tensorrt.settings import check_engine_compatible, read_engine_meta
from dcvit_deploy.errors import EngineMismatch, ProfileError, UserInputError
from dcvit_deploy.latency.loop import HostTimer, Timer
from dcvit_deploy.store.records import Artifact, Scope

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch


# TensorRT DataType member -> torch dtype attribute. FP8 is E4M3 in TensorRT.
TORCH_DTYPES: dict[str, str] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
    "FP8": "float8_e4m3fn",
}
REFUSED_DTYPES: dict[str, str] = {
    "INT4": "packed 4-bit integers",
    "FP4": "packed 4-bit floats",
    "E8M0": "exponent-only block scales",
}


class TensorRTExecutionError(RuntimeError):
    """TensorRT refused to run an engine that loaded (an internal problem, not a user's)."""


def torch_dtype(trt_dtype: Any, *, tensor: str, engine: str) -> torch.dtype:
    """The torch dtype of a TensorRT I/O dtype; :class:`UserInputError` naming it otherwise."""
    import torch

    name = dtype_name(trt_dtype)
    attr = TORCH_DTYPES.get(name)
    if attr is not None and hasattr(torch, attr):
        return getattr(torch, attr)
    why = REFUSED_DTYPES.get(name, "a type this runner does not know")
    raise UserInputError(
        f"engine {engine}: I/O tensor {tensor!r} has TensorRT type {name} ({why}), which the "
        "runner cannot bind to a torch buffer",
        "export the model with float32 or float16 inputs and outputs",
    )


class CudaDevice(Protocol):
    """What the runner needs from CUDA. Streams expose ``cuda_stream`` (the raw handle),
    ``synchronize()`` and ``wait_stream(other)``, like ``torch.cuda.Stream``."""

    index: int

    def identity(self) -> tuple[str, str]:
        """(GPU name, compute capability 'major.minor')."""
        ...

    def activate(self) -> contextlib.AbstractContextManager[None]:
        """Make this device current for the duration of the block."""
        ...

    def new_stream(self) -> Any: ...

    def current_stream(self) -> Any: ...

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager[None]:
        """Make ``stream`` current (allocations and copies are then ordered on it)."""
        ...

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...

    def random(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A device buffer filled with random values (inputs for timing)."""
        ...

    def empty_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A page-locked host buffer (asynchronous copies need one)."""
        ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` into ``dst`` on the current stream (converting dtype on the host)."""
        ...

    def new_graph(self) -> Any: ...

    def capture(self, graph: Any, stream: Any) -> contextlib.AbstractContextManager[None]: ...

    def event_timer(self, stream: Any) -> Timer: ...


class TorchCudaDevice:
    """:class:`CudaDevice` through torch (imported when the device is created)."""

    def __init__(self, index: int = 0) -> None:
        import torch

        self.index = index
        self._torch = torch
        self._device = torch.device("cuda", index)

    def identity(self) -> tuple[str, str]:
        cuda = self._torch.cuda
        major, minor = cuda.get_device_capability(self.index)
        return cuda.get_device_name(self.index), f"{major}.{minor}"

    def activate(self) -> contextlib.AbstractContextManager[None]:
        return self._torch.cuda.device(self.index)

    def new_stream(self) -> Any:
        return self._torch.cuda.Stream(self._device)

    def current_stream(self) -> Any:
        return self._torch.cuda.current_stream(self._device)

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager[None]:
        return self._torch.cuda.stream(stream)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._torch.empty(shape, dtype=dtype, device=self._device)

    def random(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        torch = self._torch
        if dtype.is_floating_point:
            return torch.randn(shape, device=self._device).to(dtype)
        high = 2 if dtype == torch.bool else 100
        return torch.randint(0, high, shape, device=self._device).to(dtype)

    def empty_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._torch.empty(shape, dtype=dtype, pin_memory=True)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if src.dtype != dst.dtype:
            src = src.to(dst.dtype) if src.device.type == "cpu" else src.to(dtype=dst.dtype)
        dst.copy_(src, non_blocking=True)

    def new_graph(self) -> Any:
        return self._torch.cuda.CUDAGraph()

    def capture(self, graph: Any, stream: Any) -> contextlib.AbstractContextManager[None]:
        return self._torch.cuda.graph(graph, stream=stream)

    def event_timer(self, stream: Any) -> Timer:
        from dcvit_deploy.latency.loop import CudaEventTimer

        return CudaEventTimer(stream)


@dataclass
class Binding:
    """Device buffers bound to the context for one batch size, their host mirrors, and the CUDA
    graphs captured over them (keyed by whether the graph includes the copies)."""

    batch_size: int
    device: dict[str, torch.Tensor]
    host: dict[str, torch.Tensor] = field(default_factory=dict)
    graphs: dict[bool, Any] = field(default_factory=dict)
    released: bool = False


class TensorRTRunner:
    """One deserialized engine and execution context on a dedicated stream of one device
    (``device``: the CUDA seam, default :class:`TorchCudaDevice`)."""

    def __init__(
        self, artifact: Artifact, *, device_id: int = 0, device: CudaDevice | None = None
    ) -> None:
        trt = import_tensorrt()
        self.trt = trt
        self.device: CudaDevice = device if device is not None else TorchCudaDevice(device_id)
        plan = Path(artifact.path)
        meta = read_engine_meta(plan)
        gpu_name, capability = self.device.identity()
        check_engine_compatible(
            meta,
            tensorrt_version=str(trt.__version__),
            gpu_name=gpu_name,
            compute_capability=capability,
        )
        self.key = (artifact.path, artifact.sha256, self.device.index)
        self.logger = process_logger(trt)
        self._binding: Binding | None = None
        with self.device.activate(), self.logger.capture() as capture:
            self.stream = self.device.new_stream()
            self._runtime = trt.Runtime(self.logger)
            if self._runtime is None:
                raise EngineMismatch(
                    f"TensorRT could not create a runtime: {capture.quote()}",
                    "check the GPU and driver with 'dcvit-deploy doctor'",
                )
            self.engine = engine_from_bytes(
                self._runtime, plan.read_bytes(), name=plan.name, capture=capture
            )
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise EngineMismatch(
                    f"TensorRT could not create an execution context for {plan.name}: "
                    f"{capture.quote()}",
                    "free GPU memory (other processes) or rebuild with a smaller max batch",
                )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.inputs = [n for n, i in zip(names, is_input, strict=True) if i]
        self.outputs = [n for n, i in zip(names, is_input, strict=True) if not i]
        if len(self.inputs) != 1 or not self.outputs:
            raise UserInputError(
                f"engine {plan.name} has inputs {self.inputs} and outputs {self.outputs}",
                "export models with one image input",
            )
        self.dtypes: dict[str, torch.dtype] = {
            n: torch_dtype(self.engine.get_tensor_dtype(n), tensor=n, engine=plan.name)
            for n in names
        }
        self.input_shape = tuple(artifact.input_shape)

    # ------------------------------------------------------------------ ordering

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """The runner's device current (wrap a timing loop of :meth:`step` in it)."""
        with self.device.activate():
            yield

    @contextlib.contextmanager
    def _ordered(self) -> Iterator[None]:
        """Device current; the runner's stream after the caller's queued work, and current."""
        with self.device.activate():
            self.stream.wait_stream(self.device.current_stream())
            with self.device.use_stream(self.stream):
                yield

    # ------------------------------------------------------------------ buffers

    def bind(self, batch_size: int) -> Binding:
        """Set the input shape and bind device buffers for ``batch_size`` (reused if bound)."""
        with self._ordered():
            return self._bind(batch_size)

    def _bind(self, batch_size: int) -> Binding:
        if self._binding is not None and self._binding.batch_size == batch_size:
            return self._binding
        self._release()
        name = self.inputs[0]
        shape = (batch_size, *self.input_shape)
        with self.logger.capture() as capture:
            if not self.context.set_input_shape(name, shape):
                raise ProfileError(
                    f"batch size {batch_size} is outside the engine's optimisation profile "
                    f"({capture.quote()})",
                    "rebuild with the batch size in the profile's batch_sizes",
                )
            buffers = {name: self.device.random(shape, self.dtypes[name])}
            for out in self.outputs:
                out_shape = tuple(int(d) for d in self.context.get_tensor_shape(out))
                if any(d < 0 for d in out_shape):
                    raise TensorRTExecutionError(
                        f"TensorRT reports output {out!r} with unknown shape {out_shape} after "
                        f"the input shape {shape} was set ({capture.quote()})"
                    )
                buffers[out] = self.device.empty(out_shape, self.dtypes[out])
            for tensor_name, tensor in buffers.items():
                if not self.context.set_tensor_address(tensor_name, tensor.data_ptr()):
                    raise TensorRTExecutionError(
                        f"TensorRT refused the buffer of {tensor_name!r}: {capture.quote()}"
                    )
        self._binding = Binding(batch_size, buffers)
        return self._binding

    def _release(self) -> None:
        """Reset the binding's graphs, then drop its buffers (graphs point into them)."""
        binding, self._binding = self._binding, None
        if binding is None:
            return
        for graph in binding.graphs.values():
            graph.reset()
        binding.graphs.clear()
        binding.released = True
        binding.device.clear()
        binding.host.clear()

    def close(self) -> None:
        """Release graphs and buffers, then the context, engine and runtime, in that order."""
        with self.device.activate():
            self._release()
            for attr in ("context", "engine", "_runtime"):
                if hasattr(self, attr):
                    delattr(self, attr)

    # ------------------------------------------------------------------ running

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise TensorRTExecutionError(
                f"TensorRT execute_async_v3 failed: {self.logger.recent_errors()}"
            )

    def _body(self, binding: Binding, copies: bool) -> Callable[[], None]:
        if not copies:
            return self._enqueue
        import torch

        name, first = self.inputs[0], self.outputs[0]
        x, y = binding.device[name], binding.device[first]
        if not binding.host:
            x_host = self.device.empty_host(tuple(x.shape), x.dtype)
            x_host.copy_(torch.randn(tuple(x.shape)).to(x.dtype))
            binding.host = {name: x_host, first: self.device.empty_host(tuple(y.shape), y.dtype)}
        x_host, y_host = binding.host[name], binding.host[first]
        device, stream = self.device, self.stream

        def body() -> None:
            with device.use_stream(stream):
                device.copy(x, x_host)
                self._enqueue()
                device.copy(y_host, y)

        return body

    def step(self, batch_size: int, *, copies: bool, cuda_graph: bool) -> Callable[[], None]:
        """A zero-argument step for the timing loop: enqueue (with H2D/D2H copies from pinned
        memory when ``copies``), or the replay of a CUDA graph of it owned by the binding.

        A step is valid until the runner rebinds to another batch size; calling it afterwards
        raises instead of running on released buffers."""
        with self._ordered():
            binding = self._bind(batch_size)
            body = self._body(binding, copies)
            if not cuda_graph:
                run = body
            else:
                graph = binding.graphs.get(copies)
                if graph is None:
                    # TensorRT finishes shape-dependent setup in the first enqueue: run once
                    # before capturing.
                    body()
                    self.stream.synchronize()
                    graph = self.device.new_graph()
                    with self.device.capture(graph, self.stream):
                        body()
                    binding.graphs[copies] = graph
                device, stream, captured = self.device, self.stream, graph

                def run() -> None:
                    with device.use_stream(stream):
                        captured.replay()

        def guarded() -> None:
            if binding.released:
                raise RuntimeError(
                    f"this step's buffers (batch size {binding.batch_size}) were rebound; "
                    "ask the runner for a new step"
                )
            run()

        return guarded

    def infer(self, inputs: np.ndarray) -> np.ndarray:
        """Run on host ``inputs`` (N, C, H, W); returns the first output as float32 numpy."""
        import numpy as np
        import torch

        with self._ordered():
            binding = self._bind(int(inputs.shape[0]))
            x = binding.device[self.inputs[0]]
            y = binding.device[self.outputs[0]]
            self.device.copy(x, torch.from_numpy(np.ascontiguousarray(inputs)))
            self._enqueue()
            y_host = self.device.empty_host(tuple(y.shape), y.dtype)
            self.device.copy(y_host, y)
            self.stream.synchronize()
        return y_host.float().numpy()

    def timer(self, scope: Scope) -> Timer:
        """CUDA events on the runner's stream for device scopes; host clock + sync for host."""
        if scope == "host":
            return HostTimer(sync=self.stream.synchronize, name="host")
        return self.device.event_timer(self.stream)
