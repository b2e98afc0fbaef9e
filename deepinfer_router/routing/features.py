"""Request features: the prompt text the engine sees first, cut into fixed-size character
chunks and hashed as a chain (each hash covers everything before it), seeded by model."""

from __future__ import annotations

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


def prompt_text(body: dict[str, Any]) -> str:
    """The text an engine will see first, in order. Chat messages are joined with their
    roles so that turn N+1 starts with exactly the text of turn N."""
    messages = body.get("messages")
    if isinstance(messages, list):
        pieces: list[str] = []
        for msg in messages:
            if isinstance(msg, dict):
                role = msg.get("role")
                pieces.append(f"<|{role if isinstance(role, str) else ''}|>")
                pieces.append(_content_text(msg.get("content")))
                pieces.append("\n")
        return "".join(pieces)
    for key in ("prompt", "input", "text", "query"):
        value = body.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            first = value[0]
            if isinstance(first, str):
                return first
            if isinstance(first, int):  # token ids
                return " ".join(str(t) for t in value if isinstance(t, int))
            if isinstance(first, list):  # batch of token-id lists
                return " ".join(str(t) for t in first if isinstance(t, int))
    return ""


def chain_hashes(text: str, chunk_chars: int, seed: str, max_chars: int = 0) -> list[int]:
    """Hashes of the complete chunks of `text`: h[i] = xxh64(h[i-1] || chunk_i).

    Only complete chunks are hashed: a partial tail would differ between a prompt and
    its continuation and so never match anything useful.
    """
    if max_chars > 0 and len(text) > max_chars:
        text = text[:max_chars]
    data = text.encode("utf-8", "surrogatepass")
    # Chunk on encoded bytes: same cost and boundaries stay stable for a given text.
    step = chunk_chars
    n = len(data) // step
    out: list[int] = []
    prev = xxhash.xxh64_intdigest(seed.encode())
    digest = xxhash.xxh3_64_intdigest
    for i in range(n):
        prev = digest(data[i * step : (i + 1) * step], prev)
        out.append(prev)
    return out


def request_features(
    body: dict[str, Any],
    model: str,
    session_key: str | None,
    *,
    with_prompt: bool,
    chunk_chars: int,
    max_chars: int,
) -> RequestFeatures:
    if not with_prompt:
        return RequestFeatures(model=model, session_key=session_key)
    text = prompt_text(body)
    return RequestFeatures(
        model=model,
        session_key=session_key,
        chunk_hashes=chain_hashes(text, chunk_chars, model, max_chars),
        prompt_chars=len(text),
    )
