"""Manual check that vLLM's CPU build serves the tiny model here (not collected by pytest).

    python tests/e2e/check_vllm_cpu.py [--engines 2] [--workdir /tmp/deepinfer-e2e]

Builds the tiny model, starts N engines (at most 2 on a 2-core machine) on loopback ports,
and prints start-up time, memory, latencies, the /metrics names the router relies on,
prefix-cache hits for a repeated long prompt, and a short `vllm bench serve` run. Every
process it starts runs in its own process group and is killed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import build_tiny_model
from vllm_cmd import bench_serve_cmd, cpu_env, server_cmd, wait_ready

MODEL = "tiny-llama"
METRICS = [
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:cache_config_info",
]
TEXT = (
    "The router sits in front of many engines and sends every request to the engine most "
    "likely to hold its prompt prefix in the KV cache, while keeping the load balanced. "
)


def show(cmd: list[str]) -> str:
    """A command line for humans: the multi-line CLI shim shown as "$CLI_SHIM"."""
    return " ".join(a if "\n" not in a else '"$CLI_SHIM"' for a in cmd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def metrics(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        return resp.read().decode()


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def memory(pid: int) -> str:
    """PSS (shared pages split between processes) of a process tree, and its processes."""
    import psutil

    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    pss = [p.memory_full_info().pss / 2**20 for p in procs]
    parts = ", ".join(f"{p.name()} {m:.0f}" for p, m in zip(procs, pss, strict=True))
    return f"PSS {sum(pss):.0f} MiB ({parts})"


def stream(base: str, body: dict) -> tuple[float, int, float]:
    """(seconds to first content chunk, content chunks, total seconds) of a streamed chat."""
    req = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    first, chunks, done = None, 0, False
    with urllib.request.urlopen(req, timeout=60) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            delta = json.loads(data)["choices"][0]["delta"]
            if delta.get("content"):
                chunks += 1
                first = first or time.perf_counter() - t0
    assert done, "stream did not end with [DONE]"
    return first or 0.0, chunks, time.perf_counter() - t0


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"median {xs[len(xs) // 2] * 1e3:.0f} ms (min {xs[0] * 1e3:.0f}, max {xs[-1] * 1e3:.0f})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/deepinfer-e2e")
    ap.add_argument("--bench-prompts", type=int, default=20)
    ap.add_argument("--via-cli", action="store_true", help="start with `vllm serve` (shim)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model_dir = build_tiny_model(work / "tiny-llama")
    print(f"model: {model_dir} built/reused in {time.perf_counter() - t0:.1f}s")

    procs: list[subprocess.Popen] = []
    try:
        bases = []
        t_start = time.perf_counter()
        for i in range(args.engines):
            port = free_port()
            cmd = server_cmd(model_dir, port, served_model_name=MODEL, via_cli=args.via_cli)
            if i == 0:
                print(
                    "server command:", " ".join(a if "\n" not in a else '"$CLI_SHIM"' for a in cmd)
                )
            log = open(work / f"engine-{i}.log", "wb")
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=cpu_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            bases.append(f"http://127.0.0.1:{port}")
        for base, proc in zip(bases, procs, strict=True):
            wait_ready(base, MODEL, timeout=240, alive=proc)
            print(
                f"ready: {base} after {time.perf_counter() - t_start:.1f}s "
                f"(pid {proc.pid}, {memory(proc.pid)})"
            )

        base = bases[0]
        chat = post(
            f"{base}/v1/chat/completions",
            {
                "model": MODEL,
                "max_tokens": 8,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hello there, how are you?"},
                ],
            },
        )
        print("chat:", chat["usage"], repr(chat["choices"][0]["message"]["content"]))
        comp = post(
            f"{base}/v1/completions",
            {"model": MODEL, "prompt": TEXT, "max_tokens": 8, "ignore_eos": True},
        )
        print("completion:", comp["usage"], f"{len(TEXT)} chars")
        body = {
            "model": MODEL,
            "max_tokens": 64,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a story."}],
        }
        for attempt in ("first", "second"):  # the first streamed request takes a cold path
            ttft, chunks, total = stream(base, body)
            print(
                f"stream ({attempt}), 64 tokens: first content after {ttft * 1e3:.0f} ms, "
                f"{chunks} content chunks, {total * 1e3:.0f} ms total"
            )

        # ~100 prompt tokens (a fresh prompt each time: no prefix-cache help) + 16 out.
        counter = iter(range(10**6))

        def one(n_out: int, b: str = base) -> None:
            post(
                f"{b}/v1/completions",
                {
                    "model": MODEL,
                    "prompt": f"{next(counter)} " + TEXT * 3,
                    "max_tokens": n_out,
                    "ignore_eos": True,
                },
            )

        usage = post(
            f"{base}/v1/completions", {"model": MODEL, "prompt": TEXT * 3, "max_tokens": 1}
        )["usage"]
        n_in = usage["prompt_tokens"]
        print(f"latency, {n_in} prompt tokens + 1 output: {ms(timed(lambda: one(1), 10))}")
        print(f"latency, {n_in} prompt tokens + 16 output: {ms(timed(lambda: one(16), 10))}")
        if len(bases) > 1:
            import threading

            res: dict[int, list[float]] = {}

            def loop(i: int) -> None:
                res[i] = timed(lambda: one(16, bases[i]), 10)

            threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(bases))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, xs in res.items():
                print(f"latency, both engines busy, engine {i}, +16 output: {ms(xs)}")

        text = metrics(base)
        for name in METRICS:
            print(f"metric {name}: {'present' if name in text else 'MISSING'}")
        m = re.search(r"^vllm:cache_config_info\{([^}]*)\}", text, re.M)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            print(
                "cache_config_info:",
                {
                    k: labels.get(k)
                    for k in (
                        "block_size",
                        "num_gpu_blocks",
                        "enable_prefix_caching",
                        "cache_dtype",
                    )
                },
            )

        long_prompt = "Prefix cache check. " + TEXT * 12
        before = metrics(base)
        r1 = post(
            f"{base}/v1/completions",
            {"model": MODEL, "prompt": long_prompt, "max_tokens": 4, "ignore_eos": True},
        )
        mid = metrics(base)
        t1 = time.perf_counter()
        post(
            f"{base}/v1/completions",
            {"model": MODEL, "prompt": long_prompt, "max_tokens": 4, "ignore_eos": True},
        )
        t2 = time.perf_counter() - t1
        after = metrics(base)
        queries, hits = "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"
        for label, a, b in (("first", before, mid), ("second", mid, after)):
            q = metric(b, queries) - metric(a, queries)
            h = metric(b, hits) - metric(a, hits)
            print(
                f"prefix cache, {label} send of a {r1['usage']['prompt_tokens']}-token prompt: "
                f"queries +{q:.0f}, hits +{h:.0f} tokens"
            )
        print(
            f"second send latency: {t2 * 1e3:.0f} ms; kv_cache_usage_perc "
            f"{metric(after, 'vllm:kv_cache_usage_perc'):.4f}"
        )

        bench = bench_serve_cmd(
            base,
            MODEL,
            model_dir,
            num_prompts=args.bench_prompts,
            input_len=100,
            output_len=16,
            result_dir=work,
        )
        print("bench command:", show(bench))
        t0 = time.perf_counter()
        out = subprocess.run(bench, env=cpu_env(), capture_output=True, text=True, timeout=300)
        print(f"bench rc={out.returncode} in {time.perf_counter() - t0:.1f}s")
        start = out.stdout.find("=====")
        print(out.stdout[start:] if start >= 0 else out.stdout[-3000:] or out.stderr[-3000:])
        return 0 if out.returncode == 0 else 1
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
