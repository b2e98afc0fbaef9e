"""A multi-turn chat workload with a shared system prompt, and the prefix-cache hit rate
it gets, measured from the engines' own `/metrics` (vLLM's counters, not the router's).

Every user sends `rounds` turns; each turn's prompt is the shared system prompt, the
user's whole history (their earlier messages and the replies they got) and a new message
(the first one carries `context_words` of the user's own context besides). Turns go
round by round (user 0, 1, ..., then everyone's next turn), so a policy that ignores
prefixes sends a user's consecutive turns to different engines, or with `shuffle` in a
seeded shuffled order (each user's turns still in order). The content comes
from a seed: two runs with different seeds share no prefix, so one run's cache cannot
help the next one on the same engines.

Turns are sent one at a time, each once the router's scraped view of the engines shows
them idle (a think time between turns). Without it the router may see a `running` request
that has finished since its last scrape (up to --scrape-interval-s old) as load worth
more than a conversation's history, and move the conversation: a staleness effect of
the scrape timing, not of the policy, that made kv-aware's hit rate vary from run to run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.e2e.fleet import MODEL, get_text, http_json, metric_sum
from tests.e2e.tiny_model import _MORE_WORDS, _WORDS

QUERIES = "vllm:prefix_cache_queries_total"
HITS = "vllm:prefix_cache_hits_total"
WORDS = sorted(set(_WORDS.split()) | set(_MORE_WORDS.split()))


def sentences(rng: random.Random, n_words: int) -> str:
    out: list[str] = []
    while n_words > 0:
        k = min(n_words, rng.randint(6, 14))
        words = rng.choices(WORDS, k=k)
        out.append(" ".join(words).capitalize() + ".")
        n_words -= k
    return " ".join(out)


@dataclass
class Spec:
    users: int = 7  # odd: with 2 engines, round-robin alternates each user's engine
    rounds: int = 3
    system_words: int = 60  # ~80 tokens
    user_words: int = 200  # ~250 tokens a message: prompts of ~330, ~590, ~850 tokens
    max_tokens: int = 8
    concurrency: int = 1
    session_ids: bool = False  # send OpenAI's `user` field (the router's session key)
    session_header: bool = False  # send X-Session-ID (the router's session header)
    context_words: int = 0  # extra words of the user's own context in its first message
    shuffle: bool = False  # turns in a seeded shuffled order instead of round by round
    wait_idle: bool = True  # send a turn once the router sees every engine idle


@dataclass
class Result:
    label: str
    spec: dict[str, Any]
    requests: int = 0
    prompt_tokens: int = 0
    queries: float = 0.0
    hits: float = 0.0
    hit_rate: float = 0.0
    seconds: float = 0.0
    per_engine: dict[str, int] = field(default_factory=dict)  # requests by engine id
    routes: dict[str, int] = field(default_factory=dict)  # x-deepinfer-route counts
    prompt_tokens_by_round: list[list[int]] = field(default_factory=list)
    engines_by_user: list[str] = field(default_factory=list)  # engine per turn, "0101..."

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def counters(engine_urls: Sequence[str]) -> tuple[float, float]:
    q = h = 0.0
    for url in engine_urls:
        text = get_text(url + "/metrics")
        q += metric_sum(text, QUERIES)
        h += metric_sum(text, HITS)
    return q, h


def wait_router_idle(router_url: str, within_s: float = 5.0) -> bool:
    """Until the router's last scrape shows no request running or waiting anywhere."""
    deadline = time.monotonic() + within_s
    while True:
        status, body, _ = http_json("GET", router_url + "/admin/engines", timeout=5)
        if status == 200 and all(
            e["load"]["stale"] or (e["load"]["running"] == 0 and e["load"]["waiting"] == 0)
            for e in body["engines"]
        ):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def run(router_url: str, engine_urls: Sequence[str], seed: int, spec: Spec,
        label: str = "") -> Result:
    rng = random.Random(seed)
    system = f"[{label or seed}] You are a helpful assistant. " + sentences(rng,
                                                                           spec.system_words)
    histories: list[list[dict[str, str]]] = [[] for _ in range(spec.users)]
    res = Result(label=label, spec=asdict(spec))
    q0, h0 = counters(engine_urls)
    t0 = time.monotonic()

    def turn(user: int) -> tuple[int, str, str, int]:
        if spec.wait_idle and spec.concurrency == 1:
            wait_router_idle(router_url)
        text_rng = random.Random(seed * 1000 + user * 10 + len(histories[user]))
        context = (sentences(text_rng, spec.context_words) + " "
                   if spec.context_words and not histories[user] else "")
        message = {"role": "user", "content": f"User {user} of {seed}: " + context
                   + sentences(text_rng, spec.user_words)}
        body = {"model": MODEL, "max_tokens": spec.max_tokens, "temperature": 0,
                "ignore_eos": True,
                "messages": [{"role": "system", "content": system}, *histories[user], message]}
        if spec.session_ids:
            body["user"] = f"{label or seed}-user-{user}"
        extra = {"X-Session-ID": f"{seed}-user-{user}"} if spec.session_header else None
        status, out, headers = http_json("POST", router_url + "/v1/chat/completions", body,
                                         timeout=120, headers=extra)
        assert status == 200, (status, out)
        reply = out["choices"][0]["message"]["content"] or ""
        histories[user] += [message, {"role": "assistant", "content": reply}]
        return (out["usage"]["prompt_tokens"], headers.get("x-deepinfer-engine", "?"),
                headers.get("x-deepinfer-route", "?"), user)

    seq: list[list[str]] = [[] for _ in range(spec.users)]
    if spec.shuffle:  # one batch of every turn, shuffled (run one at a time)
        order = [u for u in range(spec.users) for _ in range(spec.rounds)]
        rng.shuffle(order)
        batches = [order]
    else:
        batches = [list(range(spec.users)) for _ in range(spec.rounds)]
    with ThreadPoolExecutor(max_workers=spec.concurrency) as pool:
        for batch in batches:
            tokens = []
            for prompt_tokens, engine, route, user in pool.map(turn, batch):
                seq[user].append(engine)
                res.requests += 1
                res.prompt_tokens += prompt_tokens
                tokens.append(prompt_tokens)
                res.per_engine[engine] = res.per_engine.get(engine, 0) + 1
                res.routes[route] = res.routes.get(route, 0) + 1
            res.prompt_tokens_by_round.append(tokens)
    res.seconds = round(time.monotonic() - t0, 2)
    names = {e: str(i) for i, e in enumerate(sorted({e for s in seq for e in s}))}
    res.engines_by_user = ["".join(names[e] for e in s) for s in seq]
    # The counters are updated as the engine schedules; wait until they cover every prompt.
    deadline = time.monotonic() + 15
    while True:
        q1, h1 = counters(engine_urls)
        if q1 - q0 >= res.prompt_tokens or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    res.queries, res.hits = q1 - q0, h1 - h0
    res.hit_rate = round(res.hits / res.queries, 4) if res.queries else 0.0
    return res
