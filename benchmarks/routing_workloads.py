"""The workloads of benchmarks/routing.py: seeded sessions of chat turns.

Every workload is a list of sessions. A session arrives at a model time, sends its turns
one after another (each turn waits for the previous answer, then a think time) and
carries a session id (sent as `X-Session-ID` when the run is "with session header").
A turn either continues the conversation (the previous answer and a new user message are
appended, so the next prompt extends the last one) or is a fresh prompt (`fresh`: a
new question over the same document, as a reader asks independent questions).

Each request is marked `warm` when a request before it (in the workload's own order)
carried the reusable prefix it needs (its session's previous turn, or its shared
document/preamble): every policy pays the first request of a prefix, so TTFT over warm
requests shows what routing changes.

Load levels (the same sessions, different pacing):
  closed  one client, one request at a time (the next leaves when the answer arrived),
          sessions' turns interleaved in a seeded shuffled order; the first
          `closed_sessions` sessions only, `max_tokens` capped at CLOSED_MAX_TOKENS;
  low     open loop at `rate x low_factor` (engines ~30% busy under least-conn);
  high    open loop at `rate` (engines 60-80% busy under least-conn).

Tuning workloads (1-7) are what parameters may be tuned on, all together. The held-back
workloads (H1, H2) differ from all of them in a named dimension, have frozen seeds
(HELD_BACK_SEEDS, independent of --seed) and are never tuned on; they are reported in
their own table.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MODEL = "sim-model"
CLOSED_MAX_TOKENS = 24  # closed loop: TTFT is what is measured, decode only costs time
LEVELS = ("closed", "low", "high")
HELD_BACK_SEEDS = (7301, 7302, 7303)  # frozen before any policy change; never tuned on
LOW_LONGER = 1.5  # the low level's duration against the high level's


class Text:
    """Seeded random words of 1-5 letters: each ' word' is exactly one simulator token
    (~4 characters, the router's default chars-per-token)."""

    def __init__(self, seed: int, words: Sequence[str] | None = None) -> None:
        rng = random.Random(seed)
        if words:
            # A real tokenizer's own one-token words (" word" pieces of its vocabulary):
            # one word is one token for it, as for the simulator's stand-in tokenizer,
            # with the stand-in's length mix (1-5 letters, uniform): ~4 characters a
            # token, the router's default --chars-per-token, so the approximate index's
            # capacity model is as right (or wrong) as with the stand-in.
            by_len = {n: sorted(w for w in words if len(w.strip()) == n) for n in range(1, 6)}
            lengths = [n for n, ws in by_len.items() if ws]
            self.vocab = [rng.choice(by_len[rng.choice(lengths)]) for _ in range(20_000)]
            return
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.vocab = [
            " " + "".join(rng.choice(letters) for _ in range(rng.randint(1, 5)))
            for _ in range(20_000)
        ]

    def words(self, rng: random.Random, n: int) -> str:
        return "".join(rng.choices(self.vocab, k=n))


@dataclass(slots=True)
class Turn:
    user: str  # the user message of this turn
    think_s: float = 0.0  # model seconds after the answer before the next turn
    warm: bool = False


@dataclass(slots=True)
class Session:
    id: str
    at: float  # model seconds after the start
    prefix: list[dict[str, str]]  # messages before the first user turn (system, document)
    turns: list[Turn]
    max_tokens: int
    kind: str
    fresh: bool = False  # True: each turn is prefix + its question alone (no history)


@dataclass(slots=True)
class Plan:
    sessions: list[Session]
    kv_blocks: list[int]  # one entry per engine
    closed_order: list[tuple[int, int]] = field(default_factory=list)  # (session, turn)


# --- the workloads ------------------------------------------------------------------------
# Rates are per model second (sessions per second unless noted) and were calibrated with
# `--calibrate` so that least-conn keeps the engines 60-80% busy at "high".
TUNING: dict[str, dict[str, Any]] = {
    "1": {
        "name": "chat", "title": "1 multi-round chat",
        "rate": 0.7, "duration_s": 100.0, "low_factor": 0.25, "closed_sessions": 12,
        "rounds": 10, "system_tokens": 1000, "user_tokens": (20, 150), "think_s": 3.0,
        "max_tokens": 200,
    },
    "2": {
        "name": "groups", "title": "2 shared-prefix groups",
        "rate": 13.5, "duration_s": 120.0, "low_factor": 0.4, "closed_sessions": 100,
        "groups": 8, "prefix_tokens": (3000, 5000), "question_tokens": (20, 80),
        "users": 16, "max_tokens": 32,
    },
    "3": {
        "name": "distinct", "title": "3 no sharing",
        "rate": 11.0, "duration_s": 120.0, "low_factor": 0.4, "closed_sessions": 80,
        "prompt_tokens": (500, 2500), "users": 16, "max_tokens": 48,
    },
    "4": {
        "name": "hot", "title": "4 one hot prefix (50%)",
        "rate": 15.0, "duration_s": 120.0, "low_factor": 0.4, "closed_sessions": 100,
        "hot_share": 0.5, "prefix_tokens": 4000, "question_tokens": (20, 80),
        "cold_tokens": (500, 2500), "users": 16, "max_tokens": 32,
    },
    "5": {
        # The shape kv-aware lost on: a short shared system prompt, a long context per
        # conversation; the fleet's cache holds about two thirds of the live contexts.
        "name": "convo", "title": "5 long-context chat",
        "rate": 2.1, "duration_s": 100.0, "low_factor": 0.4, "closed_sessions": 32,
        "system_tokens": 75, "context_tokens": (1500, 3500), "rounds": (3, 6),
        "user_tokens": (20, 60), "think_s": 4.0, "max_tokens": 48,
    },
    "6": {
        # Agents: a few shared tool preambles, each turn appends tool output; many more
        # sessions than engines, several in flight.
        "name": "agent", "title": "6 agent sessions",
        "rate": 1.5, "duration_s": 100.0, "low_factor": 0.4, "closed_sessions": 20,
        "preambles": 3, "preamble_tokens": (1200, 2000), "task_tokens": (50, 150),
        "tool_tokens": (100, 400), "rounds": (4, 8), "think_s": 0.5, "max_tokens": 48,
    },
    "7": {
        # Long documents: more than one engine's cache in all, each fits; readers ask
        # several independent short questions about one document.
        "name": "docqa", "title": "7 long-document Q&A",
        "rate": 2.2, "duration_s": 100.0, "low_factor": 0.4, "closed_sessions": 30,
        "documents": 12, "document_tokens": (4000, 6000), "question_tokens": (10, 40),
        "rounds": (2, 6), "think_s": 2.0, "max_tokens": 32,
    },
}

HELD_BACK: dict[str, dict[str, Any]] = {
    "H1": {
        # Named dimension: engines of different cache sizes (same total as the others).
        "name": "hetero", "title": "H1 unequal caches (chat)",
        "kv_blocks": [2048, 1024, 512, 512],
        "rate": 2.3, "duration_s": 100.0, "low_factor": 0.4, "closed_sessions": 24,
        "system_tokens": 500, "context_tokens": (800, 2000), "rounds": (3, 6),
        "user_tokens": (20, 80), "think_s": 3.0, "max_tokens": 48,
    },
    "H2": {
        # Named dimension: bursty arrivals (sessions come in bursts, silence between).
        "name": "bursty", "title": "H2 bursty agents",
        "rate": 5.0, "duration_s": 100.0, "low_factor": 0.4, "closed_sessions": 20,
        "burst": 8, "preambles": 2, "preamble_tokens": (1500, 2500), "task_tokens": (50, 150),
        "tool_tokens": (100, 300), "rounds": (3, 6), "think_s": 0.5, "max_tokens": 48,
    },
}

WORKLOADS: dict[str, dict[str, Any]] = {**TUNING, **HELD_BACK}


def arrivals(rng: random.Random, rate: float, duration: float, burst: int = 1) -> list[float]:
    """Poisson arrivals at `rate` per second; `burst` > 1: Poisson bursts of `burst`
    arrivals (within 0.2 s) at rate / burst, so the mean rate is the same."""
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate / burst)
        if t >= duration:
            return out
        out += sorted(t + rng.uniform(0.0, 0.2) for _ in range(burst))


