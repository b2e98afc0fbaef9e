"""Regression tests for the security review's findings: empty keys, cross-site admin
writes, redirects and re-pointed names on engine traffic, predictable request ids and
records that try to take over another source's engine. (Hints naming unknown engines:
tests/integration/redis/test_redis_hints.py; Redis records: .../redis/test_redis_records.py.)
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import make_mocked_request

from deepinfer_router.engine_address import AddressRefusedError, GuardedResolver
from deepinfer_router.errors import RouterError
from deepinfer_router.fairness.tenants import TenantKey
from deepinfer_router.proxy import check_api_key
from deepinfer_router.proxy.request_ids import RequestIds
from deepinfer_router.settings import RouterSettings
from deepinfer_router.state import STATE
from deepinfer_router.upstream import UpstreamConnectError, UpstreamPool
from tests.support.echo_engine import STATE as ENGINE
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


# --- 1. empty API keys ---------------------------------------------------------------------
@pytest.mark.parametrize(("args", "env", "option"), [
    (["--api-key", "k1", "--api-key", ""], {}, "--api-key"),
    (["--api-key", " "], {}, "--api-key"),
    ([], {"DEEPINFER_API_KEY": ""}, "--api-key"),
    ([], {"DEEPINFER_API_KEY": "k1,,k2"}, "--api-key"),
    (["--admin-key", ""], {}, "--admin-key"),
    (["--engine-api-key", ""], {}, "--engine-api-key"),
])
def test_router_refuses_to_start_with_an_empty_key(args, env, option):
    import os

    proc = subprocess.run(
        [sys.executable, "-m", "deepinfer_router.cli", "--sim-engines", "1", "--port", "0",
         *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "empty key" in lines[0], lines
    assert "Traceback" not in proc.stderr


def test_toml_list_with_an_empty_key_is_refused(tmp_path):
    conf = tmp_path / "router.toml"
    conf.write_text('api_key = ["k1", ""]\n')
    proc = subprocess.run(
        [sys.executable, "-m", "deepinfer_router.cli", "--config", str(conf)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2 and "--api-key" in proc.stderr and "empty key" in proc.stderr


@pytest.mark.parametrize("authorization", [None, "", "Bearer ", "Bearer", "bearer  "])
def test_an_empty_token_never_matches(authorization):
    # Even with an empty key that got past the settings (built without validation).
    keys = [TenantKey("default", "k1"), TenantKey("default", "")]
    headers = {} if authorization is None else {"Authorization": authorization}
    request = make_mocked_request("POST", "/v1/completions", headers=headers)
    with pytest.raises(RouterError) as info:
        check_api_key(keys, request.headers.get("Authorization", ""))
    assert info.value.status == 401


# --- 2. cross-site admin writes ----------------------------------------------------------
RECORD = {"url": "http://10.1.2.3:8000", "models": ["m1"]}


async def admin_call(r, method: str, path: str, *, headers: dict[str, str] | None = None,
                     json: Any = None, data: Any = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.request(
        method, r.url + path, headers=headers or {}, json=json, data=data
    ) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_admin_writes_need_json_and_no_cross_site_browser(router):
    r = await router()
    fleet = r.app[STATE].fleet
    port = r.url.rsplit(":", 1)[1]
    import orjson

    body = orjson.dumps(RECORD)
    # The reproduced attack: a page's "simple" POST (text/plain, cross-site Origin).
    for headers in (
        {"Content-Type": "text/plain", "Origin": "https://evil.example"},
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=x"},
    ):
        status, payload = await admin_call(r, "POST", "/admin/engines", headers=headers,
                                           data=body)
        assert status in (403, 415), (headers, status)
        assert payload["error"]["code"] in ("cross_site_request", "unsupported_media_type")
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://127.0.0.1:{int(port) + 1}"},  # another port: another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ):
        status, payload = await admin_call(r, "POST", "/admin/engines", headers=headers,
                                           json=RECORD)
        assert (status, payload["error"]["code"]) == (403, "cross_site_request"), headers
    assert not fleet.engines
    # An empty HTML form POST has no body fields but a form Content-Type.
    status, payload = await admin_call(
        r, "POST", "/admin/engines/e-x/drain",
        headers={"Content-Type": "application/x-www-form-urlencoded"}, data=b"",
    )
    assert (status, payload["error"]["code"]) == (415, "unsupported_media_type")
    status, payload = await admin_call(r, "POST", "/admin/engines/e-x/drain",
                                       headers={"Origin": "https://evil.example"})
    assert (status, payload["error"]["code"]) == (403, "cross_site_request")
    # What tools send keeps working: JSON without Origin, the router's own origin, a
    # body-less POST (curl -X POST) for drain.
    status, payload = await admin_call(
        r, "POST", "/admin/engines", json=RECORD,
        headers={"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
    )
    assert status == 200, payload
    status, payload = await admin_call(r, "POST", f"/admin/engines/{payload['id']}/drain")
    assert (status, payload["draining"]) == (200, True)


async def test_dns_rebinding_host_is_refused_without_admin_key(router):
    r = await router()
    port = r.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                 "10.0.0.1", "localhost.evil.example"):
        for method, path, json in (("GET", "/admin/engines", None),
                                   ("POST", "/admin/engines", RECORD),
                                   ("DELETE", "/admin/engines/e-x", None)):
            status, payload = await admin_call(r, method, path, headers={"Host": host},
                                               json=json)
            assert (status, payload["error"]["code"]) == (403, "admin_loopback_only"), host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}",
                 f"router.localhost:{port}", "localhost", f"0.0.0.0:{port}"):
        status, _ = await admin_call(r, "GET", "/admin/engines", headers={"Host": host})
        assert status == 200, host


async def test_admin_key_mode_still_refuses_cross_site_and_text_plain(router):
    r = await router(admin_key="admin-k")
    auth = {"Authorization": "Bearer admin-k"}
    status, payload = await admin_call(
        r, "POST", "/admin/engines", json=RECORD,
        headers={**auth, "Origin": "https://evil.example"},
    )
    assert (status, payload["error"]["code"]) == (403, "cross_site_request")
    status, payload = await admin_call(r, "POST", "/admin/engines", data=b"{}",
                                       headers={**auth, "Content-Type": "text/plain"})
    assert (status, payload["error"]["code"]) == (415, "unsupported_media_type")
    # With a key, trust does not come from loopback: any Host is fine.
    status, _ = await admin_call(r, "GET", "/admin/engines",
                                 headers={**auth, "Host": "router.internal:8080"})
    assert status == 200


async def test_admin_registration_cannot_take_a_static_engines_id(echo_engines, router):
    a = await echo_engines("a")
    b = await echo_engines("b")
    r = await router(engine=[a.url])
    fleet = r.app[STATE].fleet
    await wait_until(lambda: bool(fleet.models(time.monotonic())))
    (static_id,) = fleet.engines
    status, payload = await admin_call(r, "POST", "/admin/engines",
                                       json={"id": static_id, "url": b.url, "models": ["m1"]})
    assert (status, payload["error"]["code"]) == (409, "engine_id_taken")
    assert fleet.engines[static_id].record.url == a.url
    # The same engine registered by its manager while also given as --engine: accepted,
    # the operator's entry stands.
    status, payload = await admin_call(r, "POST", "/admin/engines",
                                       json={"url": a.url, "models": ["m1"]})
    assert (status, payload["registered"], payload["source"]) == (200, False, "static")
    assert fleet.engines[static_id].source == "static"


# --- 3. redirects and re-pointed names on engine traffic -------------------------------------
async def test_engine_traffic_never_follows_redirects(serve_app, router):
    hits: list[str] = []

    async def metadata(request: web.Request) -> web.Response:
        hits.append(request.path)  # stands in for 169.254.169.254 (unreachable here)
        return web.Response(text="secret-credentials")

    meta_app = web.Application()
    meta_app.router.add_get("/{tail:.*}", metadata)
    meta = await serve_app(meta_app)
    target = meta.url + "/latest/meta-data/iam/security-credentials/"

    polled: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        polled.append(request.path)
        raise web.HTTPFound(target)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m1"}]})

    engine_app = web.Application()
    engine_app.router.add_get("/health", redirect)
    engine_app.router.add_get("/metrics", redirect)
    engine_app.router.add_get("/v1/models", models)
    engine = await serve_app(engine_app)
    r = await router(engine=[engine.url], health_interval_s=0.1, scrape_interval_s=0.1)
    fleet = r.app[STATE].fleet
    # Several rounds of health checks and scrapes, each answered with a redirect.
    await wait_until(lambda: polled.count("/health") >= 5 and polled.count("/metrics") >= 5,
                     timeout=10)
    assert hits == []
    (state,) = fleet.engines.values()
    assert not state.healthy and state.load.at == 0.0  # a 302 is neither healthy nor load

    # /v1/models redirected: no models read from the redirect's target either.
    engine_app2 = web.Application()
    engine_app2.router.add_get("/v1/models", redirect)
    engine2 = await serve_app(engine_app2)
    r2 = await router(engine=[engine2.url])
    await wait_until(lambda: polled.count("/v1/models") >= 2, timeout=10)  # tried, retried
    assert hits == [] and not r2.app[STATE].fleet.models(time.monotonic())


class ChangingDns(AbstractResolver):
    """A name whose DNS answer changes after registration (what a resolver does when
    its owner re-points the record); only the answer is scripted."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host not in self.answers:
            raise OSError(f"no such name {host}")
        return [ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET,
                              proto=0, flags=0) for a in self.answers[host]]

    async def close(self) -> None:
        return None


