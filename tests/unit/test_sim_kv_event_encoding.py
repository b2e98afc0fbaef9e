"""The simulated engine's KV events, in vLLM's wire format: decoded by the router's own
decoder (both encodings) and applied to its precise index, they describe exactly the
cache the simulator holds, evictions included."""

from __future__ import annotations

import random

import pytest

from deepinfer_engine.sim.cost import CostModel
from deepinfer_engine.sim.kv_events import Removed, Stored, encode_batch
from deepinfer_engine.sim.model import SimEngine
from deepinfer_engine.sim.tokenizer import token_id
from deepinfer_router.kv_events.decode import decode_batch
from deepinfer_router.kv_events.index import PreciseIndex

BS = 4


def sim(num_blocks: int) -> SimEngine:
    e = SimEngine(num_blocks=num_blocks, block_size=BS, max_num_seqs=4,
                  max_num_batched_tokens=1024, cost=CostModel())
    e.kv.events = []
    return e


def publish(e: SimEngine, index: PreciseIndex, seq: int, encoding: str) -> int:
    """Hand the engine's new events to the index through the wire format."""
    assert e.kv.events is not None
    if e.kv.events:
        payload = encode_batch(1.0, e.kv.events, BS, encoding)  # type: ignore[arg-type]
        index.apply("sim", decode_batch(seq, payload).events)
        e.kv.events.clear()
    return seq + 1


@pytest.mark.parametrize("encoding", ["tagged", "positional"])
def test_the_index_built_from_sim_events_matches_the_sims_cache(encoding: str) -> None:
    rng = random.Random(3)
    e = sim(num_blocks=40)  # small: prompts evict one another
    index = PreciseIndex()
    prompts = [[f"s{rng.randrange(3)}-{i}" for i in range(8)] +
               [f"u{k}-{i}" for i in range(rng.randrange(4, 30))] for k in range(30)]
    t, seq = 0.0, 0
    for k, prompt in enumerate(prompts + prompts[::3]):
        e.new_request(f"r{k}", prompt, 2, now=t)
        t = e.run_until_idle(t)
        seq = publish(e, index, seq, encoding)
        assert e.kv.evictions >= 0
        for other in prompts:
            ids = [token_id(tok) for tok in other]
            got = index.match(ids, ["sim"]).get("sim")
            held = got[0].blocks * BS if got else 0
            # what the sim would reuse: held blocks but never the last prompt token
            assert min(held, (len(ids) - 1) // BS * BS) == e.cached_prefix_tokens(other)
    assert e.kv.evictions > 0  # the case with evictions was exercised


def test_events_name_parents_and_the_token_ids_tokenize_reports() -> None:
    e = sim(num_blocks=16)
    prompt = ["\x00101", "\x00102", "\x00103", "\x00104", "b", "c", "d", "e", "f"]
    e.new_request("r", prompt, 1, now=0.0)
    e.run_until_idle(0.0)
    stored = [ev for ev in e.kv.events or [] if isinstance(ev, Stored)]
    assert [ev.token_ids for ev in stored][:2] == [
        (101, 102, 103, 104), tuple(token_id(x) for x in "bcde")]
    assert stored[0].parent_hash is None and stored[1].parent_hash == stored[0].block_hash
    assert not any(isinstance(ev, Removed) for ev in e.kv.events or [])
