"""vLLM's own KV event publisher (vllm.distributed.kv_events.ZmqEventPublisher) in a
process of its own, for tests: it binds PUB and ROUTER (replay) on loopback and publishes
BlockStored batches on command, exactly as an engine would.

    python kv_publisher.py PUB_ENDPOINT REPLAY_ENDPOINT BUFFER_STEPS
    stdin: "store FIRST_BLOCK COUNT" -> one batch storing blocks FIRST..FIRST+COUNT-1 of
           one chain (block i holds tokens 16*i .. 16*i+15; its parent is block i-1)
           "exit"
    stdout: "ready", then "ok SEQ" after each batch has been handed to the publisher
"""

from __future__ import annotations

import sys
import time

from vllm.distributed.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher

BLOCK = 16


def block_hash(i: int) -> bytes:
    return (i + 1).to_bytes(32, "big")


def main() -> None:
    endpoint, replay, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    topic = sys.argv[4] if len(sys.argv) > 4 else "kv"
    publisher = ZmqEventPublisher(data_parallel_rank=0, endpoint=endpoint,
                                  replay_endpoint=replay, buffer_steps=steps, topic=topic)
    print("ready", flush=True)
    seq = 0
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "exit":
            break
        first, count = int(words[1]), int(words[2])
        blocks = list(range(first, first + count))
        event = BlockStored(
            block_hashes=[block_hash(i) for i in blocks],
            parent_block_hash=block_hash(first - 1) if first > 0 else None,
            token_ids=[t for i in blocks for t in range(BLOCK * i, BLOCK * i + BLOCK)],
            block_size=BLOCK, lora_id=None, medium="GPU", lora_name=None)
        publisher.publish(KVEventBatch(ts=time.time(), events=[event]))
        print(f"ok {seq}", flush=True)
        seq += 1
    publisher.shutdown()


if __name__ == "__main__":
    main()
