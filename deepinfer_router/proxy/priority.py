"""A request's class, told to the engine as vLLM's `priority` (lower is served first)."""

from __future__ import annotations

# The engine-record label that says the engine runs vLLM with --scheduling-policy
# priority (deepinfer-engine launch sets it); vLLM refuses a priority otherwise.
SCHEDULING_LABEL = "scheduling-policy"


def with_priority(body: bytes, priority: int) -> bytes:
    """`body` (a JSON object) with `"priority": N` as its last member: spliced in, not
    re-encoded (the body is relayed as sent). A client's own `priority` earlier in the
    object is overridden: vLLM's JSON parsing keeps the last of duplicate keys."""
    stripped = body.strip()
    if len(stripped) < 2 or stripped[:1] != b"{" or stripped[-1:] != b"}":
        return body  # not an object (the handler only asks for JSON bodies)
    inner = stripped[1:-1].strip()
    sep = b"," if inner else b""
    return stripped[:-1] + sep + b'"priority":' + str(priority).encode() + b"}"
