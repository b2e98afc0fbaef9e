"""One attempt on one engine, and the one place that accounts for it.

The fleet (in-flight count, health verdict), the policy (`on_routed`, `on_first_token`,
`on_complete`), admission (a waiter for an engine slot) and the metrics hear about an
attempt through three calls here: `start`, `first_token`, `end`. Nothing else in the
proxy tells them, so every attempt is counted exactly once whichever way it ends (an
answer, an engine failure, a client that left, a cancellation).
"""

from __future__ import annotations

import time

from aiohttp import web

from ..decision_log import DecisionRecord, grade
from ..fleet import EngineState
from ..routing.base import Decision
from ..state import RouterState
from .call import Call
from .failures import EngineFailure, Retryable
from .relay import Relay


class Attempts:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.relay = Relay(state, self.first_token)

    async def run(self, call: Call, decision: Decision, now: float) -> web.StreamResponse:
        """Send `call` to the engine `decision` names and relay its answer. Raises
        EngineFailure while nothing has reached the client (Retryable: try another)."""
        engine = self.start(call, decision, now)
        if engine is None:  # left between selection and now
            raise Retryable("gone", 503, "engine left the fleet")
        failure: EngineFailure | None = None
        try:
            return await self.relay.exchange(call, engine)
        except EngineFailure as exc:
            failure = exc
            raise
        finally:
            self.end(call, engine, failure, now, time.monotonic())

    def start(self, call: Call, decision: Decision, now: float) -> EngineState | None:
        engine = self.state.fleet.request_started(decision.engine_id)
        if engine is None:
            return None
        self.state.policy.on_routed(call.features, decision, now)
        call.engine, call.route = engine.id, decision.reason
        call.status = 499
        call.answered = False
        call.cached_tokens = None
        return engine

    def first_token(self, call: Call, engine_id: str, now: float) -> None:
        """A stream's first chunk reached the client."""
        self.state.metrics.ttft_by(call.model).observe(now - call.started)
        self.state.policy.on_first_token(call.features, engine_id, now)

    def end(
        self,
        call: Call,
        engine: EngineState,
        failure: EngineFailure | None,
        routed_at: float,
        end: float,
    ) -> None:
        """The attempt is over: answered (call.status), failed before the client got a
        byte (`failure`: counted here, the client's answer is the dispatcher's), broken
        mid-stream (502/504), or the client left (499: no verdict on the engine)."""
        state = self.state
        fleet = state.fleet
        engine_ok = failure is None and call.status not in (502, 504)
        if failure is not None:
            state.metrics.upstream_errors.labels(engine.id, failure.kind).inc()
        if engine_ok and call.status == 499:
            fleet.request_abandoned(engine, None if call.answered else routed_at)
        else:
            fleet.request_finished(engine, engine_ok, end)
        if state.admission.engine_waiting:
            state.admission.engine_slot_freed(engine.record.models)
        state.policy.on_complete(call.features, engine.id, engine_ok, end)
        if failure is None:  # a failure is counted once the dispatcher gives up
            state.metrics.requests_by(call.model, engine.id, call.route, str(call.status)).inc()
            state.metrics.tenant_requests_by(call.tenant_label, call.klass,
                                             str(call.status)).inc()
            state.metrics.request_duration_by(call.model).observe(end - call.started)
            if call.cached_tokens is not None and call.decision is not None \
                    and call.status == 200:
                self._grade(call.decision, call.cached_tokens)

    def _grade(self, record: DecisionRecord, cached_tokens: int) -> None:
        """The engine reported what it had cached: grade the decision that sent it there."""
        g = grade(record, cached_tokens)
        if g is None:  # the policy predicted nothing
            return
        correction = self.state.estimate_correction
        if correction is not None and record.prompt_ids:  # prompt length known exactly
            estimated = record.estimated(record.decision.engine_id)
            if estimated is not None:  # the chosen engine was judged by the estimate
                correction.observe(record.decision.engine_id, estimated, cached_tokens)
        metrics = self.state.metrics
        metrics.cache_prediction_error.observe(g.error_tokens)
        if g.misroute:
            metrics.misroutes_by(record.decision.reason).inc()
