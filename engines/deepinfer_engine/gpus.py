"""`deepinfer-engine gpus` (the table) and GPU selection for `launch`.

Selection is pure: it takes a snapshot of the GPUs and the UUIDs other engines on this
host have reserved, and returns the GPUs to use or a SelectionError saying why not.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .nvml import GpuInfo, GpuSnapshot

GIB = 1024**3


class SelectionError(Exception):
    """No suitable GPUs; the message says why, one line per GPU where useful."""


@dataclass(frozen=True)
class Selection:
    indices: list[int]
    uuids: list[str]  # GPU or MIG UUIDs, in CUDA_VISIBLE_DEVICES order

    @property
    def cuda_visible_devices(self) -> str:
        # Indices are only meaningful with CUDA_DEVICE_ORDER=PCI_BUS_ID; UUIDs always are.
        return ",".join(self.uuids)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def format_table(snap: GpuSnapshot) -> str:
    if not snap.gpus:
        return f"no GPUs (driver {snap.driver_version})"
    rows = [["IDX", "UUID", "NAME", "USED GiB", "FREE GiB", "TOTAL GiB", "UTIL", "PROCESSES"]]
    for g in snap.gpus:
        procs = ", ".join(
            f"{p.pid}:{p.name or '?'}" + (f"({_gib(p.used_memory)}G)" if p.used_memory else "")
            for p in g.processes
        )
        name = g.name + (" [MIG]" if g.mig_enabled else "")
        rows.append([str(g.index), g.uuid, name, _gib(g.memory_used), _gib(g.memory_free),
                     _gib(g.memory_total), "-" if g.utilization is None else f"{g.utilization}%",
                     procs or "-"])
        for m in g.mig_devices:
            rows.append(["", "  " + m.uuid, "  MIG device", _gib(m.memory_used),
                         _gib(m.memory_free), _gib(m.memory_total), "-", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([f"driver {snap.driver_version}", *lines])


def to_json(snap: GpuSnapshot) -> str:
    return json.dumps(
        {"driver_version": snap.driver_version, "gpus": [g.to_dict() for g in snap.gpus]},
        indent=2,
    )


def _needed(total: int, mem_util: float) -> int:
    return int(total * mem_util)


def _why_unusable(g: GpuInfo, mem_util: float, reserved: Collection[str]) -> str | None:
    if g.uuid in reserved:
        return "reserved by another engine on this host"
    if g.mig_enabled:
        return "MIG enabled (name a MIG device with --gpus MIG-<uuid>, or disable MIG)"
    need = _needed(g.memory_total, mem_util)
    if g.memory_free < need:
        return (f"{_gib(g.memory_free)} GiB free < {_gib(need)} GiB needed for "
                f"--gpu-memory-utilization {mem_util}")
    return None


def _preference(g: GpuInfo) -> tuple[int, int, int, int]:
    # Idle GPUs without foreign processes first, then the least busy, the most free.
    return (1 if g.processes else 0, g.utilization or 0, -g.memory_free, g.index)


def select_auto(
    snap: GpuSnapshot, count: int, mem_util: float, reserved: Collection[str] = ()
) -> Selection:
    usable, reasons = [], []
    for g in snap.gpus:
        why = _why_unusable(g, mem_util, reserved)
        if why is None:
            usable.append(g)
        else:
            reasons.append(f"GPU {g.index} ({g.uuid}): {why}")
    if len(usable) < count:
        detail = "; ".join(reasons) if reasons else "this host has no GPUs"
        raise SelectionError(
            f"need {count} GPU(s) with enough free memory, found {len(usable)}: {detail}"
        )
    chosen = sorted(sorted(usable, key=_preference)[:count], key=lambda g: g.index)
    return Selection([g.index for g in chosen], [g.uuid for g in chosen])


def parse_gpu_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def select_explicit(
    snap: GpuSnapshot,
    requested: Sequence[str],
    count: int,
    mem_util: float,
    reserved: Collection[str] = (),
) -> Selection:
    """`--gpus 0,1` (indices), `--gpus GPU-...` (UUIDs) or one `MIG-...` device."""
    if len(requested) != count:
        raise SelectionError(
            f"--gpus names {len(requested)} GPU(s) but the engine needs {count} "
            "(--tp times --pipeline-parallel-size)"
        )
    if len(set(requested)) != len(requested):
        raise SelectionError(f"--gpus names a GPU twice: {','.join(requested)}")
    by_uuid = {g.uuid: g for g in snap.gpus}
    migs = {m.uuid: (g, m) for g in snap.gpus for m in g.mig_devices}
    indices: list[int] = []
    uuids: list[str] = []
    for item in requested:
        if item.startswith("MIG-"):
            if item not in migs:
                raise SelectionError(f"--gpus: no MIG device {item} on this host")
            if count != 1:
                raise SelectionError(
                    "a MIG device holds one engine on its own: use --tp 1 with a MIG UUID"
                )
            parent, mig = migs[item]
            if item in reserved:
                raise SelectionError(f"--gpus: {item} is reserved by another engine on this host")
            need = _needed(mig.memory_total, mem_util)
            if mig.memory_free < need:
                raise SelectionError(
                    f"--gpus: {item}: {_gib(mig.memory_free)} GiB free < {_gib(need)} GiB "
                    f"needed for --gpu-memory-utilization {mem_util}"
                )
            indices.append(parent.index)
            uuids.append(item)
            continue
        if item.isdigit():
            matches = [g for g in snap.gpus if g.index == int(item)]
            if not matches:
                raise SelectionError(
                    f"--gpus: no GPU {item} on this host (it has {len(snap.gpus)})"
                )
            gpu = matches[0]
        elif item in by_uuid:
            gpu = by_uuid[item]
        else:
            raise SelectionError(f"--gpus: {item!r} is neither a GPU index nor a GPU/MIG UUID")
        why = _why_unusable(gpu, mem_util, reserved)
        if why is not None:
            raise SelectionError(f"--gpus: GPU {gpu.index} ({gpu.uuid}): {why}")
        indices.append(gpu.index)
        uuids.append(gpu.uuid)
    return Selection(indices, uuids)


def select_gpus(
    snap: GpuSnapshot,
    gpus: str,
    count: int,
    mem_util: float,
    reserved: Collection[str] = (),
) -> Selection:
    if gpus == "auto":
        return select_auto(snap, count, mem_util, reserved)
    return select_explicit(snap, parse_gpu_list(gpus), count, mem_util, reserved)