def _think(rng: random.Random, mean: float) -> float:
    return rng.expovariate(1.0 / mean) if mean > 0 else 0.0


def build(wkey: str, level: str, seed: int, scale: float,
          words: Sequence[str] | None = None) -> Plan:
    """The sessions of workload `wkey` at load `level` (see the module docstring); `words`:
    the one-token words of the engines' tokenizer (default: the stand-in's)."""
    wl = WORKLOADS[wkey]
    rng = random.Random(seed)
    text = Text(seed + 1, words)
    rate = wl["rate"] * (wl["low_factor"] if level == "low" else 1.0)
    # The low level runs a little longer in model time, for samples (time budget).
    duration = wl["duration_s"] * scale * (LOW_LONGER if level == "low" else 1.0)
    times = arrivals(rng, rate, duration, wl.get("burst", 1))
    if level == "closed":
        times = [0.0] * min(len(times), wl["closed_sessions"])
    sessions = _SESSIONS[wl["name"]](wl, rng, text, times)
    for s in sessions:
        if level == "closed":
            s.max_tokens = min(s.max_tokens, CLOSED_MAX_TOKENS)
    _mark_warm(sessions)
    plan = Plan(sessions, list(wl.get("kv_blocks") or []))
    if level == "closed":
        plan.closed_order = _interleave(rng, sessions)
    return plan


