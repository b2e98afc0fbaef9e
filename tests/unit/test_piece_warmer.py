"""The piece warmer: a prompt whose head alone was encoded gets its pieces into the
tokenizer's LRU off the request's path, within a bound on waiting characters, and with
the same ids as encoding it then."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deepinfer_router.prompt_tokens.warmer import PieceWarmer
from deepinfer_router.shared.prompt_tokenizer import PromptTokenizer
from tests.e2e.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


def body(n: int, tag: str) -> dict[str, object]:
    return {"messages": [{"role": "system", "content": f"{tag} shared document " * n},
                         {"role": "user", "content": "a short question?"}]}


async def settled(warmer: PieceWarmer) -> None:
    for _ in range(500):
        if warmer.waiting_chars == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the warmer never finished")


async def test_offered_pieces_are_cached_with_the_ids_encoding_gives(
        tokenizer_dir: Path) -> None:
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    fresh = PromptTokenizer.from_dir(tokenizer_dir)
    warmer = PieceWarmer()
    rendered = tok.render(body(400, "alpha"))
    assert rendered is not None and rendered.uncached_chars > 8000
    assert warmer.offer(tok, rendered)
    await settled(warmer)
    assert warmer.warmed == 1 and warmer.waiting_chars == 0
    again = tok.render(body(400, "alpha"))
    assert again is not None and again.uncached_chars < 100  # only the short pieces
    assert tok.encode_rendered(again).tolist() == fresh.prompt_ids(body(400, "alpha"))
    await warmer.close()


async def test_past_the_bound_offers_are_dropped_and_close_stops_it(
        tokenizer_dir: Path) -> None:
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    warmer = PieceWarmer(max_chars=20_000)
    first, second = tok.render(body(500, "one")), tok.render(body(500, "two"))
    assert first is not None and second is not None
    assert warmer.offer(tok, first)
    assert not warmer.offer(tok, second)  # would pass the bound: the request encodes it
    assert warmer.dropped == 1
    assert warmer.waiting_chars == len("one shared document " * 500) + 1  # + "\n"
    await warmer.close()  # drops what waits, stops the worker
    assert warmer.waiting_chars == 0
    assert not warmer.offer(tok, second)  # closed: offers are refused
    assert warmer.waiting_chars == 0


async def test_only_pieces_missing_from_the_cache_are_queued(tokenizer_dir: Path) -> None:
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    warmer = PieceWarmer()
    seen = body(300, "seen")
    tok.prompt_ids(seen)  # its pieces are in the LRU now
    rendered = tok.render(seen)
    assert rendered is not None and not warmer.offer(tok, rendered)
    new_question = "a new question about it " * 20
    mixed = tok.render({"messages": [seen["messages"][0],  # type: ignore[index]
                                     {"role": "user", "content": new_question}]})
    assert mixed is not None and warmer.offer(tok, mixed)
    assert warmer.waiting_chars == len(new_question) + 1  # the new piece only (+ "\n")
    await settled(warmer)
    assert warmer.warmed == 1
    await warmer.close()
