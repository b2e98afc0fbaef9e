"""Decision-time micro-benchmark of the routing policies.

Measures, per request, the time from the parsed request body (a dict) to the chosen
engine: prompt extraction, chained hashing, prefix lookup, scoring and the guard. The
prompt is an 8,000-token (~32,000-character) chat, the fleet 16 engines whose indexes are
warmed with thousands of other prompts, so the figures include a realistic index size.

Scenarios:
  hit       the whole 32k prompt is cached on 4 engines, its system prompt on all 16:
            the longest possible walk of the index (worst case for the lookup)
  miss      a prompt nobody holds (only hashing + first-chunk lookup + placement)
  session   a conversation bound to an engine (binding check + walk)
  on_routed the bookkeeping after the decision (recording the 32k chain), separately

    python benchmarks/decision.py [--chunks 64,128,256,512] [--n 3000] [--engines 16]
                                  [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import string
import time
from collections.abc import Callable
from typing import Any

from deepinfer_router.routing.base import Candidate, Decision, RequestFeatures
from deepinfer_router.routing.features import request_features
from deepinfer_router.routing.kv_aware import KvAwareParams, KvAwarePolicy

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
WORDS = [
    "".join(random.Random(i).choices(string.ascii_lowercase, k=random.Random(i).randint(2, 9)))
    for i in range(5000)
]


def text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:chars]


def chat(system: str, user: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 128,
    }


def candidates(n: int, rng: random.Random, capacity_chars: int) -> list[Candidate]:
    return [
        Candidate(
            id=f"engine-{i:02d}",
            instance="i1",
            inflight=rng.randint(2, 6),
            waiting=float(rng.randint(0, 1)),
            running=float(rng.randint(2, 8)),
            kv_usage=rng.random() * 0.8,
            kv_capacity_chars=capacity_chars,
        )
        for i in range(n)
    ]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(fn: Callable[[], object], n: int, clock: Callable[[], int]) -> tuple[float, float]:
    """p50 and p99 in µs. `clock` is perf_counter_ns (wall) or thread_time_ns (CPU time
    of this thread: on a shared machine it leaves out the time the OS ran others)."""
    for _ in range(min(200, n)):  # warm caches and the interpreter's specialisations
        fn()
    samples: list[float] = []
    for _ in range(n):
        t0 = clock()
        fn()
        samples.append((clock() - t0) / 1000.0)
    return statistics.median(samples), percentile(samples, 0.99)


def run(
    chunk: int, n: int, n_engines: int, prompt_chars: int, warm: int, clock: Callable[[], int]
) -> dict[str, Any]:
    rng = random.Random(chunk)
    # 100k tokens of KV per engine (x4 chars): the default when an engine reports none.
    capacity = 400_000
    policy = KvAwarePolicy(KvAwareParams(chunk_chars=chunk, default_capacity_chars=capacity))
    cands = candidates(n_engines, rng, capacity)
    policy.select(RequestFeatures(model=MODEL), cands, 0.0)  # registers the engines

    def route(body: dict[str, Any], session: str | None, now: float, engine: str = "") -> None:
        f = request_features(
            body, MODEL, session, with_prompt=True, chunk_chars=chunk, max_chars=65536
        )
        d = policy.select(f, cands, now)
        policy.on_routed(f, Decision(engine or d.engine_id, d.reason), now)

    # Warm: many other prompts (8 system prompts x many users), spread over all engines.
    systems = [text(rng, 8000) for _ in range(8)]
    for k in range(warm):
        body = chat(rng.choice(systems), text(rng, rng.randint(500, 24000)))
        route(body, f"u{k}", k * 1e-3, engine=f"engine-{k % n_engines:02d}")

    hot_system = systems[0]
    hit_body = chat(hot_system, text(rng, prompt_chars - 8000))
    for e in range(4):  # the whole prompt on 4 engines
        route(hit_body, None, 1.0, engine=f"engine-{e:02d}")
    for e in range(n_engines):  # its system prompt everywhere
        route(chat(hot_system, text(rng, 200)), None, 1.0, engine=f"engine-{e:02d}")
    miss_bodies = [chat(text(rng, 8000), text(rng, prompt_chars - 8000)) for _ in range(50)]
    route(hit_body, "sess-1", 2.0)

    def decide(body: dict[str, Any], session: str | None) -> Callable[[], object]:
        def f() -> object:
            feats = request_features(
                body, MODEL, session, with_prompt=True, chunk_chars=chunk, max_chars=65536
            )
            return policy.select(feats, cands, 3.0)

        return f

    miss_i = iter(range(10**9))

    def miss() -> object:
        body = miss_bodies[next(miss_i) % len(miss_bodies)]
        feats = request_features(
            body, MODEL, None, with_prompt=True, chunk_chars=chunk, max_chars=65536
        )
        return policy.select(feats, cands, 3.0)

    feats = request_features(
        hit_body, MODEL, None, with_prompt=True, chunk_chars=chunk, max_chars=65536
    )
    decision = policy.select(feats, cands, 3.0)

    def on_routed() -> None:
        policy.on_routed(feats, decision, 3.0)

    def hash_only() -> object:
        return request_features(
            hit_body, MODEL, None, with_prompt=True, chunk_chars=chunk, max_chars=65536
        )

    return {
        "chunk": chunk,
        "chunks": len(feats.chunk_hashes),
        "index": len(policy.index),
        "hit": measure(decide(hit_body, None), n, clock),
        "miss": measure(miss, n, clock),
        "session": measure(decide(hit_body, "sess-1"), n, clock),
        "features": measure(hash_only, n, clock),
        "on_routed": measure(on_routed, n, clock),
        "hit_reason": policy.select(feats, cands, 3.0).reason,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", default="64,128,256,512")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--engines", type=int, default=16)
    ap.add_argument("--prompt-chars", type=int, default=32_000)
    ap.add_argument("--warm", type=int, default=3000, help="prompts routed before measuring")
    ap.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall: perf_counter; cpu: this thread's CPU time (robust on a busy machine)",
    )
    args = ap.parse_args()
    clock = time.perf_counter_ns if args.clock == "wall" else time.thread_time_ns
    gc.collect()
    print(
        f"decision time, {args.prompt_chars}-char chat prompt, {args.engines} engines, "
        f"µs p50 / p99 ({args.clock} clock; from parsed body to chosen engine, hashing included)"
    )
    print(
        f"{'chunk':>5} {'chunks':>6} {'index':>7} | {'hit':>13} | {'miss':>13} | "
        f"{'session':>13} || {'features':>13} | {'on_routed':>13}"
    )
    for chunk in (int(c) for c in args.chunks.split(",")):
        r = run(chunk, args.n, args.engines, args.prompt_chars, args.warm, clock)

        def cell(k: str, r: dict[str, Any] = r) -> str:
            p50, p99 = r[k]
            return f"{p50:6.1f} /{p99:6.1f}"

        print(
            f"{r['chunk']:>5} {r['chunks']:>6} {r['index']:>7} | {cell('hit')} | "
            f"{cell('miss')} | {cell('session')} || {cell('features')} | {cell('on_routed')}"
        )


if __name__ == "__main__":
    main()
