"""The sim's tokenizer and chat template: deterministic, lossless, prefix-stable."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from deepinfer_engine.sim.tokenizer import (
    FILLER_TOKENS,
    GENERATION_PROMPT,
    filler_token,
    render_chat,
    tokenize,
)

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)


@given(texts)
def test_tokenize_is_lossless(text: str) -> None:
    assert "".join(tokenize(text)) == text


@given(texts, texts)
def test_concatenation_after_newline_is_prefix_stable(a: str, b: str) -> None:
    a = a + "\n"
    assert tokenize(a + b) == tokenize(a) + tokenize(b)


def test_about_four_characters_per_token() -> None:
    text = (
        "Routing quality is the reason deepinfer exists, and it can only be measured "
        "against engines whose KV cache behaves like the real thing. "
    ) * 20
    ratio = len(text) / len(tokenize(text))
    assert 3.0 < ratio < 5.5


def test_chat_turn_n_plus_one_starts_with_turn_n_tokens() -> None:
    turn1 = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is a KV cache?"},
    ]
    answer = "".join(filler_token(3, i) for i in range(20))
    turn2 = [*turn1, {"role": "assistant", "content": answer},
             {"role": "user", "content": "And prefix caching?"}]
    t1 = tokenize(render_chat(turn1))
    t2 = tokenize(render_chat(turn2))
    assert render_chat(turn1).endswith(GENERATION_PROMPT)
    assert t2[: len(t1)] == t1  # generation prompt included: it opens the answer
    # the generated tokens re-tokenize to themselves when the client sends them back
    gen = [filler_token(3, i) for i in range(20)]
    assert t2[len(t1) : len(t1) + len(gen)] == gen


def test_content_parts_and_none() -> None:
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]
    assert render_chat([{"role": "user", "content": parts}], add_generation_prompt=False) == (
        "<|user|>\nhello world\n"
    )
    assert render_chat([{"role": "assistant", "content": None}], False) == "<|assistant|>\n\n"


def test_filler_tokens_are_single_tokens() -> None:
    for tok in FILLER_TOKENS:
        assert tokenize(tok) == [tok]
