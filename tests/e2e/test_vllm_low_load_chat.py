"""kv-aware against the simple policies on real vLLM at low load: the multi-turn shape it
once lost on (every conversation piled onto one engine).

Two vLLM engines (CPU build, tiny model) whose KV caches (40 blocks of 32 tokens each)
hold about two thirds of the working set: 7 conversations sharing a short system prompt,
each with ~300 tokens of its own context, 4 turns each, sent one at a time in a seeded
shuffled order with `X-Session-ID`. For each policy a router is started in front of the
same two engines, whose prefix caches are emptied first (`POST /reset_prefix_cache`,
vLLM's dev-mode endpoint: the state of fresh engines without paying a vLLM start per
policy, which would take the test past its CI budget). The same requests go through
each router; hit rates come from vLLM's own counters.

Asserted: kv-aware's hit rate >= 0.97 x the best of round-robin, least-conn and session,
and >= 1.3 x round-robin's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import workload
from tests.e2e.fleet import MODEL, Router, get_text, http_json
from tests.e2e.tiny_model import MODEL_CACHE, build_tiny_model
from tests.e2e.vllm_cmd import cpu_env, server_cmd, wait_ready
from tests.support.procs import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
RESULTS_FILE = ROOT / "benchmarks" / "results" / "vllm_low_load_chat.json"
WRITE_RESULTS_ENV = "DEEPINFER_E2E_WRITE_RESULTS"  # =1: also write RESULTS_FILE
KV_BLOCKS = 40
BYTES_PER_BLOCK = 32 * 1024  # tiny model, bf16: 2 layers x (K, V) x 4 heads x 32 x 2 B x 32
POLICIES = ("round-robin", "least-conn", "session", "kv-aware")
SPEC = workload.Spec(users=7, rounds=4, system_words=60, context_words=240, user_words=30,
                     max_tokens=8, shuffle=True, session_header=True)


@pytest.fixture(scope="module")
def small_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two plain vLLM servers with small caches, started in parallel."""
    tmp = tmp_path_factory.mktemp("vllm-small")
    model_dir = tmp / "tiny-llama"
    shutil.copytree(build_tiny_model(MODEL_CACHE), model_dir)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    urls: list[str] = []
    try:
        for _ in range(2):
            port = free_port()
            cmd = server_cmd(model_dir, port, served_model_name=MODEL,
                             kv_cache_bytes=KV_BLOCKS * BYTES_PER_BLOCK)
            log = open(tmp / f"vllm-{port}.log", "wb")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env=cpu_env(VLLM_SERVER_DEV_MODE="1")))
            urls.append(f"http://127.0.0.1:{port}")
        for proc, url in zip(procs, urls, strict=True):
            wait_ready(url, MODEL, timeout=300, alive=proc)
        yield urls
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for log in logs:
            log.close()


def num_gpu_blocks(url: str) -> int:
    for line in get_text(url + "/metrics").splitlines():
        if line.startswith("vllm:cache_config_info{") and 'num_gpu_blocks="' in line:
            return int(line.split('num_gpu_blocks="', 1)[1].split('"', 1)[0])
    return 0


def test_low_load_multi_turn_kv_aware_matches_the_best_simple_policy(
    small_engines: list[str], tmp_path: Path
) -> None:
    urls = small_engines
    blocks = [num_gpu_blocks(u) for u in urls]
    assert all(0 < b <= 2 * KV_BLOCKS for b in blocks), blocks  # the cache really is small
    results: dict[str, workload.Result] = {}
    for policy in POLICIES:
        for url in urls:
            status, body, _ = http_json("POST", url + "/reset_prefix_cache", timeout=30)
            assert status == 200, (url, status, body)
        router = Router(tmp_path, "--policy", policy,
                        *[a for u in urls for a in ("--engine", u)], name=f"router-{policy}")
        try:
            router.wait_healthy()
            router.wait_engines(urls)
            results[policy] = workload.run(router.url, urls, seed=303, spec=SPEC, label=policy)
        finally:
            router.stop()

    kv = results["kv-aware"]
    best = max(results[p].hit_rate for p in POLICIES if p != "kv-aware")
    rr = results["round-robin"].hit_rate
    report = {
        "what": "prefix-cache hit rate (vllm:prefix_cache_hits_total / queries_total, both "
                "engines) of 7 conversations x 4 turns sent one at a time in shuffled order "
                "with X-Session-ID, per routing policy, caches emptied before each",
        "command": "DEEPINFER_E2E_WRITE_RESULTS=1 pytest -s tests/e2e -k low_load",
        "engines": f"2 x vLLM CPU build, tiny Llama, block size 32, num_gpu_blocks {blocks}",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hit_rate": {p: r.hit_rate for p, r in results.items()},
        "results": {p: r.as_dict() for p, r in results.items()},
        "kv_aware_vs_best_simple": round(kv.hit_rate / best, 3) if best else None,
        "kv_aware_vs_round_robin": round(kv.hit_rate / rr, 3) if rr else None,
    }
    text = json.dumps(report, indent=2) + "\n"
    (tmp_path / "vllm_low_load_chat.json").write_text(text)
    if os.environ.get(WRITE_RESULTS_ENV) == "1":
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_FILE.write_text(text)
    print("\n[low-load chat] " + ", ".join(
        f"{p} {r.hit_rate:.3f} (engines {r.per_engine})" for p, r in results.items()))

    for r in results.values():
        assert r.requests == SPEC.users * SPEC.rounds
        assert r.queries >= r.prompt_tokens  # the counters saw every prompt
    assert kv.hit_rate >= 0.97 * best, report
    assert kv.hit_rate >= 1.3 * rr, report
