# mypy: disable-error-code="arg-type,call-overload,union-attr"
# (the openai SDK types messages as TypedDicts; plain dicts are what users send)
"""`deepinfer-engine sim`: registration with a router, the CLI, settings precedence."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from engines.sim.main import load
from engines.sim.server import start_sim_server
from engines.sim.settings import SimSettings

pytestmark = pytest.mark.timeout(60)


class StubRegistry:
    """A router's admin API reduced to what an engine calls, recording every call."""

    def __init__(self, key: str | None = None) -> None:
        self.key = key
        self.posts: list[dict[str, Any]] = []
        self.deletes: list[str] = []
        self.app = web.Application()
        self.app.router.add_post("/admin/engines", self._post)
        self.app.router.add_delete("/admin/engines/{id}", self._delete)

    def _authorized(self, request: web.Request) -> bool:
        return self.key is None or request.headers.get("Authorization") == f"Bearer {self.key}"

    async def _post(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "key"}}, status=401)
        self.posts.append(await request.json())
        return web.json_response({"registered": True})

    async def _delete(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "key"}}, status=401)
        self.deletes.append(request.match_info["id"])
        return web.json_response({"removed": True})


@pytest.fixture
async def stub() -> AsyncIterator[tuple[StubRegistry, str]]:
    registry = StubRegistry(key="sekret")
    server = TestServer(registry.app, host="127.0.0.1")
    await server.start_server()
    yield registry, str(server.make_url("")).rstrip("/")
    await server.close()


async def test_registers_capacity_and_deregisters(stub: tuple[StubRegistry, str]) -> None:
    registry, url = stub
    settings = SimSettings(kv_blocks=512, block_size=32, max_num_seqs=64, registry=url,
                           registry_key="sekret")
    sim = await start_sim_server(settings)
    try:
        (body,) = registry.posts
        assert body["url"] == sim.url and body["id"] == sim.record().id
        assert body["models"] == ["sim-model"]
        assert body["capacity"] == {"kv_blocks": 512, "block_size": 32,
                                    "max_model_len": 16384, "max_num_seqs": 64}
        assert body["ttl_s"] > 0 and body["gpus"] == [] and body["instance"]
    finally:
        await sim.close()
    assert registry.deletes == [body["id"]]


async def test_refused_registration_fails_the_start(stub: tuple[StubRegistry, str]) -> None:
    _, url = stub
    with pytest.raises(RuntimeError, match="refused"):
        await start_sim_server(SimSettings(registry=url, registry_key="wrong"))


async def test_registers_into_the_routers_embedded_registry() -> None:
    pytest.importorskip("deepinfer_router.app")
    from deepinfer_router.app import build_app
    from deepinfer_router.settings import RouterSettings

    router = TestServer(build_app(RouterSettings(health_interval_s=60, scrape_interval_s=60)),
                        host="127.0.0.1")
    await router.start_server()
    router_url = str(router.make_url("")).rstrip("/")
    sim = await start_sim_server(SimSettings(kv_blocks=300, registry=router_url))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(router_url + "/admin/engines") as resp:
                listed = (await resp.json())["engines"]
            (engine,) = [e for e in listed if e["id"] == sim.record().id]
            assert engine["capacity"]["kv_blocks"] == 300
            assert engine["models"] == ["sim-model"]
            await sim.close()
            async with s.get(router_url + "/admin/engines") as resp:
                listed = (await resp.json())["engines"]
            assert all(e["id"] != sim.record().id for e in listed)
    finally:
        await sim.close()
        await router.close()


def test_settings_precedence_flag_env_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    toml = tmp_path / "engine.toml"
    toml.write_text('kv_blocks = 111\nblock_size = 32\nmodel = "from-toml"\nspeed = 3.0\n')
    monkeypatch.setenv("DEEPINFER_ENGINE_KV_BLOCKS", "222")
    monkeypatch.setenv("DEEPINFER_ENGINE_MODEL", "from-env")
    s = load(["--config", str(toml), "--model", "from-flag"])
    assert (s.model, s.kv_blocks, s.block_size, s.speed) == ("from-flag", 222, 32, 3.0)
    assert s.host == "127.0.0.1" and s.max_num_seqs == 256
    with pytest.raises(SystemExit):
        load(["--block-size", "0"])
    with pytest.raises(SystemExit):
        load(["--registry", "ftp://nope"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_cli_serves_openai_and_deregisters_on_sigterm(
    stub: tuple[StubRegistry, str],
) -> None:
    registry, url = stub
    port = _free_port()
    env = {**os.environ, "DEEPINFER_ENGINE_SPEED": "20"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engines.cli", "sim", "--port", str(port), "--kv-blocks",
        "1024", "--registry", url, "--registry-key", "sekret",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not registry.posts:
            assert proc.returncode is None, "sim exited early"
            assert time.monotonic() < deadline, "sim did not register"
            await asyncio.sleep(0.05)
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                      api_key="x", max_retries=0) as c:
            r = await c.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage is not None and r.usage.completion_tokens == 3
        assert registry.posts[0]["capacity"]["kv_blocks"] == 1024
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 0, output.decode()
        assert registry.deletes == [registry.posts[0]["id"]]
        assert b"serving 'sim-model'" in output
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
