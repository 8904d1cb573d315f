"""Capture the machine state a latency number depends on: OS, CPU, package versions (from
distribution metadata, never by importing the package), threads, GPU identity and NVML state,
and the load around each measurement. Anything that cannot be determined reads
:data:`UNAVAILABLE`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Any

UNAVAILABLE = "unavailable"

# Distribution names to try, in order, for each component (the first installed one wins).
PACKAGES: dict[str, tuple[str, ...]] = {
    "dcvit-deploy": ("dcvit-deploy",),
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "timm": ("timm",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "onnxslim": ("onnxslim",),
    "numpy": ("numpy",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12"),
    "nvidia-ml-py": ("nvidia-ml-py", "pynvml"),
}

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS")


def package_version(component: str) -> str:
    """Installed version of ``component`` (a key of :data:`PACKAGES` or a distribution name)."""
    for dist in PACKAGES.get(component, (component,)):
        try:
            return f"{importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return UNAVAILABLE


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or UNAVAILABLE


def physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; ``None`` where that is not readable."""
    cores: set[tuple[str, str]] = set()
    package = core = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    package = value.strip()
                elif key == "core id":
                    core = value.strip()
                    cores.add((package, core))
    except OSError:
        return None
    return len(cores) or None


def cuda_device_count() -> int:
    """CUDA devices the driver reports, probed through ``libcuda`` with ctypes (import-free);
    0 without a driver, when it fails to initialise, or sees no device."""
    names = ("libcuda.so.1", "libcuda.so", "nvcuda.dll", "libcuda.dylib")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except AttributeError:
            return 0
    return 0


def threads() -> dict[str, Any]:
    """Thread-related environment and, if torch is already imported, torch's thread counts."""
    out: dict[str, Any] = {name: os.environ.get(name, "") for name in THREAD_ENV}
    torch = sys.modules.get("torch")  # never import torch only to report this
    if torch is not None:
        try:
            out["torch_num_threads"] = int(torch.get_num_threads())
            out["torch_num_interop_threads"] = int(torch.get_num_interop_threads())
        except Exception:  # a half-initialised torch must not break a report
            pass
    return out


def cuda_info(device_index: int = 0) -> dict[str, Any]:
    """Stable GPU identity (name, compute capability, CUDA, driver; imports torch), apart from
    the volatile :func:`nvml_info` so that a fingerprint of it stays the same on one machine."""
    info: dict[str, Any] = {
        "available": False,
        "device_index": device_index,
        "name": UNAVAILABLE,
        "compute_capability": UNAVAILABLE,
        "torch_cuda": UNAVAILABLE,
        "driver": UNAVAILABLE,
    }
    try:
        import torch

        info["torch_cuda"] = str(torch.version.cuda or UNAVAILABLE)
        if torch.cuda.is_available() and device_index < torch.cuda.device_count():
            major, minor = torch.cuda.get_device_capability(device_index)
            info.update(
                available=True,
                name=torch.cuda.get_device_name(device_index),
                compute_capability=f"{major}.{minor}",
                device_count=torch.cuda.device_count(),
            )
    except Exception as exc:  # report, never fail: this is diagnostics
        info["error"] = f"{type(exc).__name__}: {exc}"
    info["driver"] = _driver_from_proc()
    return info


def nvml_info(device_index: int = 0) -> dict[str, Any]:
    """Clocks, power, temperature and driver from NVML; every field ``'unavailable'`` if absent."""
    fields = "driver sm_clock_mhz mem_clock_mhz max_sm_clock_mhz power_w power_limit_w"
    fields += " temperature_c persistence_mode"
    out: dict[str, Any] = {"nvml": UNAVAILABLE, **{f: UNAVAILABLE for f in fields.split()}}
    try:
        import pynvml  # provided by the nvidia-ml-py distribution
    except Exception:
        return out
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        out["nvml"] = f"init failed: {exc}"
        return out
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        out["nvml"] = "ok"
        probes: dict[str, Any] = {
            "driver": lambda: _text(pynvml.nvmlSystemGetDriverVersion()),
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(
                handle, pynvml.NVML_CLOCK_SM
            ),
            "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(
                handle, pynvml.NVML_TEMPERATURE_GPU
            ),
            "persistence_mode": lambda: bool(pynvml.nvmlDeviceGetPersistenceMode(handle)),
        }
        for key, probe in probes.items():
            try:  # each query is optional: some are unsupported on some boards (e.g. Jetson)
                out[key] = probe()
            except Exception:
                out[key] = UNAVAILABLE
    except Exception as exc:
        out["nvml"] = f"query failed: {exc}"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _driver_from_proc() -> str:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return UNAVAILABLE
    for token in first.split():
        if token.count(".") >= 1 and token.replace(".", "").isdigit():
            return token
    return UNAVAILABLE


