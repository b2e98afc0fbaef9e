"""The JSON structural pre-scan: its count is exact where the limit is decided, whatever
the strings hold (commas, brackets, escaped quotes, runs of backslashes)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from deepinfer_router.proxy.json_limits import json_items_exceed


def exact_items(value: Any) -> int:
    """Commas and opening brackets of the compact serialisation, outside strings."""
    if isinstance(value, list):
        return 1 + max(len(value) - 1, 0) + sum(exact_items(v) for v in value)
    if isinstance(value, dict):
        return 1 + max(len(value) - 1, 0) + sum(exact_items(v) for v in value.values())
    return 0


def exceeds(body: bytes, limit: int) -> bool:
    return asyncio.run(json_items_exceed(body, limit))


TRICKY_TEXT = st.text(alphabet=st.sampled_from(list(',[]{}"\\ab\n')), max_size=30)
JSON = st.recursive(
    st.none() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(TRICKY_TEXT, inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(value=JSON, slack=st.integers(-3, 3))
def test_count_matches_the_structure_around_the_limit(value: Any, slack: int) -> None:
    body = json.dumps(value).encode()
    items = exact_items(value)
    limit = max(items + slack, 0)
    assert exceeds(body, limit) == (items > limit)


def test_punctuation_inside_strings_is_not_counted() -> None:
    prompt = ",[{" * 10_000 + '\\"' * 1000 + "\\\\" * 500
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    assert not exceeds(body, 1000)  # 30,000 in the string, 2 outside
    assert exceeds(body, 1)
    assert exceeds(json.dumps({"a": [0] * 100}).encode(), 50)


def test_absurd_shapes_are_refused() -> None:
    many = 1_000
    assert exceeds(b"[" + b"{}," * many + b"{}]", many)
    assert exceeds(b"[" * (many + 2), many)
    assert exceeds(b'{"prompt": [' + b"0," * many + b"0]}", many)
    # More strings than items allowed: refused without walking them.
    assert exceeds(b"[" + b'"a",' * (4 * many) + b'"a"]', many)
    # An unterminated string: the rest counts as it comes.
    assert exceeds(b'{"a": "' + b"," * (2 * many), many)
