"""Request features: the prompt text the engine sees first, cut into fixed-size character
chunks and hashed as a chain (each hash covers everything before it), seeded by model.

Cost: one pass over the prompt (encode once, one xxh3 call per chunk, ~0.1 µs each). With
the default 256-character chunks a 32,000-character prompt is 125 chunks, about 17 µs
(benchmarks/decision.py).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Mapping
from typing import Any

import xxhash

from .base import RequestFeatures


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: text verbatim, others by reference
        parts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                parts.append(text if isinstance(text, str) else "")
            elif isinstance(kind, str):
                ref = part.get(kind)
                if isinstance(ref, dict):
                    ref = ref.get("url") or ref.get("data") or ""
                parts.append(f"<{kind}:{ref if isinstance(ref, str) else ''}>")
        return "".join(parts)
    return ""


def _token_ids_text(ids: list[Any], budget: int) -> tuple[str, int]:
    """Token ids as decimal numbers joined by spaces, and the length of all of it. Only
    the ids that fit `budget` characters become text; the length of the rest is
    estimated from them."""
    head = ids[: budget // 2 + 1]  # every id takes at least 2 characters with its space
    text = " ".join(str(t) for t in head if isinstance(t, int))
    if len(ids) == len(head):
        return text, len(text)
    return text, len(text) + round(len(text) / len(head) * (len(ids) - len(head)))


def _collect_prompt(body: Mapping[str, Any], max_chars: int) -> tuple[str, int]:
    """The prompt's first `max_chars` characters (all when 0) and the whole prompt's
    length. Pieces past the cap are counted, never joined: a huge prompt costs its
    length in arithmetic, not in memory."""
    budget = max_chars if max_chars > 0 else sys.maxsize
    messages = body.get("messages")
    if isinstance(messages, list):
        pieces: list[str] = []
        total = 0
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            role = msg.get("role")
            marker = f"<|{role if isinstance(role, str) else ''}|>"
            content = _content_text(msg.get("content"))
            if total < budget:
                room = budget - total - len(marker)
                # Only the piece that crosses the cap is cut (a copy of what fits).
                pieces += (marker, content if len(content) <= room else content[: max(room, 0)],
                           "\n")
            total += len(marker) + len(content) + 1
        text = "".join(pieces)
        return (text if len(text) <= budget else text[:budget]), total
    for key in ("prompt", "input", "text", "query"):
        value = body.get(key)
        if isinstance(value, str):
            return value[:budget], len(value)
        if isinstance(value, list) and value:
            first = value[0]
            if isinstance(first, str):
                return first[:budget], len(first)
            if isinstance(first, int):  # token ids
                text, total = _token_ids_text(value, budget)
                return text[:budget], total
            if isinstance(first, list):  # batch of token-id lists
                text, total = _token_ids_text(first, budget)
                return text[:budget], total
    return "", 0


def prompt_text(body: Mapping[str, Any], max_chars: int = 0) -> str:
    """The text an engine will see first, in order, cut at `max_chars` (> 0) without
    building the rest. Chat messages are joined with their roles so that turn N+1 starts
    with exactly the text of turn N."""
    return _collect_prompt(body, max_chars)[0]


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


MAX_SESSION_KEY = 256  # characters; longer session keys are hashed


def session_key(header_value: str | None, body: Mapping[str, Any] | None) -> str | None:
    """The session key: the session header when present and non-empty, else the body's
    `user` field (OpenAI's end-user id), else None (an empty value is no session). Keys
    longer than MAX_SESSION_KEY characters become a 128-bit hash of themselves: the
    session table holds up to --max-sessions keys, so their size is bounded too."""
    key: str | None = header_value or None
    if key is None and body is not None:
        user = body.get("user")
        if isinstance(user, str) and user:
            key = user
    if key is not None and len(key) > MAX_SESSION_KEY:
        key = "h:" + xxhash.xxh3_128_hexdigest(key.encode("utf-8", "surrogatepass"))
    return key


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
    text, total = _collect_prompt(body, max_chars)
    return RequestFeatures(
        model=model,
        session_key=session_key,
        chunk_hashes=chain_hashes(text, chunk_chars, model, max_chars),
        prompt_chars=total,  # the whole prompt's length, for the prefill load
        prompt_token_ids=_token_ids(body),
    )


MAX_TOKEN_IDS = 1 << 17  # longer prompts are looked up by their first ones


def _token_ids(body: Mapping[str, Any]) -> array[int] | None:
    """A completions prompt given as token ids (one list of ints), else None."""
    prompt = body.get("prompt")
    if not isinstance(prompt, list) or not prompt or "messages" in body:
        return None
    head = prompt[:MAX_TOKEN_IDS]
    if not all(type(t) is int and 0 <= t < 1 << 31 for t in head):
        return None
    return array("i", head)