def _interleave(rng: random.Random, sessions: list[Session]) -> list[tuple[int, int]]:
    """A seeded shuffled order of every (session, turn), each session's turns in order."""
    slots = [i for i, s in enumerate(sessions) for _ in s.turns]
    rng.shuffle(slots)
    nxt = [0] * len(sessions)
    out: list[tuple[int, int]] = []
    for i in slots:
        out.append((i, nxt[i]))
        nxt[i] += 1
    return out


def _mark_warm(sessions: list[Session]) -> None:
    """Warm: any later turn of a session, or a first turn whose shared prefix (the last
    prefix message: system prompt, document, preamble of >= 1,000 characters and at
    least half of the prompt) appeared in an earlier session."""
    seen: set[str] = set()
    for s in sorted(sessions, key=lambda s: s.at):
        shared = s.prefix[-1]["content"] if s.prefix else ""
        first = len(shared) + len(s.turns[0].user) if s.turns else 0
        # the shared part must be most of the first prompt for it to be warm
        shared_seen = len(shared) >= 1000 and 2 * len(shared) >= first and shared in seen
        for k, turn in enumerate(s.turns):
            turn.warm = k > 0 or shared_seen
        if shared:
            seen.add(shared)


def _chat(wl: dict[str, Any], rng: random.Random, text: Text, times: list[float]) -> list[Session]:
    system = "You are a helpful assistant." + text.words(rng, wl["system_tokens"])
    out = []
    for n, at in enumerate(times):
        turns = [Turn(f"User {n} turn {r}:" + text.words(rng, rng.randint(*wl["user_tokens"])),
                      _think(rng, wl["think_s"])) for r in range(wl["rounds"])]
        out.append(Session(f"chat-{n}", at, [{"role": "system", "content": system}], turns,
                           wl["max_tokens"], "chat"))
    return out


