"""Declarative deployments end to end: a real redis-server, a router subprocess, agents
as real `deepinfer-engine agent` subprocesses over the fake NVML (GPUs of different
sizes and capabilities) and the stand-in vLLM. Leases are 4 s so that failures play out
in seconds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from deepinfer_router.shared.deployment import DeploymentSpec
from deepinfer_router.shared.deployment_store import DeploymentStore
from tests.support.deploy_cluster import (
    LEASE_S,
    Cluster,
    alive,
    replica_engines,
    wait_for,
)
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

H100 = {"compute_capability": "9.0", "total_gib": 80}
A100 = {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "total_gib": 80}
T4 = {"name": "Tesla T4", "compute_capability": "7.5", "total_gib": 16}


def hosts_of(d: dict[str, Any]) -> list[str]:
    return sorted(r["host"] for r in d["replicas"] if r["desired"])


class BackgroundCheck:
    """A check that runs every 50 ms until stopped; `stop` asserts it ran enough and
    found nothing wrong."""

    min_runs = 10

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.runs = 0
        self.faults: list[object] = []
        self._task = asyncio.create_task(self._loop())

    async def check(self) -> None:
        raise NotImplementedError

    async def _loop(self) -> None:
        while True:
            await self.check()
            self.runs += 1
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert self.runs > self.min_runs
        assert not self.faults, self.faults[:3]


class DoubleWatch(BackgroundCheck):
    """Samples the registry the whole time: no (deployment, replica) may ever have two
    registered engines."""

    min_runs = 20

    async def check(self) -> None:
        counts = replica_engines(await self.cluster.registered())
        if any(n > 1 for n in counts.values()):
            self.faults.append(counts)


class Traffic(BackgroundCheck):
    """Requests through the router the whole time; none may fail."""

    def __init__(self, cluster: Cluster, model: str) -> None:
        self.model = model
        super().__init__(cluster)

    async def check(self) -> None:
        try:
            await self.cluster.complete(self.model)
        except AssertionError as exc:
            self.faults.append(str(exc)[:200])


async def test_replicas_converge_across_agents_and_serve(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with Cluster(tmp_path, redis_server.url) as c:
        c.agent("a", [H100, H100])
        c.agent("b", [A100])
        c.agent("c", None)  # a CPU-only host: --gpus none --max-engines 4
        dep = await c.deploy(model="fake/model", replicas=3)
        d = await c.wait_running(dep, 3)
        # Least-loaded first: the three hosts share the replicas, no host over capacity.
        placed = hosts_of(d)
        assert len(set(placed)) >= 2, placed
        assert placed.count("b") <= 1
        # Each GPU replica holds its own GPU; every replica is registered and serves.
        gpus = [(r["host"], tuple(r["gpu_uuids"])) for r in d["replicas"] if r["host"] != "c"]
        assert len(gpus) == len(set(gpus))
        counts = replica_engines(await c.registered())
        assert sorted(counts) == [(dep, "0"), (dep, "1"), (dep, "2")]
        assert set(counts.values()) == {1}
        for _ in range(6):
            await c.complete("fake/model")
        status, hosts = await c.api("GET", "/v1/hosts")
        assert status == 200
        by_id = {h["id"]: h for h in hosts["hosts"]}
        assert sorted(by_id) == ["a", "b", "c"]
        assert by_id["b"]["gpus"][0]["compute_capability"] == "8.0"
        assert by_id["b"]["labels"] == {"host": "b", "device": "gpu"}
        assert by_id["c"]["cpu_only"] and by_id["c"]["gpus"] == []
        used = [g["replica"] for h in hosts["hosts"] for g in h["gpus"] if g["replica"]]
        assert len(used) == sum(1 for r in d["replicas"] if r["host"] != "c")
        assert all(h["heartbeat_age_s"] < LEASE_S for h in hosts["hosts"])


async def test_placement_honours_tp_labels_and_capability(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with Cluster(tmp_path, redis_server.url) as c:
        c.agent("h100", [H100])
        c.agent("a100x2", [A100, A100])
        c.agent("t4", [T4], "--labels", "zone=edge")
        tp2 = await c.deploy(model="fake/tp2", tensor_parallel_size=2)
        fp8 = await c.deploy(model="fake/fp8", quantization="fp8_per_channel")
        edge = await c.deploy(model="fake/edge", labels={"zone": "edge"},
                              gpu_memory_utilization=0.5)
        assert hosts_of(await c.wait_running(tp2, 1)) == ["a100x2"]
        d = await c.wait_running(tp2, 1)
        assert len(d["replicas"][0]["gpus"]) == 2
        assert hosts_of(await c.wait_running(fp8, 1)) == ["h100"]  # FP8 needs 8.9
        assert hosts_of(await c.wait_running(edge, 1)) == ["t4"]
        # A second TP-2 replica has nowhere to go: it stays Pending, unclaimed.
        await c.api("PATCH", f"/v1/deployments/{tp2}", {"replicas": 2})
        await asyncio.sleep(3)
        d = await c.deployment(tp2)
        assert [r["state"] for r in d["replicas"]] == ["Running", "Pending"]
        assert d["replicas"][1]["claimed_by"] is None


async def test_sigkill_agent_moves_replicas_without_ever_serving_one_twice(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with Cluster(tmp_path, redis_server.url) as c:
        a = c.agent("a", [H100])
        c.agent("b", [H100])  # one GPU each: one replica on each host
        dep = await c.deploy(model="fake/model", replicas=2)
        await c.wait_running(dep, 2, on=["a", "b"])
        spare = c.agent("spare", [H100, H100])
        await wait_for(lambda: _host_count(c, 3), 10, "the spare agent is live")
        watch, traffic = DoubleWatch(c), Traffic(c, "fake/model")
        await asyncio.sleep(1)
        a.kill()  # b's replica keeps serving; a's moves to the spare once a's lease lapses
        killed_at = time.monotonic()
        await c.wait_running(dep, 2, within_s=LEASE_S + 20, on=["b", "spare"])
        moved_after = time.monotonic() - killed_at
        assert moved_after >= LEASE_S - 1.5  # only after the lease lapsed
        await asyncio.sleep(1)
        await watch.stop()
        await traffic.stop()
        assert len(spare.engine_pids()) == 1


async def test_agent_cut_off_from_redis_stops_its_engines_before_the_lease_ends(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with Cluster(tmp_path, redis_server.url) as c:
        a = c.agent("a", [H100])
        dep = await c.deploy(model="fake/model")
        await c.wait_running(dep, 1)
        (pid,) = a.engine_pids()
        pttl_ms = await c.redis.pttl(f"deepinfer:claim:{dep}:0")
        assert 0 < pttl_ms <= LEASE_S * 1000
        lease_ends = time.monotonic() + pttl_ms / 1000
        redis_server.pause()
        try:
            async def engine_gone() -> bool:
                return not alive(pid)
            await wait_for(engine_gone, LEASE_S + 2, "engine stopped by self-fencing",
                           every_s=0.02)
            stopped = time.monotonic()
        finally:
            redis_server.resume()
        assert stopped < lease_ends, (stopped - lease_ends, a.log()[-2000:])
        assert "stopping all 1 engine(s)" in a.log()
        # Back in touch, it starts the replica again (its claim lapsed: anyone may).
        await c.wait_running(dep, 1, within_s=30)


async def test_restarted_agent_adopts_its_running_engines(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with Cluster(tmp_path, redis_server.url) as c:
        a = c.agent("a", [H100, H100])
        dep = await c.deploy(model="fake/model", replicas=2)
        await c.wait_running(dep, 2)
        pids = a.engine_pids()
        assert len(pids) == 2
        a.kill()  # the engines live on (no parent-death signal for the agent's engines)
        await asyncio.sleep(0.5)
        assert all(alive(p) for p in pids)
        a.start()

        async def adopted() -> bool:
            return a.log().count("adopting engine") == 2
        await wait_for(adopted, 20, "both engines adopted")
        d = await c.wait_running(dep, 2, within_s=20)
        assert hosts_of(d) == ["a", "a"]
        assert a.engine_pids() == pids  # adopted, none started anew
        await asyncio.sleep(LEASE_S + 1)  # the claims are renewed by the new run
        d = await c.deployment(dep)
        assert [r["claimed_by"] for r in d["replicas"]] == ["a", "a"]
        assert all(alive(p) for p in pids)
        counts = replica_engines(await c.registered())
        assert counts == {(dep, "0"): 1, (dep, "1"): 1}
        # A replica deleted while the agent was down is stopped, not adopted.
        a.kill()
        status, _ = await c.api("PATCH", f"/v1/deployments/{dep}", {"replicas": 1})
        assert status == 200
        a.start()
        await wait_for(lambda: _dead_count(pids, 1), 20, "the surplus engine stopped")
        await c.wait_running(dep, 1)


async def _dead_count(pids: list[int], n: int) -> bool:
    return sum(1 for p in pids if not alive(p)) == n


async def _host_count(c: Cluster, n: int = 2) -> bool:
    _, body = await c.api("GET", "/v1/hosts")
    return len(body["hosts"]) == n


async def test_scale_up_down_and_delete_drain_and_deregister(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with Cluster(tmp_path, redis_server.url) as c:
        env = {"FAKE_VLLM_TOKEN_DELAY_S": "0.05"}
        c.agent("a", [H100, H100], env=env)
        c.agent("b", [H100, H100], env=env)
        dep = await c.deploy(model="fake/model", replicas=1)
        await c.wait_running(dep, 1)
        traffic = Traffic(c, "fake/model")  # through scale up and down: nothing fails
        status, body = await c.api("PATCH", f"/v1/deployments/{dep}", {"replicas": 3})
        assert status == 200 and body["generation"] == 2
        d = await c.wait_running(dep, 3)
        assert all(r["generation"] == 2 for r in d["replicas"])  # observed generation
        status, _ = await c.api("PATCH", f"/v1/deployments/{dep}", {"replicas": 1})

        async def one_registered() -> bool:
            return list(replica_engines(await c.registered()).values()) == [1]
        await wait_for(one_registered, 20, "scaled down to one registered engine")
        async def surplus_gone() -> bool:
            d = await c.deployment(dep)
            return [r["index"] for r in d["replicas"]] == [0] and d["replicas_running"] == 1
        await wait_for(surplus_gone, 20, "the surplus replicas stopped and released")
        await traffic.stop()
        # DELETE while a stream is in flight: it finishes, then every engine stops.
        stream = asyncio.create_task(c.complete("fake/model", stream=True, max_tokens=40))
        await asyncio.sleep(0.5)
        status, body = await c.api("DELETE", f"/v1/deployments/{dep}")
        assert status == 202 and body["deleting"]
        text = await stream
        assert text.count("hello") == 40 and text.rstrip().endswith("data: [DONE]")

        async def gone() -> bool:
            status, _ = await c.api("GET", f"/v1/deployments/{dep}")
            return status == 404
        await wait_for(gone, 30, "deployment deleted")
        assert await c.registered() == []
        pids = [p for agent in c.agents.values() for p in agent.engine_pids()]
        await wait_for(lambda: _dead_count(pids, len(pids)), 10, "every engine stopped")
        assert all(not agent.entries() for agent in c.agents.values())
        # The name is free again.
        assert await c.deploy(model="fake/model") == dep


async def test_agents_racing_for_the_last_gpu_never_double_place(
        redis_server: RedisServer, tmp_path: Path) -> None:
    # Claims are one script: many rounds of two clients racing for the same replica, and
    # no claim on a replica its deployment no longer wants.
    store_a = DeploymentStore(_client(redis_server), "race")
    store_b = DeploymentStore(_client(redis_server), "race")
    try:
        dep, _ = await store_a.create(DeploymentSpec(model="race", replicas=300))
        for i in range(300):
            won = await asyncio.gather(store_a.claim(dep, i, "a", 5),
                                       store_b.claim(dep, i, "b", 5))
            assert sorted(won) == [False, True], (i, won)
        assert not await store_a.claim(dep, 300, "a", 5)  # beyond replicas
        await store_a.scale(dep.id, 400)
        old = dep.model_copy(update={"uid": "another-creation"})
        assert not await store_a.claim(old, 350, "a", 5)  # a stale creation
        assert await store_a.claim(dep, 350, "a", 5)
        # Deleting (claims still held): no new claim, even on a free index.
        await store_a.delete(dep.id)
        assert not await store_b.claim(dep, 399, "b", 5)
    finally:
        await store_a.r.aclose()
        await store_b.r.aclose()
    # Two agents on one host (one state dir, one GPU): the host lock lets one engine in.
    async with Cluster(tmp_path, redis_server.url) as c:
        gpus = [H100]
        a = c.agent("a", gpus)
        b = c.agent("b", gpus)
        b.argv[b.argv.index("--state-dir") + 1] = str(a.state_dir)
        b.env["DEEPINFER_ENGINE_FAKE_NVML"] = a.env["DEEPINFER_ENGINE_FAKE_NVML"]
        b.cleanup()
        b.start()
        for round_ in range(3):
            dep = await c.deploy(model=f"fake/race-{round_}", replicas=2)
            await c.wait_running(dep, 1)
            await asyncio.sleep(2)
            d = await c.deployment(dep)
            assert d["replicas_running"] == 1, d
            assert len(a.entries()) == 1
            await c.api("DELETE", f"/v1/deployments/{dep}")

            async def gone(dep: str = dep) -> bool:
                return (await c.api("GET", f"/v1/deployments/{dep}"))[0] == 404
            await wait_for(gone, 20, "deleted")


def _client(server: RedisServer) -> Any:
    from deepinfer_router.shared.redis_store import connect

    return connect(server.url)


async def test_permanent_failure_is_failed_with_its_log_and_moves_on(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with Cluster(tmp_path, redis_server.url) as c:
        opts = ("--allow-extra-arg", "no-such-flag", "--attempts-per-host", "2",
                "--max-failed-hosts", "2")
        c.agent("a", [H100], *opts)
        c.agent("b", [H100], *opts)
        dep = await c.deploy(model="fake/model", extra_args=["--no-such-flag"])

        async def failed_everywhere() -> dict[str, Any] | None:
            d = await c.deployment(dep)
            r = d["replicas"][0]
            return d if r["state"] == "Failed" and len(r["failed_hosts"]) == 2 else None
        d = await wait_for(failed_everywhere, 40, "Failed on both hosts")
        r = d["replicas"][0]
        assert sorted(r["failed_hosts"]) == ["a", "b"]
        assert r["claimed_by"] is None and r["attempts"] == 2
        assert "bad argument" in r["last_error"]
        assert "unrecognized arguments: --no-such-flag" in r["log_tail"]
        await asyncio.sleep(2)  # and it stays Failed
        assert (await c.deployment(dep))["replicas"][0]["state"] == "Failed"


async def test_allow_lists_refuse_with_a_reason(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with Cluster(tmp_path, redis_server.url) as c:
        c.agent("a", [H100], "--max-failed-hosts", "1", "--allow-model-root", str(tmp_path))
        docker = await c.deploy(model="m", backend="docker", docker_image="evil/miner:1",
                                model_path="/models/m")
        local = await c.deploy(model="/etc/secrets/model")
        remote = await c.deploy(model="org/model", extra_args=["--trust-remote-code"])
        for dep, why in ((docker, "image 'evil/miner:1' is not allowed"),
                         (local, "outside the allowed model roots"),
                         (remote, "extra argument --trust-remote-code is not allowed")):
            async def refused(dep: str = dep) -> dict[str, Any] | None:
                r = (await c.deployment(dep))["replicas"][0]
                return r if r["state"] == "Failed" else None
            r = await wait_for(refused, 15, f"{dep} refused")
            assert why in r["last_error"], r
            assert r["last_error"].startswith("refused by a:")
        assert c.agents["a"].engine_pids() == []


async def test_agent_sigterm_drains_and_releases(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with Cluster(tmp_path, redis_server.url) as c:
        a = c.agent("a", [H100])
        dep = await c.deploy(model="fake/model")
        await c.wait_running(dep, 1)
        (pid,) = a.engine_pids()
        assert await a.terminate() == 0
        assert not alive(pid)
        d = await c.deployment(dep)
        assert d["replicas"][0]["state"] == "Pending" and d["replicas"][0]["claimed_by"] is None
        assert await c.registered() == []
        _, hosts = await c.api("GET", "/v1/hosts")
        assert hosts["hosts"] == []
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_restart_after_the_lease_takes_back_and_adopts_or_refuses(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with Cluster(tmp_path, redis_server.url) as c:
        a = c.agent("a", [H100, H100], "--allow-extra-arg", "enable-prefix-caching")
        keep = await c.deploy(model="fake/keep")
        refuse = await c.deploy(model="fake/refuse", extra_args=["--enable-prefix-caching"])
        await c.wait_running(keep, 1)
        await c.wait_running(refuse, 1)
        pids = a.engine_pids()
        assert len(pids) == 2
        a.kill()
        await asyncio.sleep(LEASE_S + 1)  # the claims lapse; no other host to take them
        # Restarted without the allow-list entry: one engine is adopted, the other (now
        # refused) stopped, not left running.
        a.argv = [x for x in a.argv if x not in ("--allow-extra-arg", "enable-prefix-caching")]
        a.start()
        await c.wait_running(keep, 1, on=["a"])

        async def refused() -> dict[str, Any] | None:
            r = (await c.deployment(refuse))["replicas"][0]
            return r if r["state"] == "Failed" else None
        r = await wait_for(refused, 20, "the refused replica is Failed")
        assert "--enable-prefix-caching is not allowed" in r["last_error"]
        await wait_for(lambda: _dead_count(pids, 1), 15, "the refused engine stopped")
        assert a.engine_pids() == pids  # the kept one adopted, nothing started anew
        assert replica_engines(await c.registered()) == {(keep, "0"): 1}
