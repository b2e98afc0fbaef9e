"""kv-aware: send each request where its prompt prefix most likely still sits in KV
cache, keep conversations on one engine, and never let affinity pile load onto one
engine. The default policy; routing/README.md has the full description.

One decision, O(candidates + matched chunks):
  1. filter   bounded-load guard (guard.py): which engines may take one more request;
  2. session  the shared session step (sessions.SessionAffinity): a live binding whose
              engine passes the guard and holds part of the prompt, at least as much as
              any other engine, wins (`session`), as it does for a prompt too short to
              hash; over its bound it moves (`spill`) and is rebound; otherwise the
              prompt is scored as below;
  3. score    score = matched prefix chars - load_cost_chars * load cost - cache
              pressure over all candidates; load cost = request load (scoring.py) +
              uncached prompt chars the engine has yet to prefill / prefill_load_chars
              (see _Engine); cache pressure = the live prefixes the uncached part of
              the prompt would evict there (they are prefilled again on their next
              use) + home_chars x the share of its cache in use (homes spread over all
              caches); the best one passing the guard takes it (`prefix`, or `balance`
              when a match existed but an unmatched engine won);
              when the best is over its bound the request goes to the best passing one
              (`spill`), which becomes a second home for that prefix;
  4. place    nobody holds any of the prompt: least load cost + cache pressure among
              passing engines, ties (within `placement_window` load) broken by
              rendezvous hashing of the first chunk (`new-prefix`); no complete chunk
              at all: least loaded (`least-conn`).
`on_routed` records the prompt's chain on the chosen engine, binds the session and adds
the request's expected uncached prompt chars (prompt_chars - matched_chars) to the
engine's pending prefill work; `on_first_token` (prefill done) or else `on_complete`
subtracts exactly that amount again.

The bounded-load guard is not a filter of who may take the request (the fleet decides
that: `Fleet.candidates_with_room`); it bounds where affinity may pull load, and over it
the request spills. One file over 300 lines on purpose: the steps above share one view
of each engine (`_Engine`: pending prefill, cache pressure) per decision; the pieces
that stand alone (guard, scoring, prefix index, session affinity) have their own files.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import reasons
from .base import Candidate, Decision, EngineLookup, PolicyBase, RequestFeatures, Weighed
from .features import MAX_SESSION_KEY, request_features
from .guard import BoundedLoad
from .hint_outbox import take_oldest
from .prefix_index import PrefixIndex
from .scoring import LoadWeights, engine_seed, load_cost, rendezvous
from .session_affinity import SessionAffinity, SessionTable

if TYPE_CHECKING:
    from ..settings import RouterSettings

_REUSE_EWMA = 0.05  # weight of one observed reuse distance in the running mean
MAX_HINT_CHUNKS = 4096  # chain hashes applied per imported hint (1 MiB of prompt at 256)
# Prefix-index entries per engine, at most (~150 B each: 40 MiB). 64 Mi prompt chars at
# 256-char chunks, 16M tokens: more KV cache than any single engine has today.
MAX_ENGINE_CHUNKS = 1 << 18


def _with_precise(
    matched: Mapping[str, int], candidates: Sequence[Candidate], chunk: int
) -> dict[str, int]:
    """The estimate (chunks each engine holds), corrected by what engines with a live
    KV event feed really hold: their own figure replaces the estimate, a zero included
    (an engine that evicted the prefix holds none of it, whatever was sent there). The
    other engines' estimates are scaled by their learnt over-estimate, for one scale."""
    out = dict(matched)
    for cand in candidates:
        if cand.precise_cached_chars is None:
            held = out.get(cand.id)
            if held and cand.estimate_factor != 1.0:
                scaled = int(held * cand.estimate_factor)
                if scaled > 0:
                    out[cand.id] = scaled
                else:
                    del out[cand.id]
        else:
            chunks = cand.precise_cached_chars // chunk
            if chunks > 0:
                out[cand.id] = chunks
            else:
                out.pop(cand.id, None)
    return out


