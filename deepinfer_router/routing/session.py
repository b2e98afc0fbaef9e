"""session: keep each session on one engine (a binding with a TTL), otherwise spread by
least load. No prompt hashing, so it is cheap and suits engines without prefix caching
or prompts that share nothing. The binding is broken only by the bounded-load guard
(`spill`) or when its engine is gone (ejected, draining, removed, restarted)."""

from __future__ import annotations

from collections.abc import Sequence

from . import reasons
from .base import Candidate, Decision, PolicyBase, RequestFeatures
from .guard import BoundedLoad
from .least_conn import least_loaded
from .sessions import SessionTable


class SessionPolicy(PolicyBase):
    name = "session"
    needs_prompt = False

    def __init__(
        self,
        *,
        session_ttl_s: float = 1800.0,
        max_sessions: int = 200_000,
        balance_factor: float = 1.25,
        balance_slack: int = 0,
    ) -> None:
        self.balance_factor = balance_factor
        self.balance_slack = balance_slack
        self._sessions = SessionTable(session_ttl_s, max_sessions)
        self._epochs: dict[str, int] = {}  # engine id -> epoch (bumped when forgotten)
        self._instances: dict[str, str] = {}
        self._next_epoch = 0
        self._tie = 0

    @property
    def sessions(self) -> SessionTable:
        return self._sessions

    def select(
        self, request: RequestFeatures, candidates: Sequence[Candidate], now: float
    ) -> Decision:
        for cand in candidates:  # a new instance is a restart: bindings to it break
            if self._instances.get(cand.id) != cand.instance:
                self._new_epoch(cand.id, cand.instance)
        guard = BoundedLoad(candidates, self.balance_factor, self.balance_slack)
        key = request.session_key
        if key is None:
            return Decision(self._least_loaded(candidates).id, reasons.LEAST_CONN)
        binding = self._sessions.get(key, now)
        if binding is not None and self._epochs.get(binding.engine_id) == binding.epoch:
            for cand in candidates:
                if cand.id == binding.engine_id:
                    if guard.allows(cand):
                        return Decision(cand.id, reasons.SESSION)
                    return Decision(self._least_loaded(candidates).id, reasons.SPILL)
        return Decision(self._least_loaded(candidates).id, reasons.SESSION_NEW)

    def _least_loaded(self, candidates: Sequence[Candidate]) -> Candidate:
        # The least loaded engine always passes the guard (its load is at most average).
        self._tie += 1
        return least_loaded(candidates, self._tie)

    def _new_epoch(self, engine_id: str, instance: str) -> None:
        self._next_epoch += 1
        self._epochs[engine_id] = self._next_epoch
        self._instances[engine_id] = instance

    def on_routed(self, request: RequestFeatures, decision: Decision, now: float) -> None:
        key = request.session_key
        epoch = self._epochs.get(decision.engine_id)
        if key is not None and epoch is not None:
            self._sessions.bind(key, decision.engine_id, epoch, now)

    def forget_engine(self, engine_id: str) -> None:
        self._epochs.pop(engine_id, None)
        self._instances.pop(engine_id, None)
