"""session: keep each session on one engine (a binding with a TTL), otherwise spread by
least load. No prompt hashing, so it is cheap and suits engines without prefix caching
or prompts that share nothing. The binding is broken only by the bounded-load guard
(`spill`) or when its engine is gone (ejected, draining, removed, restarted)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import reasons
from .base import Candidate, Decision, EngineLookup, PolicyBase, RequestFeatures
from .features import MAX_SESSION_KEY
from .guard import BoundedLoad
from .hint_outbox import take_oldest
from .least_conn import least_loaded
from .session_affinity import SessionAffinity, SessionTable

if TYPE_CHECKING:
    from ..settings import RouterSettings


class SessionPolicy(PolicyBase):
    name = "session"
    needs_prompt = False

    @classmethod
    def from_settings(cls, settings: RouterSettings, *, hint_outbox: int = 0) -> SessionPolicy:
        return cls(
            session_ttl_s=settings.session_ttl_s,
            max_sessions=settings.max_sessions,
            balance_factor=settings.balance_factor,
            balance_slack=settings.balance_slack,
            hint_outbox=hint_outbox,
        )

    def __init__(
        self,
        *,
        session_ttl_s: float = 1800.0,
        max_sessions: int = 200_000,
        balance_factor: float = 1.25,
        balance_slack: int = 0,
        hint_outbox: int = 0,
    ) -> None:
        self.balance_factor = balance_factor
        self.balance_slack = balance_slack
        self._affinity = SessionAffinity(session_ttl_s, max_sessions)
        self._tie = 0
        # New bindings for the other routers / workers (export_hints); None: not shared.
        self._outbox: deque[dict[str, Any]] | None = (
            deque(maxlen=hint_outbox) if hint_outbox > 0 else None)

    @property
    def sessions(self) -> SessionTable:
        return self._affinity.table

    def state_sizes(self) -> dict[str, int]:
        return {"sessions": len(self._affinity.table)}

    def select(
        self, request: RequestFeatures, candidates: Sequence[Candidate], now: float
    ) -> Decision:
        affinity = self._affinity
        affinity.sync(candidates)
        key = request.session_key
        if not key:
            return Decision(self._least_loaded(candidates).id, reasons.LEAST_CONN)
        bound = affinity.bound(key, candidates, now)
        if bound is None:
            return Decision(self._least_loaded(candidates).id, reasons.SESSION_NEW)
        guard = BoundedLoad(candidates, self.balance_factor, self.balance_slack)
        if guard.allows(bound):
            return Decision(bound.id, reasons.SESSION, load_bound=guard.limit,
                            session_engine=bound.id)
        return Decision(self._least_loaded(candidates).id, reasons.SPILL,
                        load_bound=guard.limit, session_engine=bound.id)

    def _least_loaded(self, candidates: Sequence[Candidate]) -> Candidate:
        # The least loaded engine always passes the guard (its load is at most average).
        self._tie += 1
        return least_loaded(candidates, self._tie)

    def on_routed(self, request: RequestFeatures, decision: Decision, now: float) -> None:
        key = request.session_key
        self._affinity.bind(key, decision.engine_id, now)
        if self._outbox is not None and key and decision.reason != reasons.SESSION:
            instance = self._affinity.instance_of(decision.engine_id)
            if instance is not None:  # a new or moved binding: the others learn it
                self._outbox.append({"engine": decision.engine_id, "instance": instance,
                                     "session": key})

    def export_hints(self, limit: int = 0) -> list[dict[str, Any]]:
        """Bindings made since the last export, in kv-aware's hint shape (no chain)."""
        return take_oldest(self._outbox, limit)

    def import_hints(
        self, hints: Iterable[Mapping[str, Any]], now: float, lookup: EngineLookup
    ) -> int:
        """Bind the other routers' sessions, for engines the fleet has at that instance."""
        applied = 0
        for hint in hints:
            engine_id, instance, key = hint.get("engine"), hint.get("instance"), hint.get(
                "session")
            if not (isinstance(engine_id, str) and isinstance(key, str)
                    and 0 < len(key) <= MAX_SESSION_KEY):
                continue
            known = lookup(engine_id)
            if known is None or known[0] != instance:
                continue
            if self._affinity.instance_of(engine_id) != instance:
                self._affinity.restarted(engine_id, known[0])
            self._affinity.bind(key, engine_id, now)
            applied += 1
        return applied

    def forget_engine(self, engine_id: str) -> None:
        self._affinity.forget(engine_id)