@dataclass(frozen=True, slots=True)
class KvAwareParams:
    chunk_chars: int = 256  # chunk size of the prompt hashes (prompt_features uses it)
    max_chars: int = 65536  # prompt characters hashed per request (0: no cap)
    balance_factor: float = 1.25  # c of the bounded-load guard
    balance_slack: int = 0  # extra requests allowed over the guard's bound
    load_cost_chars: float = 4096.0  # matched prefix chars worth one request of load
    running_weight: float = 0.5
    kv_usage_weight: float = 1.0
    placement_window: float = 0.5  # load units within which first placements hash
    session_ttl_s: float = 1800.0
    max_sessions: int = 200_000
    default_capacity_chars: int = 400_000  # when a candidate reports no capacity
    hint_outbox: int = 0  # placements kept for export_hints (0: off)
    prefill_load_chars: float = 4096.0  # uncached chars not yet prefilled = 1 request (0: off)
    eviction_weight: float = 1.0  # future prefill chars per live cached char evicted (0: off)
    home_chars: float = 2048.0  # score cost of a full cache against an empty one (0: off)
    live_horizon: float = 4.0  # live: touched within this many mean reuse distances


class _Engine:
    """What the policy tracks per engine. `pending` is the sum of the expected uncached
    prompt chars of the requests routed to it that have neither streamed a first token nor
    completed; `inflight` maps id(features) -> (features, amount still pending) for every
    request routed to it and not yet complete (the features object is held so its id
    cannot be reused while the entry lives), so `on_first_token` and `on_complete`
    release exactly what `on_routed` added. Memory: one entry per in-flight request."""

    __slots__ = ("capacity", "inflight", "instance", "pending", "seed")

    def __init__(self, instance: str, capacity: int, seed: int) -> None:
        self.instance = instance
        self.capacity = capacity
        self.seed = seed
        self.pending = 0
        self.inflight: dict[int, tuple[RequestFeatures, int]] = {}


