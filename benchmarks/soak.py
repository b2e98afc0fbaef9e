"""Memory soak: N requests through a real `deepinfer-router` process to fast fake engines,
shaped so that anything unbounded in the router would grow: many distinct sessions
(beyond --max-sessions), distinct prompts over shared system prompts (beyond the prefix
index's capacity), a unique X-Request-Id each, unknown model names and malformed bodies
now and then, streams and client disconnects mid-stream. The router's resident memory
(VmRSS from /proc/PID/status) is sampled every N/20 requests; after warm-up it must stay
flat.

    python benchmarks/soak.py                      # 200,000 requests
    python benchmarks/soak.py --requests 20000     # the CI version (tests/integration/test_soak.py)

Writes benchmarks/results/soak.json (or --out) and prints RSS after warm-up vs at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "soak.json"
MODEL = "soak-model"
SYSTEM_PROMPTS = [
    f"You are assistant #{i}. " + " ".join(f"rule {i}.{j}: be precise." for j in range(40))
    for i in range(50)
]


# --- fake engines (run in their own process) ----------------------------------------------
def serve_engines(ports: list[int]) -> None:
    """Minimal vLLM-shaped engines: /v1/models, /health, /metrics (with a small KV cache so
    that the router's prefix index reaches its bound at once), completions and streams."""
    import uvloop
    from aiohttp import web

    completion = json.dumps({
        "id": "cmpl-soak", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok ok"},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }).encode()
    chunk = (b'data: {"id":"cmpl-soak","object":"chat.completion.chunk","model":"' + MODEL.encode()
             + b'","choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n')
    models = json.dumps({"object": "list", "data": [
        {"id": MODEL, "object": "model", "owned_by": "vllm", "max_model_len": 4096}]}).encode()
    metrics = (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="{MODEL}"}} 1\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 0\n'
        "# TYPE vllm:cache_config_info gauge\n"
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="256"} 1.0\n'
    ).encode()

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream": true' not in body and b'"stream":true' not in body:
            return web.Response(body=completion, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(4):
                await resp.write(chunk)
                await asyncio.sleep(0.002)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # the router's client left mid-stream: expected
            pass
        return resp

    async def models_route(request: web.Request) -> web.Response:
        return web.Response(body=models, content_type="application/json")

    async def health_route(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics_route(request: web.Request) -> web.Response:
        return web.Response(body=metrics, content_type="text/plain")

    async def main() -> None:
        runners = []
        for port in ports:
            app = web.Application()
            app.router.add_get("/v1/models", models_route)
            app.router.add_get("/health", health_route)
            app.router.add_get("/metrics", metrics_route)
            app.router.add_post("/v1/chat/completions", generate)
            app.router.add_post("/v1/completions", generate)
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
            runners.append(runner)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for runner in runners:
            await runner.cleanup()

    uvloop.run(main())


# --- the soak ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def wait_ready(url: str, within_s: float = 30.0) -> None:
    import aiohttp

    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url + "/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready within {within_s}s")
            await asyncio.sleep(0.1)


def make_request(i: int, rng: random.Random) -> tuple[str, bytes, dict[str, str], str]:
    """(path, body, headers, kind) of request number i."""
    headers = {"Content-Type": "application/json",
               "X-Request-Id": f"soak-{i}-{rng.getrandbits(48):x}"}
    roll = rng.random()
    if roll < 0.01:
        return "/v1/chat/completions", b'{"model": "soak-model", "messages": [', headers, "bad"
    if roll < 0.02:  # a fresh unknown model name each time: must not become a metric label
        body: dict[str, Any] = {"model": f"unknown-{i}",
                                "messages": [{"role": "user", "content": "x"}]}
        return "/v1/chat/completions", json.dumps(body).encode(), headers, "unknown"
    headers["X-Session-ID"] = f"session-{i % 50_000}"
    system = SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]
    user = f"question {i} " + f"{rng.getrandbits(256):064x}" * 6
    stream = roll < 0.12
    if roll < 0.30:
        body = {"model": MODEL, "prompt": system + "\n" + user, "max_tokens": 2,
                "stream": stream, "user": f"u{i}"}
        return "/v1/completions", json.dumps(body).encode(), headers, \
            "cancel" if roll < 0.04 else ("stream" if stream else "ok")
    body = {"model": MODEL, "max_tokens": 2, "stream": stream,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user}]}
    return "/v1/chat/completions", json.dumps(body).encode(), headers, \
        "stream" if stream else "ok"


def router_tables(metrics_text: str) -> dict[str, Any]:
    """What the router's /metrics says about its bounded state: the routing tables
    (deepinfer_routing_state_entries), requests in flight per engine, and the label
    series of every deepinfer_ family (the model labels of the request counters too)."""
    from prometheus_client.parser import text_string_to_metric_families

    tables: dict[str, float] = {}
    inflight = 0.0
    series: dict[str, int] = {}
    models: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        if not family.name.startswith("deepinfer_"):
            continue
        for sample in family.samples:
            series[sample.name] = series.get(sample.name, 0) + 1
            if family.name == "deepinfer_routing_state_entries":
                tables[sample.labels["table"]] = sample.value
            elif family.name == "deepinfer_engine_inflight_requests":
                inflight += sample.value
            if "model" in sample.labels:
                models.add(sample.labels["model"])
    return {"tables": tables, "engine_inflight": inflight, "series": series,
            "model_labels": sorted(models)}


