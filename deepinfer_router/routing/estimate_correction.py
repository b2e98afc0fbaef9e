"""How much of what the approximate estimate says an engine holds it really reuses, per
engine, learnt from graded decisions: so that in a fleet where some engines publish KV
events and some do not, both are compared on one scale.

The estimate counts what the router sent an engine and models its capacity; it cannot see
evictions the model does not predict, other routers' traffic or restarts between scrapes,
so it over-estimates by an amount no single request reveals. Every answer that reports
`cached_tokens` says, for the engine that served it, what the estimate predicted and what
was really reused. The ratio of the two, summed with exponential decay (recent answers
count most), is the engine's factor: the estimate is multiplied by it where it is
compared with an engine's precise figure. Only an over-estimate is corrected (the factor,
the ratio of the sums, is at most 1: an estimate that is too low on the whole is left, as
is a fleet with no precise engine; single answers above the estimate count, so noise
alone does not pull the factor down),
and never below FLOOR: the estimate is still the best guess there is for that engine.

Pure: numbers in, numbers out. Bounded: an engine that leaves the fleet is forgotten
(`forget`, wired to the fleet's forget listeners), and at most MAX_ENGINES are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOOR = 0.25
MAX_ENGINES = 4096  # engines remembered (the oldest first observed goes first)


@dataclass(slots=True)
class _Sums:
    predicted: float = 0.0
    actual: float = 0.0


class EstimateCorrection:
    def __init__(self, decay: float = 0.05, min_predicted_tokens: float = 1024.0) -> None:
        """`decay`: the weight an older observation loses per new one; a factor is given
        once `min_predicted_tokens` (decayed) of predictions back it."""
        if not 0.0 < decay < 1.0:
            raise ValueError("decay must be in (0, 1)")
        self._keep = 1.0 - decay
        self._min = min_predicted_tokens
        self._sums: dict[str, _Sums] = {}

    def observe(self, engine_id: str, predicted_tokens: int, actual_tokens: int) -> None:
        """The estimate predicted `predicted_tokens` (as vLLM would report them) on the
        engine that then reported `actual_tokens` cached. A prediction of 0 says nothing
        of the estimate's scale: ignored."""
        if predicted_tokens <= 0:
            return
        sums = self._sums.get(engine_id)
        if sums is None:
            if len(self._sums) >= MAX_ENGINES:
                del self._sums[next(iter(self._sums))]
            sums = self._sums[engine_id] = _Sums()
        keep = self._keep
        sums.predicted = sums.predicted * keep + predicted_tokens
        sums.actual = sums.actual * keep + actual_tokens

    def factor(self, engine_id: str) -> float:
        """What to multiply the engine's estimate by (1.0 until enough is known)."""
        sums = self._sums.get(engine_id)
        if sums is None or sums.predicted < self._min:
            return 1.0
        return max(FLOOR, min(1.0, sums.actual / sums.predicted))

    def forget(self, engine_id: str) -> None:
        self._sums.pop(engine_id, None)

    def engines(self) -> list[str]:
        return list(self._sums)