def capture_environment(*, cuda: bool | None = None, device_index: int = 0) -> dict[str, Any]:
    """Environment facts for a record; ``gpu_state`` is volatile (keep it out of
    fingerprints). ``cuda=None`` probes the GPU only where the driver reports a device, ``False``
    never, ``True`` always (imports torch). ``tensorrt.module_found`` does not promise
    importable (its libraries may be missing)."""
    try:
        trt_found = importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        trt_found = False
    info: dict[str, Any] = {
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "cpu": {
            "model": cpu_model(),
            "count_logical": os.cpu_count() or 0,
            "count_physical": physical_cores() or UNAVAILABLE,
            "count_usable": usable_cores(),
        },
        "packages": {name: package_version(name) for name in PACKAGES},
        "tensorrt": {"version": package_version("tensorrt"), "module_found": trt_found},
        "threads": threads(),
    }
    if cuda is False:
        info["cuda"] = {"available": False, "reason": "not probed"}
        info["gpu_state"] = {"nvml": UNAVAILABLE}
    elif cuda or cuda_device_count() > 0:
        info["cuda"] = cuda_info(device_index)
        state = nvml_info(device_index)
        if info["cuda"]["driver"] == UNAVAILABLE and state.get("driver") != UNAVAILABLE:
            info["cuda"]["driver"] = state["driver"]
        info["gpu_state"] = state
    else:
        info["cuda"] = {"available": False, "reason": "no CUDA device reported by the driver"}
        info["gpu_state"] = {"nvml": UNAVAILABLE}
    return info


# --------------------------------------------------------------------------- machine state

BUSY_LOAD_PER_CORE = 0.5
"""1-minute load average per usable core, not counting our own threads, above which the
machine counts as busy for a CPU measurement."""

ORT_THREAD_OPTIONS = (
    "intra_op_num_threads",
    "inter_op_num_threads",
    "execution_mode",
    "allow_spinning",
    "intra_op_allow_spinning",
    "inter_op_allow_spinning",
)


def load_average() -> tuple[float, float, float] | None:
    """``os.getloadavg()`` rounded to 2 decimals; ``None`` where the OS has none."""
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return None
    return (round(one, 2), round(five, 2), round(fifteen, 2))


def cpu_pressure() -> float | None:
    """Linux PSI ``some avg10`` for the CPU (% of the last 10 s some task waited for a CPU);
    ``None`` where /proc/pressure/cpu is not readable."""
    try:
        with open("/proc/pressure/cpu", encoding="utf-8") as f:
            for line in f:
                if line.startswith("some "):
                    for token in line.split():
                        if token.startswith("avg10="):
                            return float(token.removeprefix("avg10="))
    except (OSError, ValueError):
        return None
    return None


def cpu_governor() -> str:
    """The CPU frequency governor of cpu0 (``performance``, ``powersave``...), or
    :data:`UNAVAILABLE` where cpufreq is not exposed (containers, VMs)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", encoding="utf-8") as f:
            return f.read().strip() or UNAVAILABLE
    except OSError:
        return UNAVAILABLE


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def runtime_threads(backend: str, backend_options: dict[str, Any]) -> dict[str, Any]:
    """The thread settings a measurement ran with: the profile's ONNX Runtime / torch thread
    options (as configured; 0 means the runtime's default) plus the thread environment."""
    out: dict[str, Any] = {"backend": backend}
    for key in (*ORT_THREAD_OPTIONS, "num_threads"):
        if key in backend_options:
            out[key] = backend_options[key]
    out.update({k: v for k, v in threads().items() if v != ""})
    return out


def machine_state() -> dict[str, Any]:
    """A cheap snapshot taken right before or after a measurement (no imports, a few reads)."""
    return {
        "load_avg": load_average(),
        "cpu_pressure_avg10": cpu_pressure(),
        "governor": cpu_governor(),
        "usable_cores": usable_cores(),
    }


def busy_warning(
    before: dict[str, Any], after: dict[str, Any], *, own_threads: int = 1
) -> str | None:
    """A warning when others loaded the machine during a measurement: the 1-minute load before,
    or after less our ``own_threads``, above :data:`BUSY_LOAD_PER_CORE` per usable core."""
    cores = int(before.get("usable_cores") or usable_cores())
    limit = BUSY_LOAD_PER_CORE * cores
    first = (before.get("load_avg") or (None,))[0]
    last = (after.get("load_avg") or (None,))[0]
    if first is None and last is None:
        return None
    others = max(first or 0.0, (last or 0.0) - own_threads)
    if others <= limit:
        return None
    return (
        f"the machine was busy: 1-minute load average {first} before and {last} after the "
        f"measurement on {cores} usable core(s) (busy above {limit:g} besides our "
        f"{own_threads} thread(s)); figures from a shared machine drift -- compare them only "
        "with candidates measured in the same interleaved rounds"
    )
