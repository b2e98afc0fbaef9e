"""Host-local state: reservations under a file lock, stale entries cleaned, failure
classification of engine logs."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepinfer_engine.gpus import select_gpus
from deepinfer_engine.launch_state import LaunchEntry, StateDir, pid_alive, process_start_time
from deepinfer_engine.nvml import PynvmlSource
from deepinfer_engine.supervisor import classify_failure
from tests.fakes.fake_nvml import FakeNvml, write_state
from tests.fakes.fake_vllm import OOM_TEXT, REAL_FAILURES, real_failure_text

pytestmark = pytest.mark.timeout(20)


def entry(engine_id: str, pid: int | None = None, **kw: object) -> LaunchEntry:
    pid = os.getpid() if pid is None else pid
    kw.setdefault("pid_start", process_start_time(pid))
    return LaunchEntry(id=engine_id, model="m", url=f"http://h:{engine_id}", port=1,
                       pid=pid, **kw)  # type: ignore[arg-type]


def test_stale_entries_are_removed(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state.write(entry("alive"))
    state.write(entry("dead", pid=dead.pid, pid_start=None))
    (state.engines / "junk.json").write_text("{not json")
    assert [e.id for e in state.entries()] == ["alive"]
    assert not (state.engines / "dead.json").exists()
    # A reused pid (other start time) is not ours either.
    state.write(entry("reused").model_copy(update={"pid_start": 1}))
    assert [e.id for e in state.entries()] == ["alive"]


def test_pid_alive() -> None:
    assert pid_alive(os.getpid(), process_start_time(os.getpid()))
    assert not pid_alive(0)


def _claim(state_dir: str, gpus_json: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    state = StateDir(Path(state_dir))

    def factory(entries: list[LaunchEntry]) -> LaunchEntry:
        reserved = {u for e in entries for u in e.gpus}
        snap = PynvmlSource(FakeNvml(gpus_json)).snapshot()
        time.sleep(0.2)  # widen the race window: without the lock both would pick GPU 0
        sel = select_gpus(snap, "auto", 1, 0.9, reserved)
        return entry(f"e{os.getpid()}", gpus=sel.uuids, gpu_indices=sel.indices)

    out.put(state.claim(factory).gpu_indices)
    time.sleep(1.5)  # keep the reservation alive (pid) while the other claims


def test_two_launches_at_once_never_share_a_gpu(tmp_path: Path) -> None:
    gpus = write_state(tmp_path / "nvml.json", [{}, {}])
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_claim, args=(str(tmp_path / "st"), str(gpus), out))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = sorted([out.get(timeout=10), out.get(timeout=10)])
    for p in procs:
        p.join(timeout=10)
    assert got == [[0], [1]]


@pytest.mark.parametrize("fail", sorted(REAL_FAILURES))
def test_classify_real_vllm_cpu_failures(fail: str) -> None:
    """What vLLM's CPU build really printed (tests/fakes/vllm_cpu_output/)."""
    text, code = real_failure_text(fail, "/models/no-such-model")
    found = classify_failure(text, code)
    assert found is not None, fail
    kind, line = found
    expected = "bad argument" if fail.startswith("bad-") else "model not found"
    assert kind == expected and line
    if fail != "not-cached":  # that message does not name the model
        assert "no-such-model" in line or fail.startswith("bad-")


def test_classify_failure() -> None:
    assert classify_failure(OOM_TEXT)[0] == "out of memory"  # type: ignore[index]
    usage = ("usage: vllm serve [model_tag] [options]\n"
             "vllm serve: error: unrecognized arguments: --bogus\n")
    assert classify_failure(usage, 2)[0] == "bad argument"  # type: ignore[index]
    free = ("ValueError: Free memory on device (6.92/8.0 GiB) on startup is less than desired "
            "GPU memory utilization (0.9, 7.2 GiB). Decrease GPU memory utilization or reduce "
            "GPU memory used by other processes.")
    assert classify_failure(free)[0] == "out of memory"  # type: ignore[index]
    # Crashes worth a restart.
    assert classify_failure("Segmentation fault (core dumped)", -11) is None
    assert classify_failure("EngineDeadError: EngineCore encountered an issue.", 1) is None
