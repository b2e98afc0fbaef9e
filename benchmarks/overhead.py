"""Router overhead: requests through deepinfer-router versus straight to the engine.

The "engines" cost nearly nothing, so what is measured is the router itself: one nginx
(one worker) serves two engine ports with canned answers -

  POST /v1/chat/completions  a canned JSON chat completion (non-streaming)
  POST /v1/completions       a canned 200-event SSE body plus `data: [DONE]` (streaming)
  GET  /v1/models, /health, /metrics (vLLM-like), so the router discovers and scrapes them

and the load generator is wrk (C). For every mode (non-streaming, streaming) it runs

  saturation  wrk -t1 -cC -dD: requests/s, direct to one engine and through the router
  fixed rate  wrk paced by a Lua `delay()` schedule at --rate requests/s (open loop as long
              as a connection is free, which at these latencies it always is): p50/p99
              latency direct and through the router; the difference is the added latency

and reports router/direct ratios. The router runs as `deepinfer-router --engine A
--engine B --policy P --log-level warning` (a subprocess, one per policy), so every
request also goes through routing (prompt hashing for kv-aware), admission, metrics.

Everything shares the machine (on a 2-core box: wrk, nginx and the router compete for
the cores, as in the reference measurements of the Rust routers). Loopback only; every
process started here is stopped at the end.

    python benchmarks/overhead.py [--duration 10] [--connections 64] [--rate 500]
                                  [--policy kv-aware,least-conn] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL = "bench-model"
SSE_EVENTS = 200
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "overhead.json"

# --- canned engine answers -----------------------------------------------------------


def chat_completion_body() -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "The quick brown fox jumps "
                                "over the lazy dog. " * 4},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            # as vLLM answers with --enable-prompt-tokens-details (launch sets it): the
            # router grades its decision by the cached tokens
            "usage": {"prompt_tokens": 64, "completion_tokens": 40, "total_tokens": 104,
                      "prompt_tokens_details": {"cached_tokens": 0}},
        },
        separators=(",", ":"),
    ).encode()


def sse_body(events: int = SSE_EVENTS) -> bytes:
    out = []
    for i in range(events):
        chunk = {
            "id": "cmpl-bench",
            "object": "text_completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "text": f" tok{i}",
                    "logprobs": None,
                    "finish_reason": "length" if i == events - 1 else None,
                }
            ],
        }
        out.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


MODELS_BODY = json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": 8192}]}
).encode()

METRICS_BODY = (
    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
    "# TYPE vllm:num_requests_running gauge\n"
    f'vllm:num_requests_running{{model_name="{MODEL}"}} 0.0\n'
    "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
    "# TYPE vllm:num_requests_waiting gauge\n"
    f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 0.0\n'
    "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} 0.0\n'
    "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
    "# TYPE vllm:cache_config_info gauge\n"
    'vllm:cache_config_info{block_size="16",cache_dtype="auto",'
    'enable_prefix_caching="True",num_gpu_blocks="8192"} 1.0\n'
).encode()

# nginx's static module answers POST with 405; `error_page 405 =200 $uri` turns that into
# an internal GET of the same file, so a POST gets the canned body with status 200. A
# `return 200 '...'` would do for small bodies, but a config token is limited to 4 KiB
# and the SSE body is ~40 KB.
NGINX_SERVER = """
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    etag off;
    location = /v1/chat/completions {{
      alias {html}/chat.json; default_type application/json; types {{}}
      error_page 405 =200 $uri;
    }}
    location = /v1/completions {{
      alias {html}/sse.txt; default_type text/event-stream; types {{}}
      error_page 405 =200 $uri;
    }}
    location = /v1/models {{ alias {html}/models.json; default_type application/json; types {{}} }}
    location = /metrics {{
      alias {html}/metrics.txt; default_type "text/plain; version=0.0.4"; types {{}}
    }}
    location = /health {{ return 200; }}
  }}
"""

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
  access_log off;
  sendfile on;
  tcp_nodelay on;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_max_body_size 64m;  # benchmarks/hostile.py sends bodies up to 32 MiB
  client_body_temp_path {prefix}/tmp_body;
  proxy_temp_path {prefix}/tmp_proxy;
  fastcgi_temp_path {prefix}/tmp_fastcgi;
  uwsgi_temp_path {prefix}/tmp_uwsgi;
  scgi_temp_path {prefix}/tmp_scgi;
{servers}
}}
"""

