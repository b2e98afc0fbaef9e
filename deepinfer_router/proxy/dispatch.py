"""Admission and retries: from a parsed request to an answer from some engine.

The model must be served (else 404, before any hashing); the policy computes its prompt
features; a router-wide slot is taken (waiting in admission's one bounded queue); then
engines are tried in turn. A failure before any byte reached the client is retried on
another engine (up to --max-retries, jittered exponential backoff) while an untried one
serves the model; when every untried engine is at --max-inflight-per-engine the request
waits in the same queue for room. Which failures retry: failures.py and the relay.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from ..admission import AdmissionRejected
from ..budgets.gate import BudgetGate
from ..errors import RouterError
from ..fairness.budgets import ratelimit_headers, refusal_message
from ..routing.base import Candidate
from ..routing.features import MAX_TOKEN_IDS
from ..state import REQUEST_MODEL, RouterState
from .attempt import Attempts
from .call import Call
from .failures import EngineFailure, EngineTimeout, Retryable, UpstreamFailure

log = logging.getLogger("deepinfer.proxy")

# Prompts with more characters than this left to encode (not in the tokenizer's LRU) are
# encoded off the event loop (the encoding releases the GIL): 8k characters of text never
# seen before take ~1.5 ms, more would stall every other request
# (benchmarks/precise_decision.py). Below it the thread hand-off costs more than it saves
# (benchmarks/routing.py --indexes approximate,precise: ~1 ms of TTFT on multi-turn chat).
_INLINE_TOKENIZE_CHARS = 1 << 13
# Longer prompts are not tokenized (the estimate routes them): the ids looked up are
# capped at MAX_TOKEN_IDS anyway, and a prompt this long is an outlier to bound.
_MAX_TOKENIZE_CHARS = MAX_TOKEN_IDS * 8
# A prompt with more new text than this is tokenized head first: its first _HEAD_TOKENS
# ids, and the rest only if some engine holds every block of that head. A prompt no engine
# has seen (the common case for new text) costs a few hundred tokens before it is routed;
# the rest is encoded after, off its path (prompt_tokens/warmer.py), for when it returns.
_HEAD_FIRST_CHARS = 2048
_HEAD_TOKENS = 256
# Where vLLM takes stream_options.include_usage (the router adds it for token budgets).
_USAGE_ROUTES = ("/chat/completions", "/v1/completions")


class Dispatcher:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.attempts = Attempts(state)
        self._policy_needs_prompt = state.policy.needs_prompt
        self._chars_per_token = state.settings.chars_per_token
        self._output_cost = state.settings.output_token_cost
        self._expected_output = state.settings.expected_output_tokens
        self._token_budgets = frozenset(
            t for t, lim in state.tenant_table.limits().items() if lim.tokens_per_minute)

    async def dispatch(self, call: Call) -> web.StreamResponse:
        state = self.state
        fleet = state.fleet
        if not fleet.known_model(call.model):
            # A client-chosen name: logged escaped and cut, so it cannot forge log lines.
            call.request[REQUEST_MODEL] = ascii(call.model[:200])
            served = fleet.models(time.monotonic())
            raise RouterError(
                404,
                f"The model `{call.model[:200]}` does not exist. Available models: "
                f"{', '.join(served) or 'none'}.",
                "model_not_found",
                available_models=served,
            )
        parsed = self._take_features(call)
        gate = state.budgets
        if gate is not None and gate.limited(call.tenant):
            await self._take_budget(call, gate)
        try:
            return await self._admitted(call, parsed)
        finally:
            self._settle(call)

    async def _admitted(self, call: Call, parsed: dict[str, Any] | None
                        ) -> web.StreamResponse:
        state = self.state
        admission = state.admission
        if not admission.try_acquire(call.klass):
            wait_started = time.monotonic()
            charge = self._cost(call)
            try:
                await admission.acquire(call.tenant, call.klass, charge)
            except AdmissionRejected as exc:
                # the waits that ended in a 429 count too: they are the starved ones
                state.metrics.tenant_queue_wait.labels(call.tenant_label, call.klass).observe(
                    time.monotonic() - wait_started)
                raise RouterError(
                    429, "The router is at capacity; retry shortly.", exc.reason,
                    headers={"Retry-After": "1"},
                ) from None
            call.queue_charge = charge
            waited = time.monotonic() - wait_started
            state.metrics.queue_wait.observe(waited)
            state.metrics.tenant_queue_wait.labels(call.tenant_label, call.klass).observe(waited)
        try:
            if parsed is not None:  # with a slot: tokenizing is work admission bounds
                await self._tokenize(call, parsed)
                parsed = None
            return await self._route_with_retries(call)
        finally:
            admission.release(call.klass)

    async def _take_budget(self, call: Call, gate: BudgetGate) -> None:
        """A place in the tenant's budgets, or 429 naming the limit it is over (with
        Retry-After and OpenAI's x-ratelimit-* headers)."""
        tokens = round(self._prompt_tokens(call) + call.output_tokens)
        verdict = await gate.admit(call.tenant, tokens)
        refusal = verdict.refusal
        headers = ratelimit_headers(verdict.room)
        if refusal is not None:
            self.state.metrics.budget_refusals_by(call.tenant_label, refusal.limit).inc()
            headers["Retry-After"] = str(max(math.ceil(refusal.retry_after_s), 1))
            raise RouterError(429, refusal_message(call.tenant, refusal), refusal.limit,
                              headers=headers)
        call.budget_finish = verdict.finish
        # a stream settles its token budget only by its usage: ask for it if the client
        # did not (the relay takes it out of the client's stream)
        call.add_usage = call.stream and not call.stream_usage and (
            call.tenant in self._token_budgets) and call.request.path.endswith(
            _USAGE_ROUTES)
        call.extra_headers = list(headers.items())

    def _settle(self, call: Call) -> None:
        """The request is over: its tenant's budget gets back what it did not use, and
        its fair-queue charge is corrected, by the answer's usage where it came."""
        usage = call.usage
        if usage is not None:
            tokens = self.state.metrics.tenant_tokens_by
            label = call.tenant_label
            tokens(label, "prompt").inc(usage.prompt)
            tokens(label, "completion").inc(usage.completion)
            if usage.cached is not None:
                tokens(label, "cached").inc(usage.cached)
        if call.budget_finish is not None:
            # no usage: it was never sent to an engine (0), or the engine did not say
            # (the estimate stands)
            call.budget_finish(usage.prompt + usage.completion if usage is not None
                               else None if call.sent else 0)
        charge = call.queue_charge
        if charge is not None and usage is not None:
            output_cost = self._output_cost
            prompt = (max(usage.prompt - usage.cached, 0) if usage.cached is not None
                      else charge - 1.0 - output_cost * call.output_tokens)  # the estimate's
            actual = prompt + output_cost * usage.completion + 1.0
            self.state.admission.correct(call.tenant, call.klass, charge, actual)

    def _cost(self, call: Call) -> float:
        """What a waiting request is charged in the fair queue: the prompt tokens it is
        expected not to find cached on any engine (the routing index's best match), so
        a tenant whose prompts are reused gets more through for the same share, and its
        expected output tokens (weighted by --output-token-cost)."""
        features = call.features
        prompt_chars = features.prompt_chars or len(call.body)
        uncached = prompt_chars - self.state.policy.expected_cached_chars(features)
        return (max(uncached, 0) / self._chars_per_token
                + self._output_cost * call.output_tokens + 1.0)  # +1: every request costs

    def _prompt_tokens(self, call: Call) -> float:
        features = call.features
        if features.prompt_tokens:
            return features.prompt_tokens
        return (features.prompt_chars or len(call.body)) / self._chars_per_token

    def _take_features(self, call: Call) -> dict[str, Any] | None:
        """Prompt features for the routing policy, once the model is known to be served
        (an unknown model costs no hashing); the parsed body is dropped after. Returns it
        only when the router tokenizes this model's prompts and the request gave no token
        ids."""
        parsed, call.parsed = call.parsed, None
        call.output_tokens = self._expected_output
        if parsed is not None:
            wanted = parsed.get("max_completion_tokens") or parsed.get("max_tokens")
            if isinstance(wanted, int) and 0 < wanted < self._expected_output * 64:
                call.output_tokens = wanted  # (a cap far above it says little)
        if self._policy_needs_prompt and parsed is not None:
            call.features = self.state.policy.prompt_features(
                parsed, call.model, call.features.session_key
            )
            tokenizers = self.state.tokenizers
            if (tokenizers is not None and call.model in tokenizers.ready
                    and tokenizers.agreeing.get(call.model)
                    and call.features.prompt_token_ids is None):
                return parsed
        return None

    async def _tokenize(self, call: Call, parsed: dict[str, Any]) -> None:
        """The prompt as the engine's token ids, for the precise index. A prompt with much
        text the tokenizer has not seen is encoded in a thread (the encoding releases the
        GIL), so other requests go on meanwhile."""
        tokenizers = self.state.tokenizers
        assert tokenizers is not None
        if call.features.prompt_chars > _MAX_TOKENIZE_CHARS:
            return
        try:
            rendered = tokenizers.render(call.model, parsed)
            if rendered is None:
                return
            tok, prompt = rendered
            covered = -1  # all of it
            head = None
            if prompt.uncached_chars > _HEAD_FIRST_CHARS:
                head = tok.encode_head(prompt, _HEAD_TOKENS)
            if head is not None:
                ids, covered = head
            if head is None or (covered >= 0 and self._may_hold_more(call.model, ids)):
                covered = -1
                if prompt.uncached_chars > _INLINE_TOKENIZE_CHARS:
                    ids = await asyncio.to_thread(tok.encode_rendered, prompt)
                else:
                    ids = tok.encode_rendered(prompt)
            elif covered >= 0:  # no engine holds it: the rest beside it, not awaited
                tokenizers.warmer.offer(tok, prompt)
        except Exception:  # never fail a request over its routing hint
            log.warning("request %s: tokenizing the prompt failed; routing on the estimate",
                        call.rid, exc_info=True)
            return
        if ids:
            features = call.features
            features.prompt_token_ids = ids[:MAX_TOKEN_IDS]
            features.token_ids_complete = covered < 0
            features.prompt_tokens = len(ids) if covered < 0 else max(
                len(ids), round(len(ids) * prompt.chars / max(covered, 1)))
            call.tokenized = True

    def _may_hold_more(self, model: str, head: Sequence[int]) -> bool:
        """Whether some engine whose ids agree with the router's for `model` and whose
        feed is live holds every full block of `head` (so it may hold more of the prompt:
        tokenize all of it)."""
        feeds, tokenizers = self.state.kv_feeds, self.state.tokenizers
        if feeds is None or tokenizers is None:
            return False
        live = [engine_id for engine_id in tokenizers.agreeing.get(model, ())
                if feeds.precise(engine_id)]
        return any(match.blocks >= len(head) // size
                   for match, size in feeds.index.match(head, live).values())

    async def _route_with_retries(self, call: Call) -> web.StreamResponse:
        state = self.state
        settings = state.settings
        fleet = state.fleet
        tried: list[str] = []
        last: EngineFailure | None = None
        for attempt in range(settings.max_retries + 1):
            if last is not None:  # a retry: only when some engine is left to try
                if not fleet.candidates(call.model, time.monotonic(), exclude=tried):
                    break
                backoff = settings.retry_backoff_s * (2 ** (attempt - 1))
                await asyncio.sleep(backoff * (0.5 + random.random()))
            now = time.monotonic()
            candidates, at_limit = fleet.candidates_with_room(call.model, now, exclude=tried)
            if not candidates and at_limit:
                # every engine not tried yet is at its limit: wait for room on one
                candidates = await self._wait_for_engine(call, tried)
                now = time.monotonic()
            if not candidates:
                if last is not None:
                    break
                raise RouterError(
                    503, f"No healthy engine serves `{call.model}` right now.", "no_engine",
                    headers={"Retry-After": "2"},
                )
            if last is not None:  # counted once there is an engine to retry on
                state.metrics.retries.labels(last.kind).inc()
                log.info(
                    "request %s: engine %s failed (%s), retrying on another engine",
                    call.rid, tried[-1], last.message,
                )
            t0 = time.perf_counter()
            if state.kv_feeds is not None and call.features.prompt_token_ids:
                # Ids of the router's own tokenizer mean something only to the engines
                # that were checked to tokenize alike; ids from the client, to every one.
                agreeing = (state.tokenizers.agreeing.get(call.model, {})
                            if call.tokenized and state.tokenizers is not None else None)
                state.kv_feeds.annotate(call.features, candidates, agreeing)
                correction = state.estimate_correction
                if correction is not None and any(
                        c.precise_cached_chars is not None for c in candidates):
                    for c in candidates:  # the others' estimates, on the same scale
                        if c.precise_cached_chars is None:
                            c.estimate_factor = correction.factor(c.id)
            decision = state.policy.select(call.features, candidates, now)
            state.metrics.routing_decision_seconds.observe(time.perf_counter() - t0)
            state.metrics.routing_decisions_by(state.policy.name, decision.reason).inc()
            if state.decisions is not None:
                features = call.features
                ids = features.prompt_token_ids
                call.decision = state.decisions.record(
                    call.rid, call.model, state.policy.name, decision, candidates,
                    features.prompt_chars,
                    len(ids) if ids and features.token_ids_complete else 0, attempt,
                    time.time())
            try:
                return await self.attempts.run(call, decision, now)
            except EngineTimeout as exc:  # the engine may still be working: no retry
                raise UpstreamFailure(exc.status, exc.message, exc.kind) from None
            except Retryable as exc:
                last = exc
                tried.append(decision.engine_id)
        assert last is not None
        raise UpstreamFailure(last.status, last.message, last.kind)

    async def _wait_for_engine(self, call: Call, tried: list[str]) -> list[Candidate]:
        """Every engine serving the model (but those in `tried`) is at
        --max-inflight-per-engine: wait in the admission queue until one may have room (a
        request to one finished, or one joined, came back or was un-drained). An empty
        list when no such engine serves the model any more; 429 when the queue is full
        or the wait lasts longer than --queue-timeout-s."""
        state = self.state
        admission = state.admission
        started = time.monotonic()
        give_up = started + admission.queue_timeout_s
        ticket = admission.engine_ticket()
        requeue = False  # woken but beaten to the slot: back to the same place in line
        while True:
            try:
                await admission.wait_engine_slot(
                    call.model, give_up - time.monotonic(), ticket, requeue
                )
            except AdmissionRejected as exc:
                raise RouterError(
                    429, "Every engine serving this model is at its limit; retry shortly.",
                    f"engine_{exc.reason}", headers={"Retry-After": "1"},
                ) from None
            requeue = True
            now = time.monotonic()
            candidates, at_limit = state.fleet.candidates_with_room(
                call.model, now, exclude=tried
            )
            if candidates or not at_limit:
                state.metrics.queue_wait.observe(now - started)
                return candidates
