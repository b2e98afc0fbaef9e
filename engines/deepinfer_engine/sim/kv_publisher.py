"""The simulated engine's KV event feed, as vLLM's ZmqEventPublisher serves it
(vllm/distributed/kv_events.py): multipart `[topic, 8-byte big-endian sequence, msgpack
batch]` on a PUB socket, and a ROUTER replay socket that answers a DEALER's first wanted
sequence with every kept batch from there, then a frame with sequence -1. The last
10,000 batches are kept, as vLLM keeps them.

One difference from vLLM: the simulator binds every endpoint it is given, where vLLM
binds only `tcp://*`, ipc and inproc and connects to any other address. `launch` gives
vLLM (and so the simulator) a private ipc path, where both bind alike; a simulator run
on its own can thus publish on a loopback address a router subscribes to directly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence

import zmq
import zmq.asyncio

from .kv_events import Encoding, SimEvent, encode_batch

log = logging.getLogger("deepinfer.sim")

BUFFER_STEPS = 10_000  # vLLM's default replay buffer
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


class KvPublisher:
    def __init__(self, endpoint: str, replay_endpoint: str | None, topic: str,
                 block_size: int, encoding: Encoding = "tagged") -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.block_size = block_size
        self.encoding = encoding
        self.seq = 0
        self._kept: deque[tuple[int, bytes]] = deque(maxlen=BUFFER_STEPS)
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)

    def start(self) -> None:
        if self._replay is not None:
            self._task = asyncio.create_task(self._serve_replay(), name="sim-kv-replay")

    def publish(self, events: Sequence[SimEvent]) -> None:
        """One batch, sent at once (a PUB socket never blocks: a slow subscriber drops)."""
        if not events:
            return
        payload = encode_batch(time.time(), events, self.block_size, self.encoding)
        seq = self.seq
        self.seq += 1
        self._kept.append((seq, payload))
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload],
                                     flags=zmq.NOBLOCK)

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        sock = self._replay
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                continue  # not a replay request
            client, start = frames[0], int.from_bytes(frames[2], "big", signed=True)
            for seq, payload in list(self._kept):
                if seq >= start:
                    await sock.send_multipart([client, b"", self.topic,
                                               seq.to_bytes(8, "big"), payload])
            await sock.send_multipart([client, b"", b"", END_OF_REPLAY, b""])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()
