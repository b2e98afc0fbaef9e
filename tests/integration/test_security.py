"""Security: API keys on every proxied route (constant-time, never logged), the engine's
Authorization header, admin access (key, or loopback only), engine URL checks and the
body size limit."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from deepinfer_router.api.admin_access import check_admin, is_loopback_peer
from deepinfer_router.errors import RouterError
from deepinfer_router.state import STATE
from tests.support.echo_engine import STATE as ENGINE
from tests.support.procs import Procs
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

KEYS = ["key-one-4f1c", "key-two-99ab"]


async def ready(r) -> None:
    fleet = r.app[STATE].fleet
    await wait_until(lambda: bool(fleet.models(time.monotonic())))


async def call_route(s: aiohttp.ClientSession, base: str, route: str,
                     headers: dict[str, str]) -> int:
    if route == "GET /v1/models":
        async with s.get(base + "/v1/models", headers=headers) as resp:
            return resp.status
    if route.endswith("audio/transcriptions"):
        form = aiohttp.FormData()
        form.add_field("model", "m1")
        form.add_field("file", b"RIFF", filename="a.wav", content_type="audio/wav")
        async with s.post(base + "/v1/audio/transcriptions", data=form, headers=headers) as resp:
            return resp.status
    body = {"model": "m1", "prompt": "x", "input": "x", "max_tokens": 2}
    async with s.post(base + route.split()[1], json=body, headers=headers) as resp:
        if resp.status == 401:
            err = (await resp.json())["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"
        return resp.status


ROUTES = ["POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings",
          "POST /tokenize", "POST /v1/audio/transcriptions", "POST /v1/responses",
          "GET /v1/models"]


async def test_api_keys_checked_on_every_proxied_route(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url], api_key=KEYS)
    await ready(r)
    async with aiohttp.ClientSession() as s:
        for route in ROUTES:
            assert await call_route(s, r.url, route, {}) == 401, route
            for bad in ("Bearer wrong", f"Bearer {KEYS[0]}x", f"Bearer {KEYS[0][:-1]}",
                        KEYS[0], f"Basic {KEYS[0]}", "Bearer "):
                assert await call_route(s, r.url, route, {"Authorization": bad}) == 401, bad
            for good in (f"Bearer {KEYS[0]}", f"bearer {KEYS[1]}"):
                status = await call_route(s, r.url, route, {"Authorization": good})
                # /v1/responses is not served by the echo engine: its 404 passes through
                assert status == (404 if route.endswith("responses") else 200), (route, status)
    # The client's key is the router's: it never reaches the engine.
    engine = a.app[ENGINE]
    assert engine.headers and all("Authorization" not in h for h in engine.headers)


async def test_non_utf8_authorization_is_401_not_500(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url], api_key=KEYS, admin_key="admin-k")
    await ready(r)
    for path, method in (("/v1/completions", b"POST"), ("/admin/engines", b"GET")):
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        body = b'{"model": "m1", "prompt": "x"}' if method == b"POST" else b""
        writer.write(method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer \xff\xfe\xc3\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                     b"Connection: close\r\n\r\n" + body)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401"), answer[:100]


async def test_engine_authorization_header(echo_engines, router):
    a = await echo_engines("a")
    body = {"model": "m1", "prompt": "x"}
    async with aiohttp.ClientSession() as s:
        # Router keys + engine key: the client's key is replaced by the engine key.
        r = await router(engine=[a.url], api_key=KEYS, engine_api_key="engine-secret")
        await ready(r)
        async with s.post(r.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEYS[0]}"}) as resp:
            assert resp.status == 200
        assert a.app[ENGINE].headers[-1]["Authorization"] == "Bearer engine-secret"
        # No router keys, no engine key: the client's header is the engine's business.
        r2 = await router(engine=[a.url])
        await ready(r2)
        async with s.post(r2.url + "/v1/completions", json=body,
                          headers={"Authorization": "Bearer for-the-engine"}) as resp:
            assert resp.status == 200
        assert a.app[ENGINE].headers[-1]["Authorization"] == "Bearer for-the-engine"
        # An engine key alone still replaces whatever the client sent.
        r3 = await router(engine=[a.url], engine_api_key="engine-secret")
        await ready(r3)
        async with s.post(r3.url + "/v1/completions", json=body,
                          headers={"Authorization": "Bearer client"}) as resp:
            assert resp.status == 200
        assert a.app[ENGINE].headers[-1]["Authorization"] == "Bearer engine-secret"


async def test_admin_key_routes(echo_engines, router):
    r = await router(admin_key="admin-secret")
    routes = [("GET", "/admin/engines"), ("POST", "/admin/engines"),
              ("DELETE", "/admin/engines/e-x"), ("POST", "/admin/engines/e-x/drain")]
    async with aiohttp.ClientSession() as s:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer nope"},
                            {"Authorization": "admin-secret"}):
                async with s.request(method, r.url + path, headers=headers, json={}) as resp:
                    assert resp.status == 401, (method, path, headers)
                    assert (await resp.json())["error"]["code"] == "invalid_admin_key"
            async with s.request(method, r.url + path, json={},
                                 headers={"Authorization": "Bearer admin-secret"}) as resp:
                assert resp.status in (200, 400, 404), (method, path)  # past the check


def _request_from(peer: str | None):
    transport = mock.Mock()
    transport.get_extra_info.side_effect = (
        lambda name, default=None: (peer, 1234) if name == "peername" and peer else default
    )
    return make_mocked_request("GET", "/admin/engines", transport=transport)


@pytest.mark.parametrize(("peer", "loopback"), [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("192.168.1.2", False), ("::ffff:10.0.0.1", False),
    ("2001:db8::1", False), (None, False),
])
def test_admin_without_key_answers_loopback_only(peer, loopback):
    request = _request_from(peer)
    assert is_loopback_peer(request) is loopback
    if loopback:
        check_admin(None, request)
    else:
        with pytest.raises(RouterError) as info:
            check_admin(None, request)
        assert info.value.status == 403


@pytest.mark.parametrize("url", [
    "ftp://10.0.0.1", "file:///etc/passwd", "javascript:alert(1)", "http://", "http://:80",
    "http://127.0.0.1:99999", "http://169.254.169.254", "http://169.254.169.254/latest/",
    "http://[fe80::1]:8000", "http://[::ffff:169.254.169.254]", "http://metadata.google.internal",
    "http://METADATA.google.internal.", "http://metadata", "http://0.0.0.0:8000", "http://[::]",
    "http://[fd00:ec2::254]", "http://100.100.100.200", "http://224.0.0.1",
])
async def test_engine_registration_refuses_bad_urls(router, url):
    r = await router()
    async with aiohttp.ClientSession() as s, s.post(
        r.url + "/admin/engines", json={"url": url, "models": ["m1"]}
    ) as resp:
        assert resp.status == 400, url
        assert (await resp.json())["error"]["code"] in (
            "invalid_engine_url", "engine_url_refused", "invalid_engine_record")
    assert not r.app[STATE].fleet.engines


async def test_engine_registration_accepts_ordinary_and_allowed_private(router):
    r = await router()
    r2 = await router(allow_private_engine_urls=True)
    async with aiohttp.ClientSession() as s:
        for target, url in ((r, "http://127.0.0.1:8000"), (r, "https://localhost:8443/v1"),
                            (r, "http://10.1.2.3:8000"), (r2, "http://169.254.1.2:8000")):
            async with s.post(
                target.url + "/admin/engines", json={"url": url, "models": ["m1"]}
            ) as resp:
                assert resp.status == 200, (url, await resp.text())


async def test_body_size_limit_also_for_chunked_bodies(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url], max_body_mb=0.05)
    await ready(r)

    async def chunks():
        yield b'{"model": "m1", "prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    async with aiohttp.ClientSession() as s:
        async with s.post(r.url + "/v1/completions", data=chunks(),
                          headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "body_too_large"
        async with s.post(r.url + "/v1/completions",
                          json={"model": "m1", "prompt": "x" * 40_000}) as resp:
            assert resp.status == 200  # under the limit: passes
    assert not a.app[ENGINE].raw[:-1]  # the big one never reached the engine


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.stop_all()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_keys_never_logged_even_at_debug(procs, log_format):
    api_key, admin_key, engine_key = "SECRET-API-7c1d", "SECRET-ADMIN-5e2f", "SECRET-ENGINE-9a3b"
    wrong = "SECRET-WRONG-1b4e"
    sim = procs.sim("--kv-blocks", "1024")
    await sim.wait_healthy()
    router = procs.router("--engine", sim.url, "--api-key", api_key, "--api-key", "other-key",
                          "--admin-key", admin_key, "--engine-api-key", engine_key,
                          "--log-level", "debug", "--log-format", log_format,
                          "--health-interval-s", "0.2")
    await router.wait_healthy()
    auth = {"Authorization": f"Bearer {api_key}"}
    chat = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3}
    async with aiohttp.ClientSession() as s:
        await wait_until(lambda: _ready(s, router.url), timeout=10)
        for stream in (False, True):
            async with s.post(router.url + "/v1/chat/completions", headers=auth,
                              json={**chat, "stream": stream}) as resp:
                assert resp.status == 200
                await resp.read()
        for headers in ({"Authorization": f"Bearer {wrong}"}, {}):
            async with s.post(router.url + "/v1/chat/completions", headers=headers,
                              json=chat) as resp:
                assert resp.status == 401
        async with s.get(router.url + "/v1/models", headers=auth) as resp:
            assert resp.status == 200
        async with s.post(router.url + "/v1/chat/completions", headers=auth,
                          json={**chat, "model": "nope"}) as resp:
            assert resp.status == 404
        async with s.get(router.url + "/admin/engines",
                         headers={"Authorization": f"Bearer {admin_key}"}) as resp:
            assert resp.status == 200
        async with s.get(router.url + "/admin/engines",
                         headers={"Authorization": f"Bearer {wrong}"}) as resp:
            assert resp.status == 401
    router.signal(signal.SIGTERM)
    assert await router.wait_exit(15) == 0
    log = router.log_text()
    assert "/v1/chat/completions" in log and "/admin/engines" in log  # requests were logged
    for secret in (api_key, admin_key, engine_key, wrong):
        assert secret not in log, f"{secret} leaked into the log"
    assert "Traceback" not in log


async def _ready(s: aiohttp.ClientSession, url: str) -> bool:
    async with s.get(url + "/ready") as resp:
        return resp.status == 200