class KvAwarePolicy(PolicyBase):
    name = "kv-aware"
    needs_prompt = True

    @classmethod
    def from_settings(cls, settings: RouterSettings, *, hint_outbox: int = 0) -> KvAwarePolicy:
        return cls(KvAwareParams(
            chunk_chars=settings.prefix_chunk_chars,
            max_chars=settings.prefix_max_chars,
            balance_factor=settings.balance_factor,
            balance_slack=settings.balance_slack,
            load_cost_chars=settings.load_cost_chars,
            running_weight=settings.running_load_weight,
            kv_usage_weight=settings.kv_usage_load_weight,
            placement_window=settings.placement_window,
            prefill_load_chars=settings.prefill_load_chars,
            session_ttl_s=settings.session_ttl_s,
            max_sessions=settings.max_sessions,
            default_capacity_chars=int(
                settings.default_engine_kv_tokens * settings.chars_per_token
            ),
            hint_outbox=hint_outbox,
        ))

    def prompt_features(
        self, body: Mapping[str, Any], model: str, session_key: str | None
    ) -> RequestFeatures:
        p = self.params
        return request_features(body, model, session_key, with_prompt=True,
                                chunk_chars=p.chunk_chars, max_chars=p.max_chars)

    def __init__(self, params: KvAwareParams | None = None) -> None:
        p = params or KvAwareParams()
        if p.chunk_chars <= 0:
            raise ValueError("chunk_chars must be positive")
        self.params = p
        if p.prefill_load_chars < 0:
            raise ValueError("prefill_load_chars must be >= 0")
        self._weights = LoadWeights(running=p.running_weight, kv_usage=p.kv_usage_weight)
        self._prefill_scale = 1.0 / p.prefill_load_chars if p.prefill_load_chars > 0 else 0.0
        self._index = PrefixIndex()
        self._affinity = SessionAffinity(p.session_ttl_s, p.max_sessions)
        self._engines: dict[str, _Engine] = {}
        self._tie = 0
        # Mean reuse distance: how many requests (as the index counts them) pass between
        # two uses of a cached prefix, from the matches of routed requests. None until
        # one is seen (then every cached chunk counts as live).
        self._reuse: float | None = None
        # With `explaining` (the router keeps a decision log), each decision carries what
        # it weighed per candidate: filled as a by-product of scoring, so explaining
        # costs a dict entry per candidate weighed, not a second pass.
        self.explaining = False
        self._weighed: dict[str, Weighed] | None = None
        self._bound_id: str | None = None
        self._outbox: deque[dict[str, Any]] | None = (
            deque(maxlen=p.hint_outbox) if p.hint_outbox > 0 else None
        )

    # --- read-only views (tests, /admin, benchmarks) ------------------------------------
    @property
    def index(self) -> PrefixIndex:
        return self._index

    @property
    def sessions(self) -> SessionTable:
        return self._affinity.table

    def engine_ids(self) -> list[str]:
        """Engines the policy keeps state for."""
        return sorted(self._engines)

    def state_sizes(self) -> dict[str, int]:
        return {
            "sessions": len(self._affinity.table),
            "prefix_chunks": len(self._index),
            "requests": sum(len(e.inflight) for e in self._engines.values()),
            "hint_outbox": len(self._outbox) if self._outbox is not None else 0,
        }

    def request_state(self) -> dict[str, tuple[int, int]]:
        """Per engine: (requests routed and not complete, their pending prefill chars):
        what on_routed adds and on_first_token/on_complete take back."""
        return {eid: (len(e.inflight), e.pending) for eid, e in self._engines.items()}

    @property
    def mean_reuse_distance(self) -> float | None:
        return self._reuse

    def pending_chars(self, engine_id: str) -> int:
        """Expected uncached prompt chars `engine_id` has yet to prefill (0 when unknown)."""
        eng = self._engines.get(engine_id)
        return eng.pending if eng is not None else 0

    # --- the decision -------------------------------------------------------------------
    def _cost(self, cand: Candidate, matched_chars: int = 0) -> float:
        """Load cost in request units: the request load (scoring.load_cost) plus the
        uncached prompt chars the engine has yet to prefill / prefill_load_chars. Pending work
        up to `matched_chars` is not counted: an engine that is still prefilling the
        prefix this request matches is computing this request's cache hit, and waiting
        for it costs no more than recomputing the prefix elsewhere."""
        cost = load_cost(cand, self._weights)
        scale = self._prefill_scale
        if scale:
            eng = self._engines.get(cand.id)
            if eng is not None and eng.pending > matched_chars:
                cost += (eng.pending - matched_chars) * scale
        return cost

    def select(
        self, request: RequestFeatures, candidates: Sequence[Candidate], now: float
    ) -> Decision:
        self._sync(candidates)
        p = self.params
        chunk = p.chunk_chars
        guard = BoundedLoad(candidates, p.balance_factor, p.balance_slack)
        hashes = request.chunk_hashes
        matched = self._index.match(hashes) if hashes else {}
        if any(c.precise_cached_chars is not None for c in candidates):
            matched = _with_precise(matched, candidates, chunk)
        weighed: dict[str, Weighed] | None = {} if self.explaining else None
        self._weighed = weighed
        d = self._decide(request, candidates, now, matched, guard)
        self._weighed = None
        if weighed is None:
            return d
        # What it weighed travels with the decision, for its explanation (no copies).
        return Decision(d.engine_id, d.reason, d.matched_chars, held=matched,
                        chunk_chars=chunk, weighed=weighed, load_bound=guard.limit,
                        session_engine=self._bound_id)

    def _decide(
        self,
        request: RequestFeatures,
        candidates: Sequence[Candidate],
        now: float,
        matched: Mapping[str, int],
        guard: BoundedLoad,
    ) -> Decision:
        chunk = self.params.chunk_chars
        hashes = request.chunk_hashes
        bound = self._affinity.bound(request.session_key, candidates, now)
        self._bound_id = bound.id if bound is not None else None
        if bound is not None:
            got = matched.get(bound.id, 0)
            if not guard.allows(bound):
                best = self._best_score(request, candidates, matched, guard, bound)
                return Decision(best.id, reasons.SPILL, matched.get(best.id, 0) * chunk)
            # The binding keeps a conversation where the index says its prefix is (it
            # decides between engines holding as much, e.g. a shared system prompt) and
            # where the index cannot tell (a prompt shorter than a chunk). A binding
            # whose engine holds none of a hashed prompt carries no cache value: a
            # client's session key over unrelated prompts would only pile its requests
            # onto one engine, so such prompts are placed like any other.
            if (got and got >= max(matched.get(c.id, 0) for c in candidates)) or not hashes:
                return Decision(bound.id, reasons.SESSION, got * chunk)

        if matched and any(cand.id in matched for cand in candidates):
            return self._by_prefix(request, candidates, matched, guard)
        if hashes:
            return self._place_new(request, candidates, guard, hashes[0])
        return Decision(self._least_cost(candidates, guard).id, reasons.LEAST_CONN)

    def _pressure(self, engine_id: str, new_chars: int) -> float:
        """Cache pressure of sending `new_chars` uncached prompt chars to an engine, in
        prefill chars: the live cached chunks they would evict there (each is prefilled
        again when its conversation or prefix comes back), plus `home_chars` x the
        share of the engine's cache in use, so that homes spread over every cache while
        there is room. The LRU evicts its oldest chunk first: when that one is live
        (touched within `live_horizon` mean reuse distances) everything newer is, and
        each chunk the prompt pushes out past the capacity costs a chunk of prefill
        later; when it is stale, stale chunks go first and the eviction costs nothing.
        O(1)."""
        p = self.params
        held, capacity, tail_age = self._index.occupancy(engine_id)
        cost = p.home_chars * held / capacity
        if new_chars > 0 and p.eviction_weight and tail_age >= 0:
            chunk = p.chunk_chars
            new = min(capacity, -(-new_chars // chunk))
            over = held + new - capacity
            reuse = self._reuse
            if over > 0 and (reuse is None or tail_age <= p.live_horizon * reuse):
                cost += p.eviction_weight * min(over, new) * chunk
        return cost

    def _score(
        self, request: RequestFeatures, cand: Candidate, matched: Mapping[str, int]
    ) -> float:
        """Expected saved prefill (matched chars) against the queueing cost of load and
        the cache pressure, all in prefill chars."""
        got = matched.get(cand.id, 0) * self.params.chunk_chars
        cost = self._cost(cand, got)
        pressure = self._pressure(cand.id, request.prompt_chars - got)
        score = got - self.params.load_cost_chars * cost - pressure
        if self._weighed is not None:
            self._weighed[cand.id] = (cost, pressure, score)
        return score

    def _by_prefix(
        self,
        request: RequestFeatures,
        candidates: Sequence[Candidate],
        matched: Mapping[str, int],
        guard: BoundedLoad,
    ) -> Decision:
        chunk = self.params.chunk_chars
        n = len(candidates)
        self._tie += 1
        start = self._tie % n
        best_all: Candidate | None = None
        best_all_score = 0.0
        best_ok: Candidate | None = None
        best_ok_score = 0.0
        for k in range(n):
            cand = candidates[(start + k) % n]
            score = self._score(request, cand, matched)
            if best_all is None or score > best_all_score:
                best_all, best_all_score = cand, score
            if (best_ok is None or score > best_ok_score) and guard.allows(cand):
                best_ok, best_ok_score = cand, score
        assert best_all is not None
        if best_ok is None:  # nobody under the bound (fractional loads): least loaded
            best_ok = self._least_cost(candidates, guard)
        got = matched.get(best_ok.id, 0) * chunk
        if best_ok is not best_all and matched.get(best_all.id, 0) > 0:
            return Decision(best_ok.id, reasons.SPILL, got)
        return Decision(best_ok.id, reasons.PREFIX if got else reasons.BALANCE, got)

    def _best_score(
        self,
        request: RequestFeatures,
        candidates: Sequence[Candidate],
        matched: Mapping[str, int],
        guard: BoundedLoad,
        exclude: Candidate,
    ) -> Candidate:
        """Best score among engines under the bound (spill target)."""
        best: Candidate | None = None
        best_score = 0.0
        for cand in candidates:
            if cand is exclude or not guard.allows(cand):
                continue
            score = self._score(request, cand, matched)
            if best is None or score > best_score:
                best, best_score = cand, score
        return best if best is not None else self._least_cost(candidates, guard)

    def _place_new(
        self,
        request: RequestFeatures,
        candidates: Sequence[Candidate],
        guard: BoundedLoad,
        first_hash: int,
    ) -> Decision:
        scale = 1.0 / self.params.load_cost_chars if self.params.load_cost_chars else 0.0
        chars = request.prompt_chars
        costs = []
        weighed = self._weighed
        for c in candidates:
            cost, pressure = self._cost(c), self._pressure(c.id, chars)
            costs.append(cost + pressure * scale)
            if weighed is not None:
                weighed[c.id] = (cost, pressure, None)
        allowed = [guard.allows(c) for c in candidates]
        if not any(allowed):
            allowed = [True] * len(candidates)
        low = min(cost for cost, ok in zip(costs, allowed, strict=True) if ok)
        ceiling = low + self.params.placement_window
        engines = self._engines
        best: Candidate | None = None
        best_weight = -1
        for cand, cost, ok in zip(candidates, costs, allowed, strict=True):
            if ok and cost <= ceiling:
                weight = rendezvous(first_hash, engines[cand.id].seed)
                if weight > best_weight:
                    best, best_weight = cand, weight
        assert best is not None
        return Decision(best.id, reasons.NEW_PREFIX)

    def _least_cost(self, candidates: Sequence[Candidate], guard: BoundedLoad) -> Candidate:
        """Least load cost under the bound, ties rotating; everyone when nobody is."""
        n = len(candidates)
        self._tie += 1
        start = self._tie % n
        best: Candidate | None = None
        best_cost = 0.0
        fallback: Candidate | None = None
        fallback_cost = 0.0
        for k in range(n):
            cand = candidates[(start + k) % n]
            cost = self._cost(cand)
            if self._weighed is not None:
                self._weighed[cand.id] = (cost, None, None)
            if fallback is None or cost < fallback_cost:
                fallback, fallback_cost = cand, cost
            if (best is None or cost < best_cost) and guard.allows(cand):
                best, best_cost = cand, cost
        chosen = best if best is not None else fallback
        assert chosen is not None
        return chosen

    # --- engine bookkeeping ---------------------------------------------------------------
    def _capacity_chunks(self, capacity_chars: int) -> int:
        chars = capacity_chars if capacity_chars > 0 else self.params.default_capacity_chars
        # Clamped: a capacity comes from a registry record or an engine's metrics, either
        # of which anyone with Redis (or a rogue engine) can inflate.
        return max(1, min(chars // self.params.chunk_chars, MAX_ENGINE_CHUNKS))

    def _sync(self, candidates: Iterable[Candidate]) -> None:
        engines = self._engines
        for cand in candidates:
            eng = engines.get(cand.id)
            if eng is not None and eng.instance == cand.instance:
                if eng.capacity != cand.kv_capacity_chars:
                    eng.capacity = cand.kv_capacity_chars
                    self._index.sync(
                        cand.id, cand.instance, self._capacity_chunks(cand.kv_capacity_chars)
                    )
                continue
            self._add_engine(cand.id, cand.instance, cand.kv_capacity_chars)

    def _add_engine(self, engine_id: str, instance: str, capacity_chars: int) -> _Engine:
        if engine_id in self._engines:  # restarted: a new instance holds nothing
            self.forget_engine(engine_id)
        eng = _Engine(instance, capacity_chars, engine_seed(engine_id))
        self._engines[engine_id] = eng
        self._affinity.restarted(engine_id, instance)
        self._index.sync(engine_id, instance, self._capacity_chunks(capacity_chars))
        return eng

    # --- hooks ------------------------------------------------------------------------------
    def on_routed(self, request: RequestFeatures, decision: Decision, now: float) -> None:
        eng = self._engines.get(decision.engine_id)
        if eng is None:
            return
        if self._prefill_scale:
            key = id(request)
            old = eng.inflight.pop(key, None)
            if old is not None:  # routed again without on_complete: replace, not add
                eng.pending -= old[1]
            amount = max(0, request.prompt_chars - decision.matched_chars)
            eng.inflight[key] = (request, amount)
            eng.pending += amount
        hashes = request.chunk_hashes
        if hashes:
            matched = min(decision.matched_chars // self.params.chunk_chars, len(hashes))
            if matched:
                self._note_reuse(decision.engine_id, hashes[matched - 1])
            self._index.record(decision.engine_id, hashes)
        self._affinity.bind(request.session_key, decision.engine_id, now)
        if self._outbox is not None:
            self._outbox.append(
                {
                    "engine": decision.engine_id,
                    "instance": eng.instance,
                    "chunk_chars": self.params.chunk_chars,
                    "hashes": request.chunk_hashes,
                    "session": request.session_key,
                }
            )

    def _note_reuse(self, engine_id: str, chain_hash: int) -> None:
        """A request reuses `chain_hash` (its deepest matched chunk) on `engine_id`: how
        many requests ago it was last sent there feeds the mean reuse distance."""
        touched = self._index.touched(engine_id, chain_hash)
        if touched is None:
            return
        distance = float(self._index.clock + 1 - touched)  # record() ticks the clock
        reuse = self._reuse
        self._reuse = distance if reuse is None else reuse + _REUSE_EWMA * (distance - reuse)

    def on_first_token(self, request: RequestFeatures, engine_id: str, now: float) -> None:
        """The engine has prefilled `request`'s prompt: its uncached chars stop counting
        as pending work there (decode costs new requests little; the request itself still
        counts as one in flight until it completes)."""
        eng = self._engines.get(engine_id)
        if eng is None:
            return
        key = id(request)
        entry = eng.inflight.get(key)
        if entry is not None and entry[1]:
            eng.pending -= entry[1]
            eng.inflight[key] = (request, 0)

    def on_complete(self, request: RequestFeatures, engine_id: str, ok: bool, now: float) -> None:
        """Release what is left of the pending prefill chars `on_routed` added for
        `request` (nothing if the engine was forgotten or restarted in between)."""
        eng = self._engines.get(engine_id)
        if eng is None:
            return
        entry = eng.inflight.pop(id(request), None)
        if entry is not None:
            eng.pending -= entry[1]

    def forget_engine(self, engine_id: str) -> None:
        """The engine left, was ejected for good or restarted: its cache estimate and its
        pending prefill work are dropped and its session bindings are broken (lazily, by
        epoch)."""
        self._engines.pop(engine_id, None)
        self._index.forget(engine_id)
        self._affinity.forget(engine_id)

    def expected_cached_chars(self, request: RequestFeatures) -> int:
        hashes = request.chunk_hashes
        if not hashes:
            return 0
        matched = self._index.match(hashes)
        return max(matched.values(), default=0) * self.params.chunk_chars

    # --- multi-router sharing -----------------------------------------------------------------
    def export_hints(self, limit: int = 0) -> list[dict[str, Any]]:
        """Placements made since the last export (oldest first, at most `hint_outbox`
        kept): plain JSON-able dicts {engine, instance, chunk_chars, hashes, session} for
        other routers' `import_hints`. Empty unless `hint_outbox` > 0."""
        return take_oldest(self._outbox, limit)

    def import_hints(
        self, hints: Iterable[Mapping[str, Any]], now: float, lookup: EngineLookup
    ) -> int:
        """Apply other routers' placements as if routed here: record the chains and bind
        the sessions. Only hints for an engine the fleet has now (`lookup`), at the
        instance it has now and with this chunk size are applied: the stream replays
        hints about engines long gone, and anyone who can write to Redis can write one.
        Each is bounded (MAX_HINT_CHUNKS chunks, a session key of at most
        MAX_SESSION_KEY characters), so what a hint adds is bounded by the engine's
        capacity and --max-sessions, like what routing adds. Returns how many applied."""
        applied = 0
        for hint in hints:
            try:
                engine_id = hint["engine"]
                instance = hint["instance"]
                chunk_chars = hint.get("chunk_chars")
                hashes = hint.get("hashes") or []
                session = hint.get("session")
            except (KeyError, TypeError):
                continue
            if (
                not isinstance(engine_id, str)
                or chunk_chars != self.params.chunk_chars
                or not isinstance(hashes, list)
                or not (session is None or isinstance(session, str))
            ):
                continue
            known = lookup(engine_id)
            if known is None or known[0] != instance:
                continue
            hashes = hashes[:MAX_HINT_CHUNKS]
            if not all(type(h) is int for h in hashes):
                continue
            eng = self._engines.get(engine_id)
            if eng is None or eng.instance != instance:
                self._add_engine(engine_id, instance, known[1])
            if hashes:
                self._index.record(engine_id, hashes)
            if session and len(session) <= MAX_SESSION_KEY:
                self._affinity.bind(session, engine_id, now)
            applied += 1
        return applied