async def test_guarded_resolver_drops_metadata_answers():
    dns = ChangingDns({"engine.internal": ["127.0.0.1"]})
    guarded = GuardedResolver(dns)
    assert [r["host"] for r in await guarded.resolve("engine.internal", 80)] == ["127.0.0.1"]
    for refused in ("169.254.169.254", "::ffff:169.254.169.254", "::a9fe:a9fe",
                    "64:ff9b::a9fe:a9fe", "fe80::1", "fd00:ec2::254"):
        dns.answers["engine.internal"] = [refused]
        with pytest.raises(AddressRefusedError):
            await guarded.resolve("engine.internal", 80)
    dns.answers["engine.internal"] = ["169.254.169.254", "127.0.0.1"]
    assert [r["host"] for r in await guarded.resolve("engine.internal", 80)] == ["127.0.0.1"]


async def test_proxy_connections_recheck_a_name_at_connect(serve_app):
    """The proxy's own client resolves names itself and refuses a metadata answer, so a
    name checked at registration and re-pointed later reaches nothing."""
    async def answer(request: web.Request) -> web.Response:
        # Connection: close, so that every request makes (and checks) a new connection.
        return web.Response(text="ok", headers={"Connection": "close"})

    ok = web.Application()
    ok.router.add_get("/x", answer)
    srv = await serve_app(ok)
    port = int(srv.url.rsplit(":", 1)[1])
    answers = {"engine.test": "127.0.0.1"}
    real_getaddrinfo = asyncio.get_running_loop().getaddrinfo

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "engine.test":  # the scripted DNS answer; everything else is real
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return await real_getaddrinfo(host, port, *args, **kwargs)

    pool = UpstreamPool(getaddrinfo=getaddrinfo)
    try:
        resp = await pool.request("GET", f"http://engine.test:{port}", "/x", {})
        assert resp.status == 200 and await resp.read() == b"ok"
        resp.close()
        assert pool.idle_connections() == 0
        answers["engine.test"] = "169.254.169.254"
        with pytest.raises(UpstreamConnectError, match="link-local"):
            await pool.request("GET", f"http://engine.test:{port}", "/x", {})
        answers["engine.test"] = "127.0.0.1"  # and back: the check is per connection
        resp = await pool.request("GET", f"http://engine.test:{port}", "/x", {})
        assert resp.status == 200
        resp.close()
    finally:
        await pool.close()


