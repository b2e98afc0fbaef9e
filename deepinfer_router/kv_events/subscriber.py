"""One engine's KV event feed: a ZMQ SUB socket on its publisher, sequence tracking, and
replay of what was missed from its ROUTER replay socket. Applies batches to the index.

Sequences (vLLM's ZmqEventPublisher: one counter from 0 per publisher process):
- the next one: applied;
- a jump forward: a gap. Ask the replay socket for the first missing sequence (a DEALER
  sends it; frames come back until sequence -1). vLLM keeps only its last 10,000
  batches: a replay that starts later than asked cannot fill the gap, so the engine's
  index is cleared and refilled from what comes, and counts as rebuilding meanwhile;
- a step back: the engine restarted (its counter starts again at 0). Its cache is empty
  too: clear the index and go on (if the first sequence seen is not 0, replay from 0).

State per feed: `live` (the index is complete), `rebuilding` (events flow but blocks
cached before the gap are unknown: routing uses the approximate estimate for this engine
until `rebuild_s` has passed), `down` (no feed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from .decode import END_OF_REPLAY, DecodeError, EventBatch, decode_message, decode_sequence
from .index import PreciseIndex

log = logging.getLogger("deepinfer.kv_events")


@dataclass(frozen=True, slots=True)
class FeedEndpoints:
    """Where an engine's feed is. vLLM 0.32 binds its PUB socket only for a wildcard
    (`tcp://*:P`), ipc or inproc endpoint and *connects* it to any other address
    (ZmqEventPublisher._is_bind_endpoint): given a specific host, the engine pushes to a
    subscriber that listens there. `subscriber_binds` says which: True, the router binds
    `endpoint` and the engine connects to it; False, the router connects to the engine's
    bound PUB. The replay socket is always bound by the engine."""

    endpoint: str
    replay_endpoint: str | None = None  # tcp://host:port of the engine's ROUTER socket
    topic: str = ""
    subscriber_binds: bool = False


class EngineFeed:
    def __init__(
        self,
        engine_id: str,
        endpoints: FeedEndpoints,
        index: PreciseIndex,
        ctx: zmq.asyncio.Context,
        *,
        rebuild_s: float = 60.0,
        replay_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine_id = engine_id
        self.endpoints = endpoints
        self.index = index
        self._ctx = ctx
        self.rebuild_s = rebuild_s
        self.replay_timeout_s = replay_timeout_s
        self._clock = clock
        self.last_seq: int | None = None
        self._rebuilding_until: float | None = None
        self.batches = 0  # applied, for status and tests
        self.gaps = 0
        self.resets = 0
        self.bad_messages = 0
        self.connected = False
        # (seq, ts) of the last batch the first replay applied: live batches queued
        # meanwhile at or before it are skipped (a restarted engine's are newer)
        self._caught_up_to: tuple[int, float] | None = None
        self._task: asyncio.Task[None] | None = None

    # --- state -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if not self.connected or self.last_seq is None:
            return "down"
        if self._rebuilding_until is not None and self._clock() < self._rebuilding_until:
            return "rebuilding"
        return "live"

    def usable(self) -> bool:
        """Whether routing may trust this engine's index (else: the approximate one)."""
        return self.state == "live"

    def _rebuild(self, why: str) -> None:
        log.warning("engine %s: KV event index %s: rebuilding from new events", self.engine_id,
                    why)
        self.index.engine(self.engine_id).clear()
        self._rebuilding_until = self._clock() + self.rebuild_s

    # --- applying batches ------------------------------------------------------------

    def _apply(self, batch: EventBatch) -> None:
        self.index.apply(self.engine_id, batch.events)
        self.last_seq = batch.seq
        self.batches += 1

    async def handle(self, batch: EventBatch) -> None:
        """One live batch, in the order received."""
        if self._caught_up_to is not None:
            seq_ts = self._caught_up_to
            if batch.seq <= seq_ts[0] and batch.ts <= seq_ts[1]:
                return  # queued while catching up, and already applied from the replay
            self._caught_up_to = None  # newer (a restart's new sequence too): go on
        last = self.last_seq
        if last is None:
            if batch.seq != 0:
                await self._replay(0, until=batch.seq)  # what came before we subscribed
            self._apply(batch)
            return
        if batch.seq == last + 1:
            self._apply(batch)
        elif batch.seq > last + 1:
            self.gaps += 1
            await self._replay(last + 1, until=batch.seq)
            self._apply(batch)
        else:  # the publisher's counter started again: the engine restarted
            self.resets += 1
            log.info("engine %s: KV event sequence went back from %d to %d: engine "
                     "restarted, index cleared", self.engine_id, last, batch.seq)
            self.index.engine(self.engine_id).clear()
            self.last_seq = None
            self._rebuilding_until = None
            await self.handle(batch)

    async def _replay(self, first: int, until: int) -> None:
        """Fetch batches first..until-1 from the replay socket and apply them; if they
        cannot all be had, clear and rebuild."""
        if self.endpoints.replay_endpoint is None:
            self._rebuild(f"missed batches {first}..{until - 1} (no replay endpoint)")
            return
        got = await self._fetch_replay(first)
        wanted = _in_order([b for b in got or [] if first <= b.seq < until])
        if not wanted or not _contiguous(wanted, first) or len(wanted) != until - first:
            self._rebuild(f"could not replay batches {first}..{until - 1}")
            for batch in wanted:
                self._apply(batch)
            return
        for batch in wanted:
            self._apply(batch)

    async def _catch_up(self) -> None:
        """Everything the engine still keeps, from the replay socket, right after
        subscribing: an idle engine publishes nothing, and without this its feed would
        stay down (and routing approximate) until its first request. A replay that
        answers proves the publisher is there; what it returns is applied, and the
        live batches queued meanwhile that it already covered are skipped."""
        got = await self._fetch_replay(0)
        if got is None or self.last_seq is not None:
            return  # no answer (stay down until the first batch), or live already
        got = _in_order(got)
        if got and got[0].seq != 0:  # vLLM no longer keeps the start
            self._rebuild(f"the replay starts at batch {got[0].seq}")
        elif not _contiguous(got, 0):  # a hole in what it kept: some batch is missing
            self._rebuild("the replay skips batches")
        for batch in got:
            self._apply(batch)
        if not got:
            self.last_seq = -1  # nothing published yet: live, and empty
        last = self.last_seq if self.last_seq is not None else -1
        self._caught_up_to = (last, got[-1].ts if got else float("-inf"))

    async def _fetch_replay(self, first: int) -> list[EventBatch] | None:
        assert self.endpoints.replay_endpoint is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        out: list[EventBatch] = []
        try:
            sock.connect(self.endpoints.replay_endpoint)
            await sock.send_multipart([b"", first.to_bytes(8, "big", signed=True)])
            deadline = self._clock() + self.replay_timeout_s
            while True:
                left = deadline - self._clock()
                if left <= 0 or not await sock.poll(int(left * 1000)):
                    log.warning("engine %s: replay from %d timed out", self.engine_id, first)
                    return None
                frames = await sock.recv_multipart()
                if frames and frames[0] == b"":
                    frames = frames[1:]
                if len(frames) == 3 and decode_sequence(frames[1]) == END_OF_REPLAY:
                    return out
                try:
                    out.append(decode_message(frames))
                except DecodeError:
                    self.bad_messages += 1
                if len(out) > 20_000:  # vLLM keeps 10,000: anything more is not vLLM
                    return None
        except (zmq.ZMQError, DecodeError) as exc:
            log.warning("engine %s: replay from %d failed: %s", self.engine_id, first, exc)
            return None
        finally:
            sock.close(linger=0)

    # --- the subscription --------------------------------------------------------------

    async def run(self) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, self.endpoints.topic.encode())
        if self.endpoints.subscriber_binds:
            sock.bind(self.endpoints.endpoint)
        else:
            sock.connect(self.endpoints.endpoint)
        self.connected = True
        try:
            if self.endpoints.replay_endpoint is not None:
                await self._catch_up()
            while True:
                frames = await sock.recv_multipart()
                try:
                    batch = decode_message(frames)
                except DecodeError as exc:
                    self.bad_messages += 1
                    if self.bad_messages <= 3:
                        log.warning("engine %s: bad KV event message: %s", self.engine_id, exc)
                    continue
                await self.handle(batch)
        finally:
            self.connected = False
            sock.close(linger=0)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"kv-events-{self.engine_id}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.index.forget(self.engine_id)


def _in_order(batches: list[EventBatch]) -> list[EventBatch]:
    """By sequence, one batch per sequence (a replayed frame may come twice)."""
    return list({b.seq: b for b in sorted(batches, key=lambda b: b.seq)}.values())


def _contiguous(batches: list[EventBatch], first: int) -> bool:
    """Whether `batches` (in order) are exactly first, first + 1, ... without a hole."""
    return all(b.seq == first + i for i, b in enumerate(batches))
