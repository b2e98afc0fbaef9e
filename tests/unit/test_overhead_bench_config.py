"""benchmarks/overhead.py: the canned engine answers and generated configs are well formed
(the benchmark itself needs nginx and wrk and is run by hand)."""

from __future__ import annotations

import json

import pytest

from tests.support.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def ov():  # type: ignore[no-untyped-def]
    return load_benchmark("overhead.py", "overhead_bench")


def test_sse_body_has_200_events_then_done(ov) -> None:  # type: ignore[no-untyped-def]
    events = ov.sse_body().split(b"\n\n")
    assert events[-1] == b""
    data = [e for e in events[:-1]]
    assert len(data) == ov.SSE_EVENTS + 1
    assert data[-1] == b"data: [DONE]"
    for e in data[:-1]:
        assert e.startswith(b"data: ")
        assert json.loads(e[6:])["object"] == "text_completion"


def test_canned_answers_parse(ov) -> None:  # type: ignore[no-untyped-def]
    assert json.loads(ov.chat_completion_body())["object"] == "chat.completion"
    models = json.loads(ov.MODELS_BODY)
    assert models["data"][0]["id"] == ov.MODEL
    assert b"vllm:num_requests_waiting" in ov.METRICS_BODY


def test_nginx_conf_has_one_server_per_port(ov) -> None:  # type: ignore[no-untyped-def]
    servers = "".join(ov.NGINX_SERVER.format(port=p, html="/x") for p in (1001, 1002))
    conf = ov.NGINX_CONF.format(prefix="/p", servers=servers)
    assert conf.count("listen 127.0.0.1:") == 2
    assert "daemon off;" in conf and "error_page 405 =200 $uri;" in conf
    assert conf.count("{") == conf.count("}")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("rate", [None, 500.0])
def test_wrk_script(ov, stream: bool, rate: float | None) -> None:  # type: ignore[no-untyped-def]
    text = ov.wrk_script(stream, rate, 1)
    assert ("/v1/completions" if stream else "/v1/chat/completions") in text
    assert ("function delay()" in text) == bool(rate)
    if rate:
        assert "local interval = 2.0" in text
    assert "WRKJSON" in text and "{{" not in text
