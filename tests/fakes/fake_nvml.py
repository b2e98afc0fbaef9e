"""A fake of the `pynvml` functions the engine manager calls, driven by a JSON file and
raising the real `pynvml.NVMLError` subclasses, so that `deepinfer_engine.nvml.PynvmlSource`
runs unchanged against it (selected with DEEPINFER_ENGINE_FAKE_NVML=STATE.json).

State file (re-read on every nvmlInit, so tests may change it between calls):
    {"init_error": null | "LIBRARY_NOT_FOUND" | "DRIVER_NOT_LOADED" | ...,
     "driver_version": "550.54.15",
     "gpus": [{"uuid": "GPU-...", "name": "NVIDIA H100 80GB HBM3",
               "total_gib": 80, "used_gib": 0.5,          (or memory_total/memory_used bytes)
               "utilization": 0,                          (null: NVMLError_NotSupported)
               "compute_capability": "9.0",               (major.minor, default 9.0)
               "processes": [{"pid": 4242, "name": "python", "used_gib": 20}],
               "mig": false,                              (null: MIG not supported)
               "mig_devices": [{"uuid": "MIG-...", "total_gib": 10, "used_gib": 0}]}]}
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

GIB = 1024**3


def _bytes(d: dict[str, Any], key: str) -> int:
    if f"memory_{key}" in d:
        return int(d[f"memory_{key}"])
    return int(float(d.get(f"{key}_gib", 0)) * GIB)


def _mem(d: dict[str, Any]) -> SimpleNamespace:
    total, used = _bytes(d, "total"), _bytes(d, "used")
    return SimpleNamespace(total=total, used=used, free=max(total - used, 0))


def _error(name: str) -> pynvml.NVMLError:
    return pynvml.NVMLError(getattr(pynvml, f"NVML_ERROR_{name}"))


def write_state(path: str | Path, gpus: list[dict[str, Any]], **extra: Any) -> Path:
    """Helper for tests: write a state file, filling in uuids and names."""
    full = []
    for i, g in enumerate(gpus):
        g = {"uuid": f"GPU-{i:08x}-fake-4000-8000-{i:012x}", "name": "NVIDIA H100 80GB HBM3",
             "total_gib": 80, "used_gib": 0.5, "utilization": 0, "processes": [], "mig": False,
             **g}
        full.append(g)
    path = Path(path)
    path.write_text(json.dumps({"driver_version": "550.54.15", "gpus": full, **extra}))
    return path


class FakeNvml:
    def __init__(self, state_path: str | Path) -> None:
        self._path = Path(state_path)
        self._state: dict[str, Any] | None = None

    def _gpus(self) -> list[dict[str, Any]]:
        if self._state is None:
            raise _error("UNINITIALIZED")
        return list(self._state.get("gpus", []))

    # --- pynvml API ------------------------------------------------------------------
    def nvmlInit(self) -> None:
        state = json.loads(self._path.read_text())
        if state.get("init_error"):
            raise _error(state["init_error"])
        self._state = state

    def nvmlShutdown(self) -> None:
        self._state = None

    def nvmlSystemGetDriverVersion(self) -> str:
        assert self._state is not None
        return str(self._state.get("driver_version", "550.54.15"))

    def nvmlDeviceGetCount(self) -> int:
        return len(self._gpus())

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        gpus = self._gpus()
        if not 0 <= index < len(gpus):
            raise _error("INVALID_ARGUMENT")
        return {"kind": "gpu", "index": index, **gpus[index]}

    def nvmlDeviceGetUUID(self, h: dict[str, Any]) -> str:
        return str(h["uuid"])

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> str:
        return str(h.get("name", "NVIDIA H100 80GB HBM3"))

    def nvmlDeviceGetPciInfo(self, h: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(busId=h.get("pci_bus_id", f"00000000:{h['index'] + 0x17:02X}:00.0"))

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> SimpleNamespace:
        return _mem(h)

    def nvmlDeviceGetUtilizationRates(self, h: dict[str, Any]) -> SimpleNamespace:
        if h.get("kind") == "mig" or h.get("utilization", 0) is None:
            raise _error("NOT_SUPPORTED")
        return SimpleNamespace(gpu=int(h.get("utilization", 0)), memory=0)

    def _procs(self, h: dict[str, Any]) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=int(p["pid"]), usedGpuMemory=_bytes(p, "used") or None)
                for p in h.get("processes", [])]

    def nvmlDeviceGetComputeRunningProcesses(self, h: dict[str, Any]) -> list[SimpleNamespace]:
        return self._procs(h)

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: dict[str, Any]) -> list[SimpleNamespace]:
        return []

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        for g in self._gpus():
            for p in g.get("processes", []):
                if int(p["pid"]) == pid:
                    return str(p.get("name", "python"))
        raise _error("NOT_FOUND")

    def nvmlDeviceGetCudaComputeCapability(self, h: dict[str, Any]) -> tuple[int, int]:
        # "compute_capability": "8.0" in the state file; an H100's 9.0 by default.
        major, minor = str(h.get("compute_capability", "9.0")).split(".")
        return int(major), int(minor)

    def nvmlDeviceGetMigMode(self, h: dict[str, Any]) -> list[int]:
        if h.get("mig") is None:
            raise _error("NOT_SUPPORTED")
        mode = 1 if h.get("mig") else 0
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: dict[str, Any]) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: dict[str, Any], i: int) -> dict[str, Any]:
        migs = h.get("mig_devices", [])
        if i >= len(migs):
            raise _error("NOT_FOUND")
        return {"kind": "mig", **migs[i]}
