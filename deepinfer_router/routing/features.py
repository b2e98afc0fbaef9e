"""Request features: the prompt text the engine sees first, cut into fixed-size character
chunks and hashed as a chain (each hash covers everything before it), seeded by model.

Cost: one pass over the prompt (encode once, one xxh3 call per chunk, ~0.1 µs each). With
the default 256-character chunks a 32,000-character prompt is 125 chunks, about 17 µs
(benchmarks/decision.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import xxhash

from .base import RequestFeatures


class _PromptText:
    """The prompt's text, collected piece by piece up to a budget of characters: pieces
    past the budget are counted (`total`) but never joined, so a huge prompt costs its
    length in arithmetic, not in memory."""

    __slots__ = ("budget", "pieces", "total")

    def __init__(self, max_chars: int) -> None:
        self.budget = max_chars if max_chars > 0 else -1  # -1: no cap
        self.pieces: list[str] = []
        self.total = 0

    def add(self, piece: str) -> None:
        self.total += len(piece)
        budget = self.budget
        if budget < 0:
            self.pieces.append(piece)
        elif budget > 0:
            self.pieces.append(piece if len(piece) <= budget else piece[:budget])
            self.budget = max(0, budget - len(piece))

    def add_token_ids(self, ids: list[Any]) -> None:
        """Token ids as decimal numbers joined by spaces. Only the ids that fit the budget
        are turned into text; the length of the rest is estimated from those."""
        if self.budget < 0:
            self.add(" ".join(str(t) for t in ids if isinstance(t, int)))
            return
        # Every id takes at least 2 characters with its space: this many cover the budget.
        head = ids[: self.budget // 2 + 1]
        text = " ".join(str(t) for t in head if isinstance(t, int))
        self.add(text)
        if len(ids) > len(head) and head:
            self.total += round(len(text) / len(head) * (len(ids) - len(head)))

    def text(self) -> str:
        return "".join(self.pieces)


def _add_content(out: _PromptText, content: Any) -> None:
    if isinstance(content, str):
        out.add(content)
        return
    if isinstance(content, list):  # multimodal parts: text verbatim, others by reference
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                out.add(text if isinstance(text, str) else "")
            elif isinstance(kind, str):
                ref = part.get(kind)
                if isinstance(ref, dict):
                    ref = ref.get("url") or ref.get("data") or ""
                out.add(f"<{kind}:{ref if isinstance(ref, str) else ''}>")


def _collect_prompt(body: Mapping[str, Any], max_chars: int) -> _PromptText:
    out = _PromptText(max_chars)
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if isinstance(msg, dict):
                role = msg.get("role")
                out.add(f"<|{role if isinstance(role, str) else ''}|>")
                _add_content(out, msg.get("content"))
                out.add("\n")
        return out
    for key in ("prompt", "input", "text", "query"):
        value = body.get(key)
        if isinstance(value, str):
            out.add(value)
            return out
        if isinstance(value, list) and value:
            first = value[0]
            if isinstance(first, str):
                out.add(first)
                return out
            if isinstance(first, int):  # token ids
                out.add_token_ids(value)
                return out
            if isinstance(first, list):  # batch of token-id lists
                out.add_token_ids(first)
                return out
    return out


def prompt_text(body: Mapping[str, Any], max_chars: int = 0) -> str:
    """The text an engine will see first, in order, cut at `max_chars` (> 0) without
    building the rest. Chat messages are joined with their roles so that turn N+1 starts
    with exactly the text of turn N."""
    return _collect_prompt(body, max_chars).text()


def model_seed(model: str) -> int:
    """The chain's starting value: hashes of different models never meet."""
    return xxhash.xxh64_intdigest(model.encode("utf-8", "surrogatepass"))


def chain_hashes(text: str, chunk_chars: int, seed: str, max_chars: int = 0) -> list[int]:
    """Hashes of the complete `chunk_chars`-character chunks of `text`:
    h[i] = xxh3_64(utf8(text[i*c:(i+1)*c]), seed=h[i-1]), h[-1] = xxh64(model).

    So h[i] is a function of exactly text[:(i+1)*c]: a prompt and its continuation share
    every hash of their common complete chunks, and differ from the first chunk that
    differs. Only complete chunks are hashed (a partial tail would differ between a
    prompt and its continuation). `max_chars` > 0 caps the hashed length.

    Chunks are cut on characters, not bytes, so that capacities converted with
    chars-per-token mean the same for any script. ASCII text (the common case) is
    encoded once and sliced as bytes, which is the same thing and faster.
    """
    if chunk_chars <= 0:
        raise ValueError("chunk_chars must be positive")
    if max_chars > 0 and len(text) > max_chars:
        text = text[:max_chars]
    step = chunk_chars
    n = len(text) // step
    out: list[int] = []
    if n == 0:
        return out
    append = out.append
    digest = xxhash.xxh3_64_intdigest
    prev = model_seed(seed)
    if text.isascii():
        data = text.encode("ascii")
        end = step
        for start in range(0, n * step, step):
            prev = digest(data[start:end], prev)
            append(prev)
            end += step
    else:
        for start in range(0, n * step, step):
            prev = digest(text[start : start + step].encode("utf-8", "surrogatepass"), prev)
            append(prev)
    return out


def session_key(header_value: str | None, body: Mapping[str, Any] | None) -> str | None:
    """The session key: the session header when present and non-empty, else the body's
    `user` field (OpenAI's end-user id), else None."""
    if header_value:
        return header_value
    if body is not None:
        user = body.get("user")
        if isinstance(user, str) and user:
            return user
    return None


def request_features(
    body: Mapping[str, Any],
    model: str,
    session_key: str | None,
    *,
    with_prompt: bool,
    chunk_chars: int,
    max_chars: int,
) -> RequestFeatures:
    if not with_prompt:
        return RequestFeatures(model=model, session_key=session_key)
    prompt = _collect_prompt(body, max_chars)
    return RequestFeatures(
        model=model,
        session_key=session_key,
        chunk_hashes=chain_hashes(prompt.text(), chunk_chars, model, max_chars),
        prompt_chars=prompt.total,  # the whole prompt's length, for the prefill load
    )