# --- wrk scripts -------------------------------------------------------------------------

# Sixteen different prompts (so kv-aware routing sees several prefixes and spreads them),
# each request pre-formatted once: the per-request Lua cost is one table lookup.
WRK_REQUESTS = """
local path = "{path}"
local stream = {stream}
local reqs = {{}}
local n = 0
function init(args)
  for i = 1, 16 do
    local prompt = "You are a helpful assistant. Conversation " .. i .. ": " ..
      string.rep("Tell me about the history of the printing press in Europe. ", 3)
    local body
    if stream then
      body = '{{"model":"{model}","prompt":"' .. prompt ..
        '","max_tokens":200,"stream":true}}'
    else
      body = '{{"model":"{model}","messages":[{{"role":"user","content":"' .. prompt ..
        '"}}],"max_tokens":40}}'
    end
    reqs[i] = wrk.format("POST", path,
      {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer bench"}}, body)
  end
end
function request()
  n = n + 1
  return reqs[(n % 16) + 1]
end
"""

# Pacing: every request takes the next slot of a fixed schedule (1/rate apart). Slots are
# reserved when a connection asks, so with C connections up to C requests are scheduled
# ahead and sending stays on schedule while latency << C/rate.
WRK_PACING = """
local ffi = require("ffi")
ffi.cdef[[
  typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval = {interval_ms}
local next_slot = nil
function delay()
  local t = now_ms()
  if next_slot == nil then next_slot = t end
  next_slot = next_slot + interval
  local d = next_slot - t
  if d < 0 then return 0 end
  return math.floor(d + 0.5)
end
"""

