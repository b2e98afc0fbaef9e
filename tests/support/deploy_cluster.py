"""A declarative-deployment cluster for tests, all real parts on loopback: a real
redis-server (the caller's), a router subprocess with --redis-url, and agents as
`deepinfer-engine agent` subprocesses over the fake NVML (tests/fakes/fake_nvml.py) and
the stand-in vLLM (tests/fakes/fake_vllm.py). Short leases so failures play out in
seconds; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from deepinfer_engine.launch_state import LaunchEntry, StateDir, group_alive
from deepinfer_router.shared import redis_store
from tests.fakes.fake_nvml import write_state
from tests.support.procs import Procs, console_script, free_port

ROOT = Path(__file__).resolve().parents[2]
FAKE_VLLM = f"{sys.executable} {ROOT / 'tests' / 'fakes' / 'fake_vllm.py'}"
LEASE_S = 4.0
TIMING = ["--lease-s", str(LEASE_S), "--heartbeat-s", "0.3", "--registry-ttl-s", "1.0",
          "--reconcile-interval-s", "1", "--health-interval-s", "0.5",
          "--restart-backoff-s", "0.2", "--stop-timeout-s", "3", "--drain-timeout-s", "10"]


async def wait_for(check: Callable[[], Awaitable[Any]], within_s: float, what: str,
                   every_s: float = 0.1) -> Any:
    deadline = time.monotonic() + within_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every_s)
    raise AssertionError(f"{what}: not within {within_s}s (last: {last!r})")


class Agent:
    def __init__(self, cluster: Cluster, name: str, gpus: list[dict[str, Any]] | None,
                 args: list[str], env: dict[str, str]) -> None:
        self.cluster = cluster
        self.name = name
        self.dir = cluster.tmp / f"agent-{name}"
        self.dir.mkdir(exist_ok=True)
        self.state_dir = self.dir / "state"
        self.pid_dir = self.dir / "pids"
        self.log_path = self.dir / "agent.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "FAKE_VLLM_PID_DIR": str(self.pid_dir),
                    "FAKE_VLLM_STARTUP_S": "0.2", **env}
        first = free_port()
        gpu_args = ["--gpus", "none", "--max-engines", "4"]
        if gpus is not None:
            self.env["DEEPINFER_ENGINE_FAKE_NVML"] = str(write_state(self.dir / "gpus.json",
                                                                     gpus))
            gpu_args = ["--gpus", "auto"]
        self.argv = [console_script("deepinfer-engine"), "agent", "--registry", cluster.redis_url,
                     "--agent-id", name, "--state-dir", str(self.state_dir),
                     "--host", "127.0.0.1", "--advertise-host", "127.0.0.1",
                     "--port-range", f"{first}-{first + 40}", "--engine-cmd", FAKE_VLLM,
                     *gpu_args, *TIMING, *args]
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    async def terminate(self, within_s: float = 30) -> int:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + within_s
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"agent {self.name} did not stop:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.popen.returncode

    def entries(self) -> list[LaunchEntry]:
        return StateDir(self.state_dir).entries()

    def engine_pids(self) -> list[int]:
        """Every stand-in vLLM process this agent ever started."""
        if not self.pid_dir.is_dir():
            return []
        return sorted(int(p.stem) for p in self.pid_dir.glob("*.pid"))

    def cleanup(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)
        for pid in self.engine_pids():  # engines outlive a killed agent by design
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class Cluster:
    def __init__(self, tmp: Path, redis_url: str, router_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.procs = Procs(tmp)
        self.router = self.procs.router("--redis-url", redis_url, "--engine-ttl-s", "1.5",
                                        *router_args)
        self.agents: dict[str, Agent] = {}
        self.redis = redis_store.connect(redis_url)
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Cluster:
        await self.router.wait_healthy()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for agent in self.agents.values():
            agent.cleanup()
        self.procs.stop_all()
        if self.http is not None:
            await self.http.close()
        await self.redis.aclose()

    def agent(self, name: str, gpus: list[dict[str, Any]] | None = None, *args: str,
              env: dict[str, str] | None = None) -> Agent:
        agent = Agent(self, name, gpus, list(args), env or {})
        self.agents[name] = agent
        return agent

    # --- the API ---------------------------------------------------------------------

    async def api(self, method: str, path: str, body: Any = None,
                  headers: dict[str, str] | None = None) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.request(method, self.router.url + path, json=body,
                                     headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def deploy(self, **spec: Any) -> str:
        status, body = await self.api("POST", "/v1/deployments", spec)
        assert status == 201, body
        return str(body["id"])

    async def deployment(self, dep_id: str) -> dict[str, Any]:
        status, body = await self.api("GET", f"/v1/deployments/{dep_id}")
        assert status == 200, body
        return dict(body)

    async def wait_running(self, dep_id: str, n: int, within_s: float = 30,
                           on: list[str] | None = None) -> dict[str, Any]:
        """Until `n` replicas run (on exactly the hosts `on`, when given)."""
        async def ready() -> dict[str, Any] | None:
            d = await self.deployment(dep_id)
            running = sorted(r["host"] for r in d["replicas"]
                             if r["desired"] and r["state"] == "Running")
            if len(running) == n and (on is None or running == sorted(on)):
                return d
            return None
        return dict(await wait_for(ready, within_s, f"{dep_id}: {n} replica(s) running"))

    # --- what is registered ------------------------------------------------------------

    async def registered(self) -> list[dict[str, Any]]:
        records = await redis_store.read_all(self.redis, redis_store.Keys("deepinfer"),
                                             prune=False)
        return [s.record.model_dump() for s in records.values()]

    async def complete(self, model: str, stream: bool = False, max_tokens: int = 3) -> str:
        assert self.http is not None
        async with self.http.post(self.router.url + "/v1/completions", json={
                "model": model, "prompt": "hi", "max_tokens": max_tokens, "stream": stream,
        }) as resp:
            text = await resp.text()
            assert resp.status == 200, text
            return text


def replica_engines(records: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """How many registered engines each (deployment, replica) has."""
    out: dict[tuple[str, str], int] = {}
    for rec in records:
        labels = rec.get("labels") or {}
        if "deployment" in labels:
            key = (labels["deployment"], labels.get("replica", "?"))
            out[key] = out.get(key, 0) + 1
    return out


def alive(pid: int) -> bool:
    return group_alive(pid)


def redis_client(url: str) -> aioredis.Redis:
    return redis_store.connect(url)
