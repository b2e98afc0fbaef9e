"""The cached prompt tokens an engine reports in an answer's usage
(`usage.prompt_tokens_details.cached_tokens`), read without parsing the answer: the
router grades its routing decisions by it and never changes what the client receives.

A byte search is enough and safe: inside a JSON string a quote is escaped, so the bytes
`"cached_tokens":` can only be the key itself, and the last one is the usage's (a
stream's usage chunk comes last)."""

from __future__ import annotations

_KEY = b'"cached_tokens"'
_MAX_DIGITS = 12


def cached_tokens_in(data: bytes) -> int | None:
    """The last `"cached_tokens": N` in `data`, or None (absent, null, malformed, or cut
    by the end of `data`: a stream's chunk boundary can fall inside the usage, and then
    the answer is not graded rather than graded wrongly)."""
    at = data.rfind(_KEY)
    if at < 0:
        return None
    i = at + len(_KEY)
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