WRK_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
"""


def wrk_script(stream: bool, rate: float | None, threads: int) -> str:
    path = "/v1/completions" if stream else "/v1/chat/completions"
    text = WRK_REQUESTS.format(path=path, stream="true" if stream else "false", model=MODEL)
    if rate:
        text += WRK_PACING.format(interval_ms=1000.0 * threads / rate)
    return text + WRK_DONE


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} answered")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status == 200:
                return
            last = f"status {resp.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port}{path} not ready after {timeout}s: {last}")


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def nginx_engines(workdir: Path, count: int = 2) -> Iterator[list[int]]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = workdir / "nginx"
    html = prefix / "html"
    html.mkdir(parents=True)
    (html / "chat.json").write_bytes(chat_completion_body())
    (html / "sse.txt").write_bytes(sse_body())
    (html / "models.json").write_bytes(MODELS_BODY)
    (html / "metrics.txt").write_bytes(METRICS_BODY)
    ports = [free_port() for _ in range(count)]
    servers = "".join(NGINX_SERVER.format(port=p, html=html) for p in ports)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, servers=servers))
    proc = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=open(prefix / "stderr.log", "wb"),
    )
    try:
        for p in ports:
            wait_http(p, "/health", 10, proc)
        yield ports
    finally:
        stop(proc, signal.SIGQUIT)  # graceful: master stops its worker


@contextlib.contextmanager
def router(
    engine_ports: list[int], policy: str, workdir: Path, extra: list[str],
    src: Path | None = None,
) -> Iterator[tuple[int, subprocess.Popen[Any]]]:
    """The router of `src` (a source tree; default: whatever this interpreter imports),
    run by this interpreter: never a `deepinfer-router` found on PATH, which may be
    another installation's (a pyenv shim, say) and would measure other code."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepinfer_router.cli"]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
    cmd += [a for p in engine_ports for a in ("--engine", f"http://127.0.0.1:{p}")]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    cmd += ["--policy", policy, *extra]
    log = open(workdir / f"router-{policy}.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=src or None)
    try:
        wait_http(port, "/ready", 30, proc)
        # /ready needs one engine; wait until both are routable (models read).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/admin/engines")
            info = json.loads(conn.getresponse().read() or b"{}")
            conn.close()
            engines = info.get("engines", info) if isinstance(info, dict) else info
            if isinstance(engines, list) and sum(
                1 for e in engines if isinstance(e, dict) and e.get("state") == "healthy"
            ) >= len(engine_ports):
                break
            time.sleep(0.1)
        yield port, proc
    finally:
        stop(proc)
        log.close()


def check_answers(port: int, via_router: bool) -> dict[str, Any]:
    """One request of each kind before measuring: right status, body and headers."""
    found: dict[str, Any] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    if resp.status != 200 or payload != chat_completion_body():
        raise RuntimeError(f"bad non-streaming answer on :{port}: {resp.status} {payload[:200]!r}")
    if via_router:
        found["engine"] = resp.getheader("x-deepinfer-engine")
        found["route"] = resp.getheader("x-deepinfer-route")
        if not found["engine"] or not resp.getheader("X-Request-Id"):
            raise RuntimeError("router answer lacks x-deepinfer-engine / X-Request-Id")
    body = json.dumps({"model": MODEL, "prompt": "hi", "stream": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    if resp.status != 200 or payload != sse_body():
        raise RuntimeError(f"bad streaming answer on :{port}: {resp.status} {payload[:200]!r}")
    if payload.count(b"data: ") != SSE_EVENTS + 1:
        raise RuntimeError("streaming answer lost events")
    conn.close()
    return found


def run_wrk(
    port: int,
    stream: bool,
    workdir: Path,
    *,
    duration: float,
    connections: int,
    threads: int,
    rate: float | None = None,
) -> dict[str, Any]:
    script = workdir / f"wrk-{'stream' if stream else 'plain'}-{'rate' if rate else 'sat'}.lua"
    script.write_text(wrk_script(stream, rate, threads))
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
        "-s", str(script), f"http://127.0.0.1:{port}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    res = json.loads(lines[-1][len("WRKJSON "):])
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["error_count"] = sum(res["errors"].values())
    res["command"] = " ".join(cmd)
    return res


# --- the benchmark ---------------------------------------------------------------------

MODES = (("non_streaming", False), ("streaming", True))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` and its live descendants so far
    (/proc/PID/stat utime + stime, every thread included): a router of several processes
    (`--workers N`, a peer's helpers) counts whole."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between the listing and the read
    return total


def measure_target(
    port: int, args: argparse.Namespace, workdir: Path, pid: int | None = None
) -> dict[str, Any]:
    """wrk against `port`; with `pid` (the router's), also its CPU time (its process tree)
    per request at saturation and at the fixed rate."""
    out: dict[str, Any] = {}
    for mode, stream in MODES:
        if args.warmup > 0:
            run_wrk(port, stream, workdir, duration=args.warmup,
                    connections=args.connections, threads=args.threads)
        cpu_before = cpu_seconds(pid) if pid else 0.0
        sat = run_wrk(port, stream, workdir, duration=args.duration,
                      connections=args.connections, threads=args.threads)
        if pid:
            sat["router_cpu_s"] = cpu_seconds(pid) - cpu_before
            sat["router_cpu_us_per_request"] = 1e6 * sat["router_cpu_s"] / max(sat["requests"], 1)
        cpu_before = cpu_seconds(pid) if pid else 0.0
        fixed = run_wrk(port, stream, workdir, duration=args.rate_duration,
                        connections=args.rate_connections, threads=1, rate=args.rate)
        if pid:
            # At a fixed rate the router is not saturated: the figure depends less on how
            # many requests one loop turn batches, so it varies less between runs.
            fixed["router_cpu_s"] = cpu_seconds(pid) - cpu_before
            fixed["router_cpu_us_per_request"] = (
                1e6 * fixed["router_cpu_s"] / max(fixed["requests"], 1)
            )
        out[mode] = {"saturation": sat, "fixed_rate": fixed}
        cpu = (
            f", router CPU {sat['router_cpu_us_per_request']:.1f} us/req"
            f" ({fixed['router_cpu_us_per_request']:.1f} at {args.rate:g} r/s)" if pid else ""
        )
        print(
            f"    {mode:14s} {sat['rps']:9.0f} req/s{cpu} (errors {sat['error_count']}); "
            f"at {fixed['rps']:.0f} req/s p50 {fixed['latency_us']['p50']} us "
            f"p99 {fixed['latency_us']['p99']} us",
            flush=True,
        )
    return out


def summarize(direct: dict[str, Any], routed: dict[str, Any]) -> dict[str, Any]:
    summary = {}
    for mode, _ in MODES:
        d, r = direct[mode], routed[mode]
        dl, rl = d["fixed_rate"]["latency_us"], r["fixed_rate"]["latency_us"]
        summary[mode] = {
            "direct_rps": round(d["saturation"]["rps"]),
            "router_rps": round(r["saturation"]["rps"]),
            "rps_ratio": round(r["saturation"]["rps"] / d["saturation"]["rps"], 3),
            "router_cpu_us_per_request": round(
                r["saturation"].get("router_cpu_us_per_request", 0.0), 1
            ),
            "fixed_rate_rps": round(r["fixed_rate"]["rps"]),
            "direct_p50_ms": dl["p50"] / 1000,
            "router_p50_ms": rl["p50"] / 1000,
            "added_p50_ms": round((rl["p50"] - dl["p50"]) / 1000, 3),
            "direct_p99_ms": dl["p99"] / 1000,
            "router_p99_ms": rl["p99"] / 1000,
            "added_p99_ms": round((rl["p99"] - dl["p99"]) / 1000, 3),
            "p50_ratio": round(rl["p50"] / max(dl["p50"], 1), 2),
            "errors": d["saturation"]["error_count"] + r["saturation"]["error_count"]
            + d["fixed_rate"]["error_count"] + r["fixed_rate"]["error_count"],
        }
    return summary


def print_table(results: dict[str, Any], rate: float) -> None:
    head = (
        f"{'policy':11s} {'mode':14s} {'direct r/s':>10s} {'router r/s':>10s} {'ratio':>6s} "
        f"{'p50 +ms':>8s} {'p99 +ms':>8s} {'cpu us/req':>10s}  "
        f"(latency at {rate:g} r/s: direct -> router p50, p99)"
    )
    print(head)
    print("-" * len(head))
    for policy, entry in results["router"].items():
        for mode, s in entry["summary"].items():
            print(
                f"{policy:11s} {mode:14s} {s['direct_rps']:10d} {s['router_rps']:10d} "
                f"{s['rps_ratio']:6.2f} {s['added_p50_ms']:8.3f} {s['added_p99_ms']:8.3f} "
                f"{s['router_cpu_us_per_request']:10.1f}  "
                f"({s['direct_p50_ms']:.3f} -> {s['router_p50_ms']:.3f}, "
                f"{s['direct_p99_ms']:.3f} -> {s['router_p99_ms']:.3f})"
                + (f"  ERRORS {s['errors']}" if s["errors"] else "")
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10, help="Seconds of each saturation run.")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (saturation).")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (saturation).")
    p.add_argument("--rate", type=float, default=500, help="Requests/s of the fixed-rate runs.")
    p.add_argument("--rate-duration", type=float, default=10,
                   help="Seconds of each fixed-rate run.")
    p.add_argument("--rate-connections", type=int, default=32,
                   help="wrk connections of the fixed-rate runs (enough to stay on schedule).")
    p.add_argument("--warmup", type=float, default=2, help="Seconds of warm-up before each mode.")
    p.add_argument("--policy", default="kv-aware,least-conn",
                   help="Comma-separated routing policies to measure (one router each).")
    p.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                   help="Extra argument for deepinfer-router (repeatable).")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file.")
    p.add_argument("--keep-temp", action="store_true", help="Keep the temp dir (logs, conf).")
    p.add_argument("--src", type=Path, default=None,
                   help="Measure the router of this source tree (a git worktree of another "
                   "commit, for a before/after); default: the one this Python imports.")
    args = p.parse_args(argv)
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"overhead.py needs `{tool}` (apt-get install wrk nginx-light)", file=sys.stderr)
            return 2
    policies = [x.strip() for x in args.policy.split(",") if x.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="deepinfer-overhead-"))
    workdir.chmod(0o755)  # run as root, nginx's worker is `nobody` and reads html/ from here
    results: dict[str, Any] = {
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        },
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "router": {},
    }
    try:
        with nginx_engines(workdir) as ports:
            check_answers(ports[0], via_router=False)
            print(f"direct (nginx :{ports[0]})", flush=True)
            results["direct"] = measure_target(ports[0], args, workdir)
            for policy in policies:
                with router(ports, policy, workdir, args.router_arg, args.src) as (port, proc):
                    first = check_answers(port, via_router=True)
                    print(f"router --policy {policy} (:{port}, first route {first})", flush=True)
                    routed = measure_target(port, args, workdir, proc.pid)
                    results["router"][policy] = {
                        "runs": routed,
                        "summary": summarize(results["direct"], routed),
                    }
    finally:
        if not args.keep_temp:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"temp files kept in {workdir}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print_table(results, args.rate)
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
