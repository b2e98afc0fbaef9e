# mypy: disable-error-code="arg-type,call-overload,union-attr"
# (the openai SDK types messages as TypedDicts; plain dicts are what users send)
"""`deepinfer-engine sim`: registration with a router, the CLI, settings precedence."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from deepinfer_engine.sim.main import load
from deepinfer_engine.sim.server import start_sim_server
from deepinfer_engine.sim.settings import SimSettings
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


KEY = "sekret-admin-key"


@pytest.fixture
async def admin_router(router) -> Any:
    """A real router with an admin key; its embedded registry is what the engine calls."""
    return await router(admin_key=KEY, health_interval_s=60, scrape_interval_s=60)


async def listed(router_url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(
        router_url + "/admin/engines", headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        assert resp.status == 200
        return (await resp.json())["engines"]  # type: ignore[no-any-return]


async def test_registers_capacity_and_deregisters(admin_router) -> None:
    settings = SimSettings(kv_blocks=512, block_size=32, max_num_seqs=64,
                           registry=admin_router.url, registry_key=KEY)
    sim = await start_sim_server(settings)
    try:
        (engine,) = await listed(admin_router.url)
        assert engine["url"] == sim.url and engine["id"] == sim.record().id
        assert engine["models"] == ["sim-model"] and engine["source"] == "local"
        assert engine["capacity"] == {"kv_blocks": 512, "block_size": 32,
                                      "max_model_len": 16384, "max_num_seqs": 64}
        assert engine["gpus"] == [] and engine["instance"] == sim.record().instance
    finally:
        await sim.close()
    assert await listed(admin_router.url) == []  # deregistered on close


async def test_refused_registration_fails_the_start(admin_router) -> None:
    with pytest.raises(RuntimeError, match="refused"):
        await start_sim_server(SimSettings(registry=admin_router.url, registry_key="wrong"))
    assert await listed(admin_router.url) == []


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


async def test_cli_serves_openai_and_deregisters_on_sigterm(admin_router) -> None:
    url = admin_router.url
    port = _free_port()
    env = {**os.environ, "DEEPINFER_ENGINE_SPEED": "20"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deepinfer_engine.cli", "sim", "--port", str(port), "--kv-blocks",
        "1024", "--registry", url, "--registry-key", KEY,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async def registered() -> bool:
            assert proc.returncode is None, "sim exited early"
            return bool(await listed(url))

        await wait_until(registered, timeout=20)
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                      api_key="x", max_retries=0) as c:
            r = await c.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage is not None and r.usage.completion_tokens == 3
        (engine,) = await listed(url)
        assert engine["capacity"]["kv_blocks"] == 1024
        assert engine["url"] == f"http://127.0.0.1:{port}"
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 0, output.decode()
        assert await listed(url) == []  # deregistered, not left to expire
        assert b"serving 'sim-model'" in output
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
