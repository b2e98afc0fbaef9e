"""Request features: the chained prefix hashes (property tests) and prompt extraction."""

from __future__ import annotations

import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from deepinfer_router.routing.features import (
    chain_hashes,
    model_seed,
    prompt_text,
    request_features,
    session_key,
)

texts = st.text(max_size=600)
ascii_texts = st.text(alphabet=st.characters(max_codepoint=127), max_size=600)
chunks = st.integers(min_value=1, max_value=64)


def reference(text: str, chunk: int, model: str) -> list[int]:
    """The definition, written the slow obvious way."""
    prev = model_seed(model)
    out = []
    for i in range(len(text) // chunk):
        prev = xxhash.xxh3_64_intdigest(
            text[i * chunk : (i + 1) * chunk].encode("utf-8", "surrogatepass"), prev
        )
        out.append(prev)
    return out


@given(texts | ascii_texts, chunks)
def test_matches_the_definition(text: str, chunk: int) -> None:
    assert chain_hashes(text, chunk, "m") == reference(text, chunk, "m")


@given(texts, texts, chunks)
def test_prefix_stable(text: str, more: str, chunk: int) -> None:
    """A prompt's hashes are a prefix of its continuation's (a chat's next turn)."""
    short = chain_hashes(text, chunk, "m")
    long = chain_hashes(text + more, chunk, "m")
    assert long[: len(short)] == short


@given(ascii_texts, texts, chunks)
def test_ascii_then_unicode_is_prefix_stable(text: str, more: str, chunk: int) -> None:
    """The ASCII fast path and the general path agree on the ASCII part."""
    assert chain_hashes(text + more, chunk, "m")[: len(text) // chunk] == chain_hashes(
        text, chunk, "m"
    )


@given(texts, chunks)
def test_one_hash_per_complete_chunk(text: str, chunk: int) -> None:
    hashes = chain_hashes(text, chunk, "m")
    assert len(hashes) == len(text) // chunk
    for i, h in enumerate(hashes):  # h[i] is a function of exactly text[:(i+1)*chunk]
        assert chain_hashes(text[: (i + 1) * chunk], chunk, "m")[-1] == h


@settings(max_examples=200)
@given(st.text(min_size=1, max_size=400), chunks, st.data())
def test_a_change_moves_hashes_from_its_chunk_on(text: str, chunk: int, data: st.DataObject):
    pos = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    new_char = data.draw(st.characters().filter(lambda c: c != text[pos]))
    changed = text[:pos] + new_char + text[pos + 1 :]
    a, b = chain_hashes(text, chunk, "m"), chain_hashes(changed, chunk, "m")
    first = pos // chunk
    assert a[:first] == b[:first]
    assert all(x != y for x, y in zip(a[first:], b[first:], strict=True))


@given(texts, chunks, st.integers(min_value=1, max_value=700))
def test_cap_hashes_only_the_first_chars(text: str, chunk: int, cap: int) -> None:
    assert chain_hashes(text, chunk, "m", max_chars=cap) == chain_hashes(text[:cap], chunk, "m")


def test_seeded_by_model() -> None:
    text = "x" * 300
    assert chain_hashes(text, 64, "a")[0] != chain_hashes(text, 64, "b")[0]
    assert chain_hashes(text, 64, "a") == chain_hashes(text, 64, "a")


def test_chat_turns_extend_each_other() -> None:
    turn1 = {
        "messages": [{"role": "system", "content": "S" * 300}, {"role": "user", "content": "hi"}]
    }
    turn2 = {
        "messages": [
            *turn1["messages"],
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "more"}]},
        ]
    }
    assert prompt_text(turn2).startswith(prompt_text(turn1))
    f1 = request_features(turn1, "m", None, with_prompt=True, chunk_chars=64, max_chars=0)
    f2 = request_features(turn2, "m", None, with_prompt=True, chunk_chars=64, max_chars=0)
    assert f1.chunk_hashes and f2.chunk_hashes[: len(f1.chunk_hashes)] == f1.chunk_hashes
    assert f1.prompt_chars == len(prompt_text(turn1))


def test_completion_prompts() -> None:
    assert prompt_text({"prompt": "abc"}) == "abc"
    assert prompt_text({"prompt": ["abc", "def"]}) == "abc"
    assert prompt_text({"prompt": [1, 2, 3]}) == "1 2 3"
    assert prompt_text({"input": "emb"}) == "emb"
    assert prompt_text({}) == ""


def test_without_prompt_no_hashing() -> None:
    f = request_features({"prompt": "x" * 1000}, "m", "s", with_prompt=False, chunk_chars=8,
                         max_chars=0)
    assert f.chunk_hashes == [] and f.session_key == "s"


def test_session_key_header_then_user() -> None:
    assert session_key("abc", {"user": "u"}) == "abc"
    assert session_key(None, {"user": "u"}) == "u"
    assert session_key("", {"user": ""}) is None
    assert session_key(None, {"user": 5}) is None
    assert session_key(None, None) is None


def test_prompt_cut_at_max_chars_keeps_the_same_prefix_hashes() -> None:
    """The cut prompt hashes exactly like the first max_chars characters of the whole
    one, and prompt_chars still counts the whole prompt (for the prefill load)."""
    messages = [{"role": "user", "content": f"message {i} " + "x" * 300} for i in range(200)]
    body = {"messages": messages}
    whole = prompt_text(body)
    assert prompt_text(body, 1000) == whole[:1000]
    cut = request_features(body, "m", None, with_prompt=True, chunk_chars=64, max_chars=1000)
    full = request_features(body, "m", None, with_prompt=True, chunk_chars=64, max_chars=0)
    assert cut.chunk_hashes == full.chunk_hashes[: 1000 // 64]
    assert cut.prompt_chars == full.prompt_chars == len(whole)


def test_token_id_prompt_is_not_turned_into_text_past_the_cap() -> None:
    """A huge token-id prompt: only the ids that fit the cap become text; the length of
    the rest is estimated from them."""
    ids = [12345] * 2_000_000
    text = prompt_text({"prompt": ids}, 600)
    assert text == " ".join(["12345"] * 101)[:600]
    f = request_features({"prompt": ids}, "m", None, with_prompt=True, chunk_chars=64,
                         max_chars=600)
    assert abs(f.prompt_chars - 6 * len(ids)) < 6 * len(ids) * 0.01
    assert prompt_text({"prompt": [[7, 8, 9], [1]]}, 3) == "7 8"