def test_static_engines_get_the_same_address_checks():
    from pydantic import ValidationError

    for url in ("http://169.254.169.254", "http://[::a9fe:a9fe]:8000", "http://metadata"):
        with pytest.raises(ValidationError, match="--allow-private-engine-urls"):
            RouterSettings(engine=[url])
        assert RouterSettings(engine=[url], allow_private_engine_urls=True).engine == [url]


@pytest.mark.parametrize(("url", "code"), [
    ("http://[::a9fe:a9fe]:8000", "engine_url_refused"),
    ("http://[64:ff9b::a9fe:a9fe]", "engine_url_refused"),
    ("http://[64:ff9b:1:a9fe:a900:fe00::]", "engine_url_refused"),  # RFC 6052 /48 form
    ("http://[::ffff:0:a9fe:a9fe]", "engine_url_refused"),
    ("http://[2002:a9fe:a9fe::]", "engine_url_refused"),
    ("http://[2001:0:4136:e378:8000:63bf:5601:5601]", "engine_url_refused"),
    # A name that looks like an IP literal up to its "%": must not skip the DNS checks.
    ("http://10.0.0.1%25.attacker.example:8000", "invalid_engine_url"),
])
async def test_registration_refuses_embedded_metadata_addresses(router, url, code):
    r = await router()
    status, payload = await admin_call(r, "POST", "/admin/engines",
                                       json={"url": url, "models": ["m1"]})
    assert (status, payload["error"]["code"]) == (400, code), url
    assert not r.app[STATE].fleet.engines


