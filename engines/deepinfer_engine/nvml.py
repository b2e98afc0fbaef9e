"""A small read-only view of this host's GPUs through NVML.

`GpuSource` is the interface the rest of the engine manager uses; `PynvmlSource` is the
real implementation over `pynvml` (nvidia-ml-py), or over any module object with the same
functions, which is how the test fake plugs in:

Test hook: `DEEPINFER_ENGINE_FAKE_NVML=STATE.json` makes `open_gpu_source()` use the fake
NVML in `tests/fakes/fake_nvml.py` (or the file named by
`DEEPINFER_ENGINE_FAKE_NVML_MODULE`) reading GPUs from STATE.json. Only tests set it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

FAKE_NVML_ENV = "DEEPINFER_ENGINE_FAKE_NVML"
FAKE_NVML_MODULE_ENV = "DEEPINFER_ENGINE_FAKE_NVML_MODULE"


class NvmlUnavailable(Exception):
    """No usable NVIDIA driver/NVML on this host; the message is one line."""


@dataclass
class GpuProcess:
    pid: int
    name: str = ""
    used_memory: int | None = None  # bytes; None where the driver does not say


@dataclass
class MigDevice:
    uuid: str
    memory_total: int
    memory_used: int
    memory_free: int


@dataclass
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total: int  # bytes
    memory_used: int
    memory_free: int
    utilization: int | None = None  # percent, None where not supported
    processes: list[GpuProcess] = field(default_factory=list)
    pci_bus_id: str = ""
    mig_enabled: bool = False
    mig_devices: list[MigDevice] = field(default_factory=list)
    compute_capability: str | None = None  # "9.0"; None where the driver does not say

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GpuSnapshot:
    driver_version: str
    gpus: list[GpuInfo]


class GpuSource(Protocol):
    def snapshot(self) -> GpuSnapshot:
        """Read every GPU now. Raises NvmlUnavailable when there is no driver."""
        ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PynvmlSource:
    """GpuSource over pynvml (or a module-like object with pynvml's functions)."""

    def __init__(self, lib: Any = None) -> None:
        if lib is None:
            import pynvml

            lib = pynvml
        self._nv = lib

    def snapshot(self) -> GpuSnapshot:
        nv = self._nv
        import pynvml  # error types always come from the real package

        try:
            nv.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"no NVIDIA driver/NVML on this host ({exc})") from None
        try:
            driver = _text(nv.nvmlSystemGetDriverVersion())
            gpus = [self._gpu(i) for i in range(nv.nvmlDeviceGetCount())]
            return GpuSnapshot(driver_version=driver, gpus=gpus)
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML query failed: {exc}") from None
        finally:
            try:
                nv.nvmlShutdown()
            except pynvml.NVMLError:
                pass

    def _optional(self, fn: Any, *args: Any) -> Any:
        """Some queries are unsupported on some GPUs (or on MIG): None instead of failing."""
        import pynvml

        try:
            return fn(*args)
        except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_NoPermission,
                pynvml.NVMLError_FunctionNotFound):
            return None

    def _gpu(self, index: int) -> GpuInfo:
        nv = self._nv
        h = nv.nvmlDeviceGetHandleByIndex(index)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        util = self._optional(nv.nvmlDeviceGetUtilizationRates, h)
        pci = self._optional(nv.nvmlDeviceGetPciInfo, h)
        procs: dict[int, GpuProcess] = {}
        for getter in (nv.nvmlDeviceGetComputeRunningProcesses,
                       nv.nvmlDeviceGetGraphicsRunningProcesses):
            for p in self._optional(getter, h) or []:
                name = self._optional(nv.nvmlSystemGetProcessName, p.pid)
                procs.setdefault(p.pid, GpuProcess(
                    pid=int(p.pid), name=_text(name) if name else "",
                    used_memory=getattr(p, "usedGpuMemory", None)))
        cc = self._optional(nv.nvmlDeviceGetCudaComputeCapability, h)
        mig_mode = self._optional(nv.nvmlDeviceGetMigMode, h)
        mig_enabled = bool(mig_mode and mig_mode[0] == 1)  # NVML_DEVICE_MIG_ENABLE
        migs: list[MigDevice] = []
        if mig_enabled:
            import pynvml

            for i in range(nv.nvmlDeviceGetMaxMigDeviceCount(h)):
                try:
                    mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, i)
                except pynvml.NVMLError_NotFound:  # an empty slot
                    continue
                mm = nv.nvmlDeviceGetMemoryInfo(mh)
                migs.append(MigDevice(uuid=_text(nv.nvmlDeviceGetUUID(mh)),
                                      memory_total=int(mm.total), memory_used=int(mm.used),
                                      memory_free=int(mm.free)))
        return GpuInfo(
            index=index,
            uuid=_text(nv.nvmlDeviceGetUUID(h)),
            name=_text(nv.nvmlDeviceGetName(h)),
            memory_total=int(mem.total),
            memory_used=int(mem.used),
            memory_free=int(mem.free),
            utilization=int(util.gpu) if util is not None else None,
            processes=sorted(procs.values(), key=lambda p: p.pid),
            pci_bus_id=_text(getattr(pci, "busId", "")) if pci is not None else "",
            mig_enabled=mig_enabled,
            mig_devices=migs,
            compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
        )


def _load_fake(state_path: str, env: Mapping[str, str]) -> Any:
    module_path = env.get(FAKE_NVML_MODULE_ENV) or str(
        Path(__file__).resolve().parents[2] / "tests" / "fakes" / "fake_nvml.py"
    )
    spec = importlib.util.spec_from_file_location("deepinfer_fake_nvml", module_path)
    if spec is None or spec.loader is None:
        raise NvmlUnavailable(f"cannot load fake NVML from {module_path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeNvml(state_path)


def open_gpu_source(env: Mapping[str, str] | None = None) -> GpuSource:
    """The real NVML, or the test fake where the test hook env var is set."""
    env = os.environ if env is None else env
    state = env.get(FAKE_NVML_ENV)
    if state:
        return PynvmlSource(_load_fake(state, env))
    return PynvmlSource()
