"""A fake ``tensorrt`` module with the TensorRT 10 Python API surface the backend uses.

:func:`make_module` returns a fresh module object whose classes append every call, in order, to
``module.CALLS``. Knobs: ``parse_errors`` (messages the parser reports; parsing fails when given),
``build_fails`` (``build_serialized_network`` returns ``None`` after logging an error) and
``version``. Nothing here touches a GPU.
"""

from __future__ import annotations

import enum
import importlib.machinery
import types
from typing import Any


def make_module(
    *,
    version: str = "10.9.0.34",
    parse_errors: tuple[str, ...] = (),
    build_fails: bool = False,
    input_name: str = "input",
) -> types.ModuleType:
    mod = types.ModuleType("tensorrt")
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", loader=None)
    mod.__version__ = version
    calls: list[str] = []
    mod.CALLS = calls  # type: ignore[attr-defined]

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self) -> None:
            pass

        def log(self, severity: Any, msg: str) -> None:  # overridden by the backend's logger
            pass

    ILogger.Severity = Severity  # type: ignore[attr-defined]

    class Logger(ILogger):
        WARNING = Severity.WARNING

        def __init__(self, severity: Any = Severity.WARNING) -> None:
            super().__init__()

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 0

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class BuilderFlag(enum.IntEnum):
        TF32 = 1

    class DataType(enum.IntEnum):
        FLOAT = 0
        HALF = 1

    class Tensor:
        def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
            self.name, self.shape, self.dtype = name, shape, dtype

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self._inputs = [Tensor(input_name, (-1, 3, 32, 32), DataType.FLOAT)]
            self._outputs = [Tensor("logits", (-1, 10), DataType.FLOAT)]

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
            self.entries = set(data.decode().split(",")) - {""}

        def combine(self, other: TimingCache, ignore_mismatch: bool) -> bool:
            calls.append("timing_cache.combine")
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
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

        def add_optimization_profile(self, profile: OptimizationProfile) -> int:
            calls.append("add_optimization_profile")
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            calls.append("Builder")
            self.logger = logger

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
                self.logger.log(Severity.ERROR, "out of workspace memory for layer 7")
                return None
            if config.cache is not None:  # a build adds its tactic timings to the cache
                config.cache.entries.add(f"tactic-{len(config.cache.entries)}")
            shapes = [p.shapes for p in config.profiles]
            return f"PLAN flags={network.flags} profiles={shapes}".encode()

    for obj in (
        ILogger,
        Logger,
        NetworkDefinitionCreationFlag,
        MemoryPoolType,
        BuilderFlag,
        DataType,
        OnnxParser,
        Builder,
    ):
        setattr(mod, obj.__name__, obj)
    mod.float32 = DataType.FLOAT  # type: ignore[attr-defined]
    mod.float16 = DataType.HALF  # type: ignore[attr-defined]
    return mod
