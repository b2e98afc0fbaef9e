"""Scorers shared by the policies. Each is a plain function of one candidate, so a new
routing idea is a new function here (and a weight in the policy's parameters)."""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from .base import Candidate

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True, slots=True)
class LoadWeights:
    """How the signals of one engine add up to its queueing cost, in requests."""

    running: float = 0.5  # per engine-reported running request not in flight from here
    kv_usage: float = 1.0  # added at 100% KV usage (preemption and eviction pressure)


def load_cost(cand: Candidate, w: LoadWeights) -> float:
    """Queueing cost of sending one more request to `cand`, in request units:
    in flight from this router + waiting at the engine (both as counted by the guard)
    + running there on behalf of other routers (weighted) + KV pressure (weighted)."""
    cost = cand.inflight + cand.waiting
    extra_running = cand.running - cand.inflight
    if extra_running > 0:
        cost += w.running * extra_running
    return cost + w.kv_usage * cand.kv_usage


def engine_seed(engine_id: str) -> int:
    return xxhash.xxh64_intdigest(engine_id.encode("utf-8", "surrogatepass"))


def rendezvous(key: int, seed: int) -> int:
    """Highest-random-weight hashing: every router ranks engines the same way for a key,
    so concurrent first requests of one prefix agree without talking to each other."""
    x = ((key ^ seed) * _GOLDEN) & _MASK64
    x ^= x >> 29
    x = (x * _GOLDEN) & _MASK64
    return x ^ (x >> 32)