async def drive(router_url: str, pid: int, n: int, concurrency: int, samples: int,
                seed: int) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(seed)
    step = max(1, n // samples)
    rss: list[dict[str, Any]] = [{"requests": 0, "rss_kib": rss_kib(pid), "t_s": 0.0}]
    statuses: dict[str, int] = {}
    next_i = 0
    done = 0
    started = time.monotonic()
    expected = {"ok": 200, "stream": 200, "bad": 400, "unknown": 404, "cancel": 200}
    unexpected: list[str] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_i, done
        while next_i < n:
            i = next_i
            next_i += 1
            path, body, headers, kind = make_request(i, rng)
            async with session.post(router_url + path, data=body, headers=headers) as resp:
                if kind == "cancel":
                    await resp.content.readany()  # leave mid-stream
                    resp.close()
                else:
                    await resp.read()
                key = f"{kind}:{resp.status}"
                statuses[key] = statuses.get(key, 0) + 1
                if resp.status != expected[kind] and len(unexpected) < 20:
                    unexpected.append(f"{kind} -> {resp.status}")
            done += 1
            if done % step == 0:
                rss.append({"requests": done, "rss_kib": rss_kib(pid),
                            "t_s": round(time.monotonic() - started, 2)})
                async with session.get(router_url + "/metrics") as resp:
                    tables.append({"after_requests": done,
                                   **router_tables(await resp.text())["tables"]})

    tables: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        # Settled: the last cancelled streams' engine requests end within moments.
        settle_by = time.monotonic() + 10
        while True:
            async with session.get(router_url + "/metrics") as resp:
                final = router_tables(await resp.text())
            idle = final["engine_inflight"] == 0 and final["tables"].get("requests", 0) == 0
            if idle or time.monotonic() > settle_by:
                break
            await asyncio.sleep(0.1)
    return {"rss": rss, "statuses": dict(sorted(statuses.items())), "unexpected": unexpected,
            "elapsed_s": round(elapsed, 2), "requests_per_s": round(n / elapsed, 1),
            "tables_over_time": tables, "end_state": final}


def summarize(result: dict[str, Any], warmup_fraction: float) -> dict[str, Any]:
    rss = result["rss"]
    n = rss[-1]["requests"]
    after = [s for s in rss if s["requests"] >= warmup_fraction * n]
    base = after[0]["rss_kib"]
    end = rss[-1]["rss_kib"]
    peak = max(s["rss_kib"] for s in after)
    return {
        "warmup_requests": after[0]["requests"],
        "rss_after_warmup_mib": round(base / 1024, 1),
        "rss_end_mib": round(end / 1024, 1),
        "rss_peak_after_warmup_mib": round(peak / 1024, 1),
        "growth_after_warmup_pct": round(100 * (end - base) / base, 2),
        "peak_growth_after_warmup_pct": round(100 * (peak - base) / base, 2),
    }


def soak(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    ports = [free_port() for _ in range(args.engines)]
    router_port = free_port()
    engines = subprocess.Popen(
        [sys.executable, __file__, "--serve-engines", *map(str, ports)],
        stdin=subprocess.DEVNULL,
    )
    router_log = open(args.router_log, "wb") if args.router_log else subprocess.DEVNULL
    router_args = [
        "--host", "127.0.0.1", "--port", str(router_port),
        *[a for p in ports for a in ("--engine", f"http://127.0.0.1:{p}")],
        "--max-sessions", str(args.max_sessions), "--session-ttl-s", "3600",
        "--default-engine-kv-tokens", "4096", "--log-level", "warning",
        "--max-inflight-per-engine", "1024", "--scrape-interval-s", "0.5",
    ]
    router = subprocess.Popen(
        [sys.executable, "-m", "deepinfer_router.cli", *router_args],
        stdin=subprocess.DEVNULL, stdout=router_log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{router_port}"

    async def run() -> dict[str, Any]:
        await wait_ready(url)
        return await drive(url, router.pid, args.requests, args.concurrency, args.samples,
                           args.seed)

    try:
        result = uvloop.run(run())
    finally:
        for proc in (router, engines):
            proc.send_signal(signal.SIGTERM)
        for proc in (router, engines):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if args.router_log:
            router_log.close()  # type: ignore[union-attr]
    return {
        "benchmark": "soak",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "engines": args.engines,
        "router_settings": {"max_sessions": args.max_sessions, "engine_kv_tokens": 4096,
                            "prefix_chunk_chars": 256, "chars_per_token": 4},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        **summarize(result, args.warmup_fraction),
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--samples", type=int, default=20, help="RSS samples over the run.")
    parser.add_argument("--warmup-fraction", type=float, default=0.25)
    parser.add_argument("--max-sessions", type=int, default=5000,
                        help="Router --max-sessions: small, so that the bound is reached early.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--router-log", type=Path, default=None)
    parser.add_argument("--serve-engines", type=int, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_engines:
        serve_engines(args.serve_engines)
        return 0
    report = soak(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['requests']} requests in {report['elapsed_s']}s "
          f"({report['requests_per_s']}/s), statuses {report['statuses']}")
    print(f"router RSS after warm-up ({report['warmup_requests']} requests): "
          f"{report['rss_after_warmup_mib']} MiB; at the end: {report['rss_end_mib']} MiB "
          f"({report['growth_after_warmup_pct']:+.2f}%); peak after warm-up "
          f"{report['rss_peak_after_warmup_mib']} MiB")
    print(f"wrote {args.out}")
    return 1 if report["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
