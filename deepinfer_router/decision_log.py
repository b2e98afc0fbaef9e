"""Recent routing decisions, explained and graded (`GET /admin/decisions/{request_id}`,
`deepinfer_cache_prediction_error_tokens`, `deepinfer_misroutes_total`).

Each decision is kept with the policy's terms per candidate (routing/explain.py) and a
prediction, in tokens, of what each candidate holds of the prompt: the engine's own KV
events where its feed is live, else the router's estimate corrected for what vLLM can
have cached at all (whole blocks only, never the prompt's last token). Once the engine
answers with `usage.prompt_tokens_details.cached_tokens`, the decision is graded: the
prediction's error for the chosen engine, and whether another candidate held more than
one block more of the prompt than the chosen engine turned out to (a misroute).

Pure: no I/O, wall time passed in. Bounded: the newest `size` decisions, one per request
id (a retry replaces its request's earlier attempt)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .routing.base import Decision, RequestFeatures
from .routing.explain import Explanation

DEFAULT_BLOCK_SIZE = 16  # vLLM's default, for engines that report none


@dataclass(frozen=True, slots=True)
class Grade:
    error_tokens: int  # predicted - actual cached tokens on the chosen engine
    misroute: bool
    best_other_tokens: int  # the most another candidate was predicted to hold


@dataclass(slots=True)
class DecisionRecord:
    request_id: str
    model: str
    policy: str
    at: float  # wall time of the decision
    attempt: int  # 0 for the first try, n for the n-th retry
    decision: Decision
    explanation: Explanation
    prompt_chars: int
    prompt_tokens: int
    prompt_tokens_exact: bool  # from the request's token ids, not estimated
    predicted: dict[str, int]  # cached tokens per candidate
    actual_cached_tokens: int | None = None
    grade: Grade | None = None

    def block_size(self) -> int:
        for c in self.explanation.candidates:
            if c.id == self.decision.engine_id and c.block_size:
                return c.block_size
        return DEFAULT_BLOCK_SIZE

    def to_json(self) -> dict[str, Any]:
        chosen = self.decision.engine_id
        terms = self.explanation.terms()
        precise = {t.engine: t.precise for t in terms}
        graded: dict[str, Any] | None = None
        if self.grade is not None:
            graded = {
                "cached_tokens": self.actual_cached_tokens,
                "prediction_error_tokens": self.grade.error_tokens,
                "misroute": self.grade.misroute,
                "best_other_predicted_tokens": self.grade.best_other_tokens,
            }
        return {
            "request_id": self.request_id,
            "model": self.model,
            "policy": self.policy,
            "time": self.at,
            "attempt": self.attempt,
            "engine": chosen,
            "reason": self.decision.reason,
            "index": "precise" if precise.get(chosen) else "approximate",
            "session_engine": self.explanation.session_engine,
            "load_bound": self.explanation.load_bound,
            "prompt": {"chars": self.prompt_chars, "tokens": self.prompt_tokens,
                       "tokens_exact": self.prompt_tokens_exact},
            "predicted_cached_tokens": self.predicted.get(chosen, 0),
            "candidates": [
                {
                    "engine": t.engine,
                    "index": "precise" if t.precise else "approximate",
                    "predicted_cached_tokens": self.predicted.get(t.engine, 0),
                    "cached_chars": t.cached_chars,
                    "load": t.load,
                    "load_cost": round(t.load_cost, 4),
                    "pressure_chars": round(t.pressure_chars, 1),
                    "score": None if t.score is None else round(t.score, 1),
                    "within_bound": t.within_bound,
                    "block_size": t.block_size or None,
                }
                for t in terms
            ],
            "actual": graded,
        }


def predicted_tokens(
    cached_chars: int, prompt_tokens: int, chars_per_token: float, block_size: int
) -> int:
    """The router's estimate of cached characters as the tokens vLLM could report cached:
    never the prompt's last token, whole blocks only (the estimate counts partial ones)."""
    tokens = min(int(cached_chars / chars_per_token), prompt_tokens - 1)
    return max(0, tokens - tokens % block_size)


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
        policy: str,
        request: RequestFeatures,
        decision: Decision,
        explanation: Explanation,
        attempt: int,
        at: float,
    ) -> DecisionRecord:
        ids = request.prompt_token_ids
        cpt = self._chars_per_token
        prompt_tokens = len(ids) if ids else max(1, round(request.prompt_chars / cpt))
        predicted: dict[str, int] = {}
        for c, chars in zip(explanation.candidates, explanation.cached_chars, strict=True):
            if c.precise_cached_tokens is not None:
                predicted[c.id] = c.precise_cached_tokens
            elif chars:
                predicted[c.id] = predicted_tokens(
                    chars, prompt_tokens, cpt, c.block_size or DEFAULT_BLOCK_SIZE)
        rec = DecisionRecord(
            request_id, request.model, policy, at, attempt, decision, explanation,
            request.prompt_chars, prompt_tokens, bool(ids), predicted,
        )
        records = self._records
        records.pop(request_id, None)
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


def grade(record: DecisionRecord, cached_tokens: int) -> Grade:
    """Grade `record` by the cached tokens its engine reported (kept on the record)."""
    chosen = record.decision.engine_id
    others = [n for engine, n in record.predicted.items() if engine != chosen]
    best_other = max(others, default=0)
    g = Grade(
        error_tokens=record.predicted.get(chosen, 0) - cached_tokens,
        misroute=best_other - cached_tokens > record.block_size(),
        best_other_tokens=best_other,
    )
    record.actual_cached_tokens = cached_tokens
    record.grade = g
    return g
