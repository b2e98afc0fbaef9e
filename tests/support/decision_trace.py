"""A recorded decision trace: requests, fleet states and times, and the picks each policy
made from them. Replaying it through the policies must give the same picks, so that a
reshape of the code around the routing core ("behaviour unchanged") can be checked
decision by decision (tests/unit/test_decision_trace.py).

The trace is synthetic but shaped like real traffic (shared system prompts, multi-turn
chats with and without a session key, one-off prompts, token-id prompts), over a fleet of
four engines whose loads and scraped metrics change as requests start, prefill and end,
with an engine restart (new instance) and one leaving and coming back. Each policy gets
its own trace (the fleet's state depends on where that policy sent earlier requests); a
replay feeds the recorded inputs, never recomputed ones.

    python -m tests.support.decision_trace --record   # rewrite tests/data/decision_trace.json.gz

Record only when a behaviour change is intended, and say so in the commit.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deepinfer_router.routing.base import Candidate, RequestFeatures, RoutingPolicy
from deepinfer_router.routing.factory import make_policy
from deepinfer_router.routing.features import session_key
from deepinfer_router.settings import RouterSettings

TRACE_PATH = Path(__file__).resolve().parents[1] / "data" / "decision_trace.json.gz"
POLICIES = ("kv-aware", "session", "least-conn", "round-robin")
MODEL = "m"
SEED = 20261202
REQUESTS = 500
# Small enough that the prefix estimates fill up and evict within the trace.
SETTINGS = {"prefix_chunk_chars": 64, "default_engine_kv_tokens": 3000}


def settings_for(policy: str) -> RouterSettings:
    return RouterSettings(policy=policy, **SETTINGS)  # type: ignore[arg-type]


def features_of(policy: RoutingPolicy, body: dict[str, Any],
                header: str | None) -> RequestFeatures:
    """As the proxy computes them."""
    key = session_key(header, body)
    if not policy.needs_prompt:
        return RequestFeatures(model=MODEL, session_key=key)
    return policy.prompt_features(body, MODEL, key)


# --- the synthetic traffic -----------------------------------------------------------------
def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "kv", "cache", "route",
                                "engine", "token", "prefix", "chat", "agent"))
                    for _ in range(n))


def _bodies(rng: random.Random) -> Iterator[tuple[dict[str, Any], str | None]]:
    """(request body, session header) for REQUESTS requests."""
    systems = [f"System prompt {i}: " + _words(rng, 120) for i in range(4)]
    chats: list[dict[str, Any]] = []  # open conversations: messages so far, session key
    for i in range(REQUESTS):
        kind = rng.random()
        if kind < 0.45 or not chats:  # a new or continued multi-turn chat
            if not chats or rng.random() < 0.25:
                chats.append({"messages": [{"role": "system", "content": rng.choice(systems)}],
                              "session": f"s{i}" if rng.random() < 0.6 else None})
                chats = chats[-12:]
            chat = rng.choice(chats)
            if len(chat["messages"]) > 16:  # 8 turns: the conversation ends
                chats.remove(chat)
                chat = {"messages": [{"role": "system", "content": rng.choice(systems)}],
                        "session": f"s{i}" if rng.random() < 0.6 else None}
                chats.append(chat)
            chat["messages"].append({"role": "user", "content": _words(rng, rng.randint(5, 40))})
            body = {"model": MODEL, "messages": list(chat["messages"]), "max_tokens": 16}
            chat["messages"].append({"role": "assistant", "content": _words(rng, 20)})
            yield body, chat["session"]
        elif kind < 0.75:  # a shared system prompt, a one-off question
            body = {"model": MODEL, "messages": [
                {"role": "system", "content": rng.choice(systems)},
                {"role": "user", "content": _words(rng, rng.randint(3, 30))}]}
            yield body, None
        elif kind < 0.9:  # a one-off prompt nobody shares
            yield {"model": MODEL, "prompt": f"{i} " + _words(rng, rng.randint(10, 200))}, None
        else:  # token ids, with a body `user` as the session key
            ids = [rng.randint(0, 32000) for _ in range(rng.randint(10, 300))]
            yield {"model": MODEL, "prompt": ids, "user": f"u{i % 7}"}, None


class _Fleet:
    """Four engines as the router would see them: in-flight counts from our own
    requests, scraped load that lags and includes other routers' requests."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.engines = {f"e{i}": {"instance": "1", "capacity": (40_000 if i == 3 else 80_000),
                                  "inflight": 0, "others": 0.0, "kv": 0.0, "up": True}
                        for i in range(4)}

    def candidates(self) -> list[Candidate]:
        out = []
        for eid, e in self.engines.items():
            if not e["up"]:
                continue
            out.append(Candidate(
                id=eid, instance=e["instance"], inflight=e["inflight"],
                waiting=max(0.0, e["inflight"] + e["others"] - 6),
                running=min(6.0, e["inflight"] + e["others"]), kv_usage=e["kv"],
                kv_capacity_chars=e["capacity"]))
        return out

    def drift(self) -> None:
        for e in self.engines.values():
            e["others"] = max(0.0, e["others"] + self.rng.choice((-1, 0, 0, 1)))
            e["kv"] = min(1.0, max(0.0, e["kv"] + self.rng.uniform(-0.05, 0.06)))