def _one_shot(wl: dict[str, Any], rng: random.Random, text: Text,
              times: list[float]) -> list[Session]:
    """Independent requests (workloads 2-4); the session id is one of `users` clients,
    so a session header binds a client, not a document."""
    name = wl["name"]
    prefixes: list[str] = []
    if name == "groups":
        lo, hi = wl["prefix_tokens"]
        prefixes = [f"Document {g}:" + text.words(rng, rng.randint(lo, hi))
                    for g in range(wl["groups"])]
    elif name == "hot":
        prefixes = ["Hot document:" + text.words(rng, wl["prefix_tokens"])]
    out = []
    for i, at in enumerate(times):
        user = f"user-{rng.randrange(wl['users'])}"
        if name == "groups" or (name == "hot" and rng.random() < wl["hot_share"]):
            g = rng.randrange(len(prefixes))
            q = text.words(rng, rng.randint(*wl["question_tokens"]))
            prefix = [{"role": "system", "content": prefixes[g]}]
            turn = Turn(f"Question {i}:{q}")
            kind = "shared"
        else:
            lo, hi = wl["cold_tokens"] if name == "hot" else wl["prompt_tokens"]
            prefix = []
            turn = Turn(f"Request {i}:" + text.words(rng, rng.randint(lo, hi)))
            kind = "distinct"
        out.append(Session(user, at, prefix, [turn], wl["max_tokens"], kind, fresh=True))
    return out


def _convo(wl: dict[str, Any], rng: random.Random, text: Text,
           times: list[float]) -> list[Session]:
    system = "You are a careful assistant." + text.words(rng, wl["system_tokens"])
    out = []
    for n, at in enumerate(times):
        context = f"Conversation {n} notes:" + text.words(rng, rng.randint(*wl["context_tokens"]))
        rounds = rng.randint(*wl["rounds"])
        turns = [Turn((context if r == 0 else "") + f" Question {r}:"
                      + text.words(rng, rng.randint(*wl["user_tokens"])),
                      _think(rng, wl["think_s"])) for r in range(rounds)]
        out.append(Session(f"convo-{n}", at, [{"role": "system", "content": system}], turns,
                           wl["max_tokens"], "convo"))
    return out


def _agent(wl: dict[str, Any], rng: random.Random, text: Text,
           times: list[float]) -> list[Session]:
    lo, hi = wl["preamble_tokens"]
    preambles = [f"Tools set {p}:" + text.words(rng, rng.randint(lo, hi))
                 for p in range(wl["preambles"])]
    out = []
    for n, at in enumerate(times):
        p = rng.randrange(len(preambles))
        rounds = rng.randint(*wl["rounds"])
        turns = [Turn(f"Task {n}:" + text.words(rng, rng.randint(*wl["task_tokens"])),
                      _think(rng, wl["think_s"]))]
        turns += [Turn(f"Tool output {n}.{r}:" + text.words(rng, rng.randint(*wl["tool_tokens"])),
                       _think(rng, wl["think_s"])) for r in range(1, rounds)]
        out.append(Session(f"agent-{n}", at, [{"role": "system", "content": preambles[p]}],
                           turns, wl["max_tokens"], f"preamble{p}"))
    return out


def _docqa(wl: dict[str, Any], rng: random.Random, text: Text,
           times: list[float]) -> list[Session]:
    lo, hi = wl["document_tokens"]
    docs = [f"Document {d}:" + text.words(rng, rng.randint(lo, hi))
            for d in range(wl["documents"])]
    out = []
    for n, at in enumerate(times):
        d = rng.randrange(len(docs))
        rounds = rng.randint(*wl["rounds"])
        turns = [Turn(f"Reader {n} question {r}:"
                      + text.words(rng, rng.randint(*wl["question_tokens"])),
                      _think(rng, wl["think_s"])) for r in range(rounds)]
        out.append(Session(f"reader-{n}", at, [{"role": "system", "content": docs[d]}], turns,
                           wl["max_tokens"], f"doc{d}", fresh=True))
    return out


_SESSIONS = {
    "chat": _chat, "groups": _one_shot, "distinct": _one_shot, "hot": _one_shot,
    "convo": _convo, "agent": _agent, "docqa": _docqa,
    "hetero": _convo, "bursty": _agent,
}
