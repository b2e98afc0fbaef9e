"""Whether this host can hold a replica, and on which GPUs. Pure: the agent passes the
GPU snapshot, what its own replicas already use and the capability table; placement
says which GPUs, or why not.

A host takes a replica when its labels match the deployment's selector, it is below its
engine limit, and enough free GPUs meet the replica's needs: tensor-parallel count,
free memory for `gpu_memory_utilization`, and the compute capability vLLM needs for the
requested `dtype` and `quantization` (configs/gpu-capabilities.toml, from vLLM's source).
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deepinfer_router.shared.deployment import DeploymentSpec

from .gpus import Selection, SelectionError, select_auto, select_explicit
from .launcher import DEFAULT_GPU_MEMORY_UTILIZATION
from .nvml import GpuSnapshot

Capability = tuple[int, int]
# configs/gpu-capabilities.toml, through the symlink beside this file (the wheel holds
# the file itself).
DEFAULT_TABLE = Path(__file__).with_name("gpu-capabilities.toml")


def parse_capability(value: str) -> Capability:
    major, _, minor = value.strip().partition(".")
    return int(major), int(minor or 0)


def _show(c: Capability) -> str:
    return f"{c[0]}.{c[1]}"


@dataclass(frozen=True)
class CapabilityTable:
    """Minimum compute capability per vLLM `--dtype` and `--quantization` value."""

    dtype: Mapping[str, Capability] = field(default_factory=dict)
    quantization: Mapping[str, Capability] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | str | None = None) -> CapabilityTable:
        with open(path or DEFAULT_TABLE, "rb") as fh:
            data = tomllib.load(fh)
        return cls(
            dtype={k: parse_capability(v["min_capability"])
                   for k, v in data.get("dtype", {}).items()},
            quantization={k: parse_capability(v["min_capability"])
                          for k, v in data.get("quantization", {}).items()},
        )

    def required(self, spec: DeploymentSpec) -> tuple[Capability | None, str]:
        """The highest minimum among the spec's dtype and quantization, and what sets it."""
        needs: list[tuple[Capability, str]] = []
        if spec.dtype and spec.dtype in self.dtype:
            needs.append((self.dtype[spec.dtype], f"dtype {spec.dtype}"))
        if spec.quantization and spec.quantization in self.quantization:
            needs.append((self.quantization[spec.quantization],
                          f"quantization {spec.quantization}"))
        if not needs:
            return None, ""
        return max(needs)


@dataclass(frozen=True)
class HostView:
    """What placement knows of this host."""

    labels: Mapping[str, str]
    snapshot: GpuSnapshot | None  # None: a CPU-only host (--gpus none)
    reserved: Collection[str] = ()  # GPU UUIDs other engines here hold
    engines: int = 0  # engines this agent runs now
    max_engines: int | None = None


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def place(spec: DeploymentSpec, host: HostView, table: CapabilityTable) -> Selection | str:
    """The GPUs for one replica of `spec` here (an empty selection on a CPU-only host),
    or a one-line reason why this host cannot take it."""
    if not labels_match(spec.labels, host.labels):
        return "labels do not match"
    if host.max_engines is not None and host.engines >= host.max_engines:
        return f"already running {host.engines} engine(s) (--max-engines {host.max_engines})"
    if host.snapshot is None:
        if spec.device is not None:
            return "device names GPUs but this host has none (--gpus none)"
        return Selection([], [])
    need, why = table.required(spec)
    snap = host.snapshot
    if need is not None:
        capable = [g for g in snap.gpus if g.compute_capability is not None
                   and parse_capability(g.compute_capability) >= need]
        if len(capable) < len(snap.gpus):
            snap = GpuSnapshot(snap.driver_version, capable)
    mem_util = spec.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    try:
        if spec.device is not None:
            return select_explicit(snap, spec.device.split(","), spec.tensor_parallel_size,
                                   mem_util, host.reserved)
        return select_auto(snap, spec.tensor_parallel_size, mem_util, host.reserved)
    except SelectionError as exc:
        if need is not None:
            return f"{exc} (only GPUs of compute capability >= {_show(need)} count, for {why})"
        return str(exc)


def load_fraction(host: HostView) -> float:
    """0 (idle) .. 1 (full): the share of GPUs (or of the engine limit) in use. The
    least-loaded host waits least before claiming, so it usually wins."""
    if host.snapshot is not None and host.snapshot.gpus:
        return min(1.0, len(host.reserved) / len(host.snapshot.gpus))
    if host.max_engines:
        return min(1.0, host.engines / host.max_engines)
    return 0.0