# --- 4. request ids ----------------------------------------------------------------------
def _untemper(y: int) -> int:
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    for _ in range(7):  # y ^= (y << 7) & 0x9D2C5680, inverted 7 bits at a time
        y = y ^ ((y << 7) & 0x9D2C5680)
    for _ in range(3):
        y = y ^ (y >> 11)
    return y & 0xFFFFFFFF


def _predict_next(ids: list[str]) -> str:
    """Clone a Mersenne Twister from 156 128-bit outputs (624 words) and predict."""
    words: list[int] = []
    for rid in ids[:156]:
        value = int(rid, 16)
        words += [(value >> (32 * i)) & 0xFFFFFFFF for i in range(4)]
    clone = random.Random()
    clone.setstate((3, (*(_untemper(w) for w in words), 624), None))
    return f"{clone.getrandbits(128):032x}"


def test_request_ids_cannot_be_predicted_from_earlier_ones():
    twister = random.Random(1234)
    leaked = [f"{twister.getrandbits(128):032x}" for _ in range(157)]
    assert _predict_next(leaked[:156]) == leaked[156]  # the attack works on the Twister
    ids = RequestIds()
    seen = [ids.next() for _ in range(157)]
    assert _predict_next(seen[:156]) != seen[156]
    many = [ids.next() for _ in range(5000)]  # across batch refills
    assert len(set(many)) == len(many)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in many)


async def test_router_request_ids_random_and_client_ids_kept(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url])
    await wait_until(lambda: bool(r.app[STATE].fleet.models(time.monotonic())))
    body = {"model": "m1", "prompt": "x", "max_tokens": 1}
    async with aiohttp.ClientSession() as s:
        ids = []
        for _ in range(157):
            async with s.post(r.url + "/v1/completions", json=body) as resp:
                ids.append(resp.headers["X-Request-Id"])
        async with s.post(r.url + "/v1/completions", json=body,
                          headers={"X-Request-Id": "client-id-1"}) as resp:
            assert resp.headers["X-Request-Id"] == "client-id-1"
    sent = [h.get("X-Request-Id") for h in a.app[ENGINE].headers]
    assert sent[:157] == ids and sent[157] == "client-id-1"  # what the engine got
    assert len(set(ids)) == 157 and all(len(i) == 32 for i in ids)
    assert _predict_next(ids[:156]) != ids[156]
