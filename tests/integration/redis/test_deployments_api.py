"""/v1/deployments and /v1/hosts on a router subprocess with a real redis-server (no
agents: what the API itself promises), the CLI front-ends, and the 409 without Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.procs import Procs, console_script
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)

ADMIN = {"Authorization": "Bearer admin-secret"}


async def call(session: aiohttp.ClientSession, method: str, url: str, body: Any = None,
               headers: dict[str, str] | None = None, data: bytes | None = None
               ) -> tuple[int, Any]:
    hdrs = {**ADMIN, **(headers or {})}
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    async with session.request(method, url, json=body, data=data, headers=hdrs) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def router(redis_server: RedisServer, tmp_path: Path) -> Any:
    procs = Procs(tmp_path)
    proc = procs.router("--redis-url", redis_server.url, "--admin-key", "admin-secret",
                        "--api-key", "client-key")
    try:
        await proc.wait_healthy()
        yield proc
    finally:
        procs.stop_all()


@pytest.mark.parametrize(("body", "field"), [
    ({}, "model"),
    ({"model": "m", "replicas": "many"}, "replicas"),
    ({"model": "m", "tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"model": "m", "gpu_memory_utilization": 2}, "gpu_memory_utilization"),
    ({"model": "m", "labels": {"gpu": "h 100"}}, "labels"),
    ({"model": "m", "extra_args": ["--x", 3]}, "extra_args.1"),
    ({"model": "m", "backend": "docker"}, "docker_image"),
    ({"model": "m", "device": "0"}, "device"),
    ({"model": "--trust-remote-code"}, "model"),
    ({"model": "m\u0000x"}, "model"),
    ({"model": "m", "replicas": True}, "replicas"),
    ({"model": "m", "unknown": 1}, "unknown"),
])
async def test_bad_bodies_get_422_naming_the_field(router: Any, body: dict[str, Any],
                                                   field: str) -> None:
    async with aiohttp.ClientSession() as s:
        status, err = await call(s, "POST", router.url + "/v1/deployments", body)
    assert status == 422, err
    assert err["error"]["code"] == "invalid_deployment"
    assert err["error"]["param"] == field, err
    assert field.split(".")[0] in err["error"]["message"]


async def test_create_is_idempotent_and_conflicts_are_409(router: Any) -> None:
    url = router.url + "/v1/deployments"
    spec = {"model": "Qwen/Qwen2.5-7B-Instruct", "replicas": 2, "tensor_parallel_size": 2,
            "labels": {"gpu": "h100"}, "extra_args": ["--enable-prefix-caching"]}
    async with aiohttp.ClientSession() as s:
        status, first = await call(s, "POST", url, spec)
        assert status == 201
        dep_id = first["id"]
        assert first["generation"] == 1 and first["replicas_wanted"] == 2
        assert [r["state"] for r in first["replicas"]] == ["Pending", "Pending"]
        assert first["spec"]["tensor_parallel_size"] == 2
        status, again = await call(s, "POST", url, spec)
        assert status == 200 and again["id"] == dep_id
        status, err = await call(s, "POST", url, {**spec, "max_model_len": 4096})
        assert status == 409 and "max_model_len" in err["error"]["message"]
        # Another served name is another deployment.
        status, other = await call(s, "POST", url, {**spec, "served_model_name": "qwen-b"})
        assert status == 201 and other["id"] != dep_id
        status, listed = await call(s, "GET", url)
        assert status == 200
        assert sorted(d["id"] for d in listed["deployments"]) == sorted([dep_id, other["id"]])
        status, one = await call(s, "GET", f"{url}/{dep_id}")
        assert status == 200 and one["served_model_name"] == "Qwen/Qwen2.5-7B-Instruct"
        # PATCH: replicas only.
        status, scaled = await call(s, "PATCH", f"{url}/{dep_id}", {"replicas": 3})
        assert status == 200 and scaled["generation"] == 2 and scaled["replicas_wanted"] == 3
        status, err = await call(s, "PATCH", f"{url}/{dep_id}", {"replicas": 3, "dtype": "half"})
        assert status == 409 and "dtype" in err["error"]["message"]
        status, err = await call(s, "PATCH", f"{url}/{dep_id}", {"replicas": -1})
        assert status == 422 and err["error"]["param"] == "replicas"
        status, err = await call(s, "PATCH", f"{url}/{dep_id}", {"replicas": 1, "colour": 1})
        assert status == 422 and err["error"]["param"] == "colour"
        status, err = await call(s, "PATCH", f"{url}/d-nope", {"replicas": 1})
        assert status == 404
        # DELETE with no agent holding a replica: gone at once.
        status, gone = await call(s, "DELETE", f"{url}/{dep_id}")
        assert status == 200 and gone["deleted"]
        status, _ = await call(s, "GET", f"{url}/{dep_id}")
        assert status == 404
        status, _ = await call(s, "DELETE", f"{url}/{dep_id}")
        assert status == 404
        status, hosts = await call(s, "GET", router.url + "/v1/hosts")
        assert status == 200 and hosts == {"hosts": []}


async def test_admin_guarded_not_by_client_keys_and_bad_input_is_clean(router: Any) -> None:
    url = router.url + "/v1/deployments"
    async with aiohttp.ClientSession() as s:
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer client-key"}):
            async with s.post(url, json={"model": "m"}, headers=headers) as resp:
                assert resp.status == 401, await resp.text()
            async with s.get(router.url + "/v1/hosts", headers=headers) as resp:
                assert resp.status == 401
        status, err = await call(s, "POST", url, data=b"{not json")
        assert status == 400 and err["error"]["code"] == "invalid_json"
        status, err = await call(s, "POST", url, data=b"[1, 2]")
        assert status == 422
        status, err = await call(s, "POST", url, data=b'{"model": "' + b"m" * 300_000 + b'"}')
        assert status == 413
        # A body that arrives in pieces is read whole.
        async def pieces() -> Any:
            yield b'{"model": "split/model", '
            await asyncio.sleep(0.2)
            yield b'"extra_args": ["' + b"x" * 100_000 + b'"]}'
        status, body = await call(s, "POST", url, data=pieces())  # type: ignore[arg-type]
        assert status == 422 and body["error"]["param"] == "extra_args"  # too long: read
        # Still serving after all that.
        status, _ = await call(s, "GET", url)
        assert status == 200


async def test_cli_front_ends(router: Any) -> None:
    cli = [console_script("deepinfer-engine")]
    common = ["--router", router.url, "--admin-key", "admin-secret"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args, *common], capture_output=True, text=True,
                              timeout=30)

    out = await asyncio.to_thread(run, "deploy", "fake/model", "--replicas", "2", "--tp", "2",
                                  "--label", "gpu=h100", "--quantization", "awq",
                                  "--max-model-len", "8192")
    assert out.returncode == 0, out.stderr
    assert "created: d-" in out.stdout
    dep_id = out.stdout.split("created: ")[1].split()[0]
    listed = await asyncio.to_thread(run, "deployments", "--json")
    (dep,) = json.loads(listed.stdout)
    assert dep["spec"]["labels"] == {"gpu": "h100"} and dep["spec"]["quantization"] == "awq"
    assert dep["spec"]["tensor_parallel_size"] == 2 and dep["spec"]["max_model_len"] == 8192
    table = await asyncio.to_thread(run, "deployments")
    assert dep_id in table.stdout and "Pending" in table.stdout and "0/2" in table.stdout
    scaled = await asyncio.to_thread(run, "scale", dep_id, "1")
    assert scaled.returncode == 0 and "1 replica(s) wanted (generation 2)" in scaled.stdout
    hosts = await asyncio.to_thread(run, "hosts")
    assert hosts.returncode == 0 and "no live agents" in hosts.stdout
    gone = await asyncio.to_thread(run, "undeploy", dep_id, "--wait", "--timeout", "10")
    assert gone.returncode == 0 and "deleted" in gone.stdout
    bad = await asyncio.to_thread(run, "deploy", "m", "--tp", "0")
    assert bad.returncode == 1 and "tensor_parallel_size" in bad.stderr
    wrong = await asyncio.to_thread(subprocess.run, [*cli, "deployments", "--router", router.url],
                                    capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 1 and "401" in wrong.stderr


async def test_without_redis_every_route_answers_409(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    proc = procs.router()
    try:
        await proc.wait_healthy()
        async with aiohttp.ClientSession() as s:
            for method, path, body in (("POST", "/v1/deployments", {"model": "m"}),
                                       ("GET", "/v1/deployments", None),
                                       ("GET", "/v1/deployments/d-x", None),
                                       ("PATCH", "/v1/deployments/d-x", {"replicas": 1}),
                                       ("DELETE", "/v1/deployments/d-x", None),
                                       ("GET", "/v1/hosts", None)):
                async with s.request(method, proc.url + path, json=body) as resp:
                    err = await resp.json()
                    assert resp.status == 409, (method, path, err)
                    assert "shared Redis" in err["error"]["message"]
                    assert err["error"]["code"] == "deployments_need_redis"
    finally:
        procs.stop_all()
