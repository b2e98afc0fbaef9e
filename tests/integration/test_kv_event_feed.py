"""An engine's KV event feed end to end: vLLM's own ZmqEventPublisher in a subprocess
(tests/support/kv_publisher.py) and the router's subscriber over real ZMQ sockets on
loopback (given a specific address, vLLM 0.32 connects its PUB socket to the subscriber,
which listens; its replay socket listens): late subscription (replay from 0), a replay
buffer overrun (rebuild), an engine restart (sequence back to 0: reset). A mid-stream
gap cannot be made on demand with the real publisher (its sequence counter never
skips): a PUB/ROUTER pair in the test sends vLLM's exact frames with a hole, and answers
the replay request as vLLM does."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from deepinfer_router.kv_events.index import PreciseIndex
from deepinfer_router.kv_events.subscriber import EngineFeed, FeedEndpoints
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(60)
PUBLISHER = Path(__file__).resolve().parents[1] / "support" / "kv_publisher.py"
BLOCK = 16


class Publisher:
    def __init__(self, steps: int = 10_000, ports: tuple[int, int] | None = None,
                 endpoint: str | None = None, topic: str = "kv") -> None:
        self.pub_port, self.replay_port = ports or (free_port(), free_port())
        self.proc = subprocess.Popen(
            [sys.executable, str(PUBLISHER), endpoint or f"tcp://127.0.0.1:{self.pub_port}",
             f"tcp://127.0.0.1:{self.replay_port}", str(steps), topic],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    @property
    def endpoints(self) -> FeedEndpoints:
        # A specific address: vLLM connects its PUB there, the subscriber listens.
        return FeedEndpoints(f"tcp://127.0.0.1:{self.pub_port}",
                             f"tcp://127.0.0.1:{self.replay_port}", "kv",
                             subscriber_binds=True)

    def store(self, first: int, count: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"store {first} {count}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def publishers() -> Iterator[list[Publisher]]:
    started: list[Publisher] = []
    yield started
    for p in started:
        p.close()


def prompt(blocks: int) -> list[int]:
    return list(range(BLOCK * blocks))


async def until(check: object, within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_late_subscriber_replays_from_zero_then_follows(publishers: list[Publisher]
                                                              ) -> None:
    pub = Publisher()
    publishers.append(pub)
    for i in range(5):  # seq 0..4 before anyone listens
        pub.store(i, 1)
    ctx, index = zmq.asyncio.Context(), PreciseIndex()
    feed = EngineFeed("e1", pub.endpoints, index, ctx)
    feed.start()
    try:
        await asyncio.sleep(0.3)  # the SUB socket connects (slow joiner)
        pub.store(5, 2)  # seq 5: the subscriber sees it first, replays 0..4
        await until(lambda: feed.last_seq == 5)
        assert feed.state == "live" and feed.gaps == 0
        assert index.match(prompt(7), ["e1"])["e1"][0].blocks == 7
        pub.store(7, 1)
        await until(lambda: feed.last_seq == 6)
        assert index.match(prompt(9), ["e1"])["e1"][0].blocks == 8
    finally:
        await feed.close()
        ctx.destroy(linger=0)


async def test_replay_buffer_overrun_rebuilds(publishers: list[Publisher]) -> None:
    pub = Publisher(steps=3)  # vLLM keeps only the last 3 batches
    publishers.append(pub)
    for i in range(6):
        pub.store(i, 1)
    ctx, index = zmq.asyncio.Context(), PreciseIndex()
    feed = EngineFeed("e1", pub.endpoints, index, ctx, rebuild_s=30)
    feed.start()
    try:
        await asyncio.sleep(0.3)
        pub.store(6, 1)  # seq 6; replay from 0 starts at 4: the gap cannot be filled
        await until(lambda: feed.last_seq == 6)
        assert feed.state == "rebuilding" and not feed.usable()
        # Blocks 4..6 were replayed, but their prefix (0..3) is unknown: nothing matches.
        assert index.match(prompt(7), ["e1"])["e1"][0].blocks == 0
    finally:
        await feed.close()
        ctx.destroy(linger=0)


async def test_engine_restart_resets_the_index(publishers: list[Publisher]) -> None:
    first = Publisher()
    publishers.append(first)
    ctx, index = zmq.asyncio.Context(), PreciseIndex()
    feed = EngineFeed("e1", first.endpoints, index, ctx)
    feed.start()
    try:
        await asyncio.sleep(0.3)
        for i in range(3):
            first.store(i, 1)
        await until(lambda: feed.last_seq == 2)
        assert index.match(prompt(3), ["e1"])["e1"][0].blocks == 3
        first.close()  # the engine restarts on the same ports: its counter starts at 0
        second = Publisher(ports=(first.pub_port, first.replay_port))
        publishers.append(second)
        await asyncio.sleep(0.5)  # the SUB socket reconnects by itself
        second.store(0, 1)
        await until(lambda: feed.resets == 1 and feed.last_seq == 0)
        assert feed.state == "live"
        # Only what the new process stored: the restarted engine's cache was empty.
        assert index.match(prompt(3), ["e1"])["e1"][0].blocks == 1
    finally:
        await feed.close()
        ctx.destroy(linger=0)


def _payload(first: int, count: int) -> bytes:
    from vllm.distributed.kv_events import BlockStored, KVEventBatch

    blocks = list(range(first, first + count))
    h = [(i + 1).to_bytes(32, "big") for i in blocks]
    event = BlockStored(block_hashes=h,
                        parent_block_hash=(first).to_bytes(32, "big") if first else None,
                        token_ids=[t for i in blocks for t in range(16 * i, 16 * i + 16)],
                        block_size=16, lora_id=None, medium="GPU", lora_name=None)
    return msgspec.msgpack.encode(KVEventBatch(ts=1.0, events=[event]))


def replaying(ctx: zmq.asyncio.Context, sent: dict[int, bytes]
              ) -> tuple[zmq.asyncio.Socket, int, int, asyncio.Task[None]]:
    """A PUB socket and a replay ROUTER answering from `sent` as vLLM's _service_replay
    does: (pub, pub port, replay port, the replay server's task)."""
    pub, router = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    pub_port, replay_port = free_port(), free_port()
    pub.bind(f"tcp://127.0.0.1:{pub_port}")
    router.bind(f"tcp://127.0.0.1:{replay_port}")

    async def replay_server() -> None:
        while True:
            client, _, start = await router.recv_multipart()
            for seq in sorted(sent):
                if seq >= int.from_bytes(start, "big"):
                    await router.send_multipart([client, b"", b"kv", seq.to_bytes(8, "big"),
                                                 sent[seq]])
            await router.send_multipart([client, b"", b"", (-1).to_bytes(8, "big",
                                                                          signed=True), b""])

    return pub, pub_port, replay_port, asyncio.create_task(replay_server())


async def test_a_catch_up_replay_with_a_hole_rebuilds() -> None:
    """The engine's replay buffer answers 0, 1, 3 (2 is missing): applying it as whole
    would claim blocks whose history is incomplete; the feed rebuilds instead."""
    ctx = zmq.asyncio.Context()
    sent = {0: _payload(0, 1), 1: _payload(1, 1), 3: _payload(3, 1)}
    _pub, pub_port, replay_port, server = replaying(ctx, sent)
    feed = EngineFeed("e1", FeedEndpoints(f"tcp://127.0.0.1:{pub_port}",
                                          f"tcp://127.0.0.1:{replay_port}", "kv"),
                      PreciseIndex(), ctx, rebuild_s=30)
    feed.start()
    try:
        await until(lambda: feed.last_seq == 3)
        assert feed.state == "rebuilding" and not feed.usable()
    finally:
        server.cancel()
        await feed.close()
        ctx.destroy(linger=0)


async def test_mid_stream_gap_is_filled_by_replay() -> None:
    ctx = zmq.asyncio.Context()
    sent: dict[int, bytes] = {}  # what the engine has published (and keeps for replay)
    pub, pub_port, replay_port, server = replaying(ctx, sent)
    index = PreciseIndex()
    feed = EngineFeed("e1", FeedEndpoints(f"tcp://127.0.0.1:{pub_port}",
                                          f"tcp://127.0.0.1:{replay_port}", "kv"), index, ctx)
    feed.start()
    try:
        # Caught up at once from the replay socket: nothing published yet, live and empty
        await until(lambda: feed.state == "live")
        assert feed.last_seq == -1
        for seq in range(4):
            sent[seq] = _payload(seq, 1)
            if seq != 2:  # 2 never arrives live
                await pub.send_multipart([b"kv", seq.to_bytes(8, "big"), sent[seq]])
        await until(lambda: feed.last_seq == 3)
        assert feed.gaps == 1 and feed.state == "live"
        assert index.match(prompt(4), ["e1"])["e1"][0].blocks == 4
        # Garbage on the feed is counted and skipped, never fatal.
        await pub.send_multipart([b"kv", b"\x00" * 8, b"\xc1"])
        await pub.send_multipart([b"kv", (4).to_bytes(8, "big"), _payload(4, 1)])
        await until(lambda: feed.last_seq == 4)
        assert feed.bad_messages == 1
    finally:
        server.cancel()
        await feed.close()
        ctx.destroy(linger=0)


async def test_relay_republishes_a_private_feed_on_the_advertised_address(
        publishers: list[Publisher], tmp_path: Path) -> None:
    # As `launch` runs it: vLLM binds ipc (private), the relay binds tcp on the address.
    from deepinfer_engine.kv_relay import KvEventsRelay, plan_kv_events

    plan = plan_kv_events(tmp_path, "e-relay", "127.0.0.1", (free_port(), free_port()))
    assert plan.ipc_endpoint.startswith("ipc://") and plan.public.topic == "kv@e-relay"
    pub = Publisher(ports=(0, int(plan.public.replay_endpoint.rsplit(":", 1)[1])),
                    endpoint=plan.ipc_endpoint, topic=plan.public.topic)
    publishers.append(pub)
    relay = KvEventsRelay(plan)
    relay.start()
    ctx, index = zmq.asyncio.Context(), PreciseIndex()
    feed = EngineFeed("e-relay", FeedEndpoints(plan.public.endpoint,
                                               plan.public.replay_endpoint,
                                               plan.public.topic), index, ctx)
    feed.start()
    try:
        pub.store(0, 2)  # seq 0, before the router listens: replayed from vLLM directly
        await asyncio.sleep(0.5)
        pub.store(2, 1)
        await until(lambda: feed.last_seq == 1)
        assert feed.state == "live"
        assert index.match(prompt(3), ["e-relay"])["e-relay"][0].blocks == 3
    finally:
        await feed.close()
        ctx.destroy(linger=0)
        await asyncio.to_thread(relay.stop)


async def test_router_feeds_follow_the_fleet(publishers: list[Publisher],
                                             tmp_path: Path) -> None:
    from deepinfer_engine.kv_relay import KvEventsRelay, plan_kv_events
    from deepinfer_router.kv_events.feeds import KvEventFeeds
    from deepinfer_router.shared.engine_record import EngineRecord, KvEventsEndpoints

    plan = plan_kv_events(tmp_path, "e-a", "127.0.0.1", (free_port(), free_port()))
    assert plan.public.replay_endpoint is not None
    pub = Publisher(ports=(0, int(plan.public.replay_endpoint.rsplit(":", 1)[1])),
                    endpoint=plan.ipc_endpoint, topic=plan.public.topic)
    publishers.append(pub)
    relay = KvEventsRelay(plan)
    relay.start()
    record = EngineRecord(url="http://127.0.0.1:9", kv_events=plan.public)
    metadata = EngineRecord(url="http://127.0.0.1:10", kv_events=KvEventsEndpoints(
        endpoint="tcp://169.254.169.254:5557"))  # a cloud metadata address: refused
    plain = EngineRecord(url="http://127.0.0.1:11")  # no feed: approximate only
    records = [record, metadata, plain]
    feeds = KvEventFeeds(lambda: records, sync_interval_s=0.1)
    await feeds.start()
    try:
        await until(lambda: record.id in feeds.feeds)
        assert set(feeds.feeds) == {record.id}
        # An idle engine's feed is live at once (caught up from its replay socket)
        await until(lambda: feeds.precise(record.id))
        assert feeds.states() == {record.id: "live"}
        pub.store(0, 2)
        await until(lambda: record.id in feeds.index.match(prompt(2), [record.id]))
        assert feeds.index.match(prompt(2), [record.id])[record.id][0].blocks == 2
        # What routing is told: per candidate, the prompt chars the engine really holds
        # (the request's own chars per token); a live feed holding none says 0.
        from deepinfer_router.routing.base import Candidate, RequestFeatures

        asked = RequestFeatures(model="m", prompt_chars=3 * BLOCK * 5,
                                prompt_token_ids=tuple(prompt(3)))
        cands = [Candidate(id=record.id, instance=record.instance),
                 Candidate(id=plain.id, instance=plain.instance)]
        feeds.annotate(asked, cands)
        assert cands[0].precise_cached_chars == 2 * BLOCK * 5
        assert cands[1].precise_cached_chars is None  # no feed: the estimate stands
        other = RequestFeatures(model="m", prompt_chars=80, prompt_token_ids=(99,) * 16)
        cands = [Candidate(id=record.id, instance=record.instance)]
        feeds.annotate(other, cands)
        assert cands[0].precise_cached_chars == 0
        # Ids of the router's tokenizer: only an engine instance checked to tokenize
        # alike is asked; another instance keeps the estimate.
        for agreeing, want in (({record.id: record.instance}, 2 * BLOCK * 5),
                               ({record.id: "an-older-instance"}, None), ({}, None)):
            cands = [Candidate(id=record.id, instance=record.instance)]
            feeds.annotate(asked, cands, agreeing)
            assert cands[0].precise_cached_chars == want, agreeing
        # A restarted engine (new instance): its feed starts over, the index forgets.
        # (Recorded as it happens: the new feed then replays from this test's publisher,
        # which, unlike a restarted engine's, still holds the blocks.)
        forgotten: list[tuple[str, int]] = []
        forget = feeds.index.forget

        def recording_forget(engine_id: str) -> None:
            forget(engine_id)
            forgotten.append((engine_id, len(feeds.index.match(prompt(2), [engine_id]))))

        feeds.index.forget = recording_forget  # type: ignore[method-assign]
        old_feed = feeds.feeds[record.id][1]
        records[0] = restarted = record.model_copy(update={"instance": "i-2"})
        await until(lambda: feeds.feeds.get(restarted.id, ("", None))[0] == "i-2")
        assert forgotten[0] == (record.id, 0)  # forgotten: nothing matched right after
        assert feeds.feeds[record.id][1] is not old_feed
        records.pop(0)  # gone from the fleet: no feed
        await until(lambda: not feeds.feeds)
    finally:
        await feeds.close()
        await asyncio.to_thread(relay.stop)
