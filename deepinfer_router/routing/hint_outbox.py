"""The placements a policy keeps for other routers or workers (`export_hints`)."""

from __future__ import annotations

from collections import deque
from typing import Any

Hint = dict[str, Any]


def take_oldest(box: deque[Hint] | None, limit: int = 0) -> list[Hint]:
    """Remove and return the oldest `limit` hints of `box` (0: all; none without a box)."""
    out: list[Hint] = []
    while box and (limit <= 0 or len(out) < limit):
        out.append(box.popleft())
    return out
