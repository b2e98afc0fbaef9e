"""Session bindings: session key -> engine, with a TTL after the last request and a bound
on how many are remembered (least recently used dropped first). O(1) per request.
`SessionAffinity` is the session step the policies share."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .base import Candidate

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


class SessionAffinity:
    """The session step both session-keeping policies use (session, kv-aware): which
    candidate a session is bound to, binding after a decision, and breaking bindings
    when an engine restarts (a new instance) or leaves. An empty or missing key is no
    session. O(1) per request plus one dict lookup per candidate in `sync`."""

    def __init__(self, ttl_s: float, max_sessions: int) -> None:
        self.table = SessionTable(ttl_s, max_sessions)
        self._epochs: dict[str, int] = {}  # engine id -> epoch (bumped when restarted)
        self._instances: dict[str, str] = {}
        self._next_epoch = 0

    def sync(self, candidates: Iterable[Candidate]) -> None:
        """A candidate with a new instance is a restart: bindings to it break."""
        instances = self._instances
        for cand in candidates:
            if instances.get(cand.id) != cand.instance:
                self.restarted(cand.id, cand.instance)

    def restarted(self, engine_id: str, instance: str) -> None:
        self._next_epoch += 1
        self._epochs[engine_id] = self._next_epoch
        self._instances[engine_id] = instance

    def instance_of(self, engine_id: str) -> str | None:
        return self._instances.get(engine_id)

    def forget(self, engine_id: str) -> None:
        """The engine left: bindings to it break (lazily, by epoch)."""
        self._epochs.pop(engine_id, None)
        self._instances.pop(engine_id, None)

    def bound(
        self, key: str | None, candidates: Sequence[Candidate], now: float
    ) -> Candidate | None:
        """The candidate `key` is bound to, when the binding is live, its engine has not
        restarted since and is among the candidates (healthy, not draining)."""
        if not key:
            return None
        binding = self.table.get(key, now)
        if binding is None or self._epochs.get(binding.engine_id) != binding.epoch:
            return None
        for cand in candidates:
            if cand.id == binding.engine_id:
                return cand
        return None

    def bind(self, key: str | None, engine_id: str, now: float) -> None:
        epoch = self._epochs.get(engine_id)
        if key and epoch is not None:
            self.table.bind(key, engine_id, epoch, now)
