"""The router's live view of its engines: records merged from every registry source,
plus what the router observes (in-flight counts, scraped load, health, ejection, drain).

Pure state: the scraper, the health checker and the proxy feed it; the clock is passed in.
One file over 300 lines on purpose: membership, eligibility (`candidates_with_room`) and
the observations that change it (circuit, drain, in-flight) share one per-engine state
and its invariants; split, each half would reach into the other's fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .engine_address import UrlProblem, url_problem
from .routing.base import Candidate
from .shared.engine_record import EngineRecord


@dataclass(frozen=True, slots=True)
class Refusal:
    """A record `Fleet.sync` left out, and why."""

    source: str
    engine_id: str
    url: str
    reason: str


# How late a --workers sibling may tell of its requests in flight (its sync interval,
# 20 ms, plus delivery), for what a scrape saw running (Fleet.set_sibling_inflight).
SIBLING_LAG_S = 0.1


@dataclass(slots=True)
class ScrapedLoad:
    waiting: float = 0.0
    running: float = 0.0
    # This router's own in-flight count when the scrape was taken: the engine's running
    # requests beyond it belong to other routers (or to the scrape's past).
    inflight_at_scrape: int = 0
    # Of which this process's own (the rest: its --workers siblings', as they told).
    ours_at_scrape: int = 0
    kv_usage: float = 0.0
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    prefix_queries: float | None = None
    prefix_hits: float | None = None
    at: float = 0.0  # when scraped; 0 = never


@dataclass(slots=True)
class EngineState:
    record: EngineRecord
    source: str
    inflight: int = 0
    # --workers: requests in flight to this engine from the other workers, as they last
    # told (siblings.py); counted with ours in the load terms, not in our own limit.
    sibling_inflight: int = 0
    load: ScrapedLoad = field(default_factory=ScrapedLoad)
    healthy: bool = True  # last active health check (or passive evidence)
    draining: bool = False
    consecutive_failures: int = 0
    ejected_until: float = 0.0  # circuit open until then; then half-open
    probing: bool = False  # half-open: one request allowed through
    # When the oldest request whose client left before this engine's first byte was
    # sent (0: none): its first-byte clock keeps running (see Fleet.request_abandoned).
    unanswered_since: float = 0.0

    @property
    def id(self) -> str:
        return self.record.id

    def state(self, now: float) -> str:
        if self.draining:
            return "draining"
        if self.ejected_until > now:
            return "ejected"
        if not self.record.models:
            return "pending"  # models not known yet
        return "healthy" if self.healthy else "unhealthy"


_NO_LIMIT = 1 << 62  # on requests in flight to one engine: none


class Fleet:
    """Engines by id. `sync` takes the records of every source; listeners hear about
    engines that left or restarted (so routing state about them can be dropped)."""

    def __init__(
        self,
        *,
        chars_per_token: float,
        default_kv_tokens: int,
        stale_after_s: float,
        eject_after_failures: int,
        eject_cooldown_s: float,
        allow_private_urls: bool = False,
        first_byte_timeout_s: float = 300.0,
        max_inflight_per_engine: int = _NO_LIMIT,
    ) -> None:
        self.engines: dict[str, EngineState] = {}
        self._max_inflight = max_inflight_per_engine
        self._allow_private_urls = allow_private_urls
        self._first_byte_timeout = first_byte_timeout_s
        self._url_checks: dict[str, UrlProblem | None] = {}  # sync runs on every change
        self._chars_per_token = chars_per_token
        self._default_kv_tokens = default_kv_tokens
        self._stale_after_s = stale_after_s
        self._eject_after = eject_after_failures
        self._eject_cooldown = eject_cooldown_s
        self._forget_listeners: list[Callable[[str], None]] = []
        self._routable_listeners: list[Callable[[list[str]], None]] = []
        self._sorted_ids: list[str] = []
        self._by_model: dict[str, list[EngineState]] = {}

    def on_forget(self, listener: Callable[[str], None]) -> None:
        self._forget_listeners.append(listener)

    def on_routable(self, listener: Callable[[list[str]], None]) -> None:
        """`listener(models)` when an engine serving `models` may have become routable:
        it joined or restarted, passed a health check after failing, or was un-drained
        (requests waiting for room on an engine then look again)."""
        self._routable_listeners.append(listener)

    def _routable(self, state: EngineState) -> None:
        for listener in self._routable_listeners:
            listener(state.record.models)

    # --- membership --------------------------------------------------------------
    def sync(self, sources: Iterable[tuple[str, Mapping[str, EngineRecord]]]) -> list[Refusal]:
        """Merge source views. Every record passes the same address checks whatever its
        source (engine_address.url_problem); the first source to name an id keeps it, so
        a registry record never takes over an operator's `--engine` (ids are predictable
        hashes of URLs). Returns the records left out."""
        merged: dict[str, tuple[str, EngineRecord]] = {}
        refused: list[Refusal] = []
        for source, records in sources:
            for engine_id, record in records.items():
                problem = self._url_problem(record.url)
                owner = merged.get(engine_id)
                if problem is not None:
                    refused.append(Refusal(source, engine_id, record.url, problem.message))
                elif owner is not None and owner[0] != source:
                    refused.append(Refusal(
                        source, engine_id, record.url, f"id taken by the {owner[0]} source"
                    ))
                else:
                    merged[engine_id] = (source, record)
        for engine_id in list(self.engines):
            if engine_id not in merged:
                # Requests in flight keep their EngineState reference and finish.
                del self.engines[engine_id]
                self._forget(engine_id)
        joined: list[EngineState] = []
        for engine_id, (source, record) in merged.items():
            state = self.engines.get(engine_id)
            if state is None:
                self.engines[engine_id] = state = EngineState(record=record, source=source)
                joined.append(state)
            elif state.record.instance != record.instance:
                # A restart: its cache is empty and its old failures are history. The
                # same object is kept: requests in flight hold it and count themselves
                # out of it when they end.
                self._forget(engine_id)
                state.record, state.source = record, source
                state.load = ScrapedLoad()
                state.healthy = True
                state.consecutive_failures = 0
                state.ejected_until = 0.0
                state.probing = False
                state.unanswered_since = 0.0
                joined.append(state)
            else:
                state.record = record
                state.source = source
        self._reindex()
        for state in joined:
            self._routable(state)
        return refused

    def _url_problem(self, url: str) -> UrlProblem | None:
        checks = self._url_checks
        if url not in checks:
            if len(checks) >= 4096:
                checks.clear()
            checks[url] = url_problem(url, self._allow_private_urls)
        return checks[url]

    def _forget(self, engine_id: str) -> None:
        for listener in self._forget_listeners:
            listener(engine_id)

    def _reindex(self) -> None:
        self._sorted_ids = sorted(self.engines)
        by_model: dict[str, list[EngineState]] = {}
        for engine_id in self._sorted_ids:
            state = self.engines[engine_id]
            for model in state.record.models:
                by_model.setdefault(model, []).append(state)
        self._by_model = by_model

    # --- queries -------------------------------------------------------------------
    def models(self, now: float, routable_only: bool = True) -> list[str]:
        if not routable_only:
            return sorted(self._by_model)
        return sorted(
            model
            for model, states in self._by_model.items()
            if any(self.routable(s, now) for s in states)
        )

    def known_model(self, model: str) -> bool:
        return model in self._by_model

    def routable(self, state: EngineState, now: float) -> bool:
        if state.draining or not state.healthy:
            return False
        if state.ejected_until > now:
            return False
        if state.ejected_until and state.probing:
            return False  # half-open: the one probe is already out
        return True

    def candidates(
        self, model: str, now: float, exclude: Iterable[str] = ()
    ) -> list[Candidate]:
        """Every engine that may take a request for `model` now, whatever its load."""
        return self._scan(model, now, exclude, _NO_LIMIT)[0]

    def candidates_with_room(
        self, model: str, now: float, exclude: Iterable[str] = ()
    ) -> tuple[list[Candidate], bool]:
        """The engines that may take a request for `model` now: `candidates()` under
        --max-inflight-per-engine. Also whether some other candidate is at that limit
        (room may come: worth waiting for). The one place candidates are filtered; the
        policy only scores them."""
        return self._scan(model, now, exclude, self._max_inflight)

    def _scan(
        self, model: str, now: float, exclude: Iterable[str], limit: int
    ) -> tuple[list[Candidate], bool]:
        states = self._by_model.get(model)
        if not states:
            return [], False
        out: list[Candidate] = []
        at_limit = False
        excluded = set(exclude)
        for s in states:
            if s.id in excluded or not self.routable(s, now):
                continue
            if s.inflight + s.sibling_inflight >= limit:  # the router's (all workers)
                at_limit = True
                continue
            out.append(self.candidate(s, now))
        return out, at_limit

    def candidate(self, s: EngineState, now: float) -> Candidate:
        load = s.load
        fresh = load.at and now - load.at <= self._stale_after_s
        inflight = s.inflight + s.sibling_inflight  # the router's, all workers
        return Candidate(
            id=s.id,
            instance=s.record.instance,
            inflight=inflight,
            waiting=load.waiting if fresh else 0.0,
            # Stale-proof: others' share as of the scrape plus ours as of now, so that
            # our requests that finished since the scrape are not counted as load.
            running=(max(0.0, load.running - load.inflight_at_scrape) + inflight)
            if fresh
            else float(inflight),
            kv_usage=load.kv_usage if fresh else 0.0,
            kv_capacity_chars=self.kv_capacity_chars(s),
            block_size=load.block_size or s.record.capacity.block_size or 0,
        )

    def kv_capacity_chars(self, s: EngineState) -> int:
        blocks, block_size = s.load.num_gpu_blocks, s.load.block_size
        if blocks is None or block_size is None:
            blocks, block_size = s.record.capacity.kv_blocks, s.record.capacity.block_size
        tokens = blocks * block_size if blocks and block_size else self._default_kv_tokens
        return int(tokens * self._chars_per_token)

    def state_counts(self, now: float) -> dict[str, int]:
        counts = dict.fromkeys(("healthy", "unhealthy", "ejected", "draining", "pending"), 0)
        for s in self.engines.values():
            counts[s.state(now)] += 1
        return counts

    # --- observations ---------------------------------------------------------------
    def inflight_by_engine(self) -> dict[str, int]:
        """This process's requests in flight per engine (for its sibling workers)."""
        return {eid: s.inflight for eid, s in self.engines.items() if s.inflight}

    def set_sibling_inflight(self, counts: dict[str, int], now: float) -> None:
        """The other workers' requests in flight per engine, summed (siblings.py). A
        sibling tells of a request some milliseconds after it started: one that a scrape
        just taken already saw running must not count as another router's load until
        the next scrape, so the scrape's share of the siblings is raised to what they
        tell within `SIBLING_LAG_S` of it."""
        for eid, s in self.engines.items():
            n = counts.get(eid, 0)
            fewer = n < s.sibling_inflight
            s.sibling_inflight = n
            if fewer:  # requests waiting for room on it look again
                self._routable(s)
            load = s.load
            if n and load.at and now - load.at <= SIBLING_LAG_S:
                load.inflight_at_scrape = max(load.inflight_at_scrape, load.ours_at_scrape + n)

    def request_started(self, engine_id: str) -> EngineState | None:
        state = self.engines.get(engine_id)
        if state is not None:
            state.inflight += 1
            if state.ejected_until:
                state.probing = True
        return state

    def request_finished(self, state: EngineState, ok: bool, now: float) -> None:
        """`ok` False for engine faults (connect errors, resets, timeouts, 5xx)."""
        state.inflight -= 1
        if ok:
            state.consecutive_failures = 0
            state.ejected_until = 0.0
            state.probing = False
            state.healthy = True
            state.unanswered_since = 0.0
        else:
            self.record_failure(state, now)

    def request_abandoned(self, state: EngineState, sent_at: float | None) -> None:
        """The client left: that says nothing about the engine, so neither success nor
        failure is recorded (a half-open probe's turn passes to the next request). But
        if the engine had not sent its first byte (`sent_at`: when the request was
        sent), that request's first-byte clock keeps running: unless the engine answers
        some request by `sent_at + first_byte_timeout`, `check_unanswered` counts a
        failure, so an engine that hangs is ejected even when every client gives up
        first."""
        state.inflight -= 1
        state.probing = False
        if sent_at is not None and not state.unanswered_since:
            state.unanswered_since = sent_at

    def check_unanswered(self, engine_id: str, now: float) -> bool:
        """Count a failure if an abandoned request's first-byte deadline passed without
        any answer from the engine since (called with each health check). True if so."""
        state = self.engines.get(engine_id)
        if state is None or not state.unanswered_since:
            return False
        if now < state.unanswered_since + self._first_byte_timeout:
            return False
        state.unanswered_since = 0.0
        self.record_failure(state, now)
        return True

    def record_failure(self, state: EngineState, now: float) -> None:
        state.consecutive_failures += 1
        state.probing = False
        if state.consecutive_failures >= self._eject_after:
            state.ejected_until = now + self._eject_cooldown

    def health_result(self, engine_id: str, ok: bool, now: float) -> None:
        state = self.engines.get(engine_id)
        if state is None:
            return
        # A passing /health does not close an open circuit: an engine can answer /health
        # and still fail or hang on requests. After the cool-down one real request goes
        # through (half-open); its outcome closes the circuit or opens it again.
        came_back = ok and not state.healthy
        state.healthy = ok
        if came_back:
            self._routable(state)

    def set_draining(self, engine_id: str, draining: bool = True) -> bool:
        state = self.engines.get(engine_id)
        if state is None:
            return False
        undrained = state.draining and not draining
        state.draining = draining
        if undrained:
            self._routable(state)
        return True
