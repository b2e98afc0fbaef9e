"""Members the router adds to a request body for the engine: the request's class as
vLLM's `priority` (lower is served first), and `stream_options.include_usage` when the
router needs a stream's usage that its client did not ask for."""

from __future__ import annotations

# The engine-record label that says the engine runs vLLM with --scheduling-policy
# priority (deepinfer-engine launch sets it); vLLM refuses a priority otherwise.
SCHEDULING_LABEL = "scheduling-policy"


ASK_USAGE = b'"stream_options":{"include_usage":true}'


def priority_member(priority: int) -> bytes:
    return b'"priority":' + str(priority).encode()


def with_members(body: bytes, members: bytes) -> bytes:
    """`body` (a JSON object) with `members` (`"k":v,...`) as its last members: spliced
    in, not re-encoded (the body is relayed as sent). A client's own value of such a key
    earlier in the object is overridden: vLLM's JSON parsing (Python's json) keeps the
    last of duplicate keys."""
    stripped = body.strip()
    if len(stripped) < 2 or stripped[:1] != b"{" or stripped[-1:] != b"}":
        return body  # not an object (the handler only asks for JSON bodies)
    inner = stripped[1:-1].strip()
    sep = b"," if inner else b""
    return stripped[:-1] + sep + members + b"}"
