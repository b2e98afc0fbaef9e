"""Decision time with precise routing: from the parsed chat body to the chosen engine,
tokenization in the router included (the issue's budget: an 8,000-token prompt over 16
engines, <= 2 ms p50).

Per request, as the router does it: the policy's prompt features (chunk hashes, for the
approximate estimate), the prompt as token ids (chat template + tokenizer, with the piece
LRU), the precise index's match over the 16 engines' KV event indexes (kv_events/feeds.py
`annotate`), and kv-aware's select. The tokenizer is a real byte-level BPE (the e2e tiny
model's, trained here: 8,192 tokens, so more tokens per character than a production
vocabulary, i.e. more work per prompt); each engine's index is warmed with BlockStored
events for thousands of other prompts.

Scenarios (each an 8,000-token chat):
  cold     a conversation the tokenizer has never seen: every piece encoded
  warm     a 6,000-token system prompt seen before + a new 2,000-token user message
  repeat   the same conversation again (all pieces from the LRU)

    python benchmarks/precise_decision.py [--n 300] [--engines 16] [--tokens 8000]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepinfer_router.kv_events.decode import BlockStored  # noqa: E402
from deepinfer_router.kv_events.feeds import annotate  # noqa: E402
from deepinfer_router.kv_events.index import PreciseIndex  # noqa: E402
from deepinfer_router.routing.base import Candidate  # noqa: E402
from deepinfer_router.routing.kv_aware import KvAwarePolicy  # noqa: E402
from deepinfer_router.shared.prompt_tokenizer import PromptTokenizer  # noqa: E402
from tests.e2e.tiny_model import build_tokenizer, corpus  # noqa: E402

MODEL = "tiny-llama"
BLOCK = 16


def words(rng: random.Random, vocab: list[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def store(index: PreciseIndex, engine: str, tokens: list[int], salt: int) -> None:
    blocks = len(tokens) // BLOCK
    index.apply(engine, [BlockStored(
        block_hashes=tuple(salt * 1_000_003 + i for i in range(blocks)),
        parent_block_hash=None, token_ids=tuple(tokens[: blocks * BLOCK]), block_size=BLOCK)])


def measure(fn: Callable[[], dict[str, float]], n: int) -> dict[str, tuple[float, float]]:
    parts: dict[str, list[float]] = {}
    for _ in range(n):
        for k, v in fn().items():
            parts.setdefault(k, []).append(v)
    out = {}
    for k, xs in parts.items():
        xs.sort()
        out[k] = (statistics.median(xs), xs[min(len(xs) - 1, int(0.99 * len(xs)))])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--engines", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--warm", type=int, default=2000, help="other prompts in the indexes")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer(Path(tmp))
        tok = PromptTokenizer.from_dir(tmp)
    vocab = sorted({w for line in corpus() for w in line.split() if w.isalpha()})
    rng = random.Random(7)

    def chat_of(system: str, user: str) -> dict[str, Any]:
        return {"model": MODEL, "messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": user}]}

    def words_for(tokens: int) -> int:  # words giving about `tokens` tokens
        sample = words(rng, vocab, 400)
        return int(400 * tokens / len(tok.encode(sample)))

    sys_words, user_words = words_for(args.tokens * 3 // 4), words_for(args.tokens // 4)
    system = words(rng, vocab, sys_words)
    hot = chat_of(system, words(rng, vocab, user_words))
    hot_ids = tok.prompt_ids(hot) or []
    engines = [f"engine-{i:02d}" for i in range(args.engines)]
    index = PreciseIndex()
    sys_ids = tok.prompt_ids(chat_of(system, "hi")) or []
    for i, e in enumerate(engines):
        store(index, e, sys_ids, 10_000 + i)  # the system prompt everywhere
        if i < 4:
            store(index, e, hot_ids, 20_000 + i)  # the whole prompt on 4
    for k in range(args.warm):  # other prompts, spread
        other = tok.text_ids(words(rng, vocab, rng.randint(50, 800)))
        store(index, engines[k % len(engines)], other, 30_000 + k)
    policy = KvAwarePolicy()
    cands = [Candidate(e, "i1", inflight=rng.randint(0, 4), kv_capacity_chars=400_000)
             for e in engines]
    policy.select(policy.prompt_features(hot, MODEL, None), cands, 0.0)

    def decide(body: dict[str, Any]) -> dict[str, float]:
        clock = time.perf_counter_ns
        t0 = clock()
        features = policy.prompt_features(body, MODEL, None)
        t1 = clock()
        ids = tok.prompt_ids(body)
        assert ids
        features.prompt_token_ids = tuple(ids)
        t2 = clock()
        fresh = [Candidate(c.id, c.instance, inflight=c.inflight,
                           kv_capacity_chars=c.kv_capacity_chars) for c in cands]
        annotate(index, features, fresh, engines)
        t3 = clock()
        policy.select(features, fresh, 1.0)
        t4 = clock()
        return {"features": (t1 - t0) / 1e3, "tokenize": (t2 - t1) / 1e3,
                "precise match": (t3 - t2) / 1e3, "select": (t4 - t3) / 1e3,
                "total": (t4 - t0) / 1e3}

    fresh_i = iter(range(10**9))

    def cold() -> dict[str, float]:
        r = random.Random(next(fresh_i))
        return decide(chat_of(words(r, vocab, sys_words), words(r, vocab, user_words)))

    def warm() -> dict[str, float]:
        r = random.Random(10**6 + next(fresh_i))
        return decide(chat_of(system, words(r, vocab, user_words)))

    gc.collect()
    print(f"precise decision, {len(hot_ids)}-token chat, {args.engines} engines, index "
          f"{sum(len(index.engine(e)) for e in engines)} blocks; us p50 / p99 (wall)")
    print(f"{'scenario':>8} | " + " | ".join(f"{k:>15}" for k in
                                              ("features", "tokenize", "precise match",
                                               "select", "total")))
    for name, fn in (("cold", cold), ("warm", warm), ("repeat", lambda: decide(hot))):
        for _ in range(10):
            fn()
        r = measure(fn, args.n)
        print(f"{name:>8} | " + " | ".join(f"{r[k][0]:7.0f} /{r[k][1]:6.0f}" for k in
                                             ("features", "tokenize", "precise match",
                                              "select", "total")))


if __name__ == "__main__":
    main()
