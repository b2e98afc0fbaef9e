"""Session bindings: session key -> engine, with a TTL after the last request and a bound
on how many are remembered (least recently used dropped first). O(1) per request."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

_EXPIRE_PER_CALL = 8  # expired entries swept per write: amortised O(1), bounded pause


class Binding(NamedTuple):
    engine_id: str
    epoch: int  # the engine's epoch when bound; forget_engine bumps it (binding broken)
    expires_at: float


class SessionTable:
    def __init__(self, ttl_s: float, max_sessions: int) -> None:
        if ttl_s <= 0 or max_sessions < 1:
            raise ValueError("ttl_s must be > 0 and max_sessions >= 1")
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        # Ordered by last use; with one TTL that is also the order of expiry.
        self._table: OrderedDict[str, Binding] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key: str, now: float) -> Binding | None:
        binding = self._table.get(key)
        if binding is None:
            return None
        if binding.expires_at <= now:
            del self._table[key]
            return None
        return binding

    def bind(self, key: str, engine_id: str, epoch: int, now: float) -> None:
        table = self._table
        table[key] = Binding(engine_id, epoch, now + self.ttl_s)
        table.move_to_end(key)
        for _ in range(_EXPIRE_PER_CALL):  # sweep expired ones from the old end
            first = next(iter(table.values()))
            if first.expires_at > now:
                break
            table.popitem(last=False)
        while len(table) > self.max_sessions:
            table.popitem(last=False)

    def unbind(self, key: str) -> None:
        self._table.pop(key, None)