def record_policy(policy_name: str) -> list[dict[str, Any]]:
    """Run the synthetic traffic through a fresh policy; the events with its picks."""
    rng = random.Random(SEED)
    settings = settings_for(policy_name)
    policy = make_policy(settings)
    fleet = _Fleet(random.Random(SEED + 1))
    events: list[dict[str, Any]] = []
    open_requests: list[tuple[int, RequestFeatures, str, float, bool]] = []  # + streamed
    now = 1000.0
    for i, (body, header) in enumerate(_bodies(rng)):
        now += rng.expovariate(8.0)
        # Requests end (some prefill first, as streams do) before the next arrives.
        still = []
        for k, feats, eid, ends_at, streamed in open_requests:
            if ends_at <= now:
                if streamed:
                    events.append({"op": "first_token", "t": ends_at - 0.05, "ref": k,
                                   "engine": eid})
                    policy.on_first_token(feats, eid, ends_at - 0.05)
                ok = rng.random() > 0.03
                events.append({"op": "complete", "t": ends_at, "ref": k, "engine": eid,
                               "ok": ok})
                policy.on_complete(feats, eid, ok, ends_at)
                if eid in fleet.engines:
                    fleet.engines[eid]["inflight"] -= 1
            else:
                still.append((k, feats, eid, ends_at, streamed))
        open_requests = still
        if i in (150, 320):  # e1 restarts: a new instance, its cache empty
            fleet.engines["e1"]["instance"] = str(i)
            events.append({"op": "forget", "engine": "e1"})
            policy.forget_engine("e1")
        if i == 230:  # e2 leaves ...
            fleet.engines["e2"]["up"] = False
            events.append({"op": "forget", "engine": "e2"})
            policy.forget_engine("e2")
        if i == 280:  # ... and comes back as a new instance
            fleet.engines["e2"].update(up=True, instance="back")
        fleet.drift()
        cands = fleet.candidates()
        feats = features_of(policy, body, header)
        decision = policy.select(feats, cands, now)
        policy.on_routed(feats, decision, now)
        events.append({"op": "select", "t": now, "i": i, "body": body, "session": header,
                       "candidates": [asdict(c) for c in cands],
                       "expect": [decision.engine_id, decision.reason, decision.matched_chars]})
        fleet.engines[decision.engine_id]["inflight"] += 1
        open_requests.append((i, feats, decision.engine_id, now + rng.uniform(0.1, 2.0),
                              rng.random() < 0.5))
    return events


def replay(policy_name: str, events: list[dict[str, Any]]) -> list[list[Any]]:
    """Feed the recorded inputs to a fresh policy; its picks, one per select."""
    settings = settings_for(policy_name)
    policy = make_policy(settings)
    features_by: dict[int, RequestFeatures] = {}
    picks: list[list[Any]] = []
    for ev in events:
        op = ev["op"]
        if op == "select":
            feats = features_of(policy, ev["body"], ev["session"])
            features_by[ev["i"]] = feats
            cands = [Candidate(**c) for c in ev["candidates"]]
            decision = policy.select(feats, cands, ev["t"])
            policy.on_routed(feats, decision, ev["t"])
            picks.append([decision.engine_id, decision.reason, decision.matched_chars])
        elif op == "first_token":
            policy.on_first_token(features_by[ev["ref"]], ev["engine"], ev["t"])
        elif op == "complete":
            policy.on_complete(features_by[ev["ref"]], ev["engine"], ev["ok"], ev["t"])
        elif op == "forget":
            policy.forget_engine(ev["engine"])
    return picks


def load() -> dict[str, list[dict[str, Any]]]:
    with gzip.open(TRACE_PATH, "rt") as fh:
        return json.load(fh)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="rewrite the trace file")
    args = parser.parse_args()
    if not args.record:
        parser.error("nothing to do without --record")
    traces = {p: record_policy(p) for p in POLICIES}
    TRACE_PATH.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(TRACE_PATH, "wt", compresslevel=9) as fh:
        json.dump(traces, fh, separators=(",", ":"))
    for p, evs in traces.items():
        picks = [e["expect"] for e in evs if e["op"] == "select"]
        reasons: dict[str, int] = {}
        for _, reason, _ in picks:
            reasons[reason] = reasons.get(reason, 0) + 1
        print(f"{p}: {len(picks)} decisions, reasons {reasons}")
    print(f"wrote {TRACE_PATH} ({TRACE_PATH.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
