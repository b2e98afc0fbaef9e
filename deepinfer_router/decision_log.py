"""Recent routing decisions, explained and graded (`GET /admin/decisions/{request_id}`,
`deepinfer_cache_prediction_error_tokens`, `deepinfer_misroutes_total`).

Each decision is kept with the candidates as the policy saw them and the figures it left
on the Decision (routing/explain.py). Its prediction, in tokens, of what each candidate
holds of the prompt is: the engine's own KV events where its feed is live, else the
router's estimate, both cut to what vLLM can report cached at all (whole blocks, never the
block holding the prompt's last token). Once the engine answers with
`usage.prompt_tokens_details.cached_tokens`, the decision is graded: the prediction's
error for the chosen engine, and whether another candidate held more than one block more
of the prompt than the chosen engine turned out to (a misroute).

Recording costs a few attribute stores per request (no copies, no per-candidate work);
predictions are worked out when graded or read. Pure: no I/O, wall time passed in.
Bounded: the newest `size` decisions, one per request id (a retry replaces its
request's earlier attempt)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

from .routing.base import Candidate, Decision
from .routing.explain import explain

DEFAULT_BLOCK_SIZE = 16  # vLLM's default, for engines that report none


class Grade(NamedTuple):
    error_tokens: int  # predicted - actual cached tokens on the chosen engine
    misroute: bool
    best_other_tokens: int  # the most another candidate was predicted to hold


def reportable(tokens: int, prompt_tokens: int, block_size: int) -> int:
    """Of `tokens` held, what vLLM can report cached for a prompt of `prompt_tokens`:
    whole blocks only, and never the block holding the prompt's last token (it is
    always computed again)."""
    return max(0, min(tokens, prompt_tokens - 1) // block_size * block_size)


class DecisionRecord:
    __slots__ = ("actual_cached_tokens", "at", "attempt", "candidates", "chars_per_token",
                 "decision", "grade", "model", "policy", "prompt_chars", "prompt_ids",
                 "request_id")

    def __init__(self, request_id: str, model: str, policy: str, at: float, attempt: int,
                 decision: Decision, candidates: Sequence[Candidate], prompt_chars: int,
                 prompt_ids: int, chars_per_token: float) -> None:
        self.request_id = request_id
        self.model = model
        self.policy = policy
        self.at = at  # wall time of the decision
        self.attempt = attempt  # 0 for the first try, n for the n-th retry
        self.decision = decision
        self.candidates = candidates
        self.prompt_chars = prompt_chars
        self.prompt_ids = prompt_ids  # prompt length in token ids, when the router had them
        self.chars_per_token = chars_per_token
        self.actual_cached_tokens: int | None = None
        self.grade: Grade | None = None

    @property
    def predicts(self) -> bool:
        """Whether the decision said anything about what the engines hold: kv-aware
        weighs held prefixes (an empty map is a prediction: nobody holds any), a live
        KV event feed says it outright; session, round-robin and least-conn say nothing,
        so there is nothing to grade."""
        return self.decision.held is not None or any(
            c.precise_cached_tokens is not None for c in self.candidates)

    @property
    def chars_per_token_seen(self) -> float:
        """This prompt's own characters per token where the router had its ids, else the
        configured ratio (the estimate counts characters)."""
        if self.prompt_ids:
            return max(self.prompt_chars / self.prompt_ids, 1e-9)
        return self.chars_per_token

    @property
    def prompt_tokens(self) -> int:
        if self.prompt_ids:
            return self.prompt_ids
        return max(1, round(self.prompt_chars / self.chars_per_token))

    def predicted(self) -> dict[str, int]:
        """Cached tokens per candidate, as vLLM would report them."""
        d = self.decision
        held = d.held
        if not held and all(c.precise_cached_tokens is None for c in self.candidates):
            return {}  # nobody was thought to hold any of it (the usual new prompt)
        held = held or {}
        unit = d.chunk_chars
        prompt_tokens = self.prompt_tokens
        per_token = self.chars_per_token_seen
        out: dict[str, int] = {}
        for c in self.candidates:
            block = c.block_size or DEFAULT_BLOCK_SIZE
            if c.precise_cached_tokens is not None:
                tokens = c.precise_cached_tokens
            else:
                tokens = int(held.get(c.id, 0) * unit / per_token)
            if tokens:
                out[c.id] = reportable(tokens, prompt_tokens, block)
        return out

    def estimated(self, engine_id: str) -> int | None:
        """What the approximate estimate alone (before any correction) predicted for
        `engine_id`, as vLLM would report it; None where its figure was precise."""
        cand = next((c for c in self.candidates if c.id == engine_id), None)
        if cand is None or cand.precise_cached_tokens is not None or cand.estimate_factor <= 0:
            return None
        held = (self.decision.held or {}).get(engine_id, 0)
        tokens = int(held * self.decision.chunk_chars / self.chars_per_token_seen
                     / cand.estimate_factor)
        return reportable(tokens, self.prompt_tokens, cand.block_size or DEFAULT_BLOCK_SIZE)

    def block_size(self) -> int:
        for c in self.candidates:
            if c.id == self.decision.engine_id and c.block_size:
                return c.block_size
        return DEFAULT_BLOCK_SIZE

    def to_json(self) -> dict[str, Any]:
        d = self.decision
        chosen = d.engine_id
        terms = explain(self.candidates, d)
        predicted = self.predicted()
        graded: dict[str, Any] | None = None
        if self.actual_cached_tokens is not None:  # answered; graded if it predicted
            graded = {"cached_tokens": self.actual_cached_tokens}
        if self.grade is not None:
            graded = {
                "cached_tokens": self.actual_cached_tokens,
                "prediction_error_tokens": self.grade.error_tokens,
                "misroute": self.grade.misroute,
                "best_other_predicted_tokens": self.grade.best_other_tokens,
            }
        precise = {t.engine: t.precise for t in terms}
        factors = {c.id: c.estimate_factor for c in self.candidates}

        def rounded(x: float | None, digits: int) -> float | None:
            return None if x is None else round(x, digits)

        return {
            "request_id": self.request_id,
            "model": self.model,
            "policy": self.policy,
            "time": self.at,
            "attempt": self.attempt,
            "engine": chosen,
            "reason": d.reason,
            "index": "precise" if precise.get(chosen) else "approximate",
            "session_engine": d.session_engine,
            "load_bound": d.load_bound,
            "prompt": {"chars": self.prompt_chars, "tokens": self.prompt_tokens,
                       "tokens_exact": bool(self.prompt_ids)},
            "predicted_cached_tokens": predicted.get(chosen, 0),
            "candidates": [
                {
                    "engine": t.engine,
                    "index": "precise" if t.precise else "approximate",
                    "predicted_cached_tokens": predicted.get(t.engine, 0),
                    "cached_chars": t.cached_chars,
                    "load": t.load,
                    "load_cost": rounded(t.load_cost, 4),
                    "pressure_chars": rounded(t.pressure_chars, 1),
                    "score": rounded(t.score, 1),
                    "within_bound": t.within_bound,
                    "block_size": t.block_size or None,
                    # the estimate's learnt over-estimate correction (mixed fleets)
                    "estimate_factor": None if t.precise else round(factors.get(t.engine, 1.0), 3),
                }
                for t in terms
            ],
            "actual": graded,
        }


class DecisionLog:
    def __init__(self, size: int, chars_per_token: float) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self._chars_per_token = chars_per_token
        self._records: OrderedDict[str, DecisionRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def record(
        self,
        request_id: str,
        model: str,
        policy: str,
        decision: Decision,
        candidates: Sequence[Candidate],
        prompt_chars: int,
        prompt_ids: int,
        attempt: int,
        at: float,
    ) -> DecisionRecord:
        rec = DecisionRecord(request_id, model, policy, at, attempt, decision, candidates,
                             prompt_chars, prompt_ids, self._chars_per_token)
        records = self._records
        if request_id in records:
            del records[request_id]
        records[request_id] = rec
        if len(records) > self.size:
            records.popitem(last=False)
        return rec

    def get(self, request_id: str) -> DecisionRecord | None:
        return self._records.get(request_id)

    def recent(self, limit: int) -> list[DecisionRecord]:
        """The newest `limit` decisions, newest first."""
        out: list[DecisionRecord] = []
        for rec in reversed(self._records.values()):
            if len(out) >= limit:
                break
            out.append(rec)
        return out


def grade(record: DecisionRecord, cached_tokens: int) -> Grade | None:
    """Grade `record` by the cached tokens its engine reported (kept on the record);
    None when the decision predicted nothing (record.predicts)."""
    record.actual_cached_tokens = cached_tokens
    if not record.predicts:
        return None
    chosen = record.decision.engine_id
    predicted = record.predicted()
    best_other = max((n for engine, n in predicted.items() if engine != chosen), default=0)
    g = Grade(predicted.get(chosen, 0) - cached_tokens,
              best_other - cached_tokens > record.block_size(), best_other)
    record.grade = g
    return g
