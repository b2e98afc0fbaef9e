"""The router's subscriptions: one EngineFeed per engine whose record advertises a KV
event feed (`kv_events` in the engine record; `deepinfer-engine launch` publishes one).
Follows the fleet: a feed starts when such an engine appears, restarts when the engine
restarts (a new instance), and stops when it goes. Endpoints pass the same address
checks as engine URLs. Several routers subscribe independently, so their indexes agree
without sharing state. Where no feed is live for an engine, routing keeps using the
approximate estimate for it (`precise(engine_id)` says which); `annotate` gives the
policy, per candidate, what the engine really holds of a request given as token ids."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import zmq.asyncio

from ..engine_address import url_problem
from ..periodic import Periodic
from ..routing.base import Candidate, RequestFeatures
from ..shared.engine_record import EngineRecord
from .index import PreciseIndex
from .subscriber import EngineFeed, FeedEndpoints

log = logging.getLogger("deepinfer.kv_events")


def endpoint_problem(endpoint: str, allow_private: bool) -> str | None:
    """The engine-URL checks, applied to a `tcp://host:port` endpoint."""
    problem = url_problem("http://" + endpoint.removeprefix("tcp://"), allow_private)
    return problem.message if problem is not None else None


def annotate(index: PreciseIndex, request: RequestFeatures, candidates: Sequence[Candidate],
             live: Sequence[str], other_tier_weight: float = 0.5) -> None:
    """Tell each candidate in `live` (its feed is live) how much of the request's prompt it
    really holds: in prompt characters (the request's own characters per token) with a
    block held only in a slower tier (CPU, disk) counting `other_tier_weight`, and as raw
    tokens. Pure: the index and the candidates in, the candidates annotated."""
    tokens = request.prompt_token_ids
    if not tokens or not live:
        return
    chars_per_token = request.prompt_chars / (request.prompt_tokens or len(tokens))
    found = index.match(tokens, live)
    for cand in candidates:
        if cand.id in found:
            match, block_size = found[cand.id]
            cand.precise_cached_chars = int(
                match.weighted_tokens(block_size, other_tier_weight) * chars_per_token)
            cand.precise_cached_tokens = match.blocks * block_size
            cand.block_size = block_size
        elif cand.id in live:
            cand.precise_cached_chars = 0  # live, and it holds none of it
            cand.precise_cached_tokens = 0


class KvEventFeeds(Periodic):
    """A service (start/close) kept in step with the fleet by `sync`, every
    `sync_interval_s`."""

    def __init__(
        self,
        records: Callable[[], Iterable[EngineRecord]],
        *,
        allow_private: bool = False,
        rebuild_s: float = 60.0,
        sync_interval_s: float = 1.0,
    ) -> None:
        super().__init__(sync_interval_s, "kv-event-feeds")
        self._records = records
        self._allow_private = allow_private
        self._rebuild_s = rebuild_s
        self.index = PreciseIndex()
        self.feeds: dict[str, tuple[str, EngineFeed]] = {}  # engine id -> (instance, feed)
        self._ctx: zmq.asyncio.Context | None = None
        self._refused: set[str] = set()

    def precise(self, engine_id: str) -> bool:
        entry = self.feeds.get(engine_id)
        return entry is not None and entry[1].usable()

    def annotate(self, request: RequestFeatures, candidates: Sequence[Candidate],
                 agreeing: Mapping[str, str] | None = None,
                 other_tier_weight: float = 0.5) -> None:
        """`annotate` below, for the candidates whose feed is live (and, with `agreeing`,
        engine id -> instance, only those whose instance is in it)."""
        if request.prompt_token_ids:
            live = [c.id for c in candidates if self.precise(c.id)
                    and (agreeing is None or agreeing.get(c.id) == c.instance)]
            annotate(self.index, request, candidates, live, other_tier_weight)

    def states(self) -> dict[str, str]:
        """Per engine with a feed: live, rebuilding or down."""
        return {engine_id: feed.state for engine_id, (_, feed) in sorted(self.feeds.items())}

    async def sync(self) -> None:
        wanted = {r.id: r for r in self._records() if r.kv_events is not None}
        for engine_id, (instance, feed) in list(self.feeds.items()):
            record = wanted.get(engine_id)
            if record is None or record.instance != instance:
                del self.feeds[engine_id]
                await feed.close()
        for engine_id, record in wanted.items():
            if engine_id in self.feeds:
                continue
            kv = record.kv_events
            assert kv is not None
            problems = [p for p in (endpoint_problem(e, self._allow_private)
                                    for e in (kv.endpoint, kv.replay_endpoint) if e) if p]
            if problems:
                if engine_id not in self._refused:  # once per engine, not every sync
                    log.warning("engine %s: KV event feed refused: %s", engine_id, problems[0])
                    self._refused.add(engine_id)
                continue
            assert self._ctx is not None
            feed = EngineFeed(engine_id, FeedEndpoints(kv.endpoint, kv.replay_endpoint,
                                                       kv.topic), self.index, self._ctx,
                              rebuild_s=self._rebuild_s)
            feed.start()
            self.feeds[engine_id] = (record.instance, feed)

    async def run_once(self) -> None:
        await self.sync()

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        await super().start()

    async def close(self) -> None:
        await super().close()
        for _, feed in list(self.feeds.values()):
            await feed.close()
        self.feeds.clear()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
