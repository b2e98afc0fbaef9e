"""GPU selection and the `gpus` table against fake NVML states (real pynvml error types)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pynvml
import pytest

from deepinfer_engine.gpus import SelectionError, format_table, select_gpus, to_json
from deepinfer_engine.nvml import NvmlUnavailable, PynvmlSource, open_gpu_source
from tests.fakes.fake_nvml import FakeNvml, write_state

pytestmark = pytest.mark.timeout(10)


def snapshot(tmp_path: Path, gpus: list[dict[str, Any]], **extra: Any):  # type: ignore[no-untyped-def]
    state = write_state(tmp_path / "nvml.json", gpus, **extra)
    return PynvmlSource(FakeNvml(state)).snapshot()


def test_fake_raises_real_pynvml_errors(tmp_path: Path) -> None:
    state = write_state(tmp_path / "s.json", [{}], init_error="LIBRARY_NOT_FOUND")
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        FakeNvml(state).nvmlInit()
    fake = FakeNvml(write_state(tmp_path / "t.json", [{"mig": None}]))
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetMigMode(fake.nvmlDeviceGetHandleByIndex(0))


@pytest.mark.parametrize("error", ["LIBRARY_NOT_FOUND", "DRIVER_NOT_LOADED"])
def test_no_driver_is_one_clear_error(tmp_path: Path, error: str) -> None:
    state = write_state(tmp_path / "s.json", [], init_error=error)
    with pytest.raises(NvmlUnavailable) as info:
        PynvmlSource(FakeNvml(state)).snapshot()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("no NVIDIA driver")


def test_snapshot_reads_everything(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, [
        {"used_gib": 20, "utilization": 35,
         "processes": [{"pid": 4242, "name": "python3", "used_gib": 19.5}]},
        {"utilization": None, "mig": None},
    ])
    g0, g1 = snap.gpus
    assert g0.memory_total == 80 * 1024**3 and g0.memory_free == 60 * 1024**3
    assert g0.utilization == 35 and g0.processes[0].pid == 4242
    assert g0.processes[0].name == "python3"
    assert g1.utilization is None and not g1.mig_enabled  # NotSupported tolerated
    table = format_table(snap)
    assert "4242:python3" in table and g0.uuid in table and "60.0" in table
    assert json.loads(to_json(snap))["gpus"][1]["uuid"] == g1.uuid


def test_auto_skips_full_gpus(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, [{"used_gib": 70}, {"used_gib": 1}])
    sel = select_gpus(snap, "auto", 1, 0.9)
    assert sel.indices == [1]
    # With a small enough share, the busy GPU fits too; both are then candidates.
    assert select_gpus(snap, "auto", 2, 0.1).indices == [0, 1]


def test_all_full_explains_each_gpu(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, [{"used_gib": 70}, {"used_gib": 75}])
    with pytest.raises(SelectionError) as info:
        select_gpus(snap, "auto", 1, 0.9)
    msg = str(info.value)
    assert "GPU 0" in msg and "GPU 1" in msg and "gpu-memory-utilization 0.9" in msg


def test_prefers_gpus_without_foreign_processes(tmp_path: Path) -> None:
    foreign = {"used_gib": 2, "processes": [{"pid": 99, "name": "jupyter", "used_gib": 2}]}
    snap = snapshot(tmp_path, [foreign, {"used_gib": 1, "utilization": 50}, {}, foreign])
    # Idle GPUs first (2), then the busy one without foreign processes (1).
    assert select_gpus(snap, "auto", 1, 0.5).indices == [2]
    assert select_gpus(snap, "auto", 2, 0.5).indices == [1, 2]
    assert select_gpus(snap, "auto", 3, 0.5).indices[:2] != [0, 3]


def test_tp2_of_4_with_reservations(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, [{}, {}, {}, {}])
    first = select_gpus(snap, "auto", 2, 0.9)
    assert first.indices == [0, 1]
    second = select_gpus(snap, "auto", 2, 0.9, reserved=set(first.uuids))
    assert second.indices == [2, 3]
    assert second.cuda_visible_devices == ",".join(g.uuid for g in snap.gpus[2:])
    with pytest.raises(SelectionError, match="reserved by another engine"):
        select_gpus(snap, "auto", 1, 0.9, reserved=set(first.uuids + second.uuids))


def test_explicit_gpus_are_checked(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, [{}, {"used_gib": 79}, {}])
    assert select_gpus(snap, "0,2", 2, 0.9).indices == [0, 2]
    assert select_gpus(snap, snap.gpus[2].uuid, 1, 0.9).indices == [2]
    with pytest.raises(SelectionError, match=r"GPU 1 .*free"):
        select_gpus(snap, "0,1", 2, 0.9)
    with pytest.raises(SelectionError, match="no GPU 7"):
        select_gpus(snap, "7", 1, 0.9)
    with pytest.raises(SelectionError, match="needs 2"):
        select_gpus(snap, "0", 2, 0.9)
    with pytest.raises(SelectionError, match="reserved"):
        select_gpus(snap, "0", 1, 0.9, reserved={snap.gpus[0].uuid})


def test_mig(tmp_path: Path) -> None:
    mig = {"mig": True, "mig_devices": [
        {"uuid": "MIG-aaaa-1111", "total_gib": 10, "used_gib": 0},
        {"uuid": "MIG-bbbb-2222", "total_gib": 10, "used_gib": 9.5}]}
    snap = snapshot(tmp_path, [mig, {"used_gib": 78}])
    assert snap.gpus[0].mig_enabled and len(snap.gpus[0].mig_devices) == 2
    assert "MIG-aaaa-1111" in format_table(snap)
    # auto never places on a MIG-enabled GPU, and says why.
    with pytest.raises(SelectionError, match="MIG enabled"):
        select_gpus(snap, "auto", 1, 0.9)
    with pytest.raises(SelectionError, match="MIG enabled"):
        select_gpus(snap, "0", 1, 0.9)
    # A MIG device by UUID, one engine on it.
    sel = select_gpus(snap, "MIG-aaaa-1111", 1, 0.9)
    assert sel.uuids == ["MIG-aaaa-1111"] and sel.indices == [0]
    with pytest.raises(SelectionError, match="free"):
        select_gpus(snap, "MIG-bbbb-2222", 1, 0.9)
    with pytest.raises(SelectionError, match="--tp 1"):
        select_gpus(snap, "MIG-aaaa-1111,MIG-bbbb-2222", 2, 0.1)


def test_open_gpu_source_test_hook(tmp_path: Path) -> None:
    state = write_state(tmp_path / "s.json", [{}, {}])
    snap = open_gpu_source({"DEEPINFER_ENGINE_FAKE_NVML": str(state)}).snapshot()
    assert [g.index for g in snap.gpus] == [0, 1]
