"""The token counts an engine reports in an answer's usage (`prompt_tokens`,
`completion_tokens`, `prompt_tokens_details.cached_tokens`), read without parsing the
answer: the router grades its routing decisions by the cached tokens and corrects
tenants' charges and token budgets by the rest, and never changes what the client
receives.

A byte search is enough and safe: inside a JSON string a quote is escaped, so the bytes
`"cached_tokens":` can only be the key itself, and the last one is the usage's (a
stream's usage chunk comes last)."""

from __future__ import annotations

from typing import NamedTuple

_KEY = b'"cached_tokens"'
_PROMPT = b'"prompt_tokens"'
_COMPLETION = b'"completion_tokens"'
_MAX_DIGITS = 12


class Usage(NamedTuple):
    prompt: int
    completion: int
    cached: int | None  # None: the engine does not report it (vLLM without
    # --enable-prompt-tokens-details)


def usage_in(data: bytes) -> Usage | None:
    """The answer's usage, when `data` holds all of it (a non-streamed answer, or a
    stream's usage chunk); None otherwise."""
    completion = _last_int(data, _COMPLETION)
    if completion is None:
        return None
    prompt = _last_int(data, _PROMPT)
    if prompt is None:
        return None
    return Usage(prompt, completion, cached_tokens_in(data))


def cached_tokens_in(data: bytes) -> int | None:
    """The last `"cached_tokens": N` in `data`, or None (absent, null, malformed, or cut
    by the end of `data`: a stream's chunk boundary can fall inside the usage, and then
    the answer is not graded rather than graded wrongly)."""
    return _last_int(data, _KEY)


def _last_int(data: bytes, key: bytes) -> int | None:
    at = data.rfind(key)
    if at < 0:
        return None
    i = at + len(key)
    n = len(data)
    while i < n and data[i] in b" \t\r\n":
        i += 1
    if i >= n or data[i] != 0x3A:  # ':'
        return None
    i += 1
    while i < n and data[i] in b" \t\r\n":
        i += 1
    j = i
    while j < n and 0x30 <= data[j] <= 0x39:
        if j - i >= _MAX_DIGITS:  # no engine caches that many tokens
            return None
        j += 1
    if j == i or j == n:  # no digits, or they may go on in the next chunk of a stream
        return None
    return int(data[i:j])


_EMPTY_CHOICES = b'"choices":[]'
_USAGE_OBJECT = b'"usage":{'
_MAX_PENDING = 65536


class UsageStripper:
    """Takes the usage event out of a stream whose client did not ask for it (the router
    asked the engine for it, to settle a tenant's token budget). SSE events end with a
    blank line; the usage event is the one with no choices and a usage object (vLLM's
    and OpenAI's last event before [DONE], written compactly as vLLM does). Bytes are
    held back only while an event is incomplete, which vLLM's streams never leave
    between chunks; a stream framed otherwise (events not ending in a blank line within
    _MAX_PENDING bytes) is passed through as it comes, usage included."""

    __slots__ = ("_off", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        self._off = False

    def feed(self, chunk: bytes) -> bytes:
        if self._off or (not self._pending and chunk.endswith(b"\n\n")
                         and _EMPTY_CHOICES not in chunk):
            return chunk  # the usual case: whole events, none of them the usage
        data = self._pending + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            if len(data) > _MAX_PENDING:  # not framed as expected: stop holding bytes
                self._off, self._pending = True, b""
                return data
            self._pending = data
            return b""
        complete, self._pending = data[:cut + 2], data[cut + 2:]
        if _EMPTY_CHOICES not in complete:
            return complete
        events = complete[:-2].split(b"\n\n")
        kept = [e for e in events if not (_EMPTY_CHOICES in e and _USAGE_OBJECT in e)]
        return b"".join(e + b"\n\n" for e in kept)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest
