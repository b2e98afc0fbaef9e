"""A structural pre-scan of a JSON request body, before it is parsed.

orjson parses fast, but it materialises every value: a 3 MiB `[{},{},...]` becomes about
a million dicts (117 MiB of Python objects), and parsing them stalls the event loop. No
inference request needs that many values: a 128k-token prompt given as token ids is
128k values, and OpenAI's embeddings endpoint caps a request at 2,048 inputs and
300,000 tokens. So the body's items are counted first, and a body with more than
`--max-json-items` is refused with 400 before it is parsed. Parsing stays in C (orjson).

Items are the commas and opening brackets outside strings: one per array element or
object member after the first, one per container. `bytes.count` over the whole body (C,
about 1 ms per 8 MiB) gives an upper bound that also counts those inside strings; only
when it exceeds the limit are strings skipped exactly, quote by quote (`bytes.find`, C
speed over the text between quotes; a quote preceded by an odd run of backslashes is
escaped), yielding to the event loop every few thousand quotes so that no body stalls
it. A body with more than four quote characters per allowed item is refused without
that pass (a string is a value or a member's key, two quotes each; escaped quotes
inside strings are allowed up to twice that again).
"""

from __future__ import annotations

import asyncio

_QUOTES_PER_SLICE = 4096  # then let the event loop run (a few ms of work)


def items_upper_bound(data: bytes, start: int = 0, end: int | None = None) -> int:
    end = len(data) if end is None else end
    return data.count(b",", start, end) + data.count(b"{", start, end) + data.count(
        b"[", start, end
    )


def _escaped(body: bytes, quote: int, floor: int) -> bool:
    """Is the quote at `quote` escaped: preceded by an odd run of backslashes (counted
    no further back than `floor`)?"""
    window = 64
    while True:
        start = max(floor, quote - window)
        segment = body[start:quote]
        run = len(segment) - len(segment.rstrip(b"\\"))
        if run < len(segment) or start == floor:
            return run % 2 == 1
        window *= 4  # a long run of backslashes: look further back, C speed


async def json_items_exceed(body: bytes, limit: int, upper_bound: int | None = None) -> bool:
    """True when `body` holds more than `limit` items (as defined above). `upper_bound`:
    `items_upper_bound(body)` when the caller has it already."""
    if (items_upper_bound(body) if upper_bound is None else upper_bound) <= limit:
        return False
    if body.count(b'"') > 4 * (limit + 1):
        return True
    find = body.find
    items = 0
    pos = 0  # outside strings from here
    quotes = 0
    while True:
        opening = find(b'"', pos)
        if opening < 0:
            return items + items_upper_bound(body, pos) > limit
        items += items_upper_bound(body, pos, opening)
        if items > limit:
            return True
        closing = opening
        while True:
            closing = find(b'"', closing + 1)
            quotes += 1
            if quotes % _QUOTES_PER_SLICE == 0:
                await asyncio.sleep(0)
            if closing < 0:  # unterminated: not JSON; count the rest as it comes
                return items + items_upper_bound(body, opening) > limit
            if not _escaped(body, closing, opening + 1):
                break
        pos = closing + 1
