"""The proxy's pure steps, without a server: parsing a body, the client key, which headers
cross the router, how attempt failures are told apart."""

from __future__ import annotations

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from deepinfer_router.errors import RouterError
from deepinfer_router.fairness.tenants import TenantKey
from deepinfer_router.proxy.auth import check_api_key
from deepinfer_router.proxy.failures import EngineTimeout, Retryable, timeout_kind
from deepinfer_router.proxy.headers import EngineHeaders, client_headers
from deepinfer_router.proxy.parse import check_declared_length, max_body_bytes, parse_request

JSON = "application/json"


def served(*models: str):
    calls: list[int] = []

    def models_now() -> list[str]:
        calls.append(1)
        return list(models)

    return models_now, calls


async def parse(body: bytes, content_type: str = JSON, session: str | None = None,
                models: tuple[str, ...] = ("m1",), max_items: int = 1000):
    lookup, calls = served(*models)
    parsed = await parse_request(body, content_type, session, max_json_items=max_items,
                                 served_models=lookup)
    return parsed, calls


async def refused(body: bytes, content_type: str = JSON, **kw) -> RouterError:
    with pytest.raises(RouterError) as info:
        await parse(body, content_type, **kw)
    return info.value


# --- parse ----------------------------------------------------------------------------------
async def test_model_stream_and_session_key_from_the_body() -> None:
    body = b'{"model": "m2", "stream": true, "user": "u7", "prompt": "hi"}'
    parsed, calls = await parse(body)
    assert (parsed.model, parsed.stream, parsed.body) == ("m2", True, body)
    assert parsed.session_key is not None and parsed.json is not None
    assert calls == []  # the body named its model: the fleet is not asked


async def test_session_header_wins_over_the_body_user() -> None:
    a, _ = await parse(b'{"model": "m", "user": "u1"}', session="s1")
    b, _ = await parse(b'{"model": "m", "user": "u2"}', session="s1")
    c, _ = await parse(b'{"model": "m", "user": "u1"}')
    assert a.session_key == b.session_key != c.session_key


async def test_stream_only_when_exactly_true() -> None:
    for value in (b'"true"', b"1", b"false", b"null"):
        parsed, _ = await parse(b'{"model": "m", "stream": ' + value + b"}")
        assert parsed.stream is False


async def test_no_model_goes_to_the_only_one_served_and_the_body_says_so() -> None:
    parsed, calls = await parse(b'{"prompt": "x"}', models=("only",))
    assert parsed.model == "only" and calls == [1]
    assert orjson.loads(parsed.body) == {"prompt": "x", "model": "only"}


async def test_no_model_with_two_served_is_refused() -> None:
    err = await refused(b'{"prompt": "x", "model": ""}', models=("a", "b"))
    assert (err.status, err.code) == (400, "model_required") and "a, b" in str(err)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        (b'"model"', "invalid_body"),
        (b'{"model": 7}', "invalid_model"),
        (b'{"model": ["m"]}', "invalid_model"),
    ],
)
async def test_bodies_that_cannot_be_routed(body: bytes, code: str) -> None:
    err = await refused(body)
    assert (err.status, err.code) == (400, code)


async def test_too_many_json_values_refused_before_parsing() -> None:
    body = b'{"model": "m", "prompt": [' + b",".join(b"0" for _ in range(200)) + b"]}"
    err = await refused(body, max_items=100)
    assert (err.status, err.code) == (400, "invalid_body") and "--max-json-items" in str(err)
    parsed, _ = await parse(body, max_items=1000)
    assert parsed.model == "m"


async def test_multipart_model_from_the_part_headers() -> None:
    body = (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            b"RIFF\r\n--B--\r\n")
    parsed, _ = await parse(body, "multipart/form-data; boundary=B")
    assert (parsed.model, parsed.stream, parsed.json, parsed.body) == ("whisper", False, None, body)


async def test_malformed_multipart_refused() -> None:
    err = await refused(b"garbage", "multipart/form-data")
    assert (err.status, err.code) == (400, "invalid_body")


def test_declared_length_over_the_limit_refused_before_reading() -> None:
    limit = max_body_bytes(1.0)
    check_declared_length(None, limit, 1.0)
    check_declared_length(1024 * 1024, limit, 1.0)
    with pytest.raises(RouterError) as info:
        check_declared_length(1024 * 1024 + 1, limit, 1.0)
    assert info.value.status == 413 and info.value.headers == {"Connection": "close"}


# --- auth -----------------------------------------------------------------------------------
def test_api_keys() -> None:
    k1, k2 = TenantKey("default", "k1"), TenantKey("default", "k2")
    check_api_key([], "")  # no keys: open
    check_api_key([k1, k2], "Bearer k2")
    check_api_key([k1], "bearer k1")
    for header in ("", "Bearer", "Bearer k3", "k1", "Basic k1", "Bearer k1 "):
        with pytest.raises(RouterError) as info:
            check_api_key([k1], header)
        assert (info.value.status, info.value.code) == (401, "invalid_api_key")


# --- headers --------------------------------------------------------------------------------
def client(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_headers_to_the_engine() -> None:
    headers = client(
        ("Authorization", "Bearer client"), ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "s"), ("Keep-Alive", "5"), ("X-Request-Id", "theirs"),
        ("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2"),
        ("Accept", "a"), ("Accept", "b"), ("Expect", "100-continue"),
    )
    out = EngineHeaders(None, client_keys_checked=False).build(headers, "rid", "3.3.3.3")
    assert out == [
        ("Authorization", "Bearer client"), ("Accept", "a"), ("Accept", "b"),
        ("X-Request-Id", "rid"), ("X-Forwarded-For", "1.1.1.1, 2.2.2.2, 3.3.3.3"),
    ]
    checked = EngineHeaders(None, client_keys_checked=True).build(headers, "rid", None)
    assert not any(k == "Authorization" for k, _ in checked)
    keyed = EngineHeaders("ek", client_keys_checked=False).build(headers, "rid", None)
    assert [v for k, v in keyed if k == "Authorization"] == ["Bearer ek"]


def test_headers_to_the_client() -> None:
    engine = [("content-type", "text/plain"), ("set-cookie", "a"), ("set-cookie", "b"),
              ("x-request-id", "engine's"), ("Transfer-Encoding", "chunked"),
              ("x-deepinfer-engine", "forged")]
    assert client_headers(engine, "e1", "prefix", "rid") == [
        ("content-type", "text/plain"), ("set-cookie", "a"), ("set-cookie", "b"),
        ("x-deepinfer-engine", "e1"), ("x-deepinfer-route", "prefix"), ("X-Request-Id", "rid"),
    ]


# --- failures -------------------------------------------------------------------------------
def test_a_timeout_is_never_taken_for_a_retryable_failure() -> None:
    timeout = EngineTimeout("first_byte_timeout")
    assert not isinstance(timeout, Retryable)
    assert (timeout.status, timeout.kind) == (504, "first_byte_timeout")
    assert not isinstance(Retryable("reset", 502, "x"), EngineTimeout)


def test_timeout_kind_names_the_deadline_when_it_ran_out() -> None:
    import time

    assert timeout_kind(time.monotonic() + 60, "idle_timeout") == "idle_timeout"
    assert timeout_kind(time.monotonic() - 1, "idle_timeout") == "total_timeout"
