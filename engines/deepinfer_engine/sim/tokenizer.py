"""A deterministic stand-in tokenizer and a prefix-stable chat template.

Tokens are the text pieces themselves (strings), about 4 characters each: a word with its
leading space (up to 5 letters; longer words split), up to 3 digits, up to 4 symbols, a
whitespace run, or a newline on its own. Every character belongs to exactly one piece, so
`"".join(tokenize(text)) == text`.

Prefix stability: no piece crosses a newline, so for any text `a` ending in "\\n",
`tokenize(a + b) == tokenize(a) + tokenize(b)`. The chat template ends every message with a
newline, so turn N+1 of a conversation starts with exactly the tokens of turn N, and the
generation prompt `<|assistant|>\\n` is also the start of the assistant message that the
client sends back in turn N+1. The filler words the sim generates are single pieces with
a leading space, so an answer sent back re-tokenizes into the very tokens generated: its
KV blocks are reused in the next turn, as in vLLM.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import xxhash

# Order matters: a space binds to the word after it, as in BPE vocabularies.
_PIECE = re.compile(r"\n| ?[A-Za-z]{1,5}| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]{1,4}|[^\S\n]{1,4}")

GENERATION_PROMPT = "<|assistant|>\n"

# Filler vocabulary: every word is at most 5 letters, so " word" is exactly one token.
FILLER_WORDS: tuple[str, ...] = tuple(
    (
        "lorem ipsum dolor sit amet sed do eius tempo magna ut enim ad minim quis nos "
        "exerc ullam labor nisi ex ea commo duis aute irure in rep volup velit esse cillu "
        "fugia nulla paria sint occae cupid non proid sunt culpa qui offic dese molli anim "
        "id est"
    ).split()
)
FILLER_TOKENS: tuple[str, ...] = tuple(" " + word for word in FILLER_WORDS)


def tokenize(text: str) -> list[str]:
    """Split text into token pieces (pure, deterministic, C-speed regex)."""
    return _PIECE.findall(text)


def detokenize(tokens: Iterable[str]) -> str:
    return "".join(tokens)


def token_ids_as_tokens(ids: Sequence[int]) -> list[str]:
    """A prompt given as token ids (completions API): each id is one token."""
    return [f"\x00{i}" for i in ids]


VOCAB = 128_000  # ids the stand-in tokenizer hands out


def token_id(token: str) -> int:
    """The id of a token piece, as /tokenize and the KV events report it: a prompt's own
    id for a token given as an id, else a stable hash of the piece."""
    if token.startswith("\x00") and token[1:].isdigit():
        return int(token[1:])
    return xxhash.xxh32_intdigest(token.encode()) % VOCAB


def content_text(content: Any) -> str:
    """Message content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        if isinstance(part, dict):
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part.get("type"), str):
                kind = part["type"]
                ref = part.get(kind)
                if isinstance(ref, dict):
                    ref = ref.get("url") or ref.get("data") or ""
                parts.append(f"<{kind}:{ref if isinstance(ref, str) else ''}>")
        elif isinstance(part, str):
            parts.append(part)
    return "".join(parts)


def render_message(role: str, content: Any) -> str:
    return f"<|{role}|>\n{content_text(content)}\n"


def render_chat(
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """`<|role|>\\ncontent\\n` per message, then `<|assistant|>\\n` to prompt the answer."""
    text = "".join(render_message(str(m.get("role", "")), m.get("content")) for m in messages)
    if continue_final_message and messages:
        return text[:-1]  # the answer continues the last message's text
    if add_generation_prompt:
        text += GENERATION_PROMPT
    return text


def filler_offset(prompt_tokens: Sequence[str]) -> int:
    """Where in the filler vocabulary an answer starts: a function of the prompt, so that
    the same prompt always gets the same answer (and a replay reuses its cached blocks)."""
    tail = "".join(prompt_tokens[-64:])
    return xxhash.xxh32_intdigest(tail.encode()) % len(FILLER_TOKENS)


def filler_token(offset: int, index: int) -> str:
    return FILLER_TOKENS[(offset + index) % len(FILLER_TOKENS)]
