"""`deepinfer-engine launch` end to end on a machine without GPUs: real subprocesses
(the engine manager and the fake vLLM in tests/fakes/fake_vllm.py), a real router's
embedded registry on loopback, and a check that no process is left behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deepinfer_engine.launch_state import StateDir, pid_alive
from deepinfer_engine.launcher import port_free
from tests.fakes.fake_nvml import write_state
from tests.support.procs import Procs

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
FAKE_VLLM = f"{sys.executable} {ROOT / 'tests' / 'fakes' / 'fake_vllm.py'}"
ENGINE = shutil.which("deepinfer-engine")
ENGINE_CLI = [ENGINE] if ENGINE else [sys.executable, "-m", "deepinfer_engine.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launch:
    """One `deepinfer-engine launch` subprocess with its own state dir and pid dir."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None,
                 model: str = "fake/model", gpus: str = "none", name: str = "a") -> None:
        self.port = free_port()
        self.dir = tmp
        self.state_dir = tmp / "state"
        self.pid_dir = tmp / f"pids-{name}"
        self.out = tmp / f"launch-{name}.out"
        cmd = [*ENGINE_CLI, "launch", model, "--gpus", gpus, "--host", "127.0.0.1",
               "--port", str(self.port), "--engine-cmd", FAKE_VLLM,
               "--state-dir", str(self.state_dir), "--stop-timeout-s", "3",
               "--restart-backoff-s", "0.2", "--health-interval-s", "0.5",
               "--heartbeat-s", "0.5", *args]
        full_env = {**os.environ, "FAKE_VLLM_PID_DIR": str(self.pid_dir),
                    "FAKE_VLLM_STARTUP_S": "0.2", **(env or {})}
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(cmd, env=full_env, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=ROOT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.out.read_text()

    def engine_pids(self) -> list[int]:
        if not self.pid_dir.is_dir():
            return []
        return [int(p.stem) for p in self.pid_dir.glob("*.pid")]

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        # In a thread: the router under test runs on this event loop and must keep serving.
        return await asyncio.to_thread(
            subprocess.run, [*ENGINE_CLI, *args], capture_output=True, text=True,
            timeout=20, cwd=ROOT)

    async def entries(self, via_cli: bool = False) -> list[dict[str, Any]]:
        """What `list --json` shows (read in-process unless asked, to poll cheaply)."""
        if via_cli:
            res = await self.cli("list", "--json", "--state-dir", str(self.state_dir))
            assert res.returncode == 0, res.stderr
            return list(json.loads(res.stdout))
        found = await asyncio.to_thread(StateDir(self.state_dir).entries)
        return [e.model_dump(mode="json") for e in found]

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.engine_pids():  # last resort, so a failed test leaks nothing
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launches(tmp_path: Path) -> Iterator[Callable[..., Launch]]:
    started: list[Launch] = []

    def start(*args: str, **kw: Any) -> Launch:
        launch = Launch(tmp_path, *args, **kw)
        started.append(launch)
        return launch

    yield start
    for launch in started:
        launch.cleanup()


async def until(cond: Callable[[], Awaitable[Any] | Any], within: float, what: str,
                launch: Launch | None = None) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n--- launch output ---\n{launch.output()}" if launch else ""
            raise AssertionError(f"timed out waiting for {what}{detail}")
        await asyncio.sleep(0.1)


async def registered(router_url: str) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{router_url}/admin/engines") as resp:
        assert resp.status == 200
        body = await resp.json()
    return {e["id"]: e for e in body["engines"]}


async def until_registered(router_url: str, launch: Launch, within: float = 15) -> None:
    """Until the router lists an engine (the launch's output on time-out)."""

    async def has_engine() -> bool:
        return bool(await registered(router_url))

    await until(has_engine, within, "registration", launch)


async def exit_code(launch: Launch, within: float) -> int:
    await until(lambda: launch.proc.poll() is not None, within, "the launch to exit", launch)
    return int(launch.proc.returncode)


def assert_no_process_left(launch: Launch) -> None:
    assert launch.proc.poll() is not None, "supervisor still running"
    left = [pid for pid in launch.engine_pids() if pid_alive(pid)]
    assert not left, f"engine processes left behind: {left}"
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", launch.port))


async def test_launch_registers_survives_crash_and_stops(
    launches: Callable[..., Launch], router: Callable[..., Awaitable[Any]]
) -> None:
    r = await router()
    launch = launches("--registry", r.url, "--scheduling-policy", "priority", "--",
                      "--max-num-seqs", "64",
                      env={"FAKE_VLLM_STARTUP_S": "1.5", "FAKE_VLLM_WORKERS": "1"})
    # Slow start: recorded as starting, not registered before it is ready.
    entries = await until(launch.entries, 5, "the state entry", launch)
    engine_id = entries[0]["id"]
    assert entries[0]["state"] == "starting" and entries[0]["gpus"] == []
    assert engine_id not in await registered(r.url)

    async def is_registered() -> dict[str, Any] | None:
        return (await registered(r.url)).get(engine_id)

    rec = await until(is_registered, 15, "registration", launch)
    assert rec["url"] == launch.url and rec["models"] == ["fake/model"]
    assert rec["capacity"] == {"kv_blocks": 1000, "block_size": 16, "max_model_len": 4096,
                               "max_num_seqs": 64}
    assert rec["gpus"] == [] and rec["labels"]["device"] == "cpu"
    assert rec["labels"]["gpus"] == "none" and rec["version"] == "0.0.0-fake"
    # vLLM schedules by priority: routers are told to pass each request's class
    assert rec["labels"]["scheduling-policy"] == "priority"
    # The KV event feed: on the advertised address (never every interface), vLLM told
    # to publish on a private ipc socket that the engine manager relays.
    kv = rec["kv_events"]
    assert kv["endpoint"].startswith("tcp://127.0.0.1:") and kv["topic"] == f"kv@{engine_id}"
    assert kv["replay_endpoint"].startswith("tcp://127.0.0.1:")
    entry_argv = (await launch.entries())[0]["command"]
    config = json.loads(entry_argv[entry_argv.index("--kv-events-config") + 1])
    assert config["endpoint"].startswith("ipc://") and config["replay_endpoint"] == \
        kv["replay_endpoint"] and config["enable_kv_cache_events"] is True
    relay_port = int(kv["endpoint"].rsplit(":", 1)[1])
    assert not port_free("127.0.0.1", relay_port)  # the relay listens there
    assert (await launch.entries(via_cli=True))[0]["state"] == "ready"
    listed = await launch.cli("list", "--registry", r.url)
    assert listed.returncode == 0 and engine_id in listed.stdout

    # Crash: the whole old process group goes, a new instance comes up and re-registers.
    first_pids = launch.engine_pids()
    assert len(first_pids) == 2  # the API server and one worker
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.post(f"{launch.url}/crash"):
                pass

    async def new_instance() -> bool:
        now = await is_registered()
        return bool(now and now["instance"] != rec["instance"])

    await until(new_instance, 15, "re-registration after the crash", launch)
    assert not [p for p in first_pids if pid_alive(p)], "crashed engine's worker left behind"
    entry = (await launch.entries())[0]
    assert entry["restarts"] == 1 and entry["state"] == "ready"

    # Stop: deregistered, everything gone, exit 0.
    res = await launch.cli("stop", engine_id, "--state-dir", str(launch.state_dir))
    assert res.returncode == 0, res.stderr
    assert launch.proc.wait(timeout=10) == 0
    assert engine_id not in await registered(r.url)
    assert await launch.entries() == []
    assert_no_process_left(launch)
    out = launch.output()
    assert "restarting the engine" in out and "deregistered" in out


@pytest.mark.parametrize(("fail", "extra", "kind"), [
    ("oom", [], "out of memory"),
    ("not-found", [], "model not found"),  # vLLM CPU's real output (tests/fakes/...)
    ("not-cached", [], "model not found"),
    ("bad-value", [], "bad argument"),
    ("", ["--", "--no-such-vllm-flag"], "bad argument"),
])
async def test_permanent_failures_are_reported_not_retried(
    launches: Callable[..., Launch], fail: str, extra: list[str], kind: str
) -> None:
    launch = launches(*extra, env={"FAKE_VLLM_FAIL": fail})
    rc = await exit_code(launch, 20)
    assert rc == 1
    out = launch.output()
    assert f"permanent failure ({kind})" in out
    assert "last lines of" in out  # the tail of the engine's log is shown
    log_file = next((launch.state_dir / "logs").glob("*.log"))
    assert log_file.read_text().count("=== deepinfer-engine") == 1  # started once only
    assert_no_process_left(launch)


async def test_gives_up_after_max_restarts(launches: Callable[..., Launch]) -> None:
    launch = launches("--max-restarts", "2", env={"FAKE_VLLM_CRASH_AFTER_S": "0.3"})
    rc = await exit_code(launch, 25)
    assert rc == 1 and "giving up" in launch.output()
    log_file = next((launch.state_dir / "logs").glob("*.log"))
    assert log_file.read_text().count("=== deepinfer-engine") == 3
    assert_no_process_left(launch)


async def test_sigterm_deregisters_first_then_kills_the_group(
    launches: Callable[..., Launch], router: Callable[..., Awaitable[Any]]
) -> None:
    r = await router()
    launch = launches("--registry", r.url, "--stop-timeout-s", "1.5",
                      env={"FAKE_VLLM_WORKERS": "2", "FAKE_VLLM_IGNORE_SIGTERM": "1"})

    await until_registered(r.url, launch)
    pids = launch.engine_pids()
    assert len(pids) == 3
    launch.proc.send_signal(signal.SIGTERM)

    async def gone() -> bool:
        return not await registered(r.url)

    await until(gone, 5, "deregistration", launch)
    # Deregistered while vLLM (which ignores SIGTERM here) still runs: first things first.
    assert all(pid_alive(p) for p in pids)
    rc = await exit_code(launch, 10)
    assert rc == 0
    assert "SIGKILL" in launch.output()
    assert_no_process_left(launch)


async def test_gpu_launch_with_fake_nvml(
    launches: Callable[..., Launch], router: Callable[..., Awaitable[Any]], tmp_path: Path
) -> None:
    r = await router()
    foreign = {"used_gib": 2, "processes": [{"pid": 99999, "name": "jupyter", "used_gib": 2}]}
    nvml = write_state(tmp_path / "nvml.json", [foreign, {}, {}, {}])
    uuids = [g["uuid"] for g in json.loads(nvml.read_text())["gpus"]]
    env = {"DEEPINFER_ENGINE_FAKE_NVML": str(nvml)}
    a = launches("--tp", "2", "--registry", r.url, gpus="auto", name="a",
                 env={**env, "FAKE_VLLM_ENV_FILE": str(tmp_path / "env-a.json")})
    b = launches("--tp", "2", "--registry", r.url, gpus="auto", name="b",
                 env={**env, "FAKE_VLLM_ENV_FILE": str(tmp_path / "env-b.json")})

    async def both() -> bool:
        return len(await registered(r.url)) == 2

    await until(both, 15, "two registrations", a)
    seen = {}
    for name in ("a", "b"):
        started = json.loads((tmp_path / f"env-{name}.json").read_text())
        assert started["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert "VLLM_TARGET_DEVICE" not in started["env"]
        argv = started["argv"]
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
        assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.9"
        seen[name] = started["env"]["CUDA_VISIBLE_DEVICES"].split(",")
    # Disjoint, and the GPU with a foreign process goes last (to whoever came second).
    assert sorted(seen["a"] + seen["b"]) == sorted(uuids)
    records = await registered(r.url)
    assert sorted(sorted(rec["gpus"]) for rec in records.values()) == sorted(
        sorted(v) for v in seen.values())
    assert {rec["labels"]["device"] for rec in records.values()} == {"gpu"}
    # No GPU left: a third launch is refused at once with the reason.
    c = launches("--tp", "1", gpus="auto", name="c", env=env)
    assert await exit_code(c, 10) == 2
    assert "reserved by another engine" in c.output()
    # An explicit GPU held by another engine is refused too.
    d = launches("--tp", "1", gpus="1", name="d", env=env)
    assert await exit_code(d, 10) == 2
    for launch in (a, b):
        res = await launch.cli("stop", str(launch.port), "--state-dir", str(launch.state_dir))
        assert res.returncode == 0, res.stderr
        assert_no_process_left(launch)
    assert await registered(r.url) == {}


async def test_refusals_before_start(launches: Callable[..., Launch], tmp_path: Path) -> None:
    # No driver: one line, exit 2, pointing at --gpus none.
    nvml = write_state(tmp_path / "nvml.json", [], init_error="LIBRARY_NOT_FOUND")
    launch = launches(gpus="auto", name="nodrv", env={"DEEPINFER_ENGINE_FAKE_NVML": str(nvml)})
    assert await exit_code(launch, 10) == 2
    assert "--gpus none" in launch.output()
    # Port already taken.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        busy = launches("--port", str(port), name="busy")
        assert await exit_code(busy, 10) == 2
        assert "already in use" in busy.output()
    assert not busy.engine_pids()  # nothing was started


async def test_killed_supervisor_leaves_an_orphan_that_stop_cleans(
    launches: Callable[..., Launch],
) -> None:
    launch = launches(env={"FAKE_VLLM_WORKERS": "1"})

    async def ready() -> bool:
        entries = await launch.entries()
        return bool(entries and entries[0]["state"] == "ready")

    await until(ready, 15, "readiness", launch)
    pids = launch.engine_pids()
    launch.proc.kill()  # no chance to clean up: PDEATHSIG stops vLLM's main process only
    launch.proc.wait()
    entries = await until(launch.entries, 5, "the entry", launch)
    # Its worker still runs in the engine's process group: the entry (and its GPUs) stays.
    assert entries[0]["state"] == "orphaned"
    res = await launch.cli("stop", entries[0]["id"], "--state-dir", str(launch.state_dir))
    assert res.returncode == 0 and "orphaned" in res.stdout, res.stderr
    await until(lambda: not [p for p in pids if pid_alive(p)], 5, "the group to die", launch)
    assert await launch.entries() == []


async def test_unhealthy_engine_is_restarted(launches: Callable[..., Launch]) -> None:
    launch = launches("--health-failures", "2")

    async def state(want: str, restarts: int) -> bool:
        entries = await launch.entries()
        return bool(entries and entries[0]["state"] == want
                    and entries[0]["restarts"] == restarts)

    await until(lambda: state("ready", 0), 15, "readiness", launch)
    first = launch.engine_pids()
    async with aiohttp.ClientSession() as s, s.post(f"{launch.url}/hang") as resp:
        assert resp.status == 200
    await until(lambda: state("ready", 1), 15, "the restart", launch)
    assert "health checks in a row" in launch.output()
    assert not [p for p in first if pid_alive(p)]


# --- supervision edge cases --------------------------------------------------------------


def engine_starts(launch: Launch) -> int:
    """How many times the engine was started (one header line per start in its log)."""
    logs = list((launch.state_dir / "logs").glob("*.log"))
    return sum(p.read_text().count("=== deepinfer-engine") for p in logs)


async def entry_state(launch: Launch) -> str | None:
    entries = await launch.entries()
    return str(entries[0]["state"]) if entries else None


async def test_readiness_timeout_restarts_then_gives_up(launches: Callable[..., Launch]) -> None:
    # Never ready (its "model" loads for a minute). As with the defaults (--ready-timeout-s
    # 1800 > --restart-reset-s 600), each start lasts longer than the reset window: time
    # spent waiting for readiness is no healthy run and must not reset the count.
    launch = launches("--ready-timeout-s", "1", "--max-restarts", "1",
                      "--restart-reset-s", "0.3",
                      env={"FAKE_VLLM_STARTUP_S": "60", "FAKE_VLLM_WORKERS": "1"})
    await until(lambda: len(launch.engine_pids()) == 2, 10, "the first start", launch)
    first = launch.engine_pids()
    await until(lambda: engine_starts(launch) == 2, 15, "the restart", launch)
    assert not [p for p in first if pid_alive(p)], "timed-out engine left behind"
    rc = await exit_code(launch, 15)
    out = launch.output()
    assert rc == 1, out
    assert out.count("engine not ready after 1s") == 2
    assert "restarting the engine" in out and "giving up" in out
    assert engine_starts(launch) == 2
    assert await launch.entries() == []
    assert_no_process_left(launch)


async def test_restart_count_resets_after_a_healthy_run(
    launches: Callable[..., Launch],
) -> None:
    # Crashes 1.5 s after serving each time: each run is healthy for longer than the
    # reset window, so --max-restarts 1 is never reached (with the default window it is
    # after the second crash: test_gives_up_after_max_restarts).
    launch = launches("--max-restarts", "1", "--restart-reset-s", "0.3",
                      env={"FAKE_VLLM_CRASH_AFTER_S": "1.5"})
    await until(lambda: engine_starts(launch) >= 3 or launch.proc.poll() is not None, 20,
                "a second restart", launch)
    assert launch.proc.poll() is None, launch.output()  # it did not give up
    out = launch.output()
    assert "giving up" not in out
    assert out.count("(restart 1 of at most 1)") >= 2  # the count started over each time
    launch.proc.send_signal(signal.SIGTERM)
    assert await exit_code(launch, 10) == 0
    assert_no_process_left(launch)


async def test_sigterm_while_starting_stops_without_registering(
    launches: Callable[..., Launch], router: Callable[..., Awaitable[Any]]
) -> None:
    r = await router()
    launch = launches("--registry", r.url,
                      env={"FAKE_VLLM_STARTUP_S": "60", "FAKE_VLLM_WORKERS": "1"})
    await until(lambda: len(launch.engine_pids()) == 2, 10, "the engine's processes", launch)
    assert await entry_state(launch) == "starting"
    launch.proc.send_signal(signal.SIGTERM)
    assert await exit_code(launch, 10) == 0
    assert_no_process_left(launch)
    assert await launch.entries() == []
    assert await registered(r.url) == {}
    out = launch.output()
    assert "SIGTERM received" in out and "engine stopped" in out
    assert " registered " not in out and "deregistered" not in out
    assert engine_starts(launch) == 1


async def test_sigterm_during_restart_backoff(
    launches: Callable[..., Launch], router: Callable[..., Awaitable[Any]]
) -> None:
    r = await router()
    launch = launches("--registry", r.url, "--restart-backoff-s", "60",
                      env={"FAKE_VLLM_CRASH_AFTER_S": "1", "FAKE_VLLM_WORKERS": "1"})

    await until_registered(r.url, launch)
    pids = launch.engine_pids()
    assert len(pids) == 2

    async def backing_off() -> bool:
        return await entry_state(launch) == "restarting"

    await until(backing_off, 10, "the restart back-off", launch)
    # The crashed engine is deregistered and its whole group gone while we wait.
    assert await registered(r.url) == {}
    assert not [p for p in pids if pid_alive(p)]
    launch.proc.send_signal(signal.SIGTERM)
    assert await exit_code(launch, 10) == 0  # not after the 60 s back-off
    assert_no_process_left(launch)
    assert await launch.entries() == []
    assert await registered(r.url) == {}
    assert engine_starts(launch) == 1  # not restarted on the way out


async def test_registration_retried_until_the_router_comes_up(
    launches: Callable[..., Launch], procs: Procs
) -> None:
    port = free_port()  # nothing listens here yet
    launch = launches("--registry", f"http://127.0.0.1:{port}")

    async def ready_and_failing() -> bool:
        return await entry_state(launch) == "ready" and "registration failed" in launch.output()

    await until(ready_and_failing, 15, "a failed registration", launch)
    # The engine keeps serving, unregistered, while the registry is away.
    async with aiohttp.ClientSession() as s, s.get(f"{launch.url}/health") as resp:
        assert resp.status == 200
    r = procs.router(port=port)
    await r.wait_healthy()

    async def is_registered() -> bool:
        return any(e["url"] == launch.url for e in (await registered(r.url)).values())

    await until(is_registered, 20, "registration once the router is up", launch)
    assert launch.proc.poll() is None and engine_starts(launch) == 1
    launch.proc.send_signal(signal.SIGTERM)
    assert await exit_code(launch, 10) == 0
    assert await registered(r.url) == {}
    assert_no_process_left(launch)


@pytest.mark.parametrize("kind", ["missing", "not-executable"])
async def test_engine_command_not_runnable(
    launches: Callable[..., Launch], tmp_path: Path, kind: str
) -> None:
    cmd = tmp_path / "no-such-vllm"
    if kind == "not-executable":
        cmd.write_text("#!/bin/sh\nexit 0\n")
        cmd.chmod(0o644)
    launch = launches("--engine-cmd", f"{cmd} serve")
    rc = await exit_code(launch, 10)
    out = launch.output()
    assert rc == 1, out
    what = "not found" if kind == "missing" else "not executable"
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"engine command {what}: {cmd}" in errors[0], out
    assert "Traceback" not in out and "restarting" not in out
    assert engine_starts(launch) == 1
    assert await launch.entries() == []
    assert_no_process_left(launch)


async def test_kv_events_off_publishes_no_feed(
    launches: Callable[..., Launch], router: Callable[..., Awaitable[Any]]
) -> None:
    r = await router()
    launch = launches("--registry", r.url, "--kv-events", "off")
    entries = await until(launch.entries, 5, "the state entry", launch)
    engine_id = entries[0]["id"]

    async def rec() -> dict[str, Any] | None:
        return (await registered(r.url)).get(engine_id)

    record = await until(rec, 15, "registration", launch)
    assert record["kv_events"] is None
    assert "--kv-events-config" not in (await launch.entries())[0]["command"]
